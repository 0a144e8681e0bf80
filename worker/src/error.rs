//! The worker crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in the worker: loading a checkpoint, a bad request, the data
/// plane. Each variant has a stable short name ([`Error::kind`]) for metrics labels.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is missing: a checkpoint directory needs config.json and *.safetensors files")]
    MissingFile { path: PathBuf },
    #[error(
        "{path}: not a valid safetensors file ({message}); is it truncated or still downloading?"
    )]
    Safetensors { path: PathBuf, message: String },
    #[error("tensor {name} is not in the checkpoint")]
    MissingTensor { name: String },
    #[error("tensor {name} has shape {found:?}, but the config implies {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {name} has dtype {dtype}, which Moebius cannot load (f32, bf16, f16, f8_e4m3 are supported)")]
    UnsupportedDtype { name: String, dtype: String },
    #[error("config.json: {0}")]
    Config(String),
    #[error(
        "architecture {0:?} is not supported (DeepseekV3ForCausalLM and DeepseekV2ForCausalLM are)"
    )]
    UnsupportedArchitecture(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("placement: {0}")]
    Placement(#[from] moebius_coordinator::PlacementError),
    #[error("data plane: {0}")]
    Comm(String),
    /// A collective failed because of its peers: `peers` are the ranks it is blamed on (dead,
    /// hung, or sending garbage; empty when no culprit could be told).
    #[error("data plane: {message}")]
    PeerFailed { peers: Vec<usize>, message: String },
    /// This worker cannot serve now (not in the active epoch, its EP group failed, shutting
    /// down); the router retries elsewhere.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Admission control refused: the worker's queue is full.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The client's deadline passed before the generation finished.
    #[error("deadline exceeded after {0:?}")]
    DeadlineExceeded(std::time::Duration),
    #[error("topology store: {0}")]
    Store(#[from] moebius_coordinator::StoreError),
    /// Serving gRPC or binding a listener failed.
    #[error("serving: {0}")]
    Serve(String),
    /// A compute device (a GPU) could not be opened or failed.
    #[error("device: {0}")]
    Device(String),
}

impl Error {
    /// A stable short name of the variant, for metrics labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::MissingFile { .. } => "missing_file",
            Error::Safetensors { .. } => "safetensors",
            Error::MissingTensor { .. } => "missing_tensor",
            Error::TensorShape { .. } => "tensor_shape",
            Error::UnsupportedDtype { .. } => "unsupported_dtype",
            Error::Config(_) => "config",
            Error::UnsupportedArchitecture(_) => "unsupported_architecture",
            Error::Tokenizer(_) => "tokenizer",
            Error::InvalidRequest(_) => "invalid_request",
            Error::Placement(_) => "placement",
            Error::Comm(_) => "comm",
            Error::PeerFailed { .. } => "peer_failed",
            Error::Unavailable(_) => "unavailable",
            Error::Overloaded(_) => "overloaded",
            Error::DeadlineExceeded(_) => "deadline_exceeded",
            Error::Store(_) => "store",
            Error::Serve(_) => "serve",
            Error::Device(_) => "device",
        }
    }
}

/// Result with the worker's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
