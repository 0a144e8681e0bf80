//! The router's one error type, and the one place that maps it to gRPC status codes.

use std::net::SocketAddr;
use std::time::Duration;

use tonic::{Code, Status};

/// Everything that can go wrong in the router, for a request or for the server.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The request is malformed in a way the router sees without the model.
    #[error("{0}")]
    InvalidRequest(String),
    /// No epoch is active (the cluster is starting or re-forming) and none became active in
    /// time.
    #[error("no active epoch: the cluster is re-forming (waited {waited:?}); retry shortly")]
    NoActiveEpoch { waited: Duration },
    /// An epoch is active but none of its workers is still registered and reachable.
    #[error("no live worker: every worker of epoch {epoch} is gone or unreachable; retry shortly")]
    NoLiveWorkers { epoch: u64 },
    /// Admission control: every routable worker already has its maximum in flight.
    #[error("all {workers} workers are at capacity ({in_flight} requests in flight); retry later")]
    AtCapacity { workers: usize, in_flight: u64 },
    /// A worker failed while serving the request (died, connection reset, unreachable).
    #[error("worker {worker} at {address} failed: {message}; retry the request")]
    WorkerFailed {
        worker: String,
        address: String,
        message: String,
    },
    /// The request lost its worker more often than the router's migration limit allows.
    #[error(
        "the request was resubmitted {limit} times after losing its worker (the limit, \
         --migration-limit) and lost it again: {last}"
    )]
    MigrationsExhausted { limit: u32, last: String },
    /// A status a worker answered on purpose (bad input for the model, its own queue full);
    /// passed to the client unchanged.
    #[error("{}", .0.message())]
    Worker(#[from] Status),
    /// A client (the benchmark) cannot connect to a server.
    #[error("cannot reach {address}: {message}")]
    Unreachable { address: String, message: String },
    /// The client's deadline or the router's request timeout passed.
    #[error(
        "deadline exceeded after {0:?} (the client's deadline or the router's request timeout)"
    )]
    DeadlineExceeded(Duration),
    /// The router is shutting down and cut the request off.
    #[error("the router is shutting down; retry on another router")]
    ShuttingDown,
    /// The configuration is invalid.
    #[error("invalid router config: {0}")]
    Config(String),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}; pick a free address or port 0")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// Server reflection could not be set up from the embedded descriptors.
    #[error("server reflection: {0}")]
    Reflection(String),
}

impl RouterError {
    /// A stable short name of the variant, for metrics labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            RouterError::InvalidRequest(_) => "invalid_request",
            RouterError::NoActiveEpoch { .. } => "no_active_epoch",
            RouterError::NoLiveWorkers { .. } => "no_live_workers",
            RouterError::AtCapacity { .. } => "at_capacity",
            RouterError::WorkerFailed { .. } => "worker_failed",
            RouterError::MigrationsExhausted { .. } => "migrations_exhausted",
            RouterError::Worker(_) => "worker_status",
            RouterError::Unreachable { .. } => "unreachable",
            RouterError::DeadlineExceeded(_) => "deadline_exceeded",
            RouterError::ShuttingDown => "shutting_down",
            RouterError::Config(_) => "config",
            RouterError::Bind { .. } => "bind",
            RouterError::Serve(_) => "serve",
            RouterError::Reflection(_) => "reflection",
        }
    }
}

impl From<RouterError> for Status {
    fn from(err: RouterError) -> Status {
        let code = match &err {
            RouterError::Worker(status) => return status.clone(),
            RouterError::InvalidRequest(_) => Code::InvalidArgument,
            RouterError::AtCapacity { .. } => Code::ResourceExhausted,
            RouterError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            RouterError::NoActiveEpoch { .. }
            | RouterError::NoLiveWorkers { .. }
            | RouterError::WorkerFailed { .. }
            | RouterError::MigrationsExhausted { .. }
            | RouterError::Unreachable { .. }
            | RouterError::ShuttingDown => Code::Unavailable,
            RouterError::Config(_)
            | RouterError::Bind { .. }
            | RouterError::Serve(_)
            | RouterError::Reflection(_) => Code::Internal,
        };
        Status::new(code, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let cases = [
            (
                RouterError::InvalidRequest("x".into()),
                Code::InvalidArgument,
            ),
            (
                RouterError::AtCapacity {
                    workers: 2,
                    in_flight: 8,
                },
                Code::ResourceExhausted,
            ),
            (
                RouterError::NoActiveEpoch {
                    waited: Duration::from_secs(1),
                },
                Code::Unavailable,
            ),
            (
                RouterError::Worker(Status::invalid_argument("prompt too long")),
                Code::InvalidArgument,
            ),
            (
                RouterError::DeadlineExceeded(Duration::from_secs(1)),
                Code::DeadlineExceeded,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(Status::from(err).code(), code);
        }
        let status = Status::from(RouterError::AtCapacity {
            workers: 2,
            in_flight: 8,
        });
        assert_eq!(
            status.message(),
            "all 2 workers are at capacity (8 requests in flight); retry later"
        );
    }
}
