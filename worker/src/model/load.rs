//! Expert load: how many tokens this rank's own sequences routed to each (MoE layer, logical
//! expert), counted in the MoE block before dispatch.
//!
//! The counters are cumulative atomics, written by the engine thread only (one relaxed add per
//! expert a step routed to, per layer) and read by whoever publishes them; they outlive epochs,
//! so a reader takes differences between two snapshots (see [`LoadWindow`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Cumulative tokens routed per (MoE layer, logical expert).
#[derive(Debug)]
pub struct ExpertLoad {
    layers: usize,
    experts: usize,
    counts: Vec<AtomicU64>,
}

impl ExpertLoad {
    /// Zeroed counters for `layers` MoE layers of `experts` logical experts.
    pub fn new(layers: usize, experts: usize) -> Self {
        Self {
            layers,
            experts,
            counts: (0..layers * experts).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn layers(&self) -> usize {
        self.layers
    }

    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Adds one step's tokens per expert of MoE layer `layer`; `tokens[e]` for expert `e`.
    pub fn add(&self, layer: usize, tokens: &[u32]) {
        let Some(row) = self
            .counts
            .get(layer * self.experts..(layer + 1) * self.experts)
        else {
            return;
        };
        for (c, &t) in row.iter().zip(tokens) {
            if t > 0 {
                c.fetch_add(u64::from(t), Ordering::Relaxed);
            }
        }
    }

    /// The counters now, `[layer][expert]`.
    pub fn snapshot(&self) -> Vec<Vec<u64>> {
        self.counts
            .chunks(self.experts.max(1))
            .take(self.layers)
            .map(|row| row.iter().map(|c| c.load(Ordering::Relaxed)).collect())
            .collect()
    }
}

/// A sliding window over snapshots of an [`ExpertLoad`]: the tokens routed per (layer, expert)
/// during the last `span` (as far as the snapshots reach back).
#[derive(Debug)]
pub struct LoadWindow {
    span: Duration,
    snapshots: VecDeque<(Instant, Vec<Vec<u64>>)>,
}

impl LoadWindow {
    pub fn new(span: Duration) -> Self {
        Self {
            span,
            snapshots: VecDeque::new(),
        }
    }

    /// Records a snapshot taken at `at` and forgets those older than the window needs.
    pub fn push(&mut self, at: Instant, snapshot: Vec<Vec<u64>>) {
        self.snapshots.push_back((at, snapshot));
        // Keep the newest snapshot at least `span` old, so the window covers `span`.
        while self.snapshots.len() > 2 && at.duration_since(self.snapshots[1].0) >= self.span {
            self.snapshots.pop_front();
        }
    }

    /// Tokens per (layer, expert) between the oldest and the newest snapshot, and the time
    /// between them.
    pub fn counts(&self) -> (Vec<Vec<u64>>, Duration) {
        match (self.snapshots.front(), self.snapshots.back()) {
            (Some((t0, old)), Some((t1, new))) => {
                let diff = new
                    .iter()
                    .zip(old)
                    .map(|(n, o)| n.iter().zip(o).map(|(n, o)| n.saturating_sub(*o)).collect())
                    .collect();
                (diff, t1.duration_since(*t0))
            }
            _ => (Vec::new(), Duration::ZERO),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_per_layer_and_expert() {
        let load = ExpertLoad::new(2, 3);
        load.add(0, &[1, 0, 2]);
        load.add(1, &[0, 5, 0]);
        load.add(0, &[1, 1, 1]);
        load.add(7, &[9, 9, 9]); // No such layer: ignored.
        assert_eq!(load.snapshot(), vec![vec![2, 1, 3], vec![0, 5, 0]]);
    }

    #[test]
    fn the_window_covers_its_span_and_no_more() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut w = LoadWindow::new(s(10));
        w.push(t0, vec![vec![0, 0]]);
        assert_eq!(w.counts(), (vec![vec![0, 0]], s(0)));
        w.push(t0 + s(5), vec![vec![5, 1]]);
        w.push(t0 + s(10), vec![vec![10, 2]]);
        assert_eq!(w.counts(), (vec![vec![10, 2]], s(10)));
        // 15 s in, the snapshot at 0 s is dropped: the window spans 5 s → 15 s.
        w.push(t0 + s(15), vec![vec![15, 9]]);
        assert_eq!(w.counts(), (vec![vec![10, 8]], s(10)));
    }
}
