//! Expert-parallel load balancing: which logical experts each rank holds, from measured load.
//!
//! The policy is DeepSeek's EPLB, written here from its description and reference code:
//!
//! - **hierarchical**, when the expert groups divide evenly over the nodes: whole expert groups
//!   are packed onto nodes so that every node carries about the same load (group-limited routing
//!   then keeps most traffic inside a node); within each node, the redundant slots go one by one
//!   to the expert whose load per replica is highest; the node's physical experts are then packed
//!   onto its ranks, the heaviest first, each onto the lightest rank that still has a free slot;
//! - **global** otherwise: the same with one group and one node.
//!
//! [`rebalance`] adds the choice a live cluster needs: a new plan is taken only when it lowers
//! the imbalance by more than a given gain, and its ranks are relabelled to keep as many experts
//! where they already are as possible, so that a rebalance moves few weights.
//!
//! Load is a matrix of layers × logical experts (tokens routed to each expert over a window).
//! A plan is, for each layer, each rank's slots as logical expert ids.

use thiserror::Error;

/// The shape of the cluster a plan is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Physical slots over all ranks: logical experts plus redundant ones.
    pub slots: usize,
    /// Expert groups of the model (`n_group`; 1 for models without groups).
    pub groups: usize,
    /// Nodes (machines) the ranks are spread over, ranks `0..ranks/nodes` on the first.
    pub nodes: usize,
    /// Ranks of the EP group.
    pub ranks: usize,
}

/// A plan that cannot be made.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BalanceError {
    #[error("{slots} slots do not hold the {experts} logical experts")]
    TooFewSlots { slots: usize, experts: usize },
    #[error("{slots} slots do not divide evenly over {ranks} ranks")]
    UnevenSlots { slots: usize, ranks: usize },
    #[error("{ranks} ranks do not divide evenly over {nodes} nodes")]
    UnevenNodes { ranks: usize, nodes: usize },
    #[error("{experts} experts do not divide evenly into {groups} groups")]
    UnevenGroups { experts: usize, groups: usize },
    #[error("the load has {got} experts in layer {layer}, the other layers {want}")]
    RaggedLoad {
        layer: usize,
        got: usize,
        want: usize,
    },
    #[error("there are no experts or no ranks to balance")]
    Empty,
}

pub use crate::placement::LayerPlan;

/// DeepSeek's EPLB for every layer: hierarchical when the groups divide over the nodes, global
/// otherwise.
pub fn balance(load: &[Vec<f64>], shape: Shape) -> Result<Vec<LayerPlan>, BalanceError> {
    let experts = check(load, shape)?;
    let (groups, nodes) =
        if shape.groups.is_multiple_of(shape.nodes) && experts.is_multiple_of(shape.groups) {
            (shape.groups, shape.nodes)
        } else {
            (1, 1)
        };
    Ok(load
        .iter()
        .map(|layer| hierarchical(layer, shape.slots, groups, nodes, shape.ranks))
        .collect())
}

/// Rebalances from `current`: the EPLB plan, with its ranks relabelled to keep experts where
/// they are, if it lowers a layer's imbalance by more than `min_gain` (0.05: by 5 %); each layer
/// whose gain is smaller keeps its current plan. Returns the plan and the layers that changed.
pub fn rebalance(
    load: &[Vec<f64>],
    shape: Shape,
    current: &[LayerPlan],
    min_gain: f64,
) -> Result<(Vec<LayerPlan>, Vec<usize>), BalanceError> {
    let proposal = balance(load, shape)?;
    let mut changed = Vec::new();
    let plan = proposal
        .into_iter()
        .enumerate()
        .map(|(layer, new)| {
            let Some(old) = current.get(layer).filter(|p| p.len() == shape.ranks) else {
                changed.push(layer);
                return new;
            };
            let (before, after) = (imbalance(old, &load[layer]), imbalance(&new, &load[layer]));
            if before - after <= min_gain * before {
                return old.clone();
            }
            changed.push(layer);
            align(old, new, shape.ranks / shape.nodes.max(1))
        })
        .collect();
    Ok((plan, changed))
}

/// The EPLB plan for every layer, with its ranks relabelled to keep what `held[layer][rank]`
/// already holds (an empty list for a rank new to the group): the plan of a group whose
/// members changed.
pub fn realign(
    load: &[Vec<f64>],
    shape: Shape,
    held: &[LayerPlan],
) -> Result<Vec<LayerPlan>, BalanceError> {
    let per_node = shape.ranks / shape.nodes.max(1);
    Ok(balance(load, shape)?
        .into_iter()
        .enumerate()
        .map(|(layer, new)| match held.get(layer) {
            Some(old) if old.len() == shape.ranks => align(old, new, per_node),
            _ => new,
        })
        .collect())
}

