//! The `tcp` backend: a persistent full mesh of TCP connections, one per pair of ranks, carrying
//! length-prefixed [frames](super::frame).
//!
//! Threads: one persistent reader thread per peer reads whole frames off its socket and hands
//! them to the calling thread over one shared channel (the [`Inbox`]); the calling thread writes
//! its frames itself. Because every socket is always being drained by its reader, a write of any
//! size completes even when both ends of a pair send megabytes at once, so writes need no threads
//! of their own and a small exchange costs one thread wake-up per received frame. The shared
//! channel means a peer that dies is noticed at once, whichever peer the caller is waiting for.
//! The mesh itself is formed by a [`DataListener`](super::DataListener).

use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::auth::{Direction, Session};
use super::frame::{self, ABORT_SEQ, MAX_FRAME_LEN};
use super::inbox::{BellSlot, Delivery, Failure, Gone, Inbox, Incoming};
use super::listener::{DataListener, GroupSpec};
use super::{check_send_len, send_order, unusable, Communicator, Doorbell, Interrupt};
use crate::error::{Error, Result};

/// How long the abort frame of a failing rank may take to write to one peer; a peer that does
/// not read (a hung process) must not hold the failure up.
const ABORT_WRITE: Duration = Duration::from_millis(200);

/// One rank's end of a `tcp` EP group. Dropping it closes its connections (the peers' next
/// collective fails) and joins its reader threads.
pub struct TcpComm {
    rank: usize,
    world: usize,
    /// `peers[p]` is the connection to rank `p`; `None` at our own rank.
    peers: Vec<Option<TcpStream>>,
    /// `seals[p]` seals what we send to rank `p`, when the group has a cluster secret.
    seals: Vec<Option<Direction>>,
    /// Where a frame is sealed before it is written (reused, so that a large frame does not
    /// map fresh pages every time).
    sealed: Vec<u8>,
    /// Frames (or the news that a connection ended) from every reader thread.
    inbox: Inbox,
    readers: Vec<JoinHandle<()>>,
    /// Sequence number of the next collective; wraps around, skipping [`ABORT_SEQ`].
    seq: u32,
    timeout: Option<Duration>,
    /// Set by the first failed collective; all later calls fail with it.
    failed: Option<Failure>,
    /// Sent buffers, for the readers to receive the next frames into.
    recycler: Arc<Recycler>,
}

/// Large buffers of sent messages, kept for the reader threads to receive later frames into.
/// A fresh buffer of many MiB is mapped, faulted in page by page and unmapped again for every
/// frame; that cost about three quarters of the time of a 100 MiB exchange over loopback (see
/// `moebius bench alltoall`). The dispatch and the combine of a MoE layer send and receive
/// similar sizes, so the buffers of one collective fit the frames of the next.
struct Recycler {
    bufs: Mutex<Vec<Vec<u8>>>,
    /// Most buffers kept; bounds the memory held to about two collectives' sends.
    limit: usize,
}

/// Buffers below this are left to the allocator, which reuses small blocks by itself.
const RECYCLE_MIN: usize = 256 << 10;

impl Recycler {
    fn new(world: usize) -> Self {
        Self {
            bufs: Mutex::new(Vec::new()),
            limit: 2 * world.saturating_sub(1),
        }
    }

    fn put(&self, buf: Vec<u8>) {
        if buf.capacity() < RECYCLE_MIN {
            return;
        }
        let Ok(mut bufs) = self.bufs.lock() else {
            return;
        };
        if bufs.len() < self.limit {
            bufs.push(buf);
        } else if let Some(smallest) = bufs.iter_mut().min_by_key(|b| b.capacity()) {
            if smallest.capacity() < buf.capacity() {
                *smallest = buf;
            }
        }
    }

    /// The smallest kept buffer that holds `len` bytes, else the largest (the reader grows it).
    fn take(&self, len: u64) -> Option<Vec<u8>> {
        if len < RECYCLE_MIN as u64 {
            return None;
        }
        let mut bufs = self.bufs.lock().ok()?;
        let fits = bufs
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() as u64 >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        let pick = fits.or_else(|| {
            bufs.iter()
                .enumerate()
                .max_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i)
        })?;
        Some(bufs.swap_remove(pick))
    }
}

