//! One rank's engine: its sequences, the step that batches them, and the lock-step loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use crate::backend::Backend;
use crate::comm::Communicator;
use crate::engine::request::{FinishReason, GenerateRequest, TokenEvent};
use crate::engine::sampling::Sampler;
use crate::error::{Error, Result};
use crate::model::{KvCache, Model, StepInput};

/// What a sequence's channel carries: its tokens, or the error that ended it (then nothing
/// follows).
pub type SequenceEvent = Result<TokenEvent>;

/// A request handed to a rank, with the channel its tokens go to. Dropping the receiver
/// cancels the sequence at its next token; [`RankEngine::submit_cancellable`] also cancels
/// one that is still prefilling.
pub struct Submission {
    pub request: GenerateRequest,
    pub events: Sender<SequenceEvent>,
}

struct Sequence {
    request: GenerateRequest,
    cache: KvCache,
    sampler: Sampler,
    /// Prompt tokens already in the cache.
    fed: usize,
    generated: Vec<u32>,
    events: Sender<SequenceEvent>,
    /// Set by whoever reads `events` when it no longer wants them; checked before every step.
    cancel: Option<Arc<AtomicBool>>,
}

impl Sequence {
    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

/// What the ranks of a group agreed at one iteration of a serving loop ([`RankEngine::agree`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreement {
    /// Some rank has a sequence: every rank steps.
    pub busy: bool,
    /// Some rank asked to pause: every rank stops stepping now, at the same step.
    pub pause: bool,
}

/// Counters a benchmark or a test reads after a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RankStats {
    pub steps: u64,
    /// Largest number of sequences in one step.
    pub max_batch: usize,
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
}

/// When [`RankEngine::run`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunUntil {
    /// As soon as no rank of the group has a sequence (one-shot generation, benchmarks).
    GroupIdle,
    /// When the submission channel is closed and the group is idle (a serving worker).
    InboxClosed,
}

/// The sequences of one rank and the model they run on.
pub struct RankEngine<B: Backend> {
    model: Model<B>,
    comm: Box<dyn Communicator>,
    sequences: Vec<Sequence>,
    /// Most prompt tokens prefilled in one step, over all sequences.
    token_budget: usize,
    stats: RankStats,
}

impl<B: Backend> RankEngine<B> {
    pub fn new(model: Model<B>, comm: Box<dyn Communicator>, token_budget: usize) -> Self {
        Self {
            model,
            comm,
            sequences: Vec::new(),
            token_budget: token_budget.max(1),
            stats: RankStats::default(),
        }
    }

    pub fn model(&self) -> &Model<B> {
        &self.model
    }

    pub fn stats(&self) -> &RankStats {
        &self.stats
    }

    /// Number of live sequences.
    pub fn active(&self) -> usize {
        self.sequences.len()
    }

    pub fn comm(&self) -> &dyn Communicator {
        &*self.comm
    }

    /// Adds a validated request; it joins at the next step.
    pub fn submit(&mut self, submission: Submission) {
        self.push(submission, None);
    }

    /// Like [`submit`](Self::submit), and the sequence is dropped before the next step once
    /// `cancel` is set, also in the middle of a long prefill.
    pub fn submit_cancellable(&mut self, submission: Submission, cancel: Arc<AtomicBool>) {
        self.push(submission, Some(cancel));
    }

    fn push(&mut self, submission: Submission, cancel: Option<Arc<AtomicBool>>) {
        let Submission { request, events } = submission;
        self.sequences.push(Sequence {
            cache: self.model.new_cache(),
            sampler: Sampler::new(request.sampling.clone()),
            fed: 0,
            generated: Vec::new(),
            request,
            events,
            cancel,
        });
    }

    /// Moves this rank to a new epoch: a new model (same shared weights, this rank's experts of
    /// the new placement) and a new data plane. The sequences and their KV caches stay, since
    /// attention is data parallel and the caches do not depend on the placement. Call only
    /// between steps, when every rank of the old group has stopped stepping.
    pub fn reconfigure(&mut self, model: Model<B>, comm: Box<dyn Communicator>) -> Result<()> {
        let (old, new) = (self.model.config(), model.config());
        if old.num_hidden_layers != new.num_hidden_layers || old.vocab_size != new.vocab_size {
            return Err(Error::Config(
                "the new epoch's model differs from the running one; the caches cannot move".into(),
            ));
        }
        self.model = model;
        self.comm = comm;
        Ok(())
    }

    /// Ends every sequence with the error `why()` makes (e.g. the data plane failed), so that
    /// no client waits for tokens that will not come.
    pub fn fail_all(&mut self, why: impl Fn() -> Error) {
        for seq in self.sequences.drain(..) {
            // A client that already left does not need the error.
            let _ = seq.events.send(Err(why()));
        }
    }

    /// Drops the sequences whose client went away.
    pub fn drop_cancelled(&mut self) {
        self.sequences.retain(|s| !s.cancelled());
    }