/// Max over mean of the load per rank, each expert's load split evenly over its replicas: 1.0 is
/// perfect balance. An expert without a slot counts as nothing (its tokens cannot be served).
pub fn imbalance(plan: &LayerPlan, load: &[f64]) -> f64 {
    let mut replicas = vec![0usize; load.len()];
    for &e in plan.iter().flatten() {
        if let Some(r) = replicas.get_mut(e) {
            *r += 1;
        }
    }
    let per_rank: Vec<f64> = plan
        .iter()
        .map(|slots| {
            slots
                .iter()
                .filter(|&&e| e < load.len())
                .map(|&e| load[e] / replicas[e] as f64)
                .sum()
        })
        .collect();
    let mean = per_rank.iter().sum::<f64>() / per_rank.len().max(1) as f64;
    if mean <= 0.0 {
        return 1.0;
    }
    per_rank.iter().copied().fold(0.0, f64::max) / mean
}

fn check(load: &[Vec<f64>], shape: Shape) -> Result<usize, BalanceError> {
    let experts = load.first().map_or(0, Vec::len);
    if experts == 0 || shape.ranks == 0 || shape.nodes == 0 || shape.groups == 0 {
        return Err(BalanceError::Empty);
    }
    if let Some((layer, l)) = load.iter().enumerate().find(|(_, l)| l.len() != experts) {
        return Err(BalanceError::RaggedLoad {
            layer,
            got: l.len(),
            want: experts,
        });
    }
    if shape.slots < experts {
        return Err(BalanceError::TooFewSlots {
            slots: shape.slots,
            experts,
        });
    }
    if !shape.slots.is_multiple_of(shape.ranks) {
        return Err(BalanceError::UnevenSlots {
            slots: shape.slots,
            ranks: shape.ranks,
        });
    }
    if !shape.ranks.is_multiple_of(shape.nodes) {
        return Err(BalanceError::UnevenNodes {
            ranks: shape.ranks,
            nodes: shape.nodes,
        });
    }
    if shape.groups > 1 && !experts.is_multiple_of(shape.groups) {
        return Err(BalanceError::UnevenGroups {
            experts,
            groups: shape.groups,
        });
    }
    Ok(experts)
}

/// One layer of the hierarchical policy (the global one is `groups = nodes = 1`).
fn hierarchical(
    load: &[f64],
    slots: usize,
    groups: usize,
    nodes: usize,
    ranks: usize,
) -> LayerPlan {
    let experts = load.len();
    let group_size = experts / groups;
    // 1. Whole groups onto nodes, the same number of groups on each.
    let group_load: Vec<f64> = (0..groups)
        .map(|g| load[g * group_size..(g + 1) * group_size].iter().sum())
        .collect();
    let node_of_group = pack(&group_load, nodes);
    let ranks_per_node = ranks / nodes;
    let slots_per_node = slots / nodes;
    let mut plan: LayerPlan = vec![Vec::new(); ranks];
    for (node, node_groups) in node_of_group.iter().enumerate() {
        let node_experts: Vec<usize> = node_groups
            .iter()
            .flat_map(|&g| g * group_size..(g + 1) * group_size)
            .collect();
        // 2. Redundant slots within the node, each to the expert with most load per replica.
        let node_load: Vec<f64> = node_experts.iter().map(|&e| load[e]).collect();
        let replicas = replicate(&node_load, slots_per_node);
        let mut physical = Vec::with_capacity(slots_per_node);
        for (i, &count) in replicas.iter().enumerate() {
            for _ in 0..count {
                physical.push((node_experts[i], node_load[i] / count as f64));
            }
        }
        // 3. Physical experts onto the node's ranks.
        let weights: Vec<f64> = physical.iter().map(|&(_, w)| w).collect();
        let keys: Vec<usize> = physical.iter().map(|&(e, _)| e).collect();
        for (local, items) in pack_apart(&weights, &keys, ranks_per_node)
            .into_iter()
            .enumerate()
        {
            let rank = node * ranks_per_node + local;
            plan[rank] = items.into_iter().map(|i| physical[i].0).collect();
            plan[rank].sort_unstable();
        }
    }
    plan
}

/// Packs items into `packs` packs of equal count (`weights.len() / packs` each), the heaviest
/// item first, each into the lightest pack that has room. Returns each pack's item indices.
fn pack(weights: &[f64], packs: usize) -> Vec<Vec<usize>> {
    let keys: Vec<usize> = (0..weights.len()).collect();
    pack_apart(weights, &keys, packs)
}

