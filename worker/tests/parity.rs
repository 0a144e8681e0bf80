//! Parity with Hugging Face `transformers` and across EP sizes and data planes.
//!
//! The fixtures under `fixtures/` are tiny random checkpoints made by
//! `scripts/make_fixtures.py`, each with `golden.json`: greedy continuations, logprobs and
//! top-5 logprobs computed by transformers in float32.

mod golden;

use golden::{check_against_transformers, fixture, golden, max_diff, requests, run, FIXTURES};
use moebius_coordinator::Placement;
use moebius_worker::engine::{run_group, GroupOptions, LoadedModel, Transport};
use moebius_worker::model::{Model, RankSpec};

#[test]
fn greedy_continuations_match_transformers_on_every_fixture() {
    for name in FIXTURES {
        let worst = check_against_transformers(name);
        eprintln!("{name}: the cases match transformers, worst logprob difference {worst:.2e}");
    }
}

#[test]
fn ep_ranks_and_transports_give_identical_results() {
    for name in ["tiny-v3-yarn", "tiny-v3", "tiny-v2"] {
        let golden = golden(name);
        let model = LoadedModel::open(&fixture(name), 1).expect("fixture loads");
        let reference = run(&model, 1, Transport::Local, requests(&golden));
        for transport in [Transport::Local, Transport::Tcp] {
            for ranks in 1..=4 {
                let outputs = run(&model, ranks, transport, requests(&golden));
                for ((ours, theirs), case) in outputs.iter().zip(&reference).zip(&golden.cases) {
                    let tag = format!("{name}/{} ep={ranks} {transport:?}", case.name);
                    assert_eq!(ours.token_ids, theirs.token_ids, "{tag}: tokens differ");
                    let d = max_diff(&ours.logprobs, &theirs.logprobs);
                    assert!(d < 1e-4, "{tag}: logprobs differ by {d}");
                }
            }
        }
    }
}

#[test]
fn each_rank_loads_about_its_share_of_the_experts() {
    let name = "tiny-v3-yarn";
    let model = LoadedModel::open(&fixture(name), 1).expect("fixture loads");
    let experts = model.config.n_routed_experts;
    let moe_layers = (0..model.config.num_hidden_layers)
        .filter(|&l| model.config.is_moe_layer(l))
        .count();
    let per_expert =
        3 * model.config.hidden_size * model.config.moe_intermediate_size * 4 * moe_layers;
    for ranks in 1..=4 {
        let bytes: Vec<usize> = model
            .rank_models(ranks)
            .expect("ranks load")
            .iter()
            .map(|m| m.experts.bytes(&*model.shared.backend))
            .collect();
        eprintln!(
            "{name} ep={ranks}: expert bytes per rank {bytes:?} (all experts: {})",
            experts * per_expert
        );
        assert_eq!(bytes.iter().sum::<usize>(), experts * per_expert);
        for (rank, b) in bytes.iter().enumerate() {
            let share = experts / ranks + usize::from(rank < experts % ranks);
            assert_eq!(
                *b,
                share * per_expert,
                "rank {rank} of {ranks} should hold {share} experts"
            );
        }
    }
}

/// The opt-in bf16 activations round prefill activations as PyTorch's bf16 path does, so they
/// cannot meet the f32 tolerance; this states what they do keep on the bf16 fixture: the first
/// token of every golden continuation (the prefill's own output) with its logprob within 0.03
/// of the f32 reference, and later logprobs within 0.25 until a continuation first departs.
/// (Measured on an AVX512-BF16 machine: 0.014 and 0.10, one of five continuations departs.)
#[test]
fn bf16_activations_stay_near_transformers_in_prefill() {
    use moebius_worker::backend::{packed, CpuBackend};
    if !packed::bf16_available() {
        eprintln!("skipped: this CPU has no AVX512-BF16, so bf16 activations fall back to f32");
        return;
    }
    let name = "tiny-v3";
    let golden = golden(name);
    let backend = CpuBackend::new(1).with_bf16_activations(true);
    let model = LoadedModel::open_with(&fixture(name), backend).expect("fixture loads");
    let outputs = run(&model, 1, Transport::Local, requests(&golden));
    let (mut worst, mut worst_first, mut departed) = (0.0f32, 0.0f32, 0);
    for (case, out) in golden.cases.iter().zip(&outputs) {
        assert_eq!(
            out.token_ids[0], case.new_token_ids[0],
            "{name}/{}: first token differs",
            case.name
        );
        let same = out
            .token_ids
            .iter()
            .zip(&case.new_token_ids)
            .take_while(|(a, b)| a == b)
            .count();
        departed += usize::from(same < case.new_token_ids.len());
        let d = max_diff(&out.logprobs[..same], &case.logprobs[..same]);
        let first = (out.logprobs[0] - case.logprobs[0]).abs();
        assert!(
            first < 0.03,
            "{name}/{}: first logprob differs by {first}",
            case.name
        );
        assert!(d < 0.25, "{name}/{}: logprobs differ by {d}", case.name);
        worst_first = worst_first.max(first);
        worst = worst.max(d);
    }
    eprintln!(
        "{name} with bf16 activations: worst logprob difference {worst_first:.2e} at the first \
         token, {worst:.2e} before any departure; {departed} of {} continuations depart from the \
         f32 reference",
        outputs.len()
    );
}

