//! The fuzz targets of `fuzz/` on stable, in the test run: every file of their corpora replayed
//! through the same entry points, then proptest's random inputs — seeds of the corpora mutated
//! (bytes changed, cut, spliced), bytes made from scratch, and whole `GenerateRequest`s — a
//! bounded number of cases each. `cargo fuzz` runs the same targets for as long as one likes
//! (fuzz/README.md); what it finds lands in the corpora, and so in this test.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use moebius_proto::v1::generate_request::Prompt;
use moebius_proto::v1::{GenerateRequest, SamplingParams, TokenIds};
use moebius_worker::chat::ChatTemplate;
use proptest::prelude::*;
use prost::Message;

/// Random cases per property: seconds in all on a 2-core machine.
const CASES: u32 = 10_000;

type Entry = fn(&[u8]);

fn chat_messages(bytes: &[u8]) {
    static TEMPLATE: OnceLock<ChatTemplate> = OnceLock::new();
    let template = TEMPLATE.get_or_init(|| {
        let source = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures/chat-templates/deepseek-style.jinja"),
        )
        .expect("the template fixture");
        moebius_worker::fuzz::chat_template(&source)
    });
    moebius_worker::fuzz::chat_messages(template, bytes);
}

/// Every target, by the name of its folder in `fuzz/corpus` and of its binary in `fuzz/`.
const TARGETS: [(&str, Entry); 6] = [
    ("data_plane", moebius_worker::fuzz::data_plane),
    (
        "safetensors_header",
        moebius_worker::fuzz::safetensors_header,
    ),
    ("model_config", moebius_worker::fuzz::model_config),
    ("chat_messages", chat_messages),
    ("grpc_request", moebius_router::fuzz::grpc_request),
    ("openai_body", moebius_router::fuzz::openai_body),
];

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// The files of a target's corpus, sorted by name.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(corpus_dir(target))
        .unwrap_or_else(|e| panic!("fuzz/corpus/{target}: {e}"))
        .map(|e| e.expect("a corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| std::fs::read(p).expect("a corpus file"))
        .collect()
}

fn corpora() -> &'static Vec<Vec<Vec<u8>>> {
    static CORPORA: OnceLock<Vec<Vec<Vec<u8>>>> = OnceLock::new();
    CORPORA.get_or_init(|| TARGETS.iter().map(|(name, _)| corpus(name)).collect())
}

#[test]
fn every_corpus_file_replays_without_a_panic() {
    for (i, (name, entry)) in TARGETS.iter().enumerate() {
        let files = &corpora()[i];
        assert!(
            files.len() >= 3,
            "fuzz/corpus/{name} has {} files",
            files.len()
        );
        for file in files {
            entry(file);
        }
    }
}

/// A seed of a corpus, changed: bytes overwritten, then cut, then another seed's tail
/// appended.
fn mutate(seed: &[u8], edits: &[(usize, u8)], cut: usize, tail: &[u8]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    if !bytes.is_empty() {
        for &(at, value) in edits {
            let at = at % bytes.len();
            bytes[at] = value;
        }
    }
    bytes.truncate(cut.min(bytes.len()));
    bytes.extend_from_slice(tail);
    bytes
}

fn sampling() -> impl Strategy<Value = Option<SamplingParams>> {
    proptest::option::of(
        (
            any::<f32>(),
            any::<f32>(),
            any::<u32>(),
            any::<Option<u64>>(),
        )
            .prop_map(|(temperature, top_p, top_k, seed)| SamplingParams {
                temperature,
                top_p,
                top_k,
                seed,
            }),
    )
}

fn generate_request() -> impl Strategy<Value = GenerateRequest> {
    let prompt = prop_oneof![
        ".{0,64}".prop_map(Prompt::Text),
        proptest::collection::vec(any::<u32>(), 0..64)
            .prop_map(|ids| Prompt::TokenIds(TokenIds { ids })),
    ];
    (
        ".{0,200}",
        proptest::option::of(prompt),
        any::<u32>(),
        sampling(),
        proptest::collection::vec(".{0,300}", 0..20),
        proptest::collection::vec(any::<u32>(), 0..80),
        (any::<bool>(), any::<bool>(), any::<u32>()),
    )
        .prop_map(
            |(request_id, prompt, max_new_tokens, sampling, stop, stop_token_ids, flags)| {
                GenerateRequest {
                    request_id,
                    prompt,
                    max_new_tokens,
                    sampling,
                    stop,
                    stop_token_ids,
                    ignore_eos: flags.0,
                    logprobs: flags.1,
                    top_logprobs: flags.2,
                    ..GenerateRequest::default()
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn mutated_seeds_of_every_target(
        target in 0..TARGETS.len(),
        seed in any::<prop::sample::Index>(),
        other in any::<prop::sample::Index>(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in any::<usize>(),
        tail_len in 0usize..64,
    ) {
        let files = &corpora()[target];
        let seed = seed.get(files);
        let other = other.get(files);
        let tail = &other[other.len().saturating_sub(tail_len)..];
        let cut = if cut % 4 == 0 { cut % (seed.len() + 1) } else { seed.len() };
        (TARGETS[target].1)(&mutate(seed, &edits, cut, tail));
    }

    #[test]
    fn random_bytes_to_every_target(
        target in 0..TARGETS.len(),
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        (TARGETS[target].1)(&bytes);
    }

    #[test]
    fn whole_generate_requests_are_checked_without_a_panic(request in generate_request()) {
        moebius_router::fuzz::grpc_request(&request.encode_to_vec());
    }
}
