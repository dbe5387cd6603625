//! TLS interception (issue 9): HTTPS from a guest is terminated here with a
//! leaf the install's CA signs (`crate::ca`), each HTTP request is judged,
//! logged and forwarded on a TLS connection the proxy makes and verifies
//! itself, and secrets (`Secrets` cap) are put into request headers for the
//! hosts they are for.
//!
//! Which connections: the relay ([`crate::relay`]) peeks every connection
//! it may intercept ([`crate::ProxyState::may_intercept`]: the proxy has a
//! CA, no `noMitm` rule is first for the host and port, and the policy does
//! not deny it outright); a TLS ClientHello hands the guest's byte stream
//! to [`serve`] through an in-memory duplex pipe, so flow control and
//! resets work as for relayed flows.
//!
//! Per connection ([`serve`]):
//! 1. TLS handshake with the guest presenting a leaf for the SNI (or the
//!    host when there is none), ALPN `h2` / `http/1.1` as the guest
//!    prefers. A failed handshake (most often: the guest does not trust
//!    the CA) is one NetLog entry.
//! 2. HTTP/2 or HTTP/1.1 by ALPN; without ALPN the first decrypted bytes
//!    decide (the HTTP/2 preface, an HTTP/1.x request line, else not HTTP).
//!    TLS that carries no HTTP is judged as scheme `https` by SNI and port
//!    alone and relayed over a verified upstream TLS connection.
//! 3. Each request (`handle`): judged on (host, port, `https`, method,
//!    path as [`crate::peek::judged_path`] gives it); denied: `403` with a
//!    one-line reason, `ask`: held for an approver (a connection approved
//!    as a whole is not asked again); secrets replaced; then sent upstream.
//!    One NetLog entry per request: method, path, status, bytes both ways
//!    (bodies counted as they stream), the deciding rule.
//! 4. Upstream: resolved and checked like relayed flows
//!    (`crate::relay::connect_upstream`), TLS verified against the
//!    system roots and the manifest's (`crate::ca::Upstream`) for the same
//!    server name the guest asked for, ALPN `h2`+`http/1.1` for an HTTP/2
//!    guest and `http/1.1` for an HTTP/1.1 one; hyper translates between
//!    versions. Up to [`MAX_UPSTREAM`] upstream connections per guest
//!    connection (HTTP/1.1 upstreams carry one request at a time).
//!    Unreachable or unverifiable: `502` with the reason.
//! 5. Bodies stream frame by frame both ways (server-sent events, long
//!    downloads, uploads: nothing is buffered whole); an HTTP/1.1
//!    `Upgrade` (WebSocket, RFC 6455 4) answered `101` joins the two
//!    upgraded streams byte for byte.
//!
//! Secrets: a header value holding `capvisor-secret:NAME` asks the
//! session's `SecretSource` (set by the worker) for NAME with the request's
//! host; the broker answers with the value only when the host matches one
//! of the secret's host globs. Matched: every occurrence is replaced and
//! the header marked sensitive (HPACK never-indexed, RFC 7541 7.1.3).
//! Otherwise the placeholder goes out as it is and the NetLog entry says
//! so. Values are never logged, never in an error, never in the NetLog.

use crate::ca::{ALPN_H2, ALPN_HTTP11};
use crate::log::{bounded, Flow};
use crate::policy::{Action, Request, Scheme};
use crate::relay::{connect_upstream, entry, judge, Judged};
use crate::ProxyState;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, DuplexStream, ReadBuf};

/// Bytes the in-memory pipe between the relay and the interception holds
/// each way.
pub const DUPLEX_BYTES: usize = 256 * 1024;
/// Upstream connections one guest connection may open at once.
pub const MAX_UPSTREAM: usize = 8;
/// How long the guest's TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest secret name (schema `SecretInfo.name`).
pub use capvisor_rpc::secrets::MAX_NAME as MAX_SECRET_NAME;
/// The placeholder prefix a guest sends for a secret (`Secrets` cap).
pub use capvisor_rpc::secrets::PLACEHOLDER_PREFIX as SECRET_PREFIX;

