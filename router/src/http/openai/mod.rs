//! The OpenAI-compatible HTTP API on the router's HTTP port: `POST /v1/completions`,
//! `POST /v1/chat/completions` (each whole or streamed as server-sent events ending with
//! `data: [DONE]`), `GET /v1/models` and `GET /health`. A request runs through the same path as
//! a gRPC `GenerateStream` call (admission, metrics, traces, moves between workers); a client
//! that disconnects drops the stream, which cancels the sequence on its worker.

mod convert;
mod error;
mod respond;
mod wire;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use moebius_proto::v1::inference_server::Inference;
use moebius_proto::v1::{GenerateRequest, GenerateResponse};
use serde::de::DeserializeOwned;
use tokio_stream::wrappers::ReceiverStream;

use crate::auth::ApiKeys;
use crate::pool::Pool;
use crate::service::RouterService;
use error::ApiError;

/// What the handlers share.
pub(crate) struct OpenAi {
    pub service: RouterService,
    pub pool: Arc<Pool>,
    /// The name clients give as `model` (and `GET /v1/models` lists).
    pub model: String,
    /// When the router started: the model's `created`.
    pub started: u64,
    /// Largest request body, in bytes (`--max-request-bytes`).
    pub max_body: usize,
    /// The keys `/v1/...` asks for; `None`: open.
    pub keys: Option<ApiKeys>,
}

type Parts = ReceiverStream<Result<GenerateResponse, tonic::Status>>;

impl OpenAi {
    pub fn new(
        service: RouterService,
        pool: Arc<Pool>,
        model: String,
        max_body: usize,
        keys: Option<ApiKeys>,
    ) -> Self {
        Self {
            service,
            pool,
            model,
            started: unix_now(),
            max_body,
            keys,
        }
    }

    /// Refuses a `model` other than the one served.
    fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != self.model => Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "the model {m:?} does not exist here; this cluster serves {:?} (GET /v1/models)",
                    self.model
                ),
                param: Some("model".into()),
                code: Some("model_not_found"),
            }),
            _ => Ok(()),
        }
    }

    /// Starts the request: the router's streaming path, whose refusals come back here as a
    /// status before any output.
    async fn open(&self, request: GenerateRequest) -> Result<Parts, ApiError> {
        Inference::generate_stream(&self.service, tonic::Request::new(request))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| ApiError::from_status(&status))
    }
}

/// The routes of the API.
pub(crate) fn routes(api: OpenAi) -> axum::Router {
    let api = Arc::new(api);
    let v1 = axum::Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .layer(DefaultBodyLimit::max(api.max_body))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&api),
            require_key,
        ));
    axum::Router::new()
        .merge(v1)
        .route("/health", get(health))
        .with_state(api)
}

/// With API keys configured, `/v1/...` answers 401 (OpenAI's `invalid_api_key`) to a request
/// without a valid `Authorization: Bearer <key>`.
async fn require_key(State(api): State<Arc<OpenAi>>, request: Request, next: Next) -> Response {
    if let Some(keys) = &api.keys {
        let header = request.headers().get(header::AUTHORIZATION);
        if let Err(refusal) = keys.check(header.map(|v| v.as_bytes())) {
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                refusal.message(),
                "invalid_api_key",
            )
            .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return response;
        }
    }
    next.run(request).await
}

async fn completions(
    State(api): State<Arc<OpenAi>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let request: wire::CompletionRequest = parse(&headers, body, api.max_body)?;
        api.check_model(request.common.model.as_deref())?;
        let (proto, shape) = convert::completion(request)?;
        let parts = api.open(proto).await?;
        Ok::<_, ApiError>(respond::completion(parts, shape, api.model.clone()).await)
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(
    State(api): State<Arc<OpenAi>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let request: wire::ChatRequest = parse(&headers, body, api.max_body)?;
        api.check_model(request.common.model.as_deref())?;
        let (proto, shape) = convert::chat(request)?;
        let parts = api.open(proto).await?;
        Ok::<_, ApiError>(respond::chat(parts, shape, api.model.clone()).await)
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

async fn models(State(api): State<Arc<OpenAi>>) -> Response {
    Json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": api.model,
            "object": "model",
            "created": api.started,
            "owned_by": "moebius",
        }],
    }))
    .into_response()
}

/// 200 when requests can be routed, 503 when no worker can take one.
async fn health(State(api): State<Arc<OpenAi>>) -> Response {
    if !api.pool.subscribe().borrow().workers.is_empty() {
        Json(serde_json::json!({"status": "ok"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "unavailable", "message": "no worker can take a request yet"})),
        )
            .into_response()
    }
}

/// The body as JSON of `T`: wrong content type 415, too large 413, malformed 400 with where,
/// a field of the wrong type 400 naming the field.
fn parse<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    max_body: usize,
) -> Result<T, ApiError> {
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json_type {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be JSON, sent with Content-Type: application/json",
            "unsupported_media_type",
        ));
    }
    let body = body.map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                format!("the body is larger than the limit of {max_body} bytes"),
                "payload_too_large",
            )
        } else {
            ApiError::new(status, rejection.body_text(), "invalid_body")
        }
    })?;
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON: {e}"),
            "invalid_json",
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
            "invalid_request",
        ));
    }
    typed::<T>(&value).map_err(|(path, message)| {
        // Fields shared by both endpoints sit in a flattened struct, where serde loses the
        // path: read them alone to name the field.
        let (path, message) = match (path.as_str(), typed::<wire::Common>(&value)) {
            (".", Err(shared)) => shared,
            _ => (path, message),
        };
        if path == "." {
            ApiError::new(StatusCode::BAD_REQUEST, message, "invalid_request")
        } else {
            ApiError::field(&path, message)
        }
    })
}

/// For the fuzz targets: `body` through the checks and the conversion of both endpoints, and
/// the converted request through the router's own validation.
pub(crate) fn decode_untrusted(body: &[u8]) {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    let bytes = || Ok(Bytes::copy_from_slice(body));
    let converted = [
        parse::<wire::CompletionRequest>(&headers, bytes(), usize::MAX)
            .and_then(convert::completion),
        parse::<wire::ChatRequest>(&headers, bytes(), usize::MAX).and_then(convert::chat),
    ];
    for (request, _) in converted.into_iter().flatten() {
        let _ = crate::request::validate(&request);
    }
}

/// `value` as a `T`, or the path of the field that does not fit and why.
fn typed<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value)
        .map_err(|e| (e.path().to_string(), e.into_inner().to_string()))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
