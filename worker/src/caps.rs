//! `Session`, `CapSet` and the broker-facing `Worker`.

use crate::state::SessionState;
use crate::vms::{revoke_session, VmFactoryImpl};
use crate::wrap::{AccountsWrapper, Scope};
use capnp::capability::Rc as CapRc;
use capnp::traits::HasTypeId;
use capvisor_rpc::error::text;
use capvisor_rpc::schema::capvisor_capnp::{
    accounts, approvals, audit, cap_set, net_log, net_policy, secrets, session, vm_factory, volumes,
};
use capvisor_rpc::schema::common_capnp::ErrorCode;
use capvisor_rpc::schema::internal_capnp::{worker, RevokeReason};
use capvisor_rpc::{CvError, CvResult};
use std::rc::Rc;

/// `Session`: the root of what one login holds.
pub struct SessionImpl {
    /// The session this cap belongs to: its context, VMs and revocation
    /// flag (every call checks it first).
    pub st: Rc<SessionState>,
}

impl session::Server for SessionImpl {
    async fn info(self: CapRc<Self>, _: session::InfoParams, mut results: session::InfoResults) -> capnp::Result<()> {
        self.st.check()?;
        let ctx = &self.st.ctx;
        let mut i = results.get().init_info();
        i.set_session_id(ctx.session_id.as_str());
        ctx.principal.write_to(i.reborrow().init_principal());
        i.set_profile(ctx.profile.as_str());
        i.set_expires_at_ms(ctx.expires_at_ms);
        Ok(())
    }

    async fn cap_set(
        self: CapRc<Self>,
        _: session::CapSetParams,
        mut results: session::CapSetResults,
    ) -> capnp::Result<()> {
        self.st.check()?;
        results.get().set_cap_set(capnp_rpc::new_client(CapSetImpl { st: self.st.clone() }));
        Ok(())
    }

    async fn logout(self: CapRc<Self>, _: session::LogoutParams, _: session::LogoutResults) -> capnp::Result<()> {
        self.st.check()?;
        revoke_session(&self.st, RevokeReason::Logout).await;
        Ok(())
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
        _ => None,
    }
}

/// `CapSet`: the session's named capabilities, exactly as its bundle lists.
pub struct CapSetImpl {
    /// The session this cap belongs to: its context, VMs and revocation
    /// flag (every call checks it first).
    pub st: Rc<SessionState>,
}

impl CapSetImpl {
    fn lookup(&self, name: &str, interface_id: u64) -> CvResult<capnp::capability::Client> {
        self.st.check()?;
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
            "netlog" => {
                let proxy = crate::proxy::ensure(&self.st)?;
                let inner = proxy.proxy.log_request().send().pipeline.get_log();
                let scope = Scope::session(&self.st);
                capnp_rpc::new_client::<net_log::Client, _>(crate::wrap::NetLogWrapper { scope, inner }).client
            }
            "approvals" => {
                let proxy = crate::proxy::ensure(&self.st)?;
                let inner = proxy.proxy.approvals_request().send().pipeline.get_approvals();
                let scope = Scope::session(&self.st);
                capnp_rpc::new_client::<approvals::Client, _>(crate::wrap::ApprovalsWrapper { scope, inner }).client
            }
            "secrets" => {
                capnp_rpc::new_client::<secrets::Client, _>(crate::secrets::SecretsImpl { st: self.st.clone() }).client
            }
            "audit" => {
                capnp_rpc::new_client::<audit::Client, _>(crate::audit::AuditImpl { st: self.st.clone() }).client
            }
            _ => unreachable!("cap_interface covers every name"),
        })
    }
}

impl cap_set::Server for CapSetImpl {
    async fn list(self: CapRc<Self>, _: cap_set::ListParams, mut results: cap_set::ListResults) -> capnp::Result<()> {
        self.st.check()?;
        let bundle = &self.st.ctx.bundle;
        let known: Vec<_> = bundle.caps.iter().filter_map(|n| cap_interface(n).map(|c| (n, c))).collect();
        let mut list = results.get().init_entries(known.len() as u32);
        for (i, (name, (iid, iname))) in known.into_iter().enumerate() {
            let mut e = list.reborrow().get(i as u32);
            e.set_name(name.as_str());
            e.set_interface_id(iid);
            e.set_interface_name(iname);
            let desc = capvisor_manifest::KNOWN_CAPS.iter().find(|(k, _)| k == name).map(|(_, d)| *d).unwrap_or("");
            e.set_description(desc);
        }
        Ok(())
    }

    async fn get(self: CapRc<Self>, params: cap_set::GetParams, mut results: cap_set::GetResults) -> capnp::Result<()> {
        let p = params.get()?;
        let name = text(p.get_cap_name())?;
        let res = self.lookup(&name, p.get_interface_id());
        match &res {
            Ok(_) => self.st.audit("capset.get", &name, "get", Ok(()), ""),
            Err(e) => self.st.audit("capset.get", &name, "get", Err(e), &e.message),
        }
        results.get().init_cap().set_as_capability(res?.hook);
        Ok(())
    }
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
        results.get().set_session(capnp_rpc::new_client(SessionImpl { st: self.st.clone() }));
        Ok(())
    }

    async fn revoke(self: CapRc<Self>, params: worker::RevokeParams, _: worker::RevokeResults) -> capnp::Result<()> {
        let reason = params.get()?.get_reason().unwrap_or(RevokeReason::Revoked);
        revoke_session(&self.st, reason).await;
        Ok(())
    }
}
