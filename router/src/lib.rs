//! The Moebius router: the public gRPC API, the live pool of workers, routing and admission
//! control. It arrives with the cluster work; the crate exists now to keep DESIGN.md's layout.
