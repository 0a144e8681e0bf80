//! The router's HTTP port: the OpenAI-compatible API (`/v1/...`, `/health`), Prometheus
//! metrics (`GET /metrics`) and the live built-in dashboard (`GET /dashboard`, a page embedded
//! in the binary, and `GET /dashboard/state`, the JSON it polls: topology, placement, expert
//! load).

pub(crate) mod openai;
mod state;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use moebius_coordinator::telemetry::{metrics_routes, Registry};
use moebius_coordinator::{Keys, TopologyStore};

use crate::pool::Pool;

/// The dashboard page: one file, no resource from elsewhere (a cluster may have no internet).
const DASHBOARD: &str = include_str!("dashboard.html");

/// What the dashboard's handlers read.
pub(crate) struct Dashboard {
    pub cluster: String,
    pub store: Arc<dyn TopologyStore>,
    pub keys: Keys,
    pub pool: Arc<Pool>,
}

/// Every route of the HTTP port.
pub(crate) fn app(
    dashboard: Dashboard,
    registry: Arc<Registry>,
    api: openai::OpenAi,
) -> axum::Router {
    // `/metrics`, `/dashboard` and `/health` stay open, for Prometheus, probes and people;
    // with API keys configured, the API under `/v1` asks for one.
    axum::Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/", get(page))
        .route("/dashboard/state", get(dashboard_state))
        .with_state(Arc::new(dashboard))
        .merge(openai::routes(api))
        .merge(metrics_routes(registry))
        .route(
            "/",
            get(|| async { axum::response::Redirect::to("/dashboard") }),
        )
}

async fn page() -> Html<&'static str> {
    Html(DASHBOARD)
}

async fn dashboard_state(State(dashboard): State<Arc<Dashboard>>) -> Response {
    match state::read(&dashboard).await {
        Ok(state) => Json(state).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({"error": format!("cannot read the topology: {e}")}).to_string(),
        )
            .into_response(),
    }
}
