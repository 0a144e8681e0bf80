//! Protocol buffers of Moebius (package `moebius.v1`). The public `Inference` API and the
//! internal worker service land here with the cluster work; nothing is generated yet.
