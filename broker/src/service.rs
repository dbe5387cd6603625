//! The broker's session logic: login decisions, session minting, worker
//! lifecycle, resume and attach by token, logout, expiry, accounts, audit,
//! shutdown. The capnp servers in [`crate::server`] are thin shells over
//! [`BrokerService`].
//!
//! Token rule (resume and attach alike): a token that does not name a live
//! session (never issued, logged out, expired, revoked, worker gone) gets
//! `staleSession` — the same answer in every case, so a caller learns
//! nothing about tokens that are not its own.

use crate::audit::{AuditLog, AuditRecord};
use crate::config::BrokerConfig;
use crate::launch::{Launched, Launcher};
use crate::store::{self, CredentialStore};
use crate::throttle::{self, Throttle};
use crate::token::{self, TokenIndex};
use capvisor_manifest::{Bundle, SessionContext};
use capvisor_rpc::fdpass::FdChannel;
use capvisor_rpc::principal::{PeerCred, Principal};
use capvisor_rpc::schema::capvisor_capnp::{login_info, session, AuthMethod};
use capvisor_rpc::schema::internal_capnp::{session_host, worker, RevokeReason};
use capvisor_rpc::{CvError, CvResult};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Duration;

/// How long a worker may take to answer `Worker.session`.
pub const WORKER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `Worker.revoke` may take before the broker stops waiting.
pub const REVOKE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long shutdown waits for workers to exit before SIGKILL.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a worker process may linger after its connection ended.
pub const LINGER: Duration = Duration::from_secs(10);
/// Argon2 verifications running at once (each takes a core for tens of ms).
pub const MAX_VERIFY: usize = 2;
/// Password logins waiting for or holding a verification slot at once; one
/// more gets `unavailable` at once instead of queueing without bound.
pub const MAX_VERIFY_QUEUE: usize = 32;
/// Most client sockets passed for login calls ([`BrokerService::add_login_socket`])
/// the broker holds at once; one more is closed at once (its call is then
/// denied). Sockets whose client hung up are dropped first.
pub const MAX_LOGIN_SOCKETS: usize = 1024;
/// How long a passed login socket waits for the call that names it; an
/// older one is dropped.
pub const LOGIN_SOCKET_TTL: Duration = Duration::from_secs(30);
/// How long a login call waits for the socket it names to arrive (it is
/// sent just before the call, on another channel).
pub const LOGIN_SOCKET_WAIT: Duration = Duration::from_secs(5);
/// The message of every failed password login, whatever the reason.
pub const BAD_LOGIN: &str = "invalid user name or password";

/// What a successful login or resume hands the client (schema: the
/// `session` and `info :LoginInfo` results of every login method).
pub struct Grant {
    /// Session id (not a credential).
    pub session_id: String,
    /// The worker's `Session` cap.
    pub session: session::Client,
    /// The resume token (secret).
    pub token: String,
    /// Who logged in.
    pub principal: Principal,
    /// Profile name.
    pub profile: String,
    /// Unix epoch milliseconds.
    pub expires_at_ms: i64,
}

impl Grant {
    /// Writes the login facts into a schema `LoginInfo` (the session cap
    /// goes into the results' `session` field beside it).
    pub fn write_info(&self, mut b: login_info::Builder<'_>) {
        b.set_resume_token(self.token.as_str());
        self.principal.write_to(b.reborrow().init_principal());
        b.set_profile(self.profile.as_str());
        b.set_expires_at_ms(self.expires_at_ms);
    }
}

struct LiveSession {
    id: String,
    principal: Principal,
    profile: String,
    expires_at_ms: i64,
    worker: worker::Client,
    attach: FdChannel,
    expiry: RefCell<Option<tokio::task::JoinHandle<()>>>,
}

/// The broker's state (single-threaded: lives in the RPC `LocalSet`).
pub struct BrokerService {
    cfg: BrokerConfig,
    store: Arc<CredentialStore>,
    audit: Arc<AuditLog>,
    launcher: Box<dyn Launcher>,
    sessions: RefCell<HashMap<String, Rc<LiveSession>>>,
    tokens: RefCell<TokenIndex>,
    throttle: RefCell<Throttle>,
    /// Worker pids by session id, until reaped.
    children: RefCell<HashMap<String, u32>>,
    verify_permits: Arc<tokio::sync::Semaphore>,
    /// Password logins waiting for or holding a verification slot.
    verify_queue: Cell<usize>,
    /// One password attempt at a time per source (peer uid): its
    /// verification and failure delay; later ones wait their turn here.
    source_turns: RefCell<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Account names with a password login in progress (verification and
    /// failure delay): one attempt per account at a time.
    attempts: RefCell<std::collections::HashSet<String>>,
    /// Running VMs and their guest memory, per principal and on the host.
    vm_budget: RefCell<VmBudget>,
    /// Every principal's persistent volumes and their leases.
    volumes: crate::volumes::VolumeStore,
    /// Every principal's secrets, sealed at rest.
    secrets: crate::secrets::SecretStore,
    /// Live grants: share tokens and delegate sessions' resume tokens.
    grants: RefCell<crate::grants::GrantRegistry>,
    /// Client sockets passed by the gateway for login calls, by `conn` id.
    login_sockets: RefCell<HashMap<String, LoginSocket>>,
    /// Wakes login calls waiting for their socket.
    login_socket_arrived: tokio::sync::Notify,
    shutting_down: Cell<bool>,
}

/// A client socket passed for one login call, with its peer's credentials
/// read when it arrived.
struct LoginSocket {
    peer: PeerCred,
    fd: OwnedFd,
    at: std::time::Instant,
}

/// Whether the client at the other end of `fd` hung up (POLLRDHUP/POLLHUP,
/// poll(2)); reads nothing.
fn hung_up(fd: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd for a descriptor we own; timeout 0 (no wait).
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// The user name of `uid` from the passwd database, else the number.
pub fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => u.name,
        _ => uid.to_string(),
    }
}

/// How an untrusted user name appears in audit lines and principals of
/// failed logins: as typed if it is a valid account name, else a
/// placeholder (people type passwords into the user field).
pub fn shown_user(user: &str) -> &str {
    if store::valid_name(user) {
        user
    } else {
        "<invalid name>"
    }
}

/// `unix:uid=U pid=P` of the peer of a connected Unix socket (SO_PEERCRED,
/// unix(7)), or `""`.
pub fn socket_peer(fd: &OwnedFd) -> String {
    PeerCred::of_socket(fd).map(|p| p.to_string()).unwrap_or_default()
}

/// Owner (uid and gid) of a new volume's root directory: the `debian`
/// image's unprivileged `agent` user, so it can write there; root can
/// anyway.
pub const VOLUME_ROOT_OWNER: u32 = 1000;

