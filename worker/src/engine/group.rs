//! An EP group whose ranks are engine threads of this process, joined by the `local` or the
//! `tcp` data plane: what `moebius generate --ep N` and the parity tests run.

use std::path::Path;
use std::sync::Arc;

use moebius_coordinator::Placement;

use crate::backend::{AnyBackend, CpuBackend};
use crate::checkpoint::Checkpoint;
use crate::comm::{local_group, tcp_group_localhost, Communicator};
use crate::config::ModelConfig;
use crate::engine::rank::{RankStats, Tagged};
use crate::engine::request::{GenerateOutput, GenerateRequest, TokenEvent};
use crate::engine::thread::{EngineHandle, EngineOptions, Installation, OnGroupFailure};
use crate::error::{Error, Result};
use crate::model::{Model, SharedWeights};

/// Which data plane joins the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Local,
    Tcp,
}

impl std::str::FromStr for Transport {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "local" => Ok(Transport::Local),
            "tcp" => Ok(Transport::Tcp),
            other => Err(Error::InvalidRequest(format!(
                "transport {other:?} is unknown (local, tcp)"
            ))),
        }
    }
}

/// How to build the group.
#[derive(Debug, Clone)]
pub struct GroupOptions {
    /// Number of EP ranks (>= 1, at most the number of routed experts).
    pub ranks: usize,
    pub transport: Transport,
    /// CPU threads of the process for products (0: all cores), shared out over the ranks.
    pub threads: usize,
    /// Most prompt tokens prefilled per step.
    pub token_budget: usize,
    /// Most tokens each rank's KV caches hold; `None`: what the device's memory allows.
    pub kv_cache_tokens: Option<usize>,
    /// The expert slots of each rank; the even placement over `ranks` when `None`.
    pub placement: Option<Placement>,
}

impl Default for GroupOptions {
    fn default() -> Self {
        Self {
            ranks: 1,
            transport: Transport::Local,
            threads: 0,
            token_budget: 512,
            kv_cache_tokens: None,
            placement: None,
        }
    }
}

/// A loaded model, ready to form groups over it.
pub struct LoadedModel {
    pub config: ModelConfig,
    pub checkpoint: Arc<Checkpoint>,
    pub shared: Arc<SharedWeights<AnyBackend>>,
}

impl LoadedModel {
    /// Opens `dir` and loads the replicated weights once.
    pub fn open(dir: &Path, threads: usize) -> Result<Self> {
        Self::open_with(dir, CpuBackend::new(threads))
    }

    /// Opens `dir` on a configured backend.
    pub fn open_with(dir: &Path, backend: impl Into<AnyBackend>) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
            });
        }
        let config = ModelConfig::from_dir(dir)?;
        let mut checkpoint = Checkpoint::open(dir)?;
        if let Some([r, c]) = config.fp8_block {
            checkpoint.set_fp8_block(r, c);
        }
        let shared = Arc::new(SharedWeights::load(
            &checkpoint,
            &config,
            Arc::new(backend.into()),
        )?);
        Ok(Self {
            config,
            checkpoint: Arc::new(checkpoint),
            shared,
        })
    }

    /// Builds the `ranks` models of an even placement, each with its own experts.
    pub fn rank_models(&self, ranks: usize) -> Result<Vec<Model<AnyBackend>>> {
        let placement = Placement::even(self.config.n_routed_experts.max(1), ranks)?;
        self.models_of(&placement)
    }

    /// Builds one model per rank of `placement`, each with its own experts.
    pub fn models_of(&self, placement: &Placement) -> Result<Vec<Model<AnyBackend>>> {
        (0..placement.num_ranks())
            .map(|r| Model::new(self.shared.clone(), &self.checkpoint, placement, r))
            .collect()
    }
}

/// What one run of a group did, per rank.
#[derive(Debug, Clone, Default)]
pub struct GroupReport {
    pub stats: Vec<RankStats>,
    /// Bytes of routed-expert weights each rank loaded.
    pub expert_bytes: Vec<usize>,
}

