//! The `Egress` server one VM gets (schema guest.capnp `Egress`): DNS
//! answers from the policy, and relayed TCP connections.
//!
//! `connect(host, port, down)`:
//! 1. a slot: at most [`crate::Limits::per_vm`] connections of this VM and
//!    [`crate::Limits::total`] of the proxy are open or opening, else
//!    `quota`;
//! 2. the request is judged by the policy. When the first rule whose host
//!    and port match does not look at content
//!    ([`crate::policy::Policy::needs_peek`] false), `(host, port)` is
//!    judged at once as a bare TCP connection
//!    ([`crate::policy::Request::connection`]): deny fails the call with
//!    `denied`, ask waits for an approver (`crate::approvals`). Otherwise `connect`
//!    returns `up` at once and the decision waits for the guest's first
//!    bytes (see "Peeking" below);
//! 3. the proxy resolves `host` itself ([`crate::resolve::Resolver`]) and
//!    keeps the addresses the decision may reach
//!    ([`crate::resolve::allowed_addresses`]); none: `denied`;
//! 4. it connects to those addresses in order, all within
//!    [`CONNECT_TIMEOUT`]; none answers: `unavailable`;
//! 5. `up` is a `ByteSink` whose writes go upstream (`done` shuts the
//!    upstream write side: a half-close); upstream bytes are pumped into
//!    `down` in chunks of at most [`capvisor_rpc::CHUNK`], each write
//!    awaited (the guest's flow control reaches the upstream socket);
//!    upstream EOF becomes `down.done()`.
//!
//! Peeking: the guest's writes to `up` are held (each returns once its
//! bytes are buffered) until [`crate::peek::classify`] can tell what they
//! are, [`crate::peek::PeekLimits::bytes`] are held (a write past that
//! waits), the guest half-closes, or [`crate::peek::PeekLimits::wait`]
//! passes; then the request (scheme, method, path) is judged and steps 3-4
//! run (`done` while peeking ends the wait and answers with the
//! decision). Denied or failed: the next write to `up` and `done` fail
//! with that typed error (`ByteSink.write` is a streaming call: its
//! caller sees a failure on its following call) and `down` is released
//! without `done`, so guest-init resets the guest's socket; upstream
//! never sees a byte. Allowed: the
//! held bytes go upstream first, then the flow is relayed as above. A
//! guest that resets (releases `up`) before the decision leaves no NetLog
//! entry: nothing was decided.
//!
//! Resets: the guest releasing `up` without `done` aborts the flow (the
//! upstream socket is closed); an upstream read error, or `down` failing,
//! ends the pump without `done`, so guest-init sees `down` released
//! without `done` and resets its connection. When the VM's Egress
//! connection ends, every flow of that VM is closed.
//!
//! Every decision becomes one NetLog entry (`crate::log`; peeked ones with
//! the HTTP method and path, or the TLS SNI in `detail`) and one debug
//! `tracing` line; a connected flow's byte counts are written to its entry
//! when the flow ends.

use crate::log::Flow;
use crate::peek::Seen;
use crate::policy::{Action, Request};
use crate::ProxyState;
use capnp::capability::Rc as CapRc;
use capvisor_rpc::{CvError, CvResult, CHUNK};
use capvisor_schema::common_capnp::byte_sink;
use capvisor_schema::guest_capnp::egress;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// How long connecting upstream may take, over all addresses tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One VM as the proxy knows it: its name and open flows.
pub struct VmFlows {
    name: String,
    open: Cell<usize>,
    next_id: Cell<u64>,
    pumps: RefCell<HashMap<u64, tokio::task::AbortHandle>>,
}

