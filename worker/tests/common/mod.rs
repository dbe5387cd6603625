//! Fakes and helpers shared by the worker's in-process tests (`inproc`,
//! `bounds`, `rootfs`): the worker's real `SessionState` with a fake broker
//! (`SessionHost`), and for tests without real VMs a fake vmm launcher whose
//! "VMs" are a fake `Machine` plus whatever `Guest` the test serves on a
//! socketpair. A client attaches exactly as one the broker hands over.

#![allow(dead_code)]

use capnp::capability::Rc as CapRc;
use capvisor_manifest::{BuiltImage, Bundle, Manifest, SessionContext};
use capvisor_rpc::principal::Principal;
use capvisor_rpc::schema::capvisor_capnp::{session, AuthMethod, Engine, VmState};
use capvisor_rpc::schema::internal_capnp::{audit_outcome, machine, session_host, vm_hold};
use capvisor_rpc::vmconfig::VmConfig;
use capvisor_rpc::{conn, CvResult};
use capvisor_worker::launch::{LaunchedVm, VmLauncher};
use capvisor_worker::state::SessionState;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

/// What the fake broker and the fake launcher and machines saw, and how
/// they are told to behave.
#[derive(Default)]
pub struct Seen {
    /// The config of every launch, in order.
    pub launched: Vec<VmConfig>,
    /// Audit events as (action, outcome: "ok" or the error code's name).
    pub audit: Vec<(String, String)>,
    /// `SessionHost.logout` calls.
    pub logouts: usize,
    /// `Machine.stop` calls.
    pub machines_stopped: usize,
    /// Launch VMs whose guest never answers (their agent ends are kept in `hung`).
    pub hang: bool,
    /// The agent ends of VMs launched while `hang` was set.
    pub hung: Vec<tokio::net::UnixStream>,
    /// One switch per launched machine: `true` makes its vmm "die" (its
    /// `waitExit` fails the way a lost connection does).
    pub kill_switches: Vec<tokio::sync::watch::Sender<bool>>,
    /// VM reservations held now.
    pub holds: usize,
    /// The most reservations the fake broker grants; `None`: no bound.
    pub max_holds: Option<usize>,
    /// Grants registered (`addGrant`): (id, label, chain ids).
    pub grants_added: Vec<(String, String, Vec<String>)>,
    /// Grants ended (`endGrants`): (id, reason).
    pub grants_ended: Vec<(String, String)>,
    /// Audit events that came through grants: (action, outcome, chain ids).
    pub audit_chains: Vec<(String, String, Vec<String>)>,
    /// Launches on this engine fail (`unavailable`), as a kvm engine that
    /// cannot run here would.
    pub failing_engine: Option<Engine>,
}

/// [`Seen`], shared between the test and its fakes.
pub type Shared = Rc<RefCell<Seen>>;

/// `SessionHost` (the broker's side of a session) that records audit
/// events and logouts, and grants VM reservations up to `max_holds`
/// (then `quota`).
pub struct FakeHost(pub Shared);

/// A reservation of the fake broker: counted in `holds` while it lives.
struct FakeHold(Shared);

impl vm_hold::Server for FakeHold {}

impl Drop for FakeHold {
    fn drop(&mut self) {
        self.0.borrow_mut().holds -= 1;
    }
}

