//! Grants: narrowed caps handed to someone else (issue 10, item 2;
//! docs/decisions.md "Delegation: grants served by the grantor's worker").
//!
//! A grant is a [`GrantNode`] in the grantor session's worker: the caps it
//! shares (each bound to the node), its label, expiry and parent (the grant
//! it was made through, for a holder sharing onward). The nodes form one
//! tree per session, rooted at the session itself; [`revoke`] marks a node
//! and every node under it, which fails every later call through their
//! caps and cuts every call in flight with `staleSession`
//! ([`crate::wrap::Scope::forward`] waits on [`GrantNode::revoked`]), and
//! kills the guest processes started through them. Expiry does the same
//! through a timer. The broker keeps only the grant's token hash
//! (`SessionHost.addGrant`) and forgets it when told (`endGrants`) or when
//! the session ends: a grant never outlives the worker that serves it.
//!
//! Who can call what: `Shares` is in a session's CapSet when its bundle
//! names "shares"; a delegate session holds it only when its grant allows
//! resharing, and then sees and revokes only the grants made through its
//! own. Only narrowed caps of this session can be shared
//! ([`crate::narrow::NarrowVm`], recognised through the session's
//! `CapabilityServerSet`), so a share never allows more than its
//! narrowing, and a holder can only share narrower caps of its own grant.

use crate::state::SessionState;
use capnp::capability::Rc as CapRc;
use capnp::traits::HasTypeId;
use capvisor_rpc::error::text;
use capvisor_rpc::schema::capvisor_capnp::{grant_info, net_log, net_policy, shares, vm, vm_factory, volumes};
use capvisor_rpc::schema::common_capnp::process;
use capvisor_rpc::{CvError, CvResult};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// Most grants (live or ended, not yet pruned) one session keeps.
pub const MAX_GRANTS: usize = 256;
/// Most caps one grant shares.
pub const MAX_SHARED_CAPS: usize = 16;
/// Longest grant label, bytes.
pub const MAX_LABEL: usize = 128;
/// Shortest grant lifetime, milliseconds.
pub const MIN_TTL_MS: i64 = 1000;
/// Guest processes remembered per grant, to kill on revocation (the
/// oldest finished ones are dropped first).
pub const MAX_TRACKED_PROCS: usize = 256;

/// One cap a grant shares, as the recipient's CapSet lists it.
#[derive(Clone)]
pub struct SharedEntry {
    /// Entry name in the recipient's CapSet.
    pub name: String,
    /// Its interface id.
    pub interface_id: u64,
    /// Its interface name (e.g. `"Vm"`).
    pub interface_name: &'static str,
    /// The cap, bound to the grant.
    pub client: capnp::capability::Client,
    /// Its narrowing, for people.
    pub what: String,
}

/// One grant (see the module docs).
pub struct GrantNode {
    /// `g` + 16 hex digits; not a credential.
    pub id: String,
    /// What its creator called it.
    pub label: String,
    /// The grant it was made through (`None`: made by the session itself).
    pub parent: Option<Rc<GrantNode>>,
    /// `""` for a token grant, else the recipient principal.
    pub to: String,
    /// Whether the recipient may share onward.
    pub reshare: bool,
    /// Unix epoch ms.
    pub created_at_ms: i64,
    /// Unix epoch ms; never later than the parent's or the session's.
    pub expires_at_ms: i64,
    /// The shared caps (set once, right after the node is made).
    pub caps: RefCell<Vec<SharedEntry>>,
    revoked: tokio::sync::watch::Sender<bool>,
    /// Last call through its caps, Unix epoch ms (0: none).
    pub last_used_ms: Cell<i64>,
    /// Calls through its caps.
    pub calls: Cell<u64>,
    /// Times it was redeemed (`Worker.delegate`).
    pub redeemed: Cell<u32>,
    /// Caps its delegate sessions kept (`CapSet.keep`).
    pub kept: crate::caps::Kept,
    procs: RefCell<Vec<process::Client>>,
}