impl BrokerService {
    /// Opens the credential store (new hashes with `params`) and the audit
    /// log in `cfg.state_dir`, and creates `state_dir/sessions` (0700).
    ///
    /// Errors: the state directory is unusable or `accounts.json` is corrupt.
    pub fn new(cfg: BrokerConfig, launcher: Box<dyn Launcher>, params: argon2::Params) -> anyhow::Result<Rc<Self>> {
        use anyhow::Context;
        let sessions_dir = cfg.state_dir.join("sessions");
        std::fs::create_dir_all(&sessions_dir).with_context(|| format!("creating {}", sessions_dir.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&sessions_dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let store = CredentialStore::open(&cfg.accounts_path(), cfg.manifest.profiles.keys().cloned(), params)?;
        let volumes = crate::volumes::VolumeStore::open(&cfg.state_dir)
            .with_context(|| format!("creating {}", cfg.state_dir.join("volumes").display()))?;
        let secrets = crate::secrets::SecretStore::open(&cfg.state_dir)
            .with_context(|| format!("opening the secret store in {}", cfg.state_dir.display()))?;
        let audit = AuditLog::open(&cfg.audit_path())
            .with_context(|| format!("opening {}", cfg.audit_path().display()))?
            .with_index(&cfg.state_dir.join("audit.sqlite"));
        let store = Arc::new(store);
        {
            let store = store.clone();
            std::thread::spawn(move || store.warm());
        }
        Ok(Rc::new(Self {
            cfg,
            store,
            audit: Arc::new(audit),
            launcher,
            sessions: RefCell::new(HashMap::new()),
            tokens: RefCell::new(TokenIndex::default()),
            throttle: RefCell::new(Throttle::default()),
            children: RefCell::new(HashMap::new()),
            verify_permits: Arc::new(tokio::sync::Semaphore::new(MAX_VERIFY)),
            verify_queue: Cell::new(0),
            source_turns: RefCell::new(std::collections::HashMap::new()),
            attempts: RefCell::new(std::collections::HashSet::new()),
            vm_budget: RefCell::new(VmBudget::default()),
            volumes,
            secrets,
            grants: RefCell::new(Default::default()),
            login_sockets: RefCell::new(HashMap::new()),
            login_socket_arrived: tokio::sync::Notify::new(),
            shutting_down: Cell::new(false),
        }))
    }

    /// The configuration the supervisor passed at spawn (state dir,
    /// manifest, worker binary; see [`BrokerConfig`]).
    pub fn config(&self) -> &BrokerConfig {
        &self.cfg
    }

    /// The credential store.
    pub fn store(&self) -> &Arc<CredentialStore> {
        &self.store
    }

    /// Appends an audit record.
    pub fn audit(&self, rec: AuditRecord) {
        self.audit.write(rec)
    }

    /// Sources (peer uids) with a password attempt in progress or waiting.
    pub fn sources_in_progress(&self) -> usize {
        self.source_turns.borrow().len()
    }

    /// The audit log (for closing coalesced runs: `flush_due`, `flush_all`).
    pub fn audit_log(&self) -> &AuditLog {
        &self.audit
    }

    /// Number of live sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.borrow().len()
    }

    /// Ids of live sessions.
    pub fn session_ids(&self) -> Vec<String> {
        self.sessions.borrow().keys().cloned().collect()
    }

    // ---- logins ---------------------------------------------------------

    /// Takes in a client socket the gateway passed for a login call
    /// (`login:<conn>` on its attach channel): reads the peer's credentials
    /// from it now (SO_PEERCRED, SO_PEERGROUPS) and keeps it until the call
    /// naming `conn` takes it ([`Self::login_socket`]). Drops sockets older
    /// than [`LOGIN_SOCKET_TTL`] or whose client hung up; beyond
    /// [`MAX_LOGIN_SOCKETS`] the new one is closed (logged).
    pub fn add_login_socket(&self, conn: &str, fd: OwnedFd) {
        let peer = match PeerCred::of_socket(&fd) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("a login socket without peer credentials: {e}");
                return;
            }
        };
        let mut m = self.login_sockets.borrow_mut();
        if m.len() >= MAX_LOGIN_SOCKETS / 2 {
            m.retain(|_, s| s.at.elapsed() < LOGIN_SOCKET_TTL && !hung_up(&s.fd));
        }
        if m.len() >= MAX_LOGIN_SOCKETS {
            tracing::warn!("{MAX_LOGIN_SOCKETS} login sockets are waiting for their calls; closing one more");
            return;
        }
        m.insert(conn.to_string(), LoginSocket { peer, fd, at: std::time::Instant::now() });
        drop(m);
        self.login_socket_arrived.notify_waiters();
    }

    /// The client socket a login call names by `conn`, and its peer's
    /// credentials, waiting up to [`LOGIN_SOCKET_WAIT`] for it to arrive.
    /// The caller holds the descriptor until the login is decided, then
    /// drops (closes) it.
    ///
    /// Errors: `denied` when no such socket arrives (audited under
    /// `method`): the broker takes no identity from the gateway's words.
    pub async fn login_socket(&self, conn: &str, method: &str) -> CvResult<(PeerCred, OwnedFd)> {
        let deadline = tokio::time::Instant::now() + LOGIN_SOCKET_WAIT;
        loop {
            let arrived = self.login_socket_arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(s) = self.login_sockets.borrow_mut().remove(conn) {
                return Ok((s.peer, s.fd));
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                break;
            }
        }
        let action = if method == "resume" { "resume" } else { "login" };
        self.audit(
            AuditRecord::new(action, "Gateway", method, "denied")
                .detail("the gateway named no client socket it passed"),
        );
        Err(CvError::denied("the server could not identify this connection"))
    }

    /// Client sockets waiting for their login calls.
    pub fn login_sockets_held(&self) -> usize {
        self.login_sockets.borrow().len()
    }

    /// `Broker.loginLocal` of the client `peer` (credentials the broker
    /// read from the client's socket, [`Self::login_socket`]). The profile:
    /// `owner` for a uid in the resolved `owner_uids`; else the manifest's
    /// `[[local.map]]` rules for the uid, its primary gid and its
    /// supplementary groups (SO_PEERGROUPS: the groups the client process
    /// held when it connected, not the group database's current view);
    /// principal `local:<user name>`.
    ///
    /// Errors: `denied` when local login is disabled or the peer matches no
    /// rule (audited); `unavailable` when the worker does not start;
    /// `quota` when a session bound is reached (docs/bounds.md).
    pub async fn login_local(self: &Rc<Self>, peer: &PeerCred) -> CvResult<Grant> {
        let uid = peer.uid;
        let peer_text = peer.to_string();
        let rec = |outcome: &str| AuditRecord::new("login", "Gateway", "loginLocal", outcome).peer(&peer_text);
        let principal = Principal::new(AuthMethod::Local, user_name(uid));
        let shown = principal.to_string();
        if !self.cfg.auth_enabled(AuthMethod::Local) {
            self.audit(rec("denied").principal(&shown).detail("local login is disabled"));
            return Err(CvError::denied("local login is disabled on this server"));
        }
        let profile = if self.cfg.owner_uids.contains(&uid) {
            "owner".to_string()
        } else if let Some(p) = self.cfg.manifest.local.profile_for(uid, peer.gid, &peer.groups) {
            p.to_string()
        } else {
            let groups: Vec<String> = peer.groups.iter().map(|g| g.to_string()).collect();
            self.audit(rec("denied").principal(&shown).detail(format!(
                "uid {uid} (gid {}, groups [{}]) is no owner uid and matches no [[local.map]] rule",
                peer.gid,
                groups.join(",")
            )));
            return Err(CvError::denied(format!("uid {uid} may not log in locally")));
        };
        let res = self.open_session_detached(principal, profile.clone()).await;
        match &res {
            Ok(g) => {
                self.audit(rec("ok").principal(&shown).session(&g.session_id).detail(format!("profile={profile}")))
            }
            Err(e) => self.audit(rec(e.code_name()).principal(&shown).detail(e.message.clone())),
        }
        res
    }

    /// `Broker.loginPassword`.
    ///
    /// Every failure answers `denied` with [`BAD_LOGIN`] (password login
    /// disabled: its own message) after a [`throttle`] delay; an unknown
    /// user and a wrong password cost the same Argon2 verification.
    pub async fn login_password(self: &Rc<Self>, user: &str, password: &str, peer: &str) -> CvResult<Grant> {
        let shown = shown_user(user).to_string();
        let principal = format!("password:{shown}");
        let rec = |outcome: &str| {
            AuditRecord::new("login", "Gateway", "loginPassword", outcome).peer(peer).principal(&principal)
        };
        let key = throttle::key(user, peer);
        // One attempt per account at a time, verification and failure delay
        // included: parallel guesses at one account do not run in parallel.
        let account: String = user.chars().take(64).collect();
        if !self.attempts.borrow_mut().insert(account.clone()) {
            self.audit(rec("denied").detail("another login for this account is in progress"));
            return Err(CvError::denied("another login for this account is in progress; try again"));
        }
        struct Attempt<'a>(&'a RefCell<std::collections::HashSet<String>>, String);
        impl Drop for Attempt<'_> {
            fn drop(&mut self) {
                self.0.borrow_mut().remove(&self.1);
            }
        }
        let _attempt = Attempt(&self.attempts, account);
        let mut turn: Option<SourceTurn<'_>> = None;
        let verdict: Result<String, (&str, CvError)> = if !self.cfg.auth_enabled(AuthMethod::Password) {
            Err(("password login is disabled", CvError::denied("password login is disabled on this server")))
        } else {
            // A bounded queue in front of the verification slots.
            if self.verify_queue.get() >= MAX_VERIFY_QUEUE {
                self.audit(rec("unavailable").detail("verification queue full"));
                return Err(CvError::unavailable("too many logins in progress; try again in a moment"));
            }
            self.verify_queue.set(self.verify_queue.get() + 1);
            struct Queued<'a>(&'a Cell<usize>);
            impl Drop for Queued<'_> {
                fn drop(&mut self) {
                    self.0.set(self.0.get() - 1);
                }
            }
            let queued = Queued(&self.verify_queue);
            // The source's earlier attempt (verification and failure delay)
            // ends before this one verifies: one source's guesses at many
            // accounts do not run in parallel either.
            turn = Some(SourceTurn::wait(&self.source_turns, throttle::source(peer)).await);
            let known = self.store.contains(user);
            let permit = self.verify_permits.clone().acquire_owned().await;
            let store = self.store.clone();
            let (u, p) = (user.to_string(), password.to_string());
            let res = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let verdict = store.verify(&u, &p);
                // Argon2 allocates its memory (tens of MiB) per verification
                // on whichever blocking-pool thread runs it; glibc keeps the
                // freed block in that thread's arena, so every pool thread
                // would hold one for good (the soak run measured the broker
                // at 523 MiB). Hand it back now.
                // SAFETY: malloc_trim(3) only returns free heap memory to
                // the kernel; it takes no pointers.
                unsafe { libc::malloc_trim(0) };
                verdict
            })
            .await
            .unwrap_or(None);
            drop(queued);
            match res {
                Some(profile) => Ok(profile),
                None if known => Err(("wrong password", CvError::denied(BAD_LOGIN))),
                None => Err(("no such account", CvError::denied(BAD_LOGIN))),
            }
        };
        match verdict {
            Ok(profile) => {
                drop(turn.take());
                self.throttle.borrow_mut().on_success(&key);
                if self.cfg.manifest.bundle_for(&profile).is_none() {
                    self.audit(rec("denied").detail(format!("account profile {profile:?} is not in the manifest")));
                    return Err(CvError::denied(format!("this account's profile {profile:?} no longer exists")));
                }
                let res = self.open_session_detached(Principal::new(AuthMethod::Password, user), profile.clone()).await;
                match &res {
                    Ok(g) => self.audit(rec("ok").session(&g.session_id).detail(format!("profile={profile}"))),
                    Err(e) => self.audit(rec(e.code_name()).detail(e.message.clone())),
                }
                res
            }
            Err((why, e)) => {
                let delay = self.throttle.borrow_mut().on_failure(&key);
                self.audit(rec("denied").detail(format!("{why}; delayed {} ms", delay.as_millis())));
                tokio::time::sleep(delay).await;
                drop(turn);
                Err(e)
            }
        }
    }

    /// `Broker.resume`: a new `Session` cap for the live session of `token`.
    ///
    /// Errors: `staleSession` (see the module docs); `unavailable` when
    /// the worker does not answer.
    pub async fn resume(self: &Rc<Self>, token: &str, peer: &str) -> CvResult<Grant> {
        let rec = |outcome: &str| AuditRecord::new("resume", "Gateway", "resume", outcome).peer(peer);
        let Some(s) = self.session_for_token(token) else {
            let found = self.grants.borrow().by_delegate_token(token, crate::now_ms());
            if let Some(found) = found {
                return self.delegate_session(found, token.to_string(), "resume", peer).await;
            }
            self.audit(rec("staleSession").detail("no live session for this token"));
            return Err(CvError::stale());
        };
        match worker_session(&s.worker).await {
            Ok(cap) => {
                self.audit(rec("ok").principal(&s.principal.to_string()).session(&s.id));
                Ok(Grant {
                    session_id: s.id.clone(),
                    session: cap,
                    token: token.to_string(),
                    principal: s.principal.clone(),
                    profile: s.profile.clone(),
                    expires_at_ms: s.expires_at_ms,
                })
            }
            Err(e) => {
                self.audit(
                    rec(e.code_name()).principal(&s.principal.to_string()).session(&s.id).detail(e.message.clone()),
                );
                Err(e)
            }
        }
    }

    // ---- grants ---------------------------------------------------------

    /// `Broker.redeem`: a share token into a delegate session on the
    /// grantor's worker (`Worker.delegate`), with a resume token of its own
    /// (expiring with the grant). Audited (`grant.redeem`, with the chain).
    ///
    /// Errors: `staleSession` for every kind of bad token (unknown,
    /// expired, revoked, grantor gone; see the module docs); `quota` when
    /// too many delegate sessions are live.
    pub async fn redeem(self: &Rc<Self>, token: &str, peer: &str) -> CvResult<Grant> {
        let found = self.grants.borrow().by_share_token(token, crate::now_ms());
        let Some(found) = found else {
            self.audit(
                AuditRecord::new("grant.redeem", "Gateway", "redeem", "staleSession")
                    .peer(peer)
                    .detail("no live grant for this token"),
            );
            return Err(CvError::stale());
        };
        let minted = self.grants.borrow_mut().redeem(&found.0);
        let minted = minted.map_err(|why| {
            let e = CvError::quota(why);
            self.audit(
                AuditRecord::new("grant.redeem", "Gateway", "redeem", e.code_name())
                    .peer(peer)
                    .principal(&format!("grant:{}", found.0))
                    .session(&found.1.session_id)
                    .grants(&found.1.chain)
                    .detail(why),
            );
            e
        })?;
        self.delegate_session(found, minted, "redeem", peer).await
    }

    /// The delegate `Session` of grant `found` from its worker, handed out
    /// with resume token `token` (`how`: "redeem" or "resume", audited).
    async fn delegate_session(
        self: &Rc<Self>,
        found: crate::grants::Found,
        token: String,
        how: &str,
        peer: &str,
    ) -> CvResult<Grant> {
        let (id, g) = found;
        let principal = Principal::new(AuthMethod::Grant, id.clone());
        let rec = |outcome: &str| {
            AuditRecord::new(&format!("grant.{how}"), "Gateway", how, outcome)
                .peer(peer)
                .principal(&principal.to_string())
                .session(&g.session_id)
                .grants(&g.chain)
        };
        let live = self.sessions.borrow().get(&g.session_id).cloned();
        let Some(s) = live else {
            self.audit(rec("staleSession").detail("the grantor session ended"));
            return Err(CvError::stale());
        };
        let mut req = s.worker.delegate_request();
        req.get().set_grant_id(id.as_str());
        let res = match tokio::time::timeout(WORKER_TIMEOUT, req.send().promise).await {
            Ok(Ok(r)) => {
                r.get().and_then(|r| r.get_session()).map_err(|e| CvError::relay(e, |e| CvError::unavailable(e.extra)))
            }
            Ok(Err(e)) => Err(CvError::relay(e, |e| CvError::unavailable(format!("worker: {}", e.extra)))),
            Err(_) => Err(CvError::unavailable("the grantor's worker did not answer")),
        };
        match res {
            Ok(session) => {
                self.audit(rec("ok").detail(g.label.clone()));
                Ok(Grant {
                    session_id: id,
                    session,
                    token,
                    principal,
                    profile: "delegate".into(),
                    expires_at_ms: g.expires_at_ms,
                })
            }
            Err(e) => {
                self.audit(rec(e.code_name()).detail(e.message.clone()));
                Err(e)
            }
        }
    }

    /// `SessionHost.receivedGrants` of session `sid` of `principal`: the
    /// live grants made to `principal`, each with its delegate session
    /// (a grant whose worker does not answer is left out, and audited).
    pub async fn received_grants(
        self: &Rc<Self>,
        principal: &str,
        sid: &str,
    ) -> Vec<(crate::grants::GrantRecord, Grant)> {
        let found = self.grants.borrow().for_principal(principal, crate::now_ms());
        let mut out = Vec::new();
        for f in found {
            let rec = f.1.clone();
            if let Ok(g) = self.delegate_session(f, String::new(), "receive", &format!("session:{sid}")).await {
                out.push((rec, g));
            }
        }
        out
    }

    /// `SessionHost.addGrant` of session `sid`: registers the grant and
    /// returns its token. Audited (`grant.create`).
    ///
    /// Errors: `quota` past [`crate::grants::MAX_GRANTS_PER_SESSION`];
    /// `invalidArgument` for a duplicate id; `staleSession` when the
    /// session is gone.
    pub fn add_grant(&self, sid: &str, id: &str, rec: crate::grants::GrantRecord, what: &str) -> CvResult<String> {
        if !self.sessions.borrow().contains_key(sid) {
            return Err(CvError::stale());
        }
        let audit = AuditRecord::new("grant.create", "Shares", "share", "ok")
            .principal(&rec.grantor)
            .session(sid)
            .grants(&rec.chain)
            .detail(format!(
                "{:?}{}: {what}",
                rec.label,
                if rec.to.is_empty() { String::new() } else { format!(" to {}", rec.to) }
            ));
        let res = self.grants.borrow_mut().add(id, rec);
        match res {
            Ok(token) => {
                self.audit(audit);
                Ok(token)
            }
            Err(e) => {
                let err = if e.contains("too many") { CvError::quota(e) } else { CvError::invalid(e) };
                self.audit(AuditRecord { outcome: err.code_name().into(), ..audit });
                Err(err)
            }
        }
    }

    /// `SessionHost.endGrants` of session `sid`: the grants' tokens and
    /// delegate sessions stop attaching. Audited (`grant.revoke`, or
    /// `grant.expire` when `reason` is "expired").
    pub fn end_grants(&self, sid: &str, ids: &[String], reason: &str) {
        let action = if reason == "expired" { "grant.expire" } else { "grant.revoke" };
        for id in ids {
            let rec = self.grants.borrow_mut().end(id);
            if let Some(g) = rec.filter(|g| g.session_id == sid) {
                self.audit(
                    AuditRecord::new(action, "Shares", "revoke", "ok")
                        .principal(&g.grantor)
                        .session(sid)
                        .grants(&g.chain)
                        .detail(reason),
                );
            }
        }
    }

    fn session_for_token(&self, token: &str) -> Option<Rc<LiveSession>> {
        let id = self.tokens.borrow().lookup(token, crate::now_ms())?;
        self.sessions.borrow().get(&id).cloned()
    }

    // ---- sessions -------------------------------------------------------

    /// Runs [`Self::open_session`] as its own task so a caller that goes
    /// away mid-login (client disconnect cancels the call) cannot leave a
    /// half-made session: if nobody takes the grant, the session is revoked.
    async fn open_session_detached(self: &Rc<Self>, principal: Principal, profile: String) -> CvResult<Grant> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let me = self.clone();
        tokio::task::spawn_local(async move {
            let res = me.open_session(principal, profile).await;
            if let Err(Ok(grant)) = tx.send(res) {
                tracing::info!(session = %grant.session_id, "login abandoned by its caller; revoking the session");
                me.revoke_session(&grant.session_id, RevokeReason::Revoked, "login abandoned");
            }
        });
        rx.await.unwrap_or_else(|_| Err(CvError::internal("login task failed")))
    }

    /// Mints a session for `principal` with `profile`: id, token, worker.
    async fn open_session(self: &Rc<Self>, principal: Principal, profile: String) -> CvResult<Grant> {
        if self.shutting_down.get() {
            return Err(CvError::unavailable("the server is shutting down"));
        }
        self.require_audit()?;
        let bundle: Bundle = self
            .cfg
            .manifest
            .bundle_for(&profile)
            .cloned()
            .ok_or_else(|| CvError::internal(format!("profile {profile:?} has no bundle")))?;
        self.check_session_limits(&principal, &profile, &bundle)?;
        let id = token::new_session_id();
        let minted = token::mint();
        let ttl_ms = self.cfg.manifest.gateway.session_ttl_secs.min(10 * 365 * 86400) as i64 * 1000;
        let expires_at_ms = crate::now_ms().saturating_add(ttl_ms);
        let images = self
            .cfg
            .images
            .iter()
            .filter(|(name, _)| bundle.images.contains(name))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let ctx = SessionContext {
            session_id: id.clone(),
            principal: principal.clone(),
            profile: profile.clone(),
            bundle: bundle.clone(),
            expires_at_ms,
            images,
            run_dir: self.cfg.state_dir.join("sessions").join(&id),
            auto_engine: self.cfg.manifest.vms.auto_engine(),
            confinement: self.cfg.manifest.confinement.requirements(),
            volume_dir: match bundle.has_cap("volumes") {
                true => Some(self.volumes.principal_dir(&principal.to_string()).map_err(|e| {
                    tracing::error!("cannot make the volume directory of {principal}: {e}");
                    CvError::unavailable("could not prepare the principal's volume directory")
                })?),
                false => None,
            },
            net: self.cfg.manifest.net.clone(),
        };
        let host: session_host::Client = capnp_rpc::new_client(crate::server::SessionHostServer::new(
            Rc::downgrade(self),
            &id,
            &principal.to_string(),
            &bundle,
        ));
        let Launched { worker, attach, ended, child } = self.launcher.launch(&ctx, host).map_err(|e| {
            tracing::error!(session = %id, "cannot start the session's worker: {e:#}");
            CvError::unavailable("could not start the session's worker")
        })?;
        let live = Rc::new(LiveSession {
            id: id.clone(),
            principal: principal.clone(),
            profile: profile.clone(),
            expires_at_ms,
            worker,
            attach,
            expiry: RefCell::new(None),
        });
        self.sessions.borrow_mut().insert(id.clone(), live.clone());
        if let Some(child) = child {
            self.reap(&id, child);
        }
        {
            let me = Rc::downgrade(self);
            let id = id.clone();
            tokio::task::spawn_local(async move {
                let res = ended.await;
                tracing::debug!(session = %id, "worker connection ended: {res:?}");
                if let Some(me) = me.upgrade() {
                    me.forget_session(&id, "worker connection ended");
                    me.kill_after(&id, LINGER);
                }
            });
        }
        let cap = match worker_session(&live.worker).await {
            Ok(cap) => cap,
            Err(e) => {
                self.forget_session(&id, "worker did not start");
                self.kill_child(&id);
                return Err(e);
            }
        };
        if !self.sessions.borrow().contains_key(&id) {
            return Err(CvError::unavailable("the session's worker exited during login"));
        }
        self.tokens.borrow_mut().insert(&id, minted.hash, expires_at_ms);
        let me = Rc::downgrade(self);
        let sid = id.clone();
        let wait = Duration::from_millis((expires_at_ms - crate::now_ms()).max(0) as u64);
        *live.expiry.borrow_mut() = Some(tokio::task::spawn_local(async move {
            tokio::time::sleep(wait).await;
            if let Some(me) = me.upgrade() {
                me.revoke_session(&sid, RevokeReason::Expired, "expired");
            }
        }));
        tracing::info!(session = %id, %principal, %profile, "session started");
        Ok(Grant { session_id: id, session: cap, token: minted.token, principal, profile, expires_at_ms })
    }

    /// Fail closed: `unavailable` while the audit log cannot be written, so
    /// nothing privileged happens without a record.
    fn require_audit(&self) -> CvResult<()> {
        if self.audit.healthy() {
            return Ok(());
        }
        Err(CvError::unavailable(format!(
            "the audit log cannot be written ({} records lost); capvisor refuses this until it can",
            self.audit.lost()
        )))
    }

    /// Reserves room for a running VM of `memory_mib` for `principal`
    /// against its budget and the host's (`[vms] max_host_vms`,
    /// `max_host_memory_mib`, default three quarters of the host's memory).
    /// [`Self::release_vm`] gives it back.
    ///
    /// Errors: `quota` naming the budget that would be exceeded;
    /// `unavailable` while the audit log cannot be written.
    pub fn reserve_vm(&self, principal: &str, budget: crate::server::PrincipalBudget, memory_mib: u64) -> CvResult<()> {
        self.require_audit()?;
        let vms = &self.cfg.manifest.vms;
        let host_mem = vms.max_host_memory_mib.unwrap_or_else(default_host_memory_mib);
        let mut b = self.vm_budget.borrow_mut();
        if b.host_vms >= vms.max_host_vms as u64 {
            return Err(CvError::quota(format!("this host runs {} VMs, its limit", b.host_vms)));
        }
        if b.host_memory_mib.saturating_add(memory_mib) > host_mem {
            return Err(CvError::quota(format!(
                "{memory_mib} MiB more would exceed this host's {host_mem} MiB for VMs ({} MiB in use)",
                b.host_memory_mib
            )));
        }
        let (n, mem) = b.per_principal.get(principal).copied().unwrap_or((0, 0));
        if n >= budget.vms as u64 {
            return Err(CvError::quota(format!("{principal} runs {n} VMs, its limit across sessions")));
        }
        if mem.saturating_add(memory_mib) > budget.memory_mib {
            return Err(CvError::quota(format!(
                "{memory_mib} MiB more would exceed {principal}'s {} MiB for VMs across sessions ({mem} MiB in use)",
                budget.memory_mib
            )));
        }
        b.host_vms += 1;
        b.host_memory_mib += memory_mib;
        b.per_principal.insert(principal.to_string(), (n + 1, mem + memory_mib));
        Ok(())
    }

    /// Takes every verification slot (tests: to hold logins in the queue).
    #[cfg(test)]
    pub(crate) async fn take_verify_slots(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.verify_permits.clone().acquire_many_owned(MAX_VERIFY as u32).await.expect("semaphore open")
    }

    /// Gives back a reservation made by [`Self::reserve_vm`].
    pub fn release_vm(&self, principal: &str, memory_mib: u64) {
        let mut b = self.vm_budget.borrow_mut();
        b.host_vms = b.host_vms.saturating_sub(1);
        b.host_memory_mib = b.host_memory_mib.saturating_sub(memory_mib);
        if let Some((n, mem)) = b.per_principal.get_mut(principal) {
            *n = n.saturating_sub(1);
            *mem = mem.saturating_sub(memory_mib);
            if *n == 0 {
                b.per_principal.remove(principal);
            }
        }
    }

    /// Running VMs reserved on the host and their guest memory, MiB.
    pub fn vm_usage(&self) -> (u64, u64) {
        let b = self.vm_budget.borrow();
        (b.host_vms, b.host_memory_mib)
    }

    /// The session bounds (docs/bounds.md): at most `[sessions] max_total`
    /// live sessions on the host, of which sessions of profiles other than
    /// `owner` may hold at most `max_total - reserved_for_owner` (so they
    /// can never lock the owner out), and at most the bundle's
    /// `max_sessions` per principal.
    ///
    /// Errors: `quota`, naming the bound.
    fn check_session_limits(&self, principal: &Principal, profile: &str, bundle: &Bundle) -> CvResult<()> {
        let limits = &self.cfg.manifest.sessions;
        let sessions = self.sessions.borrow();
        let total = sessions.len() as u32;
        let others = sessions.values().filter(|s| s.profile != "owner").count() as u32;
        let open_to_all = limits.max_total - limits.reserved_for_owner;
        if total >= limits.max_total || (profile != "owner" && others >= open_to_all) {
            return Err(CvError::quota(format!(
                "this host has {total} live sessions (at most {}, of which {} are kept for the owner)",
                limits.max_total, limits.reserved_for_owner
            )));
        }
        let mine = sessions.values().filter(|s| &s.principal == principal).count() as u32;
        if mine >= bundle.max_sessions {
            return Err(CvError::quota(format!(
                "{principal} already holds {mine} live sessions (at most {}); log out of one first",
                bundle.max_sessions
            )));
        }
        Ok(())
    }

    /// Waits for `child` in the background; forgets its pid once reaped.
    fn reap(self: &Rc<Self>, id: &str, mut child: tokio::process::Child) {
        if let Some(pid) = child.id() {
            self.children.borrow_mut().insert(id.to_string(), pid);
        }
        let me = Rc::downgrade(self);
        let id = id.to_string();
        tokio::task::spawn_local(async move {
            let status = child.wait().await;
            tracing::debug!(session = %id, "worker exited: {status:?}");
            if let Some(me) = me.upgrade() {
                me.children.borrow_mut().remove(&id);
            }
        });
    }

    /// SIGKILLs session `id`'s worker if it is still running after `after`.
    fn kill_after(self: &Rc<Self>, id: &str, after: Duration) {
        if !self.children.borrow().contains_key(id) {
            return;
        }
        let me = Rc::downgrade(self);
        let id = id.to_string();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(after).await;
            if let Some(me) = me.upgrade() {
                if me.children.borrow().contains_key(&id) {
                    tracing::warn!(session = %id, "worker still running {after:?} after its connection ended; killing it");
                    me.kill_child(&id);
                }
            }
        });
    }

    /// SIGKILLs session `id`'s worker process, if any (it is unreaped, so
    /// the pid is still ours).
    fn kill_child(&self, id: &str) {
        if let Some(pid) = self.children.borrow().get(id) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// Drops session `id` and its token (worker gone). Audits `session.end`.
    fn forget_session(&self, id: &str, why: &str) {
        self.tokens.borrow_mut().remove(id);
        self.grants.borrow_mut().end_session(id);
        let s = self.sessions.borrow_mut().remove(id);
        if let Some(s) = s {
            if let Some(t) = s.expiry.borrow_mut().take() {
                t.abort();
            }
            tracing::info!(session = %id, "session ended: {why}");
            self.audit(
                AuditRecord::new("session.end", "Worker", "", "ok")
                    .principal(&s.principal.to_string())
                    .session(id)
                    .detail(why),
            );
        }
    }

    /// Revokes session `id`: its token (and its grants' tokens) stop working
    /// now, and the worker is
    /// told `Worker.revoke(reason)` (it answers every cap with
    /// `staleSession`, stops its VMs and exits). Audits `session.revoke`
    /// (or `session.expire`) with `detail`.
    pub fn revoke_session(self: &Rc<Self>, id: &str, reason: RevokeReason, detail: &str) {
        self.tokens.borrow_mut().remove(id);
        self.grants.borrow_mut().end_session(id);
        let Some(s) = self.sessions.borrow().get(id).cloned() else { return };
        let action = if reason == RevokeReason::Expired { "session.expire" } else { "session.revoke" };
        self.audit(
            AuditRecord::new(action, "Worker", "revoke", "ok")
                .principal(&s.principal.to_string())
                .session(id)
                .detail(detail),
        );
        tokio::task::spawn_local(async move {
            let mut req = s.worker.revoke_request();
            req.get().set_reason(reason);
            match tokio::time::timeout(REVOKE_TIMEOUT, req.send().promise).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::debug!(session = %s.id, "revoke failed: {e}"),
                Err(_) => tracing::warn!(session = %s.id, "worker did not answer revoke in time"),
            }
        });
    }

    /// `SessionHost.logout` of session `id`: its token and its grants'
    /// tokens stop working.
    pub fn logout(&self, id: &str, principal: &str) {
        let had = self.tokens.borrow_mut().remove(id);
        // Its grants end with it (their worker is going).
        self.grants.borrow_mut().end_session(id);
        let detail = if had { "token deleted" } else { "token already gone" };
        self.audit(
            AuditRecord::new("logout", "Session", "logout", "ok").principal(principal).session(id).detail(detail),
        );
    }

    // ---- attach ---------------------------------------------------------

    /// One attach from the gateway: `tag` is the token, `fd` the client's
    /// socket. On a live session the fd goes to its worker (tag `attach`);
    /// otherwise the client gets the `staleSession` reply and is closed.
    pub async fn attach(self: &Rc<Self>, tag: Vec<u8>, fd: OwnedFd) {
        let peer = socket_peer(&fd);
        let rec = |outcome: &str| AuditRecord::new("attach", "Gateway", "attach", outcome).peer(&peer);
        let token = std::str::from_utf8(&tag).unwrap_or("");
        let mut worker_tag = b"attach".to_vec();
        let mut s = self.session_for_token(token);
        if s.is_none() {
            if let Some((id, g)) = self.grants.borrow().by_delegate_token(token, crate::now_ms()) {
                s = self.sessions.borrow().get(&g.session_id).cloned();
                worker_tag = format!("grant:{id}").into_bytes();
            }
        }
        let Some(s) = s else {
            self.audit(rec("staleSession").detail("no live session for this token"));
            reply_err(fd, CvError::stale()).await;
            return;
        };
        match s.attach.send(&worker_tag, &fd).await {
            Ok(()) => self.audit(rec("ok").principal(&s.principal.to_string()).session(&s.id)),
            Err(e) => {
                tracing::warn!(session = %s.id, "cannot hand the client to its worker: {e}");
                self.audit(
                    rec("staleSession").principal(&s.principal.to_string()).session(&s.id).detail("worker unreachable"),
                );
                reply_err(fd, CvError::stale()).await;
            }
        }
    }

    /// Serves attaches arriving on `ch` until the gateway closes it; a
    /// message tagged `login:<conn>` is instead a client socket for a
    /// login call ([`Self::add_login_socket`]).
    ///
    /// Errors: an I/O error on the channel other than end-of-file.
    pub async fn run_attach_loop(self: Rc<Self>, ch: FdChannel) -> std::io::Result<()> {
        loop {
            match ch.recv().await {
                Ok((tag, fd)) => {
                    if let Some(conn) = tag.strip_prefix(capvisor_rpc::principal::LOGIN_SOCKET_TAG.as_bytes()) {
                        self.add_login_socket(&String::from_utf8_lossy(conn), fd);
                        continue;
                    }
                    let me = self.clone();
                    tokio::task::spawn_local(async move { me.attach(tag, fd).await });
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    tracing::warn!("malformed message on the attach channel: {e}");
                }
                Err(e) => return Err(e),
            }
        }
    }

    // ---- volumes --------------------------------------------------------

    /// `Volumes.create` by `actor` (session `sid`, bundle `bundle`):
    /// reserves the name and room, then formats the file off the RPC
    /// thread (mkfs.ext4). Audits `volume.create`.
    ///
    /// Errors: as [`crate::volumes::VolumeStore::begin_create`] and
    /// [`capvisor_rpc::disk::create_ext4`].
    pub async fn volume_create(
        &self,
        actor: &str,
        sid: &str,
        bundle: &Bundle,
        name: &str,
        size_mib: u64,
    ) -> CvResult<crate::volumes::VolumeFacts> {
        let res = async {
            let file = self.volumes.begin_create(actor, bundle, name, size_mib)?;
            let label = format!("cv-{name}");
            let f = file.clone();
            let made = tokio::task::spawn_blocking(move || {
                capvisor_rpc::disk::create_ext4(&f, size_mib, &label, (VOLUME_ROOT_OWNER, VOLUME_ROOT_OWNER))
            })
            .await
            .unwrap_or_else(|e| Err(CvError::internal(format!("volume format task: {e}"))));
            self.volumes.finish_create(&file);
            made?;
            self.volumes.get(actor, name)
        }
        .await;
        self.audit(
            AuditRecord::new("volume.create", "Volumes", "create", outcome(&res))
                .principal(actor)
                .session(sid)
                .detail(format!("{name} {size_mib} MiB")),
        );
        res
    }

    /// `Volumes.list` (or one volume's `info` with `name`): `actor`'s volumes.
    ///
    /// Errors: with `name`, `notFound` / `invalidArgument`.
    pub fn volume_list(&self, actor: &str, name: Option<&str>) -> CvResult<Vec<crate::volumes::VolumeFacts>> {
        match name {
            Some(n) => Ok(vec![self.volumes.get(actor, n)?]),
            None => Ok(self.volumes.list(actor)),
        }
    }

    /// `Volumes.remove` by `actor`: deletes the volume's file. Audits
    /// `volume.remove`.
    ///
    /// Errors: `notFound`, `inUse` while a running VM holds it.
    pub fn volume_remove(&self, actor: &str, sid: &str, name: &str) -> CvResult<()> {
        let res = self.volumes.remove(actor, name);
        self.audit(
            AuditRecord::new("volume.remove", "Volumes", "remove", outcome(&res))
                .principal(actor)
                .session(sid)
                .detail(name),
        );
        res
    }

    /// Leases `actor`'s volume `name` to VM `vm` of session `sid`. Audits
    /// `volume.attach`.
    ///
    /// Errors: `notFound`, `inUse`.
    pub fn volume_attach(
        &self,
        actor: &str,
        sid: &str,
        vm: &str,
        name: &str,
        read_only: bool,
    ) -> CvResult<(std::path::PathBuf, u64)> {
        let res = self.volumes.attach(actor, sid, vm, name, read_only);
        let mode = if read_only { "ro" } else { "rw" };
        self.audit(
            AuditRecord::new("volume.attach", "Volumes", "attach", outcome(&res))
                .principal(actor)
                .session(sid)
                .vm(vm)
                .detail(format!("{name} to VM {vm} {mode}")),
        );
        res
    }

    /// Ends a lease made by [`BrokerService::volume_attach`].
    pub fn volume_release(&self, file: &std::path::Path, lease: u64) {
        self.volumes.release(file, lease)
    }

    // ---- secrets --------------------------------------------------------

    /// `Secrets.put` by `actor` (session `sid`). Audits `secret.put` with
    /// the name and hosts, never the value.
    ///
    /// Errors: as [`crate::secrets::SecretStore::put`].
    pub fn secret_put(&self, actor: &str, sid: &str, name: &str, value: &[u8], hosts: &[String]) -> CvResult<()> {
        let res = self.secrets.put(actor, name, value, hosts);
        self.audit(
            AuditRecord::new("secret.put", "Secrets", "put", outcome(&res))
                .principal(actor)
                .session(sid)
                .detail(format!("{name} hosts={}", hosts.join(","))),
        );
        res
    }

    /// `Secrets.list`: `actor`'s secrets without values.
    ///
    /// Errors: `internal` when the store is damaged.
    pub fn secret_list(&self, actor: &str) -> CvResult<Vec<crate::secrets::SecretFacts>> {
        self.secrets.list(actor)
    }

    /// `Secrets.remove` by `actor`. Audits `secret.remove`.
    ///
    /// Errors: `notFound`, `invalidArgument`, `internal`.
    pub fn secret_remove(&self, actor: &str, sid: &str, name: &str) -> CvResult<()> {
        let res = self.secrets.remove(actor, name);
        self.audit(
            AuditRecord::new("secret.remove", "Secrets", "remove", outcome(&res))
                .principal(actor)
                .session(sid)
                .detail(name),
        );
        res
    }

    /// `SessionHost.revealSecret` for session `sid`'s proxy. A found secret
    /// asked for a host none of its globs matches is audited
    /// (`secret.reveal`, `denied`, naming the host); a missing one
    /// `notFound`; a released value `ok` (repeats coalesce in the log).
    ///
    /// Errors: `internal` when the store is damaged.
    pub fn secret_reveal(&self, actor: &str, sid: &str, name: &str, host: &str) -> CvResult<crate::secrets::Reveal> {
        let res = self.secrets.reveal(actor, name, host);
        let out = match &res {
            Ok(r) if r.matched => "ok",
            Ok(r) if r.found => "denied",
            Ok(_) => "notFound",
            Err(e) => e.code_name(),
        };
        self.audit(
            AuditRecord::new("secret.reveal", "SecretSource", "reveal", out)
                .principal(actor)
                .session(sid)
                .detail(format!("{name} for host {host}")),
        );
        res
    }

    // ---- accounts -------------------------------------------------------

    /// `Accounts.add` by `actor` (session `sid`). Audits `account.add`.
    pub async fn account_add(
        &self,
        actor: &str,
        sid: &str,
        name: &str,
        profile: &str,
        password: String,
    ) -> CvResult<()> {
        self.require_audit()?;
        let store = self.store.clone();
        let (n, p) = (name.to_string(), profile.to_string());
        let res = tokio::task::spawn_blocking(move || store.add(&n, &p, &password))
            .await
            .unwrap_or_else(|_| Err(CvError::internal("hashing task failed")));
        let shown_profile =
            if self.cfg.manifest.profiles.contains_key(profile) { profile } else { "<unknown profile>" };
        self.audit(
            AuditRecord::new("account.add", "Accounts", "add", outcome(&res))
                .principal(actor)
                .session(sid)
                .detail(format!("name={} profile={shown_profile}", shown_user(name))),
        );
        res
    }

    /// `Accounts.list`. Audits `account.list`.
    pub fn account_list(&self, actor: &str, sid: &str) -> Vec<(String, String)> {
        let list = self.store.list();
        self.audit(AuditRecord::new("account.list", "Accounts", "list", "ok").principal(actor).session(sid));
        list
    }

    /// `Accounts.remove`: deletes the account and revokes its live sessions.
    /// Audits `account.remove`.
    pub async fn account_remove(self: &Rc<Self>, actor: &str, sid: &str, name: &str) -> CvResult<()> {
        self.require_audit()?;
        let store = self.store.clone();
        let n = name.to_string();
        let res = tokio::task::spawn_blocking(move || store.remove(&n))
            .await
            .unwrap_or_else(|_| Err(CvError::internal("store task failed")));
        self.audit(
            AuditRecord::new("account.remove", "Accounts", "remove", outcome(&res))
                .principal(actor)
                .session(sid)
                .detail(format!("name={}", shown_user(name))),
        );
        if res.is_ok() {
            let principal = Principal::new(AuthMethod::Password, name);
            let ids: Vec<String> =
                self.sessions.borrow().values().filter(|s| s.principal == principal).map(|s| s.id.clone()).collect();
            for id in ids {
                self.revoke_session(&id, RevokeReason::Revoked, "account removed");
            }
        }
        res
    }

    // ---- shutdown -------------------------------------------------------

    /// Revokes every session (`Worker.revoke("shutdown")`), waits up to
    /// [`SHUTDOWN_GRACE`] for the workers to exit, SIGKILLs stragglers.
    /// New logins get `unavailable` from the start.
    pub async fn shutdown(self: &Rc<Self>) {
        self.shutting_down.set(true);
        let sessions: Vec<Rc<LiveSession>> = self.sessions.borrow().values().cloned().collect();
        self.audit(
            AuditRecord::new("shutdown", "Broker", "", "ok").detail(format!("{} live sessions", sessions.len())),
        );
        let revokes = sessions.iter().map(|s| {
            self.tokens.borrow_mut().remove(&s.id);
            let mut req = s.worker.revoke_request();
            req.get().set_reason(RevokeReason::Shutdown);
            tokio::time::timeout(REVOKE_TIMEOUT, req.send().promise)
        });
        futures::future::join_all(revokes).await;
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while (!self.children.borrow().is_empty() || !self.sessions.borrow().is_empty())
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left: Vec<String> = self.children.borrow().keys().cloned().collect();
        for id in &left {
            tracing::warn!(session = %id, "worker did not exit in time; killing it");
            self.kill_child(id);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !self.children.borrow().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ids: Vec<String> = self.sessions.borrow().keys().cloned().collect();
        for id in ids {
            self.forget_session(&id, "shutdown");
        }
    }
}

