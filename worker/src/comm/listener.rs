//! A worker's data-plane listener, and forming an epoch's full mesh with it.
//!
//! The listener accepts connections for as long as the worker lives. Each new connection gets a
//! short-lived thread that reads its [`Hello`] (bounded in time and size; at most
//! `MAX_HANDSHAKES` at once, more are closed at once) and then parks it in a *lobby*, by the
//! epoch the hello names. Forming the mesh of epoch `n` as rank `r` dials every rank below `r`
//! and claims the connections of the ranks above `r` from the lobby. So no connection can block
//! or poison a formation: junk and silence are closed, a hello for an epoch this worker has left
//! behind is answered `Stale`, one for an epoch it has not reached yet waits in the lobby for
//! it, and one that does not fit the epoch (wrong world size, rank or worker id) is answered
//! `Rejected` without disturbing the real peers. When two connections claim one rank, the later
//! wins: a real peer that retries replaces its own dead attempt.
//!
//! With a [`ClusterSecret`], a connection proves it (see [`auth`](super::auth)) in its hello
//! thread, before it may wait in the lobby; one that cannot is answered `Unauthenticated` and
//! closed, and the dialer checks the acceptor's proof before it sends a frame.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::auth::{self, ClusterSecret, Session, Transcript, NONCE_LEN, TAG_LEN};
use super::frame::{self, Hello, Verdict, HELLO_FIXED, REPLY_LEN};
use super::TcpComm;
use crate::error::{Error, Result};

/// How long an accepted connection may take to send its whole hello.
const HELLO_WAIT: Duration = Duration::from_secs(2);
/// Most connections whose hello is being read at once; more are closed on arrival.
const MAX_HANDSHAKES: usize = 32;
/// Most connections parked in the lobby; the oldest go first.
const MAX_PARKED: usize = 64;
/// A parked connection nobody claimed within this is closed.
const PARK_LIMIT: Duration = Duration::from_secs(60);
/// Pause between dial attempts.
const DIAL_RETRY: Duration = Duration::from_millis(20);
/// How long a reply to a refused hello may take to write.
const REPLY_WRITE: Duration = Duration::from_millis(200);

/// One rank's view of an epoch's group, enough to form its mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSpec {
    pub epoch: u64,
    pub rank: usize,
    /// The worker id of every rank, in rank order; each dialer's hello must name its own.
    pub ids: Vec<String>,
    /// The data-plane address of every rank, in rank order.
    pub addrs: Vec<SocketAddr>,
}

/// A data-plane listener that accepts for the life of its worker; dropping it stops accepting.
pub struct DataListener {
    addr: SocketAddr,
    lobby: Arc<Lobby>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DataListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataListener")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// A connection whose hello was read, waiting to be claimed by a formation.
struct Parked {
    hello: Hello,
    /// What the dialer proved the secret over; the acceptor's reply proves it over the same.
    proof: Option<Transcript>,
    stream: TcpStream,
    from: SocketAddr,
    at: Instant,
}

struct Lobby {
    state: Mutex<LobbyState>,
    arrived: Condvar,
    /// The secret every connection must prove; `None`: the data plane is open.
    secret: Option<ClusterSecret>,
}

#[derive(Default)]
struct LobbyState {
    /// Hellos for epochs below this are stale: this worker has formed, or given up on, a later
    /// epoch.
    floor: u64,
    parked: VecDeque<Parked>,
    /// Connections whose hello is being read now.
    handshakes: usize,
    /// Strangers closed since the last warning about them, and when that was.
    strangers: usize,
    warned: Option<Instant>,
}

/// Strangers (junk, silence, no proof, too many at once) are warned about at most this often,
/// with their count, so that a flood of them cannot flood the log too.
const STRANGER_WARNING_EVERY: Duration = Duration::from_secs(10);

impl LobbyState {
    /// Counts one closed stranger; warns with the count when the last warning is old enough.
    fn stranger(&mut self, from: SocketAddr, why: &str) {
        self.strangers += 1;
        tracing::debug!(%from, "closed a data-plane connection: {why}");
        let now = Instant::now();
        if self
            .warned
            .is_none_or(|at| now.duration_since(at) >= STRANGER_WARNING_EVERY)
        {
            tracing::warn!(
                %from,
                closed = self.strangers,
                "closed data-plane connections that were not ranks of this cluster (latest: {why})"
            );
            self.strangers = 0;
            self.warned = Some(now);
        }
    }
}

impl Lobby {
    fn lock(&self) -> MutexGuard<'_, LobbyState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a new connection: reads its hello on a thread of its own, then parks it.
    fn admit(self: &Arc<Self>, stream: TcpStream, from: SocketAddr) {
        {
            let mut state = self.lock();
            if state.handshakes >= MAX_HANDSHAKES {
                state.stranger(from, "too many connections saying hello at once");
                return;
            }
            state.handshakes += 1;
        }
        let lobby = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("moebius-hello".into())
            .spawn(move || {
                let greeted = greet(&stream, Instant::now() + HELLO_WAIT, lobby.secret.as_ref());
                lobby.park(greeted, stream, from);
            });
        if spawned.is_err() {
            self.lock().handshakes -= 1;
        }
    }

