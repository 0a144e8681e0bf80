#![no_main]

use std::sync::OnceLock;

use moebius_worker::chat::ChatTemplate;

/// The repository's DeepSeek-style template: system prompts, tool calls, `</think>` stripping.
const TEMPLATE: &str = include_str!("../../fixtures/chat-templates/deepseek-style.jinja");

fn template() -> &'static ChatTemplate {
    static TEMPLATE_ONCE: OnceLock<ChatTemplate> = OnceLock::new();
    TEMPLATE_ONCE.get_or_init(|| moebius_worker::fuzz::chat_template(TEMPLATE))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| moebius_worker::fuzz::chat_messages(template(), data));
