//! Attenuation of `NetLog` and `NetPolicy` (issue 10, item 1; the pattern
//! of [`crate::narrow`]):
//!
//! - `NetLog.narrow(vms)` is a view of only those VMs' flows; a narrowed
//!   factory's `VmFactory.netLog` is a view of the VMs made through it,
//!   following it as it makes more ([`Visible`]). A view never shows a flow
//!   of another VM, whatever `recent` asks; narrowing it again keeps only
//!   VMs both name.
//! - `NetPolicy.readOnly` is a view whose `set` is denied.
//!
//! Both forward to the session's own wrappers (worker/src/wrap.rs, which
//! copy field by field), are bound to a scope (session, and the grant when
//! shared: its end cuts them) and are recognised by `Shares.share` through
//! the session's `CapabilityServerSet`s.

use crate::grants::GrantNode;
use crate::narrow::{view_denied, Bounds};
use crate::wrap::{copy_flow, Scope};
use capnp::capability::Rc as CapRc;
use capvisor_rpc::error::text;
use capvisor_rpc::schema::capvisor_capnp::{net_log, net_policy};
use capvisor_rpc::{CvError, CvResult};
use std::collections::BTreeSet;
use std::rc::Rc;

/// Which VMs' flows a `NetLog` view shows.
pub enum Visible {
    /// These VMs (by name in the session).
    Names(BTreeSet<String>),
    /// The VMs a narrowed factory made (`crate::narrow_vms`), now and later.
    Factory(Rc<dyn Fn(&str) -> bool>),
}

impl Visible {
    fn sees(&self, vm: &str) -> bool {
        match self {
            Visible::Names(n) => n.contains(vm),
            Visible::Factory(owns) => owns(vm),
        }
    }

    fn describe(&self) -> String {
        match self {
            Visible::Names(n) => format!("netlog of {:?}", n.iter().collect::<Vec<_>>()),
            Visible::Factory(_) => "netlog of the VMs made through the shared factory".into(),
        }
    }
}

/// Reads a list of VM names for a view.
///
/// Errors: `invalidArgument` for more than [`crate::narrow::MAX_LIST`] or a name that
/// is not a VM name.
pub fn read_vm_names(list: capnp::Result<capnp::text_list::Reader<'_>>) -> CvResult<BTreeSet<String>> {
    let names = crate::narrow::text_list(list, "vms")?;
    if let Some(n) = names.iter().find(|n| !capvisor_rpc::names::valid_name(n)) {
        return Err(CvError::invalid(format!("vms: {n:?} is not a VM name")));
    }
    Ok(names.into_iter().collect())
}

/// A `NetLog` view (see the module docs).
pub struct NarrowNetLog {
    scope: Scope,
    /// The session's own `NetLog` (its wrapper).
    inner: net_log::Client,
    visible: Rc<Visible>,
    bounds: Bounds,
}

/// A view of `inner` (the session's own `NetLog`) showing `visible`, bound
/// to `scope` (its grant included) and `bounds`. Audited (`netlog.narrow`).
pub fn log_view(scope: &Scope, inner: net_log::Client, visible: Visible, bounds: Bounds) -> net_log::Client {
    scope.st.audit_chain("", &scope.chain(), "netlog.narrow", "NetLog", "narrow", Ok(()), &visible.describe());
    make_log(scope, inner, Rc::new(visible), bounds)
}

fn make_log(scope: &Scope, inner: net_log::Client, visible: Rc<Visible>, bounds: Bounds) -> net_log::Client {
    let mut set = scope.st.narrow_logs.borrow_mut();
    set.gc();
    set.new_client(NarrowNetLog { scope: scope.clone(), inner, visible, bounds })
}

impl NarrowNetLog {
    /// The grant this view is bound to, if shared.
    pub fn grant(&self) -> Option<Rc<GrantNode>> {
        self.scope.grant.clone()
    }

    /// What it shows, for people.
    pub fn describe(&self) -> String {
        self.visible.describe()
    }

    /// The same view bound to `grant` (same bounds: calls through either
    /// count on one budget).
    pub fn rebind(&self, grant: &Rc<GrantNode>) -> net_log::Client {
        let scope = self.scope.clone().with_grant(Some(grant.clone()));
        make_log(&scope, self.inner.clone(), self.visible.clone(), self.bounds.clone())
    }

    fn call(&self, method: &str) -> CvResult<()> {
        self.bounds.admit(&self.scope, |e| view_denied(&self.scope, "netlog", "NetLog", method, e))
    }
}