impl VmFlows {
    /// A VM named `name` with no flows.
    pub fn new(name: &str) -> Rc<Self> {
        Rc::new(Self {
            name: name.to_string(),
            open: Cell::new(0),
            next_id: Cell::new(0),
            pumps: RefCell::new(HashMap::new()),
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connections of this VM open or being opened.
    pub fn open(&self) -> usize {
        self.open.get()
    }

    /// Closes every flow of this VM (its Egress connection ended).
    pub fn close_all(&self) {
        let pumps = std::mem::take(&mut *self.pumps.borrow_mut());
        for (_, p) in pumps {
            p.abort();
        }
    }
}

/// A reserved connection slot of one VM; released on drop.
pub(crate) struct Slot {
    state: Rc<ProxyState>,
    vm: Rc<VmFlows>,
}

impl Slot {
    fn take(state: &Rc<ProxyState>, vm: &Rc<VmFlows>) -> CvResult<Slot> {
        if vm.open.get() >= state.limits.per_vm {
            return Err(CvError::quota(format!(
                "VM {} has {} egress connections open (at most {})",
                vm.name,
                vm.open.get(),
                state.limits.per_vm
            )));
        }
        if state.open.get() >= state.limits.total {
            return Err(CvError::quota(format!(
                "this session has {} egress connections open (at most {})",
                state.open.get(),
                state.limits.total
            )));
        }
        vm.open.set(vm.open.get() + 1);
        state.open.set(state.open.get() + 1);
        Ok(Slot { state: state.clone(), vm: vm.clone() })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.vm.open.set(self.vm.open.get() - 1);
        self.state.open.set(self.state.open.get() - 1);
    }
}

/// A connected flow; when the last holder (pump, `up` sink) drops it, its
/// byte counts go to its NetLog entry and its slot is released.
pub(crate) struct Conn {
    slot: Slot,
    id: u64,
    /// Its NetLog entry; None for an intercepted flow (`crate::mitm` logs
    /// each request instead).
    seq: Option<u64>,
    up: Cell<u64>,
    down: Cell<u64>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        let (up, down) = (self.up.get(), self.down.get());
        if let Some(seq) = self.seq {
            self.slot.state.log.borrow_mut().update(seq, |f| {
                f.bytes_up = up;
                f.bytes_down = down;
            });
        }
        self.slot.vm.pumps.borrow_mut().remove(&self.id);
        tracing::debug!(vm = %self.slot.vm.name, flow = self.id, bytes_up = up, bytes_down = down, "egress flow ended");
    }
}

/// `Egress` for one VM.
pub struct EgressServer {
    state: Rc<ProxyState>,
    vm: Rc<VmFlows>,
}

impl EgressServer {
    /// An `Egress` client bound to `vm`.
    pub fn client(state: Rc<ProxyState>, vm: Rc<VmFlows>) -> egress::Client {
        capnp_rpc::new_client(Self { state, vm })
    }

    /// Steps 1-5 of the module docs; returns the `up` sink.
    async fn open(&self, host: &str, port: u16, down: byte_sink::Client) -> CvResult<byte_sink::Client> {
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        let base = Flow::asked(&self.vm.name, &host, port);
        let slot = match Slot::take(&self.state, &self.vm) {
            Ok(s) => s,
            Err(e) => {
                self.state.record(Flow { detail: e.message.clone(), ..base });
                return Err(e);
            }
        };
        if port == 0 {
            let detail = "port 0".to_string();
            self.state.record(Flow { detail: detail.clone(), ..base });
            return Err(CvError::denied(format!("egress to {host}:0 denied: {detail}")));
        }
        let id = self.vm.next_id.get();
        self.vm.next_id.set(id + 1);
        let content = self.state.policy.borrow().needs_peek(&host, port);
        if content || self.state.may_intercept(&host, port) {
            let wait = self.state.peek.wait;
            let up = Rc::new(Up::new(Phase::Peeking { buf: Vec::new(), eof: false }, self.state.peek.bytes));
            let forget = Forget { vm: self.vm.clone(), id, armed: true };
            let task = tokio::task::spawn_local(peek_then_connect(
                self.state.clone(),
                up.clone(),
                base,
                slot,
                down,
                forget,
                wait,
            ));
            self.vm.pumps.borrow_mut().insert(id, task.abort_handle());
            *up.task.borrow_mut() = Some(task.abort_handle());
            return Ok(capnp_rpc::new_client(UpSink(up)));
        }
        let what = format!("{host}:{port}");
        let (stream, entry) = judge_and_connect(&self.state, &base, &Request::connection(&host, port), &what).await?;
        let seq = self.state.record(entry);
        let conn = Rc::new(Conn { slot, id, seq: Some(seq), up: Cell::new(0), down: Cell::new(0) });
        let (rd, wr) = stream.into_split();
        let mut up = Up::new(Phase::Open, 0);
        *up.writer.get_mut() = Some(Box::new(wr));
        let up = Rc::new(up);
        start_pump(&self.vm, &up, rd, down, conn);
        Ok(capnp_rpc::new_client(UpSink(up)))
    }
}

/// Judges `req` and, if allowed, resolves its host and connects
/// (steps 2-4 of the module docs). Every refusal or failure is recorded
/// in the NetLog (`base` with the rule, action and reason; `base.detail`,
/// if any, follows the reason) and returned typed (`denied`,
/// `unavailable`), its message naming `what`. Ok: the upstream stream and
/// its NetLog entry, not yet recorded.
async fn judge_and_connect(
    state: &ProxyState,
    base: &Flow,
    req: &Request<'_>,
    what: &str,
) -> CvResult<(TcpStream, Flow)> {
    let judged = judge(state, base, req, what, None).await?;
    let (stream, ip) = connect_upstream(state, base, req.host, req.port, &judged, what).await?;
    let action = if judged.approval.is_empty() { Action::Allow } else { Action::Ask };
    Ok((stream, entry(base, ip.to_string(), judged.rule, action, judged.approval)))
}

/// `base` as a NetLog entry with this outcome; `detail` first, then
/// `base.detail` (the peek's notes), if any.
pub(crate) fn entry(base: &Flow, address: String, rule: i32, action: Action, detail: String) -> Flow {
    let detail = match (detail.is_empty(), base.detail.is_empty()) {
        (_, true) => detail,
        (true, false) => base.detail.clone(),
        (false, false) => format!("{detail}; {}", base.detail),
    };
    Flow { address, rule, action, detail, ..base.clone() }
}

/// A request the policy let through.
pub(crate) struct Judged {
    /// The deciding rule's index (-1: none).
    pub rule: i32,
    /// The rule names the host exactly: non-public addresses allowed.
    pub explicit: bool,
    /// How an `ask` went ("" when no approval was needed).
    pub approval: String,
}

/// Judges `req` (step 2 of the module docs). Denied (by a rule, by
/// default, by an approver or the approval timeout): recorded in the
/// NetLog and returned as `denied` naming `what`. An `ask` whose rule is
/// `approved` (its connection was approved already) passes without asking
/// again.
pub(crate) async fn judge(
    state: &ProxyState,
    base: &Flow,
    req: &Request<'_>,
    what: &str,
    approved: Option<i32>,
) -> CvResult<Judged> {
    let (host, port) = (req.host, req.port);
    let decision = state.policy.borrow().decide(req);
    // For an `ask` rule: how the approval went (kept in the flow's entry).
    let mut approval = String::new();
    let rule = decision.rule_index();
    match decision.action {
        Action::Allow => {}
        Action::Deny => {
            let detail = match decision.rule {
                Some(i) => format!("denied by rule {i}"),
                None => "no rule allows it".to_string(),
            };
            state.record(entry(base, String::new(), rule, Action::Deny, detail.clone()));
            return Err(CvError::denied(format!("egress to {what} {detail}")));
        }
        Action::Ask if approved == Some(rule) => approval = "approved with its connection".to_string(),
        Action::Ask => {
            // Held (the guest's connection waits) until an approver decides
            // through `Approvals`, or the timeout denies.
            let ask = crate::approvals::Ask {
                vm: base.vm.clone(),
                host: host.to_string(),
                port,
                scheme: base_scheme(req),
                method: req.method.unwrap_or("").to_string(),
                path: req.path.unwrap_or("").to_string(),
                rule,
            };
            let outcome = state.approvals.ask(ask).await;
            approval = outcome.describe(state.approvals.timeout());
            if !outcome.allowed() {
                state.record(entry(base, String::new(), rule, Action::Ask, approval.clone()));
                return Err(CvError::denied(format!("egress to {what} denied: {approval}")));
            }
        }
    }
    Ok(Judged { rule, explicit: decision.explicit, approval })
}

/// Resolves `host` and connects to `port` (steps 3-4 of the module docs)
/// for a request `judged` allowed. Refused (the name does not resolve, a
/// non-public address for a wildcard rule) or failed: recorded in the
/// NetLog and returned (`denied`, `unavailable`) naming `what`.
pub(crate) async fn connect_upstream(
    state: &ProxyState,
    base: &Flow,
    host: &str,
    port: u16,
    judged: &Judged,
    what: &str,
) -> CvResult<(TcpStream, IpAddr)> {
    let rule = judged.rule;
    let addrs = match state.resolver.resolve(host, port).await {
        Ok(a) => a,
        Err(detail) => {
            state.record(entry(base, String::new(), rule, Action::Deny, detail.clone()));
            return Err(CvError::denied(format!("egress to {what} denied: {detail}")));
        }
    };
    let addrs = match crate::resolve::allowed_addresses(&addrs, judged.explicit) {
        Ok(a) => a,
        Err((ip, detail)) => {
            state.record(entry(base, ip.to_string(), rule, Action::Deny, detail.clone()));
            return Err(CvError::denied(format!("egress to {what} denied: {detail}")));
        }
    };
    match connect_any(&addrs, port).await {
        Ok((stream, ip)) => {
            let _ = stream.set_nodelay(true);
            Ok((stream, ip))
        }
        Err((ip, detail)) => {
            state.record(entry(base, ip.to_string(), rule, Action::Allow, detail.clone()));
            Err(CvError::unavailable(format!("egress to {what}: {detail}")))
        }
    }
}

/// The scheme an `ask` shows its approver: what a peek saw, "" when the
/// connection was judged before any bytes.
fn base_scheme(req: &Request<'_>) -> String {
    if req.method.is_some() || req.scheme != crate::policy::Scheme::Tcp {
        req.scheme.name().to_string()
    } else {
        String::new()
    }
}

/// Starts the upstream -> guest pump of a connected flow and opens `up`
/// to writes.
fn start_pump(
    vm: &Rc<VmFlows>,
    up: &Rc<Up>,
    rd: impl AsyncRead + Unpin + 'static,
    down: byte_sink::Client,
    conn: Rc<Conn>,
) {
    let id = conn.id;
    *up.conn.borrow_mut() = Some(conn.clone());
    let pump = tokio::task::spawn_local(pump_down(rd, down, conn));
    vm.pumps.borrow_mut().insert(id, pump.abort_handle());
    *up.task.borrow_mut() = Some(pump.abort_handle());
    *up.phase.borrow_mut() = Phase::Open;
    up.changed.notify_waiters();
}

/// Removes a peeking flow's task from its VM's table when the task ends
/// before the flow connects (a connected flow's [`Conn`] does it then).
struct Forget {
    vm: Rc<VmFlows>,
    id: u64,
    armed: bool,
}

impl Drop for Forget {
    fn drop(&mut self) {
        if self.armed {
            self.vm.pumps.borrow_mut().remove(&self.id);
        }
    }
}

/// The notes a peeked request adds to its NetLog `detail`: the SNI (and
/// whether it differs from the host connected to), and whether the bytes
/// were cut by a bound.
fn peek_notes(seen: &Seen, host: &str) -> String {
    let mut notes = Vec::new();
    if let Some(sni) = &seen.sni {
        if sni == host {
            notes.push(format!("sni {sni}"));
        } else {
            notes.push(format!("sni {sni} differs from the host connected to"));
        }
    }
    if seen.partial {
        notes.push("first bytes cut by the peek bound".to_string());
    }
    notes.join("; ")
}

/// The peek of one flow (module docs, "Peeking"): waits for the guest's
/// first bytes within the bounds, judges the request they show, connects,
/// sends the held bytes and starts the pump; or fails `up` and releases
/// `down`.
async fn peek_then_connect(
    state: Rc<ProxyState>,
    up: Rc<Up>,
    mut base: Flow,
    slot: Slot,
    down: byte_sink::Client,
    mut forget: Forget,
    wait: Duration,
) {
    let deadline = tokio::time::Instant::now() + wait;
    let seen = loop {
        let changed = up.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let got = match &*up.phase.borrow() {
            Phase::Peeking { buf, eof } => crate::peek::classify(buf, *eof || buf.len() >= up.cap),
            _ => return,
        };
        if let Some(seen) = got {
            break seen;
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            let Phase::Peeking { buf, .. } = &*up.phase.borrow() else { return };
            break crate::peek::classify(buf, true).unwrap_or_else(Seen::tcp);
        }
    };
    let (buf, eof) = match std::mem::replace(&mut *up.phase.borrow_mut(), Phase::Deciding) {
        Phase::Peeking { buf, eof } => (buf, eof),
        _ => return,
    };
    base.method = seen.method.clone().unwrap_or_default();
    base.path = seen.path.clone().unwrap_or_default();
    base.detail = peek_notes(&seen, &base.host);
    let req = Request {
        host: &base.host,
        port: base.port,
        scheme: seen.scheme,
        method: seen.method.as_deref(),
        path: seen.path.as_deref(),
    };
    let what = match (&seen.method, &seen.path) {
        (Some(m), Some(p)) => {
            format!("{}:{} ({} {m} {})", base.host, base.port, seen.scheme.name(), crate::log::bounded(p))
        }
        _ => format!("{}:{} ({})", base.host, base.port, seen.scheme.name()),
    };
    if seen.scheme == crate::policy::Scheme::Https && state.may_intercept(&base.host, base.port) {
        // TLS interception (`crate::mitm`): judged now on the SNI and port
        // alone unless the host has rules on method or path (then every
        // request is judged as it comes).
        let approved = if state.policy.borrow().needs_peek(&base.host, base.port) {
            None
        } else {
            match judge(&state, &base, &req, &what, None).await {
                Ok(j) => Some(j.rule),
                Err(e) => {
                    up.fail(e);
                    drop(down);
                    return;
                }
            }
        };
        let server_name = seen.sni.clone().unwrap_or_else(|| base.host.clone());
        let (guest_side, proxy_side) = tokio::io::duplex(crate::mitm::DUPLEX_BYTES);
        let (rd, mut wr) = tokio::io::split(guest_side);
        if let Err(e) = feed(&mut wr, &buf, eof).await {
            up.fail(CvError::internal(format!("interception: {e}")));
            return;
        }
        forget.armed = false;
        let conn = Rc::new(Conn { slot, id: forget.id, seq: None, up: Cell::new(0), down: Cell::new(0) });
        conn.up.set(buf.len() as u64);
        let ix = crate::mitm::Intercept::new(state.clone(), base.clone(), server_name, approved);
        let task = tokio::task::spawn_local(crate::mitm::serve(ix, proxy_side));
        forget.vm.pumps.borrow_mut().insert(forget.id | MITM_TASK, task.abort_handle());
        let vm = forget.vm.clone();
        let id = forget.id;
        tokio::task::spawn_local(async move {
            let _ = task.await;
            vm.pumps.borrow_mut().remove(&(id | MITM_TASK));
        });
        if !eof {
            *up.writer.lock().await = Some(Box::new(wr));
        }
        start_pump(&forget.vm, &up, rd, down, conn);
        return;
    }
    let (stream, entry) = match judge_and_connect(&state, &base, &req, &what).await {
        Ok(x) => x,
        Err(e) => {
            up.fail(e);
            drop(down);
            return;
        }
    };
    let seq = state.record(entry);
    forget.armed = false;
    let conn = Rc::new(Conn { slot, id: forget.id, seq: Some(seq), up: Cell::new(0), down: Cell::new(0) });
    let (rd, mut wr) = stream.into_split();
    if let Err(e) = feed(&mut wr, &buf, eof).await {
        up.fail(CvError::unavailable(format!("upstream {e}")));
        return;
    }
    conn.up.set(buf.len() as u64);
    if !eof {
        *up.writer.lock().await = Some(Box::new(wr));
    }
    start_pump(&forget.vm, &up, rd, down, conn);
}

/// The key bit that marks an interception task in [`VmFlows`]'s table
/// (beside its flow's pump, under the same id).
const MITM_TASK: u64 = 1 << 63;

/// Writes the held first bytes, then shuts the write side when the guest
/// had half-closed. Errors: "write failed: ..." / "shutdown failed: ...".
async fn feed(wr: &mut (impl AsyncWrite + Unpin), buf: &[u8], eof: bool) -> Result<(), String> {
    wr.write_all(buf).await.map_err(|e| format!("write failed: {e}"))?;
    if eof {
        wr.shutdown().await.map_err(|e| format!("shutdown failed: {e}"))?;
    }
    Ok(())
}

impl egress::Server for EgressServer {
    /// Whether any `allow`/`ask` rule's host glob matches `name` (after
    /// dropping a final dot, case-insensitively).
    async fn resolve(
        self: CapRc<Self>,
        params: egress::ResolveParams,
        mut results: egress::ResolveResults,
    ) -> capnp::Result<()> {
        let name = params.get()?.get_name()?.to_str().map_err(|_| CvError::invalid("name: not UTF-8"))?;
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        let allowed = crate::policy::valid_dns_name(&name) && self.state.policy.borrow().may_resolve(&name);
        tracing::debug!(vm = %self.vm.name, name = %name, allowed, "egress resolve");
        if !allowed {
            // A refused name is a denied host: it shows in the NetLog (port
            // 0: no connection was asked for yet).
            self.state.record(Flow {
                detail: "name refused at DNS: no allow or ask rule names it".to_string(),
                ..Flow::asked(&self.vm.name, &crate::log::bounded(&name), 0)
            });
        }
        results.get().set_allowed(allowed);
        Ok(())
    }

    /// The CA certificate intercepted TLS is signed with ("" when this
    /// proxy does not intercept).
    async fn trust(self: CapRc<Self>, _: egress::TrustParams, mut results: egress::TrustResults) -> capnp::Result<()> {
        let pem = self.state.mitm.as_ref().map(|m| m.ca.cert_pem().to_string()).unwrap_or_default();
        results.get().set_ca_cert_pem(pem);
        Ok(())
    }

    /// See the module docs. Errors: `quota`, `denied`, `unavailable`.
    async fn connect(
        self: CapRc<Self>,
        params: egress::ConnectParams,
        mut results: egress::ConnectResults,
    ) -> capnp::Result<()> {
        let p = params.get()?;
        let host = p.get_host()?.to_str().unwrap_or("(not UTF-8)").to_string();
        let up = self.open(&host, p.get_port(), p.get_down()?).await?;
        results.get().set_up(up);
        Ok(())
    }
}

/// Connects to `port` on each of `addrs` in turn until one answers, all
/// within [`CONNECT_TIMEOUT`]. Errors: the last address tried and why.
async fn connect_any(addrs: &[IpAddr], port: u16) -> Result<(tokio::net::TcpStream, IpAddr), (IpAddr, String)> {
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let mut last = (addrs[0], "no address".to_string());
    for ip in addrs {
        let at = SocketAddr::new(*ip, port);
        match tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(at)).await {
            Ok(Ok(s)) => return Ok((s, *ip)),
            Ok(Err(e)) => last = (*ip, format!("upstream {at} unreachable: {e}")),
            Err(_) => {
                return Err((*ip, format!("upstream {at} did not answer within {} s", CONNECT_TIMEOUT.as_secs())));
            }
        }
    }
    Err(last)
}

/// Upstream -> guest: reads into `down`, each write awaited; EOF -> `done`.
async fn pump_down(mut rd: impl AsyncRead + Unpin, down: byte_sink::Client, conn: Rc<Conn>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(flow = conn.id, "upstream read failed: {e}");
                return;
            }
        };
        let mut req = down.write_request();
        req.get().set_data(&buf[..n]);
        if let Err(e) = req.send().await {
            tracing::debug!(flow = conn.id, "guest sink failed: {e}");
            return;
        }
        conn.down.set(conn.down.get() + n as u64);
    }
    let _ = down.done_request().send().promise.await;
}

