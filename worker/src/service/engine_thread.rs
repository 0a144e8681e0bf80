//! The engine thread: one std thread owns this worker's [`RankEngine`] and runs the lock-step
//! loop of its EP group, fed by [`Command`]s from the gRPC handlers and the epoch follower.
//!
//! States: *detached* (no model, no data plane: not in an epoch, or the group failed),
//! *paused* (in an epoch, sequences kept, not stepping: an epoch change is under way) and
//! *running*. A pause is agreed by the whole group through [`RankEngine::agree`], so every rank
//! stops after the same step and no rank is left waiting in a collective.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{mpsc as tokio_mpsc, oneshot, watch};

use crate::backend::CpuBackend;
use crate::comm::Communicator;
use crate::engine::{GenerateRequest, RankEngine, RankStats, SequenceEvent, Submission};
use crate::error::{Error, Result};
use crate::model::Model;

/// How long an idle running rank waits for a command before agreeing with its group again.
const IDLE_WAIT: Duration = Duration::from_millis(2);
/// How often a paused or detached rank looks at its cancelled sequences and its counters.
const PAUSED_WAIT: Duration = Duration::from_millis(20);

/// What the engine thread is doing, as the gRPC side and the health check see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// No model and no data plane: requests are refused.
    #[default]
    Detached,
    /// In an epoch but not stepping (an epoch change is under way); requests wait.
    Paused,
    /// Stepping in lock-step with the group.
    Running,
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
    /// Summed over every engine this thread has had (a failure starts a new one).
    pub stats: RankStats,
    pub expert_slots: Vec<u32>,
    pub expert_bytes: u64,
}

/// One epoch's model and data plane for this rank.
pub struct Installation {
    pub epoch: u64,
    pub rank: usize,
    pub model: Model<CpuBackend>,
    pub comm: Box<dyn Communicator>,
    pub expert_slots: Vec<u32>,
}

/// Messages to the engine thread.
enum Command {
    Submit {
        request: GenerateRequest,
        events: tokio_mpsc::UnboundedSender<SequenceEvent>,
        cancel: Arc<AtomicBool>,
    },
    /// Stop stepping after the current step (agreed with the group); answered when paused.
    Pause(oneshot::Sender<()>),
    /// Swap in a new epoch's model and data plane; only while paused or detached.
    Install(Box<Installation>, oneshot::Sender<Result<()>>),
    /// Step again in `epoch` (ignored unless that epoch is installed).
    Resume(u64),
    /// Pause the group, fail every sequence with UNAVAILABLE `reason`, drop model and data
    /// plane; answered when done.
    Detach(String, oneshot::Sender<()>),
    Stop,
}

