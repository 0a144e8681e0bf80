//! The `nccl` data plane (feature `cuda`): the bytes of every all-to-all-v travel between GPUs
//! through NCCL's grouped `send`/`recv`, while the epoch's `tcp` mesh stays beside them as the
//! control channel.
//!
//! - **Forming.** The `tcp` mesh of the epoch forms first, from the coordinator's epoch record,
//!   as for the `tcp` data plane. Rank 0 then makes the NCCL unique id and hands it to the other
//!   ranks over that mesh (its connections prove the cluster secret when there is one). Every
//!   rank joins the NCCL communicator with it.
//! - **Each collective.** The ranks first exchange their message lengths over `tcp`, a few bytes
//!   per peer, then the messages themselves over NCCL: one upload of what this rank sends, one
//!   group of `send`/`recv` on the GPU, one download. Because the lengths go over `tcp`, a peer
//!   that has died or left fails the exchange there, with the `tcp` data plane's attribution,
//!   before NCCL is called; an idle rank's doorbell rings when a peer enters the next
//!   collective; and an interrupt ends a wait at once.
//! - **One owner.** An NCCL communicator is used by one thread at a time: each rank's lives on
//!   a thread of its own, which runs the exchanges it is handed and polls their completion, so
//!   that a peer that dies in the middle of one is noticed (the data timeout, or an interrupt)
//!   and the communicator is aborted instead of waiting forever.
//!
//! Messages are host bytes, as for every data plane: the model's activations live on the host.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::{result as nccl, sys};

use super::{check_send_len, send_order, Communicator, Doorbell, Interrupt, TcpComm};
use crate::error::{Error, Result};

/// Bytes of an NCCL unique id.
const ID_BYTES: usize = 128;

/// One rank's end of an `nccl` EP group.
pub struct NcclComm {
    control: TcpComm,
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<std::result::Result<Vec<Vec<u8>>, String>>,
    /// Set to make the owner thread abort the exchange it waits for.
    abort: Arc<AtomicBool>,
    /// How long an exchange may take; `None`: as long as it takes.
    timeout: Option<Duration>,
    /// The first failure: (blamed ranks, message); every later call fails with it.
    failed: Option<(Vec<usize>, String)>,
}

/// An exchange for the owner thread: `send[r]` goes to rank `r` and `recv_len[r]` bytes come
/// from it (both empty at this rank).
struct Job {
    send: Vec<Vec<u8>>,
    recv_len: Vec<usize>,
    deadline: Option<Instant>,
}

