//! Entry points of the fuzz targets (`fuzz/`, run with `cargo fuzz`) and of their replay in
//! the tests: each feeds arbitrary bytes to one decoder that meets input from outside — the
//! data plane's wire format, a safetensors header, `config.json`, the messages a chat template
//! renders — and must return without a panic, a hang, or an allocation the bytes do not
//! justify. Errors are the expected outcome for most inputs.

use crate::chat::ChatTemplate;
use crate::config::ModelConfig;

/// The data plane's hello, reply, abort and frame decoders.
pub fn data_plane(bytes: &[u8]) {
    crate::comm::decode_untrusted(bytes);
}

/// A safetensors file's header (and the tensors' offsets and sizes it declares).
pub fn safetensors_header(bytes: &[u8]) {
    let _ = crate::checkpoint::parse_untrusted_header(bytes);
}

/// A checkpoint's `config.json`.
pub fn model_config(bytes: &[u8]) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = ModelConfig::from_json(text);
    }
}

/// The template the `chat_messages` target renders with: `source` with DeepSeek's special
/// tokens.
pub fn chat_template(source: &str) -> ChatTemplate {
    let config = serde_json::json!({
        "chat_template": source,
        "bos_token": "<｜begin▁of▁sentence｜>",
        "eos_token": "<｜end▁of▁sentence｜>",
    });
    ChatTemplate::from_config(&config)
        .expect("the template parses")
        .expect("a template")
}

/// A request's chat messages (JSON, as the router forwards them) rendered by `template`.
pub fn chat_messages(template: &ChatTemplate, bytes: &[u8]) {
    if let Ok(serde_json::Value::Array(messages)) = serde_json::from_slice(bytes) {
        let _ = template.render(&messages, true);
    }
}
