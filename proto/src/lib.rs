//! Protocol buffers of Moebius, package `moebius.v1`, and their generated gRPC code:
//! - `moebius/v1/inference.proto`: the public `Inference` service of the router;
//! - `moebius/v1/worker.proto`: the internal `Worker` service the router calls;
//! - `moebius/v1/admin.proto`: the operator's `Admin` service of the leading coordinator.
//!
//! [`FILE_DESCRIPTOR_SET`] feeds server reflection; [`deadline`] reads the `grpc-timeout`
//! header of the gRPC wire format, shared by both servers.

pub mod deadline;

/// Generated types and services of `moebius.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("moebius.v1");
}

/// The encoded descriptors of every `moebius.v1` file, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("moebius_descriptor");

impl From<v1::GenerateRequest> for v1::WorkerGenerateRequest {
    /// A first attempt: nothing to resume.
    fn from(request: v1::GenerateRequest) -> Self {
        Self {
            request: Some(request),
            resume: None,
        }
    }
}
