//! The checkpoint's `tokenizer.json`, through Hugging Face's `tokenizers`.

use std::path::Path;

use crate::error::{Error, Result};

/// Text ⇄ token ids for one model.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
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
        Ok(Some(Self { inner, bos }))
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
