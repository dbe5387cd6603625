//! The membrane: revocable wrappers around every capability the worker
//! forwards (guest `Process`, `Files`, `ByteSink`s in both directions, the
//! broker's `Accounts`, the session proxy's `NetPolicy`, `NetLog` and
//! `Approvals`).
//!
//! Each wrapper holds a [`Scope`]: the session and, for VM-reached caps, the
//! one VM it designates. Before every forwarded call the scope is checked
//! (session live, VM not removed), and a call in flight is cut off when the
//! session is revoked. Results are rebuilt field by field from the schema:
//! nothing the worker does not know (an unknown pointer field, a
//! capability) passes from one side to the other unwrapped.

use crate::grants::GrantNode;
use crate::state::SessionState;
use crate::vms::VmEntry;
use capnp::capability::Rc as CapRc;
use capvisor_rpc::schema::capvisor_capnp::{accounts, approvals, net_log, net_policy};
use capvisor_rpc::schema::common_capnp::{byte_sink, exit_status, files, process};
use capvisor_rpc::{CvError, CvResult};
use std::future::Future;
use std::rc::Rc;

/// What a forwarded cap is bound to: its session, and the VM it was
/// reached through (if any).
#[derive(Clone)]
pub struct Scope {
    /// The session whose revocation cuts this cap.
    pub st: Rc<SessionState>,
    /// The VM, for caps reached through a `Vm`.
    pub vm: Option<Rc<VmEntry>>,
    /// The grant, for caps reached through a shared cap
    /// (`crate::grants`): its revocation or expiry cuts them too.
    pub grant: Option<Rc<GrantNode>>,
}

impl Scope {
    /// A scope for session-wide caps.
    pub fn session(st: &Rc<SessionState>) -> Self {
        Self { st: st.clone(), vm: None, grant: None }
    }

    /// A scope for caps reached through VM `vm`.
    pub fn vm(st: &Rc<SessionState>, vm: &Rc<VmEntry>) -> Self {
        Self { st: st.clone(), vm: Some(vm.clone()), grant: None }
    }

    /// This scope, further bound to `grant` (if any).
    pub fn with_grant(mut self, grant: Option<Rc<GrantNode>>) -> Self {
        self.grant = grant;
        self
    }

    /// The delegation chain of this scope's grant, outermost first
    /// (empty for the session's own caps).
    pub fn chain(&self) -> Vec<(String, String)> {
        self.grant.as_ref().map(|g| g.chain()).unwrap_or_default()
    }

    /// `staleSession` once the session is revoked or the grant ended;
    /// `notFound` once the VM was removed.
    pub fn check(&self) -> CvResult<()> {
        self.st.check()?;
        if let Some(g) = &self.grant {
            g.check()?;
        }
        match &self.vm {
            Some(vm) => vm.check_present(),
            None => Ok(()),
        }
    }

    /// Runs a forwarded call under the scope: checked first, cut off with
    /// `staleSession` if the session is revoked meanwhile and with
    /// `notRunning` if its VM stops or crashes meanwhile (a guest whose
    /// vmm died never answers), and a failure of the other side relayed
    /// with its code (transport loss to a guest becomes `notRunning`).
    pub async fn forward<T>(&self, fut: impl Future<Output = capnp::Result<T>>) -> Result<T, capnp::Error> {
        self.check()?;
        let vm = self.vm.is_some();
        let ended = async {
            match &self.vm {
                Some(e) => {
                    e.wait_ended().await;
                    let detail = e.detail.borrow().clone();
                    CvError::not_running(format!("VM {:?} is no longer running: {detail}", e.name))
                }
                None => std::future::pending().await,
            }
        };
        let grant_ended = async {
            match &self.grant {
                Some(g) => g.revoked().await,
                None => std::future::pending().await,
            }
        };
        let r = self
            .st
            .guard(async {
                tokio::select! {
                    r = fut => r.map_err(|e| relay(e, vm)),
                    e = ended => Err(e),
                    _ = grant_ended => Err(CvError::stale()),
                }
            })
            .await;
        Ok(r?)
    }
}

