//! One iSCSI connection: login, then the full feature phase.
//!
//! Tasks: this reader (decodes PDUs, keeps the CmdSN window, collects
//! Data-Out, gives each SCSI command its place in the session's order and
//! spawns one task per command, which waits for its turn) and a writer that
//! owns the socket's write half and stamps StatSN/ExpCmdSN/MaxCmdSN on every
//! PDU in the order it sends them, so StatSN is always sequential on the wire.

use super::exec::{self, Lun, Refusal, Why};
use super::{IQN_PREFIX, Shared, target_iqn};
use crate::export::flood::{LineBudget, held_back};
use crate::export::readahead::{Hit, ReadAhead};
use crate::node::volume::MAX_PAYLOAD;
use crate::proto::iscsi::login::{CMD_WINDOW, Login, SessionParams, Step, TargetLimits};
use crate::proto::iscsi::pdu::{
    self, BHS_LEN, CodecConfig, Opcode, Pdu, PduError, RESERVED_TAG, RejectReason, TaskAttr,
};
use crate::proto::iscsi::scsi::{self, BLOCK, Command, LunInfo, Sense, status};
use crate::proto::iscsi::text;
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Most non-immediate SCSI commands in flight per session: MaxCmdSN is
/// ExpCmdSN + WINDOW - 1 - (commands in flight), so the window slides on
/// completion, not on receipt, and bounds the work (and buffered Data-Out)
/// an initiator can queue.
const WINDOW: u32 = CMD_WINDOW;
/// Immediate commands running at once before we refuse more.
const MAX_IMMEDIATE: u32 = 64;

/// Why a connection ended early; logged once.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("socket")]
    Io(#[from] std::io::Error),
    #[error("framing")]
    Pdu(#[from] PduError),
    #[error("login failed: {0}")]
    Login(String),
    #[error("login timed out")]
    LoginTimeout,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("initiator did not answer a NOP-In ping")]
    PingTimeout,
}

/// The CmdSN window, shared by the reader (which admits commands) and the
/// writer (which advertises it on every PDU).
///
/// ExpCmdSN and the number of admitted commands not yet answered (busy)
/// share one atomic word, so a command is counted in the same step that
/// moves ExpCmdSN past it, and the writer reads both at once: the MaxCmdSN
/// it stamps is always one the reader honours. (With two atomics the
/// writer could see ExpCmdSN moved but the command not yet counted,
/// advertise a slot too many, and the initiator's command in it was
/// dropped: ExpCmdSN stuck there and the session wedged.) MaxCmdSN never
/// moves back, as RFC 7143 4.2.2.1 has initiators ignore a smaller one:
/// admitting moves ExpCmdSN and busy up together, completing moves busy
/// down. Only the reader moves ExpCmdSN; anyone may complete.
#[derive(Debug)]
struct Window {
    /// ExpCmdSN in the high half, busy (at most WINDOW) in the low half.
    state: AtomicU64,
    immediate: AtomicU32,
}

/// One consistent reading of the window.
#[derive(Debug, Clone, Copy)]
struct Sn {
    exp: u32,
    max: u32,
    busy: u32,
}

const EXP_ONE: u64 = 1 << 32;

impl Window {
    fn new(exp_cmd_sn: u32) -> Window {
        Window { state: AtomicU64::new((exp_cmd_sn as u64) << 32), immediate: AtomicU32::new(0) }
    }

    fn now(&self) -> Sn {
        let s = self.state.load(Ordering::Acquire);
        let (exp, busy) = ((s >> 32) as u32, s as u32);
        // A full window reads as MaxCmdSN = ExpCmdSN - 1 (RFC 7143: closed).
        let open = WINDOW - busy.min(WINDOW);
        Sn { exp, max: exp.wrapping_add(open).wrapping_sub(1), busy }
    }

    /// Moves ExpCmdSN past a command that holds no slot (reader only).
    fn advance(&self) {
        // The high half wraps on its own: the carry leaves the word.
        self.state.fetch_add(EXP_ONE, Ordering::AcqRel);
    }

    /// Moves ExpCmdSN past a command and counts it busy, in one step
    /// (reader only, after checking busy < WINDOW: completions only lower
    /// busy meanwhile, so the check still holds).
    fn take(self: &Arc<Self>) -> Slot {
        self.state.fetch_add(EXP_ONE + 1, Ordering::AcqRel);
        Slot { win: self.clone(), immediate: false }
    }
}

/// One admitted SCSI command's share of the window; released on drop,
/// before its response is queued so the response already opens the window.
#[derive(Debug)]
struct Slot {
    win: Arc<Window>,
    immediate: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.immediate {
            self.win.immediate.fetch_sub(1, Ordering::AcqRel);
        } else {
            // busy >= 1 while this slot exists: no borrow from ExpCmdSN.
            self.win.state.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Outgoing PDUs with a flag each: true if the PDU carries status and so
/// takes the next StatSN.
struct Out {
    pdus: Vec<(Pdu, bool)>,
    close: bool,
    /// The command's room in the node's payload budget, given back once
    /// these PDUs are written.
    hold: Option<OwnedSemaphorePermit>,
}

impl Out {
    fn one(p: Pdu, status: bool) -> Out {
        Out { pdus: vec![(p, status)], close: false, hold: None }
    }
}

/// An error and its causes on one line, for the one log line per bad connection.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Reads until one PDU (or a framing error) or EOF.
async fn read_pdu(
    rd: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    codec: &CodecConfig,
) -> Result<Option<Pdu>, ConnError> {
    loop {
        if let Some(p) = pdu::decode(buf, codec)? {
            return Ok(Some(p));
        }
        buf.reserve(64 << 10);
        if rd.read_buf(buf).await? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(ConnError::Protocol(format!("EOF inside a PDU ({} bytes buffered)", buf.len())));
        }
    }
}

fn random_challenge() -> ([u8; 16], u8) {
    use std::io::Read;
    let mut b = [0u8; 17];
    if let Err(e) = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        // No entropy source means no safe CHAP: the all-zero challenge is
        // still sent, but log loudly.
        tracing::error!(error = %e, "cannot read /dev/urandom for the CHAP challenge");
    }
    let mut c = [0u8; 16];
    c.copy_from_slice(&b[..16]);
    (c, b[16])
}

fn reject(reason: RejectReason, header: &[u8]) -> Pdu {
    let mut r = Pdu::new(Opcode::Reject);
    r.bhs[2] = reason as u8;
    r.set_itt(RESERVED_TAG);
    r.data = Bytes::copy_from_slice(&header[..header.len().min(BHS_LEN)]);
    r
}

pub(crate) async fn run(stream: TcpStream, shared: Arc<Shared>, cancel: CancellationToken) {
    let local = stream.local_addr().ok();
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = BytesMut::with_capacity(64 << 10);
    let login = tokio::time::timeout(shared.cfg.login_timeout, login(&mut rd, &mut wr, &mut buf, &shared));
    let params = tokio::select! {
        _ = cancel.cancelled() => return,
        r = login => match r {
            Err(_) => Err(ConnError::LoginTimeout),
            Ok(r) => r,
        },
    };
    let params = match params {
        Ok(Some(p)) => p,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %chain(&e), "closing connection during login");
            let _ = wr.shutdown().await;
            return;
        }
    };
    let kind = if params.discovery { "discovery" } else { "normal" };
    let span = tracing::info_span!("session", tsih = params.tsih, initiator = %params.initiator_name, kind);
    // As NBD's: every line of a normal session names its volume (JSON logs
    // carry it as a span field); a discovery session has none.
    let volume = params.target_name.as_deref().and_then(|t| t.strip_prefix(IQN_PREFIX)).map(str::to_owned);
    let run = full_feature(rd, wr, buf, params, shared, cancel, local);
    match volume {
        Some(v) => {
            let vspan = tracing::info_span!(parent: &span, "volume", volume = %v);
            tracing::Instrument::instrument(run, vspan).await
        }
        None => tracing::Instrument::instrument(run, span).await,
    }
}

