//! Attenuation of `Vm` (issue 10, item 1; docs/decisions.md "Delegation"):
//! `Vm.narrow(VmNarrowing)` returns a new `Vm` object wrapping the one it
//! was called on, which allows only what the narrowing allows. It is never
//! a flag on the original: the holder of the narrowed cap has no way back
//! to the wider one.
//!
//! - **exec**: `argv[0]` must be one of `execAllow` exactly (or anything
//!   with `execAny`); a fixed `execUser` / `execCwd` is put into the spec
//!   (a spec naming another is denied); a pty only with `allowPty`;
//!   `secretEnv` is always denied (a narrowed holder must not spend the
//!   grantor's secrets); with `askExec` each exec first waits for the
//!   session's decision ([`crate::approvals`]).
//! - **files**: `none` denied; `readOnly` gives a `Files` that reads and
//!   lists anywhere and denies `write`; `readWrite` allows `write` only
//!   under `writePrefixes` ([`under`]), checked here on the normalised
//!   path and again by guest-init, which opens the file beneath the
//!   matching prefix (`Files.write`'s `beneath`, openat2(2)
//!   `RESOLVE_BENEATH`), so a symlink the holder made in the guest cannot
//!   lead a write out of the prefix.
//! - **stop** only with `allowStop`; **connect** only to `ports`.
//! - **expiry and call budget**: every call, the ones on caps it returns
//!   included, first checks the expiry and takes one from the budget of
//!   this cap and of every cap it was narrowed from ([`Budget`]).
//! - **narrowing again** intersects ([`Narrowing::then`]): lists
//!   intersect, a fixed user or cwd cannot change, a write prefix must lie
//!   under an existing one, flags and file access only go down, asking
//!   only gets added, the earlier expiry wins, budgets chain. A narrowing
//!   that would widen is refused with `denied` naming the field.
//! - **shared** ([`NarrowVm::rebind`], `crate::grants`): bound to a grant,
//!   whose end cuts it and everything reached through it.
//!
//! Every denial is typed (`denied`) and audited (`vm.narrowed.denied`
//! with the method); creating a narrowed cap is audited (`vm.narrow`).
//! The wrapped cap is the session's own `Vm`, so revocation (logout,
//! expiry of the session) still cuts everything.

use crate::grants::GrantNode;
use crate::state::SessionState;
use crate::vms::VmEntry;
use capnp::capability::Rc as CapRc;
use capvisor_rpc::exec::ExecRequest;
use capvisor_rpc::schema::capvisor_capnp::{vm, vm_narrowing, FilesAccess};
use capvisor_rpc::schema::common_capnp::files;
use capvisor_rpc::{CvError, CvResult};
use std::cell::Cell;
use std::rc::Rc;

/// Longest `execAllow` / `writePrefixes` / `ports` list of one narrowing.
pub const MAX_LIST: usize = 64;

/// A narrowing in Rust form (schema `VmNarrowing`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Narrowing {
    /// Allowed `argv[0]` values, exactly.
    pub exec_allow: Vec<String>,
    /// Any program may run (`exec_allow` not consulted).
    pub exec_any: bool,
    /// Every exec waits for the session's decision (`crate::approvals`).
    pub ask_exec: bool,
    /// Fixed exec user, if any.
    pub exec_user: Option<String>,
    /// Fixed exec working directory, if any.
    pub exec_cwd: Option<String>,
    /// Whether exec may use a pty.
    pub allow_pty: bool,
    /// File access.
    pub files: Access,
    /// With [`Access::ReadWrite`]: where write is allowed (normalised
    /// absolute paths; empty: anywhere).
    pub write_prefixes: Vec<String>,
    /// Whether `stop` is allowed.
    pub allow_stop: bool,
    /// Guest ports `connect` may reach.
    pub ports: Vec<u16>,
    /// Unix epoch ms after which every call is denied (0: none).
    pub expires_at_ms: i64,
}

/// File access of a narrowed `Vm`, ordered from least to most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// `files` denied.
    None,
    /// Read and list.
    ReadOnly,
    /// Read, list, and write under the prefixes.
    ReadWrite,
}

/// `path` with `.` segments and repeated slashes removed, if it is
/// absolute and has no `..` segment.
pub fn normalise(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let mut out = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => return None,
            s => out.push(s),
        }
    }
    Some(format!("/{}", out.join("/")))
}

