//! The checkpoint's `tokenizer.json`, through Hugging Face's `tokenizers`, with its chat
//! template (`tokenizer_config.json`).

use std::path::Path;

use crate::chat::ChatTemplate;
use crate::error::{Error, Result};

/// Text ⇄ token ids for one model, and conversations → token ids.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    /// The chat template, or why chat requests cannot be served.
    chat: std::result::Result<ChatTemplate, String>,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`, or `None` when the checkpoint has none.
    pub fn from_dir(dir: &Path, bos: Option<u32>) -> Result<Option<Self>> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Ok(None);
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        // A broken template costs chat requests only; text and token prompts still work.
        let chat = match ChatTemplate::from_dir(dir) {
            Ok(Some(template)) => Ok(template),
            Ok(None) => Err(
                "this model has no chat_template in tokenizer_config.json; send \
                             prompt.text with the conversation already formatted"
                    .to_owned(),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "the chat template cannot be used");
                Err(format!("the model's chat template cannot be used: {e}"))
            }
        };
        Ok(Some(Self { inner, bos, chat }))
    }

    /// Token ids of a conversation: the chat template's text, ending with the assistant's
    /// opening, tokenised as transformers' `apply_chat_template` does (no special tokens
    /// added: the template writes them).
    pub fn encode_chat(&self, messages: &[serde_json::Value]) -> Result<Vec<u32>> {
        let template = self
            .chat
            .as_ref()
            .map_err(|e| Error::InvalidRequest(format!("prompt.chat: {e}")))?;
        let text = template.render(messages, true)?;
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of one token, special tokens included (for logprobs).
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// Encodes a prompt the way the model was trained to see one: the BOS token first (when the
    /// model has one and the tokenizer's own post-processor did not add it), then the text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = encoding.get_ids().to_vec();
        if let Some(bos) = self.bos {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Decodes ids to text, leaving out special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }
}
