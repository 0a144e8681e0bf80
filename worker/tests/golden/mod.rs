//! The fixtures' transformers goldens and the check of a run against them, shared by the
//! parity tests and the kernel-family tests (each its own process).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use moebius_worker::engine::{
    run_group, GenerateOutput, GenerateRequest, GroupOptions, LoadedModel, Transport,
};
use serde::Deserialize;

#[derive(Deserialize)]
pub struct Golden {
    pub cases: Vec<Case>,
}

#[derive(Deserialize)]
pub struct Case {
    pub name: String,
    pub prompt_ids: Vec<u32>,
    pub new_token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
}

pub const FIXTURES: [&str; 6] = [
    "demo",
    "tiny-v3",
    "tiny-v3-yarn",
    "tiny-v3-fp8",
    "tiny-v2",
    "tiny-v2-lite",
];

/// The fixture `name`: under `MOEBIUS_FIXTURES` where set (a test binary run from another
/// checkout than it was built in, as `scripts/gpu_check.sh` does with a prebuilt bundle), else
/// in this checkout.
pub fn fixture(name: &str) -> PathBuf {
    std::env::var_os("MOEBIUS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures"))
        .join(name)
}

pub fn golden(name: &str) -> Golden {
    let text = std::fs::read_to_string(fixture(name).join("golden.json"))
        .expect("golden.json of the fixture");
    serde_json::from_str(&text).expect("golden.json parses")
}

pub fn requests(golden: &Golden) -> Vec<GenerateRequest> {
    golden
        .cases
        .iter()
        .map(|c| GenerateRequest {
            ignore_eos: true,
            top_logprobs: 5,
            ..GenerateRequest::greedy(c.prompt_ids.clone(), c.new_token_ids.len())
        })
        .collect()
}

pub fn run(
    model: &LoadedModel,
    ranks: usize,
    transport: Transport,
    requests: Vec<GenerateRequest>,
) -> Vec<GenerateOutput> {
    let options = GroupOptions {
        ranks,
        transport,
        threads: 1,
        token_budget: 16,
        placement: None,
        ..GroupOptions::default()
    };
    run_group(model, &options, requests, |_, _| {})
        .expect("generation succeeds")
        .0
}

pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Greedy continuations of every case of fixture `name` against its transformers golden;
/// returns the worst logprob difference.
pub fn check_against_transformers(name: &str) -> f32 {
    {
        let golden = golden(name);
        let model = LoadedModel::open(&fixture(name), 1).expect("fixture loads");
        // All cases run together: batching must not change any sequence's numbers.
        let outputs = run(&model, 1, Transport::Local, requests(&golden));
        let mut worst: f32 = 0.0;
        for (case, out) in golden.cases.iter().zip(&outputs) {
            assert_eq!(
                out.token_ids, case.new_token_ids,
                "{name}/{}: greedy tokens differ",
                case.name
            );
            let diff = max_diff(&out.logprobs, &case.logprobs);
            assert!(
                diff < 1e-3,
                "{name}/{}: logprobs differ by {diff}",
                case.name
            );
            for (step, (ours, theirs)) in
                out.top_logprobs.iter().zip(&case.top_logprobs).enumerate()
            {
                let ids: Vec<u32> = ours.iter().map(|t| t.0).collect();
                let want: Vec<u32> = theirs.iter().map(|t| t.0).collect();
                assert_eq!(
                    ids, want,
                    "{name}/{} step {step}: top-5 ids differ",
                    case.name
                );
                let lp: Vec<f32> = ours.iter().map(|t| t.1).collect();
                let want_lp: Vec<f32> = theirs.iter().map(|t| t.1).collect();
                let d = max_diff(&lp, &want_lp);
                assert!(
                    d < 1e-3,
                    "{name}/{} step {step}: top-5 logprobs differ by {d}",
                    case.name
                );
                worst = worst.max(d);
            }
            worst = worst.max(diff);
        }
        worst
    }
}
