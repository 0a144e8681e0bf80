//! The receiving side both backends share: one channel on which every peer's messages (or the
//! news that a peer is gone) arrive, a queue per peer of what arrived ahead of the collective
//! that consumes it, the wait of one collective for every peer, and the attribution of a failed
//! collective to the ranks at fault.

use std::collections::{BTreeSet, VecDeque};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{send_order, Doorbell};

/// What arrives from one peer.
pub(super) enum Delivery {
    /// A collective's message: its sequence number and payload.
    Frame(u32, Vec<u8>),
    /// The peer is gone; nothing follows.
    Gone(Gone),
}

/// Why a peer's messages stopped.
pub(super) struct Gone {
    pub why: String,
    /// `Some(ranks)` when the peer aborted because of a failure it blames on `ranks` (the peer
    /// itself is alive); `None` when the peer itself failed (closed, reset, garbage).
    pub relayed: Option<Vec<usize>>,
}

/// One delivery and the peer it came from.
pub(super) struct Incoming {
    pub peer: usize,
    pub delivery: Delivery,
}

/// A doorbell slot shared with whoever delivers to an inbox: rung after every delivery once
/// the owner has set a doorbell.
#[derive(Clone, Default)]
pub(super) struct BellSlot(Arc<Mutex<Option<Doorbell>>>);

impl BellSlot {
    pub fn set(&self, bell: Doorbell) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(bell);
    }

    pub fn ring(&self) {
        if let Some(bell) = &*self.0.lock().unwrap_or_else(PoisonError::into_inner) {
            bell.ring();
        }
    }
}

/// A failed collective: what happened and the ranks it is blamed on.
#[derive(Debug)]
pub(super) struct Failure {
    pub message: String,
    pub culprits: Vec<usize>,
}

/// One rank's receiving side.
pub(super) struct Inbox {
    rank: usize,
    world: usize,
    rx: Receiver<Incoming>,
    /// Our own sender, for an [`Interrupt`](super::Interrupt) from another thread.
    tx: Sender<Incoming>,
    /// Per peer, what arrived and no collective has consumed yet, oldest first. A peer is at
    /// most one collective ahead of us, so this stays short.
    pending: Vec<VecDeque<Delivery>>,
    pub bell: BellSlot,
}

impl Inbox {
    /// An inbox and the sender its deliverers clone.
    pub fn new(rank: usize, world: usize) -> (Self, Sender<Incoming>) {
        let (tx, rx) = mpsc::channel();
        let inbox = Self {
            rank,
            world,
            rx,
            tx: tx.clone(),
            pending: (0..world).map(|_| VecDeque::new()).collect(),
            bell: BellSlot::default(),
        };
        (inbox, tx)
    }

    fn drain(&mut self) {
        while let Ok(Incoming { peer, delivery }) = self.rx.try_recv() {
            self.pending[peer].push_back(delivery);
        }
    }

    /// Ends the collective this rank waits in (and every later one), from another thread.
    pub fn interrupt(&self) -> super::Interrupt {
        let (tx, rank, bell) = (self.tx.clone(), self.rank, self.bell.clone());
        super::Interrupt(std::sync::Arc::new(move || {
            let _ = tx.send(Incoming {
                peer: rank,
                delivery: Delivery::Gone(Gone {
                    why: "this rank left the group".into(),
                    relayed: Some(Vec::new()),
                }),
            });
            bell.ring();
        }))
    }

    /// Whether anything from a peer is waiting: the peer entered the next collective, or left.
    pub fn has_incoming(&mut self) -> bool {
        self.drain();
        self.pending.iter().any(|p| !p.is_empty())
    }

    /// Waits for every peer's message of collective `seq`; `timeout` (the per-collective bound
    /// the deadline was made from) only words the error. Returns the payloads by rank (empty
    /// at our own).
    pub fn recv_all(
        &mut self,
        seq: u32,
        deadline: Option<Instant>,
        timeout: Option<Duration>,
    ) -> Result<Vec<Vec<u8>>, Failure> {
        loop {
            if !self.pending[self.rank].is_empty() {
                return Err(Failure {
                    message: format!("this rank left the group during collective #{seq}"),
                    culprits: Vec::new(),
                });
            }
            let mut missing = Vec::new();
            for peer in send_order(self.rank, self.world) {
                match self.pending[peer].front() {
                    None => missing.push(peer),
                    Some(Delivery::Frame(got, _)) if *got == seq => {}
                    Some(_) => return Err(self.failure(seq)),
                }
            }
            if missing.is_empty() {
                break;
            }
            let next = match deadline {
                None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(d) => self
                    .rx
                    .recv_timeout(d.saturating_duration_since(Instant::now())),
            };
            match next {
                Ok(Incoming { peer, delivery }) => self.pending[peer].push_back(delivery),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Failure {
                        message: format!(
                            "timed out after {:?} in collective #{seq} waiting for rank(s) \
                             {missing:?}",
                            timeout.unwrap_or_default()
                        ),
                        culprits: missing,
                    })
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Failure {
                        message: format!(
                            "every peer connection is gone; waiting for rank(s) {missing:?} in \
                             collective #{seq}"
                        ),
                        culprits: missing,
                    })
                }
            }
        }
        let mut recv = vec![Vec::new(); self.world];
        for peer in send_order(self.rank, self.world) {
            if let Some(Delivery::Frame(_, payload)) = self.pending[peer].pop_front() {
                recv[peer] = payload;
            }
        }
        Ok(recv)
    }

    /// Blames the failure of collective `seq` on the right ranks, from everything that has
    /// arrived: peers that failed themselves (closed, reset, out of step), and the ranks that
    /// aborting peers blamed, but not the aborting peers themselves, which are alive.
    fn failure(&mut self, seq: u32) -> Failure {
        self.drain();
        let mut direct = BTreeSet::new();
        let mut relayed = BTreeSet::new();
        let mut relayers = BTreeSet::new();
        let mut first = None;
        for peer in send_order(self.rank, self.world) {
            let why = match self.pending[peer].front() {
                Some(Delivery::Gone(gone)) => {
                    match &gone.relayed {
                        Some(ranks) => {
                            relayers.insert(peer);
                            relayed.extend(ranks.iter().copied());
                        }
                        None => {
                            direct.insert(peer);
                        }
                    }
                    format!("rank {peer} {} during collective #{seq}", gone.why)
                }
                Some(Delivery::Frame(got, _)) if *got != seq => {
                    direct.insert(peer);
                    format!(
                        "out of step with rank {peer}: it sent collective #{got} while this rank \
                         is in #{seq}; every rank must call the collectives in the same order"
                    )
                }
                _ => continue,
            };
            first.get_or_insert(why);
        }
        let mut culprits: BTreeSet<usize> = relayed;
        culprits.extend(direct.difference(&relayers));
        culprits.remove(&self.rank);
        Failure {
            message: first.unwrap_or_else(|| format!("collective #{seq} failed")),
            culprits: culprits.into_iter().collect(),
        }
    }
}
