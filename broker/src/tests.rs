//! Broker session logic against an in-process fake worker (no
//! `capvisor-worker` binary needed).

use crate::launch::{Launched, Launcher};
use crate::service::{BrokerService, Grant, BAD_LOGIN};
use crate::{store, BrokerConfig};
use capnp::capability::Rc as CapRc;
use capvisor_manifest::{Manifest, SessionContext};
use capvisor_rpc::fdpass::{self, FdChannel};
use capvisor_rpc::principal::PeerCred;
use capvisor_rpc::schema::capvisor_capnp::{accounts, session};
use capvisor_rpc::schema::common_capnp::ErrorCode;
use capvisor_rpc::schema::internal_capnp::{session_host, worker};
use capvisor_rpc::{conn, CvError};

use capvisor_rpc::names::revoke_reason_name as reason_name;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

#[derive(Default)]
struct FakeState {
    contexts: Vec<SessionContext>,
    hosts: HashMap<String, session_host::Client>,
    revokes: Vec<(String, String)>,
    attached: Vec<String>,
    /// Worker.session takes this long.
    session_delay: Duration,
}

#[derive(Clone, Default)]
struct FakeLauncher {
    st: Rc<RefCell<FakeState>>,
}

struct FakeWorker {
    ctx: SessionContext,
    st: Rc<RefCell<FakeState>>,
    conn: Rc<RefCell<Option<tokio::task::AbortHandle>>>,
}

struct FakeSession {
    ctx: SessionContext,
}

impl session::Server for FakeSession {
    async fn info(self: CapRc<Self>, _: session::InfoParams, mut results: session::InfoResults) -> capnp::Result<()> {
        let mut i = results.get().init_info();
        i.set_session_id(self.ctx.session_id.as_str());
        self.ctx.principal.write_to(i.reborrow().init_principal());
        i.set_profile(self.ctx.profile.as_str());
        i.set_expires_at_ms(self.ctx.expires_at_ms);
        Ok(())
    }
}

impl worker::Server for FakeWorker {
    async fn session(
        self: CapRc<Self>,
        _: worker::SessionParams,
        mut results: worker::SessionResults,
    ) -> capnp::Result<()> {
        let delay = self.st.borrow().session_delay;
        tokio::time::sleep(delay).await;
        results.get().set_session(capnp_rpc::new_client(FakeSession { ctx: self.ctx.clone() }));
        Ok(())
    }
    async fn revoke(self: CapRc<Self>, params: worker::RevokeParams, _: worker::RevokeResults) -> capnp::Result<()> {
        let reason = reason_name(params.get()?.get_reason()?);
        self.st.borrow_mut().revokes.push((self.ctx.session_id.clone(), reason.to_string()));
        // Like the real worker: exit (end the connection) soon after.
        let conn = self.conn.clone();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if let Some(h) = conn.borrow_mut().take() {
                h.abort();
            }
        });
        Ok(())
    }
}

impl Launcher for FakeLauncher {
    fn launch(&self, ctx: &SessionContext, host: session_host::Client) -> anyhow::Result<Launched> {
        let (a, b) = tokio::net::UnixStream::pair()?;
        let (att_ours, att_theirs) = fdpass::pair()?;
        let (worker, ended) = conn::connect::<worker::Client>(a, Some(host.client), conn::INTERNAL);
        let conn_slot = Rc::new(RefCell::new(None));
        let fake: worker::Client =
            capnp_rpc::new_client(FakeWorker { ctx: ctx.clone(), st: self.st.clone(), conn: conn_slot.clone() });
        let (host_cap, handle) = conn::serve::<session_host::Client>(b, fake.client, conn::INTERNAL);
        *conn_slot.borrow_mut() = Some(handle.abort_handle());
        let mut st = self.st.borrow_mut();
        st.contexts.push(ctx.clone());
        st.hosts.insert(ctx.session_id.clone(), host_cap);
        // The worker's attach side: accept fds, write the OK byte.
        let theirs = FdChannel::new(att_theirs)?;
        let sts = self.st.clone();
        let id = ctx.session_id.clone();
        tokio::task::spawn_local(async move {
            while let Ok((tag, fd)) = theirs.recv().await {
                assert_eq!(tag, b"attach");
                sts.borrow_mut().attached.push(id.clone());
                let mut s = capvisor_rpc::spawn::into_tokio(fd).unwrap();
                capvisor_rpc::attach::write_ok(&mut s).await.unwrap();
            }
        });
        Ok(Launched { worker, attach: FdChannel::new(att_ours)?, ended, child: None })
    }
}

struct Harness {
    svc: Rc<BrokerService>,
    fake: FakeLauncher,
    dir: tempfile::TempDir,
}

fn harness(edit: impl FnOnce(&mut BrokerConfig)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = BrokerConfig {
        manifest: Manifest::default_manifest(),
        images: BTreeMap::new(),
        state_dir: dir.path().to_path_buf(),
        owner_uids: vec![nix::unistd::getuid().as_raw()],
        worker_bin: "/nonexistent".into(),
    };
    edit(&mut cfg);
    let fake = FakeLauncher::default();
    let svc = BrokerService::new(cfg, Box::new(fake.clone()), store::test_params()).unwrap();
    Harness { svc, fake, dir }
}

impl Harness {
    fn audit_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl")).unwrap_or_default()
    }
    /// Every audited event, one value each: open coalesced runs are closed
    /// first and a coalesced line counts as its `repeated` events.
    fn audit_lines(&self) -> Vec<serde_json::Value> {
        self.svc.audit_log().flush_all();
        let mut out = vec![];
        for l in self.audit_text().lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let n = v.get("repeated").and_then(|r| r.as_u64()).unwrap_or(1);
            out.extend(std::iter::repeat_n(v, n as usize));
        }
        out
    }
    fn host(&self, id: &str) -> session_host::Client {
        self.fake.st.borrow().hosts.get(id).unwrap().clone()
    }
}

