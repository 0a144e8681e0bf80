//! Chat templates: the checkpoint's `chat_template` (in `tokenizer_config.json`) rendered with
//! minijinja the way transformers' `apply_chat_template` renders it: blocks trimmed and
//! left-stripped, `loop_controls`, Python's string methods (`.strip()`, `.split()`, ...), the
//! `raise_exception` and `strftime_now` functions, and the tokenizer's special tokens
//! (`bos_token`, `eos_token`, ...) as variables.

use std::path::Path;

use minijinja::{Environment, ErrorKind, Value};
use serde_json::Value as Json;

use crate::error::{Error, Result};

const TEMPLATE: &str = "chat";

/// The special-token fields of `tokenizer_config.json` that templates read.
const SPECIAL_TOKENS: [&str; 4] = ["bos_token", "eos_token", "unk_token", "pad_token"];

/// A checkpoint's chat template, ready to render.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The special tokens, as template variables.
    tokens: Vec<(&'static str, String)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// The template of `dir/tokenizer_config.json`; `None` when the checkpoint has none.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer_config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(Error::Io { path, source }),
        };
        let config: Json = serde_json::from_str(&text)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Self::from_config(&config).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// The template of a parsed `tokenizer_config.json`: `chat_template` as a string, or a
    /// list of named templates of which `default` is used.
    pub fn from_config(config: &Json) -> Result<Option<Self>> {
        let source = match config.get("chat_template") {
            None | Some(Json::Null) => return Ok(None),
            Some(Json::String(s)) => s.clone(),
            Some(Json::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Json::as_str))
                .ok_or_else(|| {
                    Error::Tokenizer("chat_template lists no template named \"default\"".into())
                })?
                .to_owned(),
            Some(_) => {
                return Err(Error::Tokenizer(
                    "chat_template is neither a string nor a list of named templates".into(),
                ))
            }
        };
        let tokens = SPECIAL_TOKENS
            .iter()
            .filter_map(|&name| special_token(config.get(name)?).map(|t| (name, t)))
            .collect();
        Self::new(source, tokens)
    }

    fn new(source: String, tokens: Vec<(&'static str, String)>) -> Result<Option<Self>> {
        let mut env = Environment::new();
        // What transformers sets on its Jinja environment.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE, source)
            .map_err(|e| Error::Tokenizer(format!("chat_template does not parse: {e:#}")))?;
        Ok(Some(Self { env, tokens }))
    }

    /// Renders `messages` (objects with `role` and `content`, and whatever else the template
    /// reads, e.g. `tool_calls`), ending with the assistant's opening when
    /// `add_generation_prompt`. An error the template raises (say, roles that do not
    /// alternate) is the request's fault: `Error::InvalidRequest`.
    pub fn render(&self, messages: &[Json], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut context: Vec<(&str, Value)> = vec![
            ("messages", Value::from(minijinja::value::Serde(messages))),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ];
        context.extend(
            self.tokens
                .iter()
                .map(|(name, token)| (*name, Value::from(token.as_str()))),
        );
        let context = Value::from_pairs(context);
        template.render(context).map_err(|e| match e.kind() {
            ErrorKind::InvalidOperation => Error::InvalidRequest(format!(
                "messages: the chat template refused them: {}",
                e.detail().unwrap_or("no reason given")
            )),
            _ => Error::InvalidRequest(format!("messages: the chat template failed: {e:#}")),
        })
    }
}

/// A special token of `tokenizer_config.json`: a string, or an AddedToken object.
fn special_token(value: &Json) -> Option<String> {
    match value {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_owned),
        _ => None,
    }
}

/// `raise_exception(message)`, as transformers provides it to templates.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: today's date, which some templates put into the system prompt.
/// Only the common date fields are supported (`%Y`, `%m`, `%d`, `%B`, `%b`, `%%`); time-of-day
/// fields render as `00`.
fn strftime_now(format: String) -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('B') => out.push_str(MONTHS[month as usize - 1]),
            Some('b') => out.push_str(&MONTHS[month as usize - 1][..3]),
            Some('H' | 'M' | 'S') => out.push_str("00"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// The (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::from_config(&json!({
            "chat_template": source,
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
        }))
        .expect("parses")
        .expect("a template")
    }

    #[test]
    fn renders_messages_with_special_tokens_and_python_methods() {
        let t = template(
            "{{ bos_token }}{% for m in messages %}{{ m.role | upper }}: {{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}",
        );
        let messages = [json!({"role": "user", "content": "  hi  "})];
        assert_eq!(
            t.render(&messages, true).unwrap(),
            "<s>USER: hi\nASSISTANT:"
        );
        assert_eq!(t.render(&messages, false).unwrap(), "<s>USER: hi\n");
    }

    #[test]
    fn a_raised_exception_is_the_requests_fault_and_keeps_its_message() {
        let t = template(
            "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with a user message') }}{% endif %}",
        );
        let err = t
            .render(&[json!({"role": "assistant", "content": "x"})], true)
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidRequest(m) if m.contains("Conversation must start with a user message")),
            "{err}"
        );
    }

    #[test]
    fn no_template_and_a_broken_template_are_told_apart() {
        assert!(ChatTemplate::from_config(&json!({"eos_token": "</s>"}))
            .unwrap()
            .is_none());
        let err = ChatTemplate::from_config(&json!({"chat_template": "{% for %}"})).unwrap_err();
        assert!(err.to_string().contains("does not parse"), "{err}");
    }

    #[test]
    fn named_templates_use_the_default_one() {
        let t = ChatTemplate::from_config(&json!({"chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "plain"},
        ]}))
        .unwrap()
        .unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "plain");
    }

    #[test]
    fn civil_dates_are_right() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_427), (2025, 12, 5));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
