//! Setting up the tcp backend's full mesh: exactly one connection per pair of ranks. Rank `r`
//! dials every rank below it (one thread per dial, retrying while the peer is not up yet) and
//! accepts one connection from every rank above it on the calling thread; the hello exchange
//! ([`frame`](super::frame)) tells the acceptor who dialed and lets both ends reject a group
//! that was configured inconsistently.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::frame::{self, Verdict, HELLO_LEN, REPLY_LEN};
use crate::error::{Error, Result};

/// How long an accepted connection may take to send its hello before it is dropped as a stray.
const HELLO_WAIT: Duration = Duration::from_secs(2);
/// Pause between dial attempts, and between polls of the non-blocking listener.
const DIAL_RETRY: Duration = Duration::from_millis(20);
const ACCEPT_POLL: Duration = Duration::from_millis(2);

/// How one side of the set-up ended without a connection.
enum Failure {
    /// Misconfiguration or protocol error: retrying will not help.
    Fatal(String),
    /// No (valid) connection before the deadline; the string says what was last seen.
    Missing(String),
}

/// Connects `rank` to every other rank of `addrs`; returns the streams by peer rank (`None` at
/// `rank`), blocking, with TCP_NODELAY on.
pub(super) fn connect(
    rank: usize,
    listener: &TcpListener,
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<Vec<Option<TcpStream>>> {
    let world = addrs.len();
    if rank >= world {
        return Err(Error::Comm(format!(
            "rank {rank} is outside a group of {world} addresses"
        )));
    }
    let (Ok(rank32), Ok(world32)) = (u32::try_from(rank), u32::try_from(world)) else {
        return Err(Error::Comm(format!(
            "a group of {world} ranks is too large"
        )));
    };
    let deadline = Instant::now() + timeout;
    let abort = AtomicBool::new(false);
    let (dialed, accepted) = std::thread::scope(|s| {
        let dials: Vec<_> = (0..rank)
            .map(|peer| {
                let abort = &abort;
                s.spawn(move || {
                    let r = dial(rank32, world32, peer, addrs[peer], deadline, abort);
                    if matches!(r, Err(Failure::Fatal(_))) {
                        abort.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        let accepted = accept_all(rank32, world32, listener, deadline, &abort);
        if accepted.is_err() {
            abort.store(true, Ordering::Relaxed);
        }
        let dialed: Vec<_> = dials
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Failure::Fatal("dial thread panicked".into())))
            })
            .collect();
        (dialed, accepted)
    });

    let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
    let mut missing = Vec::new();
    for (peer, result) in dialed.into_iter().enumerate() {
        match result {
            Ok(stream) => peers[peer] = Some(stream),
            Err(Failure::Fatal(msg)) => return Err(Error::Comm(format!("rank {rank}: {msg}"))),
            Err(Failure::Missing(why)) => {
                missing.push(format!("rank {peer} at {} ({why})", addrs[peer]))
            }
        }
    }
    match accepted {
        Ok(streams) => {
            for (peer, stream) in streams.into_iter().enumerate() {
                match stream {
                    Some(s) => peers[peer] = Some(s),
                    None if peer > rank => {
                        missing.push(format!("rank {peer} (never connected to us)"))
                    }
                    None => {}
                }
            }
        }
        Err(Failure::Fatal(msg)) => return Err(Error::Comm(format!("rank {rank}: {msg}"))),
        // accept_all reports missing peers as `None` slots, not as an error.
        Err(Failure::Missing(why)) => missing.push(why),
    }
    if !missing.is_empty() {
        return Err(Error::Comm(format!(
            "rank {rank}: the mesh is incomplete after {timeout:?}; no connection with {}. \
             Are those ranks running, and do all ranks use the same addresses?",
            missing.join(", ")
        )));
    }
    tracing::debug!(rank, world, "tcp mesh connected");
    Ok(peers)
}

/// Dials `peer` until it answers our hello or `deadline` passes.
fn dial(
    rank: u32,
    world: u32,
    peer: usize,
    addr: SocketAddr,
    deadline: Instant,
    abort: &AtomicBool,
) -> std::result::Result<TcpStream, Failure> {
    let mut last = String::from("not tried");
    loop {
        if abort.load(Ordering::Relaxed) {
            return Err(Failure::Missing("set-up aborted".into()));
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(Failure::Missing(last));
        }
        match TcpStream::connect_timeout(&addr, remaining.min(Duration::from_secs(1))) {
            Ok(stream) => match handshake(&stream, rank, world, peer, deadline, abort) {
                Ok(()) => return Ok(stream),
                Err(Failure::Fatal(msg)) => return Err(Failure::Fatal(msg)),
                Err(Failure::Missing(why)) => last = why,
            },
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(DIAL_RETRY.min(deadline.saturating_duration_since(Instant::now())));
    }
}

/// The dialer's half of the hello exchange on a fresh connection to `peer`.
fn handshake(
    mut stream: &TcpStream,
    rank: u32,
    world: u32,
    peer: usize,
    deadline: Instant,
    abort: &AtomicBool,
) -> std::result::Result<(), Failure> {
    let io_err = |e: io::Error| Failure::Missing(format!("hello failed: {e}"));
    stream.set_nodelay(true).map_err(io_err)?;
    let remaining = deadline.saturating_duration_since(Instant::now());
    stream
        .set_write_timeout(Some(remaining.max(Duration::from_millis(1))))
        .map_err(io_err)?;
    stream
        .write_all(&frame::encode_hello(rank, world))
        .map_err(io_err)?;
    let mut reply = [0u8; REPLY_LEN];
    match read_full(stream, &mut reply, deadline, abort) {
        Ok(true) => {}
        Ok(false) => return Err(Failure::Missing("no answer to our hello".into())),
        Err(e) => return Err(io_err(e)),
    }
    let Some((their_rank, their_world, verdict)) = frame::decode_reply(&reply) else {
        return Err(Failure::Fatal(format!(
            "the address of rank {peer} answered, but not as a Moebius rank \
             (wrong address, or a different Moebius version)"
        )));
    };
    if their_world != world {
        return Err(Failure::Fatal(format!(
            "rank {peer} belongs to a group of {their_world} ranks, this rank to one of {world}; \
             every rank must be given the same list of addresses"
        )));
    }
    if their_rank as usize != peer {
        return Err(Failure::Fatal(format!(
            "the address of rank {peer} is held by rank {their_rank}; \
             every rank must be given the same list of addresses"
        )));
    }
    match verdict {
        Verdict::Accepted => {}
        Verdict::WorldMismatch | Verdict::BadRank | Verdict::Duplicate => {
            return Err(Failure::Fatal(format!(
                "rank {peer} rejected our hello ({verdict:?}); \
                 every rank must be given its own rank and the same list of addresses"
            )))
        }
    }
    stream.set_write_timeout(None).map_err(io_err)?;
    stream.set_read_timeout(None).map_err(io_err)?;
    Ok(())
}

/// Accepts one connection from every rank above `rank`; the result is indexed by peer rank, with
/// `None` for the ranks that did not connect before `deadline` (and for ranks `..= rank`).
fn accept_all(
    rank: u32,
    world: u32,
    listener: &TcpListener,
    deadline: Instant,
    abort: &AtomicBool,
) -> std::result::Result<Vec<Option<TcpStream>>, Failure> {
    let fatal = |e: io::Error| Failure::Fatal(format!("listener failed: {e}"));
    let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
    let mut waiting = (world - rank - 1) as usize;
    listener.set_nonblocking(true).map_err(fatal)?;
    while waiting > 0 && !abort.load(Ordering::Relaxed) && Instant::now() < deadline {
        let (stream, from) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
            Err(e) => {
                // Transient (a connection reset before accept, out of descriptors): keep trying
                // until the deadline.
                tracing::warn!(rank, error = %e, "accept failed");
                std::thread::sleep(DIAL_RETRY);
                continue;
            }
        };
        let hello = stream.set_nonblocking(false).and_then(|()| {
            let mut hello = [0u8; HELLO_LEN];
            let wait = deadline.min(Instant::now() + HELLO_WAIT);
            read_full(&stream, &mut hello, wait, abort).map(|complete| complete.then_some(hello))
        });
        let Some((their_rank, their_world)) =
            hello.ok().flatten().and_then(|h| frame::decode_hello(&h))
        else {
            tracing::warn!(rank, %from, "dropped a connection that sent no Moebius hello");
            continue;
        };
        let verdict = if their_world != world {
            Verdict::WorldMismatch
        } else if their_rank <= rank || their_rank >= world {
            Verdict::BadRank
        } else if peers[their_rank as usize].is_some() {
            Verdict::Duplicate
        } else {
            Verdict::Accepted
        };
        // If the reply cannot be sent, the dialer retries (or times out) on its own.
        let _ = (&stream).write_all(&frame::encode_reply(rank, world, verdict));
        match verdict {
            Verdict::Accepted => {
                stream.set_nodelay(true).map_err(fatal)?;
                peers[their_rank as usize] = Some(stream);
                waiting -= 1;
            }
            Verdict::WorldMismatch => {
                return Err(Failure::Fatal(format!(
                    "{from} says it is rank {their_rank} of a group of {their_world}, but this \
                     group has {world} ranks; every rank must be given the same list of addresses"
                )))
            }
            Verdict::BadRank => {
                return Err(Failure::Fatal(format!(
                    "{from} says it is rank {their_rank}, but only ranks above {rank} and below \
                     {world} dial this rank; is a rank number given twice?"
                )))
            }
            Verdict::Duplicate => {
                return Err(Failure::Fatal(format!(
                    "two connections claim rank {their_rank} (the second from {from}); \
                     is a rank number given twice?"
                )))
            }
        }
    }
    if abort.load(Ordering::Relaxed) {
        return Err(Failure::Missing("set-up aborted".into()));
    }
    Ok(peers)
}

/// Fills `buf` from a blocking stream, polling so that `deadline` and `abort` are honoured.
/// `Ok(false)` if the peer closed the connection, the deadline passed or set-up was aborted.
fn read_full(
    mut stream: &TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    abort: &AtomicBool,
) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() || abort.load(Ordering::Relaxed) {
            return Ok(false);
        }
        stream.set_read_timeout(Some(remaining.min(Duration::from_millis(100))))?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Ok(false),
            Ok(k) => filled += k,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    stream.set_read_timeout(None)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::TcpComm;

    fn bind() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let a = l.local_addr().expect("addr");
        (l, a)
    }

    #[test]
    fn a_world_size_mismatch_is_rejected_on_both_ends() {
        let (l0, a0) = bind();
        let (l1, a1) = bind();
        let (_l2, a2) = bind();
        let t = Duration::from_secs(10);
        let (r0, r1) = std::thread::scope(|s| {
            // Rank 0 thinks the group has 2 ranks, rank 1 thinks it has 3.
            let h0 = s.spawn(move || TcpComm::connect(0, l0, &[a0, a1], t));
            let h1 = s.spawn(move || TcpComm::connect(1, l1, &[a0, a1, a2], t));
            (h0.join().expect("rank 0"), h1.join().expect("rank 1"))
        });
        let e0 = r0.err().expect("rank 0 must reject").to_string();
        let e1 = r1.err().expect("rank 1 must be rejected").to_string();
        assert!(
            e0.contains("group of 3") && e0.contains("has 2 ranks"),
            "{e0}"
        );
        assert!(e1.contains("rank 0"), "{e1}");
    }

    #[test]
    fn a_missing_peer_is_named_after_the_timeout() {
        let (l0, a0) = bind();
        let (_l1, a1) = bind();
        let (_l2, a2) = bind();
        let err = TcpComm::connect(0, l0, &[a0, a1, a2], Duration::from_millis(200))
            .err()
            .expect("nobody dials rank 0")
            .to_string();
        assert!(
            err.contains("rank 1 (never") && err.contains("rank 2 (never"),
            "{err}"
        );

        // A dialer whose peer's address refuses connections.
        let (l1, a1) = bind();
        let (dead, a0) = bind();
        drop(dead);
        let err = TcpComm::connect(1, l1, &[a0, a1], Duration::from_millis(200))
            .err()
            .expect("rank 0 is not there")
            .to_string();
        assert!(err.contains(&format!("rank 0 at {a0}")), "{err}");
    }

    #[test]
    fn a_stray_connection_does_not_break_the_mesh() {
        let (l0, a0) = bind();
        let (l1, a1) = bind();
        let t = Duration::from_secs(10);
        // Someone connects to rank 0 and says nothing useful before rank 1 dials.
        let mut stray = TcpStream::connect(a0).expect("stray");
        stray.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("write");
        let comms = std::thread::scope(|s| {
            let h0 = s.spawn(move || TcpComm::connect(0, l0, &[a0, a1], t));
            let h1 = s.spawn(move || TcpComm::connect(1, l1, &[a0, a1], t));
            [h0.join().expect("rank 0"), h1.join().expect("rank 1")]
        });
        for c in comms {
            c.expect("mesh despite the stray");
        }
    }
}
