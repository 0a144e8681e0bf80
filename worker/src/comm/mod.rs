//! The expert-parallel data plane: one [`Communicator`] per rank of an EP group, used for the
//! MoE dispatch and combine all-to-all-v of every layer (see DESIGN.md, "The data path").
//!
//! - [`local`]: ranks are threads of one process, joined by `std::sync::mpsc` channels;
//! - [`tcp`]: a persistent full mesh of TCP connections carrying length-prefixed frames
//!   ([`frame`] is the wire format, [`listener`] accepts connections for the life of a worker
//!   and forms each epoch's mesh; [`auth`] is the proof of the cluster secret that every
//!   connection gives before its first frame when the cluster has one);
//! - `nccl` (feature `cuda`): messages between GPUs through NCCL's grouped send/recv, with the
//!   epoch's `tcp` mesh beside them for lengths, failures and wake-ups ([`DataPlane`] chooses);
//! - `inbox`: the receiving side both share, with the attribution of a failure to the ranks at
//!   fault.
//!
//! All collectives are lock-step: every rank calls them the same number of times in the same
//! order. A failed collective leaves a communicator unusable (later calls fail at once with
//! [`Error::PeerFailed`] naming the ranks it blames), tells every other rank which ranks it
//! blames, and closes its links, so that the failure reaches every rank promptly and each can
//! report the right culprit. An idle rank need not poll: [`Communicator::set_doorbell`] rings a
//! [`Doorbell`] when a peer's message arrives.

pub mod auth;
mod frame;
mod inbox;
pub mod listener;
pub mod local;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod tcp;

pub use auth::ClusterSecret;

/// For the fuzz targets: `bytes` through every decoder of the `tcp` wire format.
#[doc(hidden)]
pub fn decode_untrusted(bytes: &[u8]) {
    frame::decode_untrusted(bytes);
}
pub use listener::{DataListener, GroupSpec};
pub use local::{local_group, LocalComm};
pub use tcp::{tcp_group_localhost, tcp_group_localhost_with, TcpComm};

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use crate::error::{Error, Result};

/// What the ranks of an EP group exchange tokens over, between workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataPlane {
    /// The `tcp` mesh alone: any devices, any machines.
    #[default]
    Tcp,
    /// NCCL between GPUs, with the `tcp` mesh beside it (feature `cuda`; every rank on a GPU).
    Nccl,
}

impl std::str::FromStr for DataPlane {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "nccl" => Ok(Self::Nccl),
            _ => Err(format!("unknown data plane {s:?}: use tcp or nccl")),
        }
    }
}

impl std::fmt::Display for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Nccl => "nccl",
        })
    }
}

impl DataPlane {
    /// The communicator of an epoch whose `tcp` mesh has formed (with its data timeout set):
    /// the mesh itself, or an NCCL communicator on GPU `gpu` beside it. Every rank of the group
    /// calls it at the same point.
    pub fn communicator(
        self,
        mesh: TcpComm,
        gpu: Option<usize>,
        connect_timeout: Duration,
        data_timeout: Option<Duration>,
    ) -> Result<Box<dyn Communicator>> {
        match (self, gpu) {
            (Self::Tcp, _) => Ok(Box::new(mesh)),
            #[cfg(feature = "cuda")]
            (Self::Nccl, Some(gpu)) => Ok(Box::new(nccl::NcclComm::form(
                mesh,
                gpu,
                connect_timeout,
                data_timeout,
            )?)),
            #[cfg(not(feature = "cuda"))]
            (Self::Nccl, Some(_)) => {
                let _ = (connect_timeout, data_timeout);
                Err(Error::Device(
                    "the nccl data plane needs a moebius built with --features cuda".into(),
                ))
            }
            (Self::Nccl, None) => Err(Error::Config(
                "the nccl data plane needs every worker on a GPU (--device cuda:N)".into(),
            )),
        }
    }
}

/// Ends the collective a rank is waiting in, and every later one, from another thread: the rank
/// leaves its group now instead of waiting for peers that will not come.
#[derive(Clone)]
pub struct Interrupt(Arc<dyn Fn() + Send + Sync>);