/// [`pack`], keeping items of the same key (replicas of one expert) in different packs where a
/// pack with room allows it: two replicas on one rank would spread no load.
fn pack_apart(weights: &[f64], keys: &[usize], packs: usize) -> Vec<Vec<usize>> {
    let per_pack = weights.len() / packs;
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
    let mut contents: Vec<Vec<usize>> = vec![Vec::with_capacity(per_pack); packs];
    let mut totals = vec![0.0f64; packs];
    for i in order {
        let lightest_of = |apart: bool| {
            (0..packs)
                .filter(|&p| contents[p].len() < per_pack)
                .filter(|&p| !apart || contents[p].iter().all(|&j| keys[j] != keys[i]))
                .min_by(|&a, &b| totals[a].total_cmp(&totals[b]).then(a.cmp(&b)))
        };
        let lightest = lightest_of(true)
            .or_else(|| lightest_of(false))
            .expect("the packs have room for every item");
        contents[lightest].push(i);
        totals[lightest] += weights[i];
    }
    contents
}

/// How many replicas each expert gets when `slots` slots hold them: one each, then every extra
/// slot to the expert with the most load per replica.
fn replicate(load: &[f64], slots: usize) -> Vec<usize> {
    let mut count = vec![1usize; load.len()];
    for _ in load.len()..slots {
        let hottest = (0..load.len())
            .max_by(|&a, &b| {
                (load[a] / count[a] as f64)
                    .total_cmp(&(load[b] / count[b] as f64))
                    .then(b.cmp(&a))
            })
            .expect("at least one expert");
        count[hottest] += 1;
    }
    count
}

