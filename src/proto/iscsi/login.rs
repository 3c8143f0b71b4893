//! The login phase (RFC 7143 sections 6, 12, 13): stage transitions,
//! security negotiation (None, CHAP with MD5, one-way or mutual) and
//! operational parameter negotiation. Pure: the caller supplies the random
//! CHAP challenge and sends the PDUs this returns.

use super::pdu::{Opcode, Pdu};
use super::text::{self, TextError};
use bytes::Bytes;
use md5::{Digest, Md5};

/// Login stages (CSG/NSG values).
pub const STAGE_SECURITY: u8 = 0;
pub const STAGE_OPERATIONAL: u8 = 1;
pub const STAGE_FULL_FEATURE: u8 = 3;

/// Most non-immediate commands a session may have in flight: the CmdSN
/// window a fresh session opens with (MaxCmdSN = ExpCmdSN + CMD_WINDOW - 1),
/// which the full feature phase then slides as commands complete.
pub const CMD_WINDOW: u32 = 32;

/// Login status class/detail pairs we send (RFC 7143 11.13.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginStatus {
    Success = 0x0000,
    InitiatorError = 0x0200,
    AuthFailed = 0x0201,
    NotFound = 0x0203,
    UnsupportedVersion = 0x0205,
    MissingParameter = 0x0207,
    SessionTypeUnsupported = 0x0209,
    SessionDoesNotExist = 0x020a,
    InvalidDuringLogin = 0x020b,
    TargetError = 0x0300,
}

/// CHAP credentials from the config. `mutual` is what the target answers
/// with when the initiator challenges it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChapConfig {
    pub user: String,
    pub secret: String,
    pub mutual: Option<(String, String)>,
}

/// What the target offers in every session.
#[derive(Debug, Clone)]
pub struct TargetLimits {
    /// The MaxRecvDataSegmentLength we declare (our receive cap).
    pub max_recv_data: u32,
    /// Our upper bound for MaxBurstLength and FirstBurstLength.
    pub max_burst: u32,
    pub chap: Option<ChapConfig>,
}

/// The outcome of a finished login: everything the full feature phase needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    pub discovery: bool,
    pub initiator_name: String,
    pub target_name: Option<String>,
    pub isid: [u8; 6],
    pub tsih: u16,
    /// The initiator's MaxRecvDataSegmentLength: the cap on our Data-In segments.
    pub peer_max_recv_data: u32,
    /// Our MaxRecvDataSegmentLength.
    pub max_recv_data: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub header_digest: bool,
    pub data_digest: bool,
    /// CmdSN the initiator will use for its first full-feature command.
    pub exp_cmd_sn: u32,
    pub stat_sn: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Auth {
    /// Security stage not entered yet, or AuthMethod not chosen.
    Start,
    /// AuthMethod=CHAP chosen; waiting for CHAP_A.
    ChapAlgorithm,
    /// Challenge sent; waiting for CHAP_N/CHAP_R.
    ChapResponse {
        id: u8,
        challenge: Vec<u8>,
    },
    Done,
}

/// What the caller does after one login request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send the response and keep reading login requests.
    Continue(Pdu),
    /// Send the response; the connection is now in the full feature phase.
    Done(Pdu, Box<SessionParams>),
    /// Send the response (a login reject) and close the connection.
    Fail(Pdu, LoginStatus, String),
}

/// The negotiation state of one connection's login.
#[derive(Debug)]
pub struct Login {
    limits: TargetLimits,
    /// Targets this node serves (IQNs).
    targets: Vec<String>,
    challenge: [u8; 16],
    challenge_id: u8,
    new_tsih: u16,
    stage: u8,
    first: bool,
    auth: Auth,
    isid: [u8; 6],
    itt: u32,
    initiator_name: Option<String>,
    target_name: Option<String>,
    discovery: bool,
    p: SessionParams,
    declared_tpgt: bool,
    declared_mrdsl: bool,
    stat_sn: u32,
    /// Pieces of a text segment split over several requests with C=1.
    pending_text: Vec<u8>,
}

