//! The broker's capnp servers: `Broker` (toward the gateway), one
//! `SessionHost` per session (toward its worker) and `Accounts` (handed to
//! workers whose bundle holds "accounts"). Each is a thin shell over
//! [`BrokerService`].

use crate::audit::AuditRecord;
use crate::service::{BrokerService, ServiceRef};
use capnp::capability::Rc as CapRc;
use capvisor_manifest::Bundle;
use capvisor_rpc::schema::capvisor_capnp::accounts;
use capvisor_rpc::schema::internal_capnp::{audit_outcome, broker, session_host};
use capvisor_rpc::CvError;
use std::rc::Rc;

/// Reads a text parameter, replacing invalid UTF-8 (text is for names,
/// never compared as a secret here).
fn text(r: capnp::Result<capnp::text::Reader<'_>>) -> capnp::Result<String> {
    Ok(String::from_utf8_lossy(r?.as_bytes()).into_owned())
}

/// Fills a login method's results: the session cap (pipelinable) and the
/// login facts.
macro_rules! write_grant {
    ($results:expr, $grant:expr) => {{
        let g = $grant;
        let mut r = $results.get();
        g.write_info(r.reborrow().init_info());
        r.set_session(g.session);
    }};
}

/// Reads a delegation chain (at most 64 grants; longer is refused).
fn read_chain(
    list: capnp::struct_list::Reader<'_, capvisor_rpc::schema::capvisor_capnp::grant_ref::Owned>,
) -> capnp::Result<Vec<(String, String)>> {
    if list.len() > 64 {
        return Err(CvError::invalid("a delegation chain of more than 64 grants").into());
    }
    list.iter().map(|g| Ok((text(g.get_id())?, text(g.get_label())?))).collect()
}

/// `Broker`, the gateway's bootstrap cap.
pub struct BrokerServer {
    svc: Rc<BrokerService>,
}

impl BrokerServer {
    /// A server over `svc`.
    pub fn new(svc: Rc<BrokerService>) -> Self {
        Self { svc }
    }
}

impl broker::Server for BrokerServer {
    async fn login_local(
        self: CapRc<Self>,
        params: broker::LoginLocalParams,
        mut results: broker::LoginLocalResults,
    ) -> capnp::Result<()> {
        let conn = text(params.get()?.get_conn())?;
        // The client's own socket, passed just before this call; held (and
        // so kept open) until the login is decided.
        let (peer, _sock) = self.svc.login_socket(&conn, "loginLocal").await?;
        let grant = self.svc.login_local(&peer).await?;
        write_grant!(results, grant);
        Ok(())
    }

    async fn login_password(
        self: CapRc<Self>,
        params: broker::LoginPasswordParams,
        mut results: broker::LoginPasswordResults,
    ) -> capnp::Result<()> {
        let p = params.get()?;
        let user = text(p.get_user())?;
        // A password that is not UTF-8 can match no account (add takes
        // text): it becomes "", which is shorter than any stored one.
        let password = p.get_password()?.to_str().unwrap_or("").to_string();
        let (peer, _sock) = self.svc.login_socket(&text(p.get_conn())?, "loginPassword").await?;
        let grant = self.svc.login_password(&user, &password, &peer.to_string()).await?;
        write_grant!(results, grant);
        Ok(())
    }

    async fn resume(
        self: CapRc<Self>,
        params: broker::ResumeParams,
        mut results: broker::ResumeResults,
    ) -> capnp::Result<()> {
        let p = params.get()?;
        let token = p.get_token()?.to_str().unwrap_or("").to_string();
        let (peer, _sock) = self.svc.login_socket(&text(p.get_conn())?, "resume").await?;
        let grant = self.svc.resume(&token, &peer.to_string()).await?;
        write_grant!(results, grant);
        Ok(())
    }

    async fn redeem(
        self: CapRc<Self>,
        params: broker::RedeemParams,
        mut results: broker::RedeemResults,
    ) -> capnp::Result<()> {
        let p = params.get()?;
        let token = p.get_token()?.to_str().unwrap_or("").to_string();
        let (peer, _sock) = self.svc.login_socket(&text(p.get_conn())?, "redeem").await?;
        let grant = self.svc.redeem(&token, &peer.to_string()).await?;
        write_grant!(results, grant);
        Ok(())
    }
}