    fn park(
        &self,
        greeted: Option<(Hello, Option<Transcript>)>,
        stream: TcpStream,
        from: SocketAddr,
    ) {
        let mut refused = Vec::new();
        {
            let mut state = self.lock();
            state.handshakes -= 1;
            let Some((hello, proof)) = greeted else {
                state.stranger(from, "no Moebius hello, or no proof of the cluster secret");
                return;
            };
            if hello.epoch < state.floor {
                refused.push((stream, hello, Verdict::Stale));
            } else {
                state.parked.push_back(Parked {
                    hello,
                    proof,
                    stream,
                    from,
                    at: Instant::now(),
                });
                while state.parked.len() > MAX_PARKED {
                    state.parked.pop_front();
                }
                self.arrived.notify_all();
            }
        }
        refuse(refused);
    }

    /// Marks every epoch below `epoch` stale, answering the connections parked for them.
    fn raise_floor(&self, epoch: u64) {
        let stale = {
            let mut state = self.lock();
            state.floor = state.floor.max(epoch);
            let floor = state.floor;
            let (stale, keep) = std::mem::take(&mut state.parked)
                .into_iter()
                .partition::<VecDeque<_>, _>(|p| p.hello.epoch < floor);
            state.parked = keep;
            stale
        };
        refuse(
            stale
                .into_iter()
                .map(|p| (p.stream, p.hello, Verdict::Stale))
                .collect(),
        );
    }

    /// The parked connections for `epoch`, waiting up to `wait` for one to arrive.
    fn take(&self, epoch: u64, wait: Duration) -> Vec<Parked> {
        let mut state = self.lock();
        if !state.parked.iter().any(|p| p.hello.epoch == epoch) {
            state = self
                .arrived
                .wait_timeout(state, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let now = Instant::now();
        state
            .parked
            .retain(|p| now.duration_since(p.at) < PARK_LIMIT);
        let (mine, rest) = std::mem::take(&mut state.parked)
            .into_iter()
            .partition::<VecDeque<_>, _>(|p| p.hello.epoch == epoch);
        state.parked = rest;
        mine.into()
    }
}

/// Answers refused hellos (outside the lobby's lock) and closes their connections.
fn refuse(refused: Vec<(TcpStream, Hello, Verdict)>) {
    for (stream, hello, verdict) in refused {
        answer(&stream, hello.epoch, verdict);
    }
}

/// Tells a dialer we will not use its connection, and why; best effort, bounded in time.
fn answer(mut stream: &TcpStream, epoch: u64, verdict: Verdict) {
    let _ = stream.set_write_timeout(Some(REPLY_WRITE));
    let _ = stream.write_all(&frame::encode_reply(epoch, 0, 0, verdict));
}

impl DataListener {
    /// Binds `addr` (port 0: any free port) and starts accepting, with an open data plane.
    pub fn bind(addr: SocketAddr) -> Result<Self> {
        Self::bind_with(addr, None)
    }

    /// Binds `addr` and starts accepting; with `secret`, every connection in either direction
    /// must prove it.
    pub fn bind_with(addr: SocketAddr, secret: Option<ClusterSecret>) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::Serve(format!("cannot listen on {addr}: {e}")))?;
        Self::from_listener(listener, secret)
    }