/// Runs the login phase; `Ok(None)` if the initiator went away quietly.
async fn login(
    rd: &mut OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
    buf: &mut BytesMut,
    shared: &Shared,
) -> Result<Option<SessionParams>, ConnError> {
    let targets: Vec<String> = shared.node.volumes().iter().map(|v| target_iqn(v.name())).collect();
    let (challenge, id) = random_challenge();
    let limits = TargetLimits {
        max_recv_data: shared.cfg.max_recv_data,
        max_burst: shared.cfg.max_burst,
        chap: shared.cfg.chap.clone(),
    };
    let mut login = Login::new(limits, targets, challenge, id, shared.new_tsih());
    let codec = CodecConfig::default();
    loop {
        let req = match read_pdu(rd, buf, &codec).await {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(None),
            Err(ConnError::Pdu(e)) => {
                if let Some(h) = e.header() {
                    let mut out = BytesMut::new();
                    pdu::encode(&reject(RejectReason::ProtocolError, h), &codec, &mut out);
                    let _ = wr.write_all(&out).await;
                }
                return Err(e.into());
            }
            Err(e) => return Err(e),
        };
        tracing::debug!(flags = req.flags(), text = %String::from_utf8_lossy(&req.data).replace('\0', " "), "login request");
        let step = login.step(&req);
        let mut out = BytesMut::new();
        match step {
            Step::Continue(resp) => {
                pdu::encode(&resp, &codec, &mut out);
                wr.write_all(&out).await?;
            }
            Step::Done(resp, params) => {
                pdu::encode(&resp, &codec, &mut out);
                wr.write_all(&out).await?;
                tracing::debug!(?params, "login complete");
                return Ok(Some(*params));
            }
            Step::Fail(resp, st, why) => {
                pdu::encode(&resp, &codec, &mut out);
                let _ = wr.write_all(&out).await;
                let _ = wr.flush().await;
                return Err(ConnError::Login(format!("{why} (status {:#06x})", st as u16)));
            }
        }
    }
}

/// The writer task: stamps sequence numbers and writes, batching what is queued.
async fn writer(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Out>,
    codec: CodecConfig,
    mut stat_sn: u32,
    win: Arc<Window>,
) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(256 << 10);
    while let Some(first) = rx.recv().await {
        crate::poll::touch();
        let mut msg = Some(first);
        let mut close = false;
        while let Some(m) = msg.take() {
            for (mut p, st) in m.pdus {
                // One reading for both, so they never disagree.
                let sn = win.now();
                p.set_u32(24, stat_sn);
                p.set_u32(28, sn.exp);
                p.set_u32(32, sn.max);
                if st {
                    stat_sn = stat_sn.wrapping_add(1);
                }
                pdu::encode(&p, &codec, &mut out);
            }
            close |= m.close;
            if close || out.len() > (1 << 20) {
                break;
            }
            msg = rx.try_recv().ok();
        }
        wr.write_all(&out).await?;
        out.clear();
        if close {
            break;
        }
    }
    wr.shutdown().await
}

/// A command waiting for solicited Data-Out.
struct PendingWrite {
    lun: Arc<Lun>,
    cmd: Command,
    opcode: u8,
    edtl: u32,
    lun_field: u64,
    data: BytesMut,
    residual: Residual,
    want: u32,
    /// End offset of the burst the current R2T asked for.
    burst_end: u32,
    ttt: u32,
    r2t_sn: u32,
    next_data_sn: u32,
    slot: Slot,
    room: Option<OwnedSemaphorePermit>,
    turn: Turn,
}

/// A command's place in the session's order (SAM-5 8.6): the commands it
/// must see end before it starts, and the signal it gives when it ends
/// (its response queued), which younger commands may wait on. Dropping
/// the sender unstarted (an aborted or failed pending write) counts as
/// ended too.
struct Turn {
    after: Vec<watch::Receiver<bool>>,
    done_tx: watch::Sender<bool>,
    done_rx: watch::Receiver<bool>,
}

impl Turn {
    async fn wait(&mut self) {
        for w in &mut self.after {
            // Err: the sender went away unstarted, which is an end too.
            let _ = w.wait_for(|d| *d).await;
        }
        self.after = Vec::new();
    }
}

fn ended(r: &watch::Receiver<bool>) -> bool {
    *r.borrow() || r.has_changed().is_err()
}

/// What a started command works from.
enum Input {
    /// Its Data-Out payload (empty for commands without one).
    Data(Bytes),
    /// A READ answered from read-ahead.
    ReadAhead(Hit),
}

/// Control block of a running command, for task management.
struct TaskCtl {
    aborted: tokio::sync::Mutex<bool>,
    done: watch::Receiver<bool>,
}

struct Session {
    shared: Arc<Shared>,
    p: SessionParams,
    lun: Option<Arc<Lun>>,
    tx: mpsc::Sender<Out>,
    win: Arc<Window>,
    pending: HashMap<u32, PendingWrite>,
    running: HashMap<u32, Arc<TaskCtl>>,
    tasks: JoinSet<u32>,
    /// Read-ahead for a stream of large READs (one LUN per session).
    readahead: ReadAhead,
    next_ttt: u32,
    local: Option<std::net::SocketAddr>,
    /// Done signals of the commands received and maybe not ended yet, in
    /// order (pruned as they end): what an ORDERED command waits for.
    active: Vec<watch::Receiver<bool>>,
    /// Those of ORDERED and HEAD OF QUEUE commands: what a SIMPLE one waits for.
    barriers: Vec<watch::Receiver<bool>>,
    /// Non-immediate PDUs dropped for a CmdSN outside the window.
    dropped: u64,
    /// CmdSNs past ExpCmdSN taken as received without a command (ABORT
    /// TASK of one that never came); at most a window's worth.
    received_ahead: Vec<u32>,
    /// The volume's resize count this I_T nexus was last told of (at login,
    /// or by the UNIT ATTENTION CAPACITY DATA HAS CHANGED).
    capacity_seen: u64,
    /// The flood guard on this connection's error lines (`export::flood`).
    lines: Arc<LineBudget>,
}

/// What to do after handling a PDU.
enum Flow {
    Continue,
    /// Close after what is queued is written (logout, reset, fatal error).
    Close,
}