impl Interrupt {
    pub fn fire(&self) {
        (self.0)()
    }
}

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Interrupt")
    }
}

/// Wakes a thread that sleeps until there is work: rung by whoever hands it a command, and by
/// the data plane when a peer's message (or the news of a peer's failure) arrives. A ring is
/// never lost: one that comes before the wait ends the next wait at once.
#[derive(Debug, Clone, Default)]
pub struct Doorbell(Arc<(Mutex<bool>, Condvar)>);

impl Doorbell {
    pub fn ring(&self) {
        let (rung, cv) = &*self.0;
        *rung.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cv.notify_all();
    }

    /// Waits until rung (since the last wait) or `timeout`; returns whether it was rung.
    pub fn wait(&self, timeout: Duration) -> bool {
        let (rung, cv) = &*self.0;
        let guard = rung.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut guard, _) = cv
            .wait_timeout_while(guard, timeout, |r| !*r)
            .unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *guard, false)
    }
}

/// One rank's end of an EP group's data plane. Every rank of the group calls the collective
/// methods the same number of times in the same order (lock-step), also with empty messages.
pub trait Communicator: Send {
    /// This end's rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks in the group.
    fn world_size(&self) -> usize;

    /// All-to-all-v: `send[r]` goes to rank `r` (`send.len() == world_size`, else
    /// [`Error::Comm`]); returns `recv` with `recv[r]` = the bytes rank `r` sent to this rank.
    /// `send[self.rank()]` comes back as `recv[self.rank()]` without a copy over the wire.
    fn all_to_all_v(&mut self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>>;

    /// Every rank contributes `data`; returns all contributions by rank.
    fn all_gather(&mut self, data: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        let me = self.rank();
        let mut send: Vec<Vec<u8>> = (0..self.world_size())
            .map(|r| if r == me { Vec::new() } else { data.clone() })
            .collect();
        if let Some(own) = send.get_mut(me) {
            *own = data;
        }
        self.all_to_all_v(send)
    }

    /// Short backend name for logs and benchmarks: `"local"` or `"tcp"`.
    fn backend(&self) -> &'static str;

    /// Rings `bell` whenever a peer's message or failure arrives, so that an idle rank can
    /// sleep until a peer enters the next collective.
    fn set_doorbell(&mut self, bell: Doorbell);

    /// Whether a peer's message (or failure) is waiting to be consumed: a peer has entered the
    /// next collective, or left.
    fn has_incoming(&mut self) -> bool;

    /// A handle that makes this end's current (or next) collective fail at once.
    fn interrupt(&self) -> Interrupt;
}

/// A boxed communicator is one too, so that code generic over `C: Communicator` also takes the
/// backend chosen at start-up (`Box<dyn Communicator>`).
impl<C: Communicator + ?Sized> Communicator for Box<C> {
    fn rank(&self) -> usize {
        (**self).rank()
    }

    fn world_size(&self) -> usize {
        (**self).world_size()
    }

    fn all_to_all_v(&mut self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        (**self).all_to_all_v(send)
    }

    fn all_gather(&mut self, data: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        (**self).all_gather(data)
    }

    fn backend(&self) -> &'static str {
        (**self).backend()
    }

    fn set_doorbell(&mut self, bell: Doorbell) {
        (**self).set_doorbell(bell)
    }

    fn has_incoming(&mut self) -> bool {
        (**self).has_incoming()
    }

    fn interrupt(&self) -> Interrupt {
        (**self).interrupt()
    }
}

/// The peers of `rank` in the order it sends to them: `rank + 1, rank + 2, …` wrapping around,
/// so that the ranks of a group do not all start with the same peer.
fn send_order(rank: usize, world: usize) -> impl Iterator<Item = usize> {
    (1..world).map(move |i| (rank + i) % world)
}

/// The error for a `send` vector of the wrong length; nothing has been sent yet.
fn check_send_len(rank: usize, world: usize, len: usize) -> Result<()> {
    if len == world {
        Ok(())
    } else {
        Err(Error::Comm(format!(
            "rank {rank}: all-to-all-v got {len} send buffers, but the group has {world} ranks \
             (pass one buffer per rank, empty ones included)"
        )))
    }
}