/// What an intercepting proxy holds: the CA and the upstream roots.
pub struct Mitm {
    /// Signs the leaves guests see.
    pub ca: crate::ca::Authority,
    /// Verifies upstream servers.
    pub upstream: crate::ca::Upstream,
}

/// Spawns `!Send` futures on the current `LocalSet` (hyper's HTTP/2 runs
/// its streams through an executor; the proxy is single-threaded).
#[derive(Clone, Copy)]
struct LocalExec;

impl<F: std::future::Future + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// One upstream HTTP connection's request side.
#[derive(Clone)]
enum Sender {
    /// HTTP/1.1: one request at a time (`is_ready` once the previous
    /// response is done).
    H1(Rc<RefCell<hyper::client::conn::http1::SendRequest<Counted>>>),
    /// HTTP/2: many streams at once.
    H2(hyper::client::conn::http2::SendRequest<Counted>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.borrow().is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    fn is_ready(&self) -> bool {
        match self {
            Sender::H1(s) => s.borrow().is_ready(),
            Sender::H2(s) => s.is_ready(),
        }
    }

    fn is_h2(&self) -> bool {
        matches!(self, Sender::H2(_))
    }

    async fn send(&self, req: http::Request<Counted>) -> hyper::Result<Response<Incoming>> {
        match self {
            Sender::H1(s) => {
                let fut = s.borrow_mut().send_request(req);
                fut.await
            }
            Sender::H2(s) => {
                let mut s = s.clone();
                s.send_request(req).await
            }
        }
    }
}

/// One upstream connection of an intercepted guest connection.
struct Upstream {
    sender: Sender,
    ip: IpAddr,
    driver: tokio::task::AbortHandle,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// One intercepted guest connection.
pub struct Intercept {
    state: Rc<ProxyState>,
    /// vm, host, port and the peek's notes; one NetLog entry per request
    /// is made from it.
    base: Flow,
    /// The leaf's name and the upstream server name (SNI, else the host).
    server_name: String,
    /// The rule the connection was judged under as a whole, if it was
    /// (an `ask` approved then is not asked again per request).
    approved: Option<i32>,
    /// The guest speaks HTTP/2.
    guest_h2: Cell<bool>,
    pool: RefCell<Vec<Upstream>>,
    /// Serializes choosing and opening upstream connections.
    opening: tokio::sync::Mutex<()>,
}

impl Intercept {
    /// A guest connection to `base.host`:`base.port` whose ClientHello
    /// named `server_name`; `approved`: the rule it was judged under at the
    /// peek (None: judged per request only).
    pub fn new(state: Rc<ProxyState>, base: Flow, server_name: String, approved: Option<i32>) -> Rc<Self> {
        Rc::new(Self {
            state,
            base,
            server_name,
            approved,
            guest_h2: Cell::new(false),
            pool: RefCell::new(Vec::new()),
            opening: tokio::sync::Mutex::new(()),
        })
    }

    fn mitm(&self) -> &Mitm {
        self.state.mitm.as_ref().expect("interception without a CA")
    }

    fn what(&self, method: &str, path: &str) -> String {
        format!("{}:{} (https {method} {})", self.base.host, self.base.port, bounded(path))
    }