impl GrantNode {
    fn new(label: String, parent: Option<Rc<GrantNode>>, to: String, reshare: bool, expires_at_ms: i64) -> Rc<Self> {
        let (revoked, _) = tokio::sync::watch::channel(false);
        Rc::new(Self {
            id: format!("g{}", hex::encode(rand::random::<[u8; 8]>())),
            label,
            parent,
            to,
            reshare,
            created_at_ms: capvisor_rpc::now_ms(),
            expires_at_ms,
            caps: RefCell::new(Vec::new()),
            revoked,
            last_used_ms: Cell::new(0),
            calls: Cell::new(0),
            redeemed: Cell::new(0),
            kept: Default::default(),
            procs: RefCell::new(Vec::new()),
        })
    }

    /// Whether this grant or one it was made through is revoked or expired.
    pub fn is_ended(&self) -> bool {
        let now = capvisor_rpc::now_ms();
        let mut at = Some(self);
        while let Some(g) = at {
            if *g.revoked.borrow() || now >= g.expires_at_ms {
                return true;
            }
            at = g.parent.as_deref();
        }
        false
    }

    /// `staleSession` once the grant (or one above it) ended.
    pub fn check(&self) -> CvResult<()> {
        if self.is_ended() {
            return Err(CvError::stale());
        }
        Ok(())
    }

    /// Resolves once this grant is marked revoked ([`revoke`] marks every
    /// grant under a revoked one, and expiry marks through a timer).
    pub async fn revoked(&self) {
        let mut rx = self.revoked.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Counts one call through this grant (and the ones it was made through).
    pub fn touch(&self) {
        let now = capvisor_rpc::now_ms();
        let mut at = Some(self);
        while let Some(g) = at {
            g.calls.set(g.calls.get() + 1);
            g.last_used_ms.set(now);
            at = g.parent.as_deref();
        }
    }

    /// The delegation chain, outermost grant first, ending in this one:
    /// `(id, label)` pairs.
    pub fn chain(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut at = Some(self);
        while let Some(g) = at {
            out.push((g.id.clone(), g.label.clone()));
            at = g.parent.as_deref();
        }
        out.reverse();
        out
    }

    /// Whether `ancestor` is this grant or one it was made through.
    pub fn descends_from(&self, ancestor: &GrantNode) -> bool {
        let mut at = Some(self);
        while let Some(g) = at {
            if std::ptr::eq(g, ancestor) {
                return true;
            }
            at = g.parent.as_deref();
        }
        false
    }

    /// Remembers a guest process started through this grant, so revoking
    /// it kills the process.
    pub fn track_process(&self, p: process::Client) {
        let mut procs = self.procs.borrow_mut();
        if procs.len() >= MAX_TRACKED_PROCS {
            procs.remove(0);
        }
        procs.push(p);
    }

    fn mark(&self) -> bool {
        self.revoked.send_if_modified(|r| !std::mem::replace(r, true))
    }

    fn write_info(&self, mut b: grant_info::Builder<'_>) {
        b.set_id(self.id.as_str());
        b.set_label(self.label.as_str());
        let caps = self.caps.borrow();
        let mut list = b.reborrow().init_caps(caps.len() as u32);
        for (i, c) in caps.iter().enumerate() {
            let mut e = list.reborrow().get(i as u32);
            e.set_name(c.name.as_str());
            e.set_interface_id(c.interface_id);
            e.set_interface_name(c.interface_name);
            e.set_description(c.what.as_str());
        }
        let what: Vec<String> = caps.iter().map(|c| format!("{}: {}", c.name, c.what)).collect();
        b.set_what(what.join("; ").as_str());
        b.set_to(self.to.as_str());
        b.set_parent(self.parent.as_ref().map(|p| p.id.as_str()).unwrap_or(""));
        b.set_created_at_ms(self.created_at_ms);
        b.set_expires_at_ms(self.expires_at_ms);
        b.set_last_used_ms(self.last_used_ms.get());
        b.set_calls(self.calls.get());
        b.set_redeemed(self.redeemed.get());
        b.set_revoked(self.is_ended());
    }
}

/// Revokes grant `id` of session `st` and every grant made through it:
/// marks them (calls in flight end with `staleSession`), kills the guest
/// processes started through them, and tells the broker, which forgets
/// their tokens and audits `grant.revoke` (or `grant.expire` when `reason`
/// is `"expired"`). Returns the ids it ended (empty: nothing live).
pub fn revoke(st: &Rc<SessionState>, id: &str, reason: &str) -> Vec<String> {
    let Some(root) = st.grants.borrow().get(id).cloned() else { return Vec::new() };
    let hit: Vec<Rc<GrantNode>> = st.grants.borrow().values().filter(|g| g.descends_from(&root)).cloned().collect();
    let mut ended = Vec::new();
    for g in hit {
        if g.mark() {
            ended.push(g.id.clone());
            for p in g.procs.borrow_mut().drain(..) {
                let mut req = p.kill_request();
                req.get().set_signal(9);
                tokio::task::spawn_local(async move {
                    let _ = req.send().promise.await;
                });
            }
            g.kept.clear();
        }
    }
    if !ended.is_empty() {
        let mut req = st.host.end_grants_request();
        {
            let mut list = req.get().init_grant_ids(ended.len() as u32);
            for (i, g) in ended.iter().enumerate() {
                list.set(i as u32, g.as_str());
            }
        }
        req.get().set_reason(reason);
        tokio::task::spawn_local(async move {
            if let Err(e) = req.send().promise.await {
                tracing::warn!("broker not told of ended grants: {e}");
            }
        });
    }
    ended
}

/// Drops the oldest ended grants while the session holds more than
/// [`MAX_GRANTS`] - 1 (room for one more).
fn prune(st: &SessionState) {
    let mut grants = st.grants.borrow_mut();
    while grants.len() >= MAX_GRANTS {
        let oldest = grants.values().filter(|g| g.is_ended()).min_by_key(|g| g.created_at_ms).map(|g| g.id.clone());
        match oldest {
            Some(id) => {
                grants.remove(&id);
            }
            None => break,
        }
    }
}

/// Checks a CapSet entry name: `[a-z][a-z0-9_-]{0,31}`.
pub fn valid_cap_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_')
}

