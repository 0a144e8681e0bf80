//! Opening a request's stream on a worker: pick the least-loaded worker, call its `Generate`,
//! wait for the first message, and try one other worker when the first refuses.

use std::time::Duration;

use moebius_proto::v1::worker_client::WorkerClient;
use moebius_proto::v1::{GenerateRequest, GenerateResponse};
use tokio::time::Instant;
use tonic::{Code, Status, Streaming};
use tracing::debug;

use crate::error::RouterError;
use crate::pool::{InFlight, Pool, WorkerSlot};

/// A request running on a worker: its place in the worker's count, the worker's stream, and
/// the stream's first message (`None` when the worker ended the stream at once). Dropping it
/// drops the stream, which cancels the sequence on the worker.
#[derive(Debug)]
pub(crate) struct Upstream {
    pub guard: InFlight,
    pub stream: Streaming<GenerateResponse>,
    pub first: Option<GenerateResponse>,
}

impl Upstream {
    /// The worker's next message, `None` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<GenerateResponse>, RouterError> {
        if let Some(first) = self.first.take() {
            return Ok(Some(first));
        }
        self.stream
            .message()
            .await
            .map_err(|status| worker_error(self.guard.worker(), status))
    }
}

/// Starts `request` on a worker. A worker that answers `RESOURCE_EXHAUSTED` or cannot be
/// reached before its first message is replaced by the least-loaded other worker, once; after
/// the first message nothing is retried, since the client may already hold tokens.
pub(crate) async fn open(
    pool: &Pool,
    request: &GenerateRequest,
    deadline: Option<Instant>,
    epoch_wait: Duration,
) -> Result<Upstream, RouterError> {
    let guard = pool.acquire(epoch_wait).await?;
    let (failed, err) = match try_open(guard, request, deadline).await {
        Ok(upstream) => return Ok(upstream),
        Err(failed) => failed,
    };
    let retry = match &err {
        RouterError::Worker(status) => status.code() == Code::ResourceExhausted,
        RouterError::WorkerFailed { .. } => true,
        _ => false,
    };
    if !retry {
        return Err(err);
    }
    let failed_id = failed.worker().id.clone();
    drop(failed);
    match pool.acquire_other(&failed_id) {
        Ok(other) => {
            debug!(request_id = %request.request_id, failed = %failed_id, retry = %other.worker().id, "retrying on another worker: {err}");
            try_open(other, request, deadline).await.map_err(|(_, e)| e)
        }
        Err(_) => Err(err),
    }
}

async fn try_open(
    guard: InFlight,
    request: &GenerateRequest,
    deadline: Option<Instant>,
) -> Result<Upstream, (InFlight, RouterError)> {
    let mut client = WorkerClient::new(guard.worker().channel.clone());
    let mut call = tonic::Request::new(request.clone());
    if let Some(deadline) = deadline {
        // The worker learns the deadline too, so it can stop a sequence nobody waits for.
        call.set_timeout(deadline.saturating_duration_since(Instant::now()));
    }
    let mut stream = match client.generate(call).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            let err = worker_error(guard.worker(), status);
            return Err((guard, err));
        }
    };
    match stream.message().await {
        Ok(first) => Ok(Upstream {
            guard,
            stream,
            first,
        }),
        Err(status) => {
            let err = worker_error(guard.worker(), status);
            Err((guard, err))
        }
    }
}

/// Sorts a worker's error status: transport failures (the worker died, reset the connection,
/// or cannot be reached) become `WorkerFailed`, naming the worker; statuses the worker chose
/// (`INVALID_ARGUMENT`, `RESOURCE_EXHAUSTED`, ...) pass through unchanged.
pub(crate) fn worker_error(worker: &WorkerSlot, status: Status) -> RouterError {
    match status.code() {
        Code::Unknown | Code::Unavailable | Code::Internal | Code::Cancelled => {
            RouterError::WorkerFailed {
                worker: worker.id.clone(),
                address: worker.address.clone(),
                message: status.message().to_string(),
            }
        }
        _ => RouterError::Worker(status),
    }
}