    /// A ready sender for a request `judged` allowed: a pooled connection
    /// whose address this decision may reach and that can take a request
    /// now, else a new one (at most [`MAX_UPSTREAM`]; at the bound, waits
    /// for one to be free). Errors: the NetLog entry is written
    /// (`connect_upstream`) and the reason returned for a `502`.
    async fn sender(&self, base: &Flow, judged: &Judged, what: &str) -> Result<(Sender, IpAddr), String> {
        let _one = self.opening.lock().await;
        loop {
            {
                let mut pool = self.pool.borrow_mut();
                pool.retain(|u| !u.sender.is_closed());
                let usable = |u: &Upstream| judged.explicit || crate::resolve::non_public(u.ip).is_none();
                if let Some(u) = pool.iter().find(|u| usable(u) && u.sender.is_ready()) {
                    return Ok((u.sender.clone(), u.ip));
                }
                if pool.len() < MAX_UPSTREAM {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (tcp, ip) = connect_upstream(&self.state, base, &self.base.host, self.base.port, judged, what)
            .await
            .map_err(|e| e.message)?;
        let fail = |detail: String| {
            self.state.record(entry(base, ip.to_string(), judged.rule, Action::Allow, detail.clone()));
            detail
        };
        let name = rustls::pki_types::ServerName::try_from(self.server_name.clone())
            .map_err(|_| fail(format!("{:?} is not a TLS server name", self.server_name)))?;
        let cfg = if self.guest_h2.get() { &self.mitm().upstream.h2 } else { &self.mitm().upstream.http11 };
        let tls =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_rustls::TlsConnector::from(cfg.clone()).connect(name, tcp))
                .await
                .map_err(|_| fail(format!("upstream TLS handshake took over {} s", HANDSHAKE_TIMEOUT.as_secs())))?
                .map_err(|e| fail(format!("upstream TLS: {e}")))?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(ALPN_H2);
        let io = TokioIo::new(tls);
        let (sender, driver) = if h2 {
            let (s, conn) = hyper::client::conn::http2::Builder::new(LocalExec)
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|e| fail(format!("upstream HTTP/2: {e}")))?;
            (Sender::H2(s), tokio::task::spawn_local(async move { drop(conn.await) }).abort_handle())
        } else {
            let (s, conn) =
                hyper::client::conn::http1::handshake(io).await.map_err(|e| fail(format!("upstream HTTP/1.1: {e}")))?;
            (
                Sender::H1(Rc::new(RefCell::new(s))),
                tokio::task::spawn_local(async move { drop(conn.with_upgrades().await) }).abort_handle(),
            )
        };
        self.pool.borrow_mut().push(Upstream { sender: sender.clone(), ip, driver });
        Ok((sender, ip))
    }
}

/// Byte counts of one request's NetLog entry, written to it when both
/// bodies are done (the entry is made when the response head arrives:
/// `seq` is set then).
struct Tally {
    state: Rc<ProxyState>,
    seq: Cell<Option<u64>>,
    up: Cell<u64>,
    down: Cell<u64>,
}

impl Tally {
    fn new(state: &Rc<ProxyState>) -> Rc<Self> {
        Rc::new(Self { state: state.clone(), seq: Cell::new(None), up: Cell::new(0), down: Cell::new(0) })
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        if let Some(seq) = self.seq.get() {
            let (up, down) = (self.up.get(), self.down.get());
            self.state.log.borrow_mut().update(seq, |f| {
                f.bytes_up = up;
                f.bytes_down = down;
            });
        }
    }
}

/// A body passed through frame by frame, its data bytes counted into a
/// `Tally` (`up`: guest -> upstream).
pub struct Counted {
    inner: Option<Incoming>,
    tally: Rc<Tally>,
    up: bool,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        let r = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                let c = if self.up { &self.tally.up } else { &self.tally.down };
                c.set(c.get() + d.len() as u64);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map(Body::size_hint).unwrap_or_else(|| SizeHint::with_exact(0))
    }
}

/// What the guest gets back: the upstream's body, or one the proxy made.
pub enum Out {
    /// Streamed from upstream.
    Stream(Counted),
    /// A whole body the proxy wrote (a refusal, an error).
    Full(Option<Bytes>),
}

impl Body for Out {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Out::Stream(c) => Pin::new(c).poll_frame(cx),
            Out::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Out::Stream(c) => c.is_end_stream(),
            Out::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Out::Stream(c) => c.size_hint(),
            Out::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// A response the proxy writes itself: `status`, a text/plain body
/// `capvisor: <reason>\n`.
fn refusal(status: StatusCode, reason: &str) -> Response<Out> {
    let body = format!("capvisor: {reason}\n");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CONTENT_LENGTH, body.len())
        .header("x-capvisor-egress", "refused")
        .body(Out::Full(Some(Bytes::from(body))))
        .expect("a fixed response")
}

/// A stream with bytes already read put back in front.
struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What the first decrypted bytes of a connection without ALPN are.
#[derive(Debug, PartialEq, Eq)]
enum Inner {
    H2,
    Http1,
    Other,
}

/// The HTTP/2 connection preface (RFC 9113 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn sniff(buf: &[u8], last: bool) -> Option<Inner> {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return match (n == H2_PREFACE.len(), last) {
            (true, _) => Some(Inner::H2),
            (false, true) => Some(Inner::Other),
            (false, false) => None,
        };
    }
    match crate::peek::request_line(buf) {
        crate::peek::Progress::Done(_) => Some(Inner::Http1),
        crate::peek::Progress::NeedMore if !last => None,
        _ => Some(Inner::Other),
    }
}