/// Our cap on a login text split over continuation PDUs.
const MAX_LOGIN_TEXT: usize = 64 << 10;

impl Login {
    /// `challenge`/`challenge_id` must be fresh randomness per login;
    /// `new_tsih` is the session handle to give out on success (non-zero).
    pub fn new(
        limits: TargetLimits,
        targets: Vec<String>,
        challenge: [u8; 16],
        challenge_id: u8,
        new_tsih: u16,
    ) -> Login {
        let p = SessionParams {
            discovery: false,
            initiator_name: String::new(),
            target_name: None,
            isid: [0; 6],
            tsih: new_tsih,
            peer_max_recv_data: 8192,
            max_recv_data: limits.max_recv_data,
            max_burst: 262144,
            first_burst: 65536,
            immediate_data: true,
            initial_r2t: true,
            header_digest: false,
            data_digest: false,
            exp_cmd_sn: 0,
            stat_sn: 0,
        };
        Login {
            limits,
            targets,
            challenge,
            challenge_id,
            new_tsih,
            stage: STAGE_SECURITY,
            first: true,
            auth: Auth::Start,
            isid: [0; 6],
            itt: 0,
            initiator_name: None,
            target_name: None,
            discovery: false,
            p,
            declared_tpgt: false,
            declared_mrdsl: false,
            stat_sn: 0,
            pending_text: Vec::new(),
        }
    }

    fn response(&self, transit: bool, csg: u8, nsg: u8, status: LoginStatus, data: Vec<u8>) -> Pdu {
        let mut r = Pdu::new(Opcode::LoginResponse);
        r.bhs[1] = if transit { 0x80 } else { 0 } | (csg & 3) << 2 | if transit { nsg & 3 } else { 0 };
        r.bhs[2] = 0; // Version-max
        r.bhs[3] = 0; // Version-active
        r.bhs[8..14].copy_from_slice(&self.isid);
        let tsih = if status == LoginStatus::Success && transit && nsg == STAGE_FULL_FEATURE {
            self.new_tsih
        } else {
            0
        };
        r.set_u16(14, tsih);
        r.set_itt(self.itt);
        r.set_u32(24, self.stat_sn);
        r.set_u32(28, self.p.exp_cmd_sn);
        r.set_u32(32, self.p.exp_cmd_sn.wrapping_add(CMD_WINDOW - 1));
        r.set_u16(36, status as u16);
        r.data = Bytes::from(data);
        r
    }

    fn fail(&self, status: LoginStatus, why: impl Into<String>) -> Step {
        let mut r = self.response(false, self.stage, 0, status, Vec::new());
        r.set_u16(14, 0);
        Step::Fail(r, status, why.into())
    }