impl session_host::Server for FakeHost {
    async fn logout(
        self: CapRc<Self>,
        _: session_host::LogoutParams,
        _: session_host::LogoutResults,
    ) -> capnp::Result<()> {
        self.0.borrow_mut().logouts += 1;
        Ok(())
    }
    async fn audit(
        self: CapRc<Self>,
        p: session_host::AuditParams,
        _: session_host::AuditResults,
    ) -> capnp::Result<()> {
        let ev = p.get()?.get_event()?;
        let outcome = match ev.get_outcome()?.which()? {
            audit_outcome::Ok(()) => "ok".to_string(),
            audit_outcome::Error(c) => capvisor_rpc::error::code_name(c?).to_string(),
        };
        let action = ev.get_action()?.to_string().unwrap();
        let chain: Vec<String> = ev.get_grants()?.iter().map(|g| g.get_id().unwrap().to_string().unwrap()).collect();
        let mut seen = self.0.borrow_mut();
        if !chain.is_empty() {
            seen.audit_chains.push((action.clone(), outcome.clone(), chain));
        }
        seen.audit.push((action, outcome));
        Ok(())
    }
    async fn add_grant(
        self: CapRc<Self>,
        p: session_host::AddGrantParams,
        mut r: session_host::AddGrantResults,
    ) -> capnp::Result<()> {
        let p = p.get()?;
        let id = p.get_grant_id()?.to_string().unwrap();
        let chain = p.get_chain()?.iter().map(|g| g.get_id().unwrap().to_string().unwrap()).collect();
        self.0.borrow_mut().grants_added.push((id.clone(), p.get_label()?.to_string().unwrap(), chain));
        r.get().set_token(format!("token-{id}").as_str());
        Ok(())
    }
    async fn received_grants(
        self: CapRc<Self>,
        _: session_host::ReceivedGrantsParams,
        _: session_host::ReceivedGrantsResults,
    ) -> capnp::Result<()> {
        Ok(())
    }
    async fn end_grants(
        self: CapRc<Self>,
        p: session_host::EndGrantsParams,
        _: session_host::EndGrantsResults,
    ) -> capnp::Result<()> {
        let p = p.get()?;
        let reason = p.get_reason()?.to_string().unwrap();
        for id in p.get_grant_ids()?.iter() {
            self.0.borrow_mut().grants_ended.push((id?.to_string().unwrap(), reason.clone()));
        }
        Ok(())
    }
    async fn reserve_vm(
        self: CapRc<Self>,
        _: session_host::ReserveVmParams,
        mut r: session_host::ReserveVmResults,
    ) -> capnp::Result<()> {
        let mut seen = self.0.borrow_mut();
        if seen.max_holds.is_some_and(|m| seen.holds >= m) {
            return Err(capvisor_rpc::CvError::quota("the principal's VM budget is used up").into());
        }
        seen.holds += 1;
        drop(seen);
        r.get().set_hold(capnp_rpc::new_client::<vm_hold::Client, _>(FakeHold(self.0.clone())));
        Ok(())
    }
}

/// `Machine` (a vmm's control object) that runs until stopped, or until
/// its kill switch "kills" the vmm.
struct FakeMachine {
    engine: Engine,
    state: tokio::sync::watch::Sender<VmState>,
    dead: tokio::sync::watch::Receiver<bool>,
    seen: Shared,
}

impl FakeMachine {
    fn write(&self, mut b: capvisor_rpc::schema::internal_capnp::machine_status::Builder<'_>) {
        b.set_state(*self.state.borrow());
        b.set_engine(self.engine);
    }
}

impl machine::Server for FakeMachine {
    async fn status(self: CapRc<Self>, _: machine::StatusParams, mut r: machine::StatusResults) -> capnp::Result<()> {
        self.write(r.get().init_status());
        Ok(())
    }
    async fn stop(self: CapRc<Self>, _: machine::StopParams, mut r: machine::StopResults) -> capnp::Result<()> {
        self.state.send_replace(VmState::Stopped);
        self.seen.borrow_mut().machines_stopped += 1;
        self.write(r.get().init_status());
        Ok(())
    }
    async fn wait_exit(
        self: CapRc<Self>,
        _: machine::WaitExitParams,
        mut r: machine::WaitExitResults,
    ) -> capnp::Result<()> {
        let mut rx = self.state.subscribe();
        let mut dead = self.dead.clone();
        tokio::select! {
            _ = rx.wait_for(|s| matches!(s, VmState::Stopped | VmState::Crashed)) => {}
            _ = dead.wait_for(|d| *d) => return Err(capnp::Error::disconnected("Peer disconnected.".into())),
        }
        self.write(r.get().init_status());
        Ok(())
    }
}

/// Serves a VM's `Guest` on the guest end of its agent socketpair.
pub type GuestFn = Box<dyn Fn(tokio::net::UnixStream)>;

/// Launches "VMs" without a vmm: a [`FakeMachine`] and a guest served by
/// its [`GuestFn`] (none while [`Seen::hang`] is set); records each launch.
pub struct FakeLauncher {
    seen: Shared,
    guest: GuestFn,
}

impl FakeLauncher {
    /// A launcher whose guests are served by `guest`.
    pub fn new(seen: Shared, guest: impl Fn(tokio::net::UnixStream) + 'static) -> FakeLauncher {
        FakeLauncher { seen, guest: Box::new(guest) }
    }