/// Running VMs and guest memory reserved, on the host and per principal.
#[derive(Default)]
struct VmBudget {
    host_vms: u64,
    host_memory_mib: u64,
    /// principal -> (VMs, MiB).
    per_principal: HashMap<String, (u64, u64)>,
}

/// Three quarters of the host's memory (`MemTotal`, /proc/meminfo), MiB;
/// 4096 when it cannot be read.
pub fn default_host_memory_mib() -> u64 {
    let kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
    });
    kib.map(|k| k / 1024 * 3 / 4).unwrap_or(4096)
}

fn outcome<T>(res: &CvResult<T>) -> &'static str {
    match res {
        Ok(_) => "ok",
        Err(e) => e.code_name(),
    }
}

/// Asks a worker for its `Session` cap, within [`WORKER_TIMEOUT`].
async fn worker_session(worker: &worker::Client) -> CvResult<session::Client> {
    let req = worker.session_request();
    match tokio::time::timeout(WORKER_TIMEOUT, req.send().promise).await {
        Ok(Ok(resp)) => resp.get().and_then(|r| r.get_session()).map_err(|e| {
            tracing::warn!("worker returned a bad session: {e}");
            CvError::unavailable("the session's worker failed")
        }),
        Ok(Err(e)) => {
            tracing::warn!("worker session call failed: {e}");
            Err(CvError::unavailable("the session's worker failed"))
        }
        Err(_) => Err(CvError::unavailable("the session's worker did not answer in time")),
    }
}