    /// Handles one PDU received during the login phase.
    pub fn step(&mut self, req: &Pdu) -> Step {
        if req.opcode() != Some(Opcode::LoginRequest) {
            return self.fail(
                LoginStatus::InvalidDuringLogin,
                format!("opcode {:#x} during login", req.raw_opcode()),
            );
        }
        let flags = req.flags();
        let transit = flags & 0x80 != 0;
        let cont = flags & 0x40 != 0;
        let csg = (flags >> 2) & 3;
        let nsg = flags & 3;
        self.itt = req.itt();
        self.stat_sn = req.word28();
        if self.first {
            self.isid.copy_from_slice(&req.bhs[8..14]);
            self.p.isid = self.isid;
            self.p.exp_cmd_sn = req.word24();
            if req.bhs[3] > 0 {
                // Version-min above 0: we only speak version 0.
                return self.fail(LoginStatus::UnsupportedVersion, format!("version-min {}", req.bhs[3]));
            }
            if req.u16_at(14) != 0 {
                return self.fail(LoginStatus::SessionDoesNotExist, "TSIH set: no session reinstatement");
            }
        }
        if transit && cont {
            return self.fail(LoginStatus::InitiatorError, "T and C both set");
        }
        // Stages only move forward, and the request must be in ours.
        let valid_csg = match (self.first, csg) {
            (true, STAGE_SECURITY | STAGE_OPERATIONAL) => true,
            (false, c) => c == self.stage,
            _ => false,
        };
        if !valid_csg {
            return self.fail(LoginStatus::InitiatorError, format!("CSG {csg} in stage {}", self.stage));
        }
        if transit && (nsg <= csg || nsg == 2) {
            return self.fail(LoginStatus::InitiatorError, format!("transit from {csg} to {nsg}"));
        }
        self.stage = csg;
        if self.pending_text.len() + req.data.len() > MAX_LOGIN_TEXT {
            return self.fail(LoginStatus::InitiatorError, "login text too long");
        }
        self.pending_text.extend_from_slice(&req.data);
        if cont {
            // More text follows: acknowledge with an empty response.
            return Step::Continue(self.response(false, csg, 0, LoginStatus::Success, Vec::new()));
        }
        let text = std::mem::take(&mut self.pending_text);
        let pairs = match text::parse(&text) {
            Ok(p) => p,
            Err(e) => return self.fail(LoginStatus::InitiatorError, format!("login text: {e}")),
        };
        let was_first = self.first;
        self.first = false;
        let mut reply: Vec<(String, String)> = Vec::new();
        for (k, v) in &pairs {
            match k.as_str() {
                "InitiatorName" => self.initiator_name = Some(v.clone()),
                "SessionType" => match v.as_str() {
                    "Discovery" => self.discovery = true,
                    "Normal" => self.discovery = false,
                    _ => return self.fail(LoginStatus::SessionTypeUnsupported, format!("SessionType={v}")),
                },
                "TargetName" => self.target_name = Some(v.clone()),
                _ => {}
            }
        }
        if was_first {
            if self.initiator_name.is_none() {
                return self.fail(LoginStatus::MissingParameter, "no InitiatorName");
            }
            if !self.discovery {
                match &self.target_name {
                    None => return self.fail(LoginStatus::MissingParameter, "no TargetName"),
                    Some(t) if !self.targets.contains(t) => {
                        return self.fail(LoginStatus::NotFound, format!("no target {t}"));
                    }
                    Some(_) => {}
                }
            }
            if csg == STAGE_OPERATIONAL && self.limits.chap.is_some() {
                return self.fail(LoginStatus::AuthFailed, "CHAP required but security stage skipped");
            }
            if csg == STAGE_OPERATIONAL {
                self.auth = Auth::Done;
            }
        }

        // Security keys.
        if csg == STAGE_SECURITY {
            if let Err(step) = self.security(&pairs, &mut reply) {
                return *step;
            }
        } else if pairs.iter().any(|(k, _)| k.starts_with("CHAP_") || k == "AuthMethod") {
            return self.fail(LoginStatus::InitiatorError, "security keys in the operational stage");
        }
        // Operational and declarative keys (accepted in either stage).
        for (k, v) in &pairs {
            if let Some(ans) = self.operational(k, v) {
                reply.push((k.clone(), ans));
            }
        }
        if !self.discovery && !self.declared_tpgt {
            reply.push(("TargetPortalGroupTag".into(), "1".into()));
            // The alias is the volume name: the IQN's last component.
            if let Some(alias) = self.target_name.as_deref().and_then(|t| t.rsplit(':').next()) {
                reply.push(("TargetAlias".into(), alias.to_string()));
            }
            self.declared_tpgt = true;
        }
        let mut next_transit = transit;
        if csg == STAGE_SECURITY && self.auth != Auth::Done {
            // Authentication not finished: we may not leave the stage.
            next_transit = false;
        }
        if (next_transit && nsg == STAGE_FULL_FEATURE || csg == STAGE_OPERATIONAL) && !self.declared_mrdsl {
            reply.push(("MaxRecvDataSegmentLength".into(), self.limits.max_recv_data.to_string()));
            self.declared_mrdsl = true;
        }
        let data = text::encode(&reply);
        if data.len() > self.p.peer_max_recv_data.max(8192) as usize {
            return self.fail(LoginStatus::TargetError, "login response too long");
        }
        if next_transit {
            self.stage = nsg;
        }
        let resp = self.response(next_transit, csg, nsg, LoginStatus::Success, data);
        if next_transit && nsg == STAGE_FULL_FEATURE {
            let mut p = self.p.clone();
            p.discovery = self.discovery;
            p.initiator_name = self.initiator_name.clone().unwrap_or_default();
            p.target_name = if self.discovery { None } else { self.target_name.clone() };
            p.first_burst = p.first_burst.min(p.max_burst);
            p.stat_sn = self.stat_sn.wrapping_add(1);
            return Step::Done(resp, Box::new(p));
        }
        Step::Continue(resp)
    }

