//! What the first bytes of a guest connection say about it: a TLS
//! ClientHello (scheme `https`, its SNI host name), an HTTP/1.x request
//! line (scheme `http`, method, path) or anything else (scheme `tcp`).
//!
//! Used by [`crate::relay`] when some rule that could match a connection's
//! `(host, port)` depends on scheme, method or path
//! ([`crate::policy::Policy::needs_peek`]): the proxy buffers the guest's
//! first bytes, at most [`MAX_PEEK`], for at most [`PEEK_WAIT`], and calls
//! [`classify`] after each write until it answers.
//!
//! Every parser here works on an untrusted byte slice of at most
//! [`MAX_PEEK`] bytes with checked reads only: no input panics, none makes
//! it allocate more than the input's size.
//!
//! Sources: TLS records and the ClientHello, RFC 8446 5.1 and 4.1.2 (the
//! same layout as RFC 5246 6.2.1 and 7.4.1.2); `server_name`, RFC 6066 3;
//! the HTTP/1.1 request line, RFC 9112 3 (method a `tchar` token, RFC 9110
//! 5.6.2 and 9.1; request targets, RFC 9112 3.2); dot segments, RFC 3986
//! 5.2.4.

use crate::policy::{valid_dns_name, Scheme, MAX_METHOD};
use std::time::Duration;

/// Most guest bytes held before a decision (one TLS record's plaintext
/// limit, RFC 8446 5.1: 2^14 bytes).
pub const MAX_PEEK: usize = 16 * 1024;
/// Longest wait for the guest's first bytes before deciding with what is
/// known.
pub const PEEK_WAIT: Duration = Duration::from_secs(5);

/// The bounds of one peek.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeekLimits {
    /// Bytes held at most (the guest's writes past it wait for the
    /// decision).
    pub bytes: usize,
    /// How long the guest may take to send them.
    pub wait: Duration,
}

/// [`MAX_PEEK`] bytes, [`PEEK_WAIT`].
pub const PEEK: PeekLimits = PeekLimits { bytes: MAX_PEEK, wait: PEEK_WAIT };

/// What the first bytes showed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// `tcp`, `http` or `https`.
    pub scheme: Scheme,
    /// HTTP method (scheme `http` only).
    pub method: Option<String>,
    /// HTTP path as judged (scheme `http` only): the request target's
    /// path and query with dot segments removed ([`judged_path`]); when
    /// the request line was cut by a bound, the part seen so far.
    pub path: Option<String>,
    /// The ClientHello's SNI host name, lower-case without a final dot
    /// (scheme `https` only, when it names a valid DNS name).
    pub sni: Option<String>,
    /// The request line or ClientHello was not complete when the bound
    /// (bytes, wait, guest EOF) was reached.
    pub partial: bool,
}

impl Seen {
    /// Scheme `tcp`, nothing else known.
    pub fn tcp() -> Self {
        Seen { scheme: Scheme::Tcp, method: None, path: None, sni: None, partial: false }
    }
}

/// Classifies the guest's first bytes `buf`. `last`: no more bytes will
/// be considered (the buffer is full, the wait is over, or the guest
/// half-closed), so answer with what is known.
///
/// Returns `None` while more bytes could change the answer (only when
/// `last` is false). With `last`, a ClientHello not complete is `https`
/// without SNI, a request line not complete is `http` with its method
/// and the path seen so far, and anything else is `tcp`.
pub fn classify(buf: &[u8], last: bool) -> Option<Seen> {
    match buf.first() {
        None => return last.then(Seen::tcp),
        Some(&HANDSHAKE) => {
            return match client_hello_sni(buf) {
                Progress::Done(sni) => {
                    Some(Seen { scheme: Scheme::Https, method: None, path: None, sni, partial: false })
                }
                Progress::NotThis => Some(Seen::tcp()),
                Progress::NeedMore if !last => None,
                // A record header that says TLS, then the bound.
                Progress::NeedMore if buf.len() >= 3 && buf[1] == 3 => {
                    Some(Seen { scheme: Scheme::Https, method: None, path: None, sni: None, partial: true })
                }
                Progress::NeedMore => Some(Seen::tcp()),
            };
        }
        Some(_) => {}
    }
    match request_line(buf) {
        Progress::Done((method, target)) => Some(Seen {
            scheme: Scheme::Http,
            method: Some(method.to_string()),
            path: Some(judged_path(target)),
            sni: None,
            partial: false,
        }),
        Progress::NotThis => Some(Seen::tcp()),
        Progress::NeedMore if !last => None,
        Progress::NeedMore => Some(cut_request_line(buf).unwrap_or_else(Seen::tcp)),
    }
}