/// Maps an error from the other side of the membrane: domain codes pass
/// (re-encoded), transport loss is `notRunning` for guest caps and
/// `unavailable` otherwise, anything else `unavailable`.
pub fn relay(e: capnp::Error, guest: bool) -> CvError {
    CvError::relay(e, |e| {
        if e.kind == capnp::ErrorKind::Disconnected && guest {
            CvError::not_running("the VM is gone")
        } else {
            CvError::unavailable(format!("backend call failed: {}", e.extra))
        }
    })
}

/// A guest `Process`, revocable, bound to its VM.
pub struct ProcessWrapper {
    /// Session and VM.
    pub scope: Scope,
    /// guest-init's process cap.
    pub inner: process::Client,
}

impl process::Server for ProcessWrapper {
    async fn write(self: CapRc<Self>, params: process::WriteParams) -> capnp::Result<()> {
        let mut req = self.inner.write_request();
        req.get().set_data(params.get()?.get_data()?);
        self.scope.forward(req.send()).await
    }

    async fn close_stdin(
        self: CapRc<Self>,
        _: process::CloseStdinParams,
        _: process::CloseStdinResults,
    ) -> capnp::Result<()> {
        let req = self.inner.close_stdin_request();
        self.scope.forward(async { req.send().promise.await.map(drop) }).await
    }

    async fn wait(self: CapRc<Self>, _: process::WaitParams, mut results: process::WaitResults) -> capnp::Result<()> {
        let req = self.inner.wait_request();
        let resp = self.scope.forward(req.send().promise).await?;
        let status = resp.get()?.get_status()?;
        let mut out = results.get().init_status();
        match status.which()? {
            exit_status::Code(c) => out.set_code(c),
            exit_status::Signal(s) => out.set_signal(s),
        }
        Ok(())
    }

    async fn kill(self: CapRc<Self>, params: process::KillParams, _: process::KillResults) -> capnp::Result<()> {
        let mut req = self.inner.kill_request();
        req.get().set_signal(params.get()?.get_signal());
        self.scope.forward(async { req.send().promise.await.map(drop) }).await
    }

    async fn resize(self: CapRc<Self>, params: process::ResizeParams, _: process::ResizeResults) -> capnp::Result<()> {
        let size = params.get()?.get_size()?;
        let mut req = self.inner.resize_request();
        {
            let mut s = req.get().init_size();
            s.set_rows(size.get_rows());
            s.set_cols(size.get_cols());
        }
        self.scope.forward(async { req.send().promise.await.map(drop) }).await
    }
}

/// A guest `Files`, revocable, bound to its VM.
pub struct FilesWrapper {
    /// Session and VM.
    pub scope: Scope,
    /// guest-init's files cap.
    pub inner: files::Client,
}

impl files::Server for FilesWrapper {
    async fn read(self: CapRc<Self>, params: files::ReadParams, mut results: files::ReadResults) -> capnp::Result<()> {
        let p = params.get()?;
        let mut req = self.inner.read_request();
        req.get().set_path(p.get_path()?);
        req.get().set_sink(SinkWrapper::wrap(&self.scope, p.get_sink()?));
        let resp = self.scope.forward(req.send().promise).await?;
        results.get().set_size(resp.get()?.get_size());
        Ok(())
    }

    async fn write(
        self: CapRc<Self>,
        params: files::WriteParams,
        mut results: files::WriteResults,
    ) -> capnp::Result<()> {
        let p = params.get()?;
        let mut req = self.inner.write_request();
        req.get().set_path(p.get_path()?);
        req.get().set_mode(p.get_mode());
        req.get().set_beneath(p.get_beneath()?);
        let resp = self.scope.forward(req.send().promise).await?;
        let inner = resp.get()?.get_sink()?;
        results.get().set_sink(SinkWrapper::wrap(&self.scope, inner));
        Ok(())
    }

