//! The systemd service protocol: `sd_notify` datagrams (READY=1, STATUS=,
//! STOPPING=1, WATCHDOG=1) to `$NOTIFY_SOCKET`, and the watchdog pinger.
//!
//! Written here rather than taken from a crate: the protocol is one
//! datagram per message on a unix socket (abstract when the path starts
//! with `@`), and we need nothing else of libsystemd.
//!
//! The watchdog pings come from a task on the async runtime itself, so a
//! runtime whose workers are all stuck misses them and systemd restarts
//! the service (`WatchdogSec=` in `systemd/basaltd.service`).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where notifications go, if the service manager asked for them.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; a no-op notifier when it is unset or unusable
    /// (logged once).
    pub fn from_env() -> Notifier {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return Notifier { socket: None } };
        let path = path.to_string_lossy().into_owned();
        let addr = if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        } else {
            std::os::unix::net::SocketAddr::from_pathname(&path)
        };
        match (UnixDatagram::unbound(), addr) {
            (Ok(sock), Ok(addr)) => Notifier { socket: Some((sock, addr)) },
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(socket = %path, error = %e, "NOTIFY_SOCKET unusable; not notifying systemd");
                Notifier { socket: None }
            }
        }
    }

    /// Sends one notification (`"READY=1"`, `"STATUS=joining the cluster"`).
    pub fn notify(&self, msg: &str) {
        if let Some((sock, addr)) = &self.socket
            && let Err(e) = sock.send_to_addr(msg.as_bytes(), addr)
        {
            tracing::warn!(error = %e, msg, "sd_notify failed");
        }
    }

    pub fn status(&self, status: &str) {
        self.notify(&format!("STATUS={status}"));
    }
}

/// The watchdog interval systemd asked for (`$WATCHDOG_USEC`, for this
/// process when `$WATCHDOG_PID` is set).
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings the watchdog at half its interval from a runtime task, forever.
pub fn spawn_watchdog(notifier: std::sync::Arc<Notifier>) {
    let Some(every) = watchdog_interval() else { return };
    tracing::info!(interval = ?every, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            notifier.notify("WATCHDOG=1");
        }
    });
}