/// A request line cut by a bound: a method and a space seen are enough to
/// call it HTTP; the target so far is the path (at the byte bound it is
/// longer than any rule's pathPrefix, so prefix matching is exact).
fn cut_request_line(buf: &[u8]) -> Option<Seen> {
    let sp = buf.iter().position(|&b| b == b' ')?;
    let rest = &buf[sp + 1..];
    let end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
    let method = std::str::from_utf8(&buf[..sp]).ok()?;
    let target = std::str::from_utf8(&rest[..end]).ok()?;
    Some(Seen {
        scheme: Scheme::Http,
        method: Some(method.to_string()),
        path: Some(judged_path(target)),
        sni: None,
        partial: true,
    })
}

/// A parser's answer on a prefix of the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress<T> {
    /// Parsed.
    Done(T),
    /// The bytes so far are a valid beginning; more are needed.
    NeedMore,
    /// The bytes are not this protocol (or a malformed instance of it).
    NotThis,
}

/// TLS record content type `handshake` (RFC 8446 5.1).
const HANDSHAKE: u8 = 22;
/// Handshake type `client_hello` (RFC 8446 4).
const CLIENT_HELLO: u8 = 1;
/// Extension type `server_name` (RFC 6066 3).
const SERVER_NAME: u16 = 0;
/// Largest record fragment (RFC 8446 5.1: 2^14).
const MAX_FRAGMENT: usize = 1 << 14;

/// The SNI host name of the TLS ClientHello at the start of `buf`, which
/// may span several handshake records (RFC 8446 5.1). `Done(None)`: a
/// complete ClientHello without a `server_name` extension, or whose
/// `host_name` is not a valid DNS name. `NotThis`: not TLS records, a
/// handshake message that is not a ClientHello, or a malformed one.
pub fn client_hello_sni(buf: &[u8]) -> Progress<Option<String>> {
    let mut hs: Vec<u8> = Vec::new();
    let mut at = 0usize;
    loop {
        let Some(header) = buf.get(at..at + 5) else { return Progress::NeedMore.or_not(buf, at) };
        if header[0] != HANDSHAKE || header[1] != 3 {
            return Progress::NotThis;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_FRAGMENT {
            return Progress::NotThis;
        }
        let Some(fragment) = buf.get(at + 5..at + 5 + len) else { return Progress::NeedMore };
        hs.extend_from_slice(fragment);
        at += 5 + len;
        if hs.len() >= 4 {
            if hs[0] != CLIENT_HELLO {
                return Progress::NotThis;
            }
            let mlen = (usize::from(hs[1]) << 16) | (usize::from(hs[2]) << 8) | usize::from(hs[3]);
            if let Some(body) = hs.get(4..4 + mlen) {
                return match parse_client_hello(body) {
                    Some(sni) => Progress::Done(sni),
                    None => Progress::NotThis,
                };
            }
        }
    }
}

impl<T> Progress<T> {
    /// `NeedMore` unless the partial record header at `buf[at..]` already
    /// shows it is not a TLS handshake record.
    fn or_not(self, buf: &[u8], at: usize) -> Self {
        let rest = buf.get(at..).unwrap_or(&[]);
        let bad = rest.first().is_some_and(|&b| b != HANDSHAKE) || rest.get(1).is_some_and(|&b| b != 3);
        if bad {
            Progress::NotThis
        } else {
            self
        }
    }
}

/// A checked cursor over a byte slice.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.b.len() {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|s| u16::from_be_bytes([s[0], s[1]]))
    }
    /// A vector with a 1-byte length.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }
    /// A vector with a 2-byte length.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

/// The ClientHello body (after the 4-byte handshake header): `None` when
/// malformed, else the SNI (RFC 8446 4.1.2; RFC 6066 3).
fn parse_client_hello(body: &[u8]) -> Option<Option<String>> {
    let mut r = Reader { b: body };
    let _legacy_version = r.u16()?;
    let _random = r.take(32)?;
    let session_id = r.vec8()?;
    if session_id.len() > 32 {
        return None;
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return None;
    }
    if r.vec8()?.is_empty() {
        return None;
    }
    if r.b.is_empty() {
        // No extensions (TLS 1.2 and before may omit them).
        return Some(None);
    }
    let mut exts = Reader { b: r.vec16()? };
    let mut sni = None;
    while !exts.b.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        if kind != SERVER_NAME {
            continue;
        }
        if sni.is_some() {
            // RFC 8446 4.2: no extension type twice.
            return None;
        }
        let mut list = Reader { b: Reader { b: data }.vec16()? };
        let mut name = None;
        while !list.b.is_empty() {
            let name_type = list.u8()?;
            let n = list.vec16()?;
            if name_type == 0 && name.is_none() {
                name = Some(n);
            }
        }
        sni = Some(name);
    }
    Some(sni.flatten().and_then(|n| {
        let n = std::str::from_utf8(n).ok()?;
        let n = n.strip_suffix('.').unwrap_or(n).to_ascii_lowercase();
        valid_dns_name(&n).then_some(n)
    }))
}