impl TcpComm {
    /// Wraps the connected mesh: `links[p]` is the connection to rank `p` with its keys when
    /// the group has a cluster secret, `None` at `rank`.
    pub(super) fn from_links(
        rank: usize,
        links: Vec<Option<(TcpStream, Option<Session>)>>,
    ) -> Result<Self> {
        let world = links.len();
        let (inbox, tx) = Inbox::new(rank, world);
        let mut peers = Vec::with_capacity(world);
        let mut seals = Vec::with_capacity(world);
        let mut opens = Vec::with_capacity(world);
        for link in links {
            let (stream, session) = match link {
                Some((stream, session)) => (Some(stream), session),
                None => (None, None),
            };
            let (seal, open) = match session {
                Some(Session { send, recv }) => (Some(send), Some(recv)),
                None => (None, None),
            };
            peers.push(stream);
            seals.push(seal);
            opens.push(open);
        }
        let mut comm = TcpComm {
            rank,
            world,
            peers,
            seals,
            sealed: Vec::new(),
            inbox,
            readers: Vec::with_capacity(world.saturating_sub(1)),
            seq: 0,
            timeout: None,
            failed: None,
            recycler: Arc::new(Recycler::new(world)),
        };
        // On an error below, dropping `comm` shuts down the sockets and joins the readers
        // started so far.
        for (peer, open) in opens.into_iter().enumerate() {
            let Some(stream) = &comm.peers[peer] else {
                continue;
            };
            let stream = stream.try_clone().map_err(|e| {
                Error::Comm(format!(
                    "rank {rank}: cannot clone the socket of rank {peer}: {e}"
                ))
            })?;
            let (tx, recycler) = (tx.clone(), comm.recycler.clone());
            let bell = comm.inbox.bell.clone();
            let handle = std::thread::Builder::new()
                .name(format!("moebius-comm-{rank}<-{peer}"))
                .spawn(move || read_loop(peer, stream, open, tx, &recycler, &bell))
                .map_err(|e| {
                    Error::Comm(format!(
                        "rank {rank}: cannot start the reader thread for rank {peer}: {e}"
                    ))
                })?;
            comm.readers.push(handle);
        }
        Ok(comm)
    }