/// Whether normalised `path` is `prefix` or below it, component-wise
/// (`/work` covers `/work/a`, not `/workshop`).
pub fn under(path: &str, prefix: &str) -> bool {
    prefix == "/" || path == prefix || path.strip_prefix(prefix).is_some_and(|r| r.starts_with('/'))
}

impl Narrowing {
    /// Reads and validates the schema struct.
    ///
    /// Errors: `invalidArgument` for an empty or over-long list entry, a
    /// write prefix that is not an absolute path without `..`, a list over
    /// [`MAX_LIST`], port 0.
    pub fn read(r: vm_narrowing::Reader<'_>) -> CvResult<Self> {
        let text = |t: capnp::Result<capnp::text::Reader<'_>>, what: &str| -> CvResult<String> {
            t.ok()
                .and_then(|t| t.to_str().ok().map(str::to_string))
                .ok_or_else(|| CvError::invalid(format!("{what}: not UTF-8 text")))
        };
        let mut exec_allow = Vec::new();
        let list = r.get_exec_allow().map_err(|e| CvError::invalid(format!("execAllow: {e}")))?;
        if list.len() as usize > MAX_LIST {
            return Err(CvError::invalid(format!("execAllow: more than {MAX_LIST} programs")));
        }
        for t in list.iter() {
            let p = text(t, "execAllow")?;
            if p.is_empty() || p.len() > 4096 || p.contains('\0') {
                return Err(CvError::invalid(format!("execAllow: {p:?} is not a program name or path")));
            }
            exec_allow.push(p);
        }
        let mut write_prefixes = Vec::new();
        let list = r.get_write_prefixes().map_err(|e| CvError::invalid(format!("writePrefixes: {e}")))?;
        if list.len() as usize > MAX_LIST {
            return Err(CvError::invalid(format!("writePrefixes: more than {MAX_LIST} paths")));
        }
        for t in list.iter() {
            let p = text(t, "writePrefixes")?;
            write_prefixes.push(normalise(&p).ok_or_else(|| {
                CvError::invalid(format!("writePrefixes: {p:?} is not an absolute path without \"..\""))
            })?);
        }
        let ports: Vec<u16> = r.get_ports().map_err(|e| CvError::invalid(format!("ports: {e}")))?.iter().collect();
        if ports.len() > MAX_LIST || ports.contains(&0) {
            return Err(CvError::invalid(format!("ports: at most {MAX_LIST}, none 0")));
        }
        let user = text(r.get_exec_user(), "execUser")?;
        let cwd = text(r.get_exec_cwd(), "execCwd")?;
        if !cwd.is_empty() && normalise(&cwd).is_none() {
            return Err(CvError::invalid(format!("execCwd: {cwd:?} is not an absolute path without \"..\"")));
        }
        Ok(Self {
            exec_allow,
            exec_any: r.get_exec_any(),
            ask_exec: r.get_ask_exec(),
            exec_user: (!user.is_empty()).then_some(user),
            exec_cwd: (!cwd.is_empty()).then_some(cwd),
            allow_pty: r.get_allow_pty(),
            files: match r.get_files().map_err(|_| CvError::invalid("files: unknown access"))? {
                FilesAccess::None => Access::None,
                FilesAccess::ReadOnly => Access::ReadOnly,
                FilesAccess::ReadWrite => Access::ReadWrite,
            },
            write_prefixes,
            allow_stop: r.get_allow_stop(),
            ports,
            expires_at_ms: r.get_expires_at_ms().max(0),
        })
    }

    /// `next` applied on top of `self` (module docs): the result allows
    /// nothing `self` does not. (The first narrowing of a session's own
    /// `Vm` is taken as it is: that `Vm` allows everything.)
    ///
    /// Errors: `denied` naming the field when `next` asks for a user or cwd
    /// other than the fixed one, or a write prefix outside the existing
    /// ones.
    pub fn then(&self, next: &Narrowing) -> CvResult<Narrowing> {
        let fixed = |have: &Option<String>, want: &Option<String>, what: &str| -> CvResult<Option<String>> {
            match (have, want) {
                (Some(h), Some(w)) if h != w => {
                    Err(CvError::denied(format!("{what} is fixed to {h:?}; a narrower cap cannot change it")))
                }
                (Some(h), _) => Ok(Some(h.clone())),
                (None, w) => Ok(w.clone()),
            }
        };
        let write_prefixes = if self.write_prefixes.is_empty() {
            next.write_prefixes.clone()
        } else if next.write_prefixes.is_empty() {
            self.write_prefixes.clone()
        } else {
            for p in &next.write_prefixes {
                if !self.write_prefixes.iter().any(|q| under(p, q)) {
                    return Err(CvError::denied(format!("writePrefixes: {p:?} is outside what this cap may write")));
                }
            }
            next.write_prefixes.clone()
        };
        let expires_at_ms = earlier(self.expires_at_ms, next.expires_at_ms);
        Ok(Narrowing {
            exec_allow: match (self.exec_any, next.exec_any) {
                (true, _) => next.exec_allow.clone(),
                (false, _) => next.exec_allow.iter().filter(|p| self.exec_allow.contains(p)).cloned().collect(),
            },
            exec_any: self.exec_any && next.exec_any,
            ask_exec: self.ask_exec || next.ask_exec,
            exec_user: fixed(&self.exec_user, &next.exec_user, "execUser")?,
            exec_cwd: fixed(&self.exec_cwd, &next.exec_cwd, "execCwd")?,
            allow_pty: self.allow_pty && next.allow_pty,
            files: self.files.min(next.files),
            write_prefixes,
            allow_stop: self.allow_stop && next.allow_stop,
            ports: next.ports.iter().filter(|p| self.ports.contains(p)).copied().collect(),
            expires_at_ms,
        })
    }

    /// Checks an exec spec and fixes its user and cwd. Errors: `denied`
    /// naming what is not allowed.
    pub fn check_exec(&self, spec: &mut ExecRequest) -> CvResult<()> {
        let prog = spec.argv.first().map(String::as_str).unwrap_or("");
        if !self.exec_any && !self.exec_allow.iter().any(|p| p == prog) {
            return Err(CvError::denied(format!("this cap may not run {prog:?}")));
        }
        if spec.pty.is_some() && !self.allow_pty {
            return Err(CvError::denied("this cap may not run a program on a pseudo-terminal"));
        }
        if !spec.secret_env.is_empty() {
            return Err(CvError::denied("a narrowed cap cannot use secrets"));
        }
        if let Some(u) = &self.exec_user {
            if !spec.user.is_empty() && spec.user != *u {
                return Err(CvError::denied(format!("this cap runs programs as {u:?} only")));
            }
            spec.user = u.clone();
        }
        if let Some(c) = &self.exec_cwd {
            if !spec.cwd.is_empty() && normalise(&spec.cwd).as_deref() != Some(c.as_str()) {
                return Err(CvError::denied(format!("this cap runs programs in {c:?} only")));
            }
            spec.cwd = c.clone();
        }
        Ok(())
    }

    /// Whether `write` to `path` is allowed. Errors: `denied`.
    pub fn check_write(&self, path: &str) -> CvResult<()> {
        if self.files != Access::ReadWrite {
            return Err(CvError::denied("this cap may only read files"));
        }
        let p = normalise(path)
            .ok_or_else(|| CvError::denied(format!("{path:?} is not an absolute path without \"..\"")))?;
        if self.write_prefixes.is_empty() || self.write_prefixes.iter().any(|q| under(&p, q)) {
            Ok(())
        } else {
            Err(CvError::denied(format!("this cap may not write {p:?}")))
        }
    }
}

