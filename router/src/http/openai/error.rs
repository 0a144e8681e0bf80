//! OpenAI's error object (`{"error": {"message", "type", "param", "code"}}`) with the HTTP
//! status that goes with it, made from a bad field or from the gRPC status of a request.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tonic::Code;

/// An error answered in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 for the field `param`.
    pub fn field(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: format!("{param}: {}", message.into()),
            param: Some(param.to_owned()),
            code: Some("invalid_value"),
        }
    }

    pub fn new(status: StatusCode, message: impl Into<String>, code: &'static str) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: Some(code),
        }
    }

    /// The HTTP status and error of a request the router or a worker refused or failed.
    pub fn from_status(status: &tonic::Status) -> Self {
        let (http, code) = match status.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                (StatusCode::BAD_REQUEST, "invalid_request")
            }
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded"),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            Code::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "invalid_api_key"),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied"),
            Code::Cancelled => (StatusCode::from_u16(499).expect("499"), "cancelled"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        };
        Self::new(http, status.message(), code)
    }

    /// OpenAI's `type`: the class of the error.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::NOT_FOUND => "not_found_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The error as an SSE event's JSON, for a stream that fails after it started.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_the_http_codes_openai_clients_expect() {
        for (code, http, kind) in [
            (Code::InvalidArgument, 400, "invalid_request_error"),
            (Code::ResourceExhausted, 429, "rate_limit_error"),
            (Code::Unavailable, 503, "server_error"),
            (Code::DeadlineExceeded, 504, "server_error"),
            (Code::NotFound, 404, "not_found_error"),
            (Code::Internal, 500, "server_error"),
        ] {
            let error = ApiError::from_status(&tonic::Status::new(code, "why"));
            assert_eq!(error.status.as_u16(), http, "{code:?}");
            let body = error.body();
            assert_eq!(body["error"]["type"], kind, "{code:?}");
            assert_eq!(body["error"]["message"], "why");
        }
    }
}
