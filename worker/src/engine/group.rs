//! An EP group whose ranks are threads of this process, joined by the `local` or the `tcp`
//! data plane: what `moebius generate --ep N` and the parity tests run.

use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;

use moebius_coordinator::Placement;

use crate::backend::CpuBackend;
use crate::checkpoint::Checkpoint;
use crate::comm::{local_group, tcp_group_localhost, Communicator};
use crate::config::ModelConfig;
use crate::engine::rank::{RankEngine, RankStats, RunUntil, Submission};
use crate::engine::request::{GenerateOutput, GenerateRequest, TokenEvent};
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
    /// CPU threads for large products (0: all cores).
    pub threads: usize,
    /// Most prompt tokens prefilled per step.
    pub token_budget: usize,
}

impl Default for GroupOptions {
    fn default() -> Self {
        Self {
            ranks: 1,
            transport: Transport::Local,
            threads: 0,
            token_budget: 512,
        }
    }
}

/// A loaded model, ready to form groups over it.
pub struct LoadedModel {
    pub config: ModelConfig,
    pub checkpoint: Arc<Checkpoint>,
    pub shared: Arc<SharedWeights<CpuBackend>>,
}

impl LoadedModel {
    /// Opens `dir` and loads the replicated weights once.
    pub fn open(dir: &Path, threads: usize) -> Result<Self> {
        Self::open_with(dir, CpuBackend::new(threads))
    }

    /// Opens `dir` on a configured backend.
    pub fn open_with(dir: &Path, backend: CpuBackend) -> Result<Self> {
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
            Arc::new(backend),
        )?);
        Ok(Self {
            config,
            checkpoint: Arc::new(checkpoint),
            shared,
        })
    }

    /// Builds the `ranks` models of an even placement, each with its own experts.
    pub fn rank_models(&self, ranks: usize) -> Result<Vec<Model<CpuBackend>>> {
        let placement = Placement::even(self.config.n_routed_experts.max(1), ranks)?;
        (0..ranks)
            .map(|r| Model::new(self.shared.clone(), &self.checkpoint, &placement, r))
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
/// experts. `on_token(request index, event)` sees every token as it is made.
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
    let models = model.rank_models(options.ranks)?;
    let expert_bytes = models
        .iter()
        .map(|m| m.experts.bytes(&*model.shared.backend))
        .collect();

    let (inbox_tx, inbox_rx) = mpsc::channel();
    let mut inbox_rx = Some(inbox_rx);
    let mut streams = Vec::with_capacity(requests.len());
    for request in &requests {
        let (tx, rx) = mpsc::channel();
        inbox_tx
            .send(Submission {
                request: request.clone(),
                events: tx,
            })
            .map_err(|_| Error::Comm("rank 0 is gone".into()))?;
        streams.push(rx);
    }
    drop(inbox_tx);
    let (events_tx, events_rx) = mpsc::channel();

    let budget = options.token_budget;
    let results = thread::scope(|scope| {
        let handles: Vec<_> = models
            .into_iter()
            .zip(comms)
            .enumerate()
            .map(|(rank, (model, comm))| {
                // Rank 0 takes the requests; the others get a closed inbox.
                let inbox = if rank == 0 { inbox_rx.take() } else { None };
                thread::Builder::new()
                    .name(format!("rank-{rank}"))
                    .spawn_scoped(scope, move || -> Result<RankStats> {
                        let mut engine = RankEngine::new(model, comm, budget);
                        let inbox = inbox.unwrap_or_else(|| mpsc::channel().1);
                        engine.run(&inbox, RunUntil::GroupIdle)?;
                        Ok(engine.stats().clone())
                    })
                    .map_err(|e| Error::Comm(format!("cannot start rank thread: {e}")))
            })
            .collect::<Result<_>>()?;
        // Fan the per-request streams into one channel, tagged by request index.
        for (i, rx) in streams.into_iter().enumerate() {
            let events_tx = events_tx.clone();
            scope.spawn(move || {
                for e in rx {
                    if events_tx.send((i, e)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(events_tx);
        let mut outputs = vec![GenerateOutput::default(); requests.len()];
        for (i, r) in requests.iter().enumerate() {
            outputs[i].prompt_tokens = r.prompt.len();
        }
        let mut failed = None;
        for (i, event) in events_rx.iter() {
            match event {
                Ok(event) => {
                    on_token(i, &event);
                    outputs[i].push(event);
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        let stats = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Comm("a rank thread panicked".into())))
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(e) = failed {
            return Err(e);
        }
        Ok::<_, Error>((outputs, stats))
    })?;
    let (outputs, stats) = results;
    Ok((
        outputs,
        GroupReport {
            stats,
            expert_bytes,
        },
    ))
}