impl NcclComm {
    /// Joins the NCCL communicator of the group of `control` (already formed, with its data
    /// timeout set) on GPU `ordinal`, waiting at most `connect_timeout` for every rank to join.
    /// Every rank of the group calls it at the same point.
    pub fn form(
        mut control: TcpComm,
        ordinal: usize,
        connect_timeout: Duration,
        timeout: Option<Duration>,
    ) -> Result<Self> {
        let (rank, world) = (control.rank(), control.world_size());
        // SAFETY: only tries to load the library by name, which runs its initialisers as any use
        // of it would.
        let present = unsafe { sys::is_culib_present() };
        // Rank 0's id, or nothing when it has no NCCL: every rank takes part in the gather, so
        // that none waits for an id that will not come.
        let mine = if rank == 0 && present {
            nccl::get_uniqueid()
                .map(|id| id.internal.iter().map(|&c| c as u8).collect())
                .unwrap_or_else(|e| {
                    tracing::warn!(error = ?e, "ncclGetUniqueId failed");
                    Vec::new()
                })
        } else {
            Vec::new()
        };
        let gathered = control.all_gather(mine)?;
        if !present {
            return Err(Error::Device(
                "the nccl data plane needs NCCL (libnccl.so.2) on the library path".into(),
            ));
        }
        let id = gathered
            .first()
            .filter(|id| id.len() == ID_BYTES)
            .ok_or_else(|| {
                Error::Comm(format!(
                    "rank {rank}: rank 0 has no NCCL unique id to hand out (no NCCL there, or \
                 ncclGetUniqueId failed)"
                ))
            })?;
        let mut internal = [0 as std::ffi::c_char; ID_BYTES];
        for (c, &b) in internal.iter_mut().zip(id.iter()) {
            *c = b as std::ffi::c_char;
        }
        let id = sys::ncclUniqueId { internal };

        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel();
        let (ready_tx, ready) = mpsc::channel();
        let abort = Arc::new(AtomicBool::new(false));
        let owner_abort = abort.clone();
        std::thread::Builder::new()
            .name(format!("nccl-rank-{rank}"))
            .spawn(move || {
                let owner = match Owner::join(ordinal, rank, world, id) {
                    Ok(owner) => {
                        let _ = ready_tx.send(Ok(()));
                        owner
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                owner.serve(job_rx, done_tx, &owner_abort);
            })
            .map_err(|e| Error::Comm(format!("rank {rank}: cannot start the NCCL thread: {e}")))?;
        match ready.recv_timeout(connect_timeout) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Error::Comm(format!("rank {rank}: joining NCCL: {e}"))),
            Err(_) => {
                // The thread stays in ncclCommInitRank until the others come or its process
                // ends; nothing else waits for it.
                return Err(Error::Comm(format!(
                    "rank {rank}: the NCCL communicator did not form within {connect_timeout:?}"
                )));
            }
        }
        Ok(Self {
            control,
            jobs: Some(jobs),
            done,
            abort,
            timeout,
            failed: None,
        })
    }

    /// The error of every call after the first failure.
    fn unusable(&self) -> Option<Error> {
        self.failed
            .as_ref()
            .map(|(peers, message)| Error::PeerFailed {
                peers: peers.clone(),
                message: format!(
                    "rank {}: communicator unusable after an earlier failure ({message}); the EP \
                 group must be re-formed",
                    self.rank()
                ),
            })
    }

    /// Records `e` as the communicator's failure and returns it.
    fn fail(&mut self, e: Error) -> Error {
        let peers = match &e {
            Error::PeerFailed { peers, .. } => peers.clone(),
            _ => Vec::new(),
        };
        self.failed = Some((peers, e.to_string()));
        e
    }

    /// After NCCL failed: which peer is gone, as the `tcp` mesh sees it. A peer that died fails
    /// this gather with the `tcp` data plane's attribution; when every peer answers, NCCL itself
    /// failed and no peer is blamed.
    fn blame(&mut self, why: String) -> Error {
        let me = self.rank();
        let e = match self.control.all_gather(Vec::new()) {
            Err(e) => e,
            Ok(_) => Error::Comm(format!("rank {me}: the NCCL exchange failed: {why}")),
        };
        self.fail(e)
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.control.rank()
    }

    fn world_size(&self) -> usize {
        self.control.world_size()
    }

