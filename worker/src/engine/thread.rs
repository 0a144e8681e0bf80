//! The engine thread: the one lock-step loop that every rank runs — in `moebius generate`, the
//! engine benchmark, the parity tests and the worker's service alike. One std thread owns the
//! rank's [`RankEngine`] and its communicator, fed by [`Command`]s through an [`EngineHandle`].
//!
//! States: *detached* (no model: not in an epoch), *paused* (a model and the sequences, not
//! stepping: an epoch change is under way, or the group failed and the rank waits for the next
//! epoch) and *running*. Each iteration of a running rank is one agreement of the group (a
//! collective: is anyone busy, does anyone want to pause) and, when someone is busy, one step;
//! so every rank steps the same number of times and stops after the same step. An idle rank
//! does not poll: it sleeps on a [`Doorbell`] that its commands and its peers' messages ring,
//! and enters the next agreement only when it has work or a peer has entered it.
//!
//! When a collective fails (a peer died, hung, or closed its connection) the rank leaves the
//! group at once: it drops its communicator (which tells the peers whom it blames), keeps its
//! sequences with their KV caches as they were before the failed step, publishes the failure,
//! and waits for the next epoch ([`OnGroupFailure::Keep`]); or ends every sequence with the
//! error, when nobody will form a next epoch ([`OnGroupFailure::Fail`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use crate::backend::AnyBackend;
use crate::comm::{Communicator, Doorbell, Interrupt};
use crate::engine::kv_budget::{KvBudget, BLOCK_TOKENS};
use crate::engine::rank::{EventSink, RankEngine, RankStats, Submission};
use crate::engine::request::GenerateRequest;
use crate::error::{Error, Result};
use crate::metrics::WorkerMetrics;
use crate::model::{ExpertReload, Model};

/// Longest an idle or paused rank sleeps before it looks at its cancelled sequences again.
const IDLE_WAIT: Duration = Duration::from_millis(50);

/// What the engine thread is doing, as the gRPC side and the health check see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// No model: requests are refused.
    #[default]
    Detached,
    /// A model and sequences, not stepping (an epoch change is under way, or the group failed
    /// and the next epoch is being formed); requests wait.
    Paused,
    /// Stepping in lock-step with the group.
    Running,
}

/// The last failure of this rank's group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupFailure {
    /// The epoch whose group failed.
    pub epoch: u64,
    /// The ranks the failure is blamed on (empty when no culprit could be told).
    pub ranks: Vec<usize>,
    pub message: String,
    /// Failures of this engine so far, so that two failures in a row are told apart.
    pub count: u64,
}

/// Counters and placement of the engine, published after every iteration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStatus {
    pub phase: Phase,
    /// Epoch of the installed model and data plane; 0 before the first.
    pub epoch: u64,
    pub rank: u32,
    /// Sequences the rank holds (prefilling or decoding).
    pub active: usize,
    /// Summed over every engine this thread has had (a detach starts a new one).
    pub stats: RankStats,
    /// The logical expert of each slot, per MoE layer.
    pub expert_slots: Arc<Vec<Vec<u32>>>,
    pub expert_bytes: u64,
    /// How the installed epoch's experts were obtained (read, or kept from the epoch before).
    pub reload: ExpertReload,
    /// Set when the group failed, until the next installation.
    pub failure: Option<GroupFailure>,
}

/// What the loop does to its sequences when its group fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnGroupFailure {
    /// Keep them, with their caches, for the next epoch (a worker under a coordinator).
    Keep,
    /// End them with the error (a group nobody re-forms: `run_group`, benchmarks).
    Fail,
}

/// How an engine thread runs.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Most prompt tokens prefilled per step.
    pub token_budget: usize,
    /// Most tokens the rank's KV caches hold; `None`: what the device's memory allows
    /// ([`KvBudget::for_model`]).
    pub kv_cache_tokens: Option<usize>,
    pub on_group_failure: OnGroupFailure,
    /// Where the steps, sequences and epoch switches are counted, if anywhere.
    pub metrics: Option<WorkerMetrics>,
    /// Threads of this rank's products, the engine thread among them (0: one per core).
    pub threads: usize,
}

/// One epoch's model and data plane for this rank.
pub struct Installation {
    pub epoch: u64,
    pub rank: usize,
    pub model: Model<AnyBackend>,
    pub comm: Box<dyn Communicator>,
    pub reload: ExpertReload,
}