/// Writes the attach error reply on a client socket and closes it (bounded
/// by a 2 s timeout, so a client that does not read cannot hold us).
async fn reply_err(fd: OwnedFd, e: CvError) {
    use tokio::io::AsyncWriteExt;
    let Ok(mut s) = capvisor_rpc::spawn::into_tokio(fd) else { return };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        capvisor_rpc::attach::write_err(&mut s, &e).await?;
        s.shutdown().await
    })
    .await;
}

/// Keeps `Weak` in the public signature of server constructors readable.
pub type ServiceRef = Weak<BrokerService>;

/// A source's turn at password verification (see
/// `BrokerService::login_password`): holds the source's lock; on drop
/// releases it and forgets the lock when nobody else waits for it, so the
/// table holds only sources with an attempt in progress.
struct SourceTurn<'a> {
    table: &'a RefCell<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    source: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl<'a> SourceTurn<'a> {
    async fn wait(
        table: &'a RefCell<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
        source: &str,
    ) -> SourceTurn<'a> {
        let lock = table.borrow_mut().entry(source.to_string()).or_default().clone();
        // Registered before waiting, so a cancelled wait still cleans up.
        let mut turn = SourceTurn { table, source: source.to_string(), guard: None };
        turn.guard = Some(lock.lock_owned().await);
        turn
    }
}

impl Drop for SourceTurn<'_> {
    fn drop(&mut self) {
        self.guard = None;
        let mut t = self.table.borrow_mut();
        if t.get(&self.source).is_some_and(|l| Arc::strong_count(l) == 1) {
            t.remove(&self.source);
        }
    }
}
