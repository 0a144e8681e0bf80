//! Chat templates rendered by Moebius (minijinja) against what transformers'
//! `apply_chat_template` renders for the same templates and conversations
//! (`fixtures/chat-templates/goldens.json`, made by `scripts/make_chat_goldens.py`).

use std::path::{Path, PathBuf};

use moebius_worker::chat::ChatTemplate;
use moebius_worker::error::Error;
use serde_json::{json, Value};

fn templates() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/chat-templates")
}

#[test]
fn every_template_renders_exactly_what_transformers_renders() {
    let goldens: Value = serde_json::from_str(
        &std::fs::read_to_string(templates().join("goldens.json")).expect("goldens.json"),
    )
    .expect("goldens.json parses");
    let cases = goldens["cases"].as_array().expect("cases");
    assert!(cases.len() >= 10, "too few cases: {}", cases.len());
    for case in cases {
        let name = case["template"].as_str().expect("template");
        let source = std::fs::read_to_string(templates().join(format!("{name}.jinja")))
            .expect("the template file");
        let template = ChatTemplate::from_config(&json!({
            "chat_template": source,
            "bos_token": goldens["bos_token"],
            "eos_token": goldens["eos_token"],
        }))
        .expect("the template parses")
        .expect("a template");
        let messages = case["messages"].as_array().expect("messages");
        let add = case["add_generation_prompt"].as_bool().expect("flag");
        let what = format!(
            "{name} on {} (generation prompt {add})",
            case["conversation"]
        );
        let rendered = template.render(messages, add);
        match (&case["text"], &case["error"]) {
            (Value::String(want), _) => {
                assert_eq!(rendered.expect(&what), *want, "{what}");
            }
            (_, Value::String(error)) => match rendered {
                Err(Error::InvalidRequest(message)) => {
                    assert!(message.contains(error.as_str()), "{what}: {message}")
                }
                other => panic!("{what}: expected the template's error {error:?}, got {other:?}"),
            },
            _ => panic!("{what}: a case needs text or error"),
        }
    }
}

#[test]
fn a_checkpoint_without_a_template_refuses_chat_clearly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-v3");
    let tokenizer = moebius_worker::tokenizer::Tokenizer::from_dir(&dir, Some(0))
        .expect("loads")
        .expect("a tokenizer");
    let err = tokenizer
        .encode_chat(&[json!({"role": "user", "content": "hi"})])
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidRequest(m) if m.contains("no chat_template")),
        "{err}"
    );
}

#[test]
fn the_demo_models_chat_has_one_bos_and_ends_with_the_assistants_turn() {
    // Its template has DeepSeek's shape: one BOS first (written by the template, not added
    // again by the tokenizer), the assistant's opening token (id 3) last.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/demo");
    let tokenizer = moebius_worker::tokenizer::Tokenizer::from_dir(&dir, Some(0))
        .expect("loads")
        .expect("a tokenizer");
    let ids = tokenizer
        .encode_chat(&[json!({"role": "user", "content": "What is a river?"})])
        .expect("renders");
    assert_eq!(ids.first(), Some(&0), "{ids:?}");
    assert_eq!(
        ids.iter().filter(|&&i| i == 0).count(),
        1,
        "one BOS: {ids:?}"
    );
    assert_eq!(ids.last(), Some(&3), "ends with <｜Assistant｜>: {ids:?}");
}