/// Serves one intercepted guest connection (module docs, steps 1-5);
/// returns when it ends.
pub async fn serve(ix: Rc<Intercept>, io: DuplexStream) {
    let mitm = ix.mitm();
    let fail = |detail: String| {
        ix.state.record(entry(&ix.base, String::new(), ix.approved.unwrap_or(-1), Action::Allow, detail));
    };
    let cfg = match mitm.ca.server_config(&ix.server_name) {
        Ok(c) => c,
        Err(e) => return fail(format!("interception: no certificate for {:?}: {e:#}", ix.server_name)),
    };
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_rustls::TlsAcceptor::from(cfg).accept(io)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            return fail(format!("TLS handshake with the guest failed (does it trust the capvisor CA?): {e}"));
        }
        Err(_) => return fail(format!("TLS handshake with the guest took over {} s", HANDSHAKE_TIMEOUT.as_secs())),
    };
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let (kind, io) = match alpn.as_deref() {
        Some(ALPN_H2) => (Inner::H2, Prefixed { prefix: Bytes::new(), inner: tls }),
        Some(ALPN_HTTP11) => (Inner::Http1, Prefixed { prefix: Bytes::new(), inner: tls }),
        _ => {
            let mut tls = tls;
            let mut buf = Vec::new();
            let deadline = tokio::time::Instant::now() + ix.state.peek.wait;
            let kind = loop {
                if let Some(k) = sniff(&buf, buf.len() >= ix.state.peek.bytes) {
                    break k;
                }
                let mut chunk = [0u8; 4096];
                match tokio::time::timeout_at(deadline, tls.read(&mut chunk)).await {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break sniff(&buf, true).unwrap_or(Inner::Other),
                    Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            (kind, Prefixed { prefix: Bytes::from(buf), inner: tls })
        }
    };
    match kind {
        Inner::H2 => {
            ix.guest_h2.set(true);
            let ix2 = ix.clone();
            let svc = hyper::service::service_fn(move |req| {
                let ix = ix2.clone();
                async move { Ok::<_, Infallible>(handle(ix, req).await) }
            });
            let r = hyper::server::conn::http2::Builder::new(LocalExec)
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(io), svc)
                .await;
            if let Err(e) = r {
                tracing::debug!(vm = %ix.base.vm, "intercepted HTTP/2 connection ended: {e}");
            }
        }
        Inner::Http1 => {
            let ix2 = ix.clone();
            let svc = hyper::service::service_fn(move |req| {
                let ix = ix2.clone();
                async move { Ok::<_, Infallible>(handle(ix, req).await) }
            });
            let r = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades()
                .await;
            if let Err(e) = r {
                tracing::debug!(vm = %ix.base.vm, "intercepted HTTP/1.1 connection ended: {e}");
            }
        }
        Inner::Other => relay_tls(ix, io).await,
    }
}

