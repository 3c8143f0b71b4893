//! HTTP routes of the admin API (axum). Every route answers JSON; errors
//! are an [`ApiError`] body with the status of their [`ControlError`].
//!
//! | method | path | body / answer |
//! |---|---|---|
//! | GET | `/v1/cluster` | [`ClusterStatus`] |
//! | GET | `/v1/nodes` | `[NodeInfo]` |
//! | GET | `/v1/nodes/{id}` | [`NodeInfo`] |
//! | POST | `/v1/nodes` | [`AddNode`] -> [`NodeInfo`] (201) |
//! | DELETE | `/v1/nodes/{id}` | 204 |
//! | GET | `/v1/volumes` | `[VolumeInfo]` |
//! | POST | `/v1/volumes` | [`CreateVolume`] -> [`VolumeInfo`] (201) |
//! | GET | `/v1/volumes/{name}` | [`VolumeInfo`] with extents and health |
//! | DELETE | `/v1/volumes/{name}` | 204 |
//! | POST | `/v1/volumes/{name}/verify` | [`VolumeVerify`] (200): every extent's replicas compared |
//! | POST | `/v1/volumes/{name}/resize` | [`ResizeVolume`] -> [`VolumeInfo`] (200); 409 for a shrink without `allow_shrink` or with NBD clients connected |
//! | GET | `/healthz` | 200 while the process runs |
//! | GET | `/readyz` | 200 when serving, else 503 and why |
//! | GET | `/metrics` | Prometheus text format |
//!
//! GET routes take `?stale=true` to answer from local state without a
//! read-index round to the leader.

use super::metrics::Metrics;
use super::{AddNode, ApiError, Control, ControlError, CreateVolume, ResizeVolume};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

type Ctl = Arc<dyn Control>;

#[derive(Debug, Deserialize, Default)]
struct ReadOpts {
    #[serde(default)]
    stale: bool,
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let status = match self {
            ControlError::Invalid(_) => StatusCode::BAD_REQUEST,
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Conflict(_) => StatusCode::CONFLICT,
            ControlError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ControlError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::warn!(error = %self, "admin request failed");
        }
        let body = ApiError { error: self.code().into(), message: self.to_string() };
        (status, axum::Json(body)).into_response()
    }
}

type Answer<T> = Result<T, ControlError>;

fn json<T: serde::Serialize>(status: StatusCode, v: T) -> Response {
    (status, axum::Json(v)).into_response()
}

/// Parses a JSON body ourselves so a bad one gets our error shape.
fn body<T: serde::de::DeserializeOwned>(b: &Bytes) -> Answer<T> {
    serde_json::from_slice(b).map_err(|e| ControlError::Invalid(format!("request body: {e}")))
}

fn node_id(s: &str) -> Answer<u64> {
    s.parse().map_err(|_| ControlError::Invalid(format!("node id {s:?} is not a number")))
}

async fn cluster(State(c): State<Ctl>, Query(q): Query<ReadOpts>) -> Answer<Response> {
    Ok(json(StatusCode::OK, c.cluster(q.stale).await?))
}

async fn nodes(State(c): State<Ctl>, Query(q): Query<ReadOpts>) -> Answer<Response> {
    Ok(json(StatusCode::OK, c.cluster(q.stale).await?.nodes))
}

async fn node(State(c): State<Ctl>, Path(id): Path<String>, Query(q): Query<ReadOpts>) -> Answer<Response> {
    let id = node_id(&id)?;
    let status = c.cluster(q.stale).await?;
    let n = status.nodes.into_iter().find(|n| n.id == id);
    n.map(|n| json(StatusCode::OK, n)).ok_or_else(|| ControlError::NotFound(format!("no node {id}")))
}

async fn add_node(State(c): State<Ctl>, b: Bytes) -> Answer<Response> {
    let req: AddNode = body(&b)?;
    Ok(json(StatusCode::CREATED, c.add_node(req.peer).await?))
}

async fn remove_node(State(c): State<Ctl>, Path(id): Path<String>) -> Answer<Response> {
    c.remove_node(node_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn volumes(State(c): State<Ctl>, Query(q): Query<ReadOpts>) -> Answer<Response> {
    Ok(json(StatusCode::OK, c.volumes(q.stale).await?))
}

async fn volume(
    State(c): State<Ctl>,
    Path(name): Path<String>,
    Query(q): Query<ReadOpts>,
) -> Answer<Response> {
    Ok(json(StatusCode::OK, c.volume(name, q.stale).await?))
}

async fn create_volume(State(c): State<Ctl>, b: Bytes) -> Answer<Response> {
    let req: CreateVolume = body(&b)?;
    Ok(json(StatusCode::CREATED, c.create_volume(req).await?))
}

async fn delete_volume(State(c): State<Ctl>, Path(name): Path<String>) -> Answer<Response> {
    c.delete_volume(name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn resize_volume(State(c): State<Ctl>, Path(name): Path<String>, b: Bytes) -> Answer<Response> {
    let req: ResizeVolume = body(&b)?;
    Ok(json(StatusCode::OK, c.resize_volume(name, req).await?))
}

async fn verify_volume(State(c): State<Ctl>, Path(name): Path<String>) -> Answer<Response> {
    Ok(json(StatusCode::OK, c.verify_volume(name).await?))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(c): State<Ctl>) -> Response {
    match c.ready() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")).into_response(),
    }
}

async fn metrics(State(m): State<Arc<Metrics>>) -> Response {
    let ct = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(axum::http::header::CONTENT_TYPE, ct)], m.encode()).into_response()
}

async fn unknown_route() -> ControlError {
    ControlError::NotFound("no such route; see README \"Admin API\" for the list".into())
}

/// The admin API's routes over `control`, and `/metrics` from `metrics`.
pub fn router(control: Ctl, m: Arc<Metrics>) -> Router {
    let metrics_route = Router::new().route("/metrics", get(metrics)).with_state(m);
    Router::new()
        .route("/v1/cluster", get(cluster))
        .route("/v1/nodes", get(nodes).post(add_node))
        .route("/v1/nodes/{id}", get(node).delete(remove_node))
        .route("/v1/volumes", get(volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(volume).delete(delete_volume))
        .route("/v1/volumes/{name}/resize", axum::routing::post(resize_volume))
        .route("/v1/volumes/{name}/verify", axum::routing::post(verify_volume))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(unknown_route)
        .with_state(control)
        .merge(metrics_route)
}

/// Serves the admin API on `listener` until `cancel`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    control: Ctl,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(control, metrics)).with_graceful_shutdown(cancel.cancelled_owned()).await
}
