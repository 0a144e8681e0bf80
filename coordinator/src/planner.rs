//! The leader's placements: the plan of each new epoch from the measured load, with DeepSeek's
//! EPLB ([`crate::eplb`]).
//!
//! Every rank gets the same number of slots, `ceil((experts + redundant) / ranks)`, so the
//! group may have a few more redundant slots than asked for. Without measured load and without
//! redundant slots a group gets the even placement; with redundant slots but no load yet, one
//! EPLB plan under uniform load for every layer; with load, one plan per MoE layer. A plan for
//! a changed group keeps each worker's experts where EPLB allows ([`eplb::realign`]); a
//! rebalance of an unchanged group keeps a layer as it is unless the plan lowers its imbalance
//! by more than `min_gain` ([`eplb::rebalance`]).

use std::collections::BTreeMap;

use crate::eplb::{self, BalanceError, Shape};
use crate::placement::{LayerPlan, Placement, PlacementError};
use crate::topology::{LoadStats, WorkerInfo};

/// A placement that cannot be planned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error(
        "{redundant} redundant experts do not fit: {ranks} ranks would hold {per_rank} slots \
         each, more than the model's {experts} experts"
    )]
    TooManySlots {
        redundant: usize,
        ranks: usize,
        per_rank: usize,
        experts: usize,
    },
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error(transparent)]
    Balance(#[from] BalanceError),
}

/// The expert model of the cluster a plan is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Experts {
    /// Logical routed experts of the model.
    pub logical: usize,
    /// Expert groups of the model (`n_group`).
    pub groups: usize,
    /// Slots beyond one per logical expert, over the group.
    pub redundant: usize,
}

/// The load the workers measured, summed over them.
#[derive(Debug, Clone, PartialEq)]
pub struct Load {
    /// `tokens[layer][expert]`.
    pub tokens: Vec<Vec<f64>>,
    /// The longest window any worker's counts cover.
    pub window_s: f64,
    /// Bytes of one expert slot, as the workers report it.
    pub slot_bytes: u64,
}

impl Load {
    /// Sums the statistics of `members`; `None` when none of them published any, or their
    /// shapes disagree with each other or with the model.
    pub fn of(
        stats: &BTreeMap<String, LoadStats>,
        members: &[WorkerInfo],
        experts: usize,
    ) -> Option<Self> {
        let mut load: Option<Self> = None;
        for s in members.iter().filter_map(|w| stats.get(&w.id)) {
            if s.tokens.is_empty() || s.tokens.iter().any(|l| l.len() != experts) {
                return None;
            }
            let sum = load.get_or_insert_with(|| Self {
                tokens: vec![vec![0.0; experts]; s.tokens.len()],
                window_s: 0.0,
                slot_bytes: 0,
            });
            if sum.tokens.len() != s.tokens.len() {
                return None;
            }
            for (acc, layer) in sum.tokens.iter_mut().zip(&s.tokens) {
                for (a, &t) in acc.iter_mut().zip(layer) {
                    *a += t as f64;
                }
            }
            sum.window_s = sum.window_s.max(s.window_s);
            sum.slot_bytes = sum.slot_bytes.max(s.slot_bytes);
        }
        load.filter(|l| l.total() > 0.0)
    }

    pub fn layers(&self) -> usize {
        self.tokens.len()
    }

    pub fn total(&self) -> f64 {
        self.tokens.iter().flatten().sum()
    }
}

/// A plan and what it changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub placement: Placement,
    /// MoE layers whose slots change.
    pub changed_layers: Vec<usize>,
    /// Expert slots the workers have to read.
    pub slots_to_load: usize,
    /// Mean over the MoE layers of the imbalance under the load, now and with the plan (0 when
    /// no load was measured).
    pub imbalance_before: f64,
    pub imbalance_after: f64,
}

/// Slots per rank for `ranks` ranks.
pub fn slots_per_rank(experts: Experts, ranks: usize) -> Result<usize, PlanError> {
    if ranks == 0 {
        return Err(PlacementError::NoRanks.into());
    }
    if ranks > experts.logical {
        return Err(PlacementError::TooManyRanks {
            ranks,
            experts: experts.logical,
        }
        .into());
    }
    let per_rank = (experts.logical + experts.redundant).div_ceil(ranks);
    if per_rank > experts.logical {
        return Err(PlanError::TooManySlots {
            redundant: experts.redundant,
            ranks,
            per_rank,
            experts: experts.logical,
        });
    }
    Ok(per_rank)
}

