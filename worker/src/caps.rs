//! `Session`, `CapSet` and the broker-facing `Worker`.

use crate::grants::{GrantNode, SharesImpl};
use crate::state::SessionState;
use crate::vms::{revoke_session, VmFactoryImpl};
use crate::wrap::relay;
use crate::wrap::{AccountsWrapper, Scope};
use capnp::capability::Rc as CapRc;
use capnp::traits::HasTypeId;
use capvisor_rpc::error::text;
use capvisor_rpc::principal::Principal;
use capvisor_rpc::schema::capvisor_capnp::{
    accounts, approvals, audit, cap_set, net_log, net_policy, secrets, session, shares, vm_factory, volumes, AuthMethod,
};
use capvisor_rpc::schema::common_capnp::ErrorCode;
use capvisor_rpc::schema::internal_capnp::{worker, RevokeReason};
use capvisor_rpc::{CvError, CvResult};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

/// `Session`: the root of what one login holds.
pub struct SessionImpl {
    /// The session this cap belongs to: its context, VMs and revocation
    /// flag (every call checks it first).
    pub st: Rc<SessionState>,
    /// For a delegate session (`Gateway.redeem`): the grant it holds.
    pub grant: Option<Rc<GrantNode>>,
}

impl SessionImpl {
    fn check(&self) -> CvResult<()> {
        self.st.check()?;
        match &self.grant {
            Some(g) => g.check(),
            None => Ok(()),
        }
    }
}

/// The profile name of a delegate session.
pub const DELEGATE_PROFILE: &str = "delegate";

impl session::Server for SessionImpl {
    async fn info(self: CapRc<Self>, _: session::InfoParams, mut results: session::InfoResults) -> capnp::Result<()> {
        self.check()?;
        let ctx = &self.st.ctx;
        let mut i = results.get().init_info();
        i.set_session_id(ctx.session_id.as_str());
        match &self.grant {
            None => {
                ctx.principal.write_to(i.reborrow().init_principal());
                i.set_profile(ctx.profile.as_str());
                i.set_expires_at_ms(ctx.expires_at_ms);
            }
            Some(g) => {
                Principal::new(AuthMethod::Grant, g.id.as_str()).write_to(i.reborrow().init_principal());
                i.set_profile(DELEGATE_PROFILE);
                i.set_expires_at_ms(g.expires_at_ms);
            }
        }
        Ok(())
    }

    async fn cap_set(
        self: CapRc<Self>,
        _: session::CapSetParams,
        mut results: session::CapSetResults,
    ) -> capnp::Result<()> {
        self.check()?;
        results.get().set_cap_set(capnp_rpc::new_client(CapSetImpl { st: self.st.clone(), grant: self.grant.clone() }));
        Ok(())
    }

    /// Ends the session. For a delegate session nothing of the grantor's
    /// ends: the client forgets its resume token, which stays valid until
    /// the grant ends (revoke it with `Shares.revoke`).
    async fn logout(self: CapRc<Self>, _: session::LogoutParams, _: session::LogoutResults) -> capnp::Result<()> {
        self.check()?;
        if self.grant.is_none() {
            revoke_session(&self.st, RevokeReason::Logout).await;
        }
        Ok(())
    }
}

/// One cap of a grant made to this session's principal
/// ([`CapSetImpl`]'s `received`).
struct Received {
    shown: String,
    orig: String,
    interface_id: u64,
    interface_name: String,
    description: String,
    cap_set: cap_set::Client,
}

/// Most caps one CapSet keeps by name (`CapSet.keep`).
pub const MAX_KEPT: usize = 256;

/// Caps kept by name (`CapSet.keep`): name -> (interface id the keeper
/// claimed, cap).
#[derive(Default)]
pub struct Kept(RefCell<BTreeMap<String, (u64, capnp::capability::Client)>>);

