//! One attempt of a request on one worker: call its `Generate` (with what the client already
//! has, for a resubmission), wait for the first message, then hand out the rest.

use moebius_coordinator::telemetry::inject_trace_context;
use moebius_proto::v1::worker_client::WorkerClient;
use moebius_proto::v1::{GenerateRequest, GenerateResponse, Resume, WorkerGenerateRequest};
use tokio::time::Instant;
use tonic::{Code, Status, Streaming};

use crate::error::RouterError;
use crate::pool::{InFlight, WorkerSlot};

/// A request running on a worker: its place in the worker's count, the worker's stream, and
/// the stream's first message (`None` when the worker ended the stream at once). Dropping it
/// drops the stream, which cancels the sequence on the worker.
#[derive(Debug)]
pub(crate) struct Upstream {
    pub guard: InFlight,
    pub stream: Streaming<GenerateResponse>,
    pub first: Option<GenerateResponse>,
    /// The attempt's span, held so that it ends when the attempt does.
    _span: tracing::Span,
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

/// Calls the worker of `guard` and waits for the first message; on failure hands the guard
/// back with the error, so that the caller can tell which worker failed.
pub(crate) async fn try_open(
    guard: InFlight,
    request: &GenerateRequest,
    resume: Option<Resume>,
    deadline: Option<Instant>,
) -> Result<Upstream, (InFlight, RouterError)> {
    let mut client = WorkerClient::new(guard.worker().channel.clone());
    let span = tracing::info_span!(
        "attempt",
        moebius.worker = %guard.worker().id,
        moebius.resumed_tokens = resume.as_ref().map_or(0, |r| r.token_ids.len()),
    );
    let mut call = tonic::Request::new(WorkerGenerateRequest {
        request: Some(request.clone()),
        resume,
    });
    // The worker's spans join this attempt's trace.
    inject_trace_context(&span, call.metadata_mut());
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
            _span: span,
        }),
        Err(status) => {
            let err = worker_error(guard.worker(), status);
            Err((guard, err))
        }
    }
}

/// Sorts a worker's error status: the worker died, reset the connection, cannot be reached, or
/// says it cannot serve the request (UNAVAILABLE) — all `WorkerFailed`, naming the worker, and
/// the request may go elsewhere; statuses about the request itself (`INVALID_ARGUMENT`,
/// `RESOURCE_EXHAUSTED`, `DEADLINE_EXCEEDED`, ...) pass through unchanged.
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