fn err<T>(r: Result<T, CvError>) -> CvError {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

async fn info(g: &Grant) -> (String, String) {
    let resp = g.session.info_request().send().promise.await.unwrap();
    let i = resp.get().unwrap().get_info().unwrap();
    (
        i.get_session_id().unwrap().to_string().unwrap(),
        capvisor_rpc::principal::Principal::read_from(i.get_principal().unwrap()).unwrap().to_string(),
    )
}

const UID_OTHER: u32 = 54_321;
/// A gid no rule names.
const GID_NONE: u32 = 4_000_000_123;

/// A local peer as the broker reads it from a client socket: `uid`, `pid`,
/// a primary gid no rule names and no supplementary groups.
fn local_peer(uid: u32, pid: u32) -> PeerCred {
    PeerCred { uid, gid: GID_NONE, pid, groups: vec![] }
}

#[test]
fn local_login_owner_ok_other_denied_disabled_denied() {
    conn::run_local(async {
        let h = harness(|_| {});
        let me = nix::unistd::getuid().as_raw();
        let g = h.svc.login_local(&local_peer(me, 42)).await.unwrap();
        assert_eq!(g.profile, "owner");
        assert_eq!(g.principal.to_string(), format!("local:{}", crate::service::user_name(me)));
        assert!(g.expires_at_ms > crate::now_ms() + 86_000_000);
        let (sid, principal) = info(&g).await;
        assert_eq!(sid, g.session_id);
        assert_eq!(principal, g.principal.to_string());
        // The worker got the owner bundle and a run dir under state_dir/sessions.
        let ctx = h.fake.st.borrow().contexts[0].clone();
        assert!(ctx.bundle.has_cap("accounts"));
        assert_eq!(ctx.run_dir, h.dir.path().join("sessions").join(&g.session_id));

        let e = err(h.svc.login_local(&local_peer(UID_OTHER, 1)).await);
        assert_eq!(e.code, ErrorCode::Denied);
        assert_eq!(h.svc.session_count(), 1);

        let h2 = harness(|c| c.manifest.gateway.auth = vec!["password".into()]);
        assert_eq!(err(h2.svc.login_local(&local_peer(me, 1)).await).code, ErrorCode::Denied);
        assert_eq!(h2.svc.session_count(), 0);
        assert!(
            h2.audit_lines().iter().any(|l| l["method"] == "loginLocal" && l["outcome"] == "denied"),
            "a disabled method's attempt is audited"
        );

        let lines = h.audit_lines();
        assert!(lines
            .iter()
            .any(|l| l["action"] == "login" && l["outcome"] == "ok" && l["session"] == g.session_id.as_str()));
        assert!(lines
            .iter()
            .any(|l| l["action"] == "login" && l["outcome"] == "denied" && l["peer"] == "unix:uid=54321 pid=1"));
    });
}

#[test]
fn password_login_and_identical_failures() {
    conn::run_local(async {
        let h = harness(|_| {});
        h.svc.store().add("bob", "user", "correct horse battery").unwrap();
        let g = h.svc.login_password("bob", "correct horse battery", "unix:uid=7 pid=1").await.unwrap();
        assert_eq!(g.principal.to_string(), "password:bob");
        assert_eq!(g.profile, "user");
        assert!(!h.fake.st.borrow().contexts[0].bundle.has_cap("accounts"));

        let t = Instant::now();
        let wrong = err(h.svc.login_password("bob", "wrong horse battery", "unix:uid=7 pid=2").await);
        let t_wrong = t.elapsed();
        let t = Instant::now();
        let unknown = err(h.svc.login_password("nobody", "correct horse battery", "unix:uid=8 pid=2").await);
        let t_unknown = t.elapsed();
        assert_eq!(wrong, unknown, "unknown user and wrong password must be indistinguishable");
        assert_eq!(wrong, CvError::denied(BAD_LOGIN));
        assert!(t_wrong >= Duration::from_millis(300) && t_unknown >= Duration::from_millis(300));
        let invalid = err(h.svc.login_password("NOT a name", "x", "unix:uid=8").await);
        assert_eq!(invalid, CvError::denied(BAD_LOGIN));
        assert_eq!(h.svc.session_count(), 1);

        let h2 = harness(|c| c.manifest.gateway.auth = vec!["local".into()]);
        h2.svc.store().add("bob", "user", "correct horse battery").unwrap();
        let e = err(h2.svc.login_password("bob", "correct horse battery", "p").await);
        assert_eq!(e.code, ErrorCode::Denied);
        assert_eq!(h2.svc.session_count(), 0);
    });
}

#[test]
fn failures_are_delayed_without_blocking_other_logins() {
    conn::run_local(async {
        let h = harness(|_| {});
        let svc = h.svc.clone();
        // Two prior failures: the third waits 1.2 s.
        for _ in 0..2 {
            let _ = h.svc.login_password("eve", "guess1234", "unix:uid=9 pid=1").await;
        }
        let slow = tokio::task::spawn_local(async move {
            let t = Instant::now();
            let _ = svc.login_password("eve", "guess1234", "unix:uid=9 pid=3").await;
            t.elapsed()
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = Instant::now();
        h.svc.login_local(&local_peer(nix::unistd::getuid().as_raw(), 1)).await.unwrap();
        assert!(t.elapsed() < Duration::from_millis(1000), "a local login is not held up");
        assert!(!slow.is_finished());
        assert!(slow.await.unwrap() >= Duration::from_millis(1200));
    });
}

#[test]
fn audit_never_holds_passwords_or_tokens() {
    conn::run_local(async {
        let h = harness(|_| {});
        let pw = "Sup3r-secret-passw0rd";
        h.svc.store().add("carol", "owner", pw).unwrap();
        let g = h.svc.login_password("carol", pw, "unix:uid=5 pid=5").await.unwrap();
        let _ = h.svc.login_password("carol", "Sup3r-wrong-passw0rd", "unix:uid=5 pid=5").await;
        // A password typed into the user field is not echoed either.
        let _ = h.svc.login_password(pw, pw, "unix:uid=5 pid=6").await;
        h.svc.resume(&g.token, "unix:uid=5 pid=7").await.unwrap();
        let host = h.host(&g.session_id);
        let acc = host.accounts_request().send().promise.await.unwrap().get().unwrap().get_accounts().unwrap();
        let mut req = acc.add_request();
        req.get().set_account("dave");
        req.get().set_profile("user");
        req.get().set_password("another-Secret-99");
        req.send().promise.await.unwrap();
        host.logout_request().send().promise.await.unwrap();

        let text = h.audit_text();
        for secret in [pw, "Sup3r-wrong-passw0rd", "another-Secret-99", g.token.as_str()] {
            assert!(!text.contains(secret), "audit log leaks {secret:?}:\n{text}");
        }
        let token_hash = hex::encode(crate::token::hash(&g.token));
        assert!(!text.contains(&token_hash));
        let lines = h.audit_lines();
        for action in ["login", "resume", "account.add", "logout"] {
            assert!(lines.iter().any(|l| l["action"] == action), "no {action} line:\n{text}");
        }
        assert!(lines.iter().any(|l| l["principal"] == "password:<invalid name>"));
        for l in &lines {
            for key in ["ts_ms", "principal", "session", "cap", "method", "outcome", "detail", "peer"] {
                assert!(l.get(key).is_some(), "{key} missing in {l}");
            }
        }
    });
}

#[test]
fn resume_logout_and_unknown_tokens() {
    conn::run_local(async {
        let h = harness(|_| {});
        let g = h.svc.login_local(&local_peer(nix::unistd::getuid().as_raw(), 1)).await.unwrap();
        let r = h.svc.resume(&g.token, "p").await.unwrap();
        assert_eq!(r.session_id, g.session_id);
        assert_eq!(r.expires_at_ms, g.expires_at_ms);
        assert_eq!(info(&r).await.0, g.session_id);

        assert_eq!(err(h.svc.resume("bogus", "p").await).code, ErrorCode::StaleSession);
        assert_eq!(err(h.svc.resume(&g.token[..40], "p").await).code, ErrorCode::StaleSession);

        h.host(&g.session_id).logout_request().send().promise.await.unwrap();
        assert_eq!(err(h.svc.resume(&g.token, "p").await), CvError::stale());
    });
}

#[test]
fn expiry_revokes_and_kills_the_token() {
    conn::run_local(async {
        let h = harness(|c| c.manifest.gateway.session_ttl_secs = 1);
        let g = h.svc.login_local(&local_peer(nix::unistd::getuid().as_raw(), 1)).await.unwrap();
        assert!(h.svc.resume(&g.token, "p").await.is_ok());
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert_eq!(err(h.svc.resume(&g.token, "p").await).code, ErrorCode::StaleSession);
        assert_eq!(h.fake.st.borrow().revokes, vec![(g.session_id.clone(), "expired".to_string())]);
        // The fake worker exits after revoke: the broker forgets the session.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(h.svc.session_count(), 0);
        let lines = h.audit_lines();
        assert!(lines.iter().any(|l| l["action"] == "session.expire"));
        assert!(lines.iter().any(|l| l["action"] == "session.end"));
    });
}

#[test]
fn attach_routes_live_tokens_and_rejects_others() {
    conn::run_local(async {
        let h = harness(|_| {});
        let g = h.svc.login_local(&local_peer(nix::unistd::getuid().as_raw(), 1)).await.unwrap();

        let (mut client, server) = tokio::net::UnixStream::pair().unwrap();
        let fd = server.into_std().unwrap().into();
        h.svc.attach(g.token.clone().into_bytes(), fd).await;
        assert_eq!(capvisor_rpc::attach::read_reply(&mut client).await.unwrap(), Ok(()));
        assert_eq!(h.fake.st.borrow().attached, vec![g.session_id.clone()]);

        for bad in [b"nope".to_vec(), vec![0xff, 0xfe]] {
            let (mut client, server) = tokio::net::UnixStream::pair().unwrap();
            h.svc.attach(bad, server.into_std().unwrap().into()).await;
            let e = capvisor_rpc::attach::read_reply(&mut client).await.unwrap().unwrap_err();
            assert_eq!(e.code, ErrorCode::StaleSession);
        }
        // After logout the same token is stale too.
        h.host(&g.session_id).logout_request().send().promise.await.unwrap();
        let (mut client, server) = tokio::net::UnixStream::pair().unwrap();
        h.svc.attach(g.token.clone().into_bytes(), server.into_std().unwrap().into()).await;
        assert_eq!(
            capvisor_rpc::attach::read_reply(&mut client).await.unwrap().unwrap_err().code,
            ErrorCode::StaleSession
        );
        assert_eq!(h.fake.st.borrow().attached.len(), 1);
        let lines = h.audit_lines();
        assert_eq!(lines.iter().filter(|l| l["action"] == "attach" && l["outcome"] == "staleSession").count(), 3);
        assert!(lines.iter().any(|l| l["action"] == "attach"
            && l["outcome"] == "ok"
            && l["peer"].as_str().unwrap().starts_with("unix:uid=")));
    });
}

#[test]
fn attach_loop_over_fd_channel() {
    conn::run_local(async {
        let h = harness(|_| {});
        let g = h.svc.login_local(&local_peer(nix::unistd::getuid().as_raw(), 1)).await.unwrap();
        let (gw, br) = fdpass::pair().unwrap();
        let (gw, br) = (FdChannel::new(gw).unwrap(), FdChannel::new(br).unwrap());
        let lp = tokio::task::spawn_local(h.svc.clone().run_attach_loop(br));
        let (mut client, server) = tokio::net::UnixStream::pair().unwrap();
        gw.send(g.token.as_bytes(), &server).await.unwrap();
        drop(server);
        assert_eq!(capvisor_rpc::attach::read_reply(&mut client).await.unwrap(), Ok(()));
        drop(gw);
        assert!(lp.await.unwrap().is_ok(), "loop ends cleanly when the gateway closes the channel");
    });
}

#[test]
fn accounts_only_for_bundles_holding_them() {
    conn::run_local(async {
        let h = harness(|_| {});
        h.svc.store().add("bob", "user", "password-bob").unwrap();
        let owner = h.svc.login_local(&local_peer(nix::unistd::getuid().as_raw(), 1)).await.unwrap();
        let user = h.svc.login_password("bob", "password-bob", "p").await.unwrap();

        let denied = h.host(&user.session_id).accounts_request().send().promise.await;
        assert!(denied.is_err(), "a user bundle gets no Accounts");

        let acc: accounts::Client = h
            .host(&owner.session_id)
            .accounts_request()
            .send()
            .promise
            .await
            .unwrap()
            .get()
            .unwrap()
            .get_accounts()
            .unwrap();
        let add = |name: &str, profile: &str, pw: &str| {
            let mut req = acc.add_request();
            req.get().set_account(name);
            req.get().set_profile(profile);
            req.get().set_password(pw);
            async move { req.send().promise.await.map(drop).map_err(|e| CvError::from_rpc(&e).expect("a typed error")) }
        };
        assert_eq!(add("alice", "owner", "password-alice").await, Ok(()));
        assert_eq!(add("alice", "user", "password-alice").await.unwrap_err().code, ErrorCode::AlreadyExists);
        assert_eq!(add("Alice!", "user", "password-alice").await.unwrap_err().code, ErrorCode::InvalidArgument);
        assert_eq!(add("zed", "nope", "password-zed").await.unwrap_err().code, ErrorCode::InvalidArgument);

        let list = acc.list_request().send().promise.await.unwrap();
        let names: Vec<String> = list
            .get()
            .unwrap()
            .get_accounts()
            .unwrap()
            .iter()
            .map(|a| a.get_name().unwrap().to_string().unwrap())
            .collect();
        assert_eq!(names, vec!["alice", "bob"]);

        // Removing bob revokes bob's live session.
        let mut req = acc.remove_request();
        req.get().set_account("bob");
        req.send().promise.await.unwrap();
        assert!(h.svc.store().verify("bob", "password-bob").is_none());
        assert_eq!(err(h.svc.resume(&user.token, "p").await).code, ErrorCode::StaleSession);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(h.fake.st.borrow().revokes.contains(&(user.session_id.clone(), "revoked".into())));
        let lines = h.audit_lines();
        assert!(lines
            .iter()
            .any(|l| l["action"] == "account.remove" && l["principal"] == owner.principal.to_string().as_str()));
    });
}

#[test]
fn worker_audit_events_are_stamped_with_the_session() {
    conn::run_local(async {
        let h = harness(|_| {});
        let g = h.svc.login_local(&local_peer(nix::unistd::getuid().as_raw(), 1)).await.unwrap();
        let mut req = h.host(&g.session_id).audit_request();
        let mut ev = req.get().init_event();
        ev.set_action("vm.create");
        ev.set_cap("VmFactory");
        ev.set_method("create");
        ev.reborrow().init_outcome().set_error(ErrorCode::Quota);
        ev.set_detail("max_vms=4");
        req.send().promise.await.unwrap();
        let lines = h.audit_lines();
        let l = lines.iter().find(|l| l["action"] == "vm.create").unwrap();
        assert_eq!(l["session"], g.session_id.as_str());
        assert_eq!(l["principal"], g.principal.to_string().as_str());
        assert_eq!(l["outcome"], "quota");
    });
}

#[test]
fn shutdown_revokes_everything_and_refuses_new_logins() {
    conn::run_local(async {
        let h = harness(|_| {});
        let me = nix::unistd::getuid().as_raw();
        let a = h.svc.login_local(&local_peer(me, 1)).await.unwrap();
        let b = h.svc.login_local(&local_peer(me, 2)).await.unwrap();
        let t = Instant::now();
        h.svc.shutdown().await;
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(h.svc.session_count(), 0);
        let mut revokes = h.fake.st.borrow().revokes.clone();
        revokes.sort();
        let mut want = vec![(a.session_id, "shutdown".to_string()), (b.session_id, "shutdown".to_string())];
        want.sort();
        assert_eq!(revokes, want);
        assert_eq!(err(h.svc.login_local(&local_peer(me, 3)).await).code, ErrorCode::Unavailable);
        assert_eq!(err(h.svc.resume(&a.token, "p").await).code, ErrorCode::StaleSession);
    });
}

#[test]
fn worker_that_fails_to_start_is_unavailable() {
    conn::run_local(async {
        let dir = tempfile::tempdir().unwrap();
        let cfg = BrokerConfig {
            manifest: Manifest::default_manifest(),
            images: BTreeMap::new(),
            state_dir: dir.path().to_path_buf(),
            owner_uids: vec![nix::unistd::getuid().as_raw()],
            worker_bin: dir.path().join("no-such-worker"),
        };
        let launcher = crate::launch::ProcessLauncher { worker_bin: cfg.worker_bin.clone() };
        let svc = BrokerService::new(cfg, Box::new(launcher), store::test_params()).unwrap();
        let e = err(svc.login_local(&local_peer(nix::unistd::getuid().as_raw(), 1)).await);
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert_eq!(svc.session_count(), 0);
        // A worker that exits at once (no RPC) is unavailable too.
        let cfg2 = BrokerConfig { worker_bin: "/bin/true".into(), ..svc.config().clone() };
        let launcher = crate::launch::ProcessLauncher { worker_bin: "/bin/true".into() };
        let svc2 = BrokerService::new(cfg2, Box::new(launcher), store::test_params()).unwrap();
        let e = err(svc2.login_local(&local_peer(nix::unistd::getuid().as_raw(), 1)).await);
        assert_eq!(e.code, ErrorCode::Unavailable);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(svc2.session_count(), 0);
    });
}

#[test]
fn a_login_abandoned_mid_way_leaves_no_session() {
    conn::run_local(async {
        let h = harness(|_| {});
        h.fake.st.borrow_mut().session_delay = Duration::from_millis(300);
        let svc = h.svc.clone();
        let login = tokio::task::spawn_local(async move {
            svc.login_local(&local_peer(nix::unistd::getuid().as_raw(), 1)).await.map(|_| ())
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        login.abort(); // the client hung up: the RPC call is cancelled
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(h.svc.session_count(), 0);
        let revokes = h.fake.st.borrow().revokes.clone();
        assert_eq!(revokes.len(), 1);
        assert_eq!(revokes[0].1, "revoked");
    });
}

#[test]
fn session_limits_per_principal_and_the_owners_reserve() {
    conn::run_local(async {
        let h = harness(|c| {
            c.manifest.sessions.max_total = 5;
            c.manifest.sessions.reserved_for_owner = 2;
            c.manifest.bundles.get_mut("user").unwrap().max_sessions = 2;
        });
        for (name, pw) in [("bob", "password-bob"), ("carol", "password-carol")] {
            h.svc.store().add(name, "user", pw).unwrap();
        }
        let peer = "unix:uid=7 pid=1";
        // Per principal: bob may hold two sessions, not three.
        let b1 = h.svc.login_password("bob", "password-bob", peer).await.unwrap();
        h.svc.login_password("bob", "password-bob", peer).await.unwrap();
        let e = err(h.svc.login_password("bob", "password-bob", peer).await);
        assert_eq!(e.code, ErrorCode::Quota);
        assert!(e.message.contains("password:bob") && e.message.contains("at most 2"), "{}", e.message);
        // Host-wide: carol gets the third slot of the three open to all ...
        h.svc.login_password("carol", "password-carol", peer).await.unwrap();
        assert_eq!(err(h.svc.login_password("carol", "password-carol", peer).await).code, ErrorCode::Quota);
        assert_eq!(h.svc.session_count(), 3);
        // ... and the owner still logs in, into the reserve, up to max_total.
        let me = nix::unistd::getuid().as_raw();
        h.svc.login_local(&local_peer(me, 1)).await.unwrap();
        h.svc.login_local(&local_peer(me, 2)).await.unwrap();
        assert_eq!(err(h.svc.login_local(&local_peer(me, 3)).await).code, ErrorCode::Quota);
        assert_eq!(h.svc.session_count(), 5, "no denied login left a session or a worker behind");
        assert_eq!(h.fake.st.borrow().contexts.len(), 5);
        // A session given back frees its slot for its principal.
        h.svc.revoke_session(&b1.session_id, capvisor_rpc::schema::internal_capnp::RevokeReason::Revoked, "test");
        let t0 = Instant::now();
        while h.svc.session_count() > 4 {
            assert!(t0.elapsed() < Duration::from_secs(5), "revoked session never ended");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        h.svc.login_password("bob", "password-bob", peer).await.unwrap();
        let quota_denials =
            h.audit_lines().iter().filter(|l| l["action"] == "login" && l["outcome"] == "quota").count();
        assert_eq!(quota_denials, 3, "every denial is audited");
    });
}

#[test]
fn one_password_attempt_per_account_and_a_bounded_verify_queue() {
    conn::run_local(async {
        let h = harness(|_| {});
        h.svc.store().add("bob", "user", "password-bob").unwrap();
        let peer = "unix:uid=7 pid=1";
        // A wrong guess is in progress (verifying, then its failure delay):
        // a parallel attempt at the same account is refused at once, even
        // with the right password, and without a verification.
        let svc = h.svc.clone();
        let guess = tokio::task::spawn_local(async move { svc.login_password("bob", "wrong-guess-1", peer).await });
        tokio::task::yield_now().await;
        let t = Instant::now();
        let parallel = err(h.svc.login_password("bob", "password-bob", "unix:uid=8 pid=2").await);
        assert_eq!(parallel.code, ErrorCode::Denied);
        assert!(parallel.message.contains("in progress"), "{}", parallel.message);
        assert!(t.elapsed() < crate::throttle::BASE, "refused without waiting");
        assert_eq!(err(guess.await.unwrap()).message, BAD_LOGIN);
        // Once it ended, the account logs in.
        h.svc.login_password("bob", "password-bob", "unix:uid=8 pid=2").await.unwrap();

        // Many logins at once while every verification slot is busy: the
        // first MAX_VERIFY_QUEUE queue, the rest get `unavailable` at once.
        let slots = h.svc.take_verify_slots().await;
        let extra = 5;
        let n = crate::service::MAX_VERIFY_QUEUE + extra;
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let svc = h.svc.clone();
                tokio::task::spawn_local(async move {
                    svc.login_password(&format!("nobody{i}"), "whatever-pw", &format!("unix:uid={} pid=1", 100 + i))
                        .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(slots);
        let mut codes = vec![];
        for t in tasks {
            codes.push(err(t.await.unwrap()).code);
        }
        let unavailable = codes.iter().filter(|c| **c == ErrorCode::Unavailable).count();
        assert_eq!(unavailable, extra, "{codes:?}");
        assert_eq!(codes.iter().filter(|c| **c == ErrorCode::Denied).count(), crate::service::MAX_VERIFY_QUEUE);
        let lines = h.audit_lines();
        assert_eq!(lines.iter().filter(|l| l["outcome"] == "unavailable").count(), extra, "each refusal is audited");
    });
}

#[test]
fn vm_budgets_span_sessions_and_free_with_the_hold() {
    conn::run_local(async {
        let h = harness(|c| {
            c.manifest.vms.max_host_vms = 3;
            c.manifest.vms.max_host_memory_mib = Some(1024);
            c.manifest.bundles.get_mut("owner").unwrap().max_principal_vms = Some(2);
        });
        let me = nix::unistd::getuid().as_raw();
        let a = h.svc.login_local(&local_peer(me, 1)).await.unwrap();
        let b = h.svc.login_local(&local_peer(me, 2)).await.unwrap();
        let reserve = |id: &str, mib: u32| {
            let mut req = h.host(id).reserve_vm_request();
            req.get().set_memory_mib(mib);
            async move {
                req.send()
                    .promise
                    .await
                    .map(|r| r.get().unwrap().get_hold().unwrap())
                    .map_err(|e| CvError::from_rpc(&e).expect("a typed error"))
            }
        };
        // The principal's two VMs may be in different sessions; a third is refused.
        let h1 = reserve(&a.session_id, 256).await.unwrap();
        let _h2 = reserve(&b.session_id, 256).await.unwrap();
        let e = err(reserve(&b.session_id, 256).await);
        assert_eq!(e.code, ErrorCode::Quota);
        assert!(e.message.contains("across sessions"), "{}", e.message);
        assert_eq!(h.svc.vm_usage(), (2, 512));
        // Dropping a hold gives its room back.
        drop(h1);
        let t0 = Instant::now();
        while h.svc.vm_usage().0 != 1 {
            assert!(t0.elapsed() < Duration::from_secs(5), "the hold was never released");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The host's memory budget holds for everyone.
        let e = err(reserve(&a.session_id, 800).await);
        assert_eq!(e.code, ErrorCode::Quota);
        assert!(e.message.contains("this host's 1024 MiB"), "{}", e.message);
        assert!(h.audit_lines().iter().any(|l| l["action"] == "vm.reserve" && l["outcome"] == "quota"));
    });
}

#[test]
fn an_unwritable_audit_log_fails_closed() {
    conn::run_local(async {
        // audit.jsonl points at /dev/full: every write fails (a full disk).
        let h = harness(|c| std::os::unix::fs::symlink("/dev/full", c.audit_path()).unwrap());
        let me = nix::unistd::getuid().as_raw();
        // The first login happens (nothing failed yet); its record is lost.
        let g = h.svc.login_local(&local_peer(me, 1)).await.unwrap();
        // From then on nothing privileged happens without a record.
        let e = err(h.svc.login_local(&local_peer(me, 2)).await);
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert!(e.message.contains("audit log"), "{}", e.message);
        assert_eq!(h.svc.session_count(), 1, "no session without a record");
        let budget = crate::server::PrincipalBudget { vms: 4, memory_mib: u64::MAX };
        assert_eq!(err(h.svc.reserve_vm(&g.principal.to_string(), budget, 256)).code, ErrorCode::Unavailable);
        let add = h.svc.account_add("local:root", &g.session_id, "zed", "user", "password-zed".into()).await;
        assert_eq!(err(add).code, ErrorCode::Unavailable);
        assert!(h.svc.store().list().is_empty(), "no account change without a record");
    });
}

// ---- local identities: [[local.map]] and credentials read from the socket --

/// The default manifest with `rules` as its `[[local.map]]`.
fn with_local_map(rules: &str) -> Manifest {
    let text = capvisor_manifest::DEFAULT_TOML.replace("owner_uids = []", &format!("owner_uids = []\n{rules}"));
    Manifest::parse(&text).unwrap()
}

fn denials_naming(h: &Harness, uid: u32) -> usize {
    h.audit_lines()
        .iter()
        .filter(|l| {
            l["method"] == "loginLocal"
                && l["outcome"] == "denied"
                && l["detail"].as_str().unwrap_or("").contains(&format!("uid {uid} "))
        })
        .count()
}

#[test]
fn local_map_uid_beats_group_first_match_wins_no_match_denied() {
    conn::run_local(async {
        let rules = "[[local.map]]\ngroup = 4242\nprofile = \"owner\"\n\
                     [[local.map]]\nuid = 1001\nprofile = \"user\"\n\
                     [[local.map]]\ngroup = 4343\nprofile = \"user\"";
        let h = harness(|c| c.manifest = with_local_map(rules));
        let g = |uid, gid, groups: &[u32]| PeerCred { uid, gid, pid: 7, groups: groups.to_vec() };

        // A uid rule beats an earlier group rule.
        let a = h.svc.login_local(&g(1001, GID_NONE, &[4242])).await.unwrap();
        assert_eq!(a.profile, "user");
        assert_eq!(a.principal.to_string(), format!("local:{}", crate::service::user_name(1001)));
        // Group rules: the first in order wins, supplementary or primary.
        assert_eq!(h.svc.login_local(&g(1002, GID_NONE, &[4343, 4242])).await.unwrap().profile, "owner");
        assert_eq!(h.svc.login_local(&g(1003, 4343, &[])).await.unwrap().profile, "user");
        // The worker of a mapped session gets the mapped bundle.
        let ctx = h.fake.st.borrow().contexts.iter().find(|c| c.session_id == a.session_id).cloned().unwrap();
        assert!(!ctx.bundle.has_cap("accounts"), "user profile: no accounts cap");
        assert_eq!(ctx.bundle.max_vms, 2);
        // owner_uids still give owner, whatever the rules say.
        let me = nix::unistd::getuid().as_raw();
        assert_eq!(h.svc.login_local(&g(me, 4343, &[])).await.unwrap().profile, "owner");
        // Nothing matches: typed denial, audited, no session.
        let before = h.svc.session_count();
        let e = err(h.svc.login_local(&g(1004, 5, &[6, 7])).await);
        assert_eq!(e.code, ErrorCode::Denied);
        assert_eq!(e.message, "uid 1004 may not log in locally");
        assert_eq!(h.svc.session_count(), before);
        assert_eq!(denials_naming(&h, 1004), 1, "the denial is audited with the peer's uid and groups");
        // The per-principal session bound of the mapped bundle applies
        // (user: max_sessions = 4; one is open already).
        for _ in 0..3 {
            h.svc.login_local(&g(1001, GID_NONE, &[])).await.unwrap();
        }
        assert_eq!(err(h.svc.login_local(&g(1001, GID_NONE, &[])).await).code, ErrorCode::Quota);
    });
}

/// A client socket connected by a thread running as `uid`/`gid` (raw
/// setresuid/setresgid change only the calling thread's credentials, which
/// is what connect(2) records for SO_PEERCRED): the broker's end of it.
fn socket_of_uid(dir: &std::path::Path, uid: u32, gid: u32) -> std::os::unix::net::UnixStream {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("as-{uid}.sock"));
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
    let client = std::thread::spawn(move || {
        // SAFETY: plain syscalls with integer arguments; they change only
        // this short-lived thread's credentials.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()), 0);
            assert_eq!(libc::syscall(libc::SYS_setresgid, gid, gid, gid), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
        }
        std::os::unix::net::UnixStream::connect(&path).unwrap()
    })
    .join()
    .unwrap();
    let (server, _) = l.accept().unwrap();
    // The client end may go: SO_PEERCRED was fixed at connect.
    std::mem::forget(client);
    server
}

#[test]
fn the_broker_uses_the_sockets_credentials_not_the_gateways_word() {
    conn::run_local(async {
        let h = harness(|c| c.manifest = with_local_map("[[local.map]]\nuid = 54321\nprofile = \"user\""));
        let broker: capvisor_rpc::schema::internal_capnp::broker::Client =
            capnp_rpc::new_client(crate::server::BrokerServer::new(h.svc.clone()));
        let (gw, br) = fdpass::pair().unwrap();
        let (gw, br) = (FdChannel::new(gw).unwrap(), FdChannel::new(br).unwrap());
        let _lp = tokio::task::spawn_local(h.svc.clone().run_attach_loop(br));
        let login = |conn: &str| {
            let mut req = broker.login_local_request();
            req.get().set_conn(conn);
            req.send().promise
        };
        let profile = |r: capnp::Result<capnp::capability::Response<_>>| -> Result<String, ErrorCode> {
            match r {
                Ok(resp) => {
                    let resp: capnp::capability::Response<
                        capvisor_rpc::schema::internal_capnp::broker::login_local_results::Owned,
                    > = resp;
                    Ok(resp.get().unwrap().get_info().unwrap().get_profile().unwrap().to_string().unwrap())
                }
                Err(e) => Err(CvError::from_rpc(&e).unwrap().code),
            }
        };

        // The "gateway" (this test, an owner uid) passes a socket of its own.
        let (mine, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        gw.send(b"login:aaaa", &mine).await.unwrap();
        drop(mine);
        assert_eq!(profile(login("aaaa").await), Ok("owner".into()));
        assert_eq!(h.svc.login_sockets_held(), 0, "taken by its call");
        // Its id cannot be used twice, and an id never passed gets nothing:
        // the gateway cannot log in as anyone without a client's socket.
        let t = Instant::now();
        assert_eq!(profile(login("aaaa").await), Err(ErrorCode::Denied));
        assert!(t.elapsed() >= crate::service::LOGIN_SOCKET_WAIT - Duration::from_millis(100));
        assert!(h.audit_lines().iter().any(|l| l["method"] == "loginLocal"
            && l["outcome"] == "denied"
            && l["detail"].as_str().unwrap().contains("no client socket")));
        assert_eq!(h.svc.session_count(), 1);

        if nix::unistd::geteuid().is_root() {
            // A socket whose client runs as uid 54321: that uid is who logs
            // in, although the caller (the "gateway") is an owner uid.
            let dir = tempfile::tempdir().unwrap();
            let theirs = socket_of_uid(dir.path(), UID_OTHER, UID_OTHER);
            gw.send(b"login:bbbb", &theirs).await.unwrap();
            drop(theirs);
            let resp = login("bbbb").await.unwrap();
            let info = resp.get().unwrap().get_info().unwrap();
            assert_eq!(info.get_profile().unwrap().to_str().unwrap(), "user");
            let p = capvisor_rpc::principal::Principal::read_from(info.get_principal().unwrap()).unwrap();
            assert_eq!(p.to_string(), format!("local:{}", crate::service::user_name(UID_OTHER)));
            // ... and one of a uid nothing maps is denied.
            let nobody = socket_of_uid(dir.path(), 54_322, 54_322);
            gw.send(b"login:cccc", &nobody).await.unwrap();
            drop(nobody);
            assert_eq!(profile(login("cccc").await), Err(ErrorCode::Denied));
            assert_eq!(denials_naming(&h, 54_322), 1);
        } else {
            eprintln!("skipping the other-uid half: needs root to connect as another uid");
        }
    });
}

#[test]
fn login_sockets_are_bounded_and_dropped_when_their_client_hangs_up() {
    conn::run_local(async {
        let h = harness(|_| {});
        let mut clients = vec![];
        for i in 0..crate::service::MAX_LOGIN_SOCKETS + 10 {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            h.svc.add_login_socket(&format!("{i}"), ours.into());
            clients.push(theirs);
        }
        assert_eq!(h.svc.login_sockets_held(), crate::service::MAX_LOGIN_SOCKETS, "one more is closed at once");
        // Clients that hung up free their places at the next arrival.
        clients.truncate(100);
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        h.svc.add_login_socket("late", ours.into());
        assert_eq!(h.svc.login_sockets_held(), 101);
        let (p, _fd) = h.svc.login_socket("late", "loginLocal").await.unwrap();
        assert_eq!(p.uid, nix::unistd::geteuid().as_raw());
    });
}

#[test]
fn one_source_guesses_one_account_at_a_time_others_are_not_held_up() {
    conn::run_local(async {
        let h = harness(|_| {});
        for u in ["ann", "ben", "cat"] {
            h.svc.store().add(u, "user", &format!("password-{u}")).unwrap();
        }
        let order = Rc::new(RefCell::new(Vec::new()));
        let attempt = |user: &'static str, peer: &'static str| {
            let (svc, order) = (h.svc.clone(), order.clone());
            tokio::task::spawn_local(async move {
                let t = Instant::now();
                let r = svc.login_password(user, "wrong-guess-1", peer).await;
                order.borrow_mut().push(user);
                (r, t.elapsed())
            })
        };
        // uid 9 guesses at two accounts at once; uid 10 tries a third.
        let first = attempt("ann", "unix:uid=9 pid=1");
        tokio::task::yield_now().await;
        let second = attempt("ben", "unix:uid=9 pid=2");
        let other = attempt("cat", "unix:uid=10 pid=3");
        let (r1, _) = first.await.unwrap();
        let (r2, t2) = second.await.unwrap();
        let (r3, _) = other.await.unwrap();
        for r in [r1, r2, r3] {
            assert_eq!(err(r).message, BAD_LOGIN);
        }
        // The second guess of uid 9 waited for the first's verification and
        // failure delay before its own (each delay is at least BASE) ...
        assert!(t2 >= crate::throttle::BASE * 2, "the second guess ran in parallel: {t2:?}");
        // ... while uid 10 was not held up behind uid 9.
        // (ann and cat verify side by side, in either order; ben only after both.)
        assert_eq!(order.borrow().last(), Some(&"ben"), "{:?}", order.borrow());
        // Nothing is left in the table of sources once attempts end.
        assert_eq!(h.svc.sources_in_progress(), 0);
    });
}

#[test]
fn secrets_follow_the_bundle_and_never_reach_the_audit_log() {
    conn::run_local(async {
        let h = harness(|_| {});
        h.svc.store().add("bob", "user", "password-bob").unwrap();
        let owner = h.svc.login_local(&local_peer(nix::unistd::getuid().as_raw(), 1)).await.unwrap();
        let user = h.svc.login_password("bob", "password-bob", "p").await.unwrap();
        const VALUE: &str = "tok-9f8e7d6c5b4a-SECRET";
        let typed = |e: capnp::Error| CvError::from_rpc(&e).expect("a typed error");
        let put = |id: &str, name: &str| {
            let mut req = h.host(id).put_secret_request();
            req.get().set_name(name);
            req.get().set_value(VALUE.as_bytes());
            let mut hs = req.get().init_hosts(2);
            hs.set(0, "api.test");
            hs.set(1, "*.svc.test");
            async move { req.send().promise.await.map(drop).map_err(typed) }
        };
        let reveal = |id: &str, name: &str, host: &str| {
            let mut req = h.host(id).reveal_secret_request();
            req.get().set_name(name);
            req.get().set_host(host);
            async move {
                let r = req.send().promise.await.map_err(typed)?;
                let r = r.get().unwrap();
                Ok::<_, CvError>((r.get_found(), r.get_matched(), r.get_value().unwrap().to_vec()))
            }
        };
        // A user bundle holds no "secrets": put, list and remove are notFound.
        assert_eq!(put(&user.session_id, "api").await.unwrap_err().code, ErrorCode::NotFound);
        let list = h.host(&user.session_id).list_secrets_request().send().promise.await.map(drop).map_err(typed);
        assert_eq!(list.unwrap_err().code, ErrorCode::NotFound);
        // The owner's put is listed without its value.
        put(&owner.session_id, "api").await.unwrap();
        let resp = h.host(&owner.session_id).list_secrets_request().send().promise.await.unwrap();
        let list = resp.get().unwrap().get_secrets().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list.get(0).get_name().unwrap().to_str().unwrap(), "api");
        let hosts: Vec<String> =
            list.get(0).get_hosts().unwrap().iter().map(|x| x.unwrap().to_string().unwrap()).collect();
        assert_eq!(hosts, ["api.test", "*.svc.test"]);
        // Reveal needs no bundle cap but only sees the session's own principal.
        assert_eq!(reveal(&owner.session_id, "api", "x.svc.test").await.unwrap(), (true, true, VALUE.into()));
        assert_eq!(reveal(&owner.session_id, "api", "evil.test").await.unwrap(), (true, false, vec![]));
        assert_eq!(reveal(&user.session_id, "api", "api.test").await.unwrap(), (false, false, vec![]));
        let mut rm = h.host(&owner.session_id).remove_secret_request();
        rm.get().set_name("api");
        rm.send().promise.await.unwrap();
        let mut rm = h.host(&owner.session_id).remove_secret_request();
        rm.get().set_name("api");
        assert_eq!(rm.send().promise.await.map(drop).map_err(typed).unwrap_err().code, ErrorCode::NotFound);
        let lines = h.audit_lines();
        let put_line = lines.iter().find(|l| l["action"] == "secret.put" && l["outcome"] == "ok").expect("put audited");
        assert_eq!(put_line["detail"], "api hosts=api.test,*.svc.test");
        assert!(lines.iter().any(|l| l["action"] == "secret.remove" && l["outcome"] == "ok"));
        assert!(lines.iter().any(|l| l["action"] == "secret.remove" && l["outcome"] == "notFound"));
        assert!(lines.iter().any(|l| l["action"] == "secret.reveal"
            && l["outcome"] == "denied"
            && l["detail"] == "api for host evil.test"));
        assert!(!h.audit_text().contains(VALUE), "the value reached the audit log");
    });
}

#[test]
fn query_audit_needs_the_audit_cap_sees_every_principal_and_is_audited() {
    conn::run_local(async {
        let h = harness(|_| {});
        h.svc.store().add("bob", "user", "password-bob").unwrap();
        let owner = h.svc.login_local(&local_peer(nix::unistd::getuid().as_raw(), 1)).await.unwrap();
        let user = h.svc.login_password("bob", "password-bob", "p").await.unwrap();
        // Bob's worker reports an event about VM "x".
        let mut req = h.host(&user.session_id).audit_request();
        let mut ev = req.get().init_event();
        ev.set_action("vm.create");
        ev.set_cap("vms");
        ev.set_method("create");
        ev.set_vm("x");
        ev.reborrow().init_outcome().set_ok(());
        req.send().promise.await.unwrap();
        let query = |session: &str, vm: &str, action: &str| {
            let mut req = h.host(session).query_audit_request();
            req.get().set_vm(vm);
            req.get().set_action(action);
            async move {
                let resp = req.send().promise.await.map_err(|e| CvError::from_rpc(&e).expect("a typed error"))?;
                let list = resp.get().unwrap().get_entries().unwrap();
                Ok::<_, CvError>(
                    list.iter()
                        .map(|e| {
                            let t = |r: capnp::Result<capnp::text::Reader<'_>>| r.unwrap().to_string().unwrap();
                            (t(e.get_principal()), t(e.get_action()), t(e.get_vm()))
                        })
                        .collect::<Vec<_>>(),
                )
            }
        };
        // A user bundle has no "audit": notFound, and nothing of the log.
        assert_eq!(err(query(&user.session_id, "", "").await).code, ErrorCode::NotFound);
        // The owner sees bob's record, with its VM.
        let got = query(&owner.session_id, "x", "").await.unwrap();
        assert_eq!(got, vec![("password:bob".to_string(), "vm.create".to_string(), "x".to_string())]);
        assert_eq!(query(&owner.session_id, "y", "").await.unwrap(), vec![]);
        // Both queries were audited, the refused one too.
        let q = query(&owner.session_id, "", "audit.query").await.unwrap();
        let principals: Vec<&str> = q.iter().map(|(p, _, _)| p.as_str()).collect();
        assert!(principals.contains(&"password:bob"), "{q:?}");
        assert!(principals.contains(&owner.principal.to_string().as_str()), "{q:?}");
        let lines = h.audit_lines();
        assert!(lines.iter().any(|l| l["action"] == "audit.query" && l["outcome"] == "notFound"));
        assert!(lines.iter().any(|l| l["action"] == "vm.create" && l["vm"] == "x"));
        // Querying for the queries does not amplify: 20 equal queries are
        // one line and one counted line.
        for _ in 0..20 {
            query(&owner.session_id, "", "audit.query").await.unwrap();
        }
        h.svc.audit_log().flush_all();
        let text = h.audit_text();
        let mine: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("\"audit.query\"") && l.contains("action=\\\"audit.query\\\""))
            .collect();
        // The earlier one, this run's first and one counted line.
        assert_eq!(mine.len(), 3, "{mine:?}");
        assert!(mine.iter().any(|l| l.contains("\"repeated\":19")), "{mine:?}");
    });
}
