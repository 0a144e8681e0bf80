//! The pause before a stopped part of a cluster is started again.

use std::time::Duration;

/// A part that ran at least this long before it stopped was healthy: its next start comes at
/// once again.
const HEALTHY_RUN: Duration = Duration::from_secs(60);
const FIRST: Duration = Duration::from_millis(500);
const MAX: Duration = Duration::from_secs(30);

/// Doubling pauses between restarts of one part, from half a second to 30 s; a part that ran
/// long enough starts over from the shortest.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: FIRST }
    }
}

impl Backoff {
    /// The pause before the next start.
    pub fn next(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(MAX);
        pause
    }

    /// The part ran this long before it stopped.
    pub fn ran_for(&mut self, run: Duration) {
        if run >= HEALTHY_RUN {
            self.next = FIRST;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap_and_a_healthy_run_resets_them() {
        let mut b = Backoff::default();
        let pauses: Vec<u64> = (0..8).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(pauses, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        b.ran_for(Duration::from_secs(5));
        assert_eq!(b.next(), MAX);
        b.ran_for(HEALTHY_RUN);
        assert_eq!(b.next(), FIRST);
    }
}
