//! The public `moebius.v1.Inference` service: checks a request, opens a [`Session`] for it, and
//! returns its tokens whole (`Generate`) or as they come (`GenerateStream`); the session moves
//! the request to another worker when its worker is lost.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use moebius_coordinator::telemetry::record_trace_id;
use moebius_proto::v1::inference_server::Inference;
use moebius_proto::v1::{GenerateRequest, GenerateResponse};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Code, Request, Response, Status};
use tracing::{debug, info_span, warn, Instrument};

use crate::config::RouterConfig;
use crate::error::RouterError;
use crate::metrics::{Meter, RouterMetrics};
use crate::pool::Pool;
use crate::request::{merge, time_limit, validate, RequestIds};
use crate::session::{Session, SessionLimits};

/// Messages buffered between a worker's stream and a slow client.
const STREAM_BUFFER: usize = 16;
/// How long the last message of a stream (an error) may wait for a client that does not read.
const FINAL_SEND: Duration = Duration::from_secs(1);

/// The `Inference` service; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct RouterService {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    pool: Arc<Pool>,
    metrics: Arc<RouterMetrics>,
    ids: RequestIds,
    request_timeout: Option<Duration>,
    epoch_wait: Duration,
    migration_limit: u32,
    /// Cancelled when shutdown's drain period is over: in-flight requests end `UNAVAILABLE`.
    drain: CancellationToken,
    /// The relay tasks of open streams, so shutdown can wait for them.
    relays: TaskTracker,
}

impl RouterService {
    pub fn new(
        pool: Arc<Pool>,
        config: &RouterConfig,
        drain: CancellationToken,
        relays: TaskTracker,
    ) -> Self {
        Self {
            inner: Arc::new(Shared {
                metrics: Arc::clone(pool.metrics()),
                pool,
                ids: RequestIds::new(),
                request_timeout: config.request_timeout,
                epoch_wait: config.epoch_wait,
                migration_limit: config.migration_limit,
                drain,
                relays,
            }),
        }
    }

    /// Checks the request, gives it an id, and computes its deadline.
    fn admit(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<(GenerateRequest, Call), RouterError> {
        let started = Instant::now();
        let deadline =
            time_limit(request.metadata(), self.inner.request_timeout).map(|limit| started + limit);
        let mut request = request.into_inner();
        validate(&request)?;
        self.inner.ids.fill(&mut request);
        // Every sampled request gets a seed, so that it can be resumed on another worker with
        // the tokens it would have had.
        if let Some(sampling) = request.sampling.as_mut() {
            if sampling.temperature > 0.0 && sampling.seed.is_none() {
                sampling.seed = Some(self.inner.ids.random());
            }
        }
        let call = Call {
            started,
            deadline,
            drain: self.inner.drain.clone(),
        };
        Ok((request, call))
    }

    async fn open(&self, request: GenerateRequest, call: &Call) -> Result<Session, RouterError> {
        let limits = SessionLimits {
            deadline: call.deadline,
            epoch_wait: self.inner.epoch_wait,
            migration_limit: self.inner.migration_limit,
        };
        call.bounded(Session::open(Arc::clone(&self.inner.pool), request, limits))
            .await
    }
}

/// One request's limits: when it started, its deadline, and the shutdown cut-off.
#[derive(Debug, Clone)]
struct Call {
    started: Instant,
    deadline: Option<Instant>,
    drain: CancellationToken,
}

impl Call {
    /// Runs `work` until it ends, the deadline passes, or shutdown cuts it off.
    async fn bounded<T>(
        &self,
        work: impl Future<Output = Result<T, RouterError>>,
    ) -> Result<T, RouterError> {
        tokio::select! {
            result = work => result,
            _ = self.expired() => Err(RouterError::DeadlineExceeded(self.started.elapsed())),
            _ = self.drain.cancelled() => Err(RouterError::ShuttingDown),
        }
    }

