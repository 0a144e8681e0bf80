//! The `local` backend: the ranks are threads of one process, joined by one `mpsc` channel per
//! ordered pair of ranks. Messages move between threads without being copied.

use std::sync::mpsc::{self, Receiver, Sender};

use super::{check_send_len, send_order, unusable, Communicator};
use crate::error::{Error, Result};

/// A message: the collective's sequence number and the payload.
type Msg = (u32, Vec<u8>);

/// One rank's end of a `local` EP group; move each end to its rank's thread. Dropping an end
/// makes the other ranks' next collective fail with [`Error::Comm`].
pub struct LocalComm {
    rank: usize,
    world: usize,
    /// `to[p]` carries our messages to rank `p`; `None` at our own rank and after a failure
    /// (dropping the senders is how the failure reaches the peers).
    to: Vec<Option<Sender<Msg>>>,
    /// `from[p]` carries rank `p`'s messages to us; `None` at our own rank.
    from: Vec<Option<Receiver<Msg>>>,
    /// Sequence number of the next collective; wraps around.
    seq: u32,
    /// Set by the first failed collective; all later calls fail with it.
    failed: Option<String>,
}

/// Creates the `n` ends of a local group, in rank order; move each to its rank's thread.
pub fn local_group(n: usize) -> Vec<LocalComm> {
    let mut ends: Vec<LocalComm> = (0..n)
        .map(|rank| LocalComm {
            rank,
            world: n,
            to: (0..n).map(|_| None).collect(),
            from: (0..n).map(|_| None).collect(),
            seq: 0,
            failed: None,
        })
        .collect();
    for a in 0..n {
        for b in 0..n {
            if a != b {
                let (tx, rx) = mpsc::channel();
                ends[a].to[b] = Some(tx);
                ends[b].from[a] = Some(rx);
            }
        }
    }
    ends
}

impl LocalComm {
    fn exchange(&mut self, mut send: Vec<Vec<u8>>) -> std::result::Result<Vec<Vec<u8>>, String> {
        let seq = self.seq;
        self.seq = seq.wrapping_add(1);
        let mut first_error = None;
        for peer in send_order(self.rank, self.world) {
            let payload = std::mem::take(&mut send[peer]);
            let sent = self.to[peer]
                .as_ref()
                .is_some_and(|tx| tx.send((seq, payload)).is_ok());
            if !sent {
                // Keep sending to the others, so that they report the real culprit.
                first_error.get_or_insert(format!(
                    "rank {peer} left the group (its end was dropped) before collective #{seq}"
                ));
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let mut recv = vec![Vec::new(); self.world];
        for peer in send_order(self.rank, self.world) {
            let got = self.from[peer].as_ref().and_then(|rx| rx.recv().ok());
            match got {
                Some((s, payload)) if s == seq => recv[peer] = payload,
                Some((s, _)) => {
                    return Err(format!(
                        "out of step with rank {peer}: it sent collective #{s} while this rank \
                         is in #{seq}; every rank must call the collectives in the same order"
                    ))
                }
                None => {
                    return Err(format!(
                        "rank {peer} left the group (its end was dropped, or it failed) during \
                         collective #{seq}"
                    ))
                }
            }
        }
        Ok(recv)
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
        if let Some(cause) = &self.failed {
            return Err(unusable(self.rank, cause));
        }
        check_send_len(self.rank, self.world, send.len())?;
        let own = std::mem::take(&mut send[self.rank]);
        match self.exchange(send) {
            Ok(mut recv) => {
                recv[self.rank] = own;
                Ok(recv)
            }
            Err(message) => {
                let message = format!("rank {}: {message}", self.rank);
                // Dropping our senders tells every peer that this rank is out.
                self.to.iter_mut().for_each(|tx| *tx = None);
                self.failed = Some(message.clone());
                Err(Error::Comm(message))
            }
        }
    }

    fn backend(&self) -> &'static str {
        "local"
    }
}