/// What every narrowed cap checks before a call: its grant (if shared;
/// `staleSession` once it ended, else the call is counted on it), its
/// expiry (`expires_at_ms`, 0: none) and its call budget; a denial of the
/// last two goes through `deny` (which audits it).
pub fn admit(
    grant: &Option<Rc<GrantNode>>,
    expires_at_ms: i64,
    budget: &Option<Rc<Budget>>,
    deny: impl Fn(CvError) -> CvError,
) -> CvResult<()> {
    if let Some(g) = grant {
        g.check()?;
        g.touch();
    }
    if expires_at_ms != 0 && capvisor_rpc::now_ms() > expires_at_ms {
        return Err(deny(CvError::denied("this cap has expired")));
    }
    Budget::take(budget).map_err(deny)
}

/// The earlier of two expiries, Unix epoch ms, where 0 means none: what
/// narrowing again keeps.
pub fn earlier(a: i64, b: i64) -> i64 {
    match (a, b) {
        (0, n) => n,
        (s, 0) => s,
        (s, n) => s.min(n),
    }
}

/// Reads a text list of a narrowing (`what` names the field in errors).
///
/// Errors: `invalidArgument` for more than [`MAX_LIST`] entries or one that
/// is not UTF-8.
pub fn text_list(list: capnp::Result<capnp::text_list::Reader<'_>>, what: &str) -> CvResult<Vec<String>> {
    let list = list.map_err(|e| CvError::invalid(format!("{what}: {e}")))?;
    if list.len() as usize > MAX_LIST {
        return Err(CvError::invalid(format!("{what}: at most {MAX_LIST}")));
    }
    list.iter()
        .map(|t| {
            t.ok()
                .and_then(|t| t.to_str().ok().map(str::to_string))
                .ok_or_else(|| CvError::invalid(format!("{what}: not UTF-8 text")))
        })
        .collect()
}