impl Kept {
    /// The cap kept under `name`, with its claimed interface id.
    pub fn get(&self, name: &str) -> Option<(u64, capnp::capability::Client)> {
        self.0.borrow().get(name).cloned()
    }

    /// Forgets every kept cap (the session or grant ended).
    pub fn clear(&self) {
        self.0.borrow_mut().clear();
    }

    fn names(&self) -> Vec<(String, u64)> {
        self.0.borrow().iter().map(|(n, (i, _))| (n.clone(), *i)).collect()
    }
}

/// The capabilities a bundle can name, with their interface ids.
pub fn cap_interface(name: &str) -> Option<(u64, &'static str)> {
    match name {
        "vms" => Some((vm_factory::Client::TYPE_ID, "VmFactory")),
        "accounts" => Some((accounts::Client::TYPE_ID, "Accounts")),
        "volumes" => Some((volumes::Client::TYPE_ID, "Volumes")),
        "netpolicy" => Some((net_policy::Client::TYPE_ID, "NetPolicy")),
        "netlog" => Some((net_log::Client::TYPE_ID, "NetLog")),
        "approvals" => Some((approvals::Client::TYPE_ID, "Approvals")),
        "secrets" => Some((secrets::Client::TYPE_ID, "Secrets")),
        "audit" => Some((audit::Client::TYPE_ID, "Audit")),
        "shares" => Some((shares::Client::TYPE_ID, "Shares")),
        _ => None,
    }
}

/// `CapSet`: the session's named capabilities, exactly as its bundle lists.
pub struct CapSetImpl {
    /// The session this cap belongs to: its context, VMs and revocation
    /// flag (every call checks it first).
    pub st: Rc<SessionState>,
    /// For a delegate session: the grant whose caps it holds (and nothing
    /// of the bundle).
    pub grant: Option<Rc<GrantNode>>,
}

impl CapSetImpl {
    fn check(&self) -> CvResult<()> {
        self.st.check()?;
        match &self.grant {
            Some(g) => g.check(),
            None => Ok(()),
        }
    }

    fn kept(&self) -> &Kept {
        match &self.grant {
            Some(g) => &g.kept,
            None => &self.st.kept,
        }
    }

    /// The fixed entries: the bundle's caps, or a grant's (plus "shares"
    /// when it may reshare): (name, interface id, interface name, description).
    fn fixed(&self) -> Vec<(String, u64, &'static str, String)> {
        let desc = |n: &str| capvisor_manifest::KNOWN_CAPS.iter().find(|(k, _)| *k == n).map(|(_, d)| *d).unwrap_or("");
        match &self.grant {
            None => self
                .st
                .ctx
                .bundle
                .caps
                .iter()
                .filter_map(|n| cap_interface(n).map(|(iid, iname)| (n.clone(), iid, iname, desc(n).to_string())))
                .collect(),
            Some(g) => {
                let mut v: Vec<_> = g
                    .caps
                    .borrow()
                    .iter()
                    .map(|c| (c.name.clone(), c.interface_id, c.interface_name, format!("shared: {}", c.what)))
                    .collect();
                if g.reshare && !v.iter().any(|e| e.0 == "shares") {
                    v.push(("shares".into(), shares::Client::TYPE_ID, "Shares", desc("shares").to_string()));
                }
                v
            }
        }
    }