/// Messages to the engine thread.
enum Command {
    Submit(Submission),
    /// Swap in a new epoch's model and data plane; only while not running.
    Install(Box<Installation>, oneshot::Sender<Result<()>>),
    /// Step again in `epoch` (ignored unless that epoch is installed).
    Resume(u64),
    /// Stop stepping after the current step, agreed with the group; answered when paused.
    Pause(oneshot::Sender<()>),
    /// Leave the group now, without agreeing (the group lost a member); keep the sequences.
    Abandon(oneshot::Sender<()>),
    /// Leave the group now, end every sequence with UNAVAILABLE `reason`, drop the model.
    Detach(String, oneshot::Sender<()>),
    Stop,
}

/// An answer the engine thread will give.
pub struct Reply<T>(oneshot::Receiver<T>);

impl<T> Reply<T> {
    /// Waits for the answer; fails when the engine thread stopped first.
    pub async fn wait(self) -> Result<T> {
        self.0.await.map_err(|_| stopped())
    }
}

fn stopped() -> Error {
    Error::Unavailable("the engine thread has stopped".into())
}

/// Runs `body`, an engine loop, on a thread pool of its own with `threads` threads (0: one per
/// core), so that the products a step splits over the cores are handed to threads that are
/// already awake in the same pool: from outside a pool each split is a cold wake-up through
/// the global pool's queue, about 70 per decode step. The pool is the rank's own because the
/// loop blocks inside it on its peers: a thread of a shared pool, waiting for a stolen half,
/// could pick up another rank's step and never return to its own.
fn in_own_pool(threads: usize, body: impl FnOnce() + Send) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("moebius-rank-{i}"))
        .build();
    match pool {
        Ok(pool) => pool.install(body),
        Err(e) => {
            tracing::warn!(error = %e, "no thread pool for the engine; products use the global one");
            body()
        }
    }
}

/// What the handle and the thread share to leave a group at once.
#[derive(Default)]
struct Leaving {
    /// Ends the collective the thread may be blocked in, for the installed data plane.
    interrupt: Mutex<Option<Interrupt>>,
    /// Set while the rank leaves its group on purpose: the failure that causes is not the
    /// group's and is not reported.
    now: AtomicBool,
}

impl Leaving {
    /// Makes a collective in progress fail now, so that a command to leave is taken at once.
    fn start(&self) {
        self.now.store(true, Ordering::SeqCst);
        if let Some(interrupt) = self
            .interrupt
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            interrupt.fire();
        }
    }
}