/// Audits a denial through a narrowed view bound to `scope`
/// (`<what>.narrowed.denied`, with the grant chain) and returns it.
pub fn view_denied(scope: &crate::wrap::Scope, what: &str, iface: &str, method: &str, e: CvError) -> CvError {
    let action = format!("{what}.narrowed.denied");
    scope.st.audit_chain("", &scope.chain(), &action, iface, method, Err(&e), &e.message);
    e
}

/// The expiry and call budget of a view (`NetLog`, `NetPolicy`,
/// `Volumes`; `crate::narrow_net`, `crate::volumes`).
#[derive(Clone, Default)]
pub struct Bounds {
    /// Unix epoch ms after which every call is denied (0: none).
    pub expires_at_ms: i64,
    /// The budget chain (`None`: none).
    pub budget: Option<Rc<Budget>>,
}

impl Bounds {
    /// These bounds narrowed by `expires_at_ms` (0: none of its own; the
    /// earlier wins) and `calls` (0: none of its own; chained under these).
    pub fn then(&self, expires_at_ms: i64, calls: u64) -> Bounds {
        let expires_at_ms = earlier(self.expires_at_ms, expires_at_ms.max(0));
        Bounds { expires_at_ms, budget: Budget::chain(calls, self.budget.clone()) }
    }

    /// Before a call through a view bound to `scope`: the session and the
    /// grant ([`crate::wrap::Scope::check`], `staleSession`), then
    /// [`admit`] (denials through `deny`).
    pub fn admit(&self, scope: &crate::wrap::Scope, deny: impl Fn(CvError) -> CvError) -> CvResult<()> {
        scope.check()?;
        admit(&scope.grant, self.expires_at_ms, &self.budget, deny)
    }
}

/// A call budget, chained to the budgets of the caps a cap was narrowed
/// from: a call takes one from every link, and is denied when any is spent.
pub struct Budget {
    left: Cell<u64>,
    parent: Option<Rc<Budget>>,
}

impl Budget {
    /// A budget of `calls` chained under `parent` (`calls` 0: none of its
    /// own, so `parent` alone).
    pub fn chain(calls: u64, parent: Option<Rc<Budget>>) -> Option<Rc<Budget>> {
        if calls == 0 {
            parent
        } else {
            Some(Rc::new(Budget { left: Cell::new(calls), parent }))
        }
    }

    /// Takes one call from every budget of `chain`, or none when one is
    /// spent. Errors: `denied` when one is spent.
    pub fn take(chain: &Option<Rc<Budget>>) -> CvResult<()> {
        let mut at = chain.clone();
        while let Some(b) = at {
            if b.left.get() == 0 {
                return Err(CvError::denied("this cap's call budget is spent"));
            }
            at = b.parent.clone();
        }
        let mut at = chain.clone();
        while let Some(b) = at {
            b.left.set(b.left.get() - 1);
            at = b.parent.clone();
        }
        Ok(())
    }
}

/// What a narrowed `Vm` and the caps it returns share.
struct Limits {
    st: Rc<SessionState>,
    entry: Rc<VmEntry>,
    n: Narrowing,
    budget: Option<Rc<Budget>>,
    /// The grant this cap is bound to (`crate::grants`), if shared.
    grant: Option<Rc<GrantNode>>,
    /// Programs approved with `allowAlways` for this cap (`askExec`).
    always: crate::approvals::Always,
}

impl Limits {
    /// Expiry, then the budget. Errors: `denied` (audited).
    fn call(&self, method: &str) -> CvResult<()> {
        admit(&self.grant, self.n.expires_at_ms, &self.budget, |e| self.deny(method, e))
    }