    /// The caps of grants made to this session's principal (`--to`), as
    /// they appear in its CapSet: a name taken by the bundle, a kept cap
    /// or an earlier grant becomes `NAME-<grant id>`. Only a session's own
    /// CapSet has them (a delegate session holds its grant only).
    async fn received(&self) -> capnp::Result<Vec<Received>> {
        if self.grant.is_some() {
            return Ok(Vec::new());
        }
        let resp = self.st.host.received_grants_request().send().promise.await;
        let resp = resp.map_err(|e| capnp::Error::from(relay(e, false)))?;
        let mut taken: Vec<String> = self.fixed().into_iter().map(|e| e.0).collect();
        taken.extend(self.kept().names().into_iter().map(|e| e.0));
        let mut out = Vec::new();
        for g in resp.get()?.get_grants()?.iter() {
            let id = text(g.get_grant_id())?;
            let (label, from) = (text(g.get_label())?, text(g.get_from())?);
            let Ok(session) = g.get_session() else { continue };
            let cs = session.cap_set_request().send().pipeline.get_cap_set();
            let Ok(list) = cs.list_request().send().promise.await else { continue };
            let Ok(entries) = list.get().and_then(|l| l.get_entries()) else { continue };
            for e in entries.iter() {
                let orig = text(e.get_name())?;
                let shown = if taken.contains(&orig) { format!("{orig}-{id}") } else { orig.clone() };
                taken.push(shown.clone());
                let iname = capvisor_schema::reflect::schema()
                    .interface(e.get_interface_id())
                    .map(|i| i.name.clone())
                    .unwrap_or_default();
                out.push(Received {
                    shown,
                    orig,
                    interface_id: e.get_interface_id(),
                    interface_name: iname,
                    description: format!("from {from} (grant {id} {label:?}): {}", text(e.get_description())?),
                    cap_set: cs.clone(),
                });
            }
        }
        Ok(out)
    }

    fn lookup(&self, name: &str, interface_id: u64) -> CvResult<capnp::capability::Client> {
        self.check()?;
        let typed = |iid: u64, iname: &str| -> CvResult<()> {
            if iid != interface_id {
                return Err(CvError::new(
                    ErrorCode::WrongInterface,
                    format!(
                        "capability {name:?} is a {iname} (interface {iid:#018x}), not interface {interface_id:#018x}"
                    ),
                ));
            }
            Ok(())
        };
        if let Some(g) = &self.grant {
            if let Some(c) = g.caps.borrow().iter().find(|c| c.name == name) {
                typed(c.interface_id, c.interface_name)?;
                return Ok(c.client.clone());
            }
            if name == "shares" && g.reshare {
                typed(shares::Client::TYPE_ID, "Shares")?;
                let sh = SharesImpl { st: self.st.clone(), grant: Some(g.clone()) };
                return Ok(capnp_rpc::new_client::<shares::Client, _>(sh).client);
            }
        }
        if let Some((iid, cap)) = self.kept().get(name) {
            typed(iid, "kept capability")?;
            return Ok(cap);
        }
        if self.grant.is_some() {
            return Err(CvError::not_found(format!("this session holds no capability named {name:?}")));
        }
        let bundle = &self.st.ctx.bundle;
        let Some((iid, iname)) = bundle.has_cap(name).then(|| cap_interface(name)).flatten() else {
            return Err(CvError::not_found(format!("this session holds no capability named {name:?}")));
        };
        if iid != interface_id {
            return Err(CvError::new(
                ErrorCode::WrongInterface,
                format!("capability {name:?} is a {iname} (interface {iid:#018x}), not interface {interface_id:#018x}"),
            ));
        }
        Ok(match name {
            "vms" => capnp_rpc::new_client::<vm_factory::Client, _>(VmFactoryImpl { st: self.st.clone() }).client,
            "accounts" => {
                let inner = self.st.host.accounts_request().send().pipeline.get_accounts();
                let scope = Scope::session(&self.st);
                capnp_rpc::new_client::<accounts::Client, _>(AccountsWrapper { scope, inner }).client
            }
            "volumes" => {
                capnp_rpc::new_client::<volumes::Client, _>(crate::volumes::VolumesImpl { st: self.st.clone() }).client
            }
            "netpolicy" => {
                let proxy = crate::proxy::ensure(&self.st)?;
                let inner = proxy.proxy.policy_request().send().pipeline.get_policy();
                let scope = Scope::session(&self.st);
                capnp_rpc::new_client::<net_policy::Client, _>(crate::wrap::NetPolicyWrapper { scope, inner }).client
            }
            "netlog" => crate::vms::session_net_log(&self.st)?.client,
            "approvals" => {
                // Held connections exist only with egress; exec approvals always.
                let inner = match self.st.ctx.net.egress {
                    true => {
                        Some(crate::proxy::ensure(&self.st)?.proxy.approvals_request().send().pipeline.get_approvals())
                    }
                    false => None,
                };
                let scope = Scope::session(&self.st);
                capnp_rpc::new_client::<approvals::Client, _>(crate::wrap::ApprovalsWrapper { scope, inner }).client
            }
            "secrets" => {
                capnp_rpc::new_client::<secrets::Client, _>(crate::secrets::SecretsImpl { st: self.st.clone() }).client
            }
            "audit" => {
                capnp_rpc::new_client::<audit::Client, _>(crate::audit::AuditImpl { st: self.st.clone() }).client
            }
            "shares" => {
                capnp_rpc::new_client::<shares::Client, _>(SharesImpl { st: self.st.clone(), grant: None }).client
            }
            _ => unreachable!("cap_interface covers every name"),
        })
    }
}