    /// Bounds how long one collective may wait for a peer's frame and for a write to a peer
    /// (`None`, the default, waits forever). A collective that runs out of time fails with
    /// [`Error::Comm`] naming the peers it was waiting for, and the communicator is then unusable.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<()> {
        if timeout == Some(Duration::ZERO) {
            return Err(Error::Comm(
                "a zero timeout is not allowed; use None to wait forever".into(),
            ));
        }
        for (peer, stream) in self.peers.iter().enumerate() {
            if let Some(stream) = stream {
                stream.set_write_timeout(timeout).map_err(|e| {
                    Error::Comm(format!(
                        "rank {}: cannot set the write timeout towards rank {peer}: {e}",
                        self.rank
                    ))
                })?;
            }
        }
        self.timeout = timeout;
        Ok(())
    }

    /// One collective: `bufs[p]` goes to every peer `p` (`bufs[self.rank]` is ignored); returns
    /// what each peer sent, empty at our own rank. Any failure makes the communicator unusable.
    fn exchange(&mut self, bufs: &[&[u8]]) -> Result<Vec<Vec<u8>>> {
        if let Some(first) = &self.failed {
            return Err(unusable(self.rank, first));
        }
        if let Some((p, b)) = bufs
            .iter()
            .enumerate()
            .find(|(_, b)| b.len() as u64 > MAX_FRAME_LEN)
        {
            return Err(Error::Comm(format!(
                "rank {}: message of {} bytes for rank {p} is over the 4 GiB frame limit",
                self.rank,
                b.len()
            )));
        }
        let seq = self.seq;
        self.seq = frame::next_seq(seq);
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let result = self
            .send_all(seq, bufs)
            .and_then(|()| self.inbox.recv_all(seq, deadline, self.timeout));
        result.map_err(|failure| {
            let failure = Failure {
                message: format!("rank {}: {}", self.rank, failure.message),
                culprits: failure.culprits,
            };
            let error = Error::PeerFailed {
                peers: failure.culprits.clone(),
                message: failure.message.clone(),
            };
            self.fail(failure);
            error
        })
    }

    /// Writes to every peer, also after a failed write, so that the healthy peers get this
    /// collective's frames and report the real culprit; returns the first failure.
    fn send_all(&mut self, seq: u32, bufs: &[&[u8]]) -> std::result::Result<(), Failure> {
        let mut first_error = None;
        let mut culprits = Vec::new();
        for peer in send_order(self.rank, self.world) {
            let Some(stream) = self.peers[peer].as_mut() else {
                continue;
            };
            let sent = match self.seals[peer].as_mut() {
                Some(seal) => seal
                    .seal(seq, bufs[peer], &mut self.sealed)
                    .and_then(|()| frame::write_frame(stream, seq, &self.sealed)),
                None => frame::write_frame(stream, seq, bufs[peer]),
            };
            if let Err(e) = sent {
                let what = match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        format!("timed out after {:?}", self.timeout.unwrap_or_default())
                    }
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                        format!("it closed the connection ({e})")
                    }
                    _ => e.to_string(),
                };
                first_error.get_or_insert(format!(
                    "sending to rank {peer} failed during collective #{seq}: {what}"
                ));
                culprits.push(peer);
            }
        }
        match first_error {
            None => Ok(()),
            Some(message) => Err(Failure { message, culprits }),
        }
    }

    /// Marks the communicator failed, tells every peer not blamed which ranks this rank blames
    /// (an abort frame), and closes every connection, so that the peers fail fast too instead
    /// of waiting for frames this rank will never send, and blame the same ranks.
    fn fail(&mut self, failure: Failure) {
        let abort = frame::encode_abort(&failure.culprits, &failure.message);
        for (peer, stream) in self.peers.iter_mut().enumerate() {
            let Some(stream) = stream else { continue };
            if failure.culprits.contains(&peer) {
                continue;
            }
            // Best effort: a peer that cannot take it learns of the failure from the close.
            let _ = stream.set_write_timeout(Some(ABORT_WRITE));
            let _ = match self.seals[peer].as_mut() {
                Some(seal) => seal
                    .seal(ABORT_SEQ, &abort, &mut self.sealed)
                    .and_then(|()| frame::write_frame(stream, ABORT_SEQ, &self.sealed)),
                None => frame::write_frame(stream, ABORT_SEQ, &abort),
            };
        }
        self.failed = Some(failure);
        self.shutdown();
    }

    fn shutdown(&self) {
        for stream in self.peers.iter().flatten() {
            // Already-closed sockets report an error here, which is fine.
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_to_all_v(&mut self, mut send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        check_send_len(self.rank, self.world, send.len())?;
        let own = std::mem::take(&mut send[self.rank]);
        let bufs: Vec<&[u8]> = send.iter().map(Vec::as_slice).collect();
        let mut recv = self.exchange(&bufs)?;
        recv[self.rank] = own;
        for buf in send {
            self.recycler.put(buf);
        }
        Ok(recv)
    }

    /// Writes the same buffer to every peer, without the per-peer copies of the default.
    fn all_gather(&mut self, data: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        let bufs = vec![data.as_slice(); self.world];
        let mut recv = self.exchange(&bufs)?;
        recv[self.rank] = data;
        Ok(recv)
    }

    fn backend(&self) -> &'static str {
        "tcp"
    }

    fn set_doorbell(&mut self, bell: Doorbell) {
        self.inbox.bell.set(bell);
    }

    fn has_incoming(&mut self) -> bool {
        self.inbox.has_incoming()
    }

    fn interrupt(&self) -> Interrupt {
        self.inbox.interrupt()
    }
}

impl Drop for TcpComm {
    fn drop(&mut self) {
        self.shutdown();
        for handle in self.readers.drain(..) {
            // A reader only ends by returning; a panic there has nothing left to clean up.
            let _ = handle.join();
        }
    }
}