/// Reads a `to` principal: `""`, `method:name`, or a bare name meaning
/// `local:name`.
fn read_to(to: &str) -> CvResult<String> {
    if to.is_empty() {
        return Ok(String::new());
    }
    let (method, name) = to.split_once(':').unwrap_or(("local", to));
    if capvisor_rpc::principal::parse_method(method).is_none() || name.is_empty() || name.len() > 64 {
        return Err(CvError::invalid(format!("to: {to:?} is not a principal (e.g. \"alice\" or \"password:bob\")")));
    }
    Ok(format!("{method}:{name}"))
}

/// `Shares` (schema capvisor.capnp): make, list and revoke grants.
pub struct SharesImpl {
    /// The grantor session.
    pub st: Rc<SessionState>,
    /// For a delegate session: its grant (it sees and makes grants under
    /// it only).
    pub grant: Option<Rc<GrantNode>>,
}

impl SharesImpl {
    fn check(&self) -> CvResult<()> {
        self.st.check()?;
        if let Some(g) = &self.grant {
            g.check()?;
        }
        Ok(())
    }

    fn visible(&self, g: &GrantNode) -> bool {
        match &self.grant {
            None => true,
            Some(mine) => !std::ptr::eq(g, &**mine) && g.descends_from(mine),
        }
    }

