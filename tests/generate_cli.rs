//! `moebius generate` as a user runs it: a real process, its stdout JSON, its exit code and
//! its one-line errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// `moebius args`, without the test environment's `MOEBIUS_*` variables (which `--check-config`
/// would refuse as unknown to the part, and which would change the defaults).
fn moebius(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_moebius"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MOEBIUS_") {
            command.env_remove(name);
        }
    }
    command.args(args).output().expect("moebius runs")
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "moebius failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().count(),
        1,
        "--json prints exactly one line: {stdout}"
    );
    serde_json::from_str(&stdout).expect("stdout is JSON")
}

fn golden_case(name: &str, case: usize) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("golden.json")).expect("golden.json");
    let golden: Value = serde_json::from_str(&text).expect("golden parses");
    golden["cases"][case].clone()
}

fn ids_arg(ids: &Value) -> String {
    ids.as_array()
        .expect("ids")
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A golden case's prompt as `--prompt-ids` takes it, and its number of new tokens.
fn prompt_and_length(case: &Value) -> (String, String) {
    let n = case["new_token_ids"].as_array().expect("tokens").len();
    (ids_arg(&case["prompt_ids"]), n.to_string())
}

#[test]
fn json_output_has_every_field_and_matches_the_golden() {
    let case = golden_case("tiny-v3", 1);
    let model = fixture("tiny-v3");
    let (ids, n) = prompt_and_length(&case);
    let args = [
        "generate",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--prompt-ids",
        &ids,
    ];
    let out = moebius(
        &[
            &args[..],
            &[
                "--max-new-tokens",
                &n,
                "--ignore-eos",
                "--top-logprobs",
                "3",
                "--json",
            ],
        ]
        .concat(),
    );
    let v = json_of(&out);
    assert_eq!(v["token_ids"], case["new_token_ids"]);
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(
        v["usage"]["prompt_tokens"],
        case["prompt_ids"].as_array().expect("ids").len()
    );
    assert_eq!(
        v["usage"]["completion_tokens"].as_u64(),
        Some(n.parse().expect("n"))
    );
    assert_eq!(
        v["logprobs"].as_array().expect("logprobs").len(),
        v["token_ids"].as_array().expect("ids").len()
    );
    let top = v["top_logprobs"].as_array().expect("top_logprobs");
    assert!(top
        .iter()
        .all(|step| step.as_array().expect("step").len() == 3));
    assert!(
        v["text"].is_string(),
        "a model with a tokenizer returns text"
    );
    for (ours, theirs) in v["logprobs"]
        .as_array()
        .expect("lp")
        .iter()
        .zip(case["logprobs"].as_array().expect("lp"))
    {
        let d = (ours.as_f64().expect("f") - theirs.as_f64().expect("f")).abs();
        assert!(d < 1e-3, "logprob differs from transformers by {d}");
    }
}

#[test]
fn a_text_prompt_is_tokenised_like_the_golden_and_stops_at_eos() {
    // The golden "short" case of tiny-v3 makes the EOS token (id 1) as its second token.
    let case = golden_case("tiny-v3", 0);
    assert_eq!(
        case["new_token_ids"][1], 1,
        "fixture changed: case 0 no longer produces EOS second"
    );
    let model = fixture("tiny-v3");
    let text = case["prompt_text"].as_str().expect("text");
    let out = moebius(&[
        "generate",
        "--model",
        model.to_str().expect("utf-8"),
        "--prompt",
        text,
        "--max-new-tokens",
        "8",
        "--json",
    ]);
    let v = json_of(&out);
    assert_eq!(
        v["usage"]["prompt_tokens"],
        case["prompt_ids"].as_array().expect("ids").len()
    );
    assert_eq!(
        v["token_ids"],
        serde_json::json!([case["new_token_ids"][0], 1])
    );
    assert_eq!(v["finish_reason"], "eos");
}

#[test]
fn bf16_activations_still_generate_the_requested_tokens() {
    // Numerics differ from the f32 default by design; the contract is a well-formed answer.
    let model = fixture("tiny-v3");
    let out = moebius(&[
        "generate",
        "--model",
        model.to_str().expect("utf-8"),
        "--prompt-ids",
        "0,5,9,12,40,41,42,43,44,45,46",
        "--max-new-tokens",
        "6",
        "--ignore-eos",
        "--bf16-activations",
        "--json",
    ]);
    let v = json_of(&out);
    assert_eq!(v["token_ids"].as_array().map(Vec::len), Some(6));
    assert!(v["logprobs"]
        .as_array()
        .expect("logprobs")
        .iter()
        .all(|l| l.as_f64().is_some_and(|x| x <= 0.0)));
}

#[test]
fn a_seed_makes_sampling_reproducible_across_processes() {
    let model = fixture("tiny-v2");
    let run = |seed: &str| {
        let out = moebius(&[
            "generate",
            "--model",
            model.to_str().expect("utf-8"),
            "--prompt-ids",
            "0,5,9,12",
            "--max-new-tokens",
            "12",
            "--ignore-eos",
            "--temperature",
            "1.5",
            "--seed",
            seed,
            "--json",
        ]);
        json_of(&out)["token_ids"].clone()
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(
        run("7"),
        run("8"),
        "different seeds should differ somewhere in 12 tokens"
    );
}

#[test]
fn bad_input_exits_non_zero_with_one_line_naming_the_problem() {
    let v3 = fixture("tiny-v3");
    let v3 = v3.to_str().expect("utf-8");
    let v2 = fixture("tiny-v2");
    let v2 = v2.to_str().expect("utf-8");
    let long: String = (0..300)
        .map(|i| (i % 400).to_string())
        .collect::<Vec<_>>()
        .join(",");
    let not_a_model = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        not_a_model.path().join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 10}"#,
    )
    .expect("write config");
    let llama = not_a_model.path().to_str().expect("utf-8");
    let cases: Vec<(Vec<&str>, u8, &str)> = vec![
        (
            vec!["--model", v3, "--prompt-ids", "0,99999"],
            2,
            "token id 99999 is outside the vocabulary",
        ),
        (vec!["--model", v3, "--prompt", ""], 2, "--prompt is empty"),
        (
            vec!["--model", v3, "--prompt-ids", ""],
            2,
            "--prompt-ids is empty",
        ),
        (
            vec!["--model", v3, "--prompt-ids", "1,x"],
            2,
            "\"x\" is not a token id",
        ),
        (
            vec!["--model", v2, "--prompt", "hello"],
            2,
            "has no tokenizer.json",
        ),
        (
            vec!["--model", v3, "--prompt-ids", "0,5", "--temperature", "-1"],
            2,
            "temperature must be",
        ),
        (
            vec!["--model", v3, "--prompt-ids", "0,5", "--temperature", "NaN"],
            2,
            "temperature must be",
        ),
        (
            vec!["--model", v3, "--prompt-ids", "0,5", "--top-p", "0"],
            2,
            "top_p must be in (0, 1]",
        ),
        (
            vec!["--model", v3, "--prompt-ids", "0,5", "--top-p", "1.5"],
            2,
            "top_p must be in (0, 1]",
        ),
        (
            vec!["--model", v3, "--prompt-ids", "0,5", "--ep", "0"],
            2,
            "--ep must be at least 1",
        ),
        (
            vec!["--model", v3, "--prompt-ids", "0,5", "--ep", "9"],
            2,
            "more ranks than the model's 8 routed experts",
        ),
        (
            vec!["--model", v3, "--prompt-ids", "0,5", "--transport", "udp"],
            2,
            "transport \"udp\" is unknown",
        ),
        (
            vec!["--model", v3, "--prompt-ids", &long],
            2,
            "maximum of 256 positions",
        ),
        (
            vec![
                "--model",
                v3,
                "--prompt-ids",
                "0,5",
                "--max-new-tokens",
                "0",
            ],
            2,
            "--max-new-tokens must be at least 1",
        ),
        (
            vec!["--model", "no/such/dir", "--prompt-ids", "0"],
            1,
            "no/such/dir is missing",
        ),
        (
            vec!["--model", llama, "--prompt-ids", "0"],
            1,
            "\"LlamaForCausalLM\" is not supported",
        ),
    ];
    for (args, code, message) in cases {
        let out = moebius(&[&["generate"][..], &args].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(i32::from(code)),
            "{args:?}: wrong exit code; stderr: {stderr}"
        );
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?}: expected one line on stderr, got: {stderr}"
        );
        assert!(
            stderr.contains(message),
            "{args:?}: stderr {stderr:?} should contain {message:?}"
        );
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
}