    /// Starts accepting on a bound listener.
    pub fn from_listener(listener: TcpListener, secret: Option<ClusterSecret>) -> Result<Self> {
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Serve(format!("cannot read the data-plane address: {e}")))?;
        let lobby = Arc::new(Lobby {
            state: Mutex::new(LobbyState::default()),
            arrived: Condvar::new(),
            secret,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (lobby, stop) = (Arc::clone(&lobby), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("moebius-data-accept".into())
                .spawn(move || accept_loop(&listener, &lobby, &stop))
                .map_err(|e| Error::Serve(format!("cannot start the data-plane acceptor: {e}")))?
        };
        Ok(Self {
            addr,
            lobby,
            stop,
            acceptor: Some(acceptor),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Forms this rank's full mesh of `spec.epoch`: dials every rank below `spec.rank` (retrying
    /// while a peer is not there yet) and claims a connection from every rank above it, until
    /// all are connected, `timeout` passes, or `abort` is set. A failure names the ranks that
    /// could not be connected ([`Error::PeerFailed`]), or says that a peer has moved on to a
    /// newer epoch ([`Error::Comm`]).
    pub fn form(&self, spec: &GroupSpec, timeout: Duration, abort: &AtomicBool) -> Result<TcpComm> {
        let world = spec.addrs.len();
        if spec.rank >= world || spec.ids.len() != world {
            return Err(Error::Comm(format!(
                "rank {} is outside a group of {world} addresses and {} ids",
                spec.rank,
                spec.ids.len()
            )));
        }
        let (Ok(rank32), Ok(world32)) = (u32::try_from(spec.rank), u32::try_from(world)) else {
            return Err(Error::Comm(format!(
                "a group of {world} ranks is too large"
            )));
        };
        self.lobby.raise_floor(spec.epoch);
        let hello = Hello {
            epoch: spec.epoch,
            rank: rank32,
            world: world32,
            id: spec.ids[spec.rank].clone(),
            auth: self.lobby.secret.is_some(),
        };
        let secret = self.lobby.secret.as_ref();
        let deadline = Instant::now() + timeout;
        let failed = AtomicBool::new(false);
        let stop = || abort.load(Ordering::Relaxed) || failed.load(Ordering::Relaxed);
        let (dialed, accepted) = std::thread::scope(|s| {
            let dials: Vec<_> = (0..spec.rank)
                .map(|peer| {
                    let (hello, failed, stop) = (&hello, &failed, &stop);
                    s.spawn(move || {
                        let r = dial(hello, secret, peer, spec.addrs[peer], deadline, stop);
                        if matches!(r, Err(Dial::Fatal(_))) {
                            failed.store(true, Ordering::Relaxed);
                        }
                        r
                    })
                })
                .collect();
            let accepted = self.claim(spec, deadline, &stop);
            let dialed: Vec<_> = dials
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Dial::Fatal("a dial thread panicked".into())))
                })
                .collect();
            (dialed, accepted)
        });

        let rank = spec.rank;
        let mut peers = accepted;
        let mut missing = Vec::new();
        let mut why = Vec::new();
        for (peer, result) in dialed.into_iter().enumerate() {
            match result {
                Ok(dialed) => peers[peer] = Some(dialed),
                Err(Dial::Fatal(msg)) => {
                    return Err(Error::Comm(format!(
                        "rank {rank} of epoch {}: {msg}",
                        spec.epoch
                    )))
                }
                Err(Dial::Missing(last)) => {
                    missing.push(peer);
                    why.push(format!("rank {peer} at {} ({last})", spec.addrs[peer]));
                }
            }
        }
        for (peer, stream) in peers.iter().enumerate().skip(rank + 1) {
            if stream.is_none() {
                missing.push(peer);
                why.push(format!("rank {peer} (never connected to us)"));
            }
        }
        if abort.load(Ordering::Relaxed) {
            return Err(Error::Comm(format!(
                "forming epoch {} was abandoned",
                spec.epoch
            )));
        }
        if !missing.is_empty() {
            return Err(Error::PeerFailed {
                peers: missing,
                message: format!(
                    "rank {rank}: the mesh of epoch {} is incomplete after {timeout:?}; no \
                     connection with {}",
                    spec.epoch,
                    why.join(", ")
                ),
            });
        }
        tracing::debug!(rank, world, epoch = spec.epoch, "tcp mesh connected");
        // Every connection's keys, from its handshake: the ranks below dialed by us.
        let links = peers
            .into_iter()
            .enumerate()
            .map(|(peer, link)| {
                link.map(|(stream, proof)| {
                    let session = match (secret, proof) {
                        (Some(secret), Some(proof)) => Some(secret.session(&proof, peer < rank)),
                        _ => None,
                    };
                    (stream, session)
                })
            })
            .collect::<Vec<Option<(TcpStream, Option<Session>)>>>();
        TcpComm::from_links(rank, links)
    }

