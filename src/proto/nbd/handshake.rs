//! Fixed newstyle option negotiation as a pure state machine: the server
//! feeds it the client flags and then one option at a time; it answers with
//! the bytes to send and what to do next.
//!
//! Export names: a name is looked up exactly. The empty name `""` is the
//! default export: the only volume if the node has exactly one, otherwise
//! the volume called `demo` if it exists, otherwise unknown.

use super::*;
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Hard cap on one option's data. Legitimate options are a name (at most
/// 4096 bytes by the spec) plus a few small fields; anything larger is
/// refused without being buffered.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest string (export name, query) the spec allows.
pub const MAX_STRING: usize = 4096;
/// Name of the default export when the node has more than one volume.
pub const DEFAULT_EXPORT: &str = "demo";

/// Why the handshake cannot go on: the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("option magic {0:#018x} is not IHAVEOPT")]
    BadOptionMagic(u64),
    #[error("option {option} carries {len} bytes, over the {MAX_OPTION_LEN}-byte cap")]
    OptionTooLong { option: u32, len: u32 },
    #[error("client flags {0:#x} carry unknown bits")]
    UnknownClientFlags(u32),
}

/// One export as the handshake sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
}

/// What the handshake agreed on, for the transmission phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Canonical name of the chosen export.
    pub export: String,
    pub size: u64,
    pub read_only: bool,
    /// Transmission flags sent to the client.
    pub flags: u16,
    pub structured: bool,
    /// Id of `base:allocation` if the client selected it for this export.
    pub meta_context: Option<u32>,
    pub sizes: BlockSizes,
    /// The client asked for `NBD_INFO_BLOCK_SIZE` in the `NBD_OPT_GO` that
    /// started transmission, so it must keep to `sizes.min`. A client that
    /// did not (`NBD_OPT_EXPORT_NAME`, or GO without it) gets the spec's
    /// default minimum block size of 1: it may send requests at any byte.
    pub sizes_agreed: bool,
}

/// What the server does after sending the option's reply bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// Close the connection (after OPT_ABORT, or EXPORT_NAME of an unknown export).
    Close,
    Transmit(Session),
}

/// Splits one option (`IHAVEOPT`, option, length, data) off the front of
/// `buf`; `Ok(None)` until all of it is there.
pub fn decode_option(buf: &mut BytesMut) -> Result<Option<(u32, Bytes)>, HandshakeError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let magic = u64::from_be_bytes(buf[0..8].try_into().unwrap());
    if magic != IHAVEOPT {
        return Err(HandshakeError::BadOptionMagic(magic));
    }
    let option = u32::from_be_bytes(buf[8..12].try_into().unwrap());
    let len = u32::from_be_bytes(buf[12..16].try_into().unwrap());
    if len > MAX_OPTION_LEN {
        return Err(HandshakeError::OptionTooLong { option, len });
    }
    if buf.len() < 16 + len as usize {
        return Ok(None);
    }
    buf.advance(16);
    Ok(Some((option, buf.split_to(len as usize).freeze())))
}

/// The first bytes the server sends.
pub fn greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// The export a client means by `name` (see the module docs for `""`).
pub fn resolve<'a>(name: &str, exports: &'a [Export]) -> Option<&'a Export> {
    if name.is_empty() {
        if let [only] = exports {
            return Some(only);
        }
        return exports.iter().find(|e| e.name == DEFAULT_EXPORT);
    }
    exports.iter().find(|e| e.name == name)
}

/// Transmission flags for `export`. DF is only legal once structured
/// replies are negotiated; writes are not advertised on a read-only export.
pub fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN | TFLAG_SEND_CACHE;
    if export.read_only {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= TFLAG_SEND_DF;
    }
    f
}

/// Option negotiation state of one connection.
#[derive(Debug, Default)]
pub struct Negotiator {
    sizes: BlockSizes,
    no_zeroes: bool,
    structured: bool,
    /// Canonical export name `base:allocation` was selected for.
    meta_for: Option<String>,
}

