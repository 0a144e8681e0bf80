//! The `moebius` binary.
fn main() {}
