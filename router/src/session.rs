//! One client request across the workers that serve it.
//!
//! A session opens the request on the least-loaded worker and hands out its messages, keeping
//! what the client has been given: every token and all the text. When that worker is lost —
//! its stream fails, it answers UNAVAILABLE, or it leaves the group (the placement no longer
//! lists it, or its registration is gone) — the session resubmits the request to another worker
//! with the prompt plus those tokens, and the worker streams only what is new: no token is
//! duplicated or missing, and since sampling draws depend only on the seed and the token's
//! position, the tokens are those of a run without the fault. At most `migration_limit`
//! resubmissions are made per request.

use std::sync::Arc;
use std::time::Duration;

use moebius_proto::v1::{GenerateRequest, GenerateResponse, Resume};
use tokio::time::Instant;
use tonic::Code;
use tracing::info;

use crate::error::RouterError;
use crate::forward::{try_open, Upstream};
use crate::pool::{Pool, WorkerSlot};

/// How a session behaves.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionLimits {
    pub deadline: Option<Instant>,
    /// How long to wait for a routable worker before giving up.
    pub epoch_wait: Duration,
    /// Most resubmissions after a lost worker.
    pub migration_limit: u32,
}

/// One client request and the attempt serving it now.
#[derive(Debug)]
pub(crate) struct Session {
    pool: Arc<Pool>,
    request: GenerateRequest,
    limits: SessionLimits,
    upstream: Option<Upstream>,
    /// Every token sent to the client so far, in order.
    sent_tokens: Vec<u32>,
    /// All the text sent to the client so far.
    sent_text: String,
    /// Resubmissions so far.
    migrations: u32,
    /// The worker that failed last, avoided while there is another.
    avoid: Option<String>,
}

impl Session {
    /// Opens `request` on a worker and waits for its first message, so that a refusal (bad
    /// input for the model, every worker full, no worker at all) comes back as an error.
    pub async fn open(
        pool: Arc<Pool>,
        request: GenerateRequest,
        limits: SessionLimits,
    ) -> Result<Self, RouterError> {
        let mut session = Self {
            pool,
            request,
            limits,
            upstream: None,
            sent_tokens: Vec::new(),
            sent_text: String::new(),
            migrations: 0,
            avoid: None,
        };
        session.attach().await?;
        Ok(session)
    }

    /// How often the request was resubmitted.
    pub fn migrations(&self) -> u32 {
        self.migrations
    }

    /// The worker serving the request now, if any.
    pub fn worker(&self) -> Option<&str> {
        self.upstream.as_ref().map(|u| u.guard.worker().id.as_str())
    }

    /// Starts an attempt on a worker (other than the one that failed last, when there is
    /// another): one retry elsewhere when a worker is full, a resubmission when it is lost.
    async fn attach(&mut self) -> Result<(), RouterError> {
        let mut retried_full = false;
        loop {
            let guard = self
                .pool
                .acquire(self.limits.epoch_wait, self.avoid.as_deref())
                .await?;
            let resume = (!self.sent_tokens.is_empty()).then(|| Resume {
                token_ids: self.sent_tokens.clone(),
                text: self.sent_text.clone(),
            });
            match try_open(guard, &self.request, resume, self.limits.deadline).await {
                Ok(upstream) => {
                    self.upstream = Some(upstream);
                    return Ok(());
                }
                Err((failed, err)) => match &err {
                    RouterError::Worker(status)
                        if status.code() == Code::ResourceExhausted && !retried_full =>
                    {
                        retried_full = true;
                        self.pool.metrics().retries.inc();
                        self.avoid = Some(failed.worker().id.clone());
                    }
                    RouterError::WorkerFailed { .. } => self.lost(failed.worker(), err)?,
                    _ => return Err(err),
                },
            }
        }
    }

    /// The worker on `slot` is lost for this request: count a resubmission, or give up.
    fn lost(&mut self, slot: &WorkerSlot, err: RouterError) -> Result<(), RouterError> {
        self.pool.mark_down(slot);
        self.avoid = Some(slot.id.clone());
        self.migrations += 1;
        if self.migrations > self.limits.migration_limit {
            return Err(RouterError::MigrationsExhausted {
                limit: self.limits.migration_limit,
                last: err.to_string(),
            });
        }
        self.pool.metrics().migrations.inc();
        info!(
            request_id = %self.request.request_id, worker = %slot.id,
            migrations = self.migrations, tokens_sent = self.sent_tokens.len(),
            "resubmitting a request whose worker was lost: {err}"
        );
        Ok(())
    }

    /// The next message for the client, `None` at the end.
    pub async fn next(&mut self) -> Result<Option<GenerateResponse>, RouterError> {
        loop {
            let Some(upstream) = &mut self.upstream else {
                self.attach().await?;
                continue;
            };
            let slot = upstream.guard.slot();
            let next = tokio::select! {
                next = upstream.next() => next,
                () = self.pool.lost(&slot) => Err(RouterError::WorkerFailed {
                    worker: slot.id.clone(),
                    address: slot.address.clone(),
                    message: "it left the EP group (excluded, or its registration expired)".into(),
                }),
            };
            match next {
                Ok(Some(message)) => {
                    self.sent_tokens.extend_from_slice(&message.token_ids);
                    self.sent_text.push_str(&message.text);
                    return Ok(Some(message));
                }
                Ok(None) => return Ok(None),
                Err(err @ RouterError::WorkerFailed { .. }) => {
                    if let Some(lost) = self.upstream.take() {
                        self.lost(lost.guard.worker(), err)?;
                    }
                }
                Err(err) => return Err(err),
            }
        }
    }
}