/// The handle the async side holds; the thread ends when [`EngineHandle::stop`] is called or
/// the handle is dropped.
pub struct EngineHandle {
    commands: Sender<Command>,
    status: watch::Receiver<EngineStatus>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl EngineHandle {
    /// Starts the thread, detached (no epoch yet).
    pub fn spawn(token_budget: usize) -> Result<Self> {
        let (commands, inbox) = mpsc::channel();
        let (status_tx, status) = watch::channel(EngineStatus::default());
        let thread = std::thread::Builder::new()
            .name("moebius-engine".into())
            .spawn(move || EngineLoop::new(inbox, status_tx, token_budget).run())
            .map_err(|e| Error::Serve(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            commands,
            status,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// The engine's published status.
    pub fn status(&self) -> watch::Receiver<EngineStatus> {
        self.status.clone()
    }

    fn send(&self, command: Command) -> Result<()> {
        self.commands
            .send(command)
            .map_err(|_| Error::Unavailable("the engine thread has stopped".into()))
    }

    /// Hands a validated request to the engine; its tokens (or the error that ends it) arrive
    /// on the returned channel. Setting `cancel` frees the sequence before the next step.
    pub fn submit(
        &self,
        request: GenerateRequest,
        cancel: Arc<AtomicBool>,
    ) -> Result<tokio_mpsc::UnboundedReceiver<SequenceEvent>> {
        let (events, rx) = tokio_mpsc::unbounded_channel();
        self.send(Command::Submit {
            request,
            events,
            cancel,
        })?;
        Ok(rx)
    }

    /// Stops the group stepping after its current step; returns once this rank has stopped.
    pub async fn pause(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Pause(tx))?;
        rx.await
            .map_err(|_| Error::Unavailable("the engine thread has stopped".into()))
    }

    /// Installs a new epoch's model and data plane (pause first); the sequences stay.
    pub async fn install(&self, installation: Installation) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Install(Box::new(installation), tx))?;
        rx.await
            .map_err(|_| Error::Unavailable("the engine thread has stopped".into()))?
    }

    /// Lets the group step again in `epoch`.
    pub fn resume(&self, epoch: u64) -> Result<()> {
        self.send(Command::Resume(epoch))
    }

    /// Leaves the group: pauses it, fails every sequence with UNAVAILABLE `reason`, drops the
    /// model and data plane.
    pub async fn detach(&self, reason: String) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Detach(reason, tx))?;
        rx.await
            .map_err(|_| Error::Unavailable("the engine thread has stopped".into()))
    }

    /// Asks the thread to fail every sequence and end, without waiting for it.
    pub fn request_stop(&self) {
        // A thread that already ended has nothing to stop.
        let _ = self.commands.send(Command::Stop);
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

/// Moves one sequence's events from the engine's std channel to the async side.
struct Forward {
    from: Receiver<SequenceEvent>,
    to: tokio_mpsc::UnboundedSender<SequenceEvent>,
    cancel: Arc<AtomicBool>,
}

impl Forward {
    /// Forwards what is there; false once the sequence ended or its reader went away.
    fn pump(&mut self) -> bool {
        loop {
            match self.from.try_recv() {
                Ok(event) => {
                    if self.to.send(event).is_err() {
                        self.cancel.store(true, Ordering::Relaxed);
                        return false;
                    }
                }
                Err(TryRecvError::Empty) => return !self.to.is_closed(),
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }
}

struct EngineLoop {
    inbox: Receiver<Command>,
    status: watch::Sender<EngineStatus>,
    token_budget: usize,
    engine: Option<RankEngine<CpuBackend>>,
    epoch: u64,
    rank: usize,
    expert_slots: Vec<u32>,
    running: bool,
    /// Stats of engines that were dropped (after a failure), so counters never go back.
    past: RankStats,
    forwards: Vec<Forward>,
    /// Answered when the group has paused.
    pause_waiters: Vec<oneshot::Sender<()>>,
    /// A detach that waits for the group to pause first.
    detach: Option<(String, oneshot::Sender<()>)>,
    stopping: bool,
}

impl EngineLoop {
    fn new(
        inbox: Receiver<Command>,
        status: watch::Sender<EngineStatus>,
        token_budget: usize,
    ) -> Self {
        Self {
            inbox,
            status,
            token_budget,
            engine: None,
            epoch: 0,
            rank: 0,
            expert_slots: Vec::new(),
            running: false,
            past: RankStats::default(),
            forwards: Vec::new(),
            pause_waiters: Vec::new(),
            detach: None,
            stopping: false,
        }
    }

    fn run(mut self) {
        while !self.stopping {
            if !self.running {
                match self.inbox.recv_timeout(PAUSED_WAIT) {
                    Ok(command) => self.handle(command),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => self.stopping = true,
                }
                self.drain_commands();
                if let Some(engine) = &mut self.engine {
                    engine.drop_cancelled();
                }
                self.pump();
                self.publish();
                continue;
            }
            self.drain_commands();
            if self.stopping {
                break;
            }
            let Some(engine) = &mut self.engine else {
                self.running = false;
                continue;
            };
            engine.drop_cancelled();
            let want_pause = !self.pause_waiters.is_empty() || self.detach.is_some();
            let agreed = engine.agree(want_pause).and_then(|a| {
                if a.busy && !a.pause {
                    engine.step()?;
                }
                Ok(a)
            });
            match agreed {
                Err(e) => self.fail(e),
                Ok(a) if a.pause => self.paused(),
                Ok(a) if !a.busy => {
                    // Idle but serving: wait a little for work before agreeing again.
                    match self.inbox.recv_timeout(IDLE_WAIT) {
                        Ok(command) => self.handle(command),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => self.stopping = true,
                    }
                }
                Ok(_) => {}
            }
            self.pump();
            self.publish();
        }
        let sequences = self.engine.as_ref().map_or(0, RankEngine::active);
        if let Some(engine) = &mut self.engine {
            engine.fail_all(|| Error::Unavailable("the worker is shutting down".into()));
        }
        self.pump();
        self.engine = None;
        self.running = false;
        self.publish();
        tracing::info!(sequences, "engine thread stopped");
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
            Command::Submit {
                request,
                events,
                cancel,
            } => {
                let Some(engine) = &mut self.engine else {
                    let _ = events.send(Err(not_in_epoch()));
                    return;
                };
                let (tx, from) = mpsc::channel();
                engine.submit_cancellable(
                    Submission {
                        request,
                        events: tx,
                    },
                    cancel.clone(),
                );
                self.forwards.push(Forward {
                    from,
                    to: events,
                    cancel,
                });
            }
            Command::Pause(ack) => {
                if self.running {
                    self.pause_waiters.push(ack);
                } else {
                    let _ = ack.send(());
                }
            }
            Command::Install(installation, ack) => {
                let _ = ack.send(self.install(*installation));
            }
            Command::Resume(epoch) => {
                if self.engine.is_some() && epoch == self.epoch {
                    self.running = true;
                    tracing::info!(epoch, rank = self.rank, "stepping in the new epoch");
                } else {
                    tracing::warn!(
                        epoch,
                        installed = self.epoch,
                        "resume for an epoch that is not installed; ignored"
                    );
                }
            }
            Command::Detach(reason, ack) => {
                if self.running {
                    self.detach = Some((reason, ack));
                } else {
                    self.detach_now(&reason);
                    let _ = ack.send(());
                }
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
            comm,
            expert_slots,
        } = installation;
        match &mut self.engine {
            Some(engine) => engine.reconfigure(model, comm)?,
            None => self.engine = Some(RankEngine::new(model, comm, self.token_budget)),
        }
        self.epoch = epoch;
        self.rank = rank;
        self.expert_slots = expert_slots;
        self.publish();
        Ok(())
    }

    /// The group agreed to pause: stop stepping and answer whoever asked.
    fn paused(&mut self) {
        self.running = false;
        for ack in self.pause_waiters.drain(..) {
            let _ = ack.send(());
        }
        if let Some((reason, ack)) = self.detach.take() {
            self.detach_now(&reason);
            let _ = ack.send(());
        }
    }

    fn detach_now(&mut self, reason: &str) {
        if let Some(mut engine) = self.engine.take() {
            engine.fail_all(|| Error::Unavailable(reason.to_string()));
            add_stats(&mut self.past, engine.stats());
        }
        self.expert_slots.clear();
        self.running = false;
    }

    /// A collective failed (a peer died or timed out): every sequence ends with UNAVAILABLE and
    /// the rank waits, detached, for the next epoch.
    fn fail(&mut self, error: Error) {
        tracing::error!(epoch = self.epoch, rank = self.rank, %error, "EP group failed");
        let reason = format!(
            "the EP group of epoch {} failed ({error}); retry on another worker",
            self.epoch
        );
        self.detach_now(&reason);
        self.paused();
    }

    fn pump(&mut self) {
        self.forwards.retain_mut(Forward::pump);
    }

    fn publish(&self) {
        let mut stats = self.past.clone();
        if let Some(engine) = &self.engine {
            add_stats(&mut stats, engine.stats());
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
            expert_bytes: self.engine.as_ref().map_or(0, |e| {
                let model = e.model();
                model.experts.bytes(&*model.shared.backend) as u64
            }),
        };
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

fn add_stats(total: &mut RankStats, more: &RankStats) {
    total.steps += more.steps;
    total.max_batch = total.max_batch.max(more.max_batch);
    total.prefill_tokens += more.prefill_tokens;
    total.decode_tokens += more.decode_tokens;
}

/// The error of a request that reaches a worker outside any epoch.
pub fn not_in_epoch() -> Error {
    Error::Unavailable("worker is not in the active epoch".into())
}
