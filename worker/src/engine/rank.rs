//! One rank's sequences and the step that batches them; the loop that drives the steps is
//! [`super::thread`].

use crate::backend::{Backend, Wants};
use crate::comm::Communicator;
use crate::engine::kv_budget::{KvBudget, BLOCK_TOKENS};
use crate::engine::request::{FinishReason, GenerateRequest, TokenEvent};
use crate::engine::sampling::Sampler;
use crate::error::{Error, Result};
use crate::model::{KvCache, Model, StepInput};

/// What a sequence's sink receives: its tokens, or the error that ended it (then nothing
/// follows).
pub type SequenceEvent = Result<TokenEvent>;

/// Where one sequence's events go, straight from the engine thread to whoever reads them (a
/// response stream, a benchmark, `run_group`): no thread or pump in between.
pub trait EventSink: Send {
    /// Delivers one event; `false` when nobody listens any more (the sequence is dropped).
    fn send(&mut self, event: SequenceEvent) -> bool;
    /// Whether the reader went away. Checked before every step, so that a client that leaves
    /// in the middle of a long prefill frees its sequence at once.
    fn is_closed(&self) -> bool;
}

/// A response stream's sink: the receiver's end lives in the stream, so a client that goes
/// away (the stream is dropped, or closes the receiver) cancels the sequence.
impl EventSink for tokio::sync::mpsc::UnboundedSender<SequenceEvent> {
    fn send(&mut self, event: SequenceEvent) -> bool {
        tokio::sync::mpsc::UnboundedSender::send(self, event).is_ok()
    }

    fn is_closed(&self) -> bool {
        tokio::sync::mpsc::UnboundedSender::is_closed(self)
    }
}

/// Many sequences into one channel, each event tagged with its sequence's index (one-shot
/// generation and benchmarks read every sequence from one place).
#[derive(Debug, Clone)]
pub struct Tagged {
    pub index: usize,
    pub tx: std::sync::mpsc::Sender<(usize, SequenceEvent)>,
}

impl EventSink for Tagged {
    fn send(&mut self, event: SequenceEvent) -> bool {
        self.tx.send((self.index, event)).is_ok()
    }

    fn is_closed(&self) -> bool {
        false
    }
}

/// A request handed to a rank, with the sink its tokens go to.
pub struct Submission {
    pub request: GenerateRequest,
    pub events: Box<dyn EventSink>,
}

struct Sequence<B: Backend> {
    /// The request, with its prompt and earlier tokens moved into `tokens`.
    request: GenerateRequest,
    /// The prompt, then every token generated for the request (also by earlier attempts).
    tokens: Vec<u32>,
    prompt_len: usize,
    cache: KvCache<B>,
    sampler: Sampler,
    /// Leading positions of `tokens` in the cache.
    fed: usize,
    /// Whether this attempt has sampled a token yet; until then the sequence is prefilling.
    sampled: bool,
    events: Box<dyn EventSink>,
    /// Whether its sink has had its last event: the finish, or the error that ended it.
    ended: bool,
}

impl<B: Backend> Sequence<B> {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// A sequence dropped before its last event (the engine thread panicked in a step, say, and
/// unwound) still ends with an error, so that no reader takes the tokens so far for a whole
/// answer, and the router may redo it elsewhere from them.
impl<B: Backend> Drop for Sequence<B> {
    fn drop(&mut self) {
        if !self.ended {
            self.events.send(Err(Error::Unavailable(
                "the rank's engine stopped before the request finished (see the worker's log)"
                    .into(),
            )));
        }
    }
}

/// Counters a benchmark or a test reads after a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RankStats {
    pub steps: u64,
    /// Largest number of sequences in one step.
    pub max_batch: usize,
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
    /// Sequences whose caches were dropped to make room for older ones (they prefill again).
    pub preemptions: u64,
}

impl RankStats {
    /// Adds `more` (the counters of an engine that came before).
    pub fn add(&mut self, more: &RankStats) {
        self.steps += more.steps;
        self.max_batch = self.max_batch.max(more.max_batch);
        self.prefill_tokens += more.prefill_tokens;
        self.decode_tokens += more.decode_tokens;
        self.preemptions += more.preemptions;
    }
}

/// The sequences of one rank and the model they run on.
///
/// The sequences' caches stay within the rank's [`KvBudget`]: a prompt waits until its chunk
/// fits, and when a decoding sequence needs a block that is not free, the newest sequences
/// give theirs up (preemption: they prefill again later, from their tokens so far, and go on
/// with the same tokens). Sequences are served in the order they came, so the oldest always
/// advances.
pub struct RankEngine<B: Backend> {
    model: Model<B>,
    /// In the order they were submitted.
    sequences: Vec<Sequence<B>>,
    /// Most prompt tokens prefilled in one step, over all sequences.
    token_budget: usize,
    kv_budget: KvBudget,
    stats: RankStats,
}