    /// One agreement of a serving loop: every rank of the group calls it the same number of
    /// times (it is a collective), and all get the same answer.
    pub fn agree(&mut self, pause: bool) -> Result<Agreement> {
        let mine = [u8::from(!self.sequences.is_empty()), u8::from(pause)];
        let all = self.comm.all_gather(mine.to_vec())?;
        Ok(Agreement {
            busy: all.iter().any(|f| f.first() == Some(&1)),
            pause: all.iter().any(|f| f.get(1) == Some(&1)),
        })
    }

    /// One lock-step step of this rank: every live sequence advances by a decode token or a
    /// prefill chunk. Must be called on every rank of the group, also with no sequences.
    pub fn step(&mut self) -> Result<()> {
        self.drop_cancelled();
        let mut budget = self.token_budget;
        let mut chosen = Vec::new();
        let mut inputs = Vec::new();
        for (i, seq) in self.sequences.iter_mut().enumerate() {
            let Sequence {
                request,
                cache,
                fed,
                generated,
                ..
            } = seq;
            let tokens: &[u32] = if *fed < request.prompt.len() {
                if budget == 0 {
                    continue;
                }
                let end = (*fed + budget).min(request.prompt.len());
                budget -= end - *fed;
                &request.prompt[*fed..end]
            } else {
                match generated.last() {
                    Some(t) => std::slice::from_ref(t),
                    None => continue,
                }
            };
            chosen.push((i, tokens.len()));
            inputs.push(StepInput { tokens, cache });
        }
        let logits = self.model.forward(&mut inputs, &mut *self.comm)?;
        drop(inputs);
        self.stats.steps += 1;
        self.stats.max_batch = self.stats.max_batch.max(chosen.len());

        let vocab = self.model.config().vocab_size;
        let max_positions = self.model.config().max_position_embeddings;
        let eos = self.model.config().eos_token_ids.clone();
        let mut finished = Vec::new();
        for (&(i, len), logits) in chosen.iter().zip(logits.chunks_exact(vocab)) {
            let seq = &mut self.sequences[i];
            if seq.fed < seq.request.prompt.len() {
                seq.fed += len;
                self.stats.prefill_tokens += len as u64;
                if seq.fed < seq.request.prompt.len() {
                    continue;
                }
            } else {
                self.stats.decode_tokens += 1;
            }
            let sampled = seq.sampler.sample(logits, seq.request.top_logprobs);
            seq.generated.push(sampled.token);
            let finish = if seq.request.stop_token_ids.contains(&sampled.token) {
                Some(FinishReason::Stop)
            } else if !seq.request.ignore_eos && eos.contains(&sampled.token) {
                Some(FinishReason::Eos)
            } else if seq.generated.len() >= seq.request.max_new_tokens
                || seq.cache.len() + 1 > max_positions
            {
                Some(FinishReason::Length)
            } else {
                None
            };
            let event = TokenEvent {
                token: sampled.token,
                logprob: sampled.logprob,
                top_logprobs: sampled.top,
                finish,
            };
            // A closed channel means the client went away: free the sequence now.
            if seq.events.send(Ok(event)).is_err() || finish.is_some() {
                finished.push(i);
            }
        }
        for i in finished.into_iter().rev() {
            self.sequences.swap_remove(i);
        }
        Ok(())
    }

    /// The lock-step loop: takes submissions from `inbox`, and steps while any rank of the
    /// group has work. Ranks agree each iteration, so they step the same number of times. On a
    /// data-plane failure every sequence gets the error before it is returned.
    pub fn run(&mut self, inbox: &Receiver<Submission>, until: RunUntil) -> Result<()> {
        let result = self.run_inner(inbox, until);
        if let Err(e) = &result {
            let message = e.to_string();
            self.fail_all(|| Error::Unavailable(message.clone()));
        }
        result
    }

    fn run_inner(&mut self, inbox: &Receiver<Submission>, until: RunUntil) -> Result<()> {
        let mut inbox_open = true;
        loop {
            while inbox_open {
                match inbox.try_recv() {
                    Ok(s) => self.submit(s),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => inbox_open = false,
                }
            }
            let mine = [u8::from(!self.sequences.is_empty()), u8::from(inbox_open)];
            let all = self.comm.all_gather(mine.to_vec())?;
            let busy = all.iter().any(|f| f.first() == Some(&1));
            if !busy {
                let open = all.iter().any(|f| f.get(1) == Some(&1));
                if until == RunUntil::GroupIdle || !open {
                    return Ok(());
                }
                // Idle but serving: wait a little for work before agreeing again.
                if inbox_open {
                    match inbox.recv_timeout(Duration::from_millis(2)) {
                        Ok(s) => self.submit(s),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => inbox_open = false,
                    }
                }
                continue;
            }
            self.step()?;
        }
    }
}