    async fn list(self: CapRc<Self>, params: files::ListParams, mut results: files::ListResults) -> capnp::Result<()> {
        let mut req = self.inner.list_request();
        req.get().set_path(params.get()?.get_path()?);
        let resp = self.scope.forward(req.send().promise).await?;
        let entries = resp.get()?.get_entries()?;
        let mut out = results.get().init_entries(entries.len());
        for (i, e) in entries.iter().enumerate() {
            let mut o = out.reborrow().get(i as u32);
            o.set_name(e.get_name()?);
            o.set_kind(e.get_kind()?);
            o.set_size(e.get_size());
            o.set_mode(e.get_mode());
        }
        Ok(())
    }
}

/// A `ByteSink` handed across the membrane (a guest file body, or a
/// client's stdout / stderr / read sink given to the guest), revocable:
/// once the session ends or the VM is removed, writes fail and nothing
/// more reaches the other side.
pub struct SinkWrapper {
    /// Session and VM.
    pub scope: Scope,
    /// The wrapped sink.
    pub inner: byte_sink::Client,
}

impl SinkWrapper {
    /// `inner` behind the membrane of `scope`.
    pub fn wrap(scope: &Scope, inner: byte_sink::Client) -> byte_sink::Client {
        capnp_rpc::new_client(SinkWrapper { scope: scope.clone(), inner })
    }
}

impl byte_sink::Server for SinkWrapper {
    async fn write(self: CapRc<Self>, params: byte_sink::WriteParams) -> capnp::Result<()> {
        let mut req = self.inner.write_request();
        req.get().set_data(params.get()?.get_data()?);
        self.scope.forward(req.send()).await
    }

    async fn done(self: CapRc<Self>, _: byte_sink::DoneParams, _: byte_sink::DoneResults) -> capnp::Result<()> {
        let req = self.inner.done_request();
        self.scope.forward(async { req.send().promise.await.map(drop) }).await
    }
}

/// The broker's `Accounts`, revocable (only in bundles that list "accounts").
pub struct AccountsWrapper {
    /// The session whose revocation cuts this cap (no VM).
    pub scope: Scope,
    /// The broker's accounts cap.
    pub inner: accounts::Client,
}

impl accounts::Server for AccountsWrapper {
    async fn add(self: CapRc<Self>, params: accounts::AddParams, _: accounts::AddResults) -> capnp::Result<()> {
        let p = params.get()?;
        let mut req = self.inner.add_request();
        req.get().set_account(p.get_account()?);
        req.get().set_profile(p.get_profile()?);
        req.get().set_password(p.get_password()?);
        self.scope.forward(async { req.send().promise.await.map(drop) }).await
    }

    async fn list(self: CapRc<Self>, _: accounts::ListParams, mut results: accounts::ListResults) -> capnp::Result<()> {
        let req = self.inner.list_request();
        let resp = self.scope.forward(req.send().promise).await?;
        let list = resp.get()?.get_accounts()?;
        let mut out = results.get().init_accounts(list.len());
        for (i, a) in list.iter().enumerate() {
            let mut o = out.reborrow().get(i as u32);
            o.set_name(a.get_name()?);
            o.set_profile(a.get_profile()?);
        }
        Ok(())
    }

    async fn remove(
        self: CapRc<Self>,
        params: accounts::RemoveParams,
        _: accounts::RemoveResults,
    ) -> capnp::Result<()> {
        let mut req = self.inner.remove_request();
        req.get().set_account(params.get()?.get_account()?);
        self.scope.forward(async { req.send().promise.await.map(drop) }).await
    }
}

/// Copies one `NetRule`, field by field.
pub fn copy_rule(
    from: capvisor_rpc::schema::capvisor_capnp::net_rule::Reader<'_>,
    mut to: capvisor_rpc::schema::capvisor_capnp::net_rule::Builder<'_>,
) -> capnp::Result<()> {
    to.set_host(from.get_host()?);
    to.set_port(from.get_port());
    to.set_scheme(from.get_scheme()?);
    to.set_method(from.get_method()?);
    to.set_path_prefix(from.get_path_prefix()?);
    to.set_action(from.get_action()?);
    to.set_no_mitm(from.get_no_mitm());
    Ok(())
}