    /// Claims one connection from every rank above ours from the lobby; the result is indexed
    /// by rank, `None` where none came.
    fn claim(
        &self,
        spec: &GroupSpec,
        deadline: Instant,
        stop: &impl Fn() -> bool,
    ) -> Vec<Option<Link>> {
        let world = spec.addrs.len();
        let mut peers: Vec<Option<Link>> = (0..world).map(|_| None).collect();
        let mut waiting = world - spec.rank - 1;
        while waiting > 0 && !stop() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            for parked in self
                .lobby
                .take(spec.epoch, left.min(Duration::from_millis(50)))
            {
                let Parked {
                    hello,
                    proof,
                    mut stream,
                    from,
                    ..
                } = parked;
                let peer = hello.rank as usize;
                let problem = if hello.world as usize != world {
                    Some(format!(
                        "it says the group has {} ranks, but it has {world}",
                        hello.world
                    ))
                } else if peer <= spec.rank || peer >= world {
                    Some(format!(
                        "it says it is rank {peer}, but only ranks above {} dial this one",
                        spec.rank
                    ))
                } else if hello.id != spec.ids[peer] {
                    Some(format!(
                        "it says it is worker {:?}, but rank {peer} is {:?}",
                        hello.id, spec.ids[peer]
                    ))
                } else {
                    None
                };
                let verdict = if problem.is_some() {
                    Verdict::Rejected
                } else {
                    Verdict::Accepted
                };
                let mut reply =
                    frame::encode_reply(spec.epoch, spec.rank as u32, world as u32, verdict)
                        .to_vec();
                if let (Some(secret), Some(proof)) = (self.lobby.secret.as_ref(), &proof) {
                    let tag = secret.acceptor_tag(proof, &reply);
                    reply.extend_from_slice(tag.as_ref());
                }
                let _ = stream.set_write_timeout(Some(REPLY_WRITE));
                let sent = stream
                    .write_all(&reply)
                    .and_then(|()| stream.set_write_timeout(None));
                if let Some(problem) = problem {
                    tracing::warn!(%from, epoch = spec.epoch, "rejected a data-plane connection: {problem}");
                    continue;
                }
                if sent.is_err() || stream.set_nodelay(true).is_err() {
                    continue; // The dialer is gone already; it retries if it is a real peer.
                }
                if peers[peer].replace((stream, proof)).is_none() {
                    waiting -= 1;
                }
            }
        }
        peers
    }
}