/// A reader thread: forwards frames from `peer` until the connection ends (or the peer aborts)
/// or the communicator is dropped, ringing the owner's doorbell after each.
fn read_loop(
    peer: usize,
    mut stream: TcpStream,
    mut open: Option<Direction>,
    tx: Sender<Incoming>,
    recycler: &Recycler,
    bell: &BellSlot,
) {
    loop {
        let frame =
            frame::read_frame_into(&mut stream, |len| recycler.take(len))
                .map_err(|e| e.to_string())
                .and_then(|(seq, mut payload)| {
                    let opened = open
                        .as_mut()
                        .is_none_or(|open| open.open(seq, &mut payload));
                    if opened {
                        Ok((seq, payload))
                    } else {
                        Err("sent a frame that does not open with the connection's key (changed on \
                         the way, or not from that rank)"
                        .to_string())
                    }
                });
        let delivery = match frame {
            Ok((ABORT_SEQ, payload)) => Delivery::Gone(match frame::decode_abort(&payload) {
                Some((culprits, message)) => Gone {
                    why: format!("aborted the collective ({message})"),
                    relayed: Some(culprits),
                },
                None => Gone {
                    why: "sent a malformed abort frame".into(),
                    relayed: None,
                },
            }),
            Ok((seq, payload)) => Delivery::Frame(seq, payload),
            Err(why) => Delivery::Gone(Gone { why, relayed: None }),
        };
        let end = matches!(delivery, Delivery::Gone(_));
        let sent = tx.send(Incoming { peer, delivery }).is_ok();
        bell.ring();
        if !sent || end {
            return;
        }
    }
}

/// For tests and `moebius generate --transport tcp`: binds `n` data-plane listeners on
/// `127.0.0.1:0` and forms them into a full mesh (one thread per rank), returning the ends in
/// rank order.
pub fn tcp_group_localhost(n: usize) -> Result<Vec<TcpComm>> {
    tcp_group_localhost_with(n, None)
}