#[allow(clippy::too_many_arguments)]
async fn full_feature(
    mut rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    mut buf: BytesMut,
    p: SessionParams,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    local: Option<std::net::SocketAddr>,
) {
    let codec = CodecConfig {
        max_recv_data: p.max_recv_data,
        header_digest: p.header_digest,
        data_digest: p.data_digest,
    };
    let win = Arc::new(Window::new(p.exp_cmd_sn));
    let (tx, rx) = mpsc::channel::<Out>(64);
    let writer =
        tokio::spawn(tracing::Instrument::in_current_span(writer(wr, rx, codec, p.stat_sn, win.clone())));
    let mut capacity_seen = 0;
    let lun = p.target_name.as_deref().and_then(|t| t.strip_prefix(IQN_PREFIX)).and_then(|name| {
        let vol = shared.node.volume(name)?;
        // Before the size: a resize in between then still gets its UNIT ATTENTION.
        capacity_seen = vol.resizes();
        let spec = vol.spec();
        let info = LunInfo {
            blocks: vol.size() / BLOCK,
            read_only: vol.read_only(),
            serial: format!("BASALT{:010}", spec.id.0),
            uid: 0x0ba5_a170_0000_0000 ^ spec.id.0,
            target_name: target_iqn(name),
        };
        Some(Arc::new(Lun { vol, info }))
    });
    if !p.discovery && lun.is_none() {
        tracing::warn!("target volume vanished after login; closing");
        return;
    }
    tracing::info!("session in full feature phase");
    let mut s = Session {
        shared: shared.clone(),
        p,
        lun,
        tx,
        win,
        pending: HashMap::new(),
        running: HashMap::new(),
        tasks: JoinSet::new(),
        readahead: ReadAhead::default(),
        next_ttt: 1,
        local,
        active: Vec::new(),
        barriers: Vec::new(),
        dropped: 0,
        received_ahead: Vec::new(),
        capacity_seen,
        lines: Arc::new(LineBudget::default()),
    };
    let nop_interval = shared.cfg.nop_interval;
    let mut last_rx = Instant::now();
    let mut ping: Option<(u32, Instant)> = None;
    let mut tick =
        tokio::time::interval(nop_interval.unwrap_or(Duration::from_secs(3600)).min(Duration::from_secs(5)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result: Result<(), ConnError> = loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                tracing::info!("draining: no new commands");
                break Ok(());
            }
            Some(done) = s.tasks.join_next(), if !s.tasks.is_empty() => {
                if let Ok(itt) = done {
                    s.running.remove(&itt);
                }
            }
            r = read_pdu(&mut rd, &mut buf, &codec) => {
                match r {
                    Ok(Some(pdu)) => {
                        last_rx = Instant::now();
                        if pdu.opcode() == Some(Opcode::NopOut) && pdu.itt() == RESERVED_TAG
                            && ping.is_some_and(|(t, _)| t == pdu.word20()) {
                            ping = None;
                        }
                        match s.handle(pdu).await {
                            Ok(Flow::Continue) => {}
                            Ok(Flow::Close) => break Ok(()),
                            Err(e) => break Err(e),
                        }
                    }
                    Ok(None) => break Ok(()),
                    Err(ConnError::Pdu(e)) => {
                        // The stream cannot be resynchronized: reject what we can name, then close.
                        if let Some(h) = e.header() {
                            let reason = if matches!(e, PduError::DataDigest { .. }) {
                                RejectReason::DataDigest
                            } else {
                                RejectReason::ProtocolError
                            };
                            let _ = s.tx.send(Out::one(reject(reason, h), true)).await;
                        }
                        break Err(e.into());
                    }
                    Err(e) => break Err(e),
                }
            }
            _ = tick.tick() => {
                let Some(iv) = nop_interval else { continue };
                match ping {
                    Some((_, sent)) if sent.elapsed() > s.shared.cfg.nop_timeout => break Err(ConnError::PingTimeout),
                    Some(_) => {}
                    None if last_rx.elapsed() >= iv => {
                        let ttt = s.ttt();
                        let mut n = Pdu::new(Opcode::NopIn);
                        n.set_itt(RESERVED_TAG);
                        n.set_u32(20, ttt);
                        if s.tx.send(Out::one(n, false)).await.is_err() {
                            break Ok(());
                        }
                        ping = Some((ttt, Instant::now()));
                    }
                    None => {}
                }
            }
        }
    };
    if let Err(e) = &result {
        tracing::warn!(error = %chain(e), "closing connection");
    }
    // Commands already running finish and send their responses; writes
    // still waiting for Data-Out are dropped (never acknowledged).
    s.pending.clear();
    while s.tasks.join_next().await.is_some() {}
    let held = s.lines.take_suppressed();
    if held > 0 {
        tracing::info!(suppressed = held, "error lines held back by this connection's flood guard");
    }
    let _ = s.tx.send(Out { pdus: Vec::new(), close: true, hold: None }).await;
    drop(s);
    if let Ok(Err(e)) = writer.await {
        tracing::debug!(error = %e, "writer ended");
    }
    tracing::debug!("connection closed");
}

fn serial_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < (1 << 31)
}