impl net_log::Server for NarrowNetLog {
    async fn recent(
        self: CapRc<Self>,
        params: net_log::RecentParams,
        mut results: net_log::RecentResults,
    ) -> capnp::Result<()> {
        self.call("recent")?;
        let p = params.get()?;
        let vm = text(p.get_vm())?;
        if !vm.is_empty() && !self.visible.sees(&vm) {
            results.get().init_flows(0);
            return Ok(());
        }
        // Filter first, then keep the newest `limit`.
        let mut req = self.inner.recent_request();
        req.get().set_vm(vm.as_str());
        req.get().set_since_ms(p.get_since_ms());
        let resp = self.scope.forward(req.send().promise).await?;
        let flows = resp.get()?.get_flows()?;
        let seen: Vec<u32> = (0..flows.len())
            .filter(|i| flows.get(*i).get_vm().ok().and_then(|v| v.to_str().ok()).is_some_and(|v| self.visible.sees(v)))
            .collect();
        let keep = match p.get_limit() as usize {
            0 => seen.len(),
            l => l.min(seen.len()),
        };
        let kept = &seen[seen.len() - keep..];
        let mut out = results.get().init_flows(kept.len() as u32);
        for (o, i) in kept.iter().enumerate() {
            copy_flow(flows.get(*i), out.reborrow().get(o as u32))?;
        }
        Ok(())
    }

    async fn narrow(
        self: CapRc<Self>,
        params: net_log::NarrowParams,
        mut results: net_log::NarrowResults,
    ) -> capnp::Result<()> {
        self.call("narrow")?;
        let p = params.get()?;
        let names = read_vm_names(p.get_vms())?;
        let names: BTreeSet<String> = names.into_iter().filter(|n| self.visible.sees(n)).collect();
        let bounds = self.bounds.then(p.get_expires_at_ms(), p.get_call_budget());
        results.get().set_log(log_view(&self.scope, self.inner.clone(), Visible::Names(names), bounds));
        Ok(())
    }
}

/// A read-only `NetPolicy` view (see the module docs).
pub struct ReadOnlyNetPolicy {
    scope: Scope,
    /// The session's own `NetPolicy` (its wrapper).
    inner: net_policy::Client,
    bounds: Bounds,
}

/// A read-only view of `inner` (the session's own `NetPolicy`), bound to
/// `scope` and `bounds`. Audited (`netpolicy.narrow`).
pub fn policy_view(scope: &Scope, inner: net_policy::Client, bounds: Bounds) -> net_policy::Client {
    scope.st.audit_chain("", &scope.chain(), "netpolicy.narrow", "NetPolicy", "readOnly", Ok(()), "read only");
    make_policy(scope, inner, bounds)
}

fn make_policy(scope: &Scope, inner: net_policy::Client, bounds: Bounds) -> net_policy::Client {
    let mut set = scope.st.narrow_policies.borrow_mut();
    set.gc();
    set.new_client(ReadOnlyNetPolicy { scope: scope.clone(), inner, bounds })
}

impl ReadOnlyNetPolicy {
    /// The grant this view is bound to, if shared.
    pub fn grant(&self) -> Option<Rc<GrantNode>> {
        self.scope.grant.clone()
    }

    /// What it allows, for people.
    pub fn describe(&self) -> String {
        "netpolicy: read only".into()
    }

    /// The same view bound to `grant` (same bounds).
    pub fn rebind(&self, grant: &Rc<GrantNode>) -> net_policy::Client {
        make_policy(&self.scope.clone().with_grant(Some(grant.clone())), self.inner.clone(), self.bounds.clone())
    }

    fn call(&self, method: &str) -> CvResult<()> {
        self.bounds.admit(&self.scope, |e| view_denied(&self.scope, "netpolicy", "NetPolicy", method, e))
    }
}

impl net_policy::Server for ReadOnlyNetPolicy {
    async fn get(
        self: CapRc<Self>,
        _: net_policy::GetParams,
        mut results: net_policy::GetResults,
    ) -> capnp::Result<()> {
        self.call("get")?;
        // `inner` is the session's own wrapper: its answer is already
        // rebuilt field by field.
        let resp = self.scope.forward(self.inner.get_request().send().promise).await?;
        results.get().set_rules(resp.get()?.get_rules()?)?;
        Ok(())
    }

    async fn set(self: CapRc<Self>, _: net_policy::SetParams, _: net_policy::SetResults) -> capnp::Result<()> {
        self.call("set")?;
        let e = CvError::denied("this cap may only read the rules");
        Err(view_denied(&self.scope, "netpolicy", "NetPolicy", "set", e).into())
    }

    async fn read_only(
        self: CapRc<Self>,
        params: net_policy::ReadOnlyParams,
        mut results: net_policy::ReadOnlyResults,
    ) -> capnp::Result<()> {
        self.call("readOnly")?;
        let p = params.get()?;
        let bounds = self.bounds.then(p.get_expires_at_ms(), p.get_call_budget());
        results.get().set_policy(make_policy(&self.scope, self.inner.clone(), bounds));
        Ok(())
    }
}