/// The error every later call of a failed communicator returns: the first failure again.
fn unusable(rank: usize, first: &inbox::Failure) -> Error {
    Error::PeerFailed {
        peers: first.culprits.clone(),
        message: format!(
            "rank {rank}: communicator unusable after an earlier failure ({}); \
             the EP group must be re-formed",
            first.message
        ),
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::Communicator;

    /// Runs `f` with each end on its own thread and returns the results in rank order.
    pub(crate) fn on_threads<C, R, F>(comms: Vec<C>, f: F) -> Vec<R>
    where
        C: Send,
        R: Send,
        F: Fn(C) -> R + Sync,
    {
        std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    let f = &f;
                    s.spawn(move || f(c))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank thread panicked"))
                .collect()
        })
    }

    /// A distinct, deterministic payload from `from` to `to` in `round`. Over six rounds every
    /// pair sees every size once, from empty to a little over 4 MiB.
    pub(crate) fn payload(from: usize, to: usize, round: usize) -> Vec<u8> {
        const SIZES: [usize; 6] = [0, 1, 13, 4096, 65_537, (4 << 20) + 5];
        let len = SIZES[(from * 7 + to * 3 + round) % SIZES.len()];
        let tag = (from * 64 + to * 8 + round) as u32;
        (0..len as u32)
            .map(|i| {
                (i.wrapping_mul(2_654_435_761)
                    .wrapping_add(tag.wrapping_mul(40_503))
                    >> 13) as u8
            })
            .collect()
    }

    pub(crate) const ROUNDS: usize = 6;

    /// Every rank sends [`payload`]s to every rank for [`ROUNDS`] rounds and checks what it gets.
    pub(crate) fn exchange_rounds<C: Communicator>(mut comm: C) {
        let (me, n) = (comm.rank(), comm.world_size());
        for round in 0..ROUNDS {
            let send = (0..n).map(|to| payload(me, to, round)).collect();
            let recv = comm.all_to_all_v(send).expect("all-to-all-v");
            assert_eq!(recv.len(), n);
            for (from, got) in recv.iter().enumerate() {
                let want = payload(from, me, round);
                assert_eq!(got.len(), want.len(), "rank {me} from {from} round {round}");
                assert!(
                    *got == want,
                    "rank {me} from {from} round {round}: bytes differ"
                );
            }
        }
    }

    /// all_gather of a rank-specific payload, twice, with an empty contribution in between.
    pub(crate) fn gather_rounds<C: Communicator>(mut comm: C) {
        let (me, n) = (comm.rank(), comm.world_size());
        for round in 0..3 {
            let mine = if round == 1 {
                Vec::new()
            } else {
                payload(me, n, round)
            };
            let all = comm.all_gather(mine).expect("all_gather");
            assert_eq!(all.len(), n);
            for (from, got) in all.iter().enumerate() {
                let want = if round == 1 {
                    Vec::new()
                } else {
                    payload(from, n, round)
                };
                assert!(*got == want, "rank {me} gathered wrong bytes from {from}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{exchange_rounds, gather_rounds, on_threads};
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn send_order_visits_every_peer_once() {
        let order: Vec<_> = send_order(2, 4).collect();
        assert_eq!(order, vec![3, 0, 1]);
        assert_eq!(send_order(0, 1).count(), 0);
    }

    #[test]
    fn all_backends_exchange_exactly_what_was_sent() {
        for n in 1..=4 {
            on_threads(local_group(n), exchange_rounds);
            on_threads(tcp_group_localhost(n).expect("tcp mesh"), exchange_rounds);
        }
    }

    #[test]
    fn all_backends_gather() {
        for n in 1..=4 {
            on_threads(local_group(n), gather_rounds);
            on_threads(tcp_group_localhost(n).expect("tcp mesh"), gather_rounds);
        }
    }

    #[test]
    fn all_backends_reject_a_wrong_send_length() {
        let check = |mut c: Box<dyn Communicator>| {
            let n = c.world_size();
            let err = c
                .all_to_all_v(vec![Vec::new(); n + 1])
                .expect_err("too many");
            assert!(
                matches!(err, Error::Comm(ref m) if m.contains("send buffers")),
                "{err}"
            );
            // Nothing was sent, so the group is still in step.
            let recv = c.all_to_all_v(vec![vec![7]; n]).expect("in step");
            assert_eq!(recv, vec![vec![7]; n]);
        };
        on_threads(boxed_group("local", 2), check);
        on_threads(boxed_group("tcp", 2), check);
    }

    fn boxed_group(backend: &str, n: usize) -> Vec<Box<dyn Communicator>> {
        match backend {
            "local" => local_group(n)
                .into_iter()
                .map(|c| Box::new(c) as Box<dyn Communicator>)
                .collect(),
            _ => tcp_group_localhost(n)
                .expect("tcp mesh")
                .into_iter()
                .map(|c| Box::new(c) as Box<dyn Communicator>)
                .collect(),
        }
    }

    /// Like `on_threads`, but fails the test instead of hanging when a rank does not finish
    /// within `limit`.
    fn on_threads_bounded<R, F>(comms: Vec<Box<dyn Communicator>>, limit: Duration, f: F) -> Vec<R>
    where
        R: Send + 'static,
        F: Fn(Box<dyn Communicator>) -> R + Send + Sync + 'static,
    {
        let n = comms.len();
        let f = std::sync::Arc::new(f);
        let (tx, rx) = std::sync::mpsc::channel();
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let (tx, f) = (tx.clone(), f.clone());
                std::thread::spawn(move || {
                    let rank = c.rank();
                    let _ = tx.send((rank, f(c)));
                })
            })
            .collect();
        let deadline = Instant::now() + limit;
        let mut results: Vec<Option<R>> = (0..n).map(|_| None).collect();
        for _ in 0..n {
            let left = deadline.saturating_duration_since(Instant::now());
            let (rank, r) = rx
                .recv_timeout(left)
                .expect("a rank hung or panicked instead of failing");
            results[rank] = Some(r);
        }
        for h in handles {
            h.join().expect("rank thread panicked");
        }
        results.into_iter().flatten().collect()
    }

    #[test]
    fn a_dropped_peer_fails_the_others_promptly_and_is_blamed() {
        for backend in ["local", "tcp"] {
            for n in 2..=4 {
                let victim = n / 2;
                let limit = Duration::from_secs(20);
                // The survivors stay in the group until all have seen the failure, so that each
                // one's error is about the victim and not about a survivor that already left.
                let survivors = std::sync::Arc::new(std::sync::Barrier::new(n - 1));
                let results = on_threads_bounded(boxed_group(backend, n), limit, move |mut c| {
                    for round in 0..2u8 {
                        c.all_gather(vec![round; 1000]).expect("healthy round");
                    }
                    if c.rank() == victim {
                        drop(c);
                        return None;
                    }
                    let first = c.all_gather(vec![9]).expect_err("the victim is gone");
                    let again = c.all_gather(vec![9]).expect_err("stays failed");
                    survivors.wait();
                    Some((first, again))
                });
                for (rank, result) in results.into_iter().enumerate() {
                    let Some((first, again)) = result else {
                        continue;
                    };
                    assert!(
                        matches!(&first, Error::PeerFailed { peers, .. } if peers == &[victim]),
                        "{backend} n={n} rank {rank}: {first}"
                    );
                    let (first, again) = (first.to_string(), again.to_string());
                    assert!(
                        first.contains(&format!("rank {victim}")),
                        "{backend} n={n} rank {rank}: {first}"
                    );
                    assert!(again.contains("unusable"), "{backend}: {again}");
                }
            }
        }
    }

    #[test]
    fn backend_names() {
        assert_eq!(local_group(1)[0].backend(), "local");
        let tcp = tcp_group_localhost(1).expect("tcp mesh");
        assert_eq!(tcp[0].backend(), "tcp");
    }
}
