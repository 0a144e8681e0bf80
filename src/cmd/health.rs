//! `moebius health`: one gRPC health check of a part, as a probe makes it. Kubernetes' own
//! gRPC probes cannot speak TLS, so a chart with TLS probes through this command (an exec
//! probe, with the part's own `MOEBIUS_TLS_*` variables). Exit 0 when the service is SERVING;
//! 1 with one line otherwise.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::tls::TlsArgs;

/// Flags of `moebius health`.
#[derive(Args, Debug)]
pub struct HealthArgs {
    /// The part's gRPC address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    addr: String,
    /// The service to ask about: "" (the whole part, e.g. a worker in the active epoch),
    /// `liveness` (the process answers), `moebius.v1.Inference` (the router can route).
    #[arg(long, default_value = "")]
    service: String,
    /// Seconds the check may take.
    #[arg(long, default_value_t = 2.0)]
    timeout_s: f64,
    #[command(flatten)]
    tls: TlsArgs,
}

pub fn run(args: HealthArgs) -> Result<()> {
    let timeout = Duration::try_from_secs_f64(args.timeout_s)
        .ok()
        .filter(|t| !t.is_zero())
        .ok_or_else(|| {
            super::UsageError(format!(
                "--timeout-s {}: give seconds above 0",
                args.timeout_s
            ))
        })?;
    let tls = args.tls.load()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let status = runtime.block_on(async {
        let endpoint = moebius_coordinator::tls::endpoint(&args.addr, tls.as_ref())
            .with_context(|| format!("{:?} is not an address", args.addr))?
            .connect_timeout(timeout)
            .timeout(timeout);
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot reach {}", args.addr))?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: args.service.clone(),
            })
            .await
            .map_err(|s| anyhow!("{}: {:?}: {}", args.addr, s.code(), s.message()))?;
        Ok::<_, anyhow::Error>(reply.into_inner().status)
    })?;
    let name = ServingStatus::try_from(status)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN");
    if status == ServingStatus::Serving as i32 {
        println!("{name}");
        Ok(())
    } else {
        Err(anyhow!(
            "{} answers {name} for {:?}",
            args.addr,
            args.service
        ))
    }
}
