//! One module per cluster subcommand: flags into config structs, then the crate's `run`.
pub mod admin;
pub mod check;
pub mod coordinator;
pub mod health;
pub mod metrics;
pub mod router;
pub mod supervise;
pub mod tls;
pub mod up;
pub mod worker;

use tokio_util::sync::CancellationToken;

/// A command refused for input the user can fix: the binary exits 2 with its line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Cancels `token` on Ctrl-C or SIGTERM.
pub(crate) async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
    token.cancel();
}