/// Runs `requests` to completion on rank 0 of a fresh group; the other ranks only serve their
/// experts. Every rank is an engine thread running the same loop as a worker's.
/// `on_token(request index, event)` sees every token as it is made.
pub fn run_group(
    model: &LoadedModel,
    options: &GroupOptions,
    requests: Vec<GenerateRequest>,
    mut on_token: impl FnMut(usize, &TokenEvent),
) -> Result<(Vec<GenerateOutput>, GroupReport)> {
    if options.ranks == 0 {
        return Err(Error::InvalidRequest("--ep must be at least 1".into()));
    }
    let experts = model.config.n_routed_experts;
    if model.config.has_moe_layers() && options.ranks > experts {
        return Err(Error::InvalidRequest(format!(
            "--ep {} is more ranks than the model's {experts} routed experts",
            options.ranks
        )));
    }
    for r in &requests {
        r.validate(&model.config)?;
    }
    let comms: Vec<Box<dyn Communicator>> = match options.transport {
        Transport::Local => local_group(options.ranks)
            .into_iter()
            .map(|c| Box::new(c) as _)
            .collect(),
        Transport::Tcp => tcp_group_localhost(options.ranks)?
            .into_iter()
            .map(|c| Box::new(c) as _)
            .collect(),
    };
    let models = match &options.placement {
        Some(p) if p.num_ranks() != options.ranks => {
            return Err(Error::InvalidRequest(format!(
                "the placement has {} ranks, the group {}",
                p.num_ranks(),
                options.ranks
            )))
        }
        Some(p) => model.models_of(p)?,
        None => model.rank_models(options.ranks)?,
    };
    let expert_bytes = models
        .iter()
        .map(|m| m.experts.bytes(&*model.shared.backend))
        .collect();
    let engine_options = EngineOptions {
        token_budget: options.token_budget,
        kv_cache_tokens: options.kv_cache_tokens,
        on_group_failure: OnGroupFailure::Fail,
        metrics: None,
        threads: threads_per_rank(options.threads, options.ranks),
    };
    let engines = (0..options.ranks)
        .map(|_| EngineHandle::spawn(engine_options.clone()))
        .collect::<Result<Vec<_>>>()?;
    for (rank, ((engine, model), comm)) in engines.iter().zip(models).zip(comms).enumerate() {
        // Commands are handled in order, so the requests below find the model installed.
        drop(engine.install(Installation {
            epoch: 1,
            rank,
            model,
            comm,
            reload: Default::default(),
        }));
        engine.resume(1)?;
    }

    let (tx, rx) = std::sync::mpsc::channel();
    let mut outputs = vec![GenerateOutput::default(); requests.len()];
    for (index, request) in requests.into_iter().enumerate() {
        outputs[index].prompt_tokens = request.prompt.len();
        let sink = Tagged {
            index,
            tx: tx.clone(),
        };
        engines[0].submit(request, Box::new(sink))?;
    }
    drop(tx);
    // Ends when every sequence has ended: the engine drops a sequence's sink with it.
    let mut failed = None;
    for (index, event) in rx {
        match event {
            Ok(event) => {
                on_token(index, &event);
                outputs[index].push(event);
            }
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    let stats = engines
        .iter()
        .map(|engine| {
            engine.stop();
            engine.status().borrow().stats.clone()
        })
        .collect();
    if let Some(e) = failed {
        return Err(e);
    }
    Ok((
        outputs,
        GroupReport {
            stats,
            expert_bytes,
        },
    ))
}

/// The threads each of `ranks` engine threads of one process gets when the process has
/// `threads` (0: one per core): the cores are shared out, at least one each.
fn threads_per_rank(threads: usize, ranks: usize) -> usize {
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    (threads / ranks.max(1)).max(1)
}
