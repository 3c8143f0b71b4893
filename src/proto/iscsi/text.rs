//! Text key=value segments (RFC 7143 section 6): NUL-terminated
//! `key=value` pairs used by Login and Text PDUs.

/// Longest key we accept (RFC 7143 6.1: 63 bytes).
pub const MAX_KEY_LEN: usize = 63;
/// Longest value we accept (RFC 7143 6.1: 255 bytes, 8192 for a few keys
/// such as CHAP_C/CHAP_R in hex; we take the larger bound for every key).
pub const MAX_VALUE_LEN: usize = 8192;
/// Most pairs in one negotiation round; far above any real initiator.
pub const MAX_PAIRS: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("text is not UTF-8")]
    NotUtf8,
    #[error("pair {0:?} has no '='")]
    NoEquals(String),
    #[error("key of {0} bytes is too long")]
    KeyTooLong(usize),
    #[error("value of {0} bytes is too long")]
    ValueTooLong(usize),
    #[error("more than {MAX_PAIRS} pairs")]
    TooManyPairs,
    #[error("key {0:?} appears twice")]
    Duplicate(String),
}

/// Parses a text segment into pairs, in order. A missing final NUL is
/// tolerated (some initiators omit it); empty strings between NULs are
/// padding and skipped.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for raw in data.split(|&b| b == 0) {
        if raw.is_empty() {
            continue;
        }
        let s = std::str::from_utf8(raw).map_err(|_| TextError::NotUtf8)?;
        let (k, v) = s.split_once('=').ok_or_else(|| TextError::NoEquals(s.chars().take(64).collect()))?;
        if k.len() > MAX_KEY_LEN || k.is_empty() {
            return Err(TextError::KeyTooLong(k.len()));
        }
        if v.len() > MAX_VALUE_LEN {
            return Err(TextError::ValueTooLong(v.len()));
        }
        if out.len() >= MAX_PAIRS {
            return Err(TextError::TooManyPairs);
        }
        if out.iter().any(|(ok, _)| ok == k) {
            return Err(TextError::Duplicate(k.to_string()));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Encodes pairs as `key=value\0...`.
pub fn encode(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// A numeric value: decimal, or hex with 0x (RFC 7143 5.1 allows both).
pub fn parse_number(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        v.parse().ok()
    } else {
        None
    }
}

/// A binary value in hex (`0x...`) or base64 (`0b...`) notation.
pub fn parse_binary(v: &str) -> Option<Vec<u8>> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        let h = h.as_bytes();
        // An odd count means a leading zero nibble was dropped.
        let mut out = Vec::with_capacity(h.len().div_ceil(2));
        let nib = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut i = 0;
        if h.len() % 2 == 1 {
            out.push(nib(h[0])?);
            i = 1;
        }
        while i < h.len() {
            out.push(nib(h[i])? << 4 | nib(h[i + 1])?);
            i += 2;
        }
        if out.is_empty() { None } else { Some(out) }
    } else if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        base64_decode(b)
    } else {
        None
    }
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for &c in s {
        acc = acc << 6 | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    if out.is_empty() { None } else { Some(out) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_and_tolerates_missing_nul() {
        let p = parse(b"A=1\0B=x=y\0\0C=").unwrap();
        assert_eq!(p, vec![("A".into(), "1".into()), ("B".into(), "x=y".into()), ("C".into(), "".into())]);
    }

    #[test]
    fn malformed_text() {
        assert_eq!(parse(b"novalue\0"), Err(TextError::NoEquals("novalue".into())));
        assert_eq!(parse(b"A=1\0A=2\0"), Err(TextError::Duplicate("A".into())));
        assert_eq!(parse(&[0xff, b'=', b'1']), Err(TextError::NotUtf8));
        let long = format!("{}=1", "k".repeat(64));
        assert_eq!(parse(long.as_bytes()), Err(TextError::KeyTooLong(64)));
        assert_eq!(parse(b"=1"), Err(TextError::KeyTooLong(0)));
    }

    #[test]
    fn numbers_and_binary() {
        assert_eq!(parse_number("8192"), Some(8192));
        assert_eq!(parse_number("0x10"), Some(16));
        assert_eq!(parse_number("-1"), None);
        assert_eq!(parse_binary("0x0aff"), Some(vec![10, 255]));
        assert_eq!(parse_binary("0xaff"), Some(vec![10, 255]));
        assert_eq!(parse_binary("0bAQID"), Some(vec![1, 2, 3]));
        assert_eq!(parse_binary("0x"), None);
        assert_eq!(parse_binary("zz"), None);
        assert_eq!(hex(&[1, 0xab]), "0x01ab");
    }
}