    /// A launcher whose guests are guest-init's real `Guest` server (its
    /// commands run on this host, as this test).
    pub fn guest_init(seen: Shared) -> FakeLauncher {
        use capvisor_guest_init::{boottime_ms, serve_stream, GuestServer, ShutdownMode};
        FakeLauncher::new(seen, |theirs| {
            let guest = GuestServer::new(boottime_ms(), ShutdownMode::EndServing).into_client();
            tokio::task::spawn_local(serve_stream(theirs, guest));
        })
    }
}

impl VmLauncher for FakeLauncher {
    fn launch(&self, cfg: &VmConfig) -> CvResult<LaunchedVm> {
        self.seen.borrow_mut().launched.push(cfg.clone());
        if self.seen.borrow().failing_engine == Some(cfg.engine) {
            return Err(capvisor_rpc::CvError::unavailable(format!("engine {:?} cannot run here (test)", cfg.engine)));
        }
        let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        if self.seen.borrow().hang {
            self.seen.borrow_mut().hung.push(theirs);
        } else {
            (self.guest)(theirs);
        }
        let (state, _) = tokio::sync::watch::channel(VmState::Running);
        let (kill, dead) = tokio::sync::watch::channel(false);
        self.seen.borrow_mut().kill_switches.push(kill);
        let machine = capnp_rpc::new_client(FakeMachine { engine: cfg.engine, state, dead, seen: self.seen.clone() });
        Ok(LaunchedVm { machine, machine_conn: None, agent: ours, child: None, egress: None })
    }
}

/// A `base` image for fake launchers (its kernel and initramfs paths are
/// never opened).
pub fn fake_image() -> BuiltImage {
    BuiltImage {
        kernel: "/k".into(),
        initramfs: "/i".into(),
        kernel_release: "6.1-test".into(),
        rootfs: None,
        writable_mib: 0,
    }
}

/// The default manifest's `owner` bundle, edited by `edit`.
pub fn owner_bundle(edit: impl FnOnce(&mut Bundle)) -> Bundle {
    let mut b = Manifest::default_manifest().bundle_for("owner").unwrap().clone();
    edit(&mut b);
    b
}

/// An owner session `session_id` of local principal `tester`, valid for an
/// hour, with `bundle`, `images` and VM run dirs below `run_dir`; QEMU for
/// `auto`, and every confinement layer optional (in-process there is no
/// session cgroup; the absences are audited).
pub fn context(
    session_id: &str,
    bundle: Bundle,
    images: BTreeMap<String, BuiltImage>,
    run_dir: PathBuf,
) -> SessionContext {
    SessionContext {
        session_id: session_id.into(),
        principal: Principal::new(AuthMethod::Local, "tester"),
        profile: "owner".into(),
        bundle,
        expires_at_ms: capvisor_worker::state::now_ms() + 3_600_000,
        images,
        run_dir,
        auto_engine: Engine::Qemu,
        confinement: capvisor_rpc::vmconfig::Confinement {
            cgroup: false,
            netns: false,
            landlock: false,
            ..Default::default()
        },
        volume_dir: None,
        net: Default::default(),
    }
}

/// A client of `st` attached the way the broker hands one over: a socket
/// the worker answers with the attach reply and then serves `Session` on;
/// with the client's RPC system (abort it to hang up).
pub async fn attach_with_conn(
    st: &Rc<SessionState>,
) -> (session::Client, tokio::task::JoinHandle<Result<(), capnp::Error>>) {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    capvisor_worker::serve::attach_client(st.clone(), None, theirs.into());
    let mut ours = capvisor_rpc::spawn::into_tokio(ours.into()).unwrap();
    capvisor_rpc::attach::read_reply(&mut ours).await.unwrap().unwrap();
    conn::connect::<session::Client>(ours, None, conn::UNTRUSTED)
}

/// A client of the delegate session of grant `grant_id` of `st`, attached
/// the way the broker hands one over after `Gateway.redeem` (tag
/// `grant:<id>`). Errors: the attach reply's (staleSession for an ended
/// grant).
pub async fn attach_delegate(st: &Rc<SessionState>, grant_id: &str) -> Result<session::Client, capvisor_rpc::CvError> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let g = capvisor_worker::caps::delegate_grant(st, grant_id);
    capvisor_worker::serve::attach_client(st.clone(), Some(g), theirs.into());
    let mut ours = capvisor_rpc::spawn::into_tokio(ours.into()).unwrap();
    capvisor_rpc::attach::read_reply(&mut ours).await.unwrap()?;
    Ok(conn::connect::<session::Client>(ours, None, conn::UNTRUSTED).0)
}