    async fn do_share(
        &self,
        spec: capvisor_rpc::schema::capvisor_capnp::share_spec::Reader<'_>,
    ) -> CvResult<(Rc<GrantNode>, String)> {
        self.check()?;
        let label = text(spec.get_label()).map_err(|_| CvError::invalid("label: not UTF-8 text"))?;
        if label.len() > MAX_LABEL || label.chars().any(char::is_control) {
            return Err(CvError::invalid(format!("label: at most {MAX_LABEL} bytes, no control characters")));
        }
        let ttl = spec.get_ttl_ms();
        if ttl < MIN_TTL_MS {
            return Err(CvError::invalid(format!("ttl: at least {MIN_TTL_MS} ms")));
        }
        let to = read_to(&text(spec.get_to()).map_err(|_| CvError::invalid("to: not UTF-8 text"))?)?;
        let caps = spec.get_caps().map_err(|e| CvError::invalid(format!("caps: {e}")))?;
        if caps.is_empty() || caps.len() as usize > MAX_SHARED_CAPS {
            return Err(CvError::invalid(format!("caps: 1 to {MAX_SHARED_CAPS}")));
        }
        // Find each cap's server in this session; every one must be a
        // narrowed cap of this session, all under one grant (or none).
        let mut found = Vec::new();
        for c in caps.iter() {
            let name = text(c.get_name()).map_err(|_| CvError::invalid("cap name: not UTF-8 text"))?;
            if !valid_cap_name(&name) {
                return Err(CvError::invalid(format!("cap name {name:?}: want [a-z][a-z0-9_-]{{0,31}}")));
            }
            if found.iter().any(|(n, _)| *n == name) {
                return Err(CvError::invalid(format!("cap name {name:?} given twice")));
            }
            let client: capnp::capability::Client = c
                .get_cap()
                .get_as_capability()
                .map_err(|e| CvError::invalid(format!("cap {name:?}: not a capability ({e})")))?;
            let Some(server) = Shareable::find(&self.st, client).await else {
                return Err(CvError::invalid(format!(
                    "cap {name:?} is not a narrowed cap of this session: narrow it first (Vm.narrow, VmFactory.narrow)"
                )));
            };
            found.push((name, server));
        }
        let bound = found[0].1.grant();
        if found.iter().any(|(_, s)| !same(&s.grant(), &bound)) {
            return Err(CvError::invalid("caps: all from the same grant (or none)"));
        }
        if let Some(mine) = &self.grant {
            if !bound.as_ref().is_some_and(|b| b.descends_from(mine)) {
                return Err(CvError::denied("a delegate session shares only caps of its own grant"));
            }
        }
        let parent = bound.or_else(|| self.grant.clone());
        let mut expires = capvisor_rpc::now_ms().saturating_add(ttl).min(self.st.ctx.expires_at_ms);
        if let Some(p) = &parent {
            p.check()?;
            expires = expires.min(p.expires_at_ms);
        }
        prune(&self.st);
        let live = self.st.grants.borrow().values().filter(|g| !g.is_ended()).count();
        if live >= MAX_GRANTS {
            return Err(CvError::quota(format!("this session already has {MAX_GRANTS} live grants")));
        }
        let node = GrantNode::new(label, parent, to.clone(), spec.get_reshare(), expires);
        let entries: Vec<SharedEntry> = found
            .iter()
            .map(|(name, s)| {
                let (interface_id, interface_name, client) = s.rebind(&node);
                SharedEntry { name: name.clone(), interface_id, interface_name, client, what: s.describe() }
            })
            .collect();
        *node.caps.borrow_mut() = entries;
        let mut req = self.st.host.add_grant_request();
        {
            let mut r = req.get();
            r.set_grant_id(node.id.as_str());
            r.set_label(node.label.as_str());
            r.set_expires_at_ms(node.expires_at_ms);
            r.set_to(to.as_str());
            let chain = node.chain();
            let mut list = r.reborrow().init_chain(chain.len() as u32);
            for (i, (id, label)) in chain.iter().enumerate() {
                let mut e = list.reborrow().get(i as u32);
                e.set_id(id.as_str());
                e.set_label(label.as_str());
            }
            let what: Vec<String> = node.caps.borrow().iter().map(|c| format!("{}: {}", c.name, c.what)).collect();
            r.set_what(what.join("; ").as_str());
        }
        let resp = req.send().promise.await.map_err(|e| crate::wrap::relay(e, false))?;
        let token = resp.get().and_then(|r| text(r.get_token())).map_err(|e| crate::wrap::relay(e, false))?;
        self.st.grants.borrow_mut().insert(node.id.clone(), node.clone());
        // Expiry ends the grant like a revocation (calls in flight too).
        let st = Rc::downgrade(&self.st);
        let (id, wait) = (node.id.clone(), (node.expires_at_ms - capvisor_rpc::now_ms()).max(0) as u64);
        tokio::task::spawn_local(async move {
            tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
            if let Some(st) = st.upgrade() {
                revoke(&st, &id, "expired");
            }
        });
        Ok((node, token))
    }
}