impl Drop for DataListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking accept with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, lobby: &Arc<Lobby>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, from)) => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                lobby.admit(stream, from);
            }
            Err(e) => {
                // Transient (a connection reset before accept, out of descriptors): pause and
                // keep accepting.
                tracing::warn!(error = %e, "data-plane accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Reads a whole hello by `deadline` and, when this listener has a `secret`, has the dialer
/// prove it. `None` for junk, silence, or a dialer that does not share our secret (that one
/// is told so, so that its formation fails with a clear reason).
fn greet(
    mut stream: &TcpStream,
    deadline: Instant,
    secret: Option<&ClusterSecret>,
) -> Option<(Hello, Option<Transcript>)> {
    let hello = read_hello(stream, deadline)?;
    let unauthenticated = |stream: &TcpStream| {
        answer(stream, hello.epoch, Verdict::Unauthenticated);
        None
    };
    let Some(secret) = secret else {
        return if hello.auth {
            unauthenticated(stream)
        } else {
            Some((hello, None))
        };
    };
    if !hello.auth {
        return unauthenticated(stream);
    }
    let mut dialer = [0u8; NONCE_LEN];
    if !read_full(stream, &mut dialer, deadline, &|| false).ok()? {
        return None;
    }
    let acceptor = auth::nonce().ok()?;
    let mut challenge = frame::encode_reply(hello.epoch, 0, 0, Verdict::Challenge).to_vec();
    challenge.extend_from_slice(&acceptor);
    stream.set_write_timeout(Some(REPLY_WRITE)).ok()?;
    stream.write_all(&challenge).ok()?;
    let mut tag = [0u8; TAG_LEN];
    if !read_full(stream, &mut tag, deadline, &|| false).ok()? {
        return None;
    }
    let transcript = Transcript {
        hello: hello.encode(),
        dialer,
        acceptor,
    };
    if !secret.dialer_proved(&transcript, &tag) {
        return unauthenticated(stream);
    }
    stream.set_write_timeout(None).ok()?;
    Some((hello, Some(transcript)))
}

/// Reads a whole hello by `deadline`; `None` for anything else.
fn read_hello(stream: &TcpStream, deadline: Instant) -> Option<Hello> {
    let mut fixed = [0u8; HELLO_FIXED];
    if !read_full(stream, &mut fixed, deadline, &|| false).ok()? {
        return None;
    }
    let (epoch, rank, world, id_len, auth) = Hello::decode_fixed(&fixed)?;
    let mut id = vec![0u8; id_len];
    if !read_full(stream, &mut id, deadline, &|| false).ok()? {
        return None;
    }
    Some(Hello {
        epoch,
        rank,
        world,
        id: String::from_utf8(id).ok()?,
        auth,
    })
}

/// A connection of the mesh, with the handshake its keys come from when the group has a
/// cluster secret.
type Link = (TcpStream, Option<Transcript>);

/// How a dial ended without a connection.
enum Dial {
    /// The peer refused us for good (another epoch, another group): the formation fails now.
    Fatal(String),
    /// No connection before the deadline; the string says what was last seen.
    Missing(String),
}

/// Dials `peer` until it accepts our hello, refuses it, or `deadline` passes.
fn dial(
    hello: &Hello,
    secret: Option<&ClusterSecret>,
    peer: usize,
    addr: SocketAddr,
    deadline: Instant,
    stop: &impl Fn() -> bool,
) -> std::result::Result<Link, Dial> {
    let mut last = String::from("not tried");
    loop {
        if stop() {
            return Err(Dial::Missing("formation stopped".into()));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Dial::Missing(last));
        }
        match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(1))) {
            Ok(stream) => match handshake(&stream, hello, secret, peer, deadline, stop) {
                Ok(proof) => return Ok((stream, proof)),
                Err(Dial::Fatal(msg)) => return Err(Dial::Fatal(msg)),
                Err(Dial::Missing(why)) => last = why,
            },
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(DIAL_RETRY.min(deadline.saturating_duration_since(Instant::now())));
    }
}

