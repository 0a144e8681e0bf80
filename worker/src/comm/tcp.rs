//! The `tcp` backend: a persistent full mesh of TCP connections, one per pair of ranks, carrying
//! length-prefixed [frames](super::frame).
//!
//! Threads: one persistent reader thread per peer reads whole frames off its socket and hands
//! them to the calling thread over one shared channel; the calling thread writes its frames
//! itself. Because every socket is always being drained by its reader, a write of any size
//! completes even when both ends of a pair send megabytes at once, so writes need no threads of
//! their own and a small exchange costs one thread wake-up per received frame. The shared channel
//! means a peer that dies is noticed at once, whichever peer the caller is waiting for.

use std::collections::VecDeque;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::frame::{self, MAX_FRAME_LEN};
use super::{check_send_len, send_order, unusable, Communicator};
use crate::error::{Error, Result};

/// One rank's end of a `tcp` EP group. Dropping it closes its connections (the peers' next
/// collective fails) and joins its reader threads.
pub struct TcpComm {
    rank: usize,
    world: usize,
    /// `peers[p]` is the connection to rank `p`; `None` at our own rank.
    peers: Vec<Option<TcpStream>>,
    /// Frames (or the error that ended a connection) from every reader thread.
    incoming: Receiver<Incoming>,
    /// Per peer, what its reader delivered and no collective has consumed yet, oldest first. A
    /// peer is at most one collective ahead of us, so this stays short.
    pending: Vec<VecDeque<Delivery>>,
    readers: Vec<JoinHandle<()>>,
    /// Sequence number of the next collective; wraps around.
    seq: u32,
    timeout: Option<Duration>,
    /// Set by the first failed collective; all later calls fail with it.
    failed: Option<String>,
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

/// A frame `(seq, payload)`, or why the connection ended.
type Delivery = std::result::Result<(u32, Vec<u8>), String>;

struct Incoming {
    peer: usize,
    delivery: Delivery,
}

impl TcpComm {
    /// Joins the mesh as `rank`, given the already-bound `listener` of this rank and the listen
    /// addresses of all ranks (`addrs[rank]` is ours). Rank `r` dials every rank below it
    /// (retrying until `timeout`, since peers start at different times) and accepts one
    /// connection from every rank above it; a hello with a wrong world size or rank is rejected
    /// with [`Error::Comm`] on both ends. Fails with [`Error::Comm`] naming the missing peers
    /// after `timeout`.
    pub fn connect(
        rank: usize,
        listener: TcpListener,
        addrs: &[SocketAddr],
        timeout: Duration,
    ) -> Result<Self> {
        let peers = super::mesh::connect(rank, &listener, addrs, timeout)?;
        Self::from_streams(rank, peers)
    }

