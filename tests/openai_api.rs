//! The OpenAI-compatible HTTP API of `moebius up`, as its users call it: the official `openai`
//! Python client (tests/openai/check_openai.py: completions and chat, whole and streamed,
//! usage, stop sequences, logprobs, seeds, refusals), the HTTP error table with raw requests,
//! and a client that goes away mid-stream.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::http;
use common::up::Up;
use serde_json::Value;

/// The name `up` serves the test model under.
const MODEL: &str = "tiny-chat";

/// One test at a time: each starts a cluster on a machine of two cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `fixtures/tiny-v3` with the DeepSeek-style fixture chat template in its tokenizer config.
fn chat_model(dir: &Path) -> PathBuf {
    let source = common::fixture("tiny-v3");
    let model = dir.join("tiny-v3");
    std::fs::create_dir(&model).expect("model dir");
    for entry in std::fs::read_dir(&source).expect("fixture") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), model.join(entry.file_name())).expect("copy");
    }
    let config_path = model.join("tokenizer_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).expect("config"))
            .expect("JSON");
    config["chat_template"] = Value::from(
        std::fs::read_to_string(common::fixture("chat-templates/deepseek-style.jinja"))
            .expect("template"),
    );
    std::fs::write(&config_path, config.to_string()).expect("write config");
    model
}

fn start(dir: &Path) -> (Up, String) {
    let up = Up::start_with(
        &chat_model(dir),
        &["--workers", "2", "--served-model-name", MODEL],
    );
    up.router_addr();
    let http = up.http_addr();
    (up, http)
}

/// The Python with the `openai` client that `scripts/test.sh` installs.
fn python() -> PathBuf {
    let python = std::env::var_os("MOEBIUS_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python")
        });
    assert!(
        python.exists(),
        "{} is missing: `bash scripts/test.sh` installs the openai client into it",
        python.display()
    );
    python
}

#[test]
fn the_openai_client_gets_completions_and_chats_whole_and_streamed() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let (_up, http) = start(dir.path());
    let out = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai/check_openai.py"))
        .arg(format!("http://{http}/v1"))
        .arg(MODEL)
        .output()
        .expect("python runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "the openai checks failed:\n{text}");
    assert!(text.contains("all openai checks passed"), "{text}");
}