impl cap_set::Server for CapSetImpl {
    async fn list(self: CapRc<Self>, _: cap_set::ListParams, mut results: cap_set::ListResults) -> capnp::Result<()> {
        self.check()?;
        let fixed = self.fixed();
        let kept = self.kept().names();
        // Grants made to this principal: listed when the broker answers (a
        // failure there must not hide the session's own caps).
        let received = self.received().await.unwrap_or_else(|e| {
            tracing::warn!("grants made to this principal not listed: {e}");
            Vec::new()
        });
        let mut list = results.get().init_entries((fixed.len() + kept.len() + received.len()) as u32);
        for (i, (name, iid, iname, desc)) in fixed.into_iter().enumerate() {
            let mut e = list.reborrow().get(i as u32);
            e.set_name(name.as_str());
            e.set_interface_id(iid);
            e.set_interface_name(iname);
            e.set_description(desc.as_str());
        }
        let mut base = list.len() - (kept.len() + received.len()) as u32;
        for r in &received {
            let mut e = list.reborrow().get(base);
            e.set_name(r.shown.as_str());
            e.set_interface_id(r.interface_id);
            e.set_interface_name(r.interface_name.as_str());
            e.set_description(r.description.as_str());
            base += 1;
        }
        for (i, (name, iid)) in kept.into_iter().enumerate() {
            let mut e = list.reborrow().get(base + i as u32);
            e.set_name(name.as_str());
            e.set_interface_id(iid);
            let iname = capvisor_schema::reflect::schema().interface(iid).map(|i| i.name.as_str()).unwrap_or("");
            e.set_interface_name(iname);
            e.set_description("kept with CapSet.keep");
            e.set_kept(true);
        }
        Ok(())
    }

    async fn get(self: CapRc<Self>, params: cap_set::GetParams, mut results: cap_set::GetResults) -> capnp::Result<()> {
        let p = params.get()?;
        let name = text(p.get_cap_name())?;
        let iid = p.get_interface_id();
        let mut res = self.lookup(&name, iid);
        if matches!(&res, Err(e) if e.code == ErrorCode::NotFound) && self.grant.is_none() {
            // A grant made to this principal (`--to`), served by the
            // grantor's worker: ask its delegate CapSet.
            if let Some(r) = self.received().await?.into_iter().find(|r| r.shown == name) {
                let mut req = r.cap_set.get_request();
                req.get().set_cap_name(r.orig.as_str());
                req.get().set_interface_id(iid);
                res = Ok(capnp::capability::Client::new(req.send().pipeline.get_cap().as_cap()));
            }
        }
        let chain = self.grant.as_ref().map(|g| g.chain()).unwrap_or_default();
        match &res {
            Ok(_) => self.st.audit_chain("", &chain, "capset.get", &name, "get", Ok(()), ""),
            Err(e) => self.st.audit_chain("", &chain, "capset.get", &name, "get", Err(e), &e.message),
        }
        // A miss answers with a broken cap carrying the typed error rather
        // than failing the call: capnp-rpc 0.27 resolves the pipeline of an
        // answer whose Finish already arrived from its results message even
        // when the call failed (rpc.rs, ResultsDone::from_results_inner), so
        // a pipelined call on a `get` that fails after an await (the
        // received-grants lookup) would see a null capability instead of
        // notFound. Every call on the broken cap fails with the code.
        let cap = match res {
            Ok(cap) => cap,
            Err(e) => capnp_rpc::new_broken_cap(e.into()),
        };
        results.get().init_cap().set_as_capability(cap.hook);
        Ok(())
    }