/// TLS that carries no HTTP: judged as `https` by SNI and port, relayed to
/// a verified upstream TLS connection; one NetLog entry with both byte
/// counts.
async fn relay_tls<S: AsyncRead + AsyncWrite + Unpin>(ix: Rc<Intercept>, mut guest: S) {
    let base = &ix.base;
    let what = format!("{}:{} (https, not HTTP)", base.host, base.port);
    let req = Request { host: &base.host, port: base.port, scheme: Scheme::Https, method: None, path: None };
    let Ok(judged) = judge(&ix.state, base, &req, &what, ix.approved).await else { return };
    let Ok((tcp, ip)) = connect_upstream(&ix.state, base, &base.host, base.port, &judged, &what).await else {
        return;
    };
    let Ok(name) = rustls::pki_types::ServerName::try_from(ix.server_name.clone()) else { return };
    let mut up = match tokio_rustls::TlsConnector::from(ix.mitm().upstream.plain.clone()).connect(name, tcp).await {
        Ok(t) => t,
        Err(e) => {
            ix.state.record(entry(base, ip.to_string(), judged.rule, Action::Allow, format!("upstream TLS: {e}")));
            return;
        }
    };
    let action = if judged.approval.is_empty() { Action::Allow } else { Action::Ask };
    let detail = if judged.approval.is_empty() { "TLS without HTTP".to_string() } else { judged.approval.clone() };
    let seq = ix.state.record(entry(base, ip.to_string(), judged.rule, action, detail));
    let (up_n, down_n) = tokio::io::copy_bidirectional(&mut guest, &mut up).await.unwrap_or((0, 0));
    ix.state.log.borrow_mut().update(seq, |f| {
        f.bytes_up = up_n;
        f.bytes_down = down_n;
    });
}

/// Hop-by-hop fields (RFC 9110 7.6.1) and ones HTTP/2 forbids (RFC 9113
/// 8.2.2); `upgrade` and `connection` are kept for an HTTP/1.1 upgrade.
const HOP: &[&str] = &["connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade", "trailer"];

fn strip_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        if !(keep_upgrade && n == header::UPGRADE) {
            headers.remove(n);
        }
    }
    for h in HOP {
        if keep_upgrade && (*h == "upgrade" || *h == "connection") {
            continue;
        }
        if *h == "te" {
            // `te: trailers` is the one TE value HTTP/2 allows.
            if headers.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers")) {
                continue;
            }
        }
        headers.remove(*h);
    }
}

/// Secret names in `headers`: every `capvisor-secret:NAME` occurrence
/// (NAME: `[A-Za-z0-9_-]`, at most [`MAX_SECRET_NAME`]), each once.
pub fn placeholders(headers: &HeaderMap) -> Vec<String> {
    let mut names = Vec::new();
    for v in headers.values() {
        let b = v.as_bytes();
        let mut i = 0;
        while let Some(at) = find(&b[i..], SECRET_PREFIX.as_bytes()) {
            let start = i + at + SECRET_PREFIX.len();
            let len = b[start..].iter().take_while(|c| c.is_ascii_alphanumeric() || **c == b'_' || **c == b'-').count();
            if (1..=MAX_SECRET_NAME).contains(&len) {
                let name = String::from_utf8_lossy(&b[start..start + len]).into_owned();
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            i = start + len;
        }
    }
    names
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Replaces `capvisor-secret:NAME` (not followed by another name byte) by
/// `value` in every header value; the changed ones are marked sensitive.
/// Returns false when a result is not a valid header value (then nothing
/// is changed for that header).
pub fn replace_placeholder(headers: &mut HeaderMap, name: &str, value: &[u8]) -> bool {
    let token = format!("{SECRET_PREFIX}{name}");
    let mut ok = true;
    for v in headers.values_mut() {
        let b = v.as_bytes();
        if find(b, token.as_bytes()).is_none() {
            continue;
        }
        let mut out = Vec::with_capacity(b.len() + value.len());
        let mut i = 0;
        while let Some(at) = find(&b[i..], token.as_bytes()) {
            let end = i + at + token.len();
            let more = b.get(end).is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'-');
            out.extend_from_slice(&b[i..i + at]);
            out.extend_from_slice(if more { token.as_bytes() } else { value });
            i = end;
        }
        out.extend_from_slice(&b[i..]);
        match HeaderValue::from_bytes(&out) {
            Ok(mut nv) => {
                nv.set_sensitive(true);
                *v = nv;
            }
            Err(_) => ok = false,
        }
    }
    ok
}

/// Puts the session's secrets into `headers` for `host` (module docs,
/// "Secrets"); returns the notes for the NetLog (names only).
async fn insert_secrets(state: &ProxyState, headers: &mut HeaderMap, host: &str) -> Vec<String> {
    let names = placeholders(headers);
    let mut notes = Vec::new();
    if names.is_empty() {
        return notes;
    }
    let source = state.secrets.borrow().clone();
    for name in names {
        let Some(source) = &source else {
            notes.push(format!("secret {name}: not replaced (this proxy has no secret source)"));
            continue;
        };
        let mut req = source.reveal_request();
        req.get().set_name(name.as_str());
        req.get().set_host(host);
        let resp = match req.send().promise.await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(secret = %name, "secret source: {e}");
                notes.push(format!("secret {name}: not replaced (the secret source failed)"));
                continue;
            }
        };
        let Ok(r) = resp.get() else {
            notes.push(format!("secret {name}: not replaced (bad answer)"));
            continue;
        };
        if !r.get_found() {
            notes.push(format!("secret {name}: no such secret; placeholder sent as is"));
        } else if !r.get_matched() {
            notes.push(format!("secret {name}: placeholder sent to a host it is not for; not replaced"));
        } else {
            let value = r.get_value().unwrap_or_default();
            if replace_placeholder(headers, &name, value) {
                notes.push(format!("secret {name} inserted"));
            } else {
                notes.push(format!("secret {name}: its value cannot be a header value; not replaced"));
            }
        }
    }
    notes
}