/// The handle the rest of the worker holds; the thread ends when [`EngineHandle::stop`] is
/// called or the handle is dropped.
pub struct EngineHandle {
    commands: Sender<Command>,
    leaving: Arc<Leaving>,
    bell: Doorbell,
    status: watch::Receiver<EngineStatus>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl EngineHandle {
    /// Starts the thread, detached (no epoch yet).
    pub fn spawn(options: EngineOptions) -> Result<Self> {
        let (commands, inbox) = mpsc::channel();
        let (status_tx, status) = watch::channel(EngineStatus::default());
        let bell = Doorbell::default();
        let leaving = Arc::new(Leaving::default());
        let threads = options.threads;
        let engine_loop = EngineLoop::new(inbox, bell.clone(), status_tx, options, leaving.clone());
        let thread = std::thread::Builder::new()
            .name("moebius-engine".into())
            .spawn(move || in_own_pool(threads, move || engine_loop.run()))
            .map_err(|e| Error::Serve(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            commands,
            leaving,
            bell,
            status,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// The engine's published status.
    pub fn status(&self) -> watch::Receiver<EngineStatus> {
        self.status.clone()
    }

    fn send(&self, command: Command) -> Result<()> {
        self.commands.send(command).map_err(|_| stopped())?;
        self.bell.ring();
        Ok(())
    }

    fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Reply<T> {
        let (tx, rx) = oneshot::channel();
        // A thread that has stopped drops `tx`, and the reply says so.
        let _ = self.send(command(tx));
        Reply(rx)
    }

    /// Hands a request to the engine; it is checked there, and its tokens (or the error that
    /// ends it) go to `events`.
    pub fn submit(&self, request: GenerateRequest, events: Box<dyn EventSink>) -> Result<()> {
        self.send(Command::Submit(Submission { request, events }))
    }

    /// Installs a new epoch's model and data plane (pause or abandon first); the sequences
    /// stay.
    pub fn install(&self, installation: Installation) -> Reply<Result<()>> {
        self.ask(|tx| Command::Install(Box::new(installation), tx))
    }

    /// Lets the group step again in `epoch`.
    pub fn resume(&self, epoch: u64) -> Result<()> {
        self.send(Command::Resume(epoch))
    }

    /// Stops the group stepping after its current step; answered once this rank has stopped.
    pub fn pause(&self) -> Reply<()> {
        self.ask(Command::Pause)
    }

    /// Leaves the group now, without agreeing (it lost a member), also from the middle of a
    /// collective that waits for a peer that will not come; the sequences stay.
    pub fn abandon(&self) -> Reply<()> {
        self.leaving.start();
        self.ask(Command::Abandon)
    }

    /// Leaves the group now and ends every sequence with UNAVAILABLE `reason`.
    pub fn detach(&self, reason: String) -> Reply<()> {
        self.leaving.start();
        self.ask(|tx| Command::Detach(reason, tx))
    }

    /// Asks the thread to fail every sequence and end, without waiting for it.
    pub fn request_stop(&self) {
        // A thread that already ended has nothing to stop.
        let _ = self.send(Command::Stop);
    }

    /// Fails every sequence and ends the thread; blocks until it has ended (at most one step
    /// or one data-plane timeout), so call it from a blocking context.
    pub fn stop(&self) {
        self.request_stop();
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("the engine thread panicked");
            }
        }
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        self.request_stop();
    }
}

struct EngineLoop {
    inbox: Receiver<Command>,
    leaving: Arc<Leaving>,
    bell: Doorbell,
    status: watch::Sender<EngineStatus>,
    options: EngineOptions,
    engine: Option<RankEngine<AnyBackend>>,
    comm: Option<Box<dyn Communicator>>,
    epoch: u64,
    rank: usize,
    expert_slots: Arc<Vec<Vec<u32>>>,
    /// Bytes of the installed experts, counted once per installation.
    expert_bytes: u64,
    reload: ExpertReload,
    running: bool,
    /// Stats of engines that were dropped (after a detach), so counters never go back.
    past: RankStats,
    /// Answered when the group has paused.
    pause_waiters: Vec<oneshot::Sender<()>>,
    failure: Option<GroupFailure>,
    failures: u64,
    stopping: bool,
    /// When a running group last stopped stepping (a pause for an epoch change, a failure).
    stopped_at: Option<Instant>,
}

impl EngineLoop {
    fn new(
        inbox: Receiver<Command>,
        bell: Doorbell,
        status: watch::Sender<EngineStatus>,
        options: EngineOptions,
        leaving: Arc<Leaving>,
    ) -> Self {
        Self {
            inbox,
            leaving,
            bell,
            status,
            options,
            engine: None,
            comm: None,
            epoch: 0,
            rank: 0,
            expert_slots: Arc::default(),
            expert_bytes: 0,
            reload: ExpertReload::default(),
            running: false,
            past: RankStats::default(),
            pause_waiters: Vec::new(),
            failure: None,
            failures: 0,
            stopping: false,
            stopped_at: None,
        }
    }

    fn run(mut self) {
        while !self.stopping {
            self.drain_commands();
            if self.stopping {
                break;
            }
            if let Some(engine) = &mut self.engine {
                engine.drop_cancelled();
            }
            if self.running {
                self.iterate();
            } else {
                self.bell.wait(IDLE_WAIT);
            }
            self.publish();
        }
        let sequences = self.engine.as_ref().map_or(0, RankEngine::active);
        self.comm = None;
        self.drop_engine("the worker is shutting down");
        self.running = false;
        self.publish();
        tracing::info!(sequences, "engine thread stopped");
    }

    /// One agreement of the group and, when anyone is busy, one step.
    fn iterate(&mut self) {
        let (Some(engine), Some(comm)) = (&mut self.engine, &mut self.comm) else {
            self.running = false;
            return;
        };
        let pause = !self.pause_waiters.is_empty();
        let busy = engine.active() > 0;
        if !busy && !pause && !comm.has_incoming() {
            // Idle: sleep until there is work or a peer enters the next agreement.
            self.bell.wait(IDLE_WAIT);
            return;
        }
        let metrics = self.options.metrics.as_ref();
        let agreed = agree(&mut **comm, busy, pause).and_then(|(busy, pause)| {
            if busy && !pause {
                let (before, started) = (engine.stats().clone(), Instant::now());
                engine.step(&mut **comm)?;
                if let Some(m) = metrics {
                    observe_step(m, &before, engine.stats(), started);
                }
            }
            Ok(pause)
        });
        match agreed {
            Err(e) => self.group_failed(e),
            Ok(true) => self.paused(),
            Ok(false) => {}
        }
    }

    fn drain_commands(&mut self) {
        loop {
            match self.inbox.try_recv() {
                Ok(command) => self.handle(command),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.stopping = true;
                    return;
                }
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Submit(mut submission) => match &mut self.engine {
                Some(engine) => engine.submit(submission),
                None => {
                    submission.events.send(Err(not_in_epoch()));
                }
            },
            Command::Install(installation, ack) => {
                let _ = ack.send(self.install(*installation));
            }
            Command::Resume(epoch) => {
                if self.engine.is_some() && self.comm.is_some() && epoch == self.epoch {
                    if !self.running {
                        tracing::info!(epoch, rank = self.rank, "stepping in the epoch");
                        if let (Some(m), Some(at)) = (&self.options.metrics, self.stopped_at) {
                            m.epoch_switch_pause.observe(at.elapsed().as_secs_f64());
                        }
                        self.stopped_at = None;
                    }
                    self.running = true;
                } else {
                    tracing::warn!(
                        epoch,
                        installed = self.epoch,
                        "resume for an epoch that is not installed; ignored"
                    );
                }
            }
            Command::Pause(ack) => {
                if self.running {
                    self.pause_waiters.push(ack);
                } else {
                    let _ = ack.send(());
                }
            }
            Command::Abandon(ack) => {
                self.leave_group();
                let _ = ack.send(());
            }
            Command::Detach(reason, ack) => {
                self.leave_group();
                self.drop_engine(&reason);
                let _ = ack.send(());
            }
            Command::Stop => self.stopping = true,
        }
    }

    fn install(&mut self, installation: Installation) -> Result<()> {
        if self.running {
            return Err(Error::Comm(
                "cannot install a new epoch while the group is stepping; pause first".into(),
            ));
        }
        let Installation {
            epoch,
            rank,
            model,
            mut comm,
            reload,
        } = installation;
        let expert_slots = model
            .experts
            .slots()
            .into_iter()
            .map(|l| l.into_iter().map(|e| e as u32).collect())
            .collect();
        match &mut self.engine {
            Some(engine) => engine.reconfigure(model)?,
            None => {
                let kv_budget = KvBudget::for_model(&model, self.options.kv_cache_tokens);
                if let Some(m) = &self.options.metrics {
                    m.kv_cache_capacity_tokens
                        .set(kv_budget.capacity_tokens() as i64);
                }
                tracing::info!(
                    tokens = kv_budget.capacity_tokens(),
                    "KV cache budget of this rank"
                );
                self.engine = Some(RankEngine::new(model, self.options.token_budget, kv_budget))
            }
        }
        comm.set_doorbell(self.bell.clone());
        *self
            .leaving
            .interrupt
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(comm.interrupt());
        self.expert_bytes = model_expert_bytes(self.engine.as_ref());
        self.comm = Some(comm);
        self.epoch = epoch;
        self.rank = rank;
        self.expert_slots = Arc::new(expert_slots);
        self.reload = reload;
        self.failure = None;
        if let Some(m) = &self.options.metrics {
            m.epoch.set(epoch as i64);
            m.rank.set(rank as i64);
        }
        self.publish();
        Ok(())
    }

    /// Stops stepping and drops the data plane (the peers see it close); sequences stay.
    fn leave_group(&mut self) {
        self.comm = None;
        self.leaving.now.store(false, Ordering::SeqCst);
        self.paused();
    }

    /// The group stopped stepping: answer whoever asked for a pause.
    fn paused(&mut self) {
        if self.running {
            self.stopped_at = Some(Instant::now());
        }
        self.running = false;
        for ack in self.pause_waiters.drain(..) {
            let _ = ack.send(());
        }
    }

    fn drop_engine(&mut self, reason: &str) {
        if let Some(mut engine) = self.engine.take() {
            engine.fail_all(|| Error::Unavailable(reason.to_string()));
            self.past.add(engine.stats());
        }
        self.expert_slots = Arc::default();
        self.expert_bytes = 0;
    }

    /// A collective failed: leave the group, keep (or fail) the sequences, publish why.
    fn group_failed(&mut self, error: Error) {
        if self.leaving.now.load(Ordering::SeqCst) {
            // This rank is leaving on purpose (the command follows); its group did not fail.
            tracing::info!(
                epoch = self.epoch,
                rank = self.rank,
                "left the group mid-collective"
            );
            self.leave_group();
            return;
        }
        let ranks = match &error {
            Error::PeerFailed { peers, .. } => peers.clone(),
            _ => Vec::new(),
        };
        tracing::warn!(epoch = self.epoch, rank = self.rank, blamed = ?ranks, %error,
            "EP group failed; leaving it");
        self.failures += 1;
        if let Some(m) = &self.options.metrics {
            m.collective_failures.inc();
        }
        self.failure = Some(GroupFailure {
            epoch: self.epoch,
            ranks,
            message: error.to_string(),
            count: self.failures,
        });
        if self.options.on_group_failure == OnGroupFailure::Fail {
            let reason = format!("the EP group of epoch {} failed ({error})", self.epoch);
            if let Some(engine) = &mut self.engine {
                engine.fail_all(|| Error::Unavailable(reason.clone()));
            }
        }
        self.leave_group();
    }

    fn publish(&self) {
        let mut stats = self.past.clone();
        if let Some(engine) = &self.engine {
            stats.add(engine.stats());
        }
        let next = EngineStatus {
            phase: match (&self.engine, self.running) {
                (None, _) => Phase::Detached,
                (Some(_), false) => Phase::Paused,
                (Some(_), true) => Phase::Running,
            },
            epoch: self.epoch,
            rank: self.rank as u32,
            active: self.engine.as_ref().map_or(0, RankEngine::active),
            stats,
            expert_slots: self.expert_slots.clone(),
            expert_bytes: self.expert_bytes,
            reload: self.reload,
            failure: self.failure.clone(),
        };
        if let Some(m) = &self.options.metrics {
            let engine = self.engine.as_ref();
            let queued = engine.map_or(0, RankEngine::queued);
            m.active.set((next.active - queued) as i64);
            m.queued.set(queued as i64);
            m.kv_cache_bytes
                .set(engine.map_or(0, RankEngine::kv_cache_bytes) as i64);
            m.kv_cache_used_tokens
                .set(engine.map_or(0, |e| e.kv_blocks_used() * BLOCK_TOKENS) as i64);
        }
        self.status.send_if_modified(|s| {
            if *s == next {
                false
            } else {
                *s = next;
                true
            }
        });
    }
}

/// Counts one step: its duration, its rows and tokens.
fn observe_step(m: &WorkerMetrics, before: &RankStats, after: &RankStats, started: Instant) {
    m.step_seconds.observe(started.elapsed().as_secs_f64());
    let prefill = after.prefill_tokens - before.prefill_tokens;
    let decode = after.decode_tokens - before.decode_tokens;
    if prefill > 0 {
        m.prefill_rows.observe(prefill as f64);
        m.prefill_tokens.inc_by(prefill);
    }
    if decode > 0 {
        m.decode_rows.observe(decode as f64);
        m.decode_tokens.inc_by(decode);
    }
    m.preemptions.inc_by(after.preemptions - before.preemptions);
}

fn model_expert_bytes(engine: Option<&RankEngine<AnyBackend>>) -> u64 {
    engine.map_or(0, |e| {
        let model = e.model();
        model.experts.bytes(&*model.shared.backend) as u64
    })
}

/// One agreement of the group: `(anyone busy, anyone wants to pause)`. A collective: every
/// rank of the group calls it the same number of times and all get the same answer.
fn agree(comm: &mut dyn Communicator, busy: bool, pause: bool) -> Result<(bool, bool)> {
    let all = comm.all_gather(vec![u8::from(busy), u8::from(pause)])?;
    Ok((
        all.iter().any(|f| f.first() == Some(&1)),
        all.iter().any(|f| f.get(1) == Some(&1)),
    ))
}

/// The error of a request that reaches a worker outside any epoch.
pub fn not_in_epoch() -> Error {
    Error::Unavailable("worker is not in the active epoch".into())
}