fn put_reply(out: &mut BytesMut, option: u32, kind: u32, data: &[u8]) {
    out.put_u64(OPT_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(kind);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

fn put_error(out: &mut BytesMut, option: u32, kind: u32, msg: &str) {
    put_reply(out, option, kind, msg.as_bytes());
}

/// The error an option's reply carries, if `reply` (the bytes
/// [`Negotiator::option`] appended for one option) is an error reply: its
/// type's name and its message, for the server's log line. An error reply
/// is always the only reply to its option.
pub fn refusal(reply: &[u8]) -> Option<(&'static str, &str)> {
    if reply.len() < 20 || u64::from_be_bytes(reply[..8].try_into().unwrap()) != OPT_REPLY_MAGIC {
        return None;
    }
    let kind = u32::from_be_bytes(reply[12..16].try_into().unwrap());
    let name = match kind {
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        k if k & (1 << 31) != 0 => "NBD_REP_ERR_*",
        _ => return None,
    };
    let len = u32::from_be_bytes(reply[16..20].try_into().unwrap()) as usize;
    let msg = reply.get(20..20usize.saturating_add(len)).and_then(|m| std::str::from_utf8(m).ok());
    Some((name, msg.unwrap_or("")))
}

/// Reads a `u32` length and that many bytes of UTF-8 from `data`.
fn take_string<'a>(data: &mut &'a [u8]) -> Option<&'a str> {
    if data.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
    if len > MAX_STRING || data.len() - 4 < len {
        return None;
    }
    let s = std::str::from_utf8(&data[4..4 + len]).ok()?;
    *data = &data[4 + len..];
    Some(s)
}

/// Parsed data of OPT_INFO / OPT_GO.
struct InfoRequest<'a> {
    name: &'a str,
    infos: Vec<u16>,
}

fn parse_info(mut data: &[u8]) -> Option<InfoRequest<'_>> {
    let name = take_string(&mut data)?;
    if data.len() < 2 {
        return None;
    }
    let n = u16::from_be_bytes([data[0], data[1]]) as usize;
    data = &data[2..];
    if data.len() != 2 * n {
        return None;
    }
    let infos = data.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    Some(InfoRequest { name, infos })
}

/// Parsed data of OPT_LIST_META_CONTEXT / OPT_SET_META_CONTEXT.
fn parse_meta(mut data: &[u8]) -> Option<(&str, Vec<&str>)> {
    let name = take_string(&mut data)?;
    if data.len() < 4 {
        return None;
    }
    let n = u32::from_be_bytes(data[..4].try_into().unwrap());
    data = &data[4..];
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(take_string(&mut data)?);
    }
    if !data.is_empty() {
        return None;
    }
    Some((name, queries))
}

impl Negotiator {
    pub fn new(sizes: BlockSizes) -> Self {
        Negotiator { sizes, ..Default::default() }
    }