impl<B: Backend> RankEngine<B> {
    pub fn new(model: Model<B>, token_budget: usize, kv_budget: KvBudget) -> Self {
        Self {
            model,
            sequences: Vec::new(),
            token_budget: token_budget.max(1),
            kv_budget,
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

    /// Live sequences that have not sampled their first token yet (waiting for or in prefill).
    pub fn queued(&self) -> usize {
        self.sequences.iter().filter(|s| !s.sampled).count()
    }

    /// Bytes the sequences' KV caches hold.
    pub fn kv_cache_bytes(&self) -> usize {
        self.sequences.iter().map(|s| s.cache.bytes()).sum()
    }

    /// Blocks of the [`KvBudget`] the sequences' caches hold.
    pub fn kv_blocks_used(&self) -> usize {
        self.sequences
            .iter()
            .map(|s| KvBudget::blocks_for(s.cache.len()))
            .sum()
    }

    /// Checks the request completely and, if it is valid, adds it: it joins at the next step.
    /// An invalid request gets its error on its sink and never joins, so no request can fail
    /// a step.
    pub fn submit(&mut self, submission: Submission) {
        let Submission {
            mut request,
            mut events,
        } = submission;
        if let Err(e) = request.validate(self.model.config()) {
            events.send(Err(e));
            return;
        }
        let mut tokens = std::mem::take(&mut request.prompt);
        let prompt_len = tokens.len();
        tokens.append(&mut request.generated);
        if !self.kv_budget.holds(tokens.len()) {
            events.send(Err(Error::InvalidRequest(format!(
                "{} tokens of context do not fit this worker's KV cache of {} tokens \
                 (--kv-cache-tokens); shorten the prompt",
                tokens.len(),
                self.kv_budget.capacity_tokens()
            ))));
            return;
        }
        self.sequences.push(Sequence {
            cache: self.model.new_cache(),
            sampler: Sampler::new(request.sampling.clone()),
            fed: 0,
            sampled: false,
            tokens,
            prompt_len,
            request,
            events,
            ended: false,
        });
    }

    /// Moves this rank to a new epoch's model (same shared weights, this rank's experts of the
    /// new placement). The sequences and their KV caches stay, since attention is data
    /// parallel and the caches do not depend on the placement.
    pub fn reconfigure(&mut self, model: Model<B>) -> Result<()> {
        let (old, new) = (self.model.config(), model.config());
        if old.num_hidden_layers != new.num_hidden_layers || old.vocab_size != new.vocab_size {
            return Err(Error::Config(
                "the new epoch's model differs from the running one; the caches cannot move".into(),
            ));
        }
        self.model = model;
        Ok(())
    }

    /// Ends every sequence with the error `why()` makes, so that no client waits for tokens
    /// that will not come.
    pub fn fail_all(&mut self, why: impl Fn() -> Error) {
        for mut seq in self.sequences.drain(..) {
            // A client that already left does not need the error.
            seq.events.send(Err(why()));
            seq.ended = true;
        }
    }

    /// Drops the sequences whose reader went away.
    pub fn drop_cancelled(&mut self) {
        self.sequences.retain(|s| !s.events.is_closed());
    }

    /// One lock-step step of this rank: the sequences the token and KV cache budgets allow
    /// ([`schedule`](Self::schedule)) advance by a decode token or a prefill chunk. Must be
    /// called on every rank of the group, also with no sequences. When the step fails (a peer
    /// failed), whatever it appended to the KV caches is dropped and no sequence has advanced,
    /// so the step can be redone in the next epoch.
    pub fn step(&mut self, comm: &mut dyn Communicator) -> Result<()> {
        self.drop_cancelled();
        let chosen = self.schedule();
        let mut next = chosen.iter().peekable();
        let mut inputs: Vec<StepInput<'_, B>> = self
            .sequences
            .iter_mut()
            .enumerate()
            .filter_map(|(i, seq)| {
                let &(_, take) = next.next_if(|&&(j, _)| j == i)?;
                let ends_prompt = seq.sampled || seq.fed + take >= seq.tokens.len();
                let wants = if ends_prompt {
                    seq.sampler.wants(seq.request.top_logprobs)
                } else {
                    Wants::Nothing // a prefill chunk that samples nothing
                };
                Some(StepInput {
                    tokens: &seq.tokens[seq.fed..seq.fed + take],
                    cache: &mut seq.cache,
                    wants,
                })
            })
            .collect();
        let result = self.model.forward(&mut inputs, comm);
        drop(inputs);
        let logits = match result {
            Ok(logits) => logits,
            Err(e) => {
                for &(i, _) in &chosen {
                    self.sequences[i].cache.rollback();
                }
                return Err(e);
            }
        };
        self.stats.steps += 1;
        self.stats.max_batch = self.stats.max_batch.max(chosen.len());

        let max_positions = self.model.config().max_position_embeddings;
        let eos = &self.model.config().eos_token_ids;
        let mut finished = Vec::new();
        for (&(i, len), logits) in chosen.iter().zip(&logits) {
            let seq = &mut self.sequences[i];
            seq.fed += len;
            if seq.sampled {
                self.stats.decode_tokens += 1;
            } else {
                self.stats.prefill_tokens += len as u64;
                if seq.fed < seq.tokens.len() {
                    continue; // A prefill chunk; the prompt goes on in the next step.
                }
            }
            let sampled = (seq.sampler)
                .sample(logits, seq.request.top_logprobs, seq.generated())
                .expect("the LM head gives the logits each row wants");
            seq.tokens.push(sampled.token);
            seq.sampled = true;
            let finish = if seq.request.stop_token_ids.contains(&sampled.token) {
                Some(FinishReason::Stop)
            } else if !seq.request.ignore_eos && eos.contains(&sampled.token) {
                Some(FinishReason::Eos)
            } else if seq.generated() >= seq.request.max_new_tokens
                || seq.cache.len() + 1 > max_positions
                || !self.kv_budget.holds(seq.cache.len() + 1)
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
            // A closed sink means the reader went away: free the sequence now.
            seq.ended = finish.is_some();
            if !seq.events.send(Ok(event)) || finish.is_some() {
                finished.push(i);
            }
        }
        for i in finished.into_iter().rev() {
            self.sequences.remove(i);
        }
        Ok(())
    }

    /// Which sequences this step advances, and by how many tokens, in increasing order of
    /// index; preempts what must give way so that the step's caches fit the budget.
    ///
    /// Decoding sequences come first, oldest first: one that needs a block that is not free
    /// takes it from the newest sequence holding any (or gives up its own when it is the
    /// newest). Then prompts, oldest first, within the token budget and the blocks left over
    /// after those the decoding sequences need in the next step, stopping at the first that
    /// gets nothing so that long prompts are not passed by short ones for ever. A step that
    /// preempted admits no prompt: it would take the blocks just freed.
    fn schedule(&mut self) -> Vec<(usize, usize)> {
        let capacity = self.kv_budget.blocks();
        let blocks = KvBudget::blocks_for;
        let mut used = self.kv_blocks_used();
        let preemptions = self.stats.preemptions;
        let mut decode = Vec::new();
        let mut reserve = 0;
        for i in 0..self.sequences.len() {
            if !self.sequences[i].sampled {
                continue;
            }
            let len = self.sequences[i].cache.len();
            let need = blocks(len + 1) - blocks(len);
            while used + need > capacity {
                let victim = (i..self.sequences.len())
                    .rev()
                    .find(|&j| !self.sequences[j].cache.is_empty())
                    .expect("the sequence itself holds blocks when none are free");
                used -= blocks(self.sequences[victim].cache.len());
                self.preempt(victim);
                if victim == i {
                    break;
                }
            }
            if self.sequences[i].sampled {
                used += need;
                reserve += blocks(len + 2) - blocks(len + 1);
                decode.push((i, 1));
            }
        }
        if self.stats.preemptions != preemptions {
            return decode;
        }
        let mut free = capacity.saturating_sub(used + reserve);
        let mut budget = self.token_budget;
        let mut prefill = Vec::new();
        for (i, seq) in self.sequences.iter().enumerate() {
            if seq.sampled {
                continue;
            }
            let len = seq.cache.len();
            let slack = blocks(len) * BLOCK_TOKENS - len;
            let fits = slack + free * BLOCK_TOKENS;
            let take = (seq.tokens.len() - seq.fed).min(budget).min(fits);
            if take == 0 {
                break;
            }
            budget -= take;
            free -= blocks(len + take) - blocks(len);
            prefill.push((i, take));
        }
        let mut chosen = decode;
        chosen.extend(prefill);
        chosen.sort_unstable();
        chosen
    }

    /// Drops sequence `i`'s cache: it prefills its tokens so far again when there is room.
    fn preempt(&mut self, i: usize) {
        let seq = &mut self.sequences[i];
        seq.cache = self.model.new_cache();
        seq.fed = 0;
        seq.sampled = false;
        self.stats.preemptions += 1;
    }
}