    fn bfail(&self, status: LoginStatus, why: impl Into<String>) -> Box<Step> {
        Box::new(self.fail(status, why))
    }

    /// Security-stage keys. The error is the login reject to send.
    fn security(
        &mut self,
        pairs: &[(String, String)],
        reply: &mut Vec<(String, String)>,
    ) -> Result<(), Box<Step>> {
        let get = |k: &str| pairs.iter().find(|(pk, _)| pk == k).map(|(_, v)| v.as_str());
        if let Some(methods) = get("AuthMethod") {
            if self.auth != Auth::Start {
                return Err(self.bfail(LoginStatus::InitiatorError, "AuthMethod renegotiated"));
            }
            let offered: Vec<&str> = methods.split(',').collect();
            if self.limits.chap.is_some() {
                if !offered.contains(&"CHAP") {
                    return Err(
                        self.bfail(LoginStatus::AuthFailed, format!("CHAP required, offered {methods}"))
                    );
                }
                reply.push(("AuthMethod".into(), "CHAP".into()));
                self.auth = Auth::ChapAlgorithm;
            } else if offered.contains(&"None") {
                reply.push(("AuthMethod".into(), "None".into()));
                self.auth = Auth::Done;
            } else {
                reply.push(("AuthMethod".into(), "Reject".into()));
                return Err(self.bfail(LoginStatus::AuthFailed, format!("no usable AuthMethod in {methods}")));
            }
            return Ok(());
        }
        match self.auth.clone() {
            Auth::Start => {
                if self.limits.chap.is_some() {
                    // Going on without AuthMethod means no authentication.
                    return Err(self.bfail(LoginStatus::AuthFailed, "CHAP required, no AuthMethod sent"));
                }
                self.auth = Auth::Done;
            }
            Auth::ChapAlgorithm => {
                let Some(algs) = get("CHAP_A") else {
                    return Err(self.bfail(LoginStatus::AuthFailed, "expected CHAP_A"));
                };
                if !algs.split(',').any(|a| a == "5") {
                    return Err(self.bfail(LoginStatus::AuthFailed, format!("CHAP_A={algs}: only MD5 (5)")));
                }
                reply.push(("CHAP_A".into(), "5".into()));
                reply.push(("CHAP_I".into(), self.challenge_id.to_string()));
                reply.push(("CHAP_C".into(), text::hex(&self.challenge)));
                self.auth = Auth::ChapResponse { id: self.challenge_id, challenge: self.challenge.to_vec() };
            }
            Auth::ChapResponse { id, challenge } => {
                let chap = self.limits.chap.clone().unwrap_or_default();
                let (Some(name), Some(resp)) = (get("CHAP_N"), get("CHAP_R")) else {
                    return Err(self.bfail(LoginStatus::AuthFailed, "expected CHAP_N and CHAP_R"));
                };
                let Some(resp) = text::parse_binary(resp) else {
                    return Err(self.bfail(LoginStatus::AuthFailed, "CHAP_R is not binary"));
                };
                let expected = chap_md5(id, chap.secret.as_bytes(), &challenge);
                if name != chap.user || !ct_eq(&resp, &expected) {
                    return Err(
                        self.bfail(LoginStatus::AuthFailed, format!("CHAP response wrong for {name:?}"))
                    );
                }
                match (get("CHAP_I"), get("CHAP_C")) {
                    (None, None) => {}
                    (Some(i), Some(c)) => {
                        let Some((muser, msecret)) = chap.mutual.clone() else {
                            return Err(
                                self.bfail(LoginStatus::AuthFailed, "mutual CHAP asked, not configured")
                            );
                        };
                        let (Some(i), Some(c)) = (text::parse_number(i), text::parse_binary(c)) else {
                            return Err(self.bfail(LoginStatus::AuthFailed, "bad CHAP_I/CHAP_C"));
                        };
                        // A reflected challenge would let an attacker use us as an oracle.
                        if i > 255 || c == challenge || c.len() < 8 {
                            return Err(self.bfail(LoginStatus::AuthFailed, "unacceptable mutual challenge"));
                        }
                        reply.push(("CHAP_N".into(), muser));
                        reply.push(("CHAP_R".into(), text::hex(&chap_md5(i as u8, msecret.as_bytes(), &c))));
                    }
                    _ => {
                        return Err(
                            self.bfail(LoginStatus::AuthFailed, "CHAP_I without CHAP_C or vice versa")
                        );
                    }
                }
                self.auth = Auth::Done;
            }
            Auth::Done => {}
        }
        Ok(())
    }