/// Copies a fixture into a temporary directory so a test can break it.
fn broken_copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(fixture(name)).expect("fixture dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
    }
    dir
}

#[test]
fn a_broken_checkpoint_is_named_in_one_line() {
    let edit_config = |dir: &Path, from: &str, to: &str| {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).expect("config");
        assert!(text.contains(from), "fixture config lacks {from}");
        std::fs::write(&path, text.replacen(from, to, 1)).expect("write config");
    };
    // A truncated shard, as after an interrupted download.
    let truncated = broken_copy("tiny-v3-yarn");
    let file = truncated.path().join("model.safetensors");
    let len = std::fs::metadata(&file).expect("meta").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .expect("open")
        .set_len(len / 2)
        .expect("truncate");
    // A config that disagrees with the tensors.
    let wrong_shape = broken_copy("tiny-v3-yarn");
    edit_config(
        wrong_shape.path(),
        "\"vocab_size\": 448",
        "\"vocab_size\": 500",
    );
    // A config that asks for tensors the files do not have (layer 0 as MoE).
    let missing = broken_copy("tiny-v3-yarn");
    edit_config(
        missing.path(),
        "\"first_k_dense_replace\": 1",
        "\"first_k_dense_replace\": 0",
    );
    let cases = [
        (&truncated, "model.safetensors: not a valid safetensors file"),
        (&wrong_shape, "tensor model.embed_tokens.weight has shape [448, 64], but the config implies [500, 64]"),
        (&missing, "tensor model.layers.0.mlp.shared_experts.gate_proj.weight is not in the checkpoint"),
    ];
    for (dir, message) in cases {
        let out = moebius(&[
            "generate",
            "--model",
            dir.path().to_str().expect("utf-8"),
            "--prompt-ids",
            "0,5",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
        assert!(
            stderr.contains(message),
            "stderr {stderr:?} should contain {message:?}"
        );
    }
}

/// `moebius [global] generate` of `ids` for `n` tokens on `model`, greedy to the end, as JSON,
/// with `extra` options.
fn greedy(global: &[&str], model: &Path, ids: &str, n: &str, extra: &[&str]) -> Output {
    let model = model.to_str().expect("utf-8 path");
    let mut args = global.to_vec();
    args.extend([
        "generate",
        "--model",
        model,
        "--prompt-ids",
        ids,
        "--max-new-tokens",
        n,
        "--ignore-eos",
        "--json",
    ]);
    args.extend(extra);
    moebius(&args)
}

/// `--kernels` forces a kernel family: the portable one gives the golden's tokens too, a
/// family that does not exist is refused with exit code 2 and one line.
#[test]
fn a_forced_kernel_family_gives_the_golden_and_a_wrong_one_is_refused() {
    let case = golden_case("tiny-v3", 0);
    let model = fixture("tiny-v3");
    let (ids, n) = prompt_and_length(&case);
    let run = |kernels: &str| greedy(&["--kernels", kernels], &model, &ids, &n, &[]);
    for kernels in ["portable", "auto"] {
        let v = json_of(&run(kernels));
        assert_eq!(v["token_ids"], case["new_token_ids"], "--kernels {kernels}");
    }
    let out = run("sse9");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--kernels sse9: give auto"), "{stderr}");
}

/// `--device` picks where the products run: `cpu` gives the golden's tokens; a GPU on a
/// moebius built without the `cuda` feature (on `generate` and on `up`), or a device that does
/// not exist, is refused with exit code 2 and one line that says what to do.
#[test]
fn the_device_flag_runs_on_the_cpu_and_refuses_what_it_cannot_open() {
    let case = golden_case("tiny-v3", 0);
    let model = fixture("tiny-v3");
    let (ids, n) = prompt_and_length(&case);
    let run = |device: &str| greedy(&[], &model, &ids, &n, &["--device", device]);
    let v = json_of(&run("cpu"));
    assert_eq!(v["token_ids"], case["new_token_ids"], "--device cpu");

    let out = run("gpu");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("device \"gpu\" is unknown"), "{stderr}");

    if cfg!(feature = "cuda") {
        eprintln!(
            "--device cuda on a build without the cuda feature: not checked, this build has it"
        );
        return;
    }
    let out = run("cuda:1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
    assert!(
        stderr.contains("cuda:1 needs a moebius built with the cuda feature"),
        "{stderr}"
    );

    // `up` checks every worker's device before it starts anything: one for all, or each of a
    // list (here the second worker's).
    for devices in ["cuda", "cpu,cuda:0"] {
        let out = moebius(&[
            "up",
            "--device",
            devices,
            "--workers",
            "2",
            "--listen",
            "127.0.0.1:0",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{devices}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
        assert!(
            stderr.contains("cuda:0 needs a moebius built with the cuda feature"),
            "{devices}: {stderr}"
        );
    }
}

/// `up --device` takes one device per worker, so that one machine can put a GPU rank beside
/// CPU ranks (`scripts/gpu_check.sh` does): a list of two CPUs serves, over the OpenAI API, the
/// tokens `generate` makes alone; a list of another length than `--workers` is refused with
/// exit code 2 and one line.
#[test]
fn up_takes_one_device_per_worker() {
    let model = fixture("tiny-v2");
    let path = model.to_str().expect("utf-8 path");
    let alone = json_of(&moebius(&[
        "generate",
        "--model",
        path,
        "--prompt-ids",
        "0,5,9,17",
        "--max-new-tokens",
        "8",
        "--ignore-eos",
        "--json",
    ]));
    let want: Vec<String> = (alone["token_ids"].as_array().expect("token ids").iter())
        .map(|id| format!("token_id:{id}"))
        .collect();

    let up = common::up::Up::start_with(&model, &["--workers", "2", "--device", "cpu,cpu"]);
    let tokens = completion_tokens(&up, "0, 5, 9, 17", "8");
    assert_eq!(tokens, want, "two CPU workers against generate alone");
    drop(up);

    let out = moebius(&[
        "up",
        "--model",
        path,
        "--device",
        "cpu,cpu,cpu",
        "--workers",
        "2",
        "--listen",
        "127.0.0.1:0",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
    assert!(
        stderr.contains("--device lists 3 devices for 2 workers"),
        "{stderr}"
    );
}

/// `moebius worker --check-config` on the checkpoint at `model`, with `extra` flags.
fn worker_check_config<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let base = [
        "worker",
        "--etcd",
        "http://127.0.0.1:1",
        "--id",
        "w0",
        "--model",
        model,
    ];
    [&base[..], extra, &["--check-config"]].concat()
}

/// `--kv-cache-tokens` is counted in whole blocks of 16, reported by `--check-config`, and a
/// budget under one block is refused by `worker` and `up` with exit code 2 and one line.
#[test]
fn the_kv_cache_budget_is_checked_and_reported() {
    let model = fixture("tiny-v2");
    let path = model.to_str().expect("utf-8 path");
    let out = moebius(&worker_check_config(path, &["--kv-cache-tokens", "100"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("KV cache 96 tokens"), "{stdout}");
    let out = moebius(&worker_check_config(path, &[]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("KV cache what memory allows"), "{stdout}");
    for args in [
        worker_check_config(path, &["--kv-cache-tokens", "15"]),
        vec!["up", "--model", path, "--kv-cache-tokens", "15"],
    ] {
        let out = moebius(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
        assert!(
            stderr.contains("--kv-cache-tokens 15 is under one block of 16 tokens"),
            "{stderr}"
        );
    }
}

/// `--data-plane nccl` joins GPUs only: `up` and `worker` refuse it for CPU workers with exit
/// code 2 and one line naming the fix, before anything starts; an unknown data plane is named.
#[test]
fn the_nccl_data_plane_needs_gpu_workers() {
    let model = fixture("tiny-v2");
    let path = model.to_str().expect("utf-8 path");
    let refused = |args: &[&str], want: &str| {
        let out = moebius(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        stderr.into_owned()
    };
    let stderr = refused(
        &[
            "up",
            "--model",
            path,
            "--workers",
            "2",
            "--data-plane",
            "nccl",
            "--listen",
            "127.0.0.1:0",
        ],
        "--data-plane nccl exchanges tokens between GPUs, but worker 0 is on the cpu",
    );
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
    let worker = |extra: &[&'static str]| worker_check_config(path, extra);
    refused(
        &worker(&["--data-plane", "nccl"]),
        "--data-plane nccl exchanges tokens between GPUs: give --device cuda:N (not cpu)",
    );
    refused(
        &["up", "--model", path, "--data-plane", "udp"],
        "unknown data plane \"udp\": use tcp or nccl",
    );
    // The default, and what --check-config reports.
    let out = moebius(&worker(&[]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("tcp data plane"), "{stdout}");
}

/// A GPU rank as a user starts one: `generate --device cuda:0` gives the tokens the CPU gives,
/// `bench engine --device cuda:0` counts the waits a decode step costs, and
/// `up --device cuda:0,cpu` (a GPU rank beside a CPU rank, over tcp) and, with two GPUs,
/// `up --device cuda:0 --data-plane nccl` serve them through the OpenAI API. Runs where a GPU answers, and in `scripts/test.sh` on `cuda_host`'s stand-in for
/// one (with `MOEBIUS_REQUIRE_GPU`, under which no GPU fails it); says why it skips elsewhere.
#[test]
fn gpu_ranks_give_the_cpus_tokens_through_generate_and_up() {
    if !cfg!(feature = "cuda") {
        eprintln!("skipped: built without the cuda feature (cargo test --features cuda)");
        return;
    }
    // f32 weights: the GPU multiplies them in f32 too, so the tokens must agree.
    let model = fixture("tiny-v2");
    let (ids, n) = prompt_and_length(&golden_case("tiny-v2", 0));
    let cpu = json_of(&greedy(&[], &model, &ids, &n, &["--device", "cpu"]));
    let out = greedy(&[], &model, &ids, &n, &["--device", "cuda:0"]);
    if !out.status.success() && std::env::var_os("MOEBIUS_REQUIRE_GPU").is_none() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("skipped: no GPU to run on ({})", stderr.trim());
        return;
    }
    let gpu = json_of(&out);
    assert_eq!(
        gpu["token_ids"], cpu["token_ids"],
        "generate --device cuda:0"
    );
    let logprobs = |v: &Value| -> Vec<f64> {
        (v["logprobs"].as_array().expect("logprobs").iter())
            .map(|l| l.as_f64().expect("a number"))
            .collect()
    };
    for (g, c) in logprobs(&gpu).iter().zip(logprobs(&cpu)) {
        assert!(
            (g - c).abs() < 1e-4,
            "logprob {g} on the GPU, {c} on the CPU"
        );
    }

    // What a decode step waits for the GPU, through `bench engine` as a user measures it: the
    // dense layer twice (its attention block, its MLP), a MoE layer twice (its attention block
    // with the gate's routing after it, then its experts) and the LM head once; the demo model
    // has 1 dense layer and 3 MoE ones. One batch of three sequences waits as often as one.
    let demo = fixture("demo");
    let bench = json_of(&moebius(&[
        "bench",
        "engine",
        "--device",
        "cuda:0",
        "--model",
        demo.to_str().expect("utf-8 path"),
        "--prompt-len",
        "8",
        "--decode-tokens",
        "3",
        "--batch",
        "1,3",
        "--repeats",
        "1",
        "--json",
    ]));
    let rows = bench["results"].as_array().expect("bench rows");
    assert_eq!(rows.len(), 2, "{bench}");
    for row in rows {
        assert_eq!(
            row["gpu_waits_per_decode_step"].as_f64(),
            Some((2 + 2 * 3 + 1) as f64),
            "{row}"
        );
    }

    let want = completion_tokens_of(&cpu);
    let up = common::up::Up::start_with(&model, &["--workers", "2", "--device", "cuda:0,cpu"]);
    let tokens = completion_tokens(&up, &ids, &n);
    assert_eq!(tokens, want, "up --device cuda:0,cpu against the CPU");
    drop(up);

    // Two GPU ranks on the nccl data plane, where there is a second GPU.
    let second = greedy(&[], &model, &ids, &n, &["--device", "cuda:1"]);
    if !second.status.success() {
        let stderr = String::from_utf8_lossy(&second.stderr);
        eprintln!("nccl: skipped, two GPUs needed ({})", stderr.trim());
        return;
    }
    let nccl = [
        "--workers",
        "2",
        "--device",
        "cuda:0",
        "--data-plane",
        "nccl",
    ];
    let up = common::up::Up::start_with(&model, &nccl);
    let tokens = completion_tokens(&up, &ids, &n);
    assert_eq!(
        tokens, want,
        "up --device cuda:0 --data-plane nccl against the CPU"
    );
}

/// A GPU that faults in the middle of a request (the CPU's stand-in failing its launch after
/// the first 300, `CUDA_HOST_FAIL_AFTER`): `generate` ends with exit code 1 and the reason,
/// not with the tokens so far as if they were the answer. Runs on the stand-in only, which
/// `scripts/test.sh` sets up (`CUDA_HOST_DEVICES`); says why it skips elsewhere.
#[test]
fn gpu_ranks_that_fault_mid_request_end_it_with_an_error() {
    if !on_the_stand_in() {
        return;
    }
    let model = fixture("demo");
    let run = |fail_after: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_moebius"));
        if let Some(n) = fail_after {
            command.env("CUDA_HOST_FAIL_AFTER", n);
        }
        command
            .args(["generate", "--model", model.to_str().expect("utf-8 path")])
            .args([
                "--device",
                "cuda:0",
                "--prompt",
                "Hello",
                "--max-new-tokens",
                "8",
            ])
            .args(["--ignore-eos"])
            .output()
            .expect("moebius runs")
    };
    let whole = run(None);
    assert_eq!(
        whole.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&whole.stderr)
    );
    let faulted = run(Some("300"));
    let stderr = String::from_utf8_lossy(&faulted.stderr);
    assert_eq!(faulted.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("engine stopped before the request finished"),
        "{stderr}"
    );
    // It faulted after the first tokens, not before them.
    let printed = String::from_utf8_lossy(&faulted.stdout);
    assert!(!printed.trim().is_empty(), "no token came before the fault");
    assert!(
        printed.len() < String::from_utf8_lossy(&whole.stdout).len(),
        "{printed}"
    );
}

/// `--fp8-activations` as a user gives it, on the stand-in (which has Hopper's FP8 tensor cores
/// and cuBLASLt 12.9): `generate` on the FP8 fixture with a 23-token prompt (products of more
/// than 8 rows) says in its log that they run on the tensor cores and gives transformers' first
/// token. With `MOEBIUS_FP8_ACTIVATIONS` and a stand-in for cuBLASLt 12.8 it says why it keeps
/// the bf16 products instead, and gives the same token. Runs on the stand-in only.
#[test]
fn gpu_ranks_take_fp8_activations_from_the_command_line() {
    if !on_the_stand_in() {
        return;
    }
    let model = fixture("tiny-v3-fp8");
    let case = golden_case("tiny-v3-fp8", 1);
    let ids = ids_arg(&case["prompt_ids"]);
    let want = &case["new_token_ids"][0];
    let run = |flag: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_moebius"))
            .env("MOEBIUS_LOG", "info")
            .envs(env.iter().copied())
            .args(flag)
            .args(["generate", "--model", model.to_str().expect("utf-8 path")])
            .args(["--device", "cuda:0", "--prompt-ids", &ids])
            .args(["--max-new-tokens", "1", "--ignore-eos", "--json"])
            .output()
            .expect("moebius runs");
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        (json_of(&out), log)
    };
    let (on_cores, log) = run(&["--fp8-activations"], &[]);
    assert!(
        log.contains("FP8 products of many rows on tensor cores"),
        "{log}"
    );
    assert_eq!(&on_cores["token_ids"][0], want, "{log}");
    let old_library = [
        ("MOEBIUS_FP8_ACTIVATIONS", "true"),
        ("CUDA_HOST_CUBLASLT_VERSION", "120800"),
    ];
    let (by_bf16, log) = run(&[], &old_library);
    assert!(
        log.contains("--fp8-activations: FP8 products of many rows dequantise their weight")
            && log.contains("cuBLASLt 120800"),
        "{log}"
    );
    assert_eq!(&by_bf16["token_ids"][0], want, "{log}");
}

/// A GPU rank that faults mid-request in `moebius up --device cuda:0,cpu` (the CPU's stand-in
/// failing its launch after the first 300): its worker stops serving and `up` starts it
/// again, and every request still completes with the CPU's tokens. Runs on the stand-in only
/// (`scripts/test.sh`); says why it skips elsewhere.
#[test]
fn gpu_ranks_that_fault_in_up_lose_no_request() {
    let Some(up) = three_requests_through_a_gpu_fault(&[]) else {
        return;
    };
    // The fault did happen, and up took the GPU worker down and started it again.
    up.next_line("the GPU worker's restart", |l| {
        l.starts_with("[up] worker-0 failed")
    });
}

/// A GPU that breaks for good mid-request in `moebius up --device cuda:0,cpu` (the stand-in's
/// launch after the first 300 fails, and every launch after it, `CUDA_HOST_BROKEN`): the GPU
/// worker stops serving, each start of it again fails its backend's self-test before it joins
/// the cluster, and the CPU worker serves every request alone with the CPU's tokens. Runs on the
/// stand-in only (`scripts/test.sh`); says why it skips elsewhere.
#[test]
fn gpu_ranks_whose_gpu_breaks_for_good_lose_no_request() {
    let broken = tempfile::tempdir().expect("a temporary directory");
    let mark = broken.path().join("broken");
    let Some(up) = three_requests_through_a_gpu_fault(&[("CUDA_HOST_BROKEN", mark.as_os_str())])
    else {
        return;
    };
    assert!(mark.exists(), "the GPU did not break");
    up.next_line("the GPU worker's failed self-test", |l| {
        l.starts_with("[up] worker-0 failed") && l.contains("self-test")
    });
}

/// `moebius up --workers 2 --device cuda:0,cpu` on tiny-v2, its GPU's launch after the first 300
/// failing (and `env` besides): three greedy completions through the OpenAI API, each asserted
/// to have the CPU's tokens. `None`, having said why, off the stand-in.
fn three_requests_through_a_gpu_fault(env: &[(&str, &std::ffi::OsStr)]) -> Option<common::up::Up> {
    if !on_the_stand_in() {
        return None;
    }
    let model = fixture("tiny-v2");
    let (ids, n) = prompt_and_length(&golden_case("tiny-v2", 0));
    let cpu = json_of(&greedy(&[], &model, &ids, &n, &["--device", "cpu"]));
    let want = completion_tokens_of(&cpu);
    let extra = ["--workers", "2", "--device", "cuda:0,cpu"];
    let up = common::up::Up::spawn(&model, &extra, |command| {
        command.env("CUDA_HOST_FAIL_AFTER", "300");
        command.envs(env.iter().copied());
    });
    up.router_addr();
    let http = up.http_addr();
    for request in 0..3 {
        let tokens = completion_tokens_at(&http, &ids, &n);
        assert_eq!(tokens, want, "request {request} against the CPU");
    }
    Some(up)
}

/// Whether the CUDA backend runs on the CPU's stand-in for a GPU, whose faults a test can
/// inject (`scripts/test.sh` sets it up); says why not where it does not.
fn on_the_stand_in() -> bool {
    let here = cfg!(feature = "cuda") && std::env::var_os("CUDA_HOST_DEVICES").is_some();
    if !here {
        eprintln!(
            "skipped: needs the cuda feature and the CPU's stand-in for a GPU (scripts/test.sh)"
        );
    }
    here
}

/// `generate --json`'s token ids as the OpenAI API's logprobs name them (`token_id:N`).
fn completion_tokens_of(generated: &Value) -> Vec<String> {
    (generated["token_ids"].as_array().expect("token ids").iter())
        .map(|id| format!("token_id:{id}"))
        .collect()
}

/// The tokens of a greedy completion of `ids` for `n` tokens through `up`'s OpenAI API, as
/// `token_id:N` strings.
fn completion_tokens(up: &common::up::Up, ids: &str, n: &str) -> Vec<String> {
    up.router_addr();
    completion_tokens_at(&up.http_addr(), ids, n)
}

/// [`completion_tokens`] from the OpenAI API at `http`.
fn completion_tokens_at(http: &str, ids: &str, n: &str) -> Vec<String> {
    let body = format!(
        r#"{{"prompt": [{ids}], "max_tokens": {n}, "temperature": 0, "ignore_eos": true,
            "logprobs": 1}}"#
    );
    let (status, reply) = common::http::post(
        http,
        "/v1/completions",
        Some("application/json"),
        body.as_bytes(),
    );
    assert_eq!(status, 200, "{reply}");
    let reply: Value = serde_json::from_str(&reply).expect("a JSON reply");
    serde_json::from_value(reply["choices"][0]["logprobs"]["tokens"].clone())
        .expect("the completion's tokens")
}