/// Whether `b` is a `tchar` (RFC 9110 5.6.2).
fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The method and request target of the HTTP/1.x request line at the
/// start of `buf`: `METHOD SP target SP HTTP/1.d CRLF` (RFC 9112 3; a
/// bare LF is accepted as the line end, RFC 9112 2.2). The method is 1 to
/// [`MAX_METHOD`] `tchar`s, the target visible ASCII.
pub fn request_line(buf: &[u8]) -> Progress<(&str, &str)> {
    let mut i = 0;
    while i < buf.len() && tchar(buf[i]) {
        i += 1;
        if i > MAX_METHOD {
            return Progress::NotThis;
        }
    }
    match buf.get(i) {
        None => return Progress::NeedMore,
        Some(b' ') if i > 0 => {}
        Some(_) => return Progress::NotThis,
    }
    let method_end = i;
    i += 1;
    let target_start = i;
    while i < buf.len() && (0x21..=0x7e).contains(&buf[i]) {
        i += 1;
    }
    match buf.get(i) {
        None => return Progress::NeedMore,
        Some(b' ') if i > target_start => {}
        Some(_) => return Progress::NotThis,
    }
    let target_end = i;
    i += 1;
    let version = b"HTTP/1.";
    for (k, want) in version.iter().enumerate() {
        match buf.get(i + k) {
            None => return Progress::NeedMore,
            Some(b) if b == want => {}
            Some(_) => return Progress::NotThis,
        }
    }
    i += version.len();
    match buf.get(i) {
        None => return Progress::NeedMore,
        Some(b) if b.is_ascii_digit() => {}
        Some(_) => return Progress::NotThis,
    }
    i += 1;
    match (buf.get(i), buf.get(i + 1)) {
        (None, _) | (Some(b'\r'), None) => return Progress::NeedMore,
        (Some(b'\n'), _) | (Some(b'\r'), Some(b'\n')) => {}
        _ => return Progress::NotThis,
    }
    // Both ranges are ASCII (tchar, visible ASCII).
    match (std::str::from_utf8(&buf[..method_end]), std::str::from_utf8(&buf[target_start..target_end])) {
        (Ok(m), Ok(t)) => Progress::Done((m, t)),
        _ => Progress::NotThis,
    }
}