    async fn expired(&self) {
        match self.deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    }
}

/// The span of one request: the trace's root on the router, with the OpenTelemetry GenAI
/// attributes of the request; the usage and the outcome are recorded when it ends.
fn request_span(request: &GenerateRequest) -> tracing::Span {
    let sampling = request.sampling.unwrap_or_default();
    let span = info_span!(
        "generate",
        request_id = %request.request_id,
        trace_id = tracing::field::Empty,
        gen_ai.operation.name = "text_completion",
        gen_ai.system = "moebius",
        gen_ai.request.max_tokens = request.max_new_tokens,
        gen_ai.request.temperature = f64::from(sampling.temperature),
        gen_ai.request.top_p = f64::from(sampling.top_p),
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    record_trace_id(&span);
    span
}

fn report(request_id: &str, err: RouterError) -> Status {
    match &err {
        RouterError::WorkerFailed { .. }
        | RouterError::MigrationsExhausted { .. }
        | RouterError::ShuttingDown => {
            warn!(request_id, kind = err.kind(), "request failed: {err}")
        }
        _ => debug!(request_id, kind = err.kind(), "request failed: {err}"),
    }
    err.into()
}

#[tonic::async_trait]
impl Inference for RouterService {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let mut meter = self.inner.metrics.meter(Instant::now());
        let (request, call) = match self.admit(request) {
            Ok(admitted) => admitted,
            Err(e) => return Err(meter.fail(report("", e))),
        };
        let request_id = request.request_id.clone();
        let span = request_span(&request);
        meter.trace(span.clone());
        let work = async {
            let mut session = self.open(request, &call).await?;
            let mut whole = GenerateResponse::default();
            while let Some(part) = session.next().await? {
                meter.message(&part);
                merge(&mut whole, part);
            }
            whole.request_id = request_id.clone();
            Ok(whole)
        };
        match call.bounded(work).instrument(span).await {
            Ok(whole) => {
                meter.finish(Code::Ok);
                Ok(Response::new(whole))
            }
            Err(err) => Err(meter.fail(report(&request_id, err))),
        }
    }

    type GenerateStreamStream = ReceiverStream<Result<GenerateResponse, Status>>;

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let mut meter = self.inner.metrics.meter(Instant::now());
        let (request, call) = match self.admit(request) {
            Ok(admitted) => admitted,
            Err(e) => return Err(meter.fail(report("", e))),
        };
        // Opening happens before the response starts, so that refusals (bad input for the
        // model, capacity, no epoch) reach the client as a plain status, as for `Generate`.
        let request_id = request.request_id.clone();
        let span = request_span(&request);
        meter.trace(span.clone());
        let opened = self.open(request, &call).instrument(span.clone()).await;
        let session = match opened {
            Ok(session) => session,
            Err(e) => return Err(meter.fail(report(&request_id, e))),
        };
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        self.inner
            .relays
            .spawn(relay(session, tx, request_id, call, meter).instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Forwards a session's messages to the client until either ends. A client that went away (the
/// channel closed) or a passed deadline drops the session and with it the worker's stream,
/// which cancels the sequence on the worker.
async fn relay(
    mut session: Session,
    tx: mpsc::Sender<Result<GenerateResponse, Status>>,
    request_id: String,
    call: Call,
    mut meter: Meter,
) {
    let end = loop {
        let next = tokio::select! {
            _ = tx.closed() => break None,
            next = call.bounded(session.next()) => next,
        };
        let mut message = match next {
            Ok(Some(message)) => message,
            Ok(None) => break None,
            Err(err) => break Some(err),
        };
        message.request_id.clone_from(&request_id);
        meter.message(&message);
        // `Ok(false)`: the client went away.
        let sent = call.bounded(async { Ok(tx.send(Ok(message)).await.is_ok()) });
        match sent.await {
            Ok(true) => {}
            Ok(false) => break None,
            Err(err) => break Some(err),
        }
    };
    // Drop the worker's stream (and its place in the count) before telling the client.
    let worker = session.worker().unwrap_or_default().to_string();
    let migrations = session.migrations();
    drop(session);
    match end {
        None if tx.is_closed() => {
            // The meter, dropped, counts the request as cancelled.
            debug!(%request_id, %worker, "client went away; worker stream dropped")
        }
        None => {
            meter.finish(Code::Ok);
            debug!(%request_id, %worker, migrations, "stream finished")
        }
        Some(err) => {
            let status = meter.fail(report(&request_id, err));
            let _ = tokio::time::timeout(FINAL_SEND, tx.send(Err(status))).await;
        }
    }
}
