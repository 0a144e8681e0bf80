//! Logs and traces of the `moebius` binary: log lines on stderr (text, or JSON with
//! `--log-format json`), filtered by `MOEBIUS_LOG`; and, when an OTLP endpoint is given
//! (`--otlp-endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT`), the spans of the Moebius crates
//! exported over OTLP/gRPC, with W3C trace context between the parts. Without an endpoint no
//! exporter, propagator or OpenTelemetry layer exists: tracing costs what it costs without it.

use anyhow::{Context, Result};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// How log lines are written.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// The flag's value that selects this format.
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Keeps the trace exporter running; dropping it exports what is left.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// Runs the exporter's gRPC channel.
    _runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("warning: the last spans were not exported: {e}");
            }
        }
    }
}

/// Installs the logs, and the trace exporter when `otlp_endpoint` is set; `service` names
/// this process in the traces (`moebius-router`, `moebius-worker`, ...).
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>, service: &str) -> Result<Telemetry> {
    let filter = EnvFilter::try_from_env("MOEBIUS_LOG").unwrap_or_else(|_| "warn".into());
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.with_filter(filter).boxed(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
    };
    let Some(endpoint) = otlp_endpoint.filter(|e| !e.is_empty()) else {
        Registry::default().with(logs).init();
        return Ok(Telemetry {
            provider: None,
            _runtime: None,
        });
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .context("cannot start the trace exporter's runtime")?;
    let exporter = runtime
        .block_on(async {
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
        })
        .with_context(|| format!("cannot export traces to --otlp-endpoint {endpoint}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service.to_string())
                .build(),
        )
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // Spans of the Moebius crates only, whatever the log filter says.
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("moebius"))
        .with_filter(
            Targets::new()
                .with_target("moebius", tracing::Level::INFO)
                .with_target("moebius_router", tracing::Level::INFO)
                .with_target("moebius_worker", tracing::Level::INFO)
                .with_target("moebius_coordinator", tracing::Level::INFO),
        );
    Registry::default().with(logs).with(spans).init();
    Ok(Telemetry {
        provider: Some(provider),
        _runtime: Some(runtime),
    })
}
