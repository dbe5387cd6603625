//! The `Egress` server one VM gets (schema guest.capnp `Egress`): DNS
//! answers from the policy, and relayed TCP connections.
//!
//! `connect(host, port, down)`:
//! 1. a slot: at most [`crate::Limits::per_vm`] connections of this VM and
//!    [`crate::Limits::total`] of the proxy are open or opening, else
//!    `quota`;
//! 2. the policy decides `(host, port)` as a bare TCP connection
//!    ([`crate::policy::Request::connection`]); deny and ask (no approvals
//!    yet) fail with `denied`;
//! 3. the proxy resolves `host` itself ([`crate::resolve::Resolver`]) and
//!    keeps the addresses the decision may reach
//!    ([`crate::resolve::allowed_addresses`]); none: `denied`;
//! 4. it connects to those addresses in order, all within
//!    [`CONNECT_TIMEOUT`]; none answers: `unavailable`;
//! 5. it returns `up`, a `ByteSink` whose writes go upstream (`done` shuts
//!    the upstream write side: a half-close), and pumps upstream bytes into
//!    `down` in chunks of at most [`capvisor_rpc::CHUNK`], each write
//!    awaited (the guest's flow control reaches the upstream socket);
//!    upstream EOF becomes `down.done()`.
//!
//! Resets: the guest releasing `up` without `done` aborts the flow (the
//! upstream socket is closed); an upstream read error, or `down` failing,
//! ends the pump without `done`, so guest-init sees `down` released
//! without `done` and resets its connection. When the VM's Egress
//! connection ends, every flow of that VM is closed.
//!
//! Every decision becomes one NetLog entry (`crate::log`) and one
//! `tracing` line; a connected flow's byte counts are written to its entry
//! when the flow ends.

use crate::log::Flow;
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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

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
struct Slot {
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
struct Conn {
    slot: Slot,
    id: u64,
    seq: u64,
    up: Cell<u64>,
    down: Cell<u64>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        let (up, down) = (self.up.get(), self.down.get());
        self.slot.state.log.borrow_mut().update(self.seq, |f| {
            f.bytes_up = up;
            f.bytes_down = down;
        });
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
        let time_ms = now_ms();
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        let entry = |address: String, rule: i32, action: Action, detail: String| Flow {
            time_ms,
            vm: self.vm.name.clone(),
            host: host.clone(),
            address,
            port,
            method: String::new(),
            path: String::new(),
            status: 0,
            bytes_up: 0,
            bytes_down: 0,
            rule,
            action,
            detail,
        };
        let slot = match Slot::take(&self.state, &self.vm) {
            Ok(s) => s,
            Err(e) => {
                self.state.record(entry(String::new(), -1, Action::Deny, e.message.clone()));
                return Err(e);
            }
        };
        if port == 0 {
            let detail = "port 0".to_string();
            self.state.record(entry(String::new(), -1, Action::Deny, detail.clone()));
            return Err(CvError::denied(format!("egress to {host}:0 denied: {detail}")));
        }
        let decision = self.state.policy.borrow().decide(&Request::connection(&host, port));
        let rule = decision.rule_index();
        match decision.action {
            Action::Allow => {}
            Action::Deny => {
                let detail = match decision.rule {
                    Some(i) => format!("denied by rule {i}"),
                    None => "no rule allows it".to_string(),
                };
                self.state.record(entry(String::new(), rule, Action::Deny, detail.clone()));
                return Err(CvError::denied(format!("egress to {host}:{port} {detail}")));
            }
            Action::Ask => {
                let detail = format!("rule {rule} asks for approval; approvals are not available yet");
                self.state.record(entry(String::new(), rule, Action::Ask, detail.clone()));
                return Err(CvError::denied(format!("egress to {host}:{port} denied: {detail}")));
            }
        }
        let addrs = match self.state.resolver.resolve(&host, port).await {
            Ok(a) => a,
            Err(detail) => {
                self.state.record(entry(String::new(), rule, Action::Deny, detail.clone()));
                return Err(CvError::denied(format!("egress to {host}:{port} denied: {detail}")));
            }
        };
        let addrs = match crate::resolve::allowed_addresses(&addrs, decision.explicit) {
            Ok(a) => a,
            Err((ip, detail)) => {
                self.state.record(entry(ip.to_string(), rule, Action::Deny, detail.clone()));
                return Err(CvError::denied(format!("egress to {host}:{port} denied: {detail}")));
            }
        };
        let (stream, ip) = match connect_any(&addrs, port).await {
            Ok(s) => s,
            Err((ip, detail)) => {
                self.state.record(entry(ip.to_string(), rule, Action::Allow, detail.clone()));
                return Err(CvError::unavailable(format!("egress to {host}:{port}: {detail}")));
            }
        };
        let _ = stream.set_nodelay(true);
        let seq = self.state.record(entry(ip.to_string(), rule, Action::Allow, String::new()));
        let id = self.vm.next_id.get();
        self.vm.next_id.set(id + 1);
        let conn = Rc::new(Conn { slot, id, seq, up: Cell::new(0), down: Cell::new(0) });
        let (rd, wr) = stream.into_split();
        let pump = tokio::task::spawn_local(pump_down(rd, down, conn.clone()));
        self.vm.pumps.borrow_mut().insert(id, pump.abort_handle());
        let up = UpSink {
            writer: tokio::sync::Mutex::new(Some(wr)),
            conn,
            done: Cell::new(false),
            pump: pump.abort_handle(),
        };
        Ok(capnp_rpc::new_client(up))
    }
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
        results.get().set_allowed(allowed);
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
async fn pump_down(mut rd: OwnedReadHalf, down: byte_sink::Client, conn: Rc<Conn>) {
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

/// Guest -> upstream: the `up` sink of one flow.
struct UpSink {
    writer: tokio::sync::Mutex<Option<OwnedWriteHalf>>,
    conn: Rc<Conn>,
    done: Cell<bool>,
    pump: tokio::task::AbortHandle,
}

impl byte_sink::Server for UpSink {
    async fn write(self: CapRc<Self>, params: byte_sink::WriteParams) -> capnp::Result<()> {
        let data = params.get()?.get_data()?;
        let mut w = self.writer.lock().await;
        let w = w.as_mut().ok_or_else(|| capnp::Error::failed("write after done".into()))?;
        w.write_all(data).await.map_err(|e| CvError::unavailable(format!("upstream write failed: {e}")))?;
        self.conn.up.set(self.conn.up.get() + data.len() as u64);
        Ok(())
    }

    async fn done(self: CapRc<Self>, _: byte_sink::DoneParams, _: byte_sink::DoneResults) -> capnp::Result<()> {
        self.done.set(true);
        if let Some(mut w) = self.writer.lock().await.take() {
            w.shutdown().await.map_err(|e| CvError::unavailable(format!("upstream shutdown failed: {e}")))?;
        }
        Ok(())
    }
}

impl Drop for UpSink {
    fn drop(&mut self) {
        if !self.done.get() {
            // Released without a half-close: the guest reset its connection.
            self.pump.abort();
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
