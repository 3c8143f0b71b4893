//! iSCSI target (RFC 7143): one target per volume (`iqn.2026-11.io.basalt:<volume>`),
//! LUN 0, error recovery level 0, one connection per session. Commands of
//! a session run concurrently as their task attributes allow (SAM-5: SIMPLE,
//! ORDERED, HEAD OF QUEUE), which is what INQUIRY's CmdQue bit promises.
//!
//! Owns: the listener, one task per connection (login, then the full
//! feature phase), and running SCSI commands against `node::Volume`.
//! Framing, login negotiation and CDB parsing are pure code in
//! `proto::iscsi`; this module only does the I/O around them.
//!
//! Shutdown: on cancel the listener stops accepting; each connection stops
//! reading, lets the commands already running finish and send their
//! responses, then closes.

mod conn;
mod exec;

use crate::node::Node;
use crate::proto::iscsi::login::ChapConfig;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The IQN prefix; a volume's target is this plus its name.
pub const IQN_PREFIX: &str = "iqn.2026-11.io.basalt:";

/// The IQN of the target serving `volume`.
pub fn target_iqn(volume: &str) -> String {
    format!("{IQN_PREFIX}{volume}")
}

/// Target settings.
#[derive(Debug, Clone)]
pub struct IscsiConfig {
    /// CHAP credentials; `None` means AuthMethod=None is accepted.
    pub chap: Option<ChapConfig>,
    /// The MaxRecvDataSegmentLength we declare.
    pub max_recv_data: u32,
    /// Our bound on MaxBurstLength/FirstBurstLength.
    pub max_burst: u32,
    /// Ping an initiator after this long without a PDU from it (None: never).
    pub nop_interval: Option<Duration>,
    /// Close the connection if a ping is not answered within this time.
    pub nop_timeout: Duration,
    /// A login must finish within this time.
    pub login_timeout: Duration,
}

impl Default for IscsiConfig {
    fn default() -> Self {
        IscsiConfig {
            chap: None,
            max_recv_data: 256 << 10,
            max_burst: 16_776_192, // 2^24 - 1024, the largest multiple of 1 KiB allowed
            nop_interval: Some(Duration::from_secs(20)),
            nop_timeout: Duration::from_secs(30),
            login_timeout: Duration::from_secs(30),
        }
    }
}

impl IscsiConfig {
    /// Checks the settings, naming the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if !(512..=crate::proto::iscsi::pdu::MAX_DATA_SEGMENT_CAP).contains(&self.max_recv_data) {
            return Err(format!("max_recv_data {} out of 512..=1MiB", self.max_recv_data));
        }
        if !(512..=(1 << 24) - 1).contains(&self.max_burst) {
            return Err(format!("max_burst {} out of 512..16MiB", self.max_burst));
        }
        if let Some(c) = &self.chap {
            // RFC 7143 12.1.3: CHAP secrets of at least 12 bytes (96 bits).
            if c.user.is_empty() || c.secret.len() < 12 {
                return Err("chap: user must be set and the secret at least 12 bytes".into());
            }
            if let Some((u, s)) = &c.mutual
                && (u.is_empty() || s.len() < 12 || s == &c.secret)
            {
                return Err(
                    "chap mutual: user set, secret of 12+ bytes differing from the initiator's".into()
                );
            }
        }
        Ok(())
    }
}

/// State shared by every connection of one server.
#[derive(Debug)]
pub(crate) struct Shared {
    pub node: Arc<Node>,
    pub cfg: IscsiConfig,
    next_tsih: AtomicU16,
}

impl Shared {
    pub fn new_tsih(&self) -> u16 {
        loop {
            let t = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }
}

/// Serves every volume of `node` as an iSCSI target on `listener` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    cfg: IscsiConfig,
) -> std::io::Result<()> {
    cfg.validate().map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let shared = Arc::new(Shared { node, cfg, next_tsih: AtomicU16::new(1) });
    let mut conn_id = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of fds and the like: back off instead of spinning.
                tracing::warn!(error = %e, "iSCSI accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        conn_id += 1;
        let _ = stream.set_nodelay(true);
        let span = tracing::info_span!("iscsi", conn = conn_id, %peer);
        let shared = shared.clone();
        let cancel = cancel.clone();
        let open = shared.node.open_connection(crate::node::Frontend::Iscsi);
        let conn = async move {
            let _open = open;
            conn::run(stream, shared, cancel).await
        };
        tracker.spawn(tracing::Instrument::instrument(conn, span));
    }
    Ok(())
}