/// A per-layer placement with redundant experts, the shape the balancer writes: every MoE layer
/// its own slots, hot experts in two or three slots on different ranks, and ranks with more
/// slots than others.
fn skewed_placement(experts: usize, moe_layers: usize, ranks: usize) -> Placement {
    let layers = (0..moe_layers)
        .map(|l| {
            let mut plan = vec![Vec::new(); ranks];
            for e in 0..experts {
                // Rotate the layout per layer; each layer replicates other experts.
                let home = (e + l) % ranks;
                plan[home].push(e);
                if (e + l) % 3 == 0 {
                    plan[(home + 1) % ranks].push(e);
                }
                if (e + 2 * l) % 5 == 0 {
                    plan[(home + 2) % ranks].push(e);
                }
            }
            plan
        })
        .collect();
    Placement {
        num_experts: experts,
        layers,
    }
}

#[test]
fn per_layer_placements_with_redundant_experts_give_identical_results() {
    for name in ["tiny-v3", "tiny-v2"] {
        let golden = golden(name);
        let model = LoadedModel::open(&fixture(name), 1).expect("fixture loads");
        let reference = run(&model, 1, Transport::Local, requests(&golden));
        let experts = model.config.n_routed_experts;
        let moe_layers = model.config.moe_layer_count();
        for ranks in [2, 3] {
            let placement = skewed_placement(experts, moe_layers, ranks);
            placement
                .validate_for(moe_layers)
                .expect("a valid placement");
            let options = GroupOptions {
                ranks,
                transport: Transport::Tcp,
                threads: 1,
                token_budget: 16,
                placement: Some(placement.clone()),
                ..GroupOptions::default()
            };
            let (outputs, report) = run_group(&model, &options, requests(&golden), |_, _| {})
                .expect("generation succeeds");
            let slots: usize = (0..moe_layers)
                .map(|l| placement.layer(l).iter().map(Vec::len).sum::<usize>())
                .sum();
            assert!(
                slots > experts * moe_layers,
                "the placement must have redundant slots"
            );
            eprintln!(
                "{name} ep={ranks}: {slots} slots for {} experts; expert bytes {:?}",
                experts * moe_layers,
                report.expert_bytes
            );
            for ((ours, theirs), case) in outputs.iter().zip(&reference).zip(&golden.cases) {
                let tag = format!("{name}/{} ep={ranks} per-layer", case.name);
                assert_eq!(ours.token_ids, theirs.token_ids, "{tag}: tokens differ");
                let d = max_diff(&ours.logprobs, &theirs.logprobs);
                assert!(d < 1e-4, "{tag}: logprobs differ by {d}");
            }
        }
    }
}

#[test]
fn a_new_placement_reads_only_the_slots_that_moved() {
    let model = LoadedModel::open(&fixture("tiny-v3"), 1).expect("fixture loads");
    let experts = model.config.n_routed_experts;
    let moe_layers = model.config.moe_layer_count();
    let before = Placement::even(experts, 2).expect("even");
    let first = Model::new(model.shared.clone(), &model.checkpoint, &before, 0).expect("rank 0");
    // Layer 0: rank 0 gives up its last expert and takes expert `experts - 1` twice as well as
    // keeping the rest; the other layers do not change.
    let mut after = before.expanded(moe_layers);
    let half = experts / 2;
    after[0][0] = (0..half - 1).chain([experts - 1, experts - 1]).collect();
    after[0][1] = (half - 1..experts).collect();
    let after = Placement {
        num_experts: experts,
        layers: after,
    };
    let spec = RankSpec {
        placement: &after,
        rank: 0,
        previous: Some(&first.experts),
        load: Some(first.load().clone()),
        metrics: None,
    };
    let (second, reload) =
        Model::build(model.shared.clone(), &model.checkpoint, spec).expect("rank 0 again");
    let layer0 = (0..model.config.num_hidden_layers)
        .find(|&l| model.config.is_moe_layer(l))
        .expect("a MoE layer");
    // Only the new expert is read, once for its two slots; everything else is taken over.
    assert_eq!(reload.loaded, 1, "{reload:?}");
    assert_eq!(reload.reused, half * moe_layers, "{reload:?}");
    assert!(second.experts.shares_slot(&first.experts, layer0, 0));
    assert!(!second.experts.shares_slot(&first.experts, layer0, half - 1));
    assert_eq!(second.experts.slots()[0], after.slots(0, 0));
    let last = model.config.num_hidden_layers - 1;
    assert!(model.config.is_moe_layer(last));
    assert!(second.experts.shares_slot(&first.experts, last, half - 1));
    assert!(std::sync::Arc::ptr_eq(first.load(), second.load()));
}