    /// Checks the client's 32-bit flags (the spec says to drop the
    /// connection on any bit the server did not offer).
    pub fn client_flags(&mut self, flags: u32) -> Result<(), HandshakeError> {
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(HandshakeError::UnknownClientFlags(flags));
        }
        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        Ok(())
    }

    pub fn structured(&self) -> bool {
        self.structured
    }

    fn session(&self, export: &Export, sizes_agreed: bool) -> Session {
        Session {
            export: export.name.clone(),
            size: export.size,
            read_only: export.read_only,
            flags: transmission_flags(export, self.structured),
            structured: self.structured,
            meta_context: (self.structured && self.meta_for.as_deref() == Some(export.name.as_str()))
                .then_some(META_BASE_ALLOCATION_ID),
            sizes: self.sizes,
            sizes_agreed,
        }
    }

    /// Handles one option; appends the reply bytes to `out`.
    pub fn option(&mut self, option: u32, data: &[u8], exports: &[Export], out: &mut BytesMut) -> Next {
        match option {
            OPT_EXPORT_NAME => {
                let Some(export) = std::str::from_utf8(data).ok().and_then(|n| resolve(n, exports)) else {
                    // This option cannot carry an error: the spec says to hang up.
                    return Next::Close;
                };
                let s = self.session(export, false);
                out.put_u64(s.size);
                out.put_u16(s.flags);
                if !self.no_zeroes {
                    out.put_bytes(0, 124);
                }
                Next::Transmit(s)
            }
            OPT_ABORT => {
                put_reply(out, option, REP_ACK, &[]);
                Next::Close
            }
            OPT_LIST => {
                if !data.is_empty() {
                    put_error(out, option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return Next::Continue;
                }
                for e in exports {
                    let mut d = Vec::with_capacity(4 + e.name.len());
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    put_reply(out, option, REP_SERVER, &d);
                }
                put_reply(out, option, REP_ACK, &[]);
                Next::Continue
            }
            OPT_STARTTLS => {
                put_error(out, option, REP_ERR_UNSUP, "TLS is not supported by this server");
                Next::Continue
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    put_error(out, option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                } else if self.structured {
                    put_error(out, option, REP_ERR_INVALID, "structured replies are already negotiated");
                } else {
                    self.structured = true;
                    put_reply(out, option, REP_ACK, &[]);
                }
                Next::Continue
            }
            OPT_INFO | OPT_GO => {
                let Some(req) = parse_info(data) else {
                    put_error(out, option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data");
                    return Next::Continue;
                };
                let Some(export) = resolve(req.name, exports) else {
                    put_error(out, option, REP_ERR_UNKNOWN, &format!("no export named {:?}", req.name));
                    return Next::Continue;
                };
                let s = self.session(export, option == OPT_GO && req.infos.contains(&INFO_BLOCK_SIZE));
                let mut info = Vec::with_capacity(16);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&s.size.to_be_bytes());
                info.extend_from_slice(&s.flags.to_be_bytes());
                put_reply(out, option, REP_INFO, &info);
                // Sent even unrequested: a client that reads it may keep to
                // it, but only one that asked for it is held to it (see
                // `Session::sizes_agreed`).
                info.clear();
                info.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                info.extend_from_slice(&self.sizes.min.to_be_bytes());
                info.extend_from_slice(&self.sizes.preferred.to_be_bytes());
                info.extend_from_slice(&self.sizes.max_payload.to_be_bytes());
                put_reply(out, option, REP_INFO, &info);
                if req.infos.contains(&INFO_NAME) {
                    info.clear();
                    info.extend_from_slice(&INFO_NAME.to_be_bytes());
                    info.extend_from_slice(export.name.as_bytes());
                    put_reply(out, option, REP_INFO, &info);
                }
                if req.infos.contains(&INFO_DESCRIPTION) {
                    info.clear();
                    info.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
                    info.extend_from_slice(export.description.as_bytes());
                    put_reply(out, option, REP_INFO, &info);
                }
                put_reply(out, option, REP_ACK, &[]);
                if option == OPT_GO { Next::Transmit(s) } else { Next::Continue }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set {
                    // Replaces the selection even when it fails.
                    self.meta_for = None;
                }
                if !self.structured {
                    put_error(out, option, REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first");
                    return Next::Continue;
                }
                let Some((name, queries)) = parse_meta(data) else {
                    put_error(out, option, REP_ERR_INVALID, "malformed meta context request");
                    return Next::Continue;
                };
                let Some(export) = resolve(name, exports) else {
                    put_error(out, option, REP_ERR_UNKNOWN, &format!("no export named {name:?}"));
                    return Next::Continue;
                };
                // LIST with no query lists everything; "base:" is a wildcard
                // for LIST only; unknown namespaces and leaves are ignored.
                let selected = if set {
                    queries.contains(&META_BASE_ALLOCATION)
                } else {
                    queries.is_empty() || queries.iter().any(|q| *q == "base:" || *q == META_BASE_ALLOCATION)
                };
                if selected {
                    let id = if set { META_BASE_ALLOCATION_ID } else { 0 };
                    let mut d = Vec::with_capacity(4 + META_BASE_ALLOCATION.len());
                    d.extend_from_slice(&id.to_be_bytes());
                    d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                    put_reply(out, option, REP_META_CONTEXT, &d);
                    if set {
                        self.meta_for = Some(export.name.clone());
                    }
                }
                put_reply(out, option, REP_ACK, &[]);
                Next::Continue
            }
            _ => {
                put_error(out, option, REP_ERR_UNSUP, &format!("option {option} is not supported"));
                Next::Continue
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error reply is named with its message; a good one is not an error.
    #[test]
    fn refusal_reads_error_replies_only() {
        let mut neg = Negotiator::new(BlockSizes::default());
        let mut out = BytesMut::new();
        neg.option(OPT_STARTTLS, &[], &[], &mut out);
        assert_eq!(refusal(&out), Some(("NBD_REP_ERR_UNSUP", "TLS is not supported by this server")));
        out.clear();
        neg.option(OPT_LIST, &[], &[], &mut out);
        assert_eq!(refusal(&out), None);
        out.clear();
        neg.option(OPT_INFO, &[0, 0], &[], &mut out);
        assert_eq!(refusal(&out), Some(("NBD_REP_ERR_INVALID", "malformed NBD_OPT_INFO/GO data")));
        assert_eq!(refusal(&out[..19]), None);
    }

    fn exports() -> Vec<Export> {
        vec![
            Export { name: "demo".into(), description: "d".into(), size: 1 << 20, read_only: false },
            Export { name: "ro".into(), description: "r".into(), size: 4096, read_only: true },
        ]
    }

    fn opt(option: u32, data: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u64(IHAVEOPT);
        b.put_u32(option);
        b.put_u32(data.len() as u32);
        b.put_slice(data);
        b
    }

    /// Splits reply bytes into (option, type, data) triples.
    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            assert_eq!(b.get_u64(), OPT_REPLY_MAGIC);
            let o = b.get_u32();
            let t = b.get_u32();
            let n = b.get_u32() as usize;
            v.push((o, t, b[..n].to_vec()));
            b = &b[n..];
        }
        v
    }

    fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    #[test]
    fn decode_option_waits_for_whole_frame() {
        let full = opt(OPT_LIST, b"abc");
        for cut in 0..full.len() {
            let mut b = BytesMut::from(&full[..cut]);
            assert_eq!(decode_option(&mut b), Ok(None), "cut at {cut}");
        }
        let mut b = full.clone();
        assert_eq!(decode_option(&mut b), Ok(Some((OPT_LIST, Bytes::from_static(b"abc")))));
        assert!(b.is_empty());
    }

    #[test]
    fn decode_option_rejects_bad_magic() {
        let mut b = opt(OPT_LIST, b"");
        b[0] ^= 1;
        assert!(matches!(decode_option(&mut b), Err(HandshakeError::BadOptionMagic(_))));
    }

    #[test]
    fn decode_option_refuses_over_cap_before_buffering() {
        let mut b = BytesMut::new();
        b.put_u64(IHAVEOPT);
        b.put_u32(OPT_GO);
        b.put_u32(MAX_OPTION_LEN + 1);
        assert_eq!(
            decode_option(&mut b),
            Err(HandshakeError::OptionTooLong { option: OPT_GO, len: MAX_OPTION_LEN + 1 })
        );
    }

    #[test]
    fn unknown_client_flags_close() {
        let mut n = Negotiator::new(BlockSizes::default());
        assert!(n.client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).is_ok());
        assert_eq!(n.client_flags(1 << 5), Err(HandshakeError::UnknownClientFlags(1 << 5)));
    }

    #[test]
    fn sizes_are_agreed_only_by_a_go_that_asked_for_them() {
        let go = |infos: &[u16]| {
            let mut n = Negotiator::new(BlockSizes::default());
            match n.option(OPT_GO, &go_data("demo", infos), &exports(), &mut BytesMut::new()) {
                Next::Transmit(s) => s.sizes_agreed,
                next => panic!("{next:?}"),
            }
        };
        assert!(go(&[INFO_BLOCK_SIZE]));
        assert!(go(&[INFO_NAME, INFO_BLOCK_SIZE]));
        assert!(!go(&[]));
        assert!(!go(&[INFO_NAME]));
        // INFO with the request, then GO without it: not agreed.
        let mut n = Negotiator::new(BlockSizes::default());
        let mut out = BytesMut::new();
        assert_eq!(
            n.option(OPT_INFO, &go_data("demo", &[INFO_BLOCK_SIZE]), &exports(), &mut out),
            Next::Continue
        );
        let Next::Transmit(s) = n.option(OPT_GO, &go_data("demo", &[]), &exports(), &mut out) else {
            panic!()
        };
        assert!(!s.sizes_agreed);
        let mut n = Negotiator::new(BlockSizes::default());
        let Next::Transmit(s) = n.option(OPT_EXPORT_NAME, b"demo", &exports(), &mut out) else { panic!() };
        assert!(!s.sizes_agreed, "EXPORT_NAME cannot agree on sizes");
    }

    #[test]
    fn go_answers_export_block_size_name_description() {
        let mut n = Negotiator::new(BlockSizes::default());
        let mut out = BytesMut::new();
        let next = n.option(OPT_GO, &go_data("demo", &[INFO_NAME, INFO_DESCRIPTION]), &exports(), &mut out);
        let Next::Transmit(s) = next else { panic!("{next:?}") };
        assert_eq!(s.size, 1 << 20);
        assert!(!s.structured);
        assert_eq!(s.flags & TFLAG_SEND_DF, 0, "DF needs structured replies");
        assert_ne!(s.flags & TFLAG_CAN_MULTI_CONN, 0);
        let r = replies(&out);
        assert_eq!(r.len(), 5);
        assert_eq!(r[0].1, REP_INFO);
        assert_eq!(&r[0].2[..2], &INFO_EXPORT.to_be_bytes());
        assert_eq!(&r[0].2[2..10], &(1u64 << 20).to_be_bytes());
        assert_eq!(r[1].2, [0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 0x02, 0, 0, 0]);
        assert_eq!(r[2].2, b"\0\x01demo");
        assert_eq!(r[3].2, b"\0\x02d");
        assert_eq!((r[4].0, r[4].1), (OPT_GO, REP_ACK));
    }

    #[test]
    fn info_unknown_export_and_malformed() {
        let mut n = Negotiator::new(BlockSizes::default());
        let mut out = BytesMut::new();
        assert_eq!(n.option(OPT_INFO, &go_data("nope", &[]), &exports(), &mut out), Next::Continue);
        assert_eq!(replies(&out)[0].1, REP_ERR_UNKNOWN);
        out.clear();
        let mut d = go_data("demo", &[1]);
        d.pop();
        assert_eq!(n.option(OPT_INFO, &d, &exports(), &mut out), Next::Continue);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        out.clear();
        // Name length pointing past the data.
        let d = [0, 0, 0, 200, b'x', 0, 0];
        n.option(OPT_GO, &d, &exports(), &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
    }

    #[test]
    fn default_export_rules() {
        let e = exports();
        assert_eq!(resolve("", &e).unwrap().name, "demo");
        assert_eq!(resolve("", &e[1..]).unwrap().name, "ro");
        let two = vec![e[1].clone(), Export { name: "x".into(), ..e[1].clone() }];
        assert!(resolve("", &two).is_none());
    }

    #[test]
    fn unknown_option_is_unsup_and_negotiation_goes_on() {
        let mut n = Negotiator::new(BlockSizes::default());
        let mut out = BytesMut::new();
        assert_eq!(n.option(99, b"junk", &exports(), &mut out), Next::Continue);
        assert_eq!(replies(&out)[0].1, REP_ERR_UNSUP);
        out.clear();
        assert_eq!(n.option(OPT_STARTTLS, b"", &exports(), &mut out), Next::Continue);
        assert_eq!(replies(&out)[0].1, REP_ERR_UNSUP);
    }

    #[test]
    fn meta_context_needs_structured_replies_first() {
        let mut n = Negotiator::new(BlockSizes::default());
        let mut out = BytesMut::new();
        n.option(OPT_SET_META_CONTEXT, &meta_data("demo", &["base:allocation"]), &exports(), &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        out.clear();
        n.option(OPT_STRUCTURED_REPLY, b"", &exports(), &mut out);
        assert_eq!(replies(&out)[0].1, REP_ACK);
        out.clear();
        n.option(OPT_STRUCTURED_REPLY, b"", &exports(), &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID, "second time is the wrong state");
        out.clear();
        n.option(
            OPT_SET_META_CONTEXT,
            &meta_data("demo", &["base:allocation", "x-y:z"]),
            &exports(),
            &mut out,
        );
        let r = replies(&out);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].1, REP_META_CONTEXT);
        assert_eq!(&r[0].2[4..], b"base:allocation");
        out.clear();
        let Next::Transmit(s) = n.option(OPT_GO, &go_data("demo", &[]), &exports(), &mut out) else {
            panic!()
        };
        assert_eq!(s.meta_context, Some(META_BASE_ALLOCATION_ID));
        assert_ne!(s.flags & TFLAG_SEND_DF, 0);
    }

    #[test]
    fn meta_context_for_another_export_is_not_active() {
        let mut n = Negotiator::new(BlockSizes::default());
        let mut out = BytesMut::new();
        n.option(OPT_STRUCTURED_REPLY, b"", &exports(), &mut out);
        n.option(OPT_SET_META_CONTEXT, &meta_data("ro", &["base:allocation"]), &exports(), &mut out);
        let Next::Transmit(s) = n.option(OPT_GO, &go_data("demo", &[]), &exports(), &mut out) else {
            panic!()
        };
        assert_eq!(s.meta_context, None);
    }

    #[test]
    fn list_meta_context_wildcards() {
        let mut n = Negotiator::new(BlockSizes::default());
        let mut out = BytesMut::new();
        n.option(OPT_STRUCTURED_REPLY, b"", &exports(), &mut out);
        for q in [&[][..], &["base:"][..], &["base:allocation"][..]] {
            out.clear();
            n.option(OPT_LIST_META_CONTEXT, &meta_data("demo", q), &exports(), &mut out);
            let r = replies(&out);
            assert_eq!(r.len(), 2, "{q:?}");
            assert_eq!(&r[0].2[4..], b"base:allocation");
        }
        out.clear();
        n.option(OPT_LIST_META_CONTEXT, &meta_data("demo", &["qemu:dirty-bitmap:x"]), &exports(), &mut out);
        assert_eq!(replies(&out).iter().map(|r| r.1).collect::<Vec<_>>(), vec![REP_ACK]);
        out.clear();
        let mut d = meta_data("demo", &["base:"]);
        d.push(0);
        n.option(OPT_LIST_META_CONTEXT, &d, &exports(), &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
    }

    #[test]
    fn list_and_abort() {
        let mut n = Negotiator::new(BlockSizes::default());
        let mut out = BytesMut::new();
        n.option(OPT_LIST, b"", &exports(), &mut out);
        let r = replies(&out);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].2, b"\0\0\0\x04demo");
        assert_eq!(r[2].1, REP_ACK);
        out.clear();
        n.option(OPT_LIST, b"x", &exports(), &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        out.clear();
        assert_eq!(n.option(OPT_ABORT, b"", &exports(), &mut out), Next::Close);
        assert_eq!(replies(&out)[0].1, REP_ACK);
    }

    #[test]
    fn export_name_replies_with_or_without_zeroes() {
        for (flags, len) in [(FLAG_C_FIXED_NEWSTYLE, 134), (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 10)] {
            let mut n = Negotiator::new(BlockSizes::default());
            n.client_flags(flags).unwrap();
            let mut out = BytesMut::new();
            assert!(matches!(n.option(OPT_EXPORT_NAME, b"ro", &exports(), &mut out), Next::Transmit(_)));
            assert_eq!(out.len(), len);
            let f = u16::from_be_bytes([out[8], out[9]]);
            assert_ne!(f & TFLAG_READ_ONLY, 0);
            assert_eq!(f & TFLAG_SEND_TRIM, 0);
        }
        let mut n = Negotiator::new(BlockSizes::default());
        let mut out = BytesMut::new();
        assert_eq!(n.option(OPT_EXPORT_NAME, b"nope", &exports(), &mut out), Next::Close);
        assert!(out.is_empty());
    }
}