/// [`attach_with_conn`] without the RPC system's handle.
pub async fn attach(st: &Rc<SessionState>) -> session::Client {
    attach_with_conn(st).await.0
}

/// A worker in-process: an owner session (`session_id`, bundle edited by
/// `bundle`, the [`fake_image`] as `base`, run dirs in a temporary
/// directory) behind a [`FakeHost`], launching with [`FakeLauncher`].
pub struct Worker {
    /// The worker's session state.
    pub st: Rc<SessionState>,
    /// What its fakes saw.
    pub seen: Shared,
    _dir: tempfile::TempDir,
}

impl Worker {
    /// A worker whose VMs' guests are served by `guest`.
    pub fn new(
        session_id: &str,
        bundle: impl FnOnce(&mut Bundle),
        guest: impl Fn(tokio::net::UnixStream) + 'static,
    ) -> Worker {
        let seen = Shared::default();
        Self::with_launcher(session_id, bundle, seen.clone(), FakeLauncher::new(seen, guest), Engine::Qemu)
    }

    /// A worker whose VMs' guests are guest-init's real `Guest` server.
    pub fn with_guest_init(session_id: &str, bundle: impl FnOnce(&mut Bundle)) -> Worker {
        Self::with_guest_init_auto(session_id, bundle, Engine::Qemu)
    }

    /// [`Worker::with_guest_init`] where `auto` means `auto_engine`.
    pub fn with_guest_init_auto(session_id: &str, bundle: impl FnOnce(&mut Bundle), auto_engine: Engine) -> Worker {
        let seen = Shared::default();
        let launcher = FakeLauncher::guest_init(seen.clone());
        Self::with_launcher(session_id, bundle, seen, launcher, auto_engine)
    }

    fn with_launcher(
        session_id: &str,
        bundle: impl FnOnce(&mut Bundle),
        seen: Shared,
        launcher: FakeLauncher,
        auto_engine: Engine,
    ) -> Worker {
        let dir = tempfile::tempdir().unwrap();
        let images = [("base".to_string(), fake_image())].into();
        let mut ctx = context(session_id, owner_bundle(bundle), images, dir.path().to_path_buf());
        ctx.auto_engine = auto_engine;
        let host: session_host::Client = capnp_rpc::new_client(FakeHost(seen.clone()));
        let st = SessionState::new(ctx, host, Box::new(launcher));
        Worker { st, seen, _dir: dir }
    }

    /// A client attached like one the broker hands over ([`attach`]).
    pub async fn attach(&self) -> session::Client {
        attach(&self.st).await
    }

    /// [`Worker::attach`], with the client's RPC system ([`attach_with_conn`]).
    pub async fn attach_with_conn(&self) -> (session::Client, tokio::task::JoinHandle<Result<(), capnp::Error>>) {
        attach_with_conn(&self.st).await
    }
}

/// Runs `f` on a current-thread runtime with a `LocalSet`, failing the test
/// after `limit`.
pub fn run_within<F: Future<Output = ()>>(limit: Duration, f: F) {
    conn::run_local(async move { tokio::time::timeout(limit, f).await.expect("test timed out") })
}

/// [`run_within`] 60 s.
pub fn run<F: Future<Output = ()>>(f: F) {
    run_within(Duration::from_secs(60), f)
}

/// The typed code of a failed client call (panics on success or an untyped error).
pub fn code<T: std::fmt::Debug>(
    r: Result<T, capvisor_client::ClientError>,
) -> capvisor_rpc::schema::common_capnp::ErrorCode {
    match r {
        Err(capvisor_client::ClientError::Domain(e)) => e.code,
        other => panic!("expected a typed domain error, got {other:?}"),
    }
}

/// A VM spec with just a name (defaults otherwise).
pub fn spec(name: &str) -> capvisor_client::ops::VmSpec {
    capvisor_client::ops::VmSpec { name: name.into(), ..Default::default() }
}