/// Where a flow's `up` side is.
enum Phase {
    /// Holding the guest's first bytes; `eof`: the guest half-closed.
    Peeking { buf: Vec<u8>, eof: bool },
    /// Judging and connecting.
    Deciding,
    /// Writes go upstream.
    Open,
    /// Denied or failed: every later write and `done` get this error.
    Failed(CvError),
}

/// The guest -> upstream side of one flow, shared by its `up` sink and
/// its peek task.
struct Up {
    phase: RefCell<Phase>,
    /// Signalled when bytes are held, the guest half-closes, or `phase`
    /// leaves `Peeking`/`Deciding`.
    changed: Notify,
    writer: tokio::sync::Mutex<Option<Box<dyn AsyncWrite + Unpin>>>,
    /// Keeps writes (and `done`) in arrival order across awaits.
    order: tokio::sync::Mutex<()>,
    conn: RefCell<Option<Rc<Conn>>>,
    /// The peek task, then the pump.
    task: RefCell<Option<tokio::task::AbortHandle>>,
    done: Cell<bool>,
    /// Bytes held at most while peeking.
    cap: usize,
}

impl Up {
    fn new(phase: Phase, cap: usize) -> Self {
        Self {
            phase: RefCell::new(phase),
            changed: Notify::new(),
            writer: tokio::sync::Mutex::new(None),
            order: tokio::sync::Mutex::new(()),
            conn: RefCell::new(None),
            task: RefCell::new(None),
            done: Cell::new(false),
            cap,
        }
    }