    /// Wraps the connected mesh: `peers[p]` is the connection to rank `p`, `None` at `rank`.
    pub(super) fn from_streams(rank: usize, peers: Vec<Option<TcpStream>>) -> Result<Self> {
        let world = peers.len();
        let (tx, incoming) = mpsc::channel();
        let mut comm = TcpComm {
            rank,
            world,
            peers,
            incoming,
            pending: (0..world).map(|_| VecDeque::new()).collect(),
            readers: Vec::with_capacity(world.saturating_sub(1)),
            seq: 0,
            timeout: None,
            failed: None,
            recycler: Arc::new(Recycler::new(world)),
        };
        // On an error below, dropping `comm` shuts down the sockets and joins the readers
        // started so far.
        for peer in 0..world {
            let Some(stream) = &comm.peers[peer] else {
                continue;
            };
            let stream = stream.try_clone().map_err(|e| {
                Error::Comm(format!(
                    "rank {rank}: cannot clone the socket of rank {peer}: {e}"
                ))
            })?;
            let (tx, recycler) = (tx.clone(), comm.recycler.clone());
            let handle = std::thread::Builder::new()
                .name(format!("moebius-comm-{rank}<-{peer}"))
                .spawn(move || read_loop(peer, stream, tx, &recycler))
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
        if let Some(cause) = &self.failed {
            return Err(unusable(self.rank, cause));
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
        self.seq = seq.wrapping_add(1);
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let result = self
            .send_all(seq, bufs)
            .and_then(|()| self.recv_all(seq, deadline));
        result.map_err(|message| {
            let message = format!("rank {}: {message}", self.rank);
            self.fail(message.clone());
            Error::Comm(message)
        })
    }

    /// Writes to every peer, also after a failed write, so that the healthy peers get this
    /// collective's frames and report the real culprit; returns the first failure.
    fn send_all(&mut self, seq: u32, bufs: &[&[u8]]) -> std::result::Result<(), String> {
        let mut first_error = None;
        for peer in send_order(self.rank, self.world) {
            let Some(stream) = self.peers[peer].as_mut() else {
                continue;
            };
            if let Err(e) = frame::write_frame(stream, seq, bufs[peer]) {
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
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn recv_all(
        &mut self,
        seq: u32,
        deadline: Option<Instant>,
    ) -> std::result::Result<Vec<Vec<u8>>, String> {
        loop {
            let mut missing = Vec::new();
            for peer in send_order(self.rank, self.world) {
                match self.pending[peer].front() {
                    None => missing.push(peer),
                    Some(Err(why)) => {
                        return Err(format!("rank {peer} {why} during collective #{seq}"))
                    }
                    Some(Ok((got, _))) if *got != seq => {
                        return Err(format!(
                            "out of step with rank {peer}: it sent collective #{got} while this \
                             rank is in #{seq}; every rank must call the collectives in the same \
                             order"
                        ))
                    }
                    Some(Ok(_)) => {}
                }
            }
            if missing.is_empty() {
                break;
            }
            let next = match deadline {
                None => self
                    .incoming
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
                Some(d) => self
                    .incoming
                    .recv_timeout(d.saturating_duration_since(Instant::now())),
            };
            match next {
                Ok(Incoming { peer, delivery }) => self.pending[peer].push_back(delivery),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "timed out after {:?} in collective #{seq} waiting for rank(s) {missing:?}",
                        self.timeout.unwrap_or_default()
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "all reader threads stopped; waiting for rank(s) {missing:?} in \
                         collective #{seq}"
                    ))
                }
            }
        }
        let mut recv = vec![Vec::new(); self.world];
        for peer in send_order(self.rank, self.world) {
            if let Some(Ok((_, payload))) = self.pending[peer].pop_front() {
                recv[peer] = payload;
            }
        }
        Ok(recv)
    }

    /// Marks the communicator failed and closes every connection, so that the peers fail fast
    /// too instead of waiting for frames this rank will never send.
    fn fail(&mut self, message: String) {
        self.failed = Some(message);
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

/// A reader thread: forwards frames from `peer` until the connection ends or the communicator
/// is dropped.
fn read_loop(peer: usize, mut stream: TcpStream, tx: Sender<Incoming>, recycler: &Recycler) {
    loop {
        let delivery = frame::read_frame_into(&mut stream, |len| recycler.take(len))
            .map_err(|e| e.to_string());
        let end = delivery.is_err();
        if tx.send(Incoming { peer, delivery }).is_err() || end {
            return;
        }
    }
}

/// For tests and `moebius generate --transport tcp`: binds `n` listeners on `127.0.0.1:0` and
/// connects them into a full mesh (one thread per rank), returning the ends in rank order.
pub fn tcp_group_localhost(n: usize) -> Result<Vec<TcpComm>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind(("127.0.0.1", 0)))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| Error::Comm(format!("cannot bind a listener on 127.0.0.1: {e}")))?;
    let addrs = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| Error::Comm(format!("cannot read a listener's address: {e}")))?;
    let addrs = &addrs;
    std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                s.spawn(move || TcpComm::connect(rank, listener, addrs, Duration::from_secs(10)))
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
    use crate::comm::frame::{decode_reply, encode_hello, Verdict};
    use std::io::{Read, Write};

    #[test]
    fn absurd_frame_length_is_an_error_not_an_allocation() {
        // Rank 0 is real; "rank 1" is this test, speaking the protocol by hand.
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let fake = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).expect("dial");
            s.write_all(&encode_hello(1, 2)).expect("hello");
            let mut reply = [0u8; frame::REPLY_LEN];
            s.read_exact(&mut reply).expect("reply");
            assert_eq!(decode_reply(&reply), Some((0, 2, Verdict::Accepted)));
            let mut header = u64::MAX.to_le_bytes().to_vec();
            header.extend_from_slice(&0u32.to_le_bytes());
            s.write_all(&header).expect("header");
            s
        });
        let unused = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let addrs = [addr, unused.local_addr().expect("addr")];
        let mut comm =
            TcpComm::connect(0, listener, &addrs, Duration::from_secs(10)).expect("mesh");
        let _fake = fake.join().expect("fake peer");
        let err = comm.all_gather(vec![1]).expect_err("absurd frame");
        let msg = err.to_string();
        assert!(msg.contains("rank 1") && msg.contains("4 GiB"), "{msg}");
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
        assert!(comm.set_timeout(Some(Duration::ZERO)).is_err());
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
        // Real ranks cannot get out of step through the API, so "rank 1" is this test, sending
        // a frame of collective #5 when rank 0 is in #0.
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let fake = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).expect("dial");
            s.write_all(&encode_hello(1, 2)).expect("hello");
            let mut reply = [0u8; frame::REPLY_LEN];
            s.read_exact(&mut reply).expect("reply");
            frame::write_frame(&mut s, 5, b"x").expect("frame");
            s
        });
        let unused = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let addrs = [addr, unused.local_addr().expect("addr")];
        let mut comm =
            TcpComm::connect(0, listener, &addrs, Duration::from_secs(10)).expect("mesh");
        let _fake = fake.join().expect("fake peer");
        let err = comm.all_gather(vec![1]).expect_err("desync");
        assert!(err.to_string().contains("out of step with rank 1"), "{err}");
    }
}