/// [`tcp_group_localhost`], every connection proving `secret` when one is given.
pub fn tcp_group_localhost_with(
    n: usize,
    secret: Option<super::ClusterSecret>,
) -> Result<Vec<TcpComm>> {
    let listeners = (0..n)
        .map(|_| DataListener::bind_with(SocketAddr::from(([127, 0, 0, 1], 0)), secret.clone()))
        .collect::<Result<Vec<_>>>()?;
    let addrs: Vec<_> = listeners.iter().map(DataListener::local_addr).collect();
    let ids: Vec<String> = (0..n).map(|r| format!("rank-{r}")).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(rank, listener)| {
                let spec = GroupSpec {
                    epoch: 1,
                    rank,
                    ids: ids.clone(),
                    addrs: addrs.clone(),
                };
                s.spawn(move || listener.form(&spec, Duration::from_secs(10), &Default::default()))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::Comm(format!("rank {rank}: connect thread panicked")))
                })
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::frame::{decode_reply, Hello, Verdict};
    use std::io::{Read, Write};
    use std::sync::atomic::AtomicBool;

    /// Rank 0 is real; "rank 1" is the returned socket, speaking the protocol by hand.
    fn with_fake_peer() -> (TcpComm, TcpStream, DataListener) {
        let listener = DataListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
        let addr = listener.local_addr();
        let fake = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).expect("dial");
            let hello = Hello {
                epoch: 1,
                rank: 1,
                world: 2,
                id: "w1".into(),
                auth: false,
            };
            s.write_all(&hello.encode()).expect("hello");
            let mut reply = [0u8; frame::REPLY_LEN];
            s.read_exact(&mut reply).expect("reply");
            assert_eq!(decode_reply(&reply), Some((1, 0, 2, Verdict::Accepted)));
            s
        });
        let spec = GroupSpec {
            epoch: 1,
            rank: 0,
            ids: vec!["w0".into(), "w1".into()],
            addrs: vec![addr, SocketAddr::from(([127, 0, 0, 1], 9))],
        };
        let comm = listener
            .form(&spec, Duration::from_secs(10), &AtomicBool::new(false))
            .expect("mesh");
        (comm, fake.join().expect("fake peer"), listener)
    }

    #[test]
    fn absurd_frame_length_is_an_error_not_an_allocation() {
        let (mut comm, mut fake, _listener) = with_fake_peer();
        let mut header = u64::MAX.to_le_bytes().to_vec();
        header.extend_from_slice(&0u32.to_le_bytes());
        fake.write_all(&header).expect("header");
        let err = comm.all_gather(vec![1]).expect_err("absurd frame");
        let msg = err.to_string();
        assert!(msg.contains("rank 1") && msg.contains("4 GiB"), "{msg}");
        assert!(
            matches!(err, Error::PeerFailed { ref peers, .. } if peers == &[1]),
            "{err}"
        );
        // The communicator stays failed.
        let err = comm.all_gather(vec![1]).expect_err("unusable");
        assert!(err.to_string().contains("unusable"), "{err}");
    }

    #[test]
    fn a_timeout_bounds_a_stuck_peer() {
        let mut comms = tcp_group_localhost(2).expect("mesh");
        let _silent = comms.pop();
        let mut comm = comms.pop().expect("rank 0");
        comm.set_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let err = comm
            .all_gather(vec![1, 2, 3])
            .expect_err("peer never answers");
        let msg = err.to_string();
        assert!(msg.contains("timed out") && msg.contains("[1]"), "{msg}");
        assert!(
            matches!(err, Error::PeerFailed { ref peers, .. } if peers == &[1]),
            "{err}"
        );
        assert!(comm.set_timeout(Some(Duration::ZERO)).is_err());
    }

    #[test]
    fn an_aborting_rank_tells_the_others_whom_it_blames() {
        let mut comms = tcp_group_localhost(3).expect("mesh");
        let c2 = comms.pop().expect("rank 2");
        let mut c1 = comms.pop().expect("rank 1");
        let mut c0 = comms.pop().expect("rank 0");
        // Rank 2 dies; rank 0 sees it first and aborts, blaming it.
        drop(c2);
        let err = c0.all_gather(vec![0]).expect_err("rank 2 is gone");
        assert!(
            matches!(err, Error::PeerFailed { ref peers, .. } if peers == &[2]),
            "{err}"
        );
        // Rank 1 blames rank 2 as well, not rank 0 whose connection closed too.
        let err = c1.all_gather(vec![1]).expect_err("the group failed");
        assert!(
            matches!(err, Error::PeerFailed { ref peers, .. } if peers == &[2]),
            "{err}"
        );
    }

    #[test]
    fn a_doorbell_rings_when_a_peer_enters_a_collective() {
        let mut comms = tcp_group_localhost(2).expect("mesh");
        let mut c1 = comms.pop().expect("rank 1");
        let mut c0 = comms.pop().expect("rank 0");
        let bell = Doorbell::default();
        c1.set_doorbell(bell.clone());
        assert!(!c1.has_incoming());
        assert!(
            !bell.wait(Duration::from_millis(20)),
            "nothing happened yet"
        );
        std::thread::scope(|s| {
            let h = s.spawn(|| c0.all_gather(vec![7]).expect("gather"));
            assert!(bell.wait(Duration::from_secs(10)), "rank 0's frame rings");
            assert!(c1.has_incoming());
            c1.all_gather(vec![8]).expect("gather");
            assert_eq!(h.join().expect("rank 0"), vec![vec![7], vec![8]]);
        });
        assert!(!c1.has_incoming());
    }

    #[test]
    fn recycler_keeps_large_buffers_and_picks_the_best_fit() {
        let r = Recycler::new(2);
        r.put(vec![0; 100]);
        assert!(
            r.take(RECYCLE_MIN as u64).is_none(),
            "small buffers are not kept"
        );
        r.put(Vec::with_capacity(RECYCLE_MIN));
        r.put(Vec::with_capacity(4 * RECYCLE_MIN));
        r.put(Vec::with_capacity(2 * RECYCLE_MIN));
        // At most two kept: the smallest made room for a larger one.
        let fit = r.take(RECYCLE_MIN as u64 + 1).expect("a buffer");
        assert!(fit.capacity() >= 2 * RECYCLE_MIN && fit.capacity() < 4 * RECYCLE_MIN);
        let largest = r.take(8 * RECYCLE_MIN as u64).expect("the largest");
        assert!(largest.capacity() >= 4 * RECYCLE_MIN);
        assert!(r.take(RECYCLE_MIN as u64).is_none(), "empty");
    }

    #[test]
    fn desync_is_detected() {
        // Real ranks cannot get out of step through the API, so "rank 1" sends a frame of
        // collective #5 when rank 0 is in #0.
        let (mut comm, mut fake, _listener) = with_fake_peer();
        frame::write_frame(&mut fake, 5, b"x").expect("frame");
        let err = comm.all_gather(vec![1]).expect_err("desync");
        assert!(err.to_string().contains("out of step with rank 1"), "{err}");
    }
}