    fn fail(&self, e: CvError) {
        *self.phase.borrow_mut() = Phase::Failed(e);
        self.changed.notify_waiters();
    }

    /// Waits until `phase` is `Open` (true) or, while peeking, lets `peek`
    /// act on the held bytes (`Some(r)`: return `r`). Errors: `Failed`.
    async fn until_open(
        &self,
        mut peek: impl FnMut(&mut Vec<u8>, &mut bool) -> Option<capnp::Result<()>>,
    ) -> capnp::Result<bool> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match &mut *self.phase.borrow_mut() {
                Phase::Peeking { buf, eof } => {
                    if let Some(r) = peek(buf, eof) {
                        return r.map(|()| false);
                    }
                }
                Phase::Deciding => {}
                Phase::Open => return Ok(true),
                Phase::Failed(e) => return Err(e.clone().into()),
            }
            changed.await;
        }
    }
}

/// Guest -> upstream: the `up` sink of one flow.
struct UpSink(Rc<Up>);

impl byte_sink::Server for UpSink {
    async fn write(self: CapRc<Self>, params: byte_sink::WriteParams) -> capnp::Result<()> {
        let mut data = params.get()?.get_data()?;
        let up = &self.0;
        let _order = up.order.lock().await;
        let cap = up.cap;
        let open = up
            .until_open(|buf, eof| {
                if *eof {
                    return Some(Err(capnp::Error::failed("write after done".into())));
                }
                let n = data.len().min(cap.saturating_sub(buf.len()));
                if n > 0 {
                    buf.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    up.changed.notify_waiters();
                }
                data.is_empty().then_some(Ok(()))
            })
            .await?;
        if !open {
            return Ok(());
        }
        let conn = up.conn.borrow().clone();
        let mut w = up.writer.lock().await;
        let w = w.as_mut().ok_or_else(|| capnp::Error::failed("write after done".into()))?;
        w.write_all(data).await.map_err(|e| CvError::unavailable(format!("upstream write failed: {e}")))?;
        if let Some(c) = conn {
            c.up.set(c.up.get() + data.len() as u64);
        }
        Ok(())
    }

    async fn done(self: CapRc<Self>, _: byte_sink::DoneParams, _: byte_sink::DoneResults) -> capnp::Result<()> {
        let up = &self.0;
        let _order = up.order.lock().await;
        let open = up
            .until_open(|_, eof| {
                // Half-closed while peeking: the decision comes now; wait
                // for it (its error is this call's).
                if !*eof {
                    *eof = true;
                    up.changed.notify_waiters();
                }
                None
            })
            .await?;
        up.done.set(true);
        if open {
            if let Some(mut w) = up.writer.lock().await.take() {
                w.shutdown().await.map_err(|e| CvError::unavailable(format!("upstream shutdown failed: {e}")))?;
            }
        }
        Ok(())
    }
}

impl Drop for UpSink {
    fn drop(&mut self) {
        if !self.0.done.get() {
            // Released without a half-close: the guest reset its
            // connection (while peeking: the decision is dropped too).
            if let Some(t) = self.0.task.borrow_mut().take() {
                t.abort();
            }
        }
    }
}