fn shape(experts: Experts, ranks: usize) -> Result<Shape, PlanError> {
    Ok(Shape {
        slots: slots_per_rank(experts, ranks)? * ranks,
        groups: experts.groups.max(1),
        nodes: 1,
        ranks,
    })
}

/// The placement of a new group of `ranks` ranks, where `held[layer][rank]` is what the worker
/// at `rank` held before (empty for a worker new to the group).
pub fn for_group(
    experts: Experts,
    ranks: usize,
    load: Option<&Load>,
    held: &[LayerPlan],
) -> Result<Placement, PlanError> {
    let shape = shape(experts, ranks)?;
    let placement = match load {
        None if experts.redundant == 0 => Placement::even(experts.logical, ranks)?,
        None => {
            let uniform = vec![vec![1.0; experts.logical]];
            let plan = eplb::realign(&uniform, shape, held.get(..1).unwrap_or_default())?;
            Placement::uniform(experts.logical, plan.into_iter().next().unwrap_or_default())
        }
        Some(load) => Placement {
            num_experts: experts.logical,
            layers: eplb::realign(&load.tokens, shape, held)?,
        },
    };
    placement.validate()?;
    Ok(placement)
}

/// A new placement for the group of `current` under `load`: per layer, EPLB's plan when it
/// lowers the imbalance by more than `min_gain` (or when the number of slots changed), the
/// current slots otherwise.
pub fn rebalance(
    experts: Experts,
    current: &Placement,
    load: &Load,
    min_gain: f64,
) -> Result<Plan, PlanError> {
    let ranks = current.num_ranks();
    let shape = shape(experts, ranks)?;
    let now = current.expanded(load.layers());
    let same_slots = now
        .iter()
        .all(|plan| plan.iter().map(Vec::len).sum::<usize>() == shape.slots);
    let layers = if same_slots {
        eplb::rebalance(&load.tokens, shape, &now, min_gain)?.0
    } else {
        eplb::realign(&load.tokens, shape, &now)?
    };
    let changed_layers = (0..layers.len()).filter(|&l| layers[l] != now[l]).collect();
    let placement = Placement {
        num_experts: experts.logical,
        layers,
    };
    placement.validate()?;
    Ok(Plan {
        slots_to_load: placement.new_slots(current, load.layers(), Some),
        imbalance_before: mean_imbalance(current, &load.tokens),
        imbalance_after: mean_imbalance(&placement, &load.tokens),
        changed_layers,
        placement,
    })
}

/// The imbalance of each MoE layer of `placement` under `load`.
pub fn layer_imbalance(placement: &Placement, load: &[Vec<f64>]) -> Vec<f64> {
    load.iter()
        .enumerate()
        .map(|(l, tokens)| eplb::imbalance(&placement.layer(l).to_vec(), tokens))
        .collect()
}