/// The session proxy's `NetPolicy`, revocable with the session.
pub struct NetPolicyWrapper {
    /// The session whose revocation cuts this cap (no VM).
    pub scope: Scope,
    /// The proxy's policy cap.
    pub inner: net_policy::Client,
}

impl net_policy::Server for NetPolicyWrapper {
    async fn get(
        self: CapRc<Self>,
        _: net_policy::GetParams,
        mut results: net_policy::GetResults,
    ) -> capnp::Result<()> {
        let req = self.inner.get_request();
        let resp = self.scope.forward(req.send().promise).await?;
        let rules = resp.get()?.get_rules()?;
        let mut out = results.get().init_rules(rules.len());
        for (i, r) in rules.iter().enumerate() {
            copy_rule(r, out.reborrow().get(i as u32))?;
        }
        Ok(())
    }

    async fn set(self: CapRc<Self>, params: net_policy::SetParams, _: net_policy::SetResults) -> capnp::Result<()> {
        let rules = params.get()?.get_rules()?;
        let mut req = self.inner.set_request();
        {
            let mut out = req.get().init_rules(rules.len());
            for (i, r) in rules.iter().enumerate() {
                copy_rule(r, out.reborrow().get(i as u32))?;
            }
        }
        let res = self.scope.forward(async { req.send().promise.await.map(drop) }).await;
        let outcome = res.as_ref().map(|_| ()).map_err(|e| relay(e.clone(), false));
        let detail = format!("{} rules", rules.len());
        self.scope.st.audit("net.policy.set", "netpolicy", "set", outcome.as_ref().map(|_| ()), &detail);
        res
    }

    /// A read-only view (`crate::narrow_net`).
    async fn read_only(
        self: CapRc<Self>,
        params: net_policy::ReadOnlyParams,
        mut results: net_policy::ReadOnlyResults,
    ) -> capnp::Result<()> {
        self.scope.check()?;
        let own: net_policy::Client =
            capnp_rpc::new_client(NetPolicyWrapper { scope: self.scope.clone(), inner: self.inner.clone() });
        let p = params.get()?;
        let bounds = crate::narrow::Bounds::default().then(p.get_expires_at_ms(), p.get_call_budget());
        results.get().set_policy(crate::narrow_net::policy_view(&self.scope, own, bounds));
        Ok(())
    }
}

/// The session proxy's `NetLog`, revocable with the session.
pub struct NetLogWrapper {
    /// The session whose revocation cuts this cap (no VM).
    pub scope: Scope,
    /// The proxy's log cap.
    pub inner: net_log::Client,
}

impl net_log::Server for NetLogWrapper {
    async fn recent(
        self: CapRc<Self>,
        params: net_log::RecentParams,
        mut results: net_log::RecentResults,
    ) -> capnp::Result<()> {
        let p = params.get()?;
        let mut req = self.inner.recent_request();
        req.get().set_vm(p.get_vm()?);
        req.get().set_since_ms(p.get_since_ms());
        req.get().set_limit(p.get_limit());
        let resp = self.scope.forward(req.send().promise).await?;
        let flows = resp.get()?.get_flows()?;
        let mut out = results.get().init_flows(flows.len());
        for (i, f) in flows.iter().enumerate() {
            copy_flow(f, out.reborrow().get(i as u32))?;
        }
        Ok(())
    }

    /// A view of only `vms`' flows (`crate::narrow_net`).
    async fn narrow(
        self: CapRc<Self>,
        params: net_log::NarrowParams,
        mut results: net_log::NarrowResults,
    ) -> capnp::Result<()> {
        self.scope.check()?;
        let p = params.get()?;
        let names = crate::narrow_net::read_vm_names(p.get_vms())?;
        let bounds = crate::narrow::Bounds::default().then(p.get_expires_at_ms(), p.get_call_budget());
        let own: net_log::Client =
            capnp_rpc::new_client(NetLogWrapper { scope: self.scope.clone(), inner: self.inner.clone() });
        let view = crate::narrow_net::Visible::Names(names);
        results.get().set_log(crate::narrow_net::log_view(&self.scope, own, view, bounds));
        Ok(())
    }
}