#[test]
fn bad_requests_get_an_openai_error_object_naming_the_problem() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let (_up, http) = start(dir.path());
    let json = Some("application/json");
    let completion = |body: &str| format!(r#"{{"model": "{MODEL}", "prompt": "x", {body}}}"#);
    let chat = |body: &str| format!(r#"{{"model": "{MODEL}", {body}}}"#);
    let huge = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(5 << 20));
    // (path, content type, body, status, param or code expected)
    let table: Vec<(&str, Option<&str>, String, u16, &str)> = vec![
        (
            "/v1/completions",
            json,
            "{\"prompt\": ".into(),
            400,
            "invalid_json",
        ),
        (
            "/v1/completions",
            Some("text/plain"),
            completion("\"max_tokens\": 1"),
            415,
            "unsupported_media_type",
        ),
        (
            "/v1/completions",
            None,
            completion("\"max_tokens\": 1"),
            415,
            "unsupported_media_type",
        ),
        ("/v1/completions", json, huge, 413, "payload_too_large"),
        (
            "/v1/completions",
            json,
            "[1, 2]".into(),
            400,
            "invalid_request",
        ),
        (
            "/v1/completions",
            json,
            r#"{"model": "gpt-4", "prompt": "x"}"#.into(),
            404,
            "model",
        ),
        (
            "/v1/completions",
            json,
            format!(r#"{{"model": "{MODEL}"}}"#),
            400,
            "prompt",
        ),
        (
            "/v1/completions",
            json,
            completion("\"max_tokens\": \"many\""),
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            json,
            completion("\"max_tokens\": -3"),
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            json,
            completion("\"temperature\": 2.5"),
            400,
            "temperature",
        ),
        (
            "/v1/completions",
            json,
            completion("\"top_p\": 1.5"),
            400,
            "top_p",
        ),
        (
            "/v1/completions",
            json,
            completion("\"top_k\": -7"),
            400,
            "top_k",
        ),
        (
            "/v1/completions",
            json,
            completion("\"seed\": -1"),
            400,
            "seed",
        ),
        ("/v1/completions", json, completion("\"n\": 3"), 400, "n"),
        (
            "/v1/completions",
            json,
            completion("\"logprobs\": 50"),
            400,
            "logprobs",
        ),
        (
            "/v1/completions",
            json,
            completion("\"stop\": [\"\"]"),
            400,
            "stop[0]",
        ),
        (
            "/v1/completions",
            json,
            completion("\"echo\": true"),
            400,
            "echo",
        ),
        (
            "/v1/completions",
            json,
            completion("\"presence_penalty\": 1"),
            400,
            "presence_penalty",
        ),
        (
            "/v1/completions",
            json,
            completion("\"stream_options\": {\"include_usage\": true}"),
            400,
            "stream_options",
        ),
        (
            "/v1/completions",
            json,
            format!(r#"{{"model": "{MODEL}", "prompt": ""}}"#),
            400,
            "prompt",
        ),
        (
            "/v1/completions",
            json,
            format!(r#"{{"model": "{MODEL}", "prompt": ["a", "b"]}}"#),
            400,
            "prompt",
        ),
        (
            "/v1/completions",
            json,
            format!(r#"{{"model": "{MODEL}", "prompt": [99999999]}}"#),
            400,
            "invalid_request",
        ),
        (
            "/v1/completions",
            json,
            completion("\"max_tokens\": 100000"),
            400,
            "invalid_request",
        ),
        (
            "/v1/chat/completions",
            json,
            chat("\"messages\": []"),
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            json,
            format!(r#"{{"model": "{MODEL}"}}"#),
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            json,
            chat(r#""messages": [{"content": "hi"}]"#),
            400,
            "messages[0].role",
        ),
        (
            "/v1/chat/completions",
            json,
            chat(r#""messages": [{"role": "user", "content": [{"type": "image_url"}]}]"#),
            400,
            "messages[0].content[0]",
        ),
        (
            "/v1/chat/completions",
            json,
            chat(r#""messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2"#),
            400,
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            json,
            chat(r#""messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0"#),
            400,
            "max_completion_tokens",
        ),
    ];
    for (path, content_type, body, status, expected) in &table {
        let (got, answer) = http::post(&http, path, *content_type, body.as_bytes());
        let shown: String = body.chars().take(80).collect();
        assert_eq!(got, *status, "{path} {shown}: {answer}");
        let error: Value = serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("{path} {shown}: not JSON ({e}): {answer}"));
        let error = &error["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{path} {shown}: no message: {error}"
        );
        assert!(
            error["type"].is_string(),
            "{path} {shown}: no type: {error}"
        );
        assert!(
            error["param"] == *expected || error["code"] == *expected,
            "{path} {shown}: expected param or code {expected}: {error}"
        );
    }
    // Nothing of that hurt the router: it still answers, and lists its model.
    let (status, body) = http::post(
        &http,
        "/v1/completions",
        json,
        completion("\"max_tokens\": 2, \"temperature\": 0").as_bytes(),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = http::get(&http, "/v1/models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(models["data"][0]["id"], MODEL, "{models}");
    let (status, body) = http::get(&http, "/health");
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
}

#[test]
fn a_client_that_goes_away_mid_stream_cancels_its_request() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let (_up, http) = start(dir.path());
    const ASKED: u64 = 240;
    let body = format!(
        r#"{{"model": "{MODEL}", "prompt": [0, 17], "max_tokens": {ASKED}, "temperature": 0, "ignore_eos": true, "stream": true}}"#
    );
    let mut stream = TcpStream::connect(&http).expect("connect");
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: {http}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("request");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !line.starts_with("data: {") {
        line.clear();
        let n = reader.read_line(&mut line).expect("the stream");
        assert!(n > 0, "the stream ended before its first chunk");
    }
    drop(reader);

    // The router counts the request as cancelled, having relayed fewer tokens than asked,
    // and the workers hold no sequence any more.
    let metric = |text: &str, name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = http::get(&http, "/metrics");
        let cancelled = metric(
            &text,
            "moebius_router_requests_total{outcome=\"error\",code=\"CANCELLED\"}",
        );
        let active = metric(&text, "moebius_worker_sequences{");
        if cancelled == 1.0 && active == 0.0 {
            let generated = metric(&text, "moebius_router_generated_tokens_total");
            assert!(
                generated < ASKED as f64,
                "the whole {ASKED} tokens were generated: {generated}"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the request was not cancelled: cancelled {cancelled}, sequences {active}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The share of the words of `text` (runs of letters) found in Debian's English word list.
fn dictionary_share(text: &str) -> (f64, Vec<String>) {
    let list = std::fs::read_to_string("/usr/share/dict/words")
        .expect("/usr/share/dict/words: `bash scripts/test.sh` installs Debian's wamerican");
    let known: std::collections::HashSet<String> = list.lines().map(|w| w.to_lowercase()).collect();
    let words: Vec<String> = text
        .split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let found = words.iter().filter(|w| known.contains(*w)).count();
    (found as f64 / words.len().max(1) as f64, words)
}

#[test]
fn a_newcomers_up_answers_in_english_words() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // What `cargo run --release -- up` serves: the bundled demo model, under its name.
    let up = Up::start_bundled(&[]);
    up.router_addr();
    let http = up.http_addr();
    let json = Some("application/json");
    let (status, body) = http::post(
        &http,
        "/v1/completions",
        json,
        br#"{"model": "demo", "prompt": "The river", "max_tokens": 24, "temperature": 0}"#,
    );
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body).expect("JSON");
    let text = reply["choices"][0]["text"].as_str().expect("text");
    let (share, words) = dictionary_share(text);
    println!("The river{text}");
    assert!(words.len() >= 8, "too few words in {text:?}");
    assert!(
        share >= 0.8,
        "{:.0} % dictionary words in {text:?}",
        share * 100.0
    );

    let (status, body) = http::post(
        &http,
        "/v1/chat/completions",
        json,
        br#"{"model": "demo", "messages": [{"role": "user", "content": "What is a river?"}], "max_tokens": 24, "temperature": 0}"#,
    );
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body).expect("JSON");
    let text = reply["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    println!("chat: {text}");
    let (share, words) = dictionary_share(text);
    assert!(words.len() >= 3, "too few words in {text:?}");
    assert!(
        share >= 0.8,
        "{:.0} % dictionary words in {text:?}",
        share * 100.0
    );
}
