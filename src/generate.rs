//! `moebius generate`: one prompt through an in-process EP group, printed as it is made.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use moebius_worker::backend::{AnyBackend, Device};
use moebius_worker::engine::{
    run_group, GenerateRequest, GroupOptions, LoadedModel, SamplingParams, Transport,
};
use moebius_worker::tokenizer::Tokenizer;
use moebius_worker::Error;
use serde_json::json;

/// Flags of `moebius generate`.
#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct GenerateArgs {
    /// Checkpoint directory (config.json, *.safetensors, optional tokenizer.json).
    #[arg(long, env = "MOEBIUS_MODEL")]
    model: PathBuf,
    /// Prompt text (needs the checkpoint's tokenizer.json).
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids, e.g. 0,15,27.
    #[arg(long)]
    prompt_ids: Option<String>,
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Makes sampling reproducible.
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past the model's EOS tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Report this many alternatives per token (JSON output).
    #[arg(long, default_value_t = 0)]
    top_logprobs: usize,
    /// Number of expert-parallel ranks (threads of this process).
    #[arg(long, default_value_t = 1)]
    ep: usize,
    /// Data plane between the ranks: local (channels) or tcp (loopback sockets).
    #[arg(long, default_value = "local")]
    transport: String,
    /// CPU threads for matrix products (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Round activations to bf16 in prefill-sized products with bf16 weights (AVX512-BF16):
    /// faster prefill, less precise than the default f32 activations.
    #[arg(long)]
    bf16_activations: bool,
    /// Where the products run: cpu, or cuda / cuda:N (GPU N; a moebius built with
    /// `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Print one JSON object instead of the text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let transport: Transport = args.transport.parse()?;
    if args.ep == 0 {
        return Err(Error::InvalidRequest("--ep must be at least 1".into()).into());
    }
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
    };
    sampling.validate()?;
    if args.max_new_tokens == 0 {
        return Err(Error::InvalidRequest("--max-new-tokens must be at least 1".into()).into());
    }

    let backend = AnyBackend::open(args.device, args.threads, args.bf16_activations)?;
    let model = LoadedModel::open_with(&args.model, backend)
        .with_context(|| format!("cannot load the model from {}", args.model.display()))?;
    let tokenizer = Tokenizer::from_dir(&args.model, model.config.bos_token_id)?;
    let prompt = match (&args.prompt, &args.prompt_ids) {
        (Some(text), _) => {
            let Some(tok) = &tokenizer else {
                return Err(Error::InvalidRequest(format!(
                    "{} has no tokenizer.json: pass the prompt as --prompt-ids",
                    args.model.display()
                ))
                .into());
            };
            if text.is_empty() {
                return Err(Error::InvalidRequest("--prompt is empty".into()).into());
            }
            tok.encode(text)?
        }
        (None, Some(ids)) => parse_ids(ids)?,
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    let request = GenerateRequest {
        prompt,
        max_new_tokens: args.max_new_tokens,
        sampling,
        ignore_eos: args.ignore_eos,
        stop_token_ids: Vec::new(),
        top_logprobs: args.top_logprobs,
        generated: Vec::new(),
    };
    let options = GroupOptions {
        ranks: args.ep,
        transport,
        threads: args.threads,
        ..Default::default()
    };

    let mut stdout = std::io::stdout().lock();
    let mut shown = String::new();
    let mut ids = Vec::new();
    let (outputs, report) = run_group(&model, &options, vec![request], |_, event| {
        if args.json {
            return;
        }
        ids.push(event.token);
        // Print what is new in the decoded text; ids when there is no tokenizer.
        let piece = match &tokenizer {
            Some(tok) => match tok.decode(&ids) {
                Ok(text) if text.starts_with(&shown) => {
                    let new = text[shown.len()..].to_string();
                    shown = text;
                    new
                }
                _ => String::new(),
            },
            None => format!("{} ", event.token),
        };
        let _ = write!(stdout, "{piece}");
        let _ = stdout.flush();
    })?;
    tracing::info!(expert_bytes = ?report.expert_bytes, "expert weights per rank");
    let out = outputs.into_iter().next().context("no output")?;
    if args.json {
        let mut obj = json!({
            "token_ids": out.token_ids,
            "logprobs": out.logprobs,
            "finish_reason": out.finish_reason.map(|f| f.as_str()),
            "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.token_ids.len()},
        });
        if args.top_logprobs > 0 {
            obj["top_logprobs"] = json!(out
                .top_logprobs
                .iter()
                .map(|step| step
                    .iter()
                    .map(|(id, lp)| json!([id, lp]))
                    .collect::<Vec<_>>())
                .collect::<Vec<_>>());
        }
        if let Some(tok) = &tokenizer {
            obj["text"] = json!(tok.decode(&out.token_ids)?);
        }
        writeln!(stdout, "{obj}")?;
    } else {
        writeln!(stdout)?;
    }
    Ok(())
}

fn parse_ids(text: &str) -> Result<Vec<u32>> {
    let ids = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>().map_err(|_| {
                Error::InvalidRequest(format!("--prompt-ids: {s:?} is not a token id"))
            })
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if ids.is_empty() {
        return Err(Error::InvalidRequest("--prompt-ids is empty".into()).into());
    }
    Ok(ids)
}