/// The path a rule's `pathPrefix` is matched against, from a request
/// target (RFC 9112 3.2): origin-form as is; absolute-form
/// (`http://host/p`) its path from the first `/` after the authority
/// (`/` when none); then dot segments (`.`, `..`, also written `%2e`)
/// of the part before `?` removed as RFC 3986 5.2.4 does, so
/// `/ok/../admin` is judged as `/admin`. Asterisk-form and
/// authority-form stay as they are (they never start with `/`).
pub fn judged_path(target: &str) -> String {
    let lower = target.get(..8).map(str::to_ascii_lowercase).unwrap_or_default();
    let target = if lower.starts_with("http://") || lower.starts_with("https://") {
        let rest = &target[target.find("//").map_or(0, |i| i + 2)..];
        match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => &rest[i..],
            Some(i) => return format!("/{}", &rest[i..]),
            None => "/",
        }
    } else {
        target
    };
    if !target.starts_with('/') {
        return target.to_string();
    }
    let (path, query) = match target.find(['?', '#']) {
        Some(i) => target.split_at(i),
        None => (target, ""),
    };
    let dot = |s: &str| s == "." || s.eq_ignore_ascii_case("%2e");
    let dotdot = |s: &str| {
        let s = s.to_ascii_lowercase();
        s == ".." || s == ".%2e" || s == "%2e." || s == "%2e%2e"
    };
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let n = segments.len();
    for (k, s) in segments.into_iter().enumerate() {
        let last = k + 1 == n;
        if dot(s) {
            if last {
                out.push("");
            }
        } else if dotdot(s) {
            out.pop();
            if last {
                out.push("");
            }
        } else {
            out.push(s);
        }
    }
    format!("/{}{query}", out.join("/"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A TLS 1.3-shaped ClientHello record naming `sni` (none: no
    /// `server_name` extension), with one other extension before it.
    pub(crate) fn hello(sni: Option<&str>) -> Vec<u8> {
        let mut exts = Vec::new();
        // supported_versions: TLS 1.3.
        exts.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        if let Some(name) = sni {
            let n = name.len() as u16;
            exts.extend_from_slice(&0u16.to_be_bytes());
            exts.extend_from_slice(&(n + 5).to_be_bytes());
            exts.extend_from_slice(&(n + 3).to_be_bytes());
            exts.push(0);
            exts.extend_from_slice(&n.to_be_bytes());
            exts.extend_from_slice(name.as_bytes());
        }
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0);
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![CLIENT_HELLO];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![HANDSHAKE, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    /// The same handshake message split over records of `size` bytes.
    fn split_records(rec: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for frag in rec[5..].chunks(size) {
            out.extend_from_slice(&[HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(frag.len() as u16).to_be_bytes());
            out.extend_from_slice(frag);
        }
        out
    }

    fn https(sni: Option<&str>) -> Option<Seen> {
        Some(Seen { scheme: Scheme::Https, method: None, path: None, sni: sni.map(str::to_string), partial: false })
    }

    #[test]
    fn sni_of_a_client_hello_whole_split_and_missing() {
        let rec = hello(Some("API.Example.org."));
        assert_eq!(classify(&rec, false), https(Some("api.example.org")));
        assert_eq!(classify(&split_records(&rec, 7), false), https(Some("api.example.org")));
        assert_eq!(classify(&hello(None), false), https(None));
        // Not a DNS name: judged without SNI.
        assert_eq!(classify(&hello(Some("bad name")), false), https(None));
        // More bytes after the hello do not matter.
        let mut more = rec.clone();
        more.extend_from_slice(b"\x14\x03\x03garbage");
        assert_eq!(classify(&more, false), https(Some("api.example.org")));
    }

    #[test]
    fn a_truncated_client_hello_waits_then_is_https_without_sni() {
        let rec = hello(Some("api.test"));
        for cut in 1..rec.len() {
            assert_eq!(classify(&rec[..cut], false), None, "cut at {cut}");
            let last = classify(&rec[..cut], true).unwrap();
            let want = if cut >= 3 { Scheme::Https } else { Scheme::Tcp };
            assert_eq!(last.scheme, want, "cut at {cut}");
            assert_eq!(last.sni, None);
        }
    }

    #[test]
    fn malformed_hellos_are_tcp() {
        let rec = hello(Some("api.test"));
        // Not a ClientHello (ServerHello type), bad record version, zero
        // length, oversized fragment, lengths that overrun the body.
        let mut server_hello = rec.clone();
        server_hello[5] = 2;
        let mut bad_version = rec.clone();
        bad_version[1] = 2;
        let mut zero = rec.clone();
        zero[3..5].copy_from_slice(&[0, 0]);
        let big = [HANDSHAKE, 3, 3, 0x40, 0x01];
        let mut overrun = rec.clone();
        // The session id length points past the message.
        overrun[5 + 4 + 34] = 0xff;
        for (name, b) in [
            ("server hello", &server_hello[..]),
            ("version", &bad_version[..]),
            ("zero", &zero[..]),
            ("big", &big[..]),
            ("overrun", &overrun[..]),
        ] {
            assert_eq!(classify(b, false).map(|s| s.scheme), Some(Scheme::Tcp), "{name}");
        }
        // Two server_name extensions.
        let mut twice = hello(Some("a.test"));
        let ext = hello(Some("a.test"));
        let ext_bytes = &ext[ext.len() - 15..];
        twice.extend_from_slice(ext_bytes);
        let add = ext_bytes.len();
        let bump = |b: &mut Vec<u8>, at: usize, width: usize| {
            let mut v = 0usize;
            for k in 0..width {
                v = (v << 8) | usize::from(b[at + k]);
            }
            v += add;
            for k in 0..width {
                b[at + k] = (v >> (8 * (width - 1 - k))) as u8;
            }
        };
        bump(&mut twice, 3, 2);
        bump(&mut twice, 6, 3);
        let ext_len_at = 5 + 4 + 2 + 32 + 1 + 4 + 2;
        bump(&mut twice, ext_len_at, 2);
        assert_eq!(client_hello_sni(&twice), Progress::NotThis);
    }

    #[test]
    fn http_request_lines() {
        let seen = |b: &[u8], last| classify(b, last);
        let s = seen(b"GET /ok/x?q=1 HTTP/1.1\r\nHost: a\r\n\r\n", false).unwrap();
        assert_eq!(
            (s.scheme, s.method.as_deref(), s.path.as_deref(), s.partial),
            (Scheme::Http, Some("GET"), Some("/ok/x?q=1"), false)
        );
        let s = seen(b"POST http://api.test:8080/v1/../v2/./x HTTP/1.0\n", false).unwrap();
        assert_eq!((s.method.as_deref(), s.path.as_deref()), (Some("POST"), Some("/v2/x")));
        // Not complete yet.
        for p in [&b"GE"[..], b"GET ", b"GET /a", b"GET /a HTTP/1.", b"GET /a HTTP/1.1\r"] {
            assert_eq!(seen(p, false), None, "{:?}", String::from_utf8_lossy(p));
        }
        // Cut by a bound: the method and the path so far.
        let s = seen(b"GET /ok/aaaa", true).unwrap();
        assert_eq!(
            (s.scheme, s.method.as_deref(), s.path.as_deref(), s.partial),
            (Scheme::Http, Some("GET"), Some("/ok/aaaa"), true)
        );
        assert_eq!(seen(b"GET", true).unwrap().scheme, Scheme::Tcp);
        // Not HTTP/1.x.
        for p in [
            &b"SSH-2.0-OpenSSH_9.6\r\n"[..],
            b"GET /a HTTP/2.0\r\n",
            b"GET  /a HTTP/1.1\r\n",
            b"GET /a HTTP/1.1x",
            b"G\x00T /a HTTP/1.1\r\n",
            b" GET /a HTTP/1.1\r\n",
            b"PRI * HTTP/2.0\r\n",
            &[b'A'; 40][..],
        ] {
            assert_eq!(seen(p, false).map(|s| s.scheme), Some(Scheme::Tcp), "{:?}", String::from_utf8_lossy(p));
        }
        assert_eq!(seen(b"", false), None);
        assert_eq!(seen(b"", true).unwrap().scheme, Scheme::Tcp);
    }

    #[test]
    fn judged_paths_drop_dot_segments_and_absolute_form_authorities() {
        for (target, want) in [
            ("/ok/x", "/ok/x"),
            ("/ok/../admin", "/admin"),
            ("/ok/%2E%2e/admin", "/admin"),
            ("/ok/./x/.", "/ok/x/"),
            ("/../../etc", "/etc"),
            ("/a/..", "/"),
            ("/a?x=/../b", "/a?x=/../b"),
            ("HTTP://h.test", "/"),
            ("http://h.test?q", "/?q"),
            ("https://h.test/ok/../no", "/no"),
            ("*", "*"),
            ("h.test:443", "h.test:443"),
        ] {
            assert_eq!(judged_path(target), want, "{target}");
        }
    }

    /// xorshift64 bytes.
    fn random(len: usize, seed: &mut u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                (*seed >> 24) as u8
            })
            .collect()
    }

    /// Random bytes, random bytes behind a TLS record header or an HTTP
    /// method, and mutated hellos: every answer is well-formed and no
    /// input panics.
    #[test]
    fn random_and_mutated_inputs_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let base = hello(Some("fuzz.test"));
        for i in 0..20_000u32 {
            let len = (random(2, &mut seed)[0] as usize * 67) % (MAX_PEEK + 1);
            let mut b = random(len, &mut seed);
            match i % 4 {
                1 if b.len() >= 3 => b[..3].copy_from_slice(&[HANDSHAKE, 3, 3]),
                2 if b.len() >= 4 => b[..4].copy_from_slice(b"GET "),
                3 => {
                    b = base.clone();
                    let flips = random(4, &mut seed);
                    for f in flips.chunks(2) {
                        let at = (usize::from(f[0]) * 7 + i as usize) % b.len();
                        b[at] ^= f[1] | 1;
                    }
                    b.truncate(1 + i as usize % b.len());
                }
                _ => {}
            }
            for last in [false, true] {
                if let Some(s) = classify(&b, last) {
                    assert!(s.sni.as_deref().is_none_or(valid_dns_name));
                    assert!(s.path.as_ref().is_none_or(|p| p.len() <= b.len() + 1));
                    assert_eq!(s.method.is_some(), s.scheme == Scheme::Http);
                } else {
                    assert!(!last, "a last call always answers");
                }
            }
        }
    }
}