/// One intercepted request (module docs, step 3).
async fn handle(ix: Rc<Intercept>, mut req: http::Request<Incoming>) -> Response<Out> {
    let method = req.method().as_str().to_string();
    let target = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    let path = crate::peek::judged_path(&target);
    let what = ix.what(&method, &path);
    let mut base =
        Flow { time_ms: capvisor_rpc::now_ms(), method: bounded(&method), path: bounded(&path), ..ix.base.clone() };
    let r = Request {
        host: &ix.base.host,
        port: ix.base.port,
        scheme: Scheme::Https,
        method: Some(&method),
        path: Some(&path),
    };
    let judged = match judge(&ix.state, &base, &r, &what, ix.approved).await {
        Ok(j) => j,
        Err(e) => return refusal(StatusCode::FORBIDDEN, &e.message),
    };
    let mut notes = insert_secrets(&ix.state, req.headers_mut(), &ix.base.host).await;
    if !judged.approval.is_empty() {
        notes.insert(0, judged.approval.clone());
    }
    if !base.detail.is_empty() {
        notes.push(std::mem::take(&mut base.detail));
    }
    let detail = notes.join("; ");
    let (sender, ip) = match ix.sender(&Flow { detail: detail.clone(), ..base.clone() }, &judged, &what).await {
        Ok(s) => s,
        Err(reason) => return refusal(StatusCode::BAD_GATEWAY, &reason),
    };
    let upgrade = !ix.guest_h2.get() && req.headers().contains_key(header::UPGRADE);
    let on_guest_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let tally = Tally::new(&ix.state);
    let (mut parts, body) = req.into_parts();
    let authority = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
        .unwrap_or_else(|| match ix.base.port {
            443 => ix.server_name.clone(),
            p => format!("{}:{p}", ix.server_name),
        });
    strip_hop(&mut parts.headers, upgrade && !sender.is_h2());
    if sender.is_h2() {
        parts.headers.remove(header::HOST);
        parts.uri = Uri::builder()
            .scheme("https")
            .authority(authority.as_str())
            .path_and_query(target.as_str())
            .build()
            .unwrap_or_else(|_| parts.uri.clone());
        parts.version = http::Version::HTTP_2;
    } else {
        if let Ok(h) = HeaderValue::from_str(&authority) {
            parts.headers.insert(header::HOST, h);
        }
        parts.uri = target.parse().unwrap_or_else(|_| Uri::from_static("/"));
        parts.version = http::Version::HTTP_11;
    }
    let body = Counted { inner: Some(body), tally: tally.clone(), up: true };
    let resp = match sender.send(http::Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => {
            let reason = format!("upstream {}: {e}", ix.server_name);
            ix.state.record(entry(&base, ip.to_string(), judged.rule, Action::Allow, join(&detail, &reason)));
            return refusal(StatusCode::BAD_GATEWAY, &reason);
        }
    };
    let action = if judged.approval.is_empty() { Action::Allow } else { Action::Ask };
    let status = resp.status();
    let seq =
        ix.state.record(Flow { status: status.as_u16(), ..entry(&base, ip.to_string(), judged.rule, action, detail) });
    tally.seq.set(Some(seq));
    let (mut parts, body) = resp.into_parts();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(on_guest) = on_guest_upgrade {
            let mut resp = Response::from_parts(parts, Out::Full(None));
            let on_up = hyper::upgrade::on(&mut resp);
            let tally = tally.clone();
            tokio::task::spawn_local(async move {
                let (Ok(g), Ok(u)) = (on_guest.await, on_up.await) else { return };
                let (mut g, mut u) = (TokioIo::new(g), TokioIo::new(u));
                if let Ok((a, b)) = tokio::io::copy_bidirectional(&mut g, &mut u).await {
                    tally.up.set(tally.up.get() + a);
                    tally.down.set(tally.down.get() + b);
                }
            });
            // `resp` keeps the upstream's 101 head; hyper answers the
            // guest with it and hands both connections over.
            drop(body);
            return resp;
        }
    }
    strip_hop(&mut parts.headers, false);
    if ix.guest_h2.get() {
        parts.version = http::Version::HTTP_2;
    } else {
        parts.version = http::Version::HTTP_11;
    }
    Response::from_parts(parts, Out::Stream(Counted { inner: Some(body), tally, up: false }))
}

fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{b}; {a}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_found_once_each_and_bounded() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer capvisor-secret:api"));
        h.insert("x-two", HeaderValue::from_static("capvisor-secret:api,capvisor-secret:db_2;capvisor-secret:"));
        let long = format!("capvisor-secret:{}", "a".repeat(MAX_SECRET_NAME + 1));
        h.insert("x-long", HeaderValue::from_str(&long).unwrap());
        assert_eq!(placeholders(&h), vec!["api".to_string(), "db_2".to_string()]);
    }

    #[test]
    fn a_placeholder_is_replaced_exactly_and_marked_sensitive() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer capvisor-secret:api"));
        h.insert("x-other", HeaderValue::from_static("capvisor-secret:api2 capvisor-secret:api."));
        assert!(replace_placeholder(&mut h, "api", b"s3cr3t"));
        assert_eq!(h["authorization"], "Bearer s3cr3t");
        assert!(h["authorization"].is_sensitive());
        // `api2` is another name; `api.` ends at the dot.
        assert_eq!(h["x-other"], "capvisor-secret:api2 s3cr3t.");
        // A value a header cannot carry leaves the header as it was.
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("capvisor-secret:api"));
        assert!(!replace_placeholder(&mut h, "api", b"bad\nvalue"));
        assert_eq!(h["authorization"], "capvisor-secret:api");
    }

    #[test]
    fn hop_by_hop_fields_go_and_upgrades_can_stay() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        let mut a = h.clone();
        strip_hop(&mut a, false);
        let names: Vec<&str> = a.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["te", "accept"]);
        let mut b = h.clone();
        b.insert("connection", HeaderValue::from_static("upgrade"));
        strip_hop(&mut b, true);
        assert!(b.contains_key("upgrade") && b.contains_key("connection"));
    }

    #[test]
    fn the_first_decrypted_bytes_tell_http_from_other_tls() {
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", false), Some(Inner::H2));
        assert_eq!(sniff(b"PRI * HT", false), None);
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n", false), Some(Inner::Http1));
        assert_eq!(sniff(b"\x00\x01binary", false), Some(Inner::Other));
        assert_eq!(sniff(b"GE", true), Some(Inner::Other));
    }
}