/// `SessionHost` of one session: what its worker may ask of the broker.
pub struct SessionHostServer {
    svc: ServiceRef,
    session: String,
    principal: String,
    bundle: Bundle,
    budget: PrincipalBudget,
}

/// A principal's VM budget across its sessions (from its bundle).
#[derive(Clone, Copy, Debug)]
pub struct PrincipalBudget {
    /// Most running VMs.
    pub vms: u32,
    /// Most guest memory of its running VMs, MiB.
    pub memory_mib: u64,
}

impl SessionHostServer {
    /// The host of session `session` of `principal`, whose profile has
    /// `bundle`: its caps decide `accounts`, `queryAudit`, the volume and
    /// the secret methods (`revealSecret` excepted), its
    /// limits bound the principal's VMs and volumes across its sessions.
    pub fn new(svc: ServiceRef, session: &str, principal: &str, bundle: &Bundle) -> Self {
        let budget = PrincipalBudget {
            vms: bundle.principal_vms(),
            memory_mib: bundle.max_principal_memory_mib.unwrap_or(u64::MAX),
        };
        Self { svc, session: session.into(), principal: principal.into(), bundle: bundle.clone(), budget }
    }

    fn volumes(&self) -> capnp::Result<Rc<BrokerService>> {
        if !self.bundle.has_cap("volumes") {
            return Err(CvError::not_found("this session's bundle does not hold the volumes capability").into());
        }
        self.svc()
    }

    fn secrets(&self) -> capnp::Result<Rc<BrokerService>> {
        if !self.bundle.has_cap("secrets") {
            return Err(CvError::not_found("this session's bundle does not hold the secrets capability").into());
        }
        self.svc()
    }

    fn svc(&self) -> capnp::Result<Rc<BrokerService>> {
        self.svc.upgrade().ok_or_else(|| capnp::Error::disconnected("the broker is shutting down".into()))
    }
}

impl session_host::Server for SessionHostServer {
    async fn logout(
        self: CapRc<Self>,
        _: session_host::LogoutParams,
        _: session_host::LogoutResults,
    ) -> capnp::Result<()> {
        self.svc()?.logout(&self.session, &self.principal);
        Ok(())
    }

    async fn audit(
        self: CapRc<Self>,
        params: session_host::AuditParams,
        _: session_host::AuditResults,
    ) -> capnp::Result<()> {
        let ev = params.get()?.get_event()?;
        let outcome = match ev.get_outcome()?.which()? {
            audit_outcome::Ok(()) => "ok",
            audit_outcome::Error(code) => capvisor_rpc::error::code_name(code?),
        };
        let mut rec = AuditRecord::new(&text(ev.get_action())?, &text(ev.get_cap())?, &text(ev.get_method())?, outcome)
            .principal(&self.principal)
            .session(&self.session)
            .detail(text(ev.get_detail())?)
            .vm(&text(ev.get_vm())?);
        if rec.action.is_empty() {
            rec.action = "worker".into();
        }
        let chain = read_chain(ev.get_grants()?)?;
        if let Some((id, _)) = chain.last() {
            // A call through a grant: the actor is the grant's holder.
            rec = rec.principal(&format!("grant:{id}")).grants(&chain);
        }
        self.svc()?.audit(rec);
        Ok(())
    }

    async fn add_grant(
        self: CapRc<Self>,
        params: session_host::AddGrantParams,
        mut results: session_host::AddGrantResults,
    ) -> capnp::Result<()> {
        let p = params.get()?;
        let id = text(p.get_grant_id())?;
        let rec = crate::grants::GrantRecord {
            session_id: self.session.clone(),
            grantor: self.principal.clone(),
            label: text(p.get_label())?,
            to: text(p.get_to())?,
            expires_at_ms: p.get_expires_at_ms(),
            chain: read_chain(p.get_chain()?)?,
        };
        let token = self.svc()?.add_grant(&self.session, &id, rec, &text(p.get_what())?)?;
        results.get().set_token(token.as_str());
        Ok(())
    }

    async fn end_grants(
        self: CapRc<Self>,
        params: session_host::EndGrantsParams,
        _: session_host::EndGrantsResults,
    ) -> capnp::Result<()> {
        let p = params.get()?;
        let ids = p.get_grant_ids()?.iter().map(text).collect::<capnp::Result<Vec<_>>>()?;
        self.svc()?.end_grants(&self.session, &ids, &text(p.get_reason())?);
        Ok(())
    }

