//! Expert placement: which physical expert slots each rank of an EP group holds.
//!
//! A slot holds one logical expert. A logical expert may have several slots (a redundant
//! expert); every logical expert has at least one. The order of ranks is the order of the EP
//! group; the order of slots within a rank is the order in which that rank stores its experts.

use serde::{Deserialize, Serialize};

/// Why a placement cannot be built or used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error("an EP group needs at least one rank, got 0")]
    NoRanks,
    #[error(
        "{ranks} ranks cannot share {experts} routed experts: every rank needs at least one expert"
    )]
    TooManyRanks { ranks: usize, experts: usize },
    #[error("logical expert {expert} has no slot in the placement")]
    Unplaced { expert: usize },
    #[error("slot names logical expert {expert}, but the model has only {experts} experts")]
    UnknownExpert { expert: usize, experts: usize },
}

/// The slots of every rank of one EP group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Number of logical routed experts of the model.
    pub num_experts: usize,
    /// `ranks[r]` lists the logical expert ids held by rank `r`, one per physical slot.
    pub ranks: Vec<Vec<usize>>,
}

impl Placement {
    /// Splits `num_experts` logical experts over `num_ranks` ranks in contiguous blocks whose
    /// sizes differ by at most one (the first `num_experts % num_ranks` ranks take one more).
    pub fn even(num_experts: usize, num_ranks: usize) -> Result<Self, PlacementError> {
        if num_ranks == 0 {
            return Err(PlacementError::NoRanks);
        }
        if num_ranks > num_experts {
            return Err(PlacementError::TooManyRanks {
                ranks: num_ranks,
                experts: num_experts,
            });
        }
        let base = num_experts / num_ranks;
        let extra = num_experts % num_ranks;
        let mut next = 0;
        let ranks = (0..num_ranks)
            .map(|r| {
                let len = base + usize::from(r < extra);
                let slots: Vec<usize> = (next..next + len).collect();
                next += len;
                slots
            })
            .collect();
        Ok(Self { num_experts, ranks })
    }

    /// Number of ranks in the EP group.
    pub fn num_ranks(&self) -> usize {
        self.ranks.len()
    }

    /// Checks that every slot names a real expert and every expert has a slot.
    pub fn validate(&self) -> Result<(), PlacementError> {
        if self.ranks.is_empty() {
            return Err(PlacementError::NoRanks);
        }
        let mut placed = vec![false; self.num_experts];
        for &expert in self.ranks.iter().flatten() {
            match placed.get_mut(expert) {
                Some(p) => *p = true,
                None => {
                    return Err(PlacementError::UnknownExpert {
                        expert,
                        experts: self.num_experts,
                    })
                }
            }
        }
        match placed.iter().position(|p| !p) {
            Some(expert) => Err(PlacementError::Unplaced { expert }),
            None => Ok(()),
        }
    }

    /// For each logical expert, the `(rank, slot index)` pairs that hold it.
    pub fn replicas(&self) -> Vec<Vec<(usize, usize)>> {
        let mut out = vec![Vec::new(); self.num_experts];
        for (rank, slots) in self.ranks.iter().enumerate() {
            for (slot, &expert) in slots.iter().enumerate() {
                if let Some(list) = out.get_mut(expert) {
                    list.push((rank, slot));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_split_differs_by_at_most_one() {
        let p = Placement::even(10, 4).unwrap();
        let sizes: Vec<usize> = p.ranks.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![3, 3, 2, 2]);
        assert_eq!(p.ranks[0], vec![0, 1, 2]);
        assert_eq!(p.ranks[3], vec![8, 9]);
        p.validate().unwrap();
    }

    #[test]
    fn rejects_zero_ranks_and_more_ranks_than_experts() {
        assert_eq!(Placement::even(8, 0), Err(PlacementError::NoRanks));
        assert_eq!(
            Placement::even(8, 9),
            Err(PlacementError::TooManyRanks {
                ranks: 9,
                experts: 8
            })
        );
    }

    #[test]
    fn validate_finds_unplaced_and_unknown_experts() {
        let p = Placement {
            num_experts: 3,
            ranks: vec![vec![0], vec![2]],
        };
        assert_eq!(p.validate(), Err(PlacementError::Unplaced { expert: 1 }));
        let p = Placement {
            num_experts: 2,
            ranks: vec![vec![0, 1, 5]],
        };
        assert_eq!(
            p.validate(),
            Err(PlacementError::UnknownExpert {
                expert: 5,
                experts: 2
            })
        );
    }

    #[test]
    fn replicas_list_every_slot_of_a_redundant_expert() {
        let p = Placement {
            num_experts: 2,
            ranks: vec![vec![0, 1], vec![1]],
        };
        assert_eq!(p.replicas(), vec![vec![(0, 0)], vec![(0, 1), (1, 0)]]);
    }
}