    async fn keep(self: CapRc<Self>, params: cap_set::KeepParams, _: cap_set::KeepResults) -> capnp::Result<()> {
        self.check()?;
        let p = params.get()?;
        let name = text(p.get_cap_name())?;
        if !crate::grants::valid_cap_name(&name) {
            return Err(CvError::invalid(format!("{name:?}: a kept name is [a-z][a-z0-9_-]{{0,31}}")).into());
        }
        if self.fixed().iter().any(|e| e.0 == name) {
            return Err(
                CvError::new(ErrorCode::AlreadyExists, format!("{name:?} names a capability of this session")).into()
            );
        }
        let cap: capnp::capability::Client = p.get_cap().get_as_capability()?;
        let mut map = self.kept().0.borrow_mut();
        if map.len() >= MAX_KEPT && !map.contains_key(&name) {
            return Err(CvError::quota(format!("at most {MAX_KEPT} kept capabilities")).into());
        }
        map.insert(name, (p.get_interface_id(), cap));
        Ok(())
    }

    async fn drop(self: CapRc<Self>, params: cap_set::DropParams, _: cap_set::DropResults) -> capnp::Result<()> {
        self.check()?;
        let name = text(params.get()?.get_cap_name())?;
        match self.kept().0.borrow_mut().remove(&name) {
            Some(_) => Ok(()),
            None => Err(CvError::not_found(format!("no capability kept under {name:?}")).into()),
        }
    }
}

/// The live grant `id` of this session, counted as redeemed once more.
///
/// Errors: `staleSession` when the session, or the grant, ended or never
/// existed (the same answer in every case).
pub fn delegate_grant(st: &Rc<SessionState>, id: &str) -> CvResult<Rc<GrantNode>> {
    st.check()?;
    let g = st.grants.borrow().get(id).cloned().ok_or_else(CvError::stale)?;
    g.check()?;
    g.redeemed.set(g.redeemed.get() + 1);
    Ok(g)
}

/// `Worker`: the broker's handle on this worker.
pub struct WorkerImpl {
    /// The session this cap belongs to: its context, VMs and revocation
    /// flag (every call checks it first).
    pub st: Rc<SessionState>,
}

impl worker::Server for WorkerImpl {
    async fn session(
        self: CapRc<Self>,
        _: worker::SessionParams,
        mut results: worker::SessionResults,
    ) -> capnp::Result<()> {
        results.get().set_session(capnp_rpc::new_client(SessionImpl { st: self.st.clone(), grant: None }));
        Ok(())
    }

    async fn delegate(
        self: CapRc<Self>,
        params: worker::DelegateParams,
        mut results: worker::DelegateResults,
    ) -> capnp::Result<()> {
        let id = text(params.get()?.get_grant_id())?;
        let g = delegate_grant(&self.st, &id)?;
        results.get().set_session(capnp_rpc::new_client(SessionImpl { st: self.st.clone(), grant: Some(g) }));
        Ok(())
    }

    async fn revoke(self: CapRc<Self>, params: worker::RevokeParams, _: worker::RevokeResults) -> capnp::Result<()> {
        let reason = params.get()?.get_reason().unwrap_or(RevokeReason::Revoked);
        revoke_session(&self.st, reason).await;
        Ok(())
    }
}