    async fn received_grants(
        self: CapRc<Self>,
        _: session_host::ReceivedGrantsParams,
        mut results: session_host::ReceivedGrantsResults,
    ) -> capnp::Result<()> {
        let got = self.svc()?.received_grants(&self.principal, &self.session).await;
        let mut list = results.get().init_grants(got.len() as u32);
        for (i, (rec, g)) in got.into_iter().enumerate() {
            let mut e = list.reborrow().get(i as u32);
            e.set_grant_id(g.session_id.as_str());
            e.set_label(rec.label.as_str());
            e.set_from(rec.grantor.as_str());
            e.set_session(g.session);
        }
        Ok(())
    }

    async fn reserve_vm(
        self: CapRc<Self>,
        params: session_host::ReserveVmParams,
        mut results: session_host::ReserveVmResults,
    ) -> capnp::Result<()> {
        let memory_mib = params.get()?.get_memory_mib() as u64;
        let svc = self.svc()?;
        let res = svc.reserve_vm(&self.principal, self.budget, memory_mib);
        if let Err(e) = &res {
            svc.audit(
                AuditRecord::new("vm.reserve", "SessionHost", "reserveVm", e.code_name())
                    .principal(&self.principal)
                    .session(&self.session)
                    .detail(e.message.clone()),
            );
        }
        res?;
        let hold = VmHoldServer { svc: self.svc.clone(), principal: self.principal.clone(), memory_mib };
        results.get().set_hold(capnp_rpc::new_client::<capvisor_rpc::schema::internal_capnp::vm_hold::Client, _>(hold));
        Ok(())
    }

    async fn accounts(
        self: CapRc<Self>,
        _: session_host::AccountsParams,
        mut results: session_host::AccountsResults,
    ) -> capnp::Result<()> {
        if !self.bundle.has_cap("accounts") {
            return Err(CvError::not_found("this session's bundle does not hold the accounts capability").into());
        }
        let server =
            AccountsServer { svc: self.svc.clone(), session: self.session.clone(), principal: self.principal.clone() };
        results.get().set_accounts(capnp_rpc::new_client(server));
        Ok(())
    }

    async fn create_volume(
        self: CapRc<Self>,
        params: session_host::CreateVolumeParams,
        mut results: session_host::CreateVolumeResults,
    ) -> capnp::Result<()> {
        let p = params.get()?;
        let name = text(p.get_name())?;
        let svc = self.volumes()?;
        let facts = svc.volume_create(&self.principal, &self.session, &self.bundle, &name, p.get_size_mib()).await?;
        facts.write_to(&self.session, results.get().init_info());
        Ok(())
    }

    async fn list_volumes(
        self: CapRc<Self>,
        _: session_host::ListVolumesParams,
        mut results: session_host::ListVolumesResults,
    ) -> capnp::Result<()> {
        let list = self.volumes()?.volume_list(&self.principal, None)?;
        let mut b = results.get().init_volumes(list.len() as u32);
        for (i, v) in list.iter().enumerate() {
            v.write_to(&self.session, b.reborrow().get(i as u32));
        }
        Ok(())
    }

    async fn remove_volume(
        self: CapRc<Self>,
        params: session_host::RemoveVolumeParams,
        _: session_host::RemoveVolumeResults,
    ) -> capnp::Result<()> {
        let name = text(params.get()?.get_name())?;
        Ok(self.volumes()?.volume_remove(&self.principal, &self.session, &name)?)
    }

    async fn attach_volume(
        self: CapRc<Self>,
        params: session_host::AttachVolumeParams,
        mut results: session_host::AttachVolumeResults,
    ) -> capnp::Result<()> {
        let p = params.get()?;
        let (name, vm) = (text(p.get_name())?, text(p.get_vm())?);
        let svc = self.volumes()?;
        let (file, lease) = svc.volume_attach(&self.principal, &self.session, &vm, &name, p.get_read_only())?;
        let mut r = results.get();
        r.set_path(capvisor_rpc::error::path_text(&file)?);
        let hold = VolumeHoldServer { svc: self.svc.clone(), file, lease };
        r.set_hold(capnp_rpc::new_client::<capvisor_rpc::schema::internal_capnp::vm_hold::Client, _>(hold));
        Ok(())
    }

