//! How much KV cache a rank's sequences may hold, counted in blocks of tokens.
//!
//! The budget is what admission and preemption in [`super::rank`] keep the caches under, so
//! that a rank never asks its device for more memory than it was given: a sequence holds
//! `⌈cached tokens / BLOCK_TOKENS⌉` blocks, and the blocks of all sequences fit in the budget.

use crate::backend::Backend;
use crate::model::Model;

/// Tokens in one block: the unit the budget counts in, and a page of the GPU's paged caches.
pub const BLOCK_TOKENS: usize = crate::backend::grid::PAGE_ROWS;

/// Bytes of cache a rank takes when no budget is given and its device does not say:
/// vLLM's default for CPUs.
pub const DEFAULT_BYTES: usize = 4 << 30;

/// A rank's KV cache budget: `blocks` blocks of [`BLOCK_TOKENS`] tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvBudget {
    blocks: usize,
}

impl KvBudget {
    /// A budget of `tokens` tokens, rounded down to whole blocks (at least one).
    pub fn tokens(tokens: usize) -> Self {
        Self {
            blocks: (tokens / BLOCK_TOKENS).max(1),
        }
    }

    /// The budget `bytes` of memory hold, at `bytes_per_token` a cached token.
    pub fn bytes(bytes: usize, bytes_per_token: usize) -> Self {
        Self::tokens(bytes / bytes_per_token.max(1))
    }

    /// The budget of a rank running `model`: `tokens`, or what the backend's memory for
    /// caches holds ([`Backend::kv_cache_memory`], else [`DEFAULT_BYTES`]).
    pub fn for_model<B: Backend>(model: &Model<B>, tokens: Option<usize>) -> Self {
        tokens.map_or_else(
            || {
                let memory = model.backend().kv_cache_memory().unwrap_or(DEFAULT_BYTES);
                Self::bytes(memory, model.kv_bytes_per_token())
            },
            Self::tokens,
        )
    }

    /// Blocks in the budget.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Tokens the budget holds: the longest sequence it can serve alone.
    pub fn capacity_tokens(&self) -> usize {
        self.blocks * BLOCK_TOKENS
    }

    /// Blocks a sequence of `tokens` cached tokens holds.
    pub fn blocks_for(tokens: usize) -> usize {
        tokens.div_ceil(BLOCK_TOKENS)
    }

    /// Whether a sequence of `tokens` cached tokens fits the budget alone.
    pub fn holds(&self, tokens: usize) -> bool {
        Self::blocks_for(tokens) <= self.blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_count_whole_blocks() {
        assert_eq!(KvBudget::tokens(100).blocks(), 6);
        assert_eq!(KvBudget::tokens(100).capacity_tokens(), 96);
        assert_eq!(KvBudget::tokens(3).blocks(), 1, "at least one block");
        assert_eq!(KvBudget::bytes(1000, 10).capacity_tokens(), 96);
        assert_eq!(KvBudget::blocks_for(0), 0);
        assert_eq!(KvBudget::blocks_for(16), 1);
        assert_eq!(KvBudget::blocks_for(17), 2);
        assert!(KvBudget::tokens(32).holds(32));
        assert!(!KvBudget::tokens(32).holds(33));
    }
}
