//! `Secrets` and `SecretSource`: the session's face of its principal's
//! secrets (issue 9). The broker keeps them sealed at rest
//! (`broker::secrets`); the worker serves `Secrets` behind the session's
//! revocation check and forwards each call to its `SessionHost`, so every
//! put and remove is checked and audited by the broker under the session's
//! principal, and no value is ever held here beyond one forwarded call.
//!
//! A guest never sees a value: `ExecSpec.secretEnv` becomes environment
//! variables holding the placeholder `capvisor-secret:<name>`
//! ([`exec_env`]), and the session's egress proxy, through this worker's
//! [`SecretSourceImpl`], asks the broker for a value by name and request
//! host (`SessionHost.revealSecret`), which releases it only for a host
//! matching one of the secret's globs.
//!
//! Who can call: `Secrets`, the holder of this session's CapSet entry
//! "secrets" (bundle-controlled); `SecretSource`, only the session's proxy
//! (the worker hands it over on the proxy's private RPC connection). What
//! they reach: only the principal's own secrets. Revoked: with the session
//! (`staleSession`).

use crate::state::SessionState;
use capnp::capability::Rc as CapRc;
use capvisor_rpc::error::text;
use capvisor_rpc::schema::capvisor_capnp::secrets;
use capvisor_rpc::schema::common_capnp::ErrorCode;
use capvisor_rpc::schema::internal_capnp::{secret_source, session_host};
use capvisor_rpc::{CvError, CvResult};
use std::rc::Rc;

fn relay(e: capnp::Error) -> CvError {
    crate::wrap::relay(e, false)
}

/// `Secrets` of one session.
pub struct SecretsImpl {
    /// The session this cap belongs to (every call checks it first).
    pub st: Rc<SessionState>,
}

impl secrets::Server for SecretsImpl {
    async fn put(self: CapRc<Self>, params: secrets::PutParams, _: secrets::PutResults) -> capnp::Result<()> {
        self.st.check()?;
        let p = params.get()?;
        let mut req = self.st.host.put_secret_request();
        {
            let mut r = req.get();
            r.set_name(p.get_name()?);
            r.set_value(p.get_value()?);
            r.set_hosts(p.get_hosts()?)?;
        }
        Ok(self.st.guard(async { req.send().promise.await.map(drop).map_err(relay) }).await?)
    }

    async fn list(self: CapRc<Self>, _: secrets::ListParams, mut results: secrets::ListResults) -> capnp::Result<()> {
        let req = self.st.host.list_secrets_request();
        let resp = self.st.guard(async { req.send().promise.await.map_err(relay) }).await?;
        let list = resp.get()?.get_secrets()?;
        let mut out = results.get().init_secrets(list.len());
        for (i, s) in list.iter().enumerate() {
            // Copied field by field: only what SecretInfo says.
            let mut o = out.reborrow().get(i as u32);
            o.set_name(s.get_name()?);
            o.set_created_at_ms(s.get_created_at_ms());
            o.set_hosts(s.get_hosts()?)?;
        }
        Ok(())
    }

    async fn remove(self: CapRc<Self>, params: secrets::RemoveParams, _: secrets::RemoveResults) -> capnp::Result<()> {
        let name = text(params.get()?.get_name())?;
        let mut req = self.st.host.remove_secret_request();
        req.get().set_name(name.as_str());
        Ok(self.st.guard(async { req.send().promise.await.map(drop).map_err(relay) }).await?)
    }
}

/// `SecretSource` for the session's proxy: each `reveal` is one
/// `SessionHost.revealSecret` of this session. It holds the session's
/// `SessionHost`, not its state (the state holds the proxy, which holds
/// this: no cycle); revocation reaches it because revoking the session
/// drops the proxy and so the connection this cap lives on, and an
/// expired session answers `staleSession`.
pub struct SecretSourceImpl {
    host: session_host::Client,
    expires_at_ms: i64,
}

impl SecretSourceImpl {
    /// The source of session `st`.
    pub fn new(st: &SessionState) -> Self {
        Self { host: st.host.clone(), expires_at_ms: st.ctx.expires_at_ms }
    }
}

impl secret_source::Server for SecretSourceImpl {
    async fn reveal(
        self: CapRc<Self>,
        params: secret_source::RevealParams,
        mut results: secret_source::RevealResults,
    ) -> capnp::Result<()> {
        if capvisor_rpc::now_ms() >= self.expires_at_ms {
            return Err(CvError::stale().into());
        }
        let p = params.get()?;
        let mut req = self.host.reveal_secret_request();
        req.get().set_name(p.get_name()?);
        req.get().set_host(p.get_host()?);
        let resp = req.send().promise.await.map_err(relay)?;
        let r = resp.get()?;
        let mut out = results.get();
        out.set_found(r.get_found());
        out.set_matched(r.get_matched());
        if r.get_matched() {
            out.set_value(r.get_value()?);
        }
        Ok(())
    }
}

/// The environment entries for `ExecSpec.secretEnv` pairs (variable,
/// secret name): `VAR=capvisor-secret:NAME` each
/// ([`capvisor_rpc::secrets::placeholder`]), after checking every
/// variable name ([`capvisor_rpc::exec::valid_env_name`]) and that the
/// principal has every secret (one `SessionHost.listSecrets`).
///
/// Errors: `invalidArgument` for a bad variable or secret name;
/// `notFound` "no secret named X" for a missing secret (also when the
/// session's bundle holds no "secrets", so it can have none);
/// `staleSession`; `unavailable` when the broker cannot be asked.
pub async fn exec_env(st: &SessionState, pairs: &[(String, String)]) -> CvResult<Vec<(String, String)>> {
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    for (var, name) in pairs {
        if !capvisor_rpc::exec::valid_env_name(var) {
            return Err(CvError::invalid(format!("bad environment variable name {var:?} in secretEnv")));
        }
        if !capvisor_rpc::secrets::valid_name(name) {
            return Err(CvError::invalid(format!("bad secret name {name:?} for {var}")));
        }
    }
    let req = st.host.list_secrets_request();
    let names: Vec<String> = match st.guard(async { req.send().promise.await.map_err(relay) }).await {
        Ok(resp) => {
            let list = resp.get().and_then(|r| r.get_secrets()).map_err(|e| CvError::internal(e.to_string()))?;
            list.iter().filter_map(|s| s.get_name().ok().and_then(|n| n.to_str().ok()).map(str::to_string)).collect()
        }
        Err(e) if e.code == ErrorCode::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut env = Vec::with_capacity(pairs.len());
    for (var, name) in pairs {
        if !names.iter().any(|n| n == name) {
            return Err(CvError::not_found(format!("no secret named {name:?}")));
        }
        env.push((var.clone(), capvisor_rpc::secrets::placeholder(name)));
    }
    Ok(env)
}