    async fn put_secret(
        self: CapRc<Self>,
        params: session_host::PutSecretParams,
        _: session_host::PutSecretResults,
    ) -> capnp::Result<()> {
        let p = params.get()?;
        let svc = self.secrets()?;
        let name = text(p.get_name())?;
        let mut hosts = Vec::new();
        for h in p.get_hosts()?.iter() {
            match h?.to_str() {
                Ok(h) => hosts.push(h.to_string()),
                Err(_) => return Err(CvError::invalid("host globs must be UTF-8 text").into()),
            }
        }
        Ok(svc.secret_put(&self.principal, &self.session, &name, p.get_value()?, &hosts)?)
    }

    async fn list_secrets(
        self: CapRc<Self>,
        _: session_host::ListSecretsParams,
        mut results: session_host::ListSecretsResults,
    ) -> capnp::Result<()> {
        let list = self.secrets()?.secret_list(&self.principal)?;
        let mut b = results.get().init_secrets(list.len() as u32);
        for (i, s) in list.iter().enumerate() {
            let mut e = b.reborrow().get(i as u32);
            e.set_name(s.name.as_str());
            e.set_created_at_ms(s.created_at_ms);
            let mut h = e.init_hosts(s.hosts.len() as u32);
            for (k, host) in s.hosts.iter().enumerate() {
                h.set(k as u32, host.as_str());
            }
        }
        Ok(())
    }

    async fn remove_secret(
        self: CapRc<Self>,
        params: session_host::RemoveSecretParams,
        _: session_host::RemoveSecretResults,
    ) -> capnp::Result<()> {
        let name = text(params.get()?.get_name())?;
        Ok(self.secrets()?.secret_remove(&self.principal, &self.session, &name)?)
    }

    async fn reveal_secret(
        self: CapRc<Self>,
        params: session_host::RevealSecretParams,
        mut results: session_host::RevealSecretResults,
    ) -> capnp::Result<()> {
        // No bundle check: the session's proxy asks for the placeholders
        // its guests send; a principal without "secrets" has none to find.
        let p = params.get()?;
        let (name, host) = (text(p.get_name())?, text(p.get_host())?);
        let r = self.svc()?.secret_reveal(&self.principal, &self.session, &name, &host)?;
        let mut out = results.get();
        out.set_found(r.found);
        out.set_matched(r.matched);
        if let Some(v) = &r.value {
            out.set_value(v);
        }
        Ok(())
    }

    async fn query_audit(
        self: CapRc<Self>,
        params: session_host::QueryAuditParams,
        mut results: session_host::QueryAuditResults,
    ) -> capnp::Result<()> {
        let p = params.get()?;
        let q = crate::audit_db::AuditQuery {
            since_ms: p.get_since_ms(),
            until_ms: p.get_until_ms(),
            vm: text(p.get_vm())?,
            grant: text(p.get_grant())?,
            principal: text(p.get_principal())?,
            action: text(p.get_action())?,
            limit: p.get_limit(),
        };
        let svc = self.svc()?;
        let res = match (self.bundle.has_cap("audit"), svc.audit_log().index()) {
            (false, _) => Err(CvError::not_found("this session's bundle does not hold the audit capability")),
            (true, None) => Err(CvError::unavailable("the audit index is not available (see the broker log)")),
            (true, Some(ix)) => ix.query(q.clone()).await.map_err(|e| CvError::unavailable(e.to_string())),
        };
        let outcome = match &res {
            Ok(_) => "ok",
            Err(e) => e.code_name(),
        };
        // The filters only, not how many entries came back: equal queries
        // then make equal records, which coalesce (a query for
        // `audit.query` records would otherwise add a new line each time).
        let detail = match &res {
            Ok(_) => describe_query(&q),
            Err(e) => format!("{}; {}", describe_query(&q), e.message),
        };
        svc.audit(
            AuditRecord::new("audit.query", "Audit", "query", outcome)
                .principal(&self.principal)
                .session(&self.session)
                .detail(detail),
        );
        let list = res?;
        let mut b = results.get().init_entries(list.len() as u32);
        for (i, rec) in list.iter().enumerate() {
            write_entry(rec, b.reborrow().get(i as u32));
        }
        Ok(())
    }
}