    fn all_to_all_v(&mut self, mut send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let (me, world) = (self.rank(), self.world_size());
        check_send_len(me, world, send.len())?;
        if let Some(e) = self.unusable() {
            return Err(e);
        }
        let own = std::mem::take(&mut send[me]);
        let lengths = (0..world)
            .map(|r| {
                if r == me {
                    Vec::new()
                } else {
                    (send[r].len() as u64).to_le_bytes().to_vec()
                }
            })
            .collect();
        let lengths = match self.control.all_to_all_v(lengths) {
            Ok(l) => l,
            Err(e) => return Err(self.fail(e)),
        };
        let mut recv_len = vec![0usize; world];
        for (r, bytes) in lengths.iter().enumerate().filter(|&(r, _)| r != me) {
            let len = <[u8; 8]>::try_from(bytes.as_slice())
                .ok()
                .and_then(|b| usize::try_from(u64::from_le_bytes(b)).ok())
                .ok_or_else(|| {
                    Error::Comm(format!(
                        "rank {me}: rank {r} sent a length of {} bytes, not 8",
                        bytes.len()
                    ))
                });
            recv_len[r] = match len {
                Ok(len) => len,
                Err(e) => return Err(self.fail(e)),
            };
        }
        let mut recv = if recv_len.iter().all(|&l| l == 0) && send.iter().all(Vec::is_empty) {
            vec![Vec::new(); world]
        } else {
            let job = Job {
                send,
                recv_len,
                deadline: self.timeout.map(|t| Instant::now() + t),
            };
            let sent = self
                .jobs
                .as_ref()
                .is_some_and(|jobs| jobs.send(job).is_ok());
            let reply = if sent {
                self.done
                    .recv()
                    .unwrap_or_else(|_| Err("the NCCL thread ended".into()))
            } else {
                Err("the NCCL thread ended".into())
            };
            match reply {
                Ok(recv) => recv,
                Err(why) => return Err(self.blame(why)),
            }
        };
        recv[me] = own;
        Ok(recv)
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn set_doorbell(&mut self, bell: Doorbell) {
        self.control.set_doorbell(bell);
    }

    fn has_incoming(&mut self) -> bool {
        self.control.has_incoming()
    }

    fn interrupt(&self) -> Interrupt {
        let (control, abort) = (self.control.interrupt(), self.abort.clone());
        Interrupt(Arc::new(move || {
            abort.store(true, Ordering::SeqCst);
            control.fire();
        }))
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // The owner thread ends its loop, and destroys or aborts the NCCL communicator, once
        // its queue closes; a wait in progress ends at its deadline or now.
        self.abort.store(true, Ordering::SeqCst);
        self.jobs = None;
    }
}

/// The thread that owns one rank's NCCL communicator.
struct Owner {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
}

impl Owner {
    /// Joins the communicator: blocks until every rank has.
    fn join(
        ordinal: usize,
        rank: usize,
        world: usize,
        id: sys::ncclUniqueId,
    ) -> std::result::Result<Self, String> {
        let ctx = CudaContext::new(ordinal).map_err(|e| format!("opening cuda:{ordinal}: {e}"))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| format!("a CUDA stream: {e}"))?;
        let mut comm = MaybeUninit::uninit();
        let (world_i, rank_i) = (
            i32::try_from(world).map_err(|e| e.to_string())?,
            i32::try_from(rank).map_err(|e| e.to_string())?,
        );
        // SAFETY: `comm` is written by NCCL before it is read; the context is current on this
        // thread (`new_stream` bound it).
        let comm = unsafe {
            nccl::comm_init_rank(comm.as_mut_ptr(), world_i, id, rank_i)
                .map_err(|e| format!("ncclCommInitRank: {e:?}"))?;
            comm.assume_init()
        };
        Ok(Self {
            comm,
            stream,
            rank,
            world,
        })
    }

    /// Runs the exchanges of `jobs` in turn until the queue closes or one fails; then destroys
    /// the communicator (or aborts it, after a failure).
    fn serve(
        self,
        jobs: mpsc::Receiver<Job>,
        done: mpsc::Sender<std::result::Result<Vec<Vec<u8>>, String>>,
        abort: &AtomicBool,
    ) {
        let mut healthy = true;
        for job in jobs {
            let result = self.exchange(job, abort);
            healthy = result.is_ok();
            if done.send(result).is_err() || !healthy {
                break;
            }
        }
        // SAFETY: the communicator is ours and nothing uses it after this.
        unsafe {
            let _ = if healthy {
                nccl::comm_destroy(self.comm)
            } else {
                nccl::comm_abort(self.comm)
            };
        }
    }