    /// Waits for the session's decision on running `argv` (`askExec`),
    /// cut short by the grant's end or the session's.
    async fn ask(&self, argv: &[String]) -> CvResult<()> {
        let chain = self.grant.as_ref().map(|g| g.chain()).unwrap_or_default();
        let grants: Vec<String> = chain.iter().map(|(id, label)| format!("{label} ({id})")).collect();
        let grants = grants.join(" > ");
        let wait = self.st.exec_approvals.ask(&self.entry.name, argv, &grants, &self.always);
        let grant_ended = async {
            match &self.grant {
                Some(g) => g.revoked().await,
                None => std::future::pending().await,
            }
        };
        self.st
            .guard(async {
                tokio::select! {
                    r = wait => r,
                    _ = grant_ended => Err(CvError::stale()),
                }
            })
            .await
    }

    fn deny(&self, method: &str, e: CvError) -> CvError {
        let chain = self.grant.as_ref().map(|g| g.chain()).unwrap_or_default();
        self.st.audit_chain(&self.entry.name, &chain, "vm.narrowed.denied", "Vm", method, Err(&e), &e.message);
        e
    }
}

/// A narrowed `Vm`.
pub struct NarrowVm {
    inner: vm::Client,
    limits: Rc<Limits>,
}

impl NarrowVm {
    /// The grant this cap is bound to, if it was shared.
    pub fn grant(&self) -> Option<Rc<GrantNode>> {
        self.limits.grant.clone()
    }

    /// Its narrowing, for people (`Shares.list`, the audit log).
    pub fn describe(&self) -> String {
        describe(&self.limits.entry.name, &self.limits.n)
    }

    /// The same narrowing over the same VM, bound to `grant` (for a share):
    /// its calls count against this cap's budget too, and it (with every
    /// `Process`, `Files` and stream reached through it) dies with the
    /// grant.
    pub fn rebind(&self, grant: &Rc<GrantNode>) -> vm::Client {
        let l = &self.limits;
        let budget = l.budget.clone();
        unaudited(&l.st, &l.entry, l.n.clone(), budget, Some(grant.clone()))
    }
}

/// A narrowing in one line, e.g. `vm box: exec [python3], files readOnly`.
fn describe(vm: &str, n: &Narrowing) -> String {
    format!("vm {vm}: {}", describe_narrowing(n))
}

/// A narrowing in one line without the VM, e.g. `exec [python3], files readOnly`.
pub fn describe_narrowing(n: &Narrowing) -> String {
    let mut out = match n.exec_any {
        true => "exec any program".to_string(),
        false => format!("exec {:?}", n.exec_allow),
    };
    if let Some(u) = &n.exec_user {
        out += &format!(" as {u:?}");
    }
    if let Some(c) = &n.exec_cwd {
        out += &format!(" in {c:?}");
    }
    if n.ask_exec {
        out += " (each asked)";
    }
    if n.allow_pty {
        out += ", pty";
    }
    out += &format!(", files {:?}", n.files);
    if n.files == Access::ReadWrite && !n.write_prefixes.is_empty() {
        out += &format!(" under {:?}", n.write_prefixes);
    }
    if n.allow_stop {
        out += ", stop";
    }
    if !n.ports.is_empty() {
        out += &format!(", ports {:?}", n.ports);
    }
    if n.expires_at_ms != 0 {
        out += &format!(", expires {}", n.expires_at_ms);
    }
    out
}

/// Makes a narrowed `Vm` of VM `entry` with `n`; `budget` 0: none of its
/// own, else a budget chained under `parent`; `grant`: the grant it is
/// bound to (that of the cap it was narrowed from). Audited (`vm.narrow`).
pub fn narrowed(
    st: &Rc<SessionState>,
    entry: &Rc<VmEntry>,
    n: Narrowing,
    budget: u64,
    parent: Option<Rc<Budget>>,
    grant: Option<Rc<GrantNode>>,
) -> vm::Client {
    let budget = Budget::chain(budget, parent);
    let chain = grant.as_ref().map(|g| g.chain()).unwrap_or_default();
    st.audit_chain(&entry.name, &chain, "vm.narrow", "Vm", "narrow", Ok(()), &describe(&entry.name, &n));
    unaudited(st, entry, n, budget, grant)
}