/// The filters of `q` for an audit line, e.g. `vm=x limit=1000`.
fn describe_query(q: &crate::audit_db::AuditQuery) -> String {
    let mut parts = Vec::new();
    if q.since_ms != 0 {
        parts.push(format!("since={}", q.since_ms));
    }
    if q.until_ms != 0 {
        parts.push(format!("until={}", q.until_ms));
    }
    for (k, v) in [("vm", &q.vm), ("grant", &q.grant), ("principal", &q.principal), ("action", &q.action)] {
        if !v.is_empty() {
            parts.push(format!("{k}={v:?}"));
        }
    }
    parts.push(format!("limit={}", q.effective_limit()));
    parts.join(" ")
}

/// Fills a schema `AuditEntry` from `rec`.
fn write_entry(rec: &AuditRecord, mut e: capvisor_rpc::schema::capvisor_capnp::audit_entry::Builder<'_>) {
    e.set_time_ms(rec.ts_ms);
    e.set_since_ms(rec.since_ms);
    e.set_repeated(rec.repeated);
    e.set_principal(rec.principal.as_str());
    e.set_session(rec.session.as_str());
    e.set_action(rec.action.as_str());
    e.set_cap(rec.cap.as_str());
    e.set_method(rec.method.as_str());
    e.set_outcome(rec.outcome.as_str());
    e.set_detail(rec.detail.as_str());
    e.set_peer(rec.peer.as_str());
    e.set_vm(rec.vm.as_str());
    let mut g = e.init_grants(rec.grants.len() as u32);
    for (i, grant) in rec.grants.iter().enumerate() {
        let mut b = g.reborrow().get(i as u32);
        b.set_id(grant.id.as_str());
        b.set_label(grant.label.as_str());
    }
}

/// A volume lease (`VmHold` from `attachVolume`): ends when dropped, which
/// happens when the worker drops its reference (the VM stopped or was
/// removed) or its connection ends.
pub struct VolumeHoldServer {
    svc: ServiceRef,
    file: std::path::PathBuf,
    lease: u64,
}

impl capvisor_rpc::schema::internal_capnp::vm_hold::Server for VolumeHoldServer {}

impl Drop for VolumeHoldServer {
    fn drop(&mut self) {
        if let Some(svc) = self.svc.upgrade() {
            svc.volume_release(&self.file, self.lease);
        }
    }
}

/// A VM reservation (`VmHold`): gives its room back when dropped, which
/// happens when the worker drops its reference or its connection ends.
pub struct VmHoldServer {
    svc: ServiceRef,
    principal: String,
    memory_mib: u64,
}

impl capvisor_rpc::schema::internal_capnp::vm_hold::Server for VmHoldServer {}

impl Drop for VmHoldServer {
    fn drop(&mut self) {
        if let Some(svc) = self.svc.upgrade() {
            svc.release_vm(&self.principal, self.memory_mib);
        }
    }
}

/// `Accounts` over the credential store, for one session (its principal
/// and id go into every audit line).
pub struct AccountsServer {
    svc: ServiceRef,
    session: String,
    principal: String,
}

impl AccountsServer {
    fn svc(&self) -> capnp::Result<Rc<BrokerService>> {
        self.svc.upgrade().ok_or_else(|| capnp::Error::disconnected("the broker is shutting down".into()))
    }
}

impl accounts::Server for AccountsServer {
    async fn add(self: CapRc<Self>, params: accounts::AddParams, _: accounts::AddResults) -> capnp::Result<()> {
        let p = params.get()?;
        let name = text(p.get_account())?;
        let profile = text(p.get_profile())?;
        let res = match p.get_password()?.to_str() {
            Ok(pw) => self.svc()?.account_add(&self.principal, &self.session, &name, &profile, pw.to_string()).await,
            Err(_) => Err(CvError::invalid("the password must be UTF-8 text")),
        };
        Ok(res?)
    }

    async fn list(self: CapRc<Self>, _: accounts::ListParams, mut results: accounts::ListResults) -> capnp::Result<()> {
        let list = self.svc()?.account_list(&self.principal, &self.session);
        let mut b = results.get().init_accounts(list.len() as u32);
        for (i, (name, profile)) in list.iter().enumerate() {
            let mut e = b.reborrow().get(i as u32);
            e.set_name(name.as_str());
            e.set_profile(profile.as_str());
        }
        Ok(())
    }

    async fn remove(
        self: CapRc<Self>,
        params: accounts::RemoveParams,
        _: accounts::RemoveResults,
    ) -> capnp::Result<()> {
        let name = text(params.get()?.get_account())?;
        Ok(self.svc()?.account_remove(&self.principal, &self.session, &name).await?)
    }
}