/// The dialer's half of the hello exchange on a fresh connection to `peer`, proving `secret`
/// and checking the acceptor's proof when there is one; returns what both proved it over.
fn handshake(
    mut stream: &TcpStream,
    hello: &Hello,
    secret: Option<&ClusterSecret>,
    peer: usize,
    deadline: Instant,
    stop: &impl Fn() -> bool,
) -> std::result::Result<Option<Transcript>, Dial> {
    let io_err = |e: io::Error| Dial::Missing(format!("hello failed: {e}"));
    stream.set_nodelay(true).map_err(io_err)?;
    let left = deadline.saturating_duration_since(Instant::now());
    stream
        .set_write_timeout(Some(left.max(Duration::from_millis(1))))
        .map_err(io_err)?;
    let encoded = hello.encode();
    let mut first = encoded.clone();
    let dialer_nonce = match secret {
        Some(_) => {
            let nonce = auth::nonce().map_err(io_err)?;
            first.extend_from_slice(&nonce);
            Some(nonce)
        }
        None => None,
    };
    stream.write_all(&first).map_err(io_err)?;
    let read = |buf: &mut [u8]| match read_full(stream, buf, deadline, stop) {
        Ok(true) => Ok(()),
        Ok(false) => Err(Dial::Missing("no answer to our hello".into())),
        Err(e) => Err(io_err(e)),
    };
    let decode = |reply: &[u8; REPLY_LEN]| {
        frame::decode_reply(reply).ok_or_else(|| {
            Dial::Fatal(format!(
                "the address of rank {peer} answered, but not as a Moebius rank \
                 (wrong address, or a different Moebius version)"
            ))
        })
    };
    let mut reply = [0u8; REPLY_LEN];
    read(&mut reply)?;
    let (mut epoch, mut their_rank, mut their_world, mut verdict) = decode(&reply)?;
    let mut proved = None;
    if let (Some(secret), Some(dialer)) = (secret, dialer_nonce) {
        if verdict == Verdict::Challenge {
            let mut acceptor = [0u8; NONCE_LEN];
            read(&mut acceptor)?;
            let transcript = Transcript {
                hello: encoded,
                dialer,
                acceptor,
            };
            stream
                .write_all(secret.dialer_tag(&transcript).as_ref())
                .map_err(io_err)?;
            read(&mut reply)?;
            (epoch, their_rank, their_world, verdict) = decode(&reply)?;
            if verdict == Verdict::Accepted {
                let mut tag = [0u8; TAG_LEN];
                read(&mut tag)?;
                if !secret.acceptor_proved(&transcript, &reply, &tag) {
                    return Err(Dial::Fatal(format!(
                        "the address of rank {peer} answered without proof of the cluster \
                         secret; not using it"
                    )));
                }
            }
            proved = Some(transcript);
        } else if verdict == Verdict::Accepted {
            return Err(Dial::Fatal(format!(
                "rank {peer} accepted us without asking for the cluster secret; not using it"
            )));
        }
    }
    match verdict {
        Verdict::Accepted => {}
        Verdict::Stale => {
            return Err(Dial::Fatal(format!(
                "rank {peer} has moved past epoch {}",
                hello.epoch
            )))
        }
        Verdict::Rejected => {
            return Err(Dial::Fatal(format!(
                "rank {peer} rejected our hello for epoch {} (rank {}, {} ranks, worker {:?}); \
                 every rank must be given the same record",
                hello.epoch, hello.rank, hello.world, hello.id
            )))
        }
        Verdict::Unauthenticated | Verdict::Challenge => {
            return Err(Dial::Fatal(format!(
                "rank {peer} does not share our data-plane secret (one of us has none, or the \
                 two --cluster-secret-file differ)"
            )))
        }
    }
    if epoch != hello.epoch || their_rank as usize != peer || their_world != hello.world {
        return Err(Dial::Fatal(format!(
            "the address of rank {peer} is held by rank {their_rank} of {their_world} in epoch \
             {epoch}; every rank must be given the same record"
        )));
    }
    stream.set_write_timeout(None).map_err(io_err)?;
    stream.set_read_timeout(None).map_err(io_err)?;
    Ok(proved)
}

