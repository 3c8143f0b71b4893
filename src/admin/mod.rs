//! The admin API: HTTP/JSON on the admin address, used by the `basalt`
//! CLI (and later the CSI driver).
//!
//! Owns: the wire types (`api`), whose JSON field names are a stable
//! contract (README lists them), and the HTTP routes (`server`). It never
//! decides anything itself: every request goes to a [`Control`], which the
//! daemon implements over the metadata group, so a metadata write through
//! any node's admin API is forwarded to the Raft leader there.

pub mod api;
pub mod metrics;
pub mod server;

pub use api::*;
use futures::future::BoxFuture;

/// Why an admin request failed; each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The request is malformed or names impossible values (400).
    #[error("{0}")]
    Invalid(String),
    /// The named volume or node does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// A volume of that name exists, or the change conflicts with the
    /// current state (409).
    #[error("{0}")]
    Conflict(String),
    /// The metadata group cannot commit now: no leader, or no quorum (503).
    #[error("{0}")]
    Unavailable(String),
    /// Anything else; the message says what failed (500).
    #[error("{0}")]
    Internal(String),
}

impl ControlError {
    /// The stable `error` code of the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            ControlError::Invalid(_) => "invalid",
            ControlError::NotFound(_) => "not_found",
            ControlError::Conflict(_) => "conflict",
            ControlError::Unavailable(_) => "unavailable",
            ControlError::Internal(_) => "internal",
        }
    }
}

pub type ControlResult<'a, T> = BoxFuture<'a, Result<T, ControlError>>;

/// What the admin API asks of the node. Reads are linearizable unless
/// `stale` is true.
pub trait Control: Send + Sync + 'static {
    fn cluster(&self, stale: bool) -> ControlResult<'_, ClusterStatus>;
    fn add_node(&self, peer: std::net::SocketAddr) -> ControlResult<'_, NodeInfo>;
    fn remove_node(&self, id: u64) -> ControlResult<'_, ()>;
    fn volumes(&self, stale: bool) -> ControlResult<'_, Vec<VolumeInfo>>;
    fn volume(&self, name: String, stale: bool) -> ControlResult<'_, VolumeInfo>;
    fn create_volume(&self, req: CreateVolume) -> ControlResult<'_, VolumeInfo>;
    fn delete_volume(&self, name: String) -> ControlResult<'_, ()>;
    /// Through the volume's owner: answers once it serves the new size.
    /// Through another node: once the change is committed; the owner
    /// applies it as it follows the metadata.
    fn resize_volume(&self, name: String, req: ResizeVolume) -> ControlResult<'_, VolumeInfo>;
    /// Compares every extent's replicas (their per-block crc tables).
    fn verify_volume(&self, name: String) -> ControlResult<'_, VolumeVerify>;
    /// Serving clients: `Err(why)` while starting or draining.
    fn ready(&self) -> Result<(), String>;
}