impl Session {
    fn ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG {
            self.next_ttt = 1;
        }
        t
    }

    /// The PDUs answering a command (see [`Response::pdus`]).
    fn answer(&self, r: Response, data: Bytes, why: Why) -> Out {
        r.pdus(data, &self.p, &self.lines, why)
    }

    async fn send(&self, o: Out) -> Result<(), ConnError> {
        self.tx.send(o).await.map_err(|_| ConnError::Protocol("writer gone".into()))
    }

    /// Sends a Reject for `pdu` and logs it once, with `why`. (A Reject
    /// sent just before the connection closes is not logged here: the
    /// connection's closing line says why.)
    async fn reject(&self, reason: RejectReason, pdu: &Pdu, why: &str) -> Result<(), ConnError> {
        let (itt, opcode) = (pdu.itt(), Hex(pdu.raw_opcode()));
        match self.lines.admit().map(held_back) {
            Some(suppressed) => tracing::info!(itt, %opcode, ?reason, why, suppressed, "PDU rejected"),
            None => tracing::debug!(itt, %opcode, ?reason, why, "PDU rejected (flood guard)"),
        }
        self.send(Out::one(reject(reason, &pdu.bhs), true)).await
    }

    /// CmdSN rules (RFC 7143 4.2.2.1) for a PDU that holds no slot while
    /// it is handled (NOP-Out, Text, Task Management, Logout): an immediate
    /// one is taken as it comes; any other must carry ExpCmdSN, which then
    /// advances.
    fn accept_cmd_sn(&mut self, pdu: &Pdu) -> bool {
        if pdu.immediate() {
            return true;
        }
        if !self.in_order(pdu) {
            return false;
        }
        self.win.advance();
        self.skip_received();
        true
    }

    /// The same rules for a SCSI command, which also takes a slot of the
    /// window (or of the immediate allowance) in the same step, held until
    /// its response is queued. `None`: dropped as the RFC says.
    fn admit(&mut self, pdu: &Pdu) -> Option<Slot> {
        if pdu.immediate() {
            self.win.immediate.fetch_add(1, Ordering::AcqRel);
            return Some(Slot { win: self.win.clone(), immediate: true });
        }
        if !self.in_order(pdu) {
            return None;
        }
        let slot = self.win.take();
        self.skip_received();
        Some(slot)
    }

    /// True if a non-immediate PDU carries ExpCmdSN inside the window. A
    /// PDU outside it is dropped silently (the RFC's rule; a log line for
    /// us). That is safe only because the window we advertise is honest:
    /// an initiator that keeps to it never loses a command, and one that
    /// times a lost command out gets its CmdSN back through ABORT TASK
    /// (see [`Session::task_mgmt`]), so the session moves on.
    fn in_order(&mut self, pdu: &Pdu) -> bool {
        let cmd_sn = pdu.word24();
        let sn = self.win.now();
        if cmd_sn == sn.exp && sn.busy < WINDOW {
            return true;
        }
        self.dropped += 1;
        let opcode = Hex(pdu.raw_opcode());
        let (exp_cmd_sn, max_cmd_sn, dropped) = (sn.exp, sn.max, self.dropped);
        match self.lines.admit().map(held_back) {
            Some(suppressed) => tracing::warn!(
                cmd_sn,
                exp_cmd_sn,
                max_cmd_sn,
                %opcode,
                dropped,
                suppressed,
                "CmdSN outside the window: dropped"
            ),
            None => {
                tracing::debug!(cmd_sn, exp_cmd_sn, %opcode, dropped, "CmdSN outside the window: dropped")
            }
        }
        false
    }

    /// Moves ExpCmdSN past CmdSNs already taken as received (by ABORT
    /// TASK for a command that never came).
    fn skip_received(&mut self) {
        while !self.received_ahead.is_empty() {
            let exp = self.win.now().exp;
            let Some(i) = self.received_ahead.iter().position(|&c| c == exp) else { break };
            self.received_ahead.swap_remove(i);
            self.win.advance();
        }
    }

    async fn handle(&mut self, pdu: Pdu) -> Result<Flow, ConnError> {
        crate::poll::touch();
        let Some(op) = pdu.opcode() else {
            self.reject(RejectReason::CommandNotSupported, &pdu, "unknown opcode").await?;
            return Ok(Flow::Continue);
        };
        match op {
            Opcode::NopOut => self.nop_out(pdu).await,
            Opcode::ScsiCommand => self.scsi_command(pdu).await,
            Opcode::DataOut => self.data_out(pdu).await,
            Opcode::TaskMgmtRequest => self.task_mgmt(pdu).await,
            Opcode::TextRequest => self.text(pdu).await,
            Opcode::LogoutRequest => self.logout(pdu).await,
            Opcode::LoginRequest => {
                // A login on a connection already in full feature phase.
                self.send(Out::one(reject(RejectReason::ProtocolError, &pdu.bhs), true)).await?;
                Err(ConnError::Protocol("login request in full feature phase".into()))
            }
            Opcode::Snack => {
                self.reject(RejectReason::ProtocolError, &pdu, "SNACK needs error recovery level 1").await?;
                Ok(Flow::Continue)
            }
            _ => {
                self.reject(RejectReason::ProtocolError, &pdu, "a target opcode from the initiator").await?;
                Ok(Flow::Continue)
            }
        }
    }

    async fn nop_out(&mut self, pdu: Pdu) -> Result<Flow, ConnError> {
        if pdu.itt() == RESERVED_TAG {
            // A ping answer or a no-reply ping: must be immediate, no CmdSN use.
            return Ok(Flow::Continue);
        }
        if !self.accept_cmd_sn(&pdu) {
            return Ok(Flow::Continue);
        }
        if pdu.word20() != RESERVED_TAG {
            self.reject(RejectReason::ProtocolError, &pdu, "NOP-Out with both an ITT and a TTT").await?;
            return Ok(Flow::Continue);
        }
        let mut r = Pdu::new(Opcode::NopIn);
        r.set_lun(pdu.lun());
        r.set_itt(pdu.itt());
        r.set_u32(20, RESERVED_TAG);
        let n = pdu.data.len().min(self.p.peer_max_recv_data as usize);
        r.data = pdu.data.slice(..n);
        self.send(Out::one(r, true)).await?;
        Ok(Flow::Continue)
    }

    async fn scsi_command(&mut self, pdu: Pdu) -> Result<Flow, ConnError> {
        if self.p.discovery {
            self.reject(RejectReason::ProtocolError, &pdu, "SCSI command in a discovery session").await?;
            return Ok(Flow::Continue);
        }
        if pdu.immediate() && self.win.immediate.load(Ordering::Acquire) >= MAX_IMMEDIATE {
            self.reject(RejectReason::ImmediateCommandReject, &pdu, "too many immediate commands").await?;
            return Ok(Flow::Continue);
        }
        let Some(slot) = self.admit(&pdu) else {
            return Ok(Flow::Continue);
        };
        // Every answer given here, before the command runs, first gives
        // its slot back (drop(slot)), so the answer already opens the window.
        let itt = pdu.itt();
        if self.pending.contains_key(&itt) || self.running.contains_key(&itt) {
            drop(slot);
            self.reject(RejectReason::TaskInProgress, &pdu, "ITT of a task in progress").await?;
            return Ok(Flow::Continue);
        }
        let flags = pdu.flags();
        let (read_f, write_f) = (flags & 0x40 != 0, flags & 0x20 != 0);
        let edtl = pdu.word20();
        let lun_field = pdu.lun();
        let cdb: [u8; 16] = pdu.bhs[32..48].try_into().unwrap();
        let imm = pdu.data.clone();
        let opcode = cdb[0];
        let respond =
            |st: Status| Response { itt, opcode, lun_field, edtl, read_f, presented: 0, status: st };
        if imm.len() as u64 > edtl as u64
            || imm.len() as u32 > self.p.first_burst
            || (!imm.is_empty() && !write_f)
        {
            drop(slot);
            self.send(Out::one(reject(RejectReason::ProtocolError, &pdu.bhs), true)).await?;
            return Err(ConnError::Protocol(format!("immediate data of {} bytes, EDTL {edtl}", imm.len())));
        }
        if !pdu.ahs.is_empty() || flags & 0x80 == 0 {
            // Extended CDBs are not supported; F=0 means unsolicited Data-Out follows, which InitialR2T=Yes forbids.
            let r = respond(Status::Check(Sense::INVALID_FIELD_IN_CDB, Residual::None));
            drop(slot);
            let why = Why::said(if flags & 0x80 == 0 {
                "unsolicited Data-Out (F=0)"
            } else {
                "extended CDB (AHS)"
            });
            self.send(self.answer(r, Bytes::new(), why)).await?;
            return Ok(Flow::Continue);
        }
        let lun = self.lun.clone().expect("normal session has a LUN");
        let cmd = match scsi::parse(&cdb) {
            Ok(c) => c,
            Err(sense) => {
                drop(slot);
                let r = respond(Status::Check(sense, Residual::None));
                self.send(self.answer(r, Bytes::new(), Why::NONE)).await?;
                return Ok(Flow::Continue);
            }
        };
        if lun_field != 0
            && let Command::Inquiry { evpd: false, alloc, .. } = cmd
        {
            // SPC-4 6.6.2: no logical unit here, peripheral qualifier 011b.
            let mut d = scsi::inquiry(&lun.info, false, 0, alloc).unwrap_or_default();
            if let Some(b) = d.first_mut() {
                *b = 0x7f;
            }
            drop(slot);
            self.send(self.answer(respond(Status::Good(Residual::None)), Bytes::from(d), Why::NONE)).await?;
            return Ok(Flow::Continue);
        }
        if lun_field != 0 && !matches!(cmd, Command::ReportLuns { .. }) {
            let r = respond(Status::Check(Sense::LUN_NOT_SUPPORTED, Residual::None));
            drop(slot);
            self.send(self.answer(r, Bytes::new(), Why::said(format!("LUN field {lun_field:#018x}"))))
                .await?;
            return Ok(Flow::Continue);
        }
        // SPC-4 5.14: after a resize every I_T nexus gets one UNIT
        // ATTENTION, on its first command other than INQUIRY, REPORT LUNS
        // and REQUEST SENSE; REQUEST SENSE reports it as its data instead.
        let resizes = lun.vol.resizes();
        if resizes != self.capacity_seen
            && !matches!(cmd, Command::Inquiry { .. } | Command::ReportLuns { .. })
        {
            self.capacity_seen = resizes;
            // Logged here for REQUEST SENSE, which reports it as GOOD
            // data; a CHECK CONDITION logs its own line below.
            if matches!(cmd, Command::RequestSense { .. }) {
                tracing::info!(blocks = lun.blocks(), "capacity changed: UNIT ATTENTION as sense data");
            }
            let r = match cmd {
                Command::RequestSense { desc, alloc } => {
                    let s = exec::CAPACITY_DATA_HAS_CHANGED;
                    let mut d = if desc { s.descriptor() } else { s.fixed() };
                    d.truncate(alloc as usize);
                    drop(slot);
                    self.send(self.answer(respond(Status::Good(Residual::None)), Bytes::from(d), Why::NONE))
                        .await?;
                    return Ok(Flow::Continue);
                }
                _ => respond(Status::Check(exec::CAPACITY_DATA_HAS_CHANGED, Residual::None)),
            };
            drop(slot);
            let why = Why { capacity: Some(lun.blocks()), ..Why::NONE };
            self.send(self.answer(r, Bytes::new(), why)).await?;
            return Ok(Flow::Continue);
        }
        let attr = pdu.task_attr();
        if attr == TaskAttr::Aca {
            // We never establish an ACA condition (INQUIRY says NORMACA 0),
            // so a command that claims to run in one is refused (SAM-5).
            let r = respond(Status::Check(Sense::INVALID_MESSAGE_ERROR, Residual::None));
            drop(slot);
            self.send(self.answer(r, Bytes::new(), Why::said("ACA task attribute without an ACA condition")))
                .await?;
            return Ok(Flow::Continue);
        }
        // A READ presents its CDB's length (SPDTL) but sends at most the
        // EDTL (RFC 7143 11.4.5.1: the rest is a residual overflow), so it
        // reads only the blocks it sends. The range is judged on the CDB.
        let mut cmd = cmd;
        let mut presented = 0u64;
        if let Command::Read { lba, blocks, fua } = cmd {
            if let Err(Refusal { sense, why }) = exec::in_range(lba, blocks as u64, lun.blocks()) {
                drop(slot);
                self.send(self.answer(respond(Status::Check(sense, Residual::None)), Bytes::new(), why))
                    .await?;
                return Ok(Flow::Continue);
            }
            presented = blocks as u64 * BLOCK;
            let sent = presented.min(edtl as u64);
            // Whole blocks: the last may be sent in part.
            cmd = Command::Read { lba, blocks: sent.div_ceil(BLOCK) as u32, fua };
        }
        // Room in the node's payload budget for the data either way, taken
        // now and held until the response is written. When the node is out
        // of it, TASK SET FULL: the initiator retries later with a lower
        // queue depth, and nothing is buffered meanwhile. (Waiting here
        // instead could deadlock: this loop must keep reading the Data-Out
        // of the session's own pending writes, which may hold the room.)
        // Charged by the larger of what the CDB and the initiator say, so
        // neither can make a command hold more than it paid for.
        let payload =
            cmd.data_out_len().max(if read_f { edtl as u64 } else { 0 }).max(presented).min(MAX_PAYLOAD);
        let room = match payload {
            0 => None,
            n => match self.shared.node.payload_budget().try_take(n) {
                Some(r) => Some(r),
                None => {
                    let r = respond(Status::Busy(status::TASK_SET_FULL));
                    drop(slot);
                    let why = Why::said(format!("node payload budget spent ({n} bytes asked)"));
                    self.send(self.answer(r, Bytes::new(), why)).await?;
                    return Ok(Flow::Continue);
                }
            },
        };
        // Its place in the order, from now: a pending write holds it while
        // its Data-Out comes. (Dropped unused if it is refused below.)
        let turn = self.turn(attr);
        let spdtl = cmd.data_out_len();
        let mut residual = Residual::None;
        if cmd.has_data_out() && (write_f || spdtl > 0) {
            let edtl_out = if write_f { edtl as u64 } else { 0 };
            if edtl_out != spdtl {
                // RFC 7143 11.4.5.2: the residual is signalled either way.
                residual = if edtl_out < spdtl {
                    Residual::Over((spdtl - edtl_out).min(u32::MAX as u64) as u32)
                } else {
                    Residual::Under((edtl_out - spdtl) as u32)
                };
                match cmd.truncated(edtl_out / BLOCK) {
                    // WRITE and WRITE AND VERIFY move the whole blocks both
                    // sides agree on, as SAM-5 5.4.2 lets a target do.
                    Some(c) => cmd = c,
                    // Anything else cannot be done in part: refuse it.
                    None => {
                        let r = respond(Status::Check(Sense::INVALID_FIELD_IN_CDB, residual));
                        drop(slot);
                        let why = Why::said(format!("EDTL {edtl_out} cannot carry the CDB's {spdtl} bytes"));
                        self.send(self.answer(r, Bytes::new(), why)).await?;
                        return Ok(Flow::Continue);
                    }
                }
            }
            let spdtl = cmd.data_out_len();
            let want = spdtl as u32;
            let mut data = BytesMut::new();
            // Immediate data past what the command uses is accepted and dropped.
            data.extend_from_slice(&imm[..imm.len().min(want as usize)]);
            if data.len() as u32 == want {
                self.spawn(
                    itt,
                    slot,
                    lun,
                    cmd,
                    Input::Data(data.freeze()),
                    respond(Status::Good(residual)),
                    room,
                    turn,
                );
                return Ok(Flow::Continue);
            }
            let mut pw = PendingWrite {
                lun,
                cmd,
                opcode,
                edtl,
                lun_field,
                data,
                residual,
                want,
                burst_end: 0,
                ttt: 0,
                r2t_sn: 0,
                next_data_sn: 0,
                slot,
                room,
                turn,
            };
            self.send_r2t(itt, &mut pw).await?;
            self.pending.insert(itt, pw);
            return Ok(Flow::Continue);
        }
        // No Data-Out wanted: anything the initiator meant to send is an underflow.
        let res = if write_f && edtl > 0 { Residual::Under(edtl) } else { residual };
        let hit = match cmd {
            Command::Read { lba, blocks, .. }
                if blocks > 0 && scsi::check_range(lba, blocks as u64, lun.blocks()).is_ok() =>
            {
                let budget = self.shared.node.payload_budget();
                self.readahead.on_read(lba * BLOCK, blocks as u64 * BLOCK, &lun.vol, budget)
            }
            _ => None,
        };
        let input = hit.map_or(Input::Data(Bytes::new()), Input::ReadAhead);
        self.spawn(
            itt,
            slot,
            lun,
            cmd,
            input,
            Response { presented, ..respond(Status::Good(res)) },
            room,
            turn,
        );
        Ok(Flow::Continue)
    }

    /// The place of a command received now in the session's order
    /// (SAM-5 8.6): SIMPLE waits for older ORDERED and HEAD OF QUEUE
    /// commands, ORDERED for every older command, HEAD OF QUEUE for none.
    /// Commands answered before they run (a bad CDB, TASK SET FULL) never
    /// take a place: they do not enter the task set.
    fn turn(&mut self, attr: TaskAttr) -> Turn {
        let (done_tx, done_rx) = watch::channel(false);
        self.barriers.retain(|r| !ended(r));
        // Pruned when it is needed, and when it grows past what can be
        // in flight, so a SIMPLE-only stream pays nothing per command.
        if attr == TaskAttr::Ordered || self.active.len() > 4 * (WINDOW + MAX_IMMEDIATE) as usize {
            self.active.retain(|r| !ended(r));
        }
        let after = match attr {
            TaskAttr::Ordered => self.active.clone(),
            TaskAttr::HeadOfQueue => Vec::new(),
            TaskAttr::Simple | TaskAttr::Aca => self.barriers.clone(),
        };
        self.active.push(done_rx.clone());
        if attr != TaskAttr::Simple {
            self.barriers.push(done_rx.clone());
        }
        Turn { after, done_tx, done_rx }
    }

    async fn send_r2t(&mut self, itt: u32, pw: &mut PendingWrite) -> Result<(), ConnError> {
        let offset = pw.data.len() as u32;
        let len = (pw.want - offset).min(self.p.max_burst);
        pw.ttt = self.ttt();
        pw.burst_end = offset + len;
        pw.next_data_sn = 0;
        let mut r = Pdu::new(Opcode::R2t);
        r.set_lun(pw.lun_field);
        r.set_itt(itt);
        r.set_u32(20, pw.ttt);
        r.set_u32(36, pw.r2t_sn);
        r.set_u32(40, offset);
        r.set_u32(44, len);
        pw.r2t_sn = pw.r2t_sn.wrapping_add(1);
        self.send(Out::one(r, false)).await
    }

    async fn data_out(&mut self, pdu: Pdu) -> Result<Flow, ConnError> {
        let itt = pdu.itt();
        let Some(mut pw) = self.pending.remove(&itt) else {
            // Data for a task we already ended (aborted or answered): discard.
            tracing::debug!(itt, "Data-Out for no pending task: discarded");
            return Ok(Flow::Continue);
        };
        let ttt = pdu.word20();
        let data_sn = pdu.u32_at(36);
        let offset = pdu.u32_at(40);
        let len = pdu.data.len() as u32;
        let fits = offset.checked_add(len).is_some_and(|end| end <= pw.burst_end);
        let at = pw.data.len() as u32;
        let problem = if ttt != pw.ttt {
            Some((Sense::INVALID_TTT, format!("TTT {ttt:#x}, expected {:#x}", pw.ttt)))
        } else if data_sn != pw.next_data_sn {
            Some((Sense::DATA_PHASE_ERROR, format!("DataSN {data_sn}, expected {}", pw.next_data_sn)))
        } else if offset != at {
            Some((Sense::DATA_OFFSET_ERROR, format!("buffer offset {offset}, expected {at}")))
        } else if !fits {
            Some((
                Sense::TOO_MUCH_WRITE_DATA,
                format!("{len} bytes at {offset} overrun the burst to {}", pw.burst_end),
            ))
        } else if pdu.final_bit() != (offset + len == pw.burst_end) {
            Some((Sense::DATA_PHASE_ERROR, "F bit does not match the end of the burst".to_string()))
        } else {
            None
        };
        if let Some((sense, why)) = problem {
            // The task ends here, unacknowledged and unwritten; later
            // Data-Out for it is discarded. The connection stays up.
            let r = Response {
                itt,
                opcode: pw.opcode,
                lun_field: pw.lun_field,
                edtl: pw.edtl,
                read_f: false,
                presented: 0,
                status: Status::Check(sense, Residual::None),
            };
            let why = Why::said(format!("Data-Out sequence error, task terminated: {why}"));
            self.send(self.answer(r, Bytes::new(), why)).await?;
            return Ok(Flow::Continue);
        }
        pw.next_data_sn = pw.next_data_sn.wrapping_add(1);
        pw.data.extend_from_slice(&pdu.data);
        let at = pw.data.len() as u32;
        if at == pw.want {
            let respond = Response {
                itt,
                opcode: pw.opcode,
                lun_field: pw.lun_field,
                edtl: pw.edtl,
                read_f: false,
                presented: 0,
                status: Status::Good(pw.residual),
            };
            self.spawn(
                itt,
                pw.slot,
                pw.lun,
                pw.cmd,
                Input::Data(pw.data.freeze()),
                respond,
                pw.room,
                pw.turn,
            );
            return Ok(Flow::Continue);
        }
        if at == pw.burst_end {
            self.send_r2t(itt, &mut pw).await?;
        }
        self.pending.insert(itt, pw);
        Ok(Flow::Continue)
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &mut self,
        itt: u32,
        slot: Slot,
        lun: Arc<Lun>,
        cmd: Command,
        input: Input,
        resp: Response,
        room: Option<OwnedSemaphorePermit>,
        mut turn: Turn,
    ) {
        let ctl = Arc::new(TaskCtl { aborted: tokio::sync::Mutex::new(false), done: turn.done_rx.clone() });
        self.running.insert(itt, ctl.clone());
        let tx = self.tx.clone();
        let p = self.p.clone();
        let lines = self.lines.clone();
        // The task logs in the connection's spans (a spawned task starts
        // outside every span).
        self.tasks.spawn(tracing::Instrument::in_current_span(async move {
            turn.wait().await;
            let result = match input {
                Input::Data(data) => exec::execute(&lun, cmd, data).await,
                Input::ReadAhead(hit) => exec::read_ahead(&lun, hit).await,
            };
            let mut out = match result {
                Ok(d) => resp.pdus(d, &p, &lines, Why::NONE),
                Err(Refusal { sense, why }) => {
                    let res = match resp.status {
                        Status::Good(r) | Status::Check(_, r) => r,
                        Status::Busy(_) => Residual::None,
                    };
                    // Nothing was sent: the residual is of the EDTL, as before any data.
                    Response { status: Status::Check(sense, res), presented: 0, ..resp }.pdus(
                        Bytes::new(),
                        &p,
                        &lines,
                        why,
                    )
                }
            };
            out.hold = room;
            drop(slot);
            {
                let aborted = ctl.aborted.lock().await;
                if !*aborted {
                    let _ = tx.send(out).await;
                }
            }
            let _ = turn.done_tx.send(true);
            itt
        }));
    }

    async fn task_mgmt(&mut self, pdu: Pdu) -> Result<Flow, ConnError> {
        if !self.accept_cmd_sn(&pdu) {
            return Ok(Flow::Continue);
        }
        let function = pdu.flags() & 0x7f;
        let rtt = pdu.word20();
        let ref_cmd_sn = pdu.u32_at(32);
        let mut victims: Vec<Arc<TaskCtl>> = Vec::new();
        let mut close_after = false;
        let response: u8 = match function {
            1 => {
                // ABORT TASK
                if self.pending.remove(&rtt).is_some() {
                    0
                } else if let Some(t) = self.running.get(&rtt) {
                    victims.push(t.clone());
                    0
                } else {
                    self.abort_unknown(ref_cmd_sn, pdu.word24())
                }
            }
            2 | 4 | 5 | 6 | 7 => {
                // ABORT TASK SET, CLEAR TASK SET, LUN RESET, TARGET WARM/COLD RESET
                if matches!(function, 2 | 4 | 5) && pdu.lun() != 0 {
                    2
                } else {
                    self.pending.clear();
                    victims.extend(self.running.values().cloned());
                    close_after = function == 7;
                    0
                }
            }
            3 => 5, // CLEAR ACA: no ACA support
            8 => 4, // TASK REASSIGN: needs ERL 2
            _ => 255,
        };
        if response == 0 {
            tracing::info!(function, rtt, response, "task management");
        } else {
            // RFC 7143 11.6.1: 1 task does not exist, 2 LUN does not exist,
            // 4 task reassign not supported, 5 function not supported,
            // 255 function rejected.
            match self.lines.admit().map(held_back) {
                Some(suppressed) => {
                    tracing::info!(function, rtt, ref_cmd_sn, response, suppressed, "task management refused")
                }
                None => tracing::debug!(function, rtt, response, "task management refused (flood guard)"),
            }
        }
        let mut r = Pdu::new(Opcode::TaskMgmtResponse);
        r.bhs[2] = response;
        r.set_itt(pdu.itt());
        let tx = self.tx.clone();
        // The response follows the end of every aborted task; wait off the reader.
        self.tasks.spawn(tracing::Instrument::in_current_span(async move {
            for v in victims {
                *v.aborted.lock().await = true;
                let mut done = v.done.clone();
                let _ = done.wait_for(|d| *d).await;
            }
            let _ = tx.send(Out { pdus: vec![(r, true)], close: close_after, hold: None }).await;
            RESERVED_TAG
        }));
        Ok(if close_after { Flow::Close } else { Flow::Continue })
    }

    /// ABORT TASK of a task we do not have (RFC 7143 11.5.1). A RefCmdSN
    /// inside the window and before the request's own CmdSN names a
    /// command that was lost on the way: its CmdSN is taken as received,
    /// so ExpCmdSN can move past it and the session goes on. One before
    /// ExpCmdSN was received and answered already.
    fn abort_unknown(&mut self, ref_cmd_sn: u32, tmf_cmd_sn: u32) -> u8 {
        let sn = self.win.now();
        let in_window = !serial_lt(ref_cmd_sn, sn.exp) && !serial_lt(sn.max, ref_cmd_sn);
        if in_window && serial_lt(ref_cmd_sn, tmf_cmd_sn) {
            tracing::warn!(
                ref_cmd_sn,
                exp_cmd_sn = sn.exp,
                "ABORT TASK of a command never received: CmdSN taken"
            );
            if ref_cmd_sn == sn.exp {
                self.win.advance();
                self.skip_received();
            } else if !self.received_ahead.contains(&ref_cmd_sn) {
                self.received_ahead.push(ref_cmd_sn);
            }
            0
        } else if serial_lt(ref_cmd_sn, sn.exp) {
            0
        } else {
            1
        }
    }

    async fn text(&mut self, pdu: Pdu) -> Result<Flow, ConnError> {
        if !self.accept_cmd_sn(&pdu) {
            return Ok(Flow::Continue);
        }
        let mut r = Pdu::new(Opcode::TextResponse);
        r.set_lun(pdu.lun());
        r.set_itt(pdu.itt());
        r.set_u32(20, RESERVED_TAG);
        if pdu.flags() & 0x40 != 0 {
            // Continued text requests are not needed for SendTargets; refuse them.
            self.reject(RejectReason::ProtocolError, &pdu, "continued text request").await?;
            return Ok(Flow::Continue);
        }
        let pairs = match text::parse(&pdu.data) {
            Ok(p) => p,
            Err(e) => {
                self.reject(RejectReason::ProtocolError, &pdu, &format!("bad text request: {e}")).await?;
                return Ok(Flow::Continue);
            }
        };
        let mut reply: Vec<(String, String)> = Vec::new();
        for (k, v) in pairs {
            if k == "SendTargets" {
                let addr = match self.local {
                    Some(std::net::SocketAddr::V6(a)) => format!("[{}]:{},1", a.ip(), a.port()),
                    Some(a) => format!("{a},1"),
                    None => String::new(),
                };
                let mut names: Vec<String> =
                    self.shared.node.volumes().iter().map(|vol| target_iqn(vol.name())).collect();
                match v.as_str() {
                    // RFC 7143 appendix C: All belongs to discovery sessions;
                    // a normal session learns only about its own target.
                    "All" if self.p.discovery => {}
                    "All" | "" => names.retain(|n| Some(n) == self.p.target_name.as_ref()),
                    t => names.retain(|n| n == t),
                }
                for n in names {
                    reply.push(("TargetName".into(), n));
                    if !addr.is_empty() {
                        reply.push(("TargetAddress".into(), addr.clone()));
                    }
                }
            } else {
                reply.push((k, "NotUnderstood".into()));
            }
        }
        let mut data = text::encode(&reply);
        // Without continuation support, cut at a pair boundary that fits.
        let cap = self.p.peer_max_recv_data as usize;
        if data.len() > cap {
            let cut = data[..cap].iter().rposition(|&b| b == 0).map_or(0, |i| i + 1);
            data.truncate(cut);
        }
        r.data = Bytes::from(data);
        self.send(Out::one(r, true)).await?;
        Ok(Flow::Continue)
    }

    async fn logout(&mut self, pdu: Pdu) -> Result<Flow, ConnError> {
        if !self.accept_cmd_sn(&pdu) {
            return Ok(Flow::Continue);
        }
        let reason = pdu.flags() & 0x7f;
        let mut r = Pdu::new(Opcode::LogoutResponse);
        r.set_itt(pdu.itt());
        if reason == 2 {
            r.bhs[2] = 2; // connection recovery is not supported (ERL 0)
            self.send(Out::one(r, true)).await?;
            return Ok(Flow::Continue);
        }
        // Finish what is running, so its responses precede the logout response.
        self.pending.clear();
        while let Some(done) = self.tasks.join_next().await {
            if let Ok(itt) = done {
                self.running.remove(&itt);
            }
        }
        self.send(Out { pdus: vec![(r, true)], close: true, hold: None }).await?;
        tracing::debug!(reason, "logout");
        Ok(Flow::Close)
    }
}