/// A narrowed cap of this session that can be shared: the server object
/// behind a cap passed to `Shares.share`, recognised through the session's
/// `CapabilityServerSet`s.
enum Shareable {
    Vm(Rc<crate::narrow::NarrowVm>),
    Factory(Rc<crate::narrow_vms::NarrowFactory>),
    Log(Rc<crate::narrow_net::NarrowNetLog>),
    Policy(Rc<crate::narrow_net::ReadOnlyNetPolicy>),
    Volumes(Rc<crate::volumes::VolumesView>),
}

impl Shareable {
    /// The narrowed cap of session `st` behind `client`, if it is one.
    async fn find(st: &SessionState, client: capnp::capability::Client) -> Option<Shareable> {
        use capnp::capability::FromClientHook;
        let resolved = capnp::capability::get_resolved_cap(client).await;
        let as_vm = vm::Client::new(resolved.hook.add_ref());
        if let Some(s) = st.narrow_vms.borrow().get_local_server_of_resolved(&as_vm) {
            return Some(Shareable::Vm(s));
        }
        let as_factory = vm_factory::Client::new(resolved.hook.add_ref());
        if let Some(s) = st.narrow_factories.borrow().get_local_server_of_resolved(&as_factory) {
            return Some(Shareable::Factory(s));
        }
        let as_log = net_log::Client::new(resolved.hook.add_ref());
        if let Some(s) = st.narrow_logs.borrow().get_local_server_of_resolved(&as_log) {
            return Some(Shareable::Log(s));
        }
        let as_policy = net_policy::Client::new(resolved.hook.add_ref());
        if let Some(s) = st.narrow_policies.borrow().get_local_server_of_resolved(&as_policy) {
            return Some(Shareable::Policy(s));
        }
        let as_volumes = volumes::Client::new(resolved.hook);
        st.narrow_volumes.borrow().get_local_server_of_resolved(&as_volumes).map(Shareable::Volumes)
    }

    fn grant(&self) -> Option<Rc<GrantNode>> {
        match self {
            Shareable::Vm(v) => v.grant(),
            Shareable::Factory(f) => f.grant(),
            Shareable::Log(l) => l.grant(),
            Shareable::Policy(p) => p.grant(),
            Shareable::Volumes(v) => v.grant(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Shareable::Vm(v) => v.describe(),
            Shareable::Factory(f) => f.describe(),
            Shareable::Log(l) => l.describe(),
            Shareable::Policy(p) => p.describe(),
            Shareable::Volumes(v) => v.describe(),
        }
    }

    /// The same cap bound to `grant`: (interface id, interface name, cap).
    fn rebind(&self, grant: &Rc<GrantNode>) -> (u64, &'static str, capnp::capability::Client) {
        match self {
            Shareable::Vm(v) => (vm::Client::TYPE_ID, "Vm", v.rebind(grant).client),
            Shareable::Factory(f) => (vm_factory::Client::TYPE_ID, "VmFactory", f.rebind(grant).client),
            Shareable::Log(l) => (net_log::Client::TYPE_ID, "NetLog", l.rebind(grant).client),
            Shareable::Policy(p) => (net_policy::Client::TYPE_ID, "NetPolicy", p.rebind(grant).client),
            Shareable::Volumes(v) => (volumes::Client::TYPE_ID, "Volumes", v.rebind(grant).client),
        }
    }
}

fn same(a: &Option<Rc<GrantNode>>, b: &Option<Rc<GrantNode>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Rc::ptr_eq(a, b),
        _ => false,
    }
}