/// A narrowed `Vm` of VM `entry` with `n`, `budget` (a chain) and
/// `grant`, not audited: [`narrowed`] audits a new narrowing; a share's
/// [`NarrowVm::rebind`] and a narrowed factory's hand-outs
/// (`crate::narrow_vms`) repeat one already audited.
pub fn unaudited(
    st: &Rc<SessionState>,
    entry: &Rc<VmEntry>,
    n: Narrowing,
    budget: Option<Rc<Budget>>,
    grant: Option<Rc<GrantNode>>,
) -> vm::Client {
    let inner: vm::Client =
        capnp_rpc::new_client(crate::vms::VmImpl { st: st.clone(), entry: entry.clone(), grant: grant.clone() });
    let limits = Rc::new(Limits { st: st.clone(), entry: entry.clone(), n, budget, grant, always: Default::default() });
    let mut set = st.narrow_vms.borrow_mut();
    set.gc();
    set.new_client(NarrowVm { inner, limits })
}

impl vm::Server for NarrowVm {
    async fn info(self: CapRc<Self>, _: vm::InfoParams, mut results: vm::InfoResults) -> capnp::Result<()> {
        self.limits.call("info")?;
        let r = self.inner.info_request().send().promise.await?;
        results.get().set_info(r.get()?.get_info()?)?;
        Ok(())
    }

    async fn exec(self: CapRc<Self>, params: vm::ExecParams, mut results: vm::ExecResults) -> capnp::Result<()> {
        self.limits.call("exec")?;
        let p = params.get()?;
        let mut spec = ExecRequest::read_from(p.get_spec()?)??;
        self.limits.n.check_exec(&mut spec).map_err(|e| self.limits.deny("exec", e))?;
        if self.limits.n.ask_exec {
            self.limits.ask(&spec.argv).await.map_err(|e| self.limits.deny("exec", e))?;
        }
        let mut req = self.inner.exec_request();
        {
            let mut r = req.get();
            spec.write_to(r.reborrow().init_spec());
            r.set_stdout(p.get_stdout()?);
            r.set_stderr(p.get_stderr()?);
        }
        let resp = req.send().promise.await?;
        results.get().set_process(resp.get()?.get_process()?);
        Ok(())
    }

    async fn files(self: CapRc<Self>, _: vm::FilesParams, mut results: vm::FilesResults) -> capnp::Result<()> {
        self.limits.call("files")?;
        if self.limits.n.files == Access::None {
            return Err(self.limits.deny("files", CvError::denied("this cap may not reach files")).into());
        }
        let inner = self.inner.files_request().send().pipeline.get_files();
        results.get().set_files(capnp_rpc::new_client(NarrowFiles { inner, limits: self.limits.clone() }));
        Ok(())
    }

    async fn stop(self: CapRc<Self>, _: vm::StopParams, _: vm::StopResults) -> capnp::Result<()> {
        self.limits.call("stop")?;
        if !self.limits.n.allow_stop {
            return Err(self.limits.deny("stop", CvError::denied("this cap may not stop the VM")).into());
        }
        self.inner.stop_request().send().promise.await?;
        Ok(())
    }

    async fn ping(self: CapRc<Self>, _: vm::PingParams, _: vm::PingResults) -> capnp::Result<()> {
        self.limits.call("ping")?;
        self.inner.ping_request().send().promise.await?;
        Ok(())
    }

    async fn connect(
        self: CapRc<Self>,
        params: vm::ConnectParams,
        mut results: vm::ConnectResults,
    ) -> capnp::Result<()> {
        self.limits.call("connect")?;
        let p = params.get()?;
        let port = p.get_port();
        if !self.limits.n.ports.contains(&port) {
            return Err(self
                .limits
                .deny("connect", CvError::denied(format!("this cap may not reach port {port}")))
                .into());
        }
        let mut req = self.inner.connect_request();
        req.get().set_port(port);
        req.get().set_down(p.get_down()?);
        let resp = req.send().promise.await?;
        results.get().set_up(resp.get()?.get_up()?);
        Ok(())
    }

    async fn narrow(self: CapRc<Self>, params: vm::NarrowParams, mut results: vm::NarrowResults) -> capnp::Result<()> {
        self.limits.call("narrow")?;
        let r = params.get()?.get_narrowing()?;
        let next = Narrowing::read(r)?;
        let n = self.limits.n.then(&next).map_err(|e| self.limits.deny("narrow", e))?;
        let l = &self.limits;
        let vm = narrowed(&l.st, &l.entry, n, r.get_call_budget(), l.budget.clone(), l.grant.clone());
        results.get().set_vm(vm);
        Ok(())
    }
}

/// `Files` of a narrowed `Vm`: reads and lists pass, writes are checked.
struct NarrowFiles {
    inner: files::Client,
    limits: Rc<Limits>,
}