#[derive(Debug, Clone, Copy)]
enum Residual {
    None,
    Over(u32),
    Under(u32),
}

#[derive(Debug, Clone, Copy)]
enum Status {
    Good(Residual),
    Check(Sense, Residual),
    /// Not run for lack of resources: BUSY or TASK SET FULL, no sense data.
    Busy(u8),
}

/// How to answer one SCSI command.
#[derive(Debug, Clone, Copy)]
struct Response {
    itt: u32,
    /// The CDB's operation code, for the log line of a refusal.
    opcode: u8,
    lun_field: u64,
    edtl: u32,
    read_f: bool,
    /// Data-In the command presents (its SPDTL) when that is more than the
    /// payload it hands back: a READ cut to the EDTL reads only what is sent.
    presented: u64,
    status: Status,
}

/// An operation code or sense code as SCSI documents write it.
struct Hex(u8);

impl std::fmt::Display for Hex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#04x}", self.0)
    }
}

/// One line for a refused or failed command, at `$level`.
macro_rules! refusal_line {
    ($level:ident, $msg:literal, $r:expr, $status:expr, $sense:expr, $why:expr, $suppressed:expr) => {
        tracing::$level!(
            itt = $r.itt,
            opcode = %Hex($r.opcode),
            status = $status,
            sense_key = $sense.map(|s: Sense| scsi::key::name(s.key)),
            asc = $sense.map(|s: Sense| tracing::field::display(Hex(s.asc))),
            ascq = $sense.map(|s: Sense| tracing::field::display(Hex(s.ascq))),
            lba = $why.lba,
            blocks = $why.blocks,
            capacity = $why.capacity,
            error = $why.error.as_deref(),
            suppressed = $suppressed,
            $msg
        )
    };
}

