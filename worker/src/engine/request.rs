//! A generation request, its validation, and what comes back.

use crate::config::ModelConfig;
use crate::engine::sampling::SamplingParams;
use crate::error::{Error, Result};

/// What a client asks the engine to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Keep generating past the model's EOS tokens.
    pub ignore_eos: bool,
    /// Extra token ids that end the sequence (finish reason `stop`).
    pub stop_token_ids: Vec<u32>,
    /// How many alternatives to report per generated token (0: none).
    pub top_logprobs: usize,
    /// Tokens an earlier attempt already generated and delivered (a request resubmitted after
    /// its worker was lost): they are fed after the prompt, count toward `max_new_tokens`, and
    /// sampling goes on at draw number `generated.len()`; only new tokens are streamed.
    pub generated: Vec<u32>,
}

impl GenerateRequest {
    /// A greedy request for `max_new_tokens` tokens after `prompt`.
    pub fn greedy(prompt: Vec<u32>, max_new_tokens: usize) -> Self {
        Self {
            prompt,
            max_new_tokens,
            sampling: SamplingParams::default(),
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            top_logprobs: 0,
            generated: Vec::new(),
        }
    }

    /// Checks the request against the model, naming the field that is wrong. A request that
    /// passes cannot fail a step.
    pub fn validate(&self, config: &ModelConfig) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidRequest(m));
        if self.prompt.is_empty() {
            return bad("prompt is empty".into());
        }
        if let Some(&id) = self
            .prompt
            .iter()
            .find(|&&t| t as usize >= config.vocab_size)
        {
            return bad(format!(
                "prompt token id {id} is outside the vocabulary (size {})",
                config.vocab_size
            ));
        }
        if self.prompt.len() >= config.max_position_embeddings {
            return bad(format!(
                "prompt of {} tokens leaves no room to generate within the model's maximum of {} positions",
                self.prompt.len(),
                config.max_position_embeddings
            ));
        }
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens must be at least 1".into());
        }
        if let Some(&id) = self
            .generated
            .iter()
            .find(|&&t| t as usize >= config.vocab_size)
        {
            return bad(format!(
                "generated token id {id} is outside the vocabulary (size {})",
                config.vocab_size
            ));
        }
        if self.generated.len() >= self.max_new_tokens {
            return bad(format!(
                "{} tokens were generated already, which leaves nothing of max_new_tokens {}",
                self.generated.len(),
                self.max_new_tokens
            ));
        }
        if self.prompt.len() + self.generated.len() >= config.max_position_embeddings {
            return bad(format!(
                "prompt and generated tokens ({} + {}) leave no room within the model's maximum \
                 of {} positions",
                self.prompt.len(),
                self.generated.len(),
                config.max_position_embeddings
            ));
        }
        if let Some(&id) = self
            .stop_token_ids
            .iter()
            .find(|&&t| t as usize >= config.vocab_size)
        {
            return bad(format!(
                "stop token id {id} is outside the vocabulary (size {})",
                config.vocab_size
            ));
        }
        if self.top_logprobs > config.vocab_size {
            return bad(format!(
                "top_logprobs {} exceeds the vocabulary size {}",
                self.top_logprobs, config.vocab_size
            ));
        }
        self.sampling.validate()
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` reached, or the model's maximum positions.
    Length,
    /// The model produced one of its EOS tokens.
    Eos,
    /// One of the request's stop tokens.
    Stop,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
        }
    }
}

/// One generated token as it is streamed.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub token: u32,
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
    /// Set on the sequence's last token.
    pub finish: Option<FinishReason>,
}

/// The whole result of a request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerateOutput {
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    pub finish_reason: Option<FinishReason>,
    pub prompt_tokens: usize,
}

impl GenerateOutput {
    /// Appends one streamed token.
    pub fn push(&mut self, event: TokenEvent) {
        self.token_ids.push(event.token);
        self.logprobs.push(event.logprob);
        self.top_logprobs.push(event.top_logprobs);
        if event.finish.is_some() {
            self.finish_reason = event.finish;
        }
    }
}
