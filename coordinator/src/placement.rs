//! Expert placement: which physical expert slots each rank of an EP group holds, per MoE layer.
//!
//! A slot holds one logical expert. A logical expert may have several slots (a redundant
//! expert); every logical expert has at least one in every layer. The order of ranks is the
//! order of the EP group; the order of slots within a rank is the order in which that rank
//! stores its experts. A placement holds either one plan for every MoE layer (the even split a
//! group starts with) or one plan per MoE layer (what the balancer makes from measured load,
//! DeepSeek's physical-to-logical map). Layers are counted among the MoE layers only: layer 0
//! is the model's first MoE layer.

use serde::{Deserialize, Serialize};

/// One layer's slots: `plan[rank]` lists the logical experts that rank holds, one per slot.
pub type LayerPlan = Vec<Vec<usize>>;

/// Why a placement cannot be built or used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error("an EP group needs at least one rank, got 0")]
    NoRanks,
    #[error(
        "{ranks} ranks cannot share {experts} routed experts: every rank needs at least one expert"
    )]
    TooManyRanks { ranks: usize, experts: usize },
    #[error("logical expert {expert} has no slot in MoE layer {layer} of the placement")]
    Unplaced { layer: usize, expert: usize },
    #[error("slot names logical expert {expert}, but the model has only {experts} experts")]
    UnknownExpert { expert: usize, experts: usize },
    #[error("MoE layer {layer} of the placement has {got} ranks, layer 0 has {want}")]
    RaggedRanks {
        layer: usize,
        got: usize,
        want: usize,
    },
    #[error("the placement has plans for {got} MoE layers, the model has {want}")]
    LayerCount { got: usize, want: usize },
}

/// The slots of every rank of one EP group, in every MoE layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Wire")]
pub struct Placement {
    /// Number of logical routed experts of the model.
    pub num_experts: usize,
    /// One plan for every MoE layer (a single entry), or one plan per MoE layer.
    pub layers: Vec<LayerPlan>,
}

/// The stored form; records written before per-layer placements held one plan as `ranks`.
#[derive(Deserialize)]
struct Wire {
    num_experts: usize,
    #[serde(default)]
    layers: Vec<LayerPlan>,
    #[serde(default)]
    ranks: Option<LayerPlan>,
}

impl From<Wire> for Placement {
    fn from(w: Wire) -> Self {
        let layers = match (w.layers.is_empty(), w.ranks) {
            (true, Some(ranks)) => vec![ranks],
            _ => w.layers,
        };
        Self {
            num_experts: w.num_experts,
            layers,
        }
    }
}