    /// One all-to-all-v: the messages to the GPU, one NCCL group of sends and receives, the
    /// received bytes back; waits for it by polling, so that a deadline or an abort can end it.
    fn exchange(&self, job: Job, abort: &AtomicBool) -> std::result::Result<Vec<Vec<u8>>, String> {
        let driver = |e: cudarc::driver::DriverError| format!("CUDA: {e}");
        let sent: Vec<u8> = job.send.concat();
        let received: usize = job.recv_len.iter().sum();
        let send_buf: Option<CudaSlice<u8>> = if sent.is_empty() {
            None
        } else {
            Some(self.stream.clone_htod(&sent).map_err(driver)?)
        };
        let mut recv_buf: Option<CudaSlice<u8>> = if received == 0 {
            None
        } else {
            Some(self.stream.alloc_zeros(received).map_err(driver)?)
        };
        let send_base = send_buf
            .as_ref()
            .map_or(0, |b| b.device_ptr(&self.stream).0);
        let recv_base = recv_buf
            .as_mut()
            .map_or(0, |b| b.device_ptr_mut(&self.stream).0);
        let offsets = |lens: &mut dyn Iterator<Item = usize>| -> Vec<usize> {
            lens.scan(0, |at, len| {
                let start = *at;
                *at += len;
                Some(start)
            })
            .collect()
        };
        let send_at = offsets(&mut job.send.iter().map(Vec::len));
        let recv_at = offsets(&mut job.recv_len.iter().copied());
        let stream = self.stream.cu_stream() as sys::cudaStream_t;
        nccl::group_start().map_err(|e| format!("ncclGroupStart: {e:?}"))?;
        let enqueue = || -> std::result::Result<(), String> {
            for peer in send_order(self.rank, self.world) {
                let p = peer as i32;
                let len = job.send[peer].len();
                if len > 0 {
                    let at = send_base + send_at[peer] as u64;
                    // SAFETY: `len` bytes from `at` lie in `send_buf`, alive until the stream has
                    // run (the wait below).
                    unsafe {
                        nccl::send(
                            at as _,
                            len,
                            sys::ncclDataType_t::ncclUint8,
                            p,
                            self.comm,
                            stream,
                        )
                    }
                    .map_err(|e| format!("ncclSend to rank {peer}: {e:?}"))?;
                }
                let len = job.recv_len[peer];
                if len > 0 {
                    let at = recv_base + recv_at[peer] as u64;
                    // SAFETY: as above, in `recv_buf`.
                    unsafe {
                        nccl::recv(
                            at as _,
                            len,
                            sys::ncclDataType_t::ncclUint8,
                            p,
                            self.comm,
                            stream,
                        )
                    }
                    .map_err(|e| format!("ncclRecv from rank {peer}: {e:?}"))?;
                }
            }
            Ok(())
        };
        let enqueued = enqueue();
        let ended = nccl::group_end().map_err(|e| format!("ncclGroupEnd: {e:?}"));
        enqueued?;
        ended?;
        let finished = self.stream.record_event(None).map_err(driver)?;
        let mut spins = 0u32;
        while !finished.try_is_complete().map_err(driver)? {
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: the communicator is ours; `state` is written by NCCL.
            unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
            if !matches!(
                state,
                sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
            ) {
                return Err(format!("NCCL reported {state:?}"));
            }
            if abort.load(Ordering::SeqCst) {
                return Err("interrupted".into());
            }
            if job.deadline.is_some_and(|d| Instant::now() >= d) {
                return Err("a peer did not complete the exchange in time".into());
            }
            spins += 1;
            if spins < 1000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        let mut host = vec![0u8; received];
        if let Some(buf) = &recv_buf {
            self.stream.memcpy_dtoh(buf, &mut host).map_err(driver)?;
            self.stream.synchronize().map_err(driver)?;
        }
        drop((send_buf, recv_buf));
        Ok(job
            .recv_len
            .iter()
            .zip(&recv_at)
            .map(|(&len, &at)| host[at..at + len].to_vec())
            .collect())
    }
}