impl Response {
    /// The log line of a command not answered GOOD: warn if the volume
    /// failed it, info if the initiator asked for something refused
    /// (libiscsi's compliance suite does that by the thousand), debug once
    /// the connection's flood guard holds lines back.
    fn log(&self, lines: &LineBudget, why: Why) {
        let (status, sense) = match self.status {
            Status::Good(_) => return,
            Status::Check(s, _) => ("CHECK CONDITION", Some(s)),
            Status::Busy(status::TASK_SET_FULL) => ("TASK SET FULL", None),
            Status::Busy(_) => ("BUSY", None),
        };
        match lines.admit().map(held_back) {
            Some(suppressed) if why.failed => {
                refusal_line!(warn, "command failed", self, status, sense, why, suppressed)
            }
            Some(suppressed) => refusal_line!(info, "command refused", self, status, sense, why, suppressed),
            None => {
                refusal_line!(debug, "command refused (flood guard)", self, status, sense, why, None::<u64>)
            }
        }
    }

    /// Builds the Data-In PDUs and/or SCSI Response for `data` (the Data-In
    /// payload the command produced, before EDTL truncation).
    ///
    /// This is the one place a CHECK CONDITION, BUSY or TASK SET FULL is
    /// built, so it is where each is logged, once, with `why` (through the
    /// connection's flood guard, `lines`).
    fn pdus(&self, data: Bytes, p: &SessionParams, lines: &LineBudget, why: Why) -> Out {
        self.log(lines, why);
        let mut out = Vec::new();
        let spdtl = (data.len() as u64).max(self.presented);
        let edtl = if self.read_f || spdtl > 0 { self.edtl as u64 } else { 0 };
        let (sense, mut residual) = match self.status {
            Status::Good(r) => (None, r),
            Status::Check(s, r) => (Some(s), r),
            Status::Busy(code) => {
                let mut r = Pdu::new(Opcode::ScsiResponse);
                r.bhs[1] = 0x80;
                r.bhs[3] = code;
                r.set_itt(self.itt);
                return Out { pdus: vec![(r, true)], close: false, hold: None };
            }
        };
        if spdtl > 0 || (self.read_f && matches!(residual, Residual::None)) {
            residual = if spdtl > edtl {
                Residual::Over((spdtl - edtl).min(u32::MAX as u64) as u32)
            } else if spdtl < edtl {
                Residual::Under((edtl - spdtl) as u32)
            } else {
                Residual::None
            };
        }
        let send = data.slice(..(data.len() as u64).min(edtl) as usize);
        let res_flags = |r: Residual| match r {
            Residual::None => (0u8, 0u32),
            Residual::Over(n) => (0x04, n),
            Residual::Under(n) => (0x02, n),
        };
        let (rflag, rcount) = res_flags(residual);
        let seg = p.peer_max_recv_data.max(512) as usize;
        let burst = p.max_burst.max(512) as usize;
        let mut data_sn = 0u32;
        let mut offset = 0usize;
        let collapse = sense.is_none();
        while offset < send.len() {
            let burst_left = burst - offset % burst;
            let n = (send.len() - offset).min(seg).min(burst_left);
            let last = offset + n == send.len();
            let mut d = Pdu::new(Opcode::DataIn);
            d.bhs[1] = 0;
            if last || n == burst_left {
                d.bhs[1] |= 0x80;
            }
            let with_status = last && collapse;
            if with_status {
                d.bhs[1] |= 0x01 | rflag;
                d.bhs[3] = status::GOOD;
                d.set_u32(44, rcount);
            }
            d.set_lun(self.lun_field);
            d.set_itt(self.itt);
            d.set_u32(20, RESERVED_TAG);
            d.set_u32(36, data_sn);
            d.set_u32(40, offset as u32);
            d.data = send.slice(offset..offset + n);
            out.push((d, with_status));
            data_sn += 1;
            offset += n;
        }
        if send.is_empty() || !collapse {
            let mut r = Pdu::new(Opcode::ScsiResponse);
            r.bhs[1] = 0x80 | rflag;
            r.bhs[2] = 0; // command completed at target
            r.set_itt(self.itt);
            r.set_u32(36, data_sn);
            r.set_u32(44, rcount);
            if let Some(s) = sense {
                r.bhs[3] = status::CHECK_CONDITION;
                let sd = s.fixed();
                let mut seg = Vec::with_capacity(2 + sd.len());
                seg.extend_from_slice(&(sd.len() as u16).to_be_bytes());
                seg.extend_from_slice(&sd);
                r.data = Bytes::from(seg);
            } else {
                r.bhs[3] = status::GOOD;
            }
            out.push((r, true));
        }
        Out { pdus: out, close: false, hold: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MaxCmdSN read while commands are admitted and completed on other
    /// threads never moves back and never shows a slot a command could
    /// not take: ExpCmdSN + WINDOW - 1 - busy, with busy counted at once.
    #[test]
    fn the_window_read_is_consistent_and_never_shrinks() {
        let win = Arc::new(Window::new(u32::MAX - 1000)); // wraps on the way
        assert_eq!(win.now().max, win.now().exp.wrapping_add(WINDOW - 1));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (win, done) = (win.clone(), done.clone());
            std::thread::spawn(move || {
                let mut last = win.now();
                let mut reads = 0u64;
                while !done.load(Ordering::Acquire) {
                    let sn = win.now();
                    assert!(sn.busy <= WINDOW);
                    assert_eq!(sn.max, sn.exp.wrapping_add(WINDOW - sn.busy).wrapping_sub(1));
                    assert!(!serial_lt(sn.max, last.max), "MaxCmdSN {} after {}", sn.max, last.max);
                    last = sn;
                    reads += 1;
                }
                reads
            })
        };
        let (tx, rx) = std::sync::mpsc::sync_channel::<Slot>(WINDOW as usize);
        let completer = std::thread::spawn(move || {
            while let Ok(slot) = rx.recv() {
                drop(slot)
            }
        });
        for _ in 0..200_000 {
            while win.now().busy >= WINDOW {
                std::hint::spin_loop();
            }
            tx.send(win.take()).unwrap();
        }
        drop(tx);
        completer.join().unwrap();
        done.store(true, Ordering::Release);
        assert!(watcher.join().unwrap() > 0);
        let sn = win.now();
        assert_eq!((sn.exp, sn.busy), ((u32::MAX - 1000).wrapping_add(200_000), 0));
        // A full window is closed: MaxCmdSN = ExpCmdSN - 1.
        let slots: Vec<Slot> = (0..WINDOW).map(|_| win.take()).collect();
        assert_eq!(win.now().max, win.now().exp.wrapping_sub(1));
        drop(slots);
        assert_eq!(win.now().max, win.now().exp.wrapping_add(WINDOW - 1));
    }
}
