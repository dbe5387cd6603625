//! `Audit`: the install's audit log, queryable (issue 10). The broker keeps
//! the log and its SQLite index (`broker::audit_db`); the worker serves the
//! cap behind the session's revocation check and forwards each query to
//! its `SessionHost.queryAudit`, which answers only when the session's
//! bundle holds "audit" (notFound otherwise) and audits the query
//! (`audit.query`).
//!
//! Who can call: the holder of this session's CapSet entry "audit"
//! (bundle-controlled; the default manifest gives it to the owner bundle
//! only). What it reaches: every principal's records (the holder is the
//! operator). Revoked: with the session (`staleSession`).

use crate::state::SessionState;
use capnp::capability::Rc as CapRc;
use capvisor_rpc::schema::capvisor_capnp::{audit, audit_entry};
use std::rc::Rc;

/// `Audit` of one session.
pub struct AuditImpl {
    /// The session this cap belongs to (every call checks it first).
    pub st: Rc<SessionState>,
}

/// Copies one entry field by field (nothing the worker does not know
/// crosses the membrane).
fn copy_entry(from: audit_entry::Reader<'_>, mut to: audit_entry::Builder<'_>) -> capnp::Result<()> {
    to.set_time_ms(from.get_time_ms());
    to.set_since_ms(from.get_since_ms());
    to.set_repeated(from.get_repeated());
    to.set_principal(from.get_principal()?);
    to.set_session(from.get_session()?);
    to.set_action(from.get_action()?);
    to.set_cap(from.get_cap()?);
    to.set_method(from.get_method()?);
    to.set_outcome(from.get_outcome()?);
    to.set_detail(from.get_detail()?);
    to.set_peer(from.get_peer()?);
    to.set_vm(from.get_vm()?);
    let src = from.get_grants()?;
    let mut dst = to.init_grants(src.len());
    for (i, g) in src.iter().enumerate() {
        let mut d = dst.reborrow().get(i as u32);
        d.set_id(g.get_id()?);
        d.set_label(g.get_label()?);
    }
    Ok(())
}

impl audit::Server for AuditImpl {
    async fn query(
        self: CapRc<Self>,
        params: audit::QueryParams,
        mut results: audit::QueryResults,
    ) -> capnp::Result<()> {
        self.st.check()?;
        let p = params.get()?;
        let mut req = self.st.host.query_audit_request();
        {
            let mut r = req.get();
            r.set_since_ms(p.get_since_ms());
            r.set_until_ms(p.get_until_ms());
            r.set_vm(p.get_vm()?);
            r.set_grant(p.get_grant()?);
            r.set_principal(p.get_principal()?);
            r.set_action(p.get_action()?);
            r.set_limit(p.get_limit());
        }
        let resp = self.st.guard(async { req.send().promise.await.map_err(|e| crate::wrap::relay(e, false)) }).await?;
        let list = resp.get()?.get_entries()?;
        let mut out = results.get().init_entries(list.len());
        for (i, e) in list.iter().enumerate() {
            copy_entry(e, out.reborrow().get(i as u32))?;
        }
        Ok(())
    }
}