/// Copies one `NetFlow` field by field (the membrane rule: nothing the
/// worker does not know passes).
pub fn copy_flow(
    f: capvisor_rpc::schema::capvisor_capnp::net_flow::Reader<'_>,
    mut o: capvisor_rpc::schema::capvisor_capnp::net_flow::Builder<'_>,
) -> capnp::Result<()> {
    o.set_time_ms(f.get_time_ms());
    o.set_vm(f.get_vm()?);
    o.set_host(f.get_host()?);
    o.set_address(f.get_address()?);
    o.set_port(f.get_port());
    o.set_method(f.get_method()?);
    o.set_path(f.get_path()?);
    o.set_status(f.get_status());
    o.set_bytes_up(f.get_bytes_up());
    o.set_bytes_down(f.get_bytes_down());
    o.set_rule(f.get_rule());
    o.set_action(f.get_action()?);
    o.set_detail(f.get_detail()?);
    Ok(())
}

/// The session proxy's `Approvals`, revocable with the session; decisions
/// are audited (`net.approve`).
pub struct ApprovalsWrapper {
    /// The session whose revocation cuts this cap (no VM).
    pub scope: Scope,
    /// The proxy's approvals cap (`None` without egress: then only exec
    /// approvals, `crate::approvals`, can be pending).
    pub inner: Option<approvals::Client>,
}

impl approvals::Server for ApprovalsWrapper {
    /// The proxy's held connections (kind "net"), then the execs waiting
    /// in this worker (kind "exec").
    async fn pending(
        self: CapRc<Self>,
        _: approvals::PendingParams,
        mut results: approvals::PendingResults,
    ) -> capnp::Result<()> {
        self.scope.check()?;
        let net = match &self.inner {
            Some(inner) => Some(self.scope.forward(inner.pending_request().send().promise).await?),
            None => None,
        };
        let list = match &net {
            Some(r) => Some(r.get()?.get_approvals()?),
            None => None,
        };
        let n = list.map_or(0, |l| l.len());
        let execs = &self.scope.st.exec_approvals;
        let mut out = results.get().init_approvals(n + execs.len() as u32);
        if let Some(list) = list {
            for (i, a) in list.iter().enumerate() {
                let mut o = out.reborrow().get(i as u32);
                o.set_id(a.get_id());
                o.set_time_ms(a.get_time_ms());
                o.set_vm(a.get_vm()?);
                o.set_host(a.get_host()?);
                o.set_port(a.get_port());
                o.set_scheme(a.get_scheme()?);
                o.set_method(a.get_method()?);
                o.set_path(a.get_path()?);
                o.set_rule(a.get_rule());
                o.set_expires_at_ms(a.get_expires_at_ms());
                o.set_kind("net");
            }
        }
        execs.write(&mut out, n);
        Ok(())
    }

    /// Routes by id: an exec approval's id has
    /// [`crate::approvals::EXEC_ID_BIT`] set.
    async fn decide(
        self: CapRc<Self>,
        params: approvals::DecideParams,
        _: approvals::DecideResults,
    ) -> capnp::Result<()> {
        let p = params.get()?;
        let (id, decision) = (p.get_id(), p.get_decision()?);
        let detail = format!("{id} {decision:?}");
        if id & crate::approvals::EXEC_ID_BIT != 0 {
            let res = self.scope.check().and_then(|_| self.scope.st.exec_approvals.decide(id, decision));
            self.scope.st.audit("exec.approve", "approvals", "decide", res.as_ref().map(|_| ()), &detail);
            return Ok(res?);
        }
        let Some(inner) = &self.inner else {
            return Err(CvError::not_found(format!("no connection {id} waits for a decision (egress is off)")).into());
        };
        let mut req = inner.decide_request();
        req.get().set_id(id);
        req.get().set_decision(decision);
        let res = self.scope.forward(async { req.send().promise.await.map(drop) }).await;
        let outcome = res.as_ref().map(|_| ()).map_err(|e| relay(e.clone(), false));
        self.scope.st.audit("net.approve", "approvals", "decide", outcome.as_ref().map(|_| ()), &detail);
        res
    }
}