impl files::Server for NarrowFiles {
    async fn read(self: CapRc<Self>, params: files::ReadParams, mut results: files::ReadResults) -> capnp::Result<()> {
        self.limits.call("files.read")?;
        let p = params.get()?;
        let mut req = self.inner.read_request();
        req.get().set_path(p.get_path()?);
        req.get().set_sink(p.get_sink()?);
        let resp = req.send().promise.await?;
        results.get().set_size(resp.get()?.get_size());
        Ok(())
    }

    async fn write(
        self: CapRc<Self>,
        params: files::WriteParams,
        mut results: files::WriteResults,
    ) -> capnp::Result<()> {
        self.limits.call("files.write")?;
        let p = params.get()?;
        let path = p.get_path()?.to_str().map_err(|_| CvError::invalid("path: not UTF-8"))?;
        self.limits.n.check_write(path).map_err(|e| self.limits.deny("files.write", e))?;
        // guest-init resolves the path beneath the longest prefix that
        // allowed it (openat2 RESOLVE_BENEATH), so a symlink made in the
        // guest cannot lead the write elsewhere; a `beneath` the caller
        // gives is kept when it lies under that prefix (it only narrows).
        let given = p.get_beneath()?.to_str().map_err(|_| CvError::invalid("beneath: not UTF-8"))?;
        let norm = normalise(path).unwrap_or_default();
        let matched = self.limits.n.write_prefixes.iter().filter(|q| under(&norm, q)).max_by_key(|q| q.len());
        let beneath = match (matched, normalise(given)) {
            (None, _) => given.to_string(),
            (Some(q), Some(g)) if under(&g, q) => g,
            (Some(q), _) => q.clone(),
        };
        let mut req = self.inner.write_request();
        req.get().set_path(path);
        req.get().set_mode(p.get_mode());
        req.get().set_beneath(beneath.as_str());
        let resp = req.send().promise.await?;
        results.get().set_sink(resp.get()?.get_sink()?);
        Ok(())
    }