impl Placement {
    /// Splits `num_experts` logical experts over `num_ranks` ranks in contiguous blocks whose
    /// sizes differ by at most one (the first `num_experts % num_ranks` ranks take one more),
    /// the same in every layer.
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
        Ok(Self::uniform(num_experts, ranks))
    }

    /// The same plan in every MoE layer.
    pub fn uniform(num_experts: usize, plan: LayerPlan) -> Self {
        Self {
            num_experts,
            layers: vec![plan],
        }
    }

    /// Whether every MoE layer has the same plan.
    pub fn is_uniform(&self) -> bool {
        self.layers.len() <= 1
    }

    /// Number of ranks in the EP group.
    pub fn num_ranks(&self) -> usize {
        self.layers.first().map_or(0, Vec::len)
    }

    /// The plan of MoE layer `layer` (the one plan of a uniform placement).
    pub fn layer(&self, layer: usize) -> &[Vec<usize>] {
        let plan = if self.is_uniform() {
            self.layers.first()
        } else {
            self.layers.get(layer)
        };
        plan.map_or(&[], Vec::as_slice)
    }

    /// The slots of `rank` in MoE layer `layer` (empty when either does not exist).
    pub fn slots(&self, layer: usize, rank: usize) -> &[usize] {
        self.layer(layer).get(rank).map_or(&[], Vec::as_slice)
    }

    /// Every MoE layer's plan, expanded to `moe_layers` plans.
    pub fn expanded(&self, moe_layers: usize) -> Vec<LayerPlan> {
        (0..moe_layers).map(|l| self.layer(l).to_vec()).collect()
    }

    /// Checks that every layer has the same ranks, every slot names a real expert and every
    /// expert has a slot in every layer.
    pub fn validate(&self) -> Result<(), PlacementError> {
        let want = self.num_ranks();
        if want == 0 {
            return Err(PlacementError::NoRanks);
        }
        for (layer, plan) in self.layers.iter().enumerate() {
            if plan.len() != want {
                return Err(PlacementError::RaggedRanks {
                    layer,
                    got: plan.len(),
                    want,
                });
            }
            let mut placed = vec![false; self.num_experts];
            for &expert in plan.iter().flatten() {
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
            if let Some(expert) = placed.iter().position(|p| !p) {
                return Err(PlacementError::Unplaced { layer, expert });
            }
        }
        Ok(())
    }

    /// Checks the placement for a model with `moe_layers` MoE layers.
    pub fn validate_for(&self, moe_layers: usize) -> Result<(), PlacementError> {
        self.validate()?;
        if !self.is_uniform() && self.layers.len() != moe_layers {
            return Err(PlacementError::LayerCount {
                got: self.layers.len(),
                want: moe_layers,
            });
        }
        Ok(())
    }

    /// For each logical expert, the `(rank, slot index)` pairs that hold it in MoE layer
    /// `layer`.
    pub fn replicas(&self, layer: usize) -> Vec<Vec<(usize, usize)>> {
        let mut out = vec![Vec::new(); self.num_experts];
        for (rank, slots) in self.layer(layer).iter().enumerate() {
            for (slot, &expert) in slots.iter().enumerate() {
                if let Some(list) = out.get_mut(expert) {
                    list.push((rank, slot));
                }
            }
        }
        out
    }

    /// The slots of `self` over `moe_layers` layers that the same worker did not hold in
    /// `before` (`before_rank_of(r)` is rank `r`'s rank in `before`, `None` for a new worker):
    /// the experts a switch to `self` has to load.
    pub fn new_slots(
        &self,
        before: &Placement,
        moe_layers: usize,
        before_rank_of: impl Fn(usize) -> Option<usize>,
    ) -> usize {
        (0..moe_layers)
            .map(|l| {
                (0..self.num_ranks())
                    .map(|r| {
                        let held = before_rank_of(r).map_or(&[][..], |b| before.slots(l, b));
                        self.slots(l, r)
                            .iter()
                            .filter(|e| !held.contains(e))
                            .count()
                    })
                    .sum::<usize>()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_split_differs_by_at_most_one() {
        let p = Placement::even(10, 4).unwrap();
        let sizes: Vec<usize> = p.layer(0).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![3, 3, 2, 2]);
        assert_eq!(p.slots(0, 0), [0, 1, 2]);
        assert_eq!(p.slots(5, 3), [8, 9]);
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
        let p = Placement::uniform(3, vec![vec![0], vec![2]]);
        assert_eq!(
            p.validate(),
            Err(PlacementError::Unplaced {
                layer: 0,
                expert: 1
            })
        );
        let p = Placement::uniform(2, vec![vec![0, 1, 5]]);
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
        let p = Placement::uniform(2, vec![vec![0, 1], vec![1]]);
        assert_eq!(p.replicas(7), vec![vec![(0, 0)], vec![(0, 1), (1, 0)]]);
    }

    #[test]
    fn per_layer_plans_are_checked_layer_by_layer() {
        let p = Placement {
            num_experts: 2,
            layers: vec![vec![vec![0], vec![1]], vec![vec![1, 1], vec![0, 0]]],
        };
        p.validate().unwrap();
        assert_eq!(p.slots(1, 0), [1, 1]);
        assert_eq!(
            p.replicas(1),
            vec![vec![(1, 0), (1, 1)], vec![(0, 0), (0, 1)]]
        );
        assert_eq!(
            p.validate_for(3),
            Err(PlacementError::LayerCount { got: 2, want: 3 })
        );
        let ragged = Placement {
            num_experts: 2,
            layers: vec![vec![vec![0], vec![1]], vec![vec![0, 1]]],
        };
        assert_eq!(
            ragged.validate(),
            Err(PlacementError::RaggedRanks {
                layer: 1,
                got: 1,
                want: 2
            })
        );
        let gap = Placement {
            num_experts: 2,
            layers: vec![vec![vec![0], vec![1]], vec![vec![0], vec![0]]],
        };
        assert_eq!(
            gap.validate(),
            Err(PlacementError::Unplaced {
                layer: 1,
                expert: 1
            })
        );
    }

    #[test]
    fn records_with_one_plan_as_ranks_still_read() {
        let old: Placement =
            serde_json::from_str(r#"{"num_experts":4,"ranks":[[0,1],[2,3]]}"#).unwrap();
        assert_eq!(old, Placement::even(4, 2).unwrap());
        let json = serde_json::to_string(&old).unwrap();
        assert_eq!(json, r#"{"num_experts":4,"layers":[[[0,1],[2,3]]]}"#);
        assert_eq!(serde_json::from_str::<Placement>(&json).unwrap(), old);
    }

    #[test]
    fn new_slots_counts_what_a_switch_loads() {
        let before = Placement::even(4, 2).unwrap();
        let after = Placement {
            num_experts: 4,
            layers: vec![vec![vec![0, 2], vec![1, 3]], vec![vec![0, 1], vec![2, 3]]],
        };
        // Layer 0 moves expert 2 onto rank 0 and expert 1 onto rank 1; layer 1 is unchanged.
        assert_eq!(after.new_slots(&before, 2, Some), 2);
        // A group whose ranks are all new loads everything.
        assert_eq!(after.new_slots(&before, 2, |_| None), 8);
    }
}