impl shares::Server for SharesImpl {
    async fn share(
        self: CapRc<Self>,
        params: shares::ShareParams,
        mut results: shares::ShareResults,
    ) -> capnp::Result<()> {
        let (node, token) = self.do_share(params.get()?.get_spec()?).await?;
        let mut r = results.get();
        node.write_info(r.reborrow().init_grant());
        r.set_token(token.as_str());
        Ok(())
    }

    async fn list(self: CapRc<Self>, _: shares::ListParams, mut results: shares::ListResults) -> capnp::Result<()> {
        self.check()?;
        let mut mine: Vec<Rc<GrantNode>> =
            self.st.grants.borrow().values().filter(|g| self.visible(g)).cloned().collect();
        mine.sort_by_key(|g| std::cmp::Reverse(g.created_at_ms));
        let mut list = results.get().init_grants(mine.len() as u32);
        for (i, g) in mine.iter().enumerate() {
            g.write_info(list.reborrow().get(i as u32));
        }
        Ok(())
    }

    async fn revoke(self: CapRc<Self>, params: shares::RevokeParams, _: shares::RevokeResults) -> capnp::Result<()> {
        self.check()?;
        let id = text(params.get()?.get_grant_id())?;
        let g = self.st.grants.borrow().get(&id).cloned();
        match g {
            Some(g) if self.visible(&g) => {
                revoke(&self.st, &id, "revoked");
                Ok(())
            }
            _ => Err(CvError::not_found(format!("no grant {id:?} of this session")).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_names_and_principals() {
        for ok in ["box", "a", "vm-1", "my_vm", "x0123456789012345678901234567890"] {
            assert!(valid_cap_name(ok), "{ok}");
        }
        for bad in ["", "Box", "1vm", "-x", "a.b", "x01234567890123456789012345678901", "a b"] {
            assert!(!valid_cap_name(bad), "{bad}");
        }
        assert_eq!(read_to("").unwrap(), "");
        assert_eq!(read_to("alice").unwrap(), "local:alice");
        assert_eq!(read_to("password:bob").unwrap(), "password:bob");
        assert!(read_to("grant:g1").is_err(), "a grant is not a recipient");
        assert!(read_to("kerberos:x").is_err());
        assert!(read_to("local:").is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_chain_ends_with_its_root_and_revocation_marks_once() {
        let root = GrantNode::new("outer".into(), None, String::new(), true, i64::MAX);
        let child = GrantNode::new("inner".into(), Some(root.clone()), String::new(), false, i64::MAX);
        let ids: Vec<String> = child.chain().into_iter().map(|(_, l)| l).collect();
        assert_eq!(ids, ["outer", "inner"]);
        assert!(child.descends_from(&root) && child.descends_from(&child) && !root.descends_from(&child));
        assert!(child.check().is_ok());
        child.touch();
        assert_eq!((root.calls.get(), child.calls.get()), (1, 1));
        assert!(root.mark());
        assert!(!root.mark(), "marking twice reports once");
        assert!(child.is_ended(), "a grant under a revoked one is ended");
        assert_eq!(child.check().unwrap_err().code, capvisor_rpc::schema::common_capnp::ErrorCode::StaleSession);
        let expired = GrantNode::new("old".into(), None, String::new(), false, capvisor_rpc::now_ms() - 1);
        assert!(expired.is_ended());
        // revoked() resolves at once once marked.
        tokio::time::timeout(std::time::Duration::from_secs(1), root.revoked()).await.unwrap();
    }
}
