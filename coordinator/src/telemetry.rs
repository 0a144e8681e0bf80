//! What every part exports for watching it: a Prometheus registry under the `moebius_` prefix,
//! the HTTP server that answers `GET /metrics` with it in the OpenMetrics text format, and the
//! W3C trace context carried in gRPC metadata from one part's span to the next part's.
//!
//! Each crate keeps its own metrics in a struct that registers itself into a [`Registry`]
//! (`RouterMetrics`, `WorkerMetrics`, [`CoordinatorMetrics`](crate::CoordinatorMetrics)); the
//! binary builds the registry, hands the structs to the parts and serves the registry here.
//! Metrics that are not registered anywhere (tests, benchmarks) still count, unseen.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use opentelemetry::global;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use prometheus_client::encoding::text::encode;
pub use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::peers::{GatedListener, PerPeer};
use crate::tls::{Tls, TlsListener};

/// The content type of the OpenMetrics text exposition.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// An empty registry that names every metric `moebius_<name>`.
pub fn registry() -> Registry {
    Registry::with_prefix("moebius")
}

/// `GET /metrics`, answering with `registry`.
pub fn metrics_routes(registry: Arc<Registry>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        get(move || {
            let registry = Arc::clone(&registry);
            async move { exposition(&registry) }
        }),
    )
}

fn exposition(registry: &Registry) -> Response {
    let mut body = String::with_capacity(16 * 1024);
    match encode(&mut body, registry) {
        Ok(()) => ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the metrics: {e}"),
        )
            .into_response(),
    }
}

/// Binds `addr` for an HTTP server, with an error that names the flag it came from.
pub async fn bind(addr: SocketAddr, flag: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {flag} {addr}: {e}")))
}

/// Serves `app` on `listener` until `stop` is cancelled: over TLS with `tls` (our certificate,
/// no client certificate asked), plain HTTP without; at most `per_peer` connections from one
/// address.
pub async fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    stop: CancellationToken,
    tls: Option<&Tls>,
    per_peer: Arc<PerPeer>,
) -> std::io::Result<()> {
    let listener = GatedListener::new(listener, per_peer);
    if let Some(tls) = tls {
        let listener = TlsListener::new(listener, tls.http_acceptor())?;
        return axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

/// Writes the W3C trace context of `span` (`traceparent`, `tracestate`) into gRPC `metadata`,
/// so that the callee's spans join the caller's trace. Writes nothing while tracing is off (the
/// global propagator is a no-op until the binary installs one).
pub fn inject_trace_context(span: &tracing::Span, metadata: &mut MetadataMap) {
    let context = span.context();
    global::get_text_map_propagator(|p| {
        p.inject_context(&context, &mut MetadataInjector(metadata))
    });
}

/// Makes `span` a child of the trace context in `metadata`, when there is one.
pub fn adopt_trace_context(span: &tracing::Span, metadata: &MetadataMap) {
    let context = global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(metadata)));
    if context.span().span_context().is_valid() {
        // Fails only when the span is disabled (tracing off): nothing to join then.
        let _ = span.set_parent(context);
    }
}

/// The trace id of `span` in hex, when it belongs to a trace (tracing on); for log lines.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// Records `trace_id` on `span` (declared on it as an empty field), so that JSON log lines
/// inside it carry the trace they belong to.
pub fn record_trace_id(span: &tracing::Span) {
    if let Some(id) = trace_id(span) {
        span.record("trace_id", id.as_str());
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[test]
    fn names_carry_the_prefix_and_counters_end_in_total() {
        let mut registry = registry();
        let requests: Counter = Counter::default();
        registry.register("router_requests", "Requests", requests.clone());
        requests.inc_by(3);
        let mut body = String::new();
        encode(&mut body, &registry).expect("encodes");
        assert!(body.contains("moebius_router_requests_total 3"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
    }
}
