//! The benchmark's client of the OpenAI-compatible HTTP API: `GET /v1/models`, and a streamed
//! `POST /v1/completions` read event by event, over one HTTP/1.1 connection per request
//! (hyper, as axum serves it).

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: &str) -> Result<Sender, String> {
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connecting to {addr} timed out"))?
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP handshake with {addr}: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

/// Sends `request` to `addr` on a new connection: the response's body, or its status and
/// body as the error when it is not a success.
async fn send(
    addr: &str,
    request: hyper::http::request::Builder,
    body: Bytes,
) -> Result<hyper::body::Incoming, String> {
    let mut sender = connect(addr).await?;
    let request = request
        .header("host", addr)
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.into_body();
    if !status.is_success() {
        let text = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        return Err(format!("{status}: {}", String::from_utf8_lossy(&text)));
    }
    Ok(body)
}

/// The first model `GET /v1/models` lists.
pub async fn served_model(addr: &str) -> Result<String, String> {
    let body = send(addr, Request::get("/v1/models"), Bytes::new())
        .await
        .map_err(|e| format!("GET /v1/models: {e}"))?
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let models: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    models["data"][0]["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("GET /v1/models lists no model: {models}"))
}

/// Posts `body` to `/v1/completions` (with `"stream": true`) and calls `on_event` with each
/// event's JSON as it arrives, until `data: [DONE]`. An error event or status is an error.
pub async fn stream_completion(
    addr: &str,
    body: &Value,
    mut on_event: impl FnMut(&Value),
) -> Result<(), String> {
    let request = Request::post("/v1/completions").header("content-type", "application/json");
    let mut body = send(addr, request, Bytes::from(body.to_string())).await?;
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.extend_from_slice(data);
        // Events end with a blank line.
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            for line in text.lines() {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    return Ok(());
                }
                let value: Value = serde_json::from_str(data)
                    .map_err(|e| format!("an event is not JSON ({e}): {data}"))?;
                if let Some(error) = value.get("error") {
                    return Err(format!("the stream failed: {error}"));
                }
                on_event(&value);
            }
        }
    }
    Err("the stream ended without data: [DONE]".into())
}