    /// The answer to one operational or declarative key, or None if the
    /// key needs no answer.
    fn operational(&mut self, k: &str, v: &str) -> Option<String> {
        let num = text::parse_number(v);
        let disc = self.discovery;
        let yes = |b: bool| if b { "Yes".to_string() } else { "No".to_string() };
        Some(match k {
            "InitiatorName" | "SessionType" | "InitiatorAlias" => return None,
            "TargetName" => return None,
            "AuthMethod" | "CHAP_A" | "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C" => return None,
            "HeaderDigest" | "DataDigest" => {
                let pick = v.split(',').find(|d| *d == "CRC32C" || *d == "None");
                let Some(pick) = pick else { return Some("Reject".into()) };
                if k == "HeaderDigest" {
                    self.p.header_digest = pick == "CRC32C";
                } else {
                    self.p.data_digest = pick == "CRC32C";
                }
                pick.to_string()
            }
            "MaxRecvDataSegmentLength" => {
                let Some(n) = num.filter(|n| (512..=(1 << 24) - 1).contains(n)) else {
                    return Some("Reject".into());
                };
                self.p.peer_max_recv_data = n as u32;
                // Declarative: our own value goes out once, separately.
                return None;
            }
            "MaxBurstLength" | "FirstBurstLength" if disc => "Irrelevant".into(),
            "MaxBurstLength" => {
                let Some(n) = num.filter(|n| (512..=(1 << 24) - 1).contains(n)) else {
                    return Some("Reject".into());
                };
                self.p.max_burst = (n as u32).min(self.limits.max_burst);
                self.p.max_burst.to_string()
            }
            "FirstBurstLength" => {
                let Some(n) = num.filter(|n| (512..=(1 << 24) - 1).contains(n)) else {
                    return Some("Reject".into());
                };
                self.p.first_burst = (n as u32).min(self.limits.max_burst);
                self.p.first_burst.to_string()
            }
            "ImmediateData" | "InitialR2T" | "DataPDUInOrder" | "DataSequenceInOrder" if disc => {
                "Irrelevant".into()
            }
            "ImmediateData" => {
                let Some(b) = parse_bool(v) else { return Some("Reject".into()) };
                self.p.immediate_data = b; // AND with our Yes
                yes(b)
            }
            // OR functions: our Yes wins, which keeps unsolicited data to immediate data.
            "InitialR2T" | "DataPDUInOrder" | "DataSequenceInOrder" => {
                if parse_bool(v).is_none() {
                    return Some("Reject".into());
                }
                "Yes".into()
            }
            "MaxOutstandingR2T" if disc => "Irrelevant".into(),
            "MaxOutstandingR2T" | "MaxConnections" => {
                if num.filter(|n| (1..=65535).contains(n)).is_none() {
                    return Some("Reject".into());
                }
                "1".into()
            }
            "ErrorRecoveryLevel" => {
                if num.filter(|n| *n <= 2).is_none() {
                    return Some("Reject".into());
                }
                "0".into()
            }
            "DefaultTime2Wait" => {
                let Some(n) = num.filter(|n| *n <= 3600) else { return Some("Reject".into()) };
                n.to_string() // max(theirs, our 0)
            }
            "DefaultTime2Retain" => {
                if num.filter(|n| *n <= 3600).is_none() {
                    return Some("Reject".into());
                }
                "0".into() // min(theirs, our 0): ERL 0 keeps no state after a drop
            }
            "IFMarker" | "OFMarker" => "No".into(),
            "IFMarkInt" | "OFMarkInt" => "Irrelevant".into(),
            "TargetPortalGroupTag" | "TargetAlias" | "TargetAddress" => "Reject".into(),
            _ => "NotUnderstood".into(),
        })
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

/// CHAP with MD5 (RFC 1994): MD5(identifier || secret || challenge).
pub fn chap_md5(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl From<TextError> for LoginStatus {
    fn from(_: TextError) -> Self {
        LoginStatus::InitiatorError
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "iqn.2026-11.io.basalt:demo";

    fn login(chap: Option<ChapConfig>) -> Login {
        Login::new(
            TargetLimits { max_recv_data: 262144, max_burst: 1 << 20, chap },
            vec![T.into()],
            [7; 16],
            42,
            5,
        )
    }

    fn req(t: bool, csg: u8, nsg: u8, kv: &[(&str, &str)]) -> Pdu {
        let mut p = Pdu::new(Opcode::LoginRequest);
        p.bhs[0] |= 0x40;
        p.bhs[1] = if t { 0x80 } else { 0 } | csg << 2 | nsg;
        p.bhs[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]);
        p.set_itt(9);
        let pairs: Vec<(String, String)> = kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        p.data = Bytes::from(text::encode(&pairs));
        p
    }

    fn keys(p: &Pdu) -> Vec<(String, String)> {
        text::parse(&p.data).unwrap()
    }

    fn get(p: &Pdu, k: &str) -> Option<String> {
        keys(p).into_iter().find(|(pk, _)| pk == k).map(|(_, v)| v)
    }

    #[test]
    fn no_auth_straight_to_full_feature() {
        let mut l = login(None);
        let r = req(
            true,
            1,
            3,
            &[
                ("InitiatorName", "iqn.x"),
                ("TargetName", T),
                ("HeaderDigest", "CRC32C,None"),
                ("MaxBurstLength", "16776192"),
                ("MaxRecvDataSegmentLength", "65536"),
                ("X-foo", "1"),
            ],
        );
        let Step::Done(resp, p) = l.step(&r) else { panic!() };
        assert_eq!(resp.bhs[1], 0x80 | 1 << 2 | 3);
        assert_eq!(resp.u16_at(14), 5);
        assert_eq!(resp.u16_at(36), 0);
        assert!(p.header_digest);
        assert_eq!(p.max_burst, 1 << 20);
        assert_eq!(p.peer_max_recv_data, 65536);
        assert_eq!(get(&resp, "X-foo").as_deref(), Some("NotUnderstood"));
        assert_eq!(get(&resp, "TargetPortalGroupTag").as_deref(), Some("1"));
        assert_eq!(get(&resp, "TargetAlias").as_deref(), Some("demo"));
        assert_eq!(get(&resp, "MaxRecvDataSegmentLength").as_deref(), Some("262144"));
    }

    #[test]
    fn unknown_target_and_missing_name() {
        let mut l = login(None);
        let Step::Fail(r, LoginStatus::NotFound, _) =
            l.step(&req(true, 1, 3, &[("InitiatorName", "i"), ("TargetName", "iqn.nope")]))
        else {
            panic!()
        };
        assert_eq!(r.u16_at(36), 0x0203);
        let mut l = login(None);
        assert!(matches!(
            l.step(&req(true, 1, 3, &[("TargetName", T)])),
            Step::Fail(_, LoginStatus::MissingParameter, _)
        ));
    }

    #[test]
    fn wrong_stage_is_refused() {
        let mut l = login(None);
        let r = req(true, 3, 3, &[("InitiatorName", "i"), ("SessionType", "Discovery")]);
        assert!(matches!(l.step(&r), Step::Fail(_, LoginStatus::InitiatorError, _)));
        let mut l = login(None);
        let r = req(true, 1, 0, &[("InitiatorName", "i"), ("SessionType", "Discovery")]);
        assert!(matches!(l.step(&r), Step::Fail(_, LoginStatus::InitiatorError, _)));
        let mut l = login(None);
        let mut nop = Pdu::new(Opcode::NopOut);
        nop.set_itt(1);
        assert!(matches!(l.step(&nop), Step::Fail(_, LoginStatus::InvalidDuringLogin, _)));
    }

    #[test]
    fn chap_required_cannot_be_skipped() {
        let chap = ChapConfig { user: "u".into(), secret: "s3cret-s3cret".into(), mutual: None };
        let mut l = login(Some(chap));
        let r = req(true, 1, 3, &[("InitiatorName", "i"), ("TargetName", T)]);
        assert!(matches!(l.step(&r), Step::Fail(_, LoginStatus::AuthFailed, _)));
    }

    fn chap_flow(mutual: bool, good: bool) -> Step {
        let chap = ChapConfig {
            user: "u".into(),
            secret: "s3cret-s3cret".into(),
            mutual: Some(("tu".into(), "t-secret-12345".into())),
        };
        let mut l = login(Some(chap));
        let Step::Continue(r) = l.step(&req(
            false,
            0,
            0,
            &[("InitiatorName", "i"), ("TargetName", T), ("AuthMethod", "CHAP,None")],
        )) else {
            panic!()
        };
        assert_eq!(get(&r, "AuthMethod").as_deref(), Some("CHAP"));
        let Step::Continue(r) = l.step(&req(false, 0, 0, &[("CHAP_A", "7,5")])) else { panic!() };
        assert_eq!(get(&r, "CHAP_I").as_deref(), Some("42"));
        let c = text::parse_binary(&get(&r, "CHAP_C").unwrap()).unwrap();
        let secret: &[u8] = if good { b"s3cret-s3cret" } else { b"wrong" };
        let resp = text::hex(&chap_md5(42, secret, &c));
        let mut kv = vec![("CHAP_N", "u"), ("CHAP_R", resp.as_str())];
        if mutual {
            kv.push(("CHAP_I", "3"));
            kv.push(("CHAP_C", "0x0102030405060708"));
        }
        l.step(&req(true, 0, 1, &kv))
    }

    #[test]
    fn chap_one_way_and_mutual() {
        let Step::Continue(r) = chap_flow(false, true) else { panic!() };
        assert_eq!(r.bhs[1] & 0x83, 0x81);
        let Step::Continue(r) = chap_flow(true, true) else { panic!() };
        let expect = text::hex(&chap_md5(3, b"t-secret-12345", &[1, 2, 3, 4, 5, 6, 7, 8]));
        assert_eq!(get(&r, "CHAP_N").as_deref(), Some("tu"));
        assert_eq!(get(&r, "CHAP_R"), Some(expect));
        assert!(matches!(chap_flow(false, false), Step::Fail(_, LoginStatus::AuthFailed, _)));
    }

    #[test]
    fn chap_md5_rfc1994_shape() {
        // Same inputs, same digest; id is part of the hash.
        assert_ne!(chap_md5(1, b"s", b"c"), chap_md5(2, b"s", b"c"));
    }
}