/// Fills `buf` from a blocking stream, polling so that `deadline` and `stop` are honoured.
/// `Ok(false)` if the peer closed the connection, the deadline passed or `stop` said so.
fn read_full(
    mut stream: &TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    stop: &impl Fn() -> bool,
) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stop() {
            return Ok(false);
        }
        stream.set_read_timeout(Some(left.min(Duration::from_millis(100))))?;
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
    use crate::comm::Communicator;

    fn spec(epoch: u64, rank: usize, listeners: &[&DataListener]) -> GroupSpec {
        GroupSpec {
            epoch,
            rank,
            ids: (0..listeners.len()).map(|r| format!("w{r}")).collect(),
            addrs: listeners.iter().map(|l| l.local_addr()).collect(),
        }
    }

    fn bind() -> DataListener {
        DataListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind")
    }

    /// Forms `epoch` on every listener at once and checks the mesh with one all-gather.
    fn form_all(
        listeners: &[&DataListener],
        epoch: u64,
        timeout: Duration,
    ) -> Vec<Result<TcpComm>> {
        let no = AtomicBool::new(false);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..listeners.len())
                .map(|r| {
                    let spec = spec(epoch, r, listeners);
                    let (l, no) = (listeners[r], &no);
                    s.spawn(move || {
                        let mut comm = l.form(&spec, timeout, no)?;
                        let all = comm.all_gather(vec![r as u8])?;
                        assert_eq!(
                            all,
                            (0..listeners.len())
                                .map(|p| vec![p as u8])
                                .collect::<Vec<_>>()
                        );
                        Ok(comm)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank thread"))
                .collect()
        })
    }

    fn hello(epoch: u64, rank: u32, world: u32, id: &str) -> Vec<u8> {
        Hello {
            epoch,
            rank,
            world,
            id: id.into(),
            auth: false,
        }
        .encode()
    }

    fn secret(byte: u8) -> Option<ClusterSecret> {
        Some(ClusterSecret::new(&[byte; 32]).expect("secret"))
    }

    fn bind_secret(byte: u8) -> DataListener {
        DataListener::bind_with(SocketAddr::from(([127, 0, 0, 1], 0)), secret(byte)).expect("bind")
    }

    #[test]
    fn ranks_that_share_the_secret_form_and_strangers_are_refused() {
        let (l0, l1, l2) = (bind_secret(1), bind_secret(1), bind_secret(1));
        let ls = [&l0, &l1, &l2];
        // Strangers: an open hello, and a hello that claims a proof but cannot give one.
        let mut strangers = Vec::new();
        for l in ls {
            let mut open = TcpStream::connect(l.local_addr()).expect("connects");
            open.write_all(&hello(5, 2, 3, "w2")).expect("writes");
            strangers.push(open);
            let mut liar = TcpStream::connect(l.local_addr()).expect("connects");
            let mut claim = Hello {
                epoch: 5,
                rank: 2,
                world: 3,
                id: "w2".into(),
                auth: true,
            }
            .encode();
            claim.extend_from_slice(&[0; NONCE_LEN]);
            liar.write_all(&claim).expect("writes");
            let mut challenge = [0u8; REPLY_LEN + NONCE_LEN];
            liar.read_exact(&mut challenge).expect("is challenged");
            liar.write_all(&[0; TAG_LEN]).expect("writes a wrong tag");
            let mut answer = [0u8; REPLY_LEN];
            liar.read_exact(&mut answer).expect("is answered");
            assert_eq!(
                frame::decode_reply(&answer).map(|r| r.3),
                Some(Verdict::Unauthenticated)
            );
            strangers.push(liar);
        }
        let mut open = TcpStream::connect(l0.local_addr()).expect("connects");
        open.write_all(&hello(5, 2, 3, "w2")).expect("writes");
        let mut answer = [0u8; REPLY_LEN];
        open.read_exact(&mut answer).expect("is answered");
        assert_eq!(
            frame::decode_reply(&answer).map(|r| r.3),
            Some(Verdict::Unauthenticated)
        );
        for result in form_all(&ls, 5, Duration::from_secs(10)) {
            result.expect("the ranks with the secret form their mesh");
        }
    }

    #[test]
    fn another_secret_or_none_fails_the_formation_with_the_reason() {
        for (a, b) in [(bind_secret(1), bind_secret(2)), (bind_secret(1), bind())] {
            let errors: Vec<String> = form_all(&[&a, &b], 1, Duration::from_secs(3))
                .into_iter()
                .filter_map(|r| r.err().map(|e| e.to_string()))
                .collect();
            assert!(
                errors
                    .iter()
                    .any(|e| e.contains("does not share our data-plane secret")),
                "{errors:?}"
            );
        }
    }

    #[test]
    fn junk_and_impostors_never_block_a_formation() {
        let (l0, l1, l2) = (bind(), bind(), bind());
        let ls = [&l0, &l1, &l2];
        let mut junk = Vec::new();
        for l in ls {
            let addr = l.local_addr();
            let mut send = |bytes: &[u8]| {
                let mut s = TcpStream::connect(addr).expect("junk connects");
                s.write_all(bytes).expect("junk writes");
                junk.push(s);
            };
            send(b"GET / HTTP/1.0\r\n\r\n");
            send(&[0xff; 300]);
            send(&hello(5, 2, 3, "w2")[..10]); // truncated
            send(&hello(5, 1, 7, "w1")); // wrong world size
            send(&hello(5, 0, 3, "w0")); // a rank that never dials
            send(&hello(5, 2, 3, "intruder")); // wrong worker id
            send(&hello(4, 2, 3, "w2")); // an older epoch
            junk.push(TcpStream::connect(addr).expect("silent connects")); // silence
        }
        let comms = form_all(&ls, 5, Duration::from_secs(10));
        for c in comms {
            c.expect("the mesh forms despite the junk");
        }
        // The next epoch forms too, and the stale junk of epoch 4 got its answer.
        for c in form_all(&ls, 6, Duration::from_secs(10)) {
            c.expect("the next epoch forms");
        }
    }

    #[test]
    fn a_peer_ahead_waits_in_the_lobby_and_a_peer_behind_is_told_stale() {
        let (l0, l1) = (bind(), bind());
        let ls = [&l0, &l1];
        let no = AtomicBool::new(false);
        // Rank 1 forms epoch 3 before rank 0 has heard of it: its hello waits in the lobby.
        std::thread::scope(|s| {
            let early = s.spawn(|| l1.form(&spec(3, 1, &ls), Duration::from_secs(10), &no));
            std::thread::sleep(Duration::from_millis(200));
            let late = l0.form(&spec(3, 0, &ls), Duration::from_secs(10), &no);
            late.expect("rank 0 claims the early hello");
            early.join().expect("thread").expect("rank 1 is accepted");
        });
        // Rank 1 is still at epoch 3 while rank 0 moved to epoch 4: rank 1 hears `Stale`.
        std::thread::scope(|s| {
            let ahead = s.spawn(|| l0.form(&spec(4, 0, &ls), Duration::from_millis(800), &no));
            std::thread::sleep(Duration::from_millis(100));
            let err = l1
                .form(&spec(3, 1, &ls), Duration::from_secs(10), &no)
                .err()
                .expect("rank 0 is past epoch 3")
                .to_string();
            assert!(err.contains("moved past epoch 3"), "{err}");
            let err = ahead
                .join()
                .expect("thread")
                .err()
                .expect("nobody dials epoch 4");
            assert!(
                matches!(err, Error::PeerFailed { ref peers, .. } if peers == &[1]),
                "{err}"
            );
        });
    }

    #[test]
    fn a_flood_of_silent_connections_only_delays_a_formation() {
        let (l0, l1) = (bind(), bind());
        let silent: Vec<TcpStream> = (0..MAX_HANDSHAKES + 8)
            .map(|_| TcpStream::connect(l0.local_addr()).expect("connects"))
            .collect();
        for c in form_all(&[&l0, &l1], 1, Duration::from_secs(15)) {
            c.expect("the mesh forms once the silent connections time out");
        }
        drop(silent);
    }

    #[test]
    fn missing_peers_are_named_after_the_timeout() {
        let (l0, l1, l2) = (bind(), bind(), bind());
        let ls = [&l0, &l1, &l2];
        let err = l0
            .form(
                &spec(1, 0, &ls),
                Duration::from_millis(300),
                &AtomicBool::new(false),
            )
            .err()
            .expect("nobody dials rank 0");
        match err {
            Error::PeerFailed { peers, message } => {
                assert_eq!(peers, vec![1, 2]);
                assert!(message.contains("rank 1 (never"), "{message}");
            }
            other => panic!("expected PeerFailed, got {other}"),
        }
        // A dialer whose lower peer's address refuses connections.
        let dead = bind();
        let addrs = vec![dead.local_addr(), l1.local_addr()];
        drop(dead);
        let spec = GroupSpec {
            epoch: 1,
            rank: 1,
            ids: vec!["w0".into(), "w1".into()],
            addrs: addrs.clone(),
        };
        let err = l1
            .form(&spec, Duration::from_millis(300), &AtomicBool::new(false))
            .err()
            .expect("rank 0 is not there")
            .to_string();
        assert!(err.contains(&format!("rank 0 at {}", addrs[0])), "{err}");
    }

    #[test]
    fn a_world_size_mismatch_is_refused() {
        let (l0, l1, l2) = (bind(), bind(), bind());
        let no = AtomicBool::new(false);
        let two = GroupSpec {
            epoch: 1,
            rank: 0,
            ids: vec!["w0".into(), "w1".into()],
            addrs: vec![l0.local_addr(), l1.local_addr()],
        };
        let three = GroupSpec {
            epoch: 1,
            rank: 1,
            ids: vec!["w0".into(), "w1".into(), "w2".into()],
            addrs: vec![l0.local_addr(), l1.local_addr(), l2.local_addr()],
        };
        let (r0, r1) = std::thread::scope(|s| {
            let h0 = s.spawn(|| l0.form(&two, Duration::from_millis(800), &no));
            let h1 = s.spawn(|| l1.form(&three, Duration::from_secs(10), &no));
            (h0.join().expect("rank 0"), h1.join().expect("rank 1"))
        });
        let e1 = r1.err().expect("rank 1 is rejected").to_string();
        assert!(e1.contains("rejected our hello"), "{e1}");
        assert!(r0.is_err(), "rank 0 never gets a valid rank 1");
    }
}