    async fn list(self: CapRc<Self>, params: files::ListParams, mut results: files::ListResults) -> capnp::Result<()> {
        self.limits.call("files.list")?;
        let mut req = self.inner.list_request();
        req.get().set_path(params.get()?.get_path()?);
        let resp = req.send().promise.await?;
        results.get().set_entries(resp.get()?.get_entries()?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n() -> Narrowing {
        Narrowing {
            exec_allow: vec!["python3".into(), "/bin/ls".into()],
            exec_any: false,
            ask_exec: false,
            exec_user: Some("agent".into()),
            exec_cwd: None,
            allow_pty: false,
            files: Access::ReadWrite,
            write_prefixes: vec!["/work".into()],
            allow_stop: false,
            ports: vec![8000],
            expires_at_ms: 5000,
        }
    }

    #[test]
    fn exec_any_narrows_to_a_list_and_never_back() {
        let run = |n: &Narrowing, prog: &str| {
            let mut spec = ExecRequest { argv: vec![prog.into()], ..Default::default() };
            n.check_exec(&mut spec).map(|_| ())
        };
        let any = Narrowing { exec_any: true, exec_allow: vec![], ..n() };
        assert!(run(&any, "sh").is_ok() && run(&any, "/usr/bin/anything").is_ok());
        let listed = any.then(&Narrowing { exec_any: false, exec_allow: vec!["python3".into()], ..n() }).unwrap();
        assert!(!listed.exec_any && listed.exec_allow == ["python3"]);
        assert!(run(&listed, "python3").is_ok() && run(&listed, "sh").is_err());
        let back = listed.then(&Narrowing { exec_any: true, exec_allow: vec!["sh".into()], ..n() }).unwrap();
        assert!(!back.exec_any && back.exec_allow.is_empty(), "a list never widens back to any: {back:?}");
        assert!(run(&back, "sh").is_err() && run(&back, "python3").is_err());
        let still = any.then(&Narrowing { exec_any: true, ..n() }).unwrap();
        assert!(still.exec_any, "any stays any only when both ask");
    }

    #[test]
    fn paths_are_normalised_and_prefixes_are_component_wise() {
        assert_eq!(normalise("/work//a/./b").as_deref(), Some("/work/a/b"));
        assert_eq!(normalise("/work/../etc"), None);
        assert_eq!(normalise("work/a"), None);
        assert!(under("/work/a", "/work") && under("/work", "/work") && !under("/workshop", "/work"));
        let x = n();
        assert!(x.check_write("/work/out.txt").is_ok());
        for bad in ["/etc/passwd", "/workshop/x", "/work/../etc/x", "relative"] {
            assert_eq!(
                x.check_write(bad).unwrap_err().code,
                capvisor_rpc::schema::common_capnp::ErrorCode::Denied,
                "{bad}"
            );
        }
        let ro = Narrowing { files: Access::ReadOnly, ..n() };
        assert!(ro.check_write("/work/a").is_err());
    }

    #[test]
    fn exec_checks_the_program_the_pty_secrets_and_fixes_the_user() {
        let x = n();
        let mut spec = ExecRequest { argv: vec!["python3".into(), "-c".into(), "1".into()], ..Default::default() };
        x.check_exec(&mut spec).unwrap();
        assert_eq!(spec.user, "agent");
        for argv0 in ["sh", "python", "/usr/bin/python3", ""] {
            let mut s = ExecRequest { argv: vec![argv0.into()], ..Default::default() };
            assert!(x.check_exec(&mut s).is_err(), "{argv0:?}");
        }
        let mut s = ExecRequest { argv: vec!["python3".into()], user: "root".into(), ..Default::default() };
        assert!(x.check_exec(&mut s).is_err(), "another user");
        let mut s = ExecRequest { argv: vec!["python3".into()], pty: Some((24, 80)), ..Default::default() };
        assert!(x.check_exec(&mut s).is_err(), "pty");
        let mut s = ExecRequest {
            argv: vec!["python3".into()],
            secret_env: vec![("T".into(), "api".into())],
            ..Default::default()
        };
        assert!(x.check_exec(&mut s).is_err(), "secrets");
    }

    /// Every way of asking for more than the cap has is refused or
    /// intersected away.
    #[test]
    fn narrowing_again_never_widens() {
        let x = n();
        let wide = Narrowing {
            exec_allow: vec!["python3".into(), "sh".into()],
            exec_any: false,
            ask_exec: false,
            exec_user: None,
            exec_cwd: Some("/".into()),
            allow_pty: true,
            files: Access::ReadWrite,
            write_prefixes: Vec::new(),
            allow_stop: true,
            ports: vec![8000, 22],
            expires_at_ms: 0,
        };
        let y = x.then(&wide).unwrap();
        assert_eq!(y.exec_allow, vec!["python3".to_string()], "sh was never allowed");
        assert_eq!(y.exec_user.as_deref(), Some("agent"));
        assert!(!y.allow_pty && !y.allow_stop);
        assert_eq!(y.write_prefixes, vec!["/work".to_string()], "an empty list does not mean anywhere again");
        assert_eq!(y.ports, vec![8000]);
        assert_eq!(y.expires_at_ms, 5000, "no expiry does not lift the earlier one");
        assert!(x.then(&Narrowing { exec_user: Some("root".into()), ..wide.clone() }).is_err());
        assert!(x.then(&Narrowing { write_prefixes: vec!["/".into()], ..wide.clone() }).is_err());
        assert!(x.then(&Narrowing { write_prefixes: vec!["/workshop".into()], ..wide.clone() }).is_err());
        let z = x
            .then(&Narrowing { write_prefixes: vec!["/work/sub".into()], expires_at_ms: 9000, ..wide.clone() })
            .unwrap();
        assert_eq!((z.write_prefixes[0].as_str(), z.expires_at_ms), ("/work/sub", 5000));
        let ro = x.then(&Narrowing { files: Access::ReadOnly, ..wide.clone() }).unwrap();
        let back = ro.then(&wide).unwrap();
        assert_eq!(back.files, Access::ReadOnly, "file access only goes down");
    }

    #[test]
    fn budgets_chain_and_a_spent_link_denies() {
        let parent = Some(Rc::new(Budget { left: Cell::new(2), parent: None }));
        let child = Some(Rc::new(Budget { left: Cell::new(5), parent: parent.clone() }));
        assert!(Budget::take(&child).is_ok());
        assert!(Budget::take(&child).is_ok());
        assert!(Budget::take(&child).is_err(), "the parent's budget is spent");
        assert_eq!(child.as_ref().unwrap().left.get(), 3, "a denied call takes nothing");
        assert!(Budget::take(&parent).is_err());
        assert!(Budget::take(&None).is_ok(), "no budget: unlimited");
    }
}