/// The mean over the MoE layers of [`layer_imbalance`] (0 without load).
pub fn mean_imbalance(placement: &Placement, load: &[Vec<f64>]) -> f64 {
    let per_layer = layer_imbalance(placement, load);
    if per_layer.is_empty() {
        return 0.0;
    }
    per_layer.iter().sum::<f64>() / per_layer.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const EIGHT: Experts = Experts {
        logical: 8,
        groups: 1,
        redundant: 0,
    };

    fn stats(id: &str, tokens: Vec<Vec<u64>>) -> (String, LoadStats) {
        let s = LoadStats {
            id: id.into(),
            epoch: 1,
            window_s: 10.0,
            tokens,
            slot_bytes: 100,
        };
        (id.into(), s)
    }

    fn worker(id: &str) -> WorkerInfo {
        WorkerInfo {
            id: id.into(),
            address: String::new(),
            data_address: String::new(),
            device: "cpu".into(),
            capacity: 1,
            incarnation: 0,
        }
    }

    /// Two layers over 8 experts: expert 0 (layer 0) and 7 (layer 1) take most tokens.
    fn skewed() -> Load {
        let hot = |e: usize| -> Vec<u64> { (0..8).map(|x| if x == e { 70 } else { 10 }).collect() };
        let all: BTreeMap<_, _> = [
            stats("a", vec![hot(0), hot(7)]),
            stats("b", vec![hot(0), hot(7)]),
        ]
        .into_iter()
        .collect();
        Load::of(&all, &[worker("a"), worker("b")], 8).expect("load")
    }

    #[test]
    fn load_sums_the_members_and_refuses_mismatched_shapes() {
        let load = skewed();
        assert_eq!(load.layers(), 2);
        assert_eq!(load.tokens[0][0], 140.0);
        assert_eq!(load.total(), 2.0 * 2.0 * 140.0);
        let all: BTreeMap<_, _> = [stats("a", vec![vec![1; 8]]), stats("b", vec![vec![1; 7]])]
            .into_iter()
            .collect();
        assert_eq!(Load::of(&all, &[worker("a"), worker("b")], 8), None);
        // Nobody measured anything: no load.
        let idle: BTreeMap<_, _> = [stats("a", vec![vec![0; 8]])].into_iter().collect();
        assert_eq!(Load::of(&idle, &[worker("a")], 8), None);
    }

    #[test]
    fn slots_per_rank_rounds_up_and_refuses_what_does_not_fit() {
        let with = |redundant| Experts { redundant, ..EIGHT };
        assert_eq!(slots_per_rank(with(0), 3), Ok(3));
        assert_eq!(slots_per_rank(with(4), 4), Ok(3));
        assert_eq!(
            slots_per_rank(with(1), 1),
            Err(PlanError::TooManySlots {
                redundant: 1,
                ranks: 1,
                per_rank: 9,
                experts: 8
            })
        );
        assert!(matches!(
            slots_per_rank(with(0), 9),
            Err(PlanError::Placement(PlacementError::TooManyRanks { .. }))
        ));
    }

    #[test]
    fn a_group_without_load_gets_the_even_placement_or_uniform_redundancy() {
        let even = for_group(EIGHT, 3, None, &[]).unwrap();
        assert_eq!(even, Placement::even(8, 3).unwrap());
        let redundant = Experts {
            redundant: 4,
            ..EIGHT
        };
        let p = for_group(redundant, 4, None, &[]).unwrap();
        assert!(p.is_uniform());
        assert!(p.layer(0).iter().all(|slots| slots.len() == 3));
    }

    #[test]
    fn a_rebalance_lowers_the_imbalance_and_counts_what_moves() {
        let load = skewed();
        let current = Placement::even(8, 2).unwrap();
        let redundant = Experts {
            redundant: 2,
            ..EIGHT
        };
        let plan = rebalance(redundant, &current, &load, 0.05).unwrap();
        assert_eq!(plan.changed_layers, [0, 1]);
        assert!(plan.imbalance_after < plan.imbalance_before);
        assert!(plan.imbalance_after < 1.1, "{plan:?}");
        assert!(plan.slots_to_load > 0);
        assert!(plan.slots_to_load < 10, "moves few experts: {plan:?}");
        // The same plan again changes nothing.
        let again = rebalance(redundant, &plan.placement, &load, 0.05).unwrap();
        assert_eq!(again.changed_layers, Vec::<usize>::new());
        assert_eq!(again.slots_to_load, 0);
    }

    #[test]
    fn a_new_member_keeps_the_others_where_they_are() {
        let load = skewed();
        let before = rebalance(EIGHT, &Placement::even(8, 2).unwrap(), &load, 0.0)
            .unwrap()
            .placement;
        // Ranks 0 and 1 stay; rank 2 is new.
        let held: Vec<LayerPlan> = before
            .expanded(2)
            .into_iter()
            .map(|mut plan| {
                plan.push(Vec::new());
                plan
            })
            .collect();
        let after = for_group(EIGHT, 3, Some(&load), &held).unwrap();
        let kept: usize = (0..2)
            .map(|l| {
                (0..2)
                    .map(|r| {
                        after
                            .slots(l, r)
                            .iter()
                            .filter(|e| before.slots(l, r).contains(e))
                            .count()
                    })
                    .sum::<usize>()
            })
            .sum();
        // 9 slots per layer over 3 ranks: the old ranks keep most of their 6 slots.
        assert!(kept >= 8, "kept {kept} of the 12 old slots");
    }
}
