//! The `local` backend: the ranks are threads of one process; each rank's messages go straight
//! into the others' [`Inbox`] channels. Messages move between threads without being copied.

use std::sync::mpsc::Sender;

use super::inbox::{BellSlot, Delivery, Failure, Gone, Inbox, Incoming};
use super::{check_send_len, send_order, unusable, Communicator, Doorbell, Interrupt};
use crate::error::{Error, Result};

/// One rank's end of a `local` EP group; move each end to its rank's thread. Dropping an end
/// makes the other ranks' next collective fail with [`Error::PeerFailed`] naming it.
pub struct LocalComm {
    rank: usize,
    world: usize,
    /// `to[p]` delivers to rank `p`'s inbox; `None` at our own rank and after a failure.
    to: Vec<Option<Sender<Incoming>>>,
    /// `bells[p]` wakes rank `p` after a delivery.
    bells: Vec<BellSlot>,
    inbox: Inbox,
    /// Sequence number of the next collective; wraps around.
    seq: u32,
    /// Set by the first failed collective; all later calls fail with it.
    failed: Option<Failure>,
}

/// Creates the `n` ends of a local group, in rank order; move each to its rank's thread.
pub fn local_group(n: usize) -> Vec<LocalComm> {
    let (inboxes, senders): (Vec<_>, Vec<_>) = (0..n).map(|rank| Inbox::new(rank, n)).unzip();
    let bells: Vec<BellSlot> = inboxes.iter().map(|i| i.bell.clone()).collect();
    inboxes
        .into_iter()
        .enumerate()
        .map(|(rank, inbox)| LocalComm {
            rank,
            world: n,
            to: senders
                .iter()
                .enumerate()
                .map(|(p, tx)| (p != rank).then(|| tx.clone()))
                .collect(),
            bells: bells.clone(),
            inbox,
            seq: 0,
            failed: None,
        })
        .collect()
}

impl LocalComm {
    /// Delivers to rank `peer` and wakes it; false when the peer's end is gone.
    fn deliver(&self, peer: usize, delivery: Delivery) -> bool {
        let sent = self.to[peer].as_ref().is_some_and(|tx| {
            tx.send(Incoming {
                peer: self.rank,
                delivery,
            })
            .is_ok()
        });
        self.bells[peer].ring();
        sent
    }

    fn exchange(&mut self, mut send: Vec<Vec<u8>>) -> std::result::Result<Vec<Vec<u8>>, Failure> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let mut gone = Vec::new();
        for peer in send_order(self.rank, self.world) {
            let payload = std::mem::take(&mut send[peer]);
            // Keep sending to the others, so that they report the real culprit.
            if !self.deliver(peer, Delivery::Frame(seq, payload)) {
                gone.push(peer);
            }
        }
        if !gone.is_empty() {
            let names: Vec<String> = gone.iter().map(|p| format!("rank {p}")).collect();
            return Err(Failure {
                message: format!(
                    "{} left the group (its end was dropped) before collective #{seq}",
                    names.join(", ")
                ),
                culprits: gone,
            });
        }
        self.inbox.recv_all(seq, None, None)
    }

    /// Tells every peer not blamed which ranks this rank blames, and leaves the group.
    fn fail(&mut self, failure: Failure) {
        for peer in send_order(self.rank, self.world) {
            if !failure.culprits.contains(&peer) {
                self.deliver(
                    peer,
                    Delivery::Gone(Gone {
                        why: format!("aborted the collective ({})", failure.message),
                        relayed: Some(failure.culprits.clone()),
                    }),
                );
            }
        }
        self.to.iter_mut().for_each(|tx| *tx = None);
        self.failed = Some(failure);
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_to_all_v(&mut self, mut send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        if let Some(first) = &self.failed {
            return Err(unusable(self.rank, first));
        }
        check_send_len(self.rank, self.world, send.len())?;
        let own = std::mem::take(&mut send[self.rank]);
        match self.exchange(send) {
            Ok(mut recv) => {
                recv[self.rank] = own;
                Ok(recv)
            }
            Err(failure) => {
                let failure = Failure {
                    message: format!("rank {}: {}", self.rank, failure.message),
                    culprits: failure.culprits,
                };
                let error = Error::PeerFailed {
                    peers: failure.culprits.clone(),
                    message: failure.message.clone(),
                };
                self.fail(failure);
                Err(error)
            }
        }
    }

    fn backend(&self) -> &'static str {
        "local"
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

impl Drop for LocalComm {
    fn drop(&mut self) {
        if self.failed.is_some() {
            return;
        }
        for peer in send_order(self.rank, self.world) {
            self.deliver(
                peer,
                Delivery::Gone(Gone {
                    why: "left the group (its end was dropped)".into(),
                    relayed: None,
                }),
            );
        }
    }
}