/// Relabels the ranks of `new` (within each node of `per_node` ranks) so that each keeps as
/// many of the experts it holds in `old` as possible: greedily, the pair of old and new rank
/// with the largest overlap first.
fn align(old: &LayerPlan, new: LayerPlan, per_node: usize) -> LayerPlan {
    let ranks = new.len();
    let per_node = per_node.max(1);
    let overlap = |a: &[usize], b: &[usize]| a.iter().filter(|e| b.contains(e)).count();
    let mut pairs: Vec<(usize, usize, usize)> = Vec::new();
    for (o, held) in old.iter().enumerate() {
        for n in (0..ranks).filter(|n| n / per_node == o / per_node) {
            pairs.push((overlap(held, &new[n]), o, n));
        }
    }
    pairs.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut target: Vec<Option<usize>> = vec![None; ranks];
    let mut taken = vec![false; ranks];
    for (_, o, n) in pairs {
        if target[o].is_none() && !taken[n] {
            target[o] = Some(n);
            taken[n] = true;
        }
    }
    let mut new: Vec<Option<Vec<usize>>> = new.into_iter().map(Some).collect();
    target
        .into_iter()
        .map(|n| new[n.expect("every rank is matched")].take().expect("once"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Placement;
    use rand::seq::SliceRandom;
    use rand::SeedableRng;

    /// 64 experts with 8 redundant slots on 4 ranks of one node: the example.
    const FOUR_RANKS: Shape = Shape {
        slots: 72,
        groups: 1,
        nodes: 1,
        ranks: 4,
    };

    /// The even placement with no redundant experts.
    fn even(experts: usize, ranks: usize) -> LayerPlan {
        Placement::even(experts, ranks)
            .expect("even placement")
            .layers
            .swap_remove(0)
    }

    /// Zipf(s) loads over `experts` experts, the hot ones at random positions, per layer.
    fn zipf(layers: usize, experts: usize, s: f64, seed: u64) -> Vec<Vec<f64>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..layers)
            .map(|_| {
                let mut ranks: Vec<usize> = (0..experts).collect();
                ranks.shuffle(&mut rng);
                ranks
                    .iter()
                    .map(|&k| 10_000.0 / ((k + 1) as f64).powf(s))
                    .collect()
            })
            .collect()
    }

    fn assert_valid(plan: &[LayerPlan], experts: usize, shape: Shape) {
        for (layer, ranks) in plan.iter().enumerate() {
            assert_eq!(ranks.len(), shape.ranks, "layer {layer}");
            for slots in ranks {
                assert_eq!(slots.len(), shape.slots / shape.ranks, "layer {layer}");
            }
            let mut seen = vec![0; experts];
            for &e in ranks.iter().flatten() {
                seen[e] += 1;
            }
            assert!(
                seen.iter().all(|&n| n >= 1),
                "layer {layer}: an expert has no slot: {seen:?}"
            );
            // Replicas of one expert sit on different ranks while there are ranks enough.
            let per_node = shape.ranks / shape.nodes;
            for (e, &n) in seen.iter().enumerate() {
                let holders = ranks.iter().filter(|slots| slots.contains(&e)).count();
                assert_eq!(
                    holders,
                    n.min(per_node),
                    "layer {layer}: expert {e}'s {n} replicas on {holders} ranks"
                );
            }
        }
    }

    #[test]
    fn global_policy_on_zipf_loads_is_within_ten_percent_of_perfect() {
        let shape = FOUR_RANKS;
        let load = zipf(8, 64, 1.0, 1);
        let plan = balance(&load, shape).expect("plan");
        assert_valid(&plan, 64, shape);
        for (layer, (p, l)) in plan.iter().zip(&load).enumerate() {
            let (before, after) = (imbalance(&even(64, 4), l), imbalance(p, l));
            eprintln!("layer {layer}: even {before:.3} -> EPLB {after:.3}");
            assert!(after <= 1.1, "layer {layer}: imbalance {after:.3}");
            assert!(after < before, "layer {layer}: {before:.3} -> {after:.3}");
        }
    }

    #[test]
    fn hierarchical_policy_keeps_each_group_on_one_node() {
        let shape = Shape {
            slots: 64 + 16,
            groups: 8,
            nodes: 2,
            ranks: 8,
        };
        let load = zipf(4, 64, 1.0, 2);
        let plan = balance(&load, shape).expect("plan");
        assert_valid(&plan, 64, shape);
        for (layer, (p, l)) in plan.iter().zip(&load).enumerate() {
            for g in 0..8 {
                let nodes: Vec<usize> = p
                    .iter()
                    .enumerate()
                    .filter(|(_, slots)| slots.iter().any(|&e| e / 8 == g))
                    .map(|(r, _)| r / 4)
                    .collect();
                assert!(
                    nodes.windows(2).all(|w| w[0] == w[1]),
                    "layer {layer}: group {g} spans nodes {nodes:?}"
                );
            }
            let (before, after) = (imbalance(&even(64, 8), l), imbalance(p, l));
            eprintln!("layer {layer}: even {before:.3} -> EPLB {after:.3}");
            assert!(after < before, "layer {layer}");
        }
    }

    #[test]
    fn groups_that_do_not_divide_over_the_nodes_fall_back_to_the_global_policy() {
        let shape = Shape {
            slots: 24,
            groups: 3,
            nodes: 2,
            ranks: 4,
        };
        let plan = balance(&zipf(2, 18, 1.0, 3), shape).expect("plan");
        // Global: replicas spread over all four ranks, not over the two of a node.
        assert_valid(&plan, 18, Shape { nodes: 1, ..shape });
    }

    #[test]
    fn a_small_gain_keeps_the_current_plan_and_a_large_one_moves_few_experts() {
        let shape = FOUR_RANKS;
        let load = zipf(2, 64, 1.0, 4);
        let current = balance(&load, shape).expect("plan");
        // The same load again: nothing to gain, nothing changes.
        let (same, changed) = rebalance(&load, shape, &current, 0.05).expect("plan");
        assert_eq!(same, current);
        assert!(changed.is_empty(), "{changed:?}");
        // From the even placement, every layer changes, and the ranks are relabelled so that
        // more experts stay where they were than in EPLB's own numbering.
        let padded = vec![even(64, 4); 2];
        let (moved, changed) = rebalance(&load, shape, &padded, 0.05).expect("plan");
        assert_eq!(changed, vec![0, 1]);
        let kept = |a: &LayerPlan, b: &LayerPlan| -> usize {
            a.iter()
                .zip(b)
                .map(|(x, y)| x.iter().filter(|e| y.contains(e)).count())
                .sum()
        };
        let raw = balance(&load, shape).expect("plan");
        for layer in 0..2 {
            assert!(kept(&moved[layer], &padded[layer]) >= kept(&raw[layer], &padded[layer]));
            assert!(
                (imbalance(&moved[layer], &load[layer]) - imbalance(&raw[layer], &load[layer]))
                    .abs()
                    < 1e-12
            );
        }
    }

    #[test]
    fn plans_that_cannot_be_made_say_why() {
        let load = zipf(1, 16, 1.0, 5);
        let shape = |slots, groups, nodes, ranks| Shape {
            slots,
            groups,
            nodes,
            ranks,
        };
        assert_eq!(
            balance(&load, shape(12, 1, 1, 4)),
            Err(BalanceError::TooFewSlots {
                slots: 12,
                experts: 16
            })
        );
        assert_eq!(
            balance(&load, shape(18, 1, 1, 4)),
            Err(BalanceError::UnevenSlots {
                slots: 18,
                ranks: 4
            })
        );
        assert_eq!(
            balance(&load, shape(16, 1, 3, 4)),
            Err(BalanceError::UnevenNodes { ranks: 4, nodes: 3 })
        );
        assert_eq!(balance(&[], shape(16, 1, 1, 4)), Err(BalanceError::Empty));
        let ragged = vec![vec![1.0; 16], vec![1.0; 15]];
        assert_eq!(
            balance(&ragged, shape(16, 1, 1, 4)),
            Err(BalanceError::RaggedLoad {
                layer: 1,
                got: 15,
                want: 16
            })
        );
    }
}
