//! `VmFactory` and `Vm`: this session's VMs. Each VM is one `capvisor-vmm`
//! process (serving `Machine`) that the session's [`crate::launch::VmLauncher`]
//! starts; the worker talks to guest-init's `Guest` directly on the VM's
//! agent channel (no proxy hop in between).
//!
//! Identity: a `Vm` capability holds its [`VmEntry`], never a name. After
//! `remove` the entry is marked removed, so that cap (and every `Process`,
//! `Files` or sink reached through it) answers `notFound`, also when a new
//! VM later takes the same name.

use crate::state::SessionState;
use crate::wrap::{FilesWrapper, ProcessWrapper, Scope, SinkWrapper};
use capnp::capability::Rc as CapRc;
use capvisor_rpc::conn::{self, CallGauge, GUEST, GUEST_CALLS};
use capvisor_rpc::error::text;
use capvisor_rpc::names::{revoke_reason_name, valid_name};
use capvisor_rpc::schema::capvisor_capnp::{vm, vm_factory, vm_info, vm_spec, Engine, VmState};
use capvisor_rpc::schema::common_capnp::ErrorCode;
use capvisor_rpc::schema::guest_capnp::guest;
use capvisor_rpc::schema::internal_capnp::{machine, RevokeReason};
use capvisor_rpc::vmconfig::VmConfig;
use capvisor_rpc::{CvError, CvResult};
use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How long a guest may take from vmm spawn to guest-init answering `hello`.
/// TCG boots take 3-8 s on our 2-core machines, more under load.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// How long `auto` gives our kvm engine to reach guest-init before it
/// falls back to QEMU (a hardware-KVM boot takes about a second).
pub const KVM_AUTO_TIMEOUT: Duration = Duration::from_secs(20);

/// How much of the console log a boot failure quotes, bytes.
pub const BOOT_FAILURE_TAIL: u64 = 1500;

/// One VM of the session: the object a `Vm` capability designates.
pub struct VmEntry {
    /// Unique within the session while the VM exists.
    pub name: String,
    /// Image name (manifest `[images.NAME]`).
    pub image: String,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Number of vCPUs (at least 1).
    pub vcpus: u32,
    /// Engine: as requested until the vmm says which one runs it.
    pub engine: Cell<Engine>,
    /// Current state.
    pub state: Cell<VmState>,
    /// `uname -r` of the guest, once booted.
    pub kernel_release: RefCell<String>,
    /// Create call to guest-init answering, ms.
    pub boot_ms: Cell<u64>,
    /// Why it stopped or crashed (empty while it runs); may quote the
    /// guest, so it is stored terminal-safe.
    pub detail: RefCell<String>,
    /// The VM's private directory (console.log, vmm.log).
    pub run_dir: PathBuf,
    /// Set while the VM runs.
    pub running: RefCell<Option<Running>>,
    /// Set by `remove`: every cap designating this VM answers notFound.
    pub removed: Cell<bool>,
    /// The broker's reservations while the VM runs, dropped when it stops
    /// or is removed: room in the principal's and the host's VM budgets,
    /// then one lease per attached volume.
    pub holds: RefCell<Vec<capvisor_rpc::schema::internal_capnp::vm_hold::Client>>,
    /// The volumes asked for at create, in disk order after the image's.
    pub mounts: Vec<VolumeMount>,
    /// The host files of the attached volumes (leased by the broker), in
    /// the order of `mounts`.
    pub volume_files: RefCell<Vec<PathBuf>>,
    /// Woken when the VM stops or crashes ([`VmEntry::set_ended`]): calls
    /// forwarded into the guest then end with `notRunning` instead of
    /// waiting on a connection that is gone (`crate::wrap::Scope::forward`).
    pub ended: tokio::sync::Notify,
}

/// Handles of a running VM.
pub struct Running {
    /// The vmm's `Machine`.
    pub machine: machine::Client,
    /// guest-init's `Guest`, over the agent channel.
    pub guest: guest::Client,
    /// The vmm process, if it is one.
    pub child: Option<tokio::process::Child>,
    /// The RPC systems of the Machine and agent connections; aborting
    /// them closes both sockets, which tells the vmm to exit.
    pub conns: Vec<tokio::task::JoinHandle<Result<(), capnp::Error>>>,
    /// What the guest has in progress on its agent link (its calls on the
    /// sinks it was given), bounded by [`GUEST_CALLS`].
    pub agent_calls: Rc<CallGauge>,
    /// Fires with the error when the agent link fails (taken by the exit
    /// watcher).
    pub agent_failed: Option<tokio::sync::oneshot::Receiver<capnp::Error>>,
}

impl Running {
    /// Ends both connections and reaps the vmm: waits up to 5 s, then kills.
    async fn finish(mut self) {
        for c in &self.conns {
            c.abort();
        }
        if let Some(child) = self.child.as_mut() {
            if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_err() {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }
}

impl VmEntry {
    /// Moves the VM to `state` (`Stopped` or `Crashed`) and wakes every
    /// call waiting in [`VmEntry::wait_ended`].
    pub fn set_ended(&self, state: VmState) {
        self.state.set(state);
        self.ended.notify_waiters();
    }

    /// Resolves once the VM is stopped or crashed (at once if it is).
    pub async fn wait_ended(&self) {
        loop {
            let notified = self.ended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if matches!(self.state.get(), VmState::Stopped | VmState::Crashed) {
                return;
            }
            notified.await;
        }
    }

    /// `notFound` once the VM was removed.
    pub fn check_present(&self) -> CvResult<()> {
        if self.removed.get() {
            return Err(CvError::not_found(format!("VM {:?} was removed", self.name)));
        }
        Ok(())
    }

    fn guest(&self) -> CvResult<guest::Client> {
        self.check_present()?;
        match &*self.running.borrow() {
            Some(r) => Ok(r.guest.clone()),
            None => Err(CvError::not_running(format!("VM {:?} is not running", self.name))),
        }
    }

    /// Writes this VM's facts into a schema `VmInfo`.
    pub fn fill_info(&self, mut b: vm_info::Builder<'_>) {
        b.set_name(self.name.as_str());
        b.set_image(self.image.as_str());
        b.set_memory_mib(self.memory_mib);
        b.set_vcpus(self.vcpus);
        b.set_state(self.state.get());
        b.set_engine(self.engine.get());
        b.set_kernel_release(self.kernel_release.borrow().as_str());
        b.set_boot_ms(self.boot_ms.get());
        b.set_detail(self.detail.borrow().as_str());
        let mut l = b.init_volumes(self.mounts.len() as u32);
        for (i, m) in self.mounts.iter().enumerate() {
            let mut e = l.reborrow().get(i as u32);
            e.set_volume(m.volume.as_str());
            e.set_guest_path(m.guest_path.as_str());
            e.set_read_only(m.read_only);
        }
    }

    /// The last `max` bytes of the guest console log, lossily decoded.
    pub fn console_tail(&self, max: u64) -> String {
        String::from_utf8_lossy(&capvisor_rpc::read_tail(&self.run_dir.join("console.log"), max)).into_owned()
    }
}

/// Most volumes one VM may attach (`VmSpec.volumes`).
pub const MAX_VM_VOLUMES: usize = 4;

/// Longest guest mount path of a volume, bytes.
pub const MAX_GUEST_PATH: usize = 128;

/// One volume to attach to a VM (schema `VolumeMount`), validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeMount {
    /// The principal's volume name.
    pub volume: String,
    /// Where guest-init mounts it (see [`check_guest_path`]).
    pub guest_path: String,
    /// Attached read-only (shared) rather than read-write (exclusive).
    pub read_only: bool,
}

/// Checks a volume's guest mount path: absolute, at most
/// [`MAX_GUEST_PATH`] bytes of `[A-Za-z0-9._/-]`, not `/`, no empty, `.`
/// or `..` component, not below the guest's own mounts (`/proc`, `/sys`,
/// `/dev`, `/run`). It becomes one word of the kernel command line.
///
/// Errors: `invalidArgument` naming the rule.
pub fn check_guest_path(p: &str) -> CvResult<()> {
    let bad = |why: &str| Err(CvError::invalid(format!("bad guest path {p:?} for a volume: {why}")));
    if !p.starts_with('/') || p.len() > MAX_GUEST_PATH {
        return bad(&format!("it must be absolute and at most {MAX_GUEST_PATH} bytes"));
    }
    if !p.bytes().all(|c| c.is_ascii_alphanumeric() || b"._/-".contains(&c)) {
        return bad("use only [A-Za-z0-9._/-]");
    }
    let parts: Vec<&str> = p[1..].split('/').collect();
    if parts.iter().any(|c| c.is_empty() || *c == "." || *c == "..") {
        return bad("no empty, \".\" or \"..\" component, no trailing slash, not \"/\"");
    }
    if ["proc", "sys", "dev", "run"].contains(&parts[0]) {
        return bad("not below /proc, /sys, /dev or /run");
    }
    Ok(())
}

/// Validated creation request.
struct CreateSpec {
    name: String,
    image: String,
    memory_mib: u32,
    vcpus: u32,
    engine: Engine,
    volumes: Vec<VolumeMount>,
}

fn check_spec(st: &SessionState, spec: vm_spec::Reader<'_>) -> CvResult<CreateSpec> {
    let text = |r: capnp::Result<capnp::text::Reader<'_>>| -> CvResult<String> {
        r.ok()
            .and_then(|t| t.to_str().ok().map(str::to_string))
            .ok_or_else(|| CvError::invalid("text fields must be UTF-8"))
    };
    let bundle = &st.ctx.bundle;
    let mut name = text(spec.get_name())?;
    if name.is_empty() {
        name = st.next_vm_name();
    }
    if !valid_name(&name) {
        return Err(CvError::invalid(format!(
            "bad VM name {name:?}: use 1-32 of [a-z0-9-], starting with a letter or digit"
        )));
    }
    let mut image = text(spec.get_image())?;
    if image.is_empty() {
        image = "base".into();
    }
    if !bundle.images.contains(&image) || !st.ctx.images.contains_key(&image) {
        return Err(CvError::denied(format!(
            "image {image:?} is not allowed in this session (allowed: {})",
            bundle.images.join(", ")
        )));
    }
    let memory_mib = match spec.get_memory_mib() {
        0 => bundle.default_memory_mib,
        m => m,
    };
    if memory_mib > bundle.max_memory_mib {
        return Err(CvError::quota(format!(
            "{memory_mib} MiB exceeds this session's limit of {} MiB per VM",
            bundle.max_memory_mib
        )));
    }
    if memory_mib < 64 {
        return Err(CvError::invalid("a VM needs at least 64 MiB"));
    }
    let vcpus = spec.get_vcpus().max(1);
    if vcpus > bundle.max_vcpus {
        return Err(CvError::quota(format!("{vcpus} vCPUs exceed this session's limit of {}", bundle.max_vcpus)));
    }
    let engine = spec.get_engine().map_err(|e| CvError::invalid(format!("unknown engine (enumerant {})", e.0)))?;
    let list = spec.get_volumes().map_err(|e| CvError::invalid(format!("malformed volumes: {e}")))?;
    if !list.is_empty() && !bundle.has_cap("volumes") {
        return Err(CvError::denied("this session's bundle does not hold the volumes capability"));
    }
    if list.len() as usize > MAX_VM_VOLUMES {
        return Err(CvError::invalid(format!("a VM may attach at most {MAX_VM_VOLUMES} volumes")));
    }
    let mut volumes: Vec<VolumeMount> = Vec::new();
    for m in list.iter() {
        let m = VolumeMount {
            volume: text(m.get_volume())?,
            guest_path: text(m.get_guest_path())?,
            read_only: m.get_read_only(),
        };
        check_guest_path(&m.guest_path)?;
        if volumes.iter().any(|o| o.volume == m.volume || o.guest_path == m.guest_path) {
            return Err(CvError::invalid(format!(
                "volume {:?} or guest path {:?} is given twice",
                m.volume, m.guest_path
            )));
        }
        volumes.push(m);
    }
    let vms = st.vms.borrow();
    if vms.contains_key(&name) {
        return Err(CvError::new(ErrorCode::AlreadyExists, format!("a VM named {name:?} exists")));
    }
    if vms.len() as u32 >= bundle.max_vms {
        return Err(CvError::quota(format!(
            "this session may have at most {} VMs (it has {}); remove one first",
            bundle.max_vms,
            vms.len()
        )));
    }
    Ok(CreateSpec { name, image, memory_mib, vcpus, engine, volumes })
}

/// The worker's end of a VM's agent link (see [`agent_link`]).
struct AgentLink {
    /// guest-init's `Guest`.
    guest: guest::Client,
    /// The link's RPC system.
    conn: tokio::task::JoinHandle<Result<(), capnp::Error>>,
    /// What the guest has in progress on the link.
    calls: Rc<CallGauge>,
    /// Fires with the error when the link fails.
    failed: tokio::sync::oneshot::Receiver<capnp::Error>,
}

/// Opens the worker's end of a VM's agent link: guest-init's `Guest` as
/// the peer's bootstrap, read with the [`GUEST`] reader limits (1 MiB
/// messages) and at most [`GUEST_CALLS`] guest calls in progress. `failed`
/// fires when the link fails (a message over the limits, a protocol
/// violation), not when it is aborted.
fn agent_link(stream: tokio::net::UnixStream) -> AgentLink {
    use capnp_rpc::rpc_twoparty_capnp::Side;
    let (mut system, calls) = conn::rpc_system_limited(stream, Side::Client, None, GUEST, GUEST_CALLS);
    let guest: guest::Client = system.bootstrap(Side::Server);
    let (tx, failed) = tokio::sync::oneshot::channel();
    let conn = tokio::task::spawn_local(async move {
        let r = system.await;
        if let Err(e) = &r {
            let _ = tx.send(e.clone());
        }
        r
    });
    AgentLink { guest, conn, calls, failed }
}

/// File name of a VM's writable layer in its run directory (removed with
/// the run directory on `remove`).
pub const WRITABLE_LAYER: &str = "writable.ext4";

/// Attaches a root image: `rootfs` read-only as the first disk
/// (`/dev/vda`), and the VM's writable layer as the second (`/dev/vdb`): a
/// sparse file [`WRITABLE_LAYER`] of `writable_mib` MiB in the run
/// directory, formatted ext4 by mkfs.ext4(8) on the host when it does not
/// exist yet (a restarted VM keeps its layer). guest-init is told on the
/// kernel command line (`capvisor.root=/dev/vda capvisor.upper=/dev/vdb
/// capvisor.hostname=<vm>`, see guest-init's `rootfs` module). The layer's
/// size is the VM's disk quota: writes past it fail with ENOSPC in the
/// guest (docs/decisions.md).
///
/// Errors: `internal` when the file cannot be made or formatted
/// (mkfs.ext4's stderr in the message).
fn root_disks(mut cfg: VmConfig, rootfs: &std::path::Path, writable_mib: u64) -> CvResult<VmConfig> {
    let layer = cfg.run_dir.join(WRITABLE_LAYER);
    if !layer.exists() {
        capvisor_rpc::disk::create_ext4(&layer, writable_mib.max(1), "capvisor-rw", (0, 0))
            .map_err(|e| CvError::internal(format!("the writable layer: {}", e.message)))?;
    }
    cfg.disks = vec![
        capvisor_rpc::vmconfig::Disk { path: rootfs.to_path_buf(), read_only: true },
        capvisor_rpc::vmconfig::Disk { path: layer, read_only: false },
    ];
    cfg.extra_cmdline = format!("capvisor.root=/dev/vda capvisor.upper=/dev/vdb capvisor.hostname={}", cfg.name);
    Ok(cfg)
}

/// Attaches leased volumes after the image's disks, each as the next
/// virtio-blk device, and tells guest-init where to mount each with one
/// kernel command line word `capvisor.vol=<device>:<rw|ro>:<guest path>`
/// (guest-init's `rootfs` module; the path was checked by
/// [`check_guest_path`], so it is one word).
fn volume_disks(mut cfg: VmConfig, mounts: &[VolumeMount], files: &[PathBuf]) -> VmConfig {
    for (m, f) in mounts.iter().zip(files) {
        let dev = format!("vd{}", (b'a' + cfg.disks.len() as u8) as char);
        cfg.disks.push(capvisor_rpc::vmconfig::Disk { path: f.clone(), read_only: m.read_only });
        let mode = if m.read_only { "ro" } else { "rw" };
        cfg.extra_cmdline = format!("{} capvisor.vol=/dev/{dev}:{mode}:{}", cfg.extra_cmdline, m.guest_path);
    }
    cfg.extra_cmdline = cfg.extra_cmdline.trim().to_string();
    cfg
}

/// Boots the VM of `entry` on `engine` (`Qemu` or `Kvm`): spawns its vmm
/// and waits up to `timeout` for guest-init.
async fn boot(st: &SessionState, entry: &VmEntry, engine: Engine, timeout: Duration) -> CvResult<Running> {
    let image = st.ctx.images.get(&entry.image).ok_or_else(|| CvError::internal("image vanished"))?;
    std::fs::create_dir_all(&entry.run_dir).map_err(|e| CvError::internal(format!("cannot create run dir: {e}")))?;
    let cfg = VmConfig {
        name: entry.name.clone(),
        run_dir: entry.run_dir.clone(),
        kernel: image.kernel.clone(),
        initramfs: image.initramfs.clone(),
        memory_mib: entry.memory_mib,
        vcpus: entry.vcpus,
        engine,
        extra_cmdline: String::new(),
        disks: vec![],
        confine: Default::default(),
        egress: st.ctx.net.egress,
    };
    let cfg = match &image.rootfs {
        Some(rootfs) => root_disks(cfg, rootfs, image.writable_mib)?,
        None => cfg,
    };
    let mut cfg = volume_disks(cfg, &entry.mounts, &entry.volume_files.borrow());
    // Egress (manifest [net] egress): the session's proxy is running before
    // the guest can ask anything of it; guest-init sets up its side when it
    // sees this word and the capvisor.egress port.
    let proxy = match cfg.egress {
        true => {
            cfg.extra_cmdline = format!("{} capvisor.egress=1", cfg.extra_cmdline).trim().to_string();
            Some(crate::proxy::ensure(st)?)
        }
        false => None,
    };
    // Confinement (docs/vmm-confinement.md): decided here, fail closed on
    // a required layer, audited either way.
    let confined = crate::launch::confine_vm(
        &st.ctx.confinement,
        &entry.name,
        entry.memory_mib,
        entry.vcpus,
        engine != Engine::Kvm,
    )
    .inspect_err(|e| st.audit_vm(&entry.name, "vm.confine", "vms", "create", Err(e), &e.message))?;
    tracing::info!(vm = %entry.name, "confinement: {}", confined.report);
    st.audit_vm(&entry.name, "vm.confine", "vms", "create", Ok(()), &format!("{}: {}", entry.name, confined.report));
    let cfg = VmConfig { confine: confined.qemu, ..cfg };
    let mut launched = st.launcher.launch(&cfg)?;
    if let (Some(proxy), Some(fd)) = (&proxy, launched.egress.take()) {
        proxy.add_vm(&entry.name, fd).await?;
    }
    let machine = launched.machine;
    let mut child = launched.child;
    let AgentLink { guest, conn: gconn, calls: agent_calls, failed: agent_failed } = agent_link(launched.agent);
    let conns: Vec<_> = launched.machine_conn.into_iter().chain(std::iter::once(gconn)).collect();

    let hello = guest.hello_request().send().promise;
    let exited = machine.wait_exit_request().send().promise;
    let outcome = tokio::select! {
        r = tokio::time::timeout(timeout, hello) => match r {
            Ok(Ok(resp)) => resp
                .get()
                .and_then(|r| r.get_info())
                .and_then(|i| text(i.get_kernel_release()))
                .map_err(|e| format!("guest-init answered malformed: {e}")),
            Ok(Err(e)) => Err(format!("the guest agent channel failed: {e}")),
            Err(_) => Err(format!("guest-init did not answer within {} s", timeout.as_secs())),
        },
        r = exited => Err(match r {
            Ok(resp) => match resp.get().and_then(|r| r.get_status()) {
                Ok(s) => format!("the VM stopped while booting: {}", s.get_detail().ok().and_then(|t| t.to_str().ok()).unwrap_or("")),
                Err(e) => format!("the VM stopped while booting: {e}"),
            },
            Err(e) => format!("the vmm exited while booting: {e}; see {}", entry.run_dir.join("vmm.log").display()),
        }),
    };
    match outcome {
        Ok(release) => {
            // Guest-controlled text: no terminal control characters pass.
            *entry.kernel_release.borrow_mut() = capvisor_rpc::error::printable(&release, false).into_owned();
            // The engine that runs it is the one asked for: the worker
            // resolved `auto` before the spawn and the vmm runs exactly
            // that, so no status round trip sits on the boot's critical path.
            entry.engine.set(engine);
            Ok(Running { machine, guest, child, conns, agent_calls, agent_failed: Some(agent_failed) })
        }
        Err(why) => {
            for c in &conns {
                c.abort();
            }
            if let Some(child) = child.as_mut() {
                let _ = child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            }
            let tail = entry.console_tail(BOOT_FAILURE_TAIL);
            let tail = capvisor_rpc::error::printable(&tail, true);
            Err(CvError::unavailable(format!("{why}\n--- last console output ---\n{tail}")))
        }
    }
}

/// Stops the VM if it runs: asks guest-init to power off, then the vmm to
/// stop (graceful, then forced), then reaps the vmm. Idempotent.
pub async fn stop_vm(entry: &VmEntry) {
    let Some(run) = entry.running.borrow_mut().take() else { return };
    let exited = run.machine.wait_exit_request().send().promise;
    // guest-init syncs its file systems and powers off. QEMU's microvm does
    // not end on a guest power-off, so after a short grace the vmm quits
    // the machine (the guest has synced by then).
    let graceful = tokio::time::timeout(Duration::from_secs(2), run.guest.shutdown_request().send().promise).await;
    let grace = if matches!(graceful, Ok(Ok(_))) { Duration::from_millis(500) } else { Duration::ZERO };
    if tokio::time::timeout(grace, exited).await.is_err() {
        let mut req = run.machine.stop_request();
        req.get().set_grace_ms(0);
        let _ = tokio::time::timeout(Duration::from_secs(5), req.send().promise).await;
    }
    run.finish().await;
    entry.holds.borrow_mut().clear();
    if entry.state.get() != VmState::Crashed {
        *entry.detail.borrow_mut() = "stopped on request".into();
        entry.set_ended(VmState::Stopped);
    }
}

/// Revokes the session (logout, expiry, shutdown): every cap answers
/// `staleSession` from now on, calls in flight fail, VMs are stopped, and
/// for a logout the broker forgets the resume token. Idempotent.
pub async fn revoke_session(st: &Rc<SessionState>, reason: RevokeReason) {
    if !st.mark_revoked(reason) {
        return;
    }
    tracing::info!(session = %st.ctx.session_id, "session revoked: {}", revoke_reason_name(reason));
    if reason == RevokeReason::Logout {
        st.audit("session.logout", "session", "logout", Ok(()), "");
        if let Err(e) = st.host.logout_request().send().promise.await {
            tracing::warn!("broker logout failed: {e}");
        }
    }
    let entries: Vec<Rc<VmEntry>> = st.vms.borrow().values().cloned().collect();
    futures::future::join_all(entries.iter().map(|e| stop_vm(e))).await;
    // The egress proxy ends with its connection.
    st.proxy.borrow_mut().take();
    st.mark_revocation_done();
}

/// `VmFactory` of one session.
pub struct VmFactoryImpl {
    /// The session this cap belongs to: its context, VMs and revocation
    /// flag (every call checks it first).
    pub st: Rc<SessionState>,
}

impl VmFactoryImpl {
    /// Checks `spec` against the session's bundle and boots the VM; returns
    /// once guest-init answers. Not audited (the caller audits `vm.create`).
    ///
    /// Errors: as `VmFactory.create`.
    pub async fn do_create(&self, spec: vm_spec::Reader<'_>) -> CvResult<Rc<VmEntry>> {
        let st = &self.st;
        st.check()?;
        let spec = check_spec(st, spec)?;
        let entry = Rc::new(VmEntry {
            run_dir: st.ctx.run_dir.join(&spec.name),
            name: spec.name.clone(),
            image: spec.image,
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            engine: Cell::new(spec.engine),
            state: Cell::new(VmState::Starting),
            kernel_release: RefCell::new(String::new()),
            boot_ms: Cell::new(0),
            detail: RefCell::new(String::new()),
            running: RefCell::new(None),
            removed: Cell::new(false),
            holds: RefCell::new(Vec::new()),
            mounts: spec.volumes,
            volume_files: RefCell::new(Vec::new()),
            ended: tokio::sync::Notify::new(),
        });
        st.vms.borrow_mut().insert(spec.name.clone(), entry.clone());
        // Until the VM runs, a failed boot and a cancelled call (the client
        // went away mid-boot, dropping this future and with it the vmm,
        // which is killed on drop) both forget the half-made VM: its name
        // and its max_vms slot come back.
        let mut guard = Unborn { st: st.clone(), entry: Some(entry.clone()), failed: false };
        let t0 = Instant::now();
        // Room in the budgets that span sessions (the principal's, the
        // host's) is reserved with the broker before anything starts.
        let mut reserve = st.host.reserve_vm_request();
        reserve.get().set_memory_mib(spec.memory_mib);
        let hold = st
            .guard(async {
                let resp = reserve.send().promise.await.map_err(|e| crate::wrap::relay(e, false))?;
                resp.get().and_then(|r| r.get_hold()).map_err(|e| CvError::internal(e.to_string()))
            })
            .await;
        let hold = match hold {
            Ok(h) => h,
            Err(e) => {
                guard.failed = true;
                return Err(e);
            }
        };
        entry.holds.borrow_mut().push(hold);
        // Each volume is leased from the broker before anything starts: a
        // read-write one held elsewhere fails the create with inUse.
        for m in &entry.mounts {
            let mut req = st.host.attach_volume_request();
            req.get().set_name(m.volume.as_str());
            req.get().set_read_only(m.read_only);
            req.get().set_vm(entry.name.as_str());
            let leased = st
                .guard(async {
                    let resp = req.send().promise.await.map_err(|e| crate::wrap::relay(e, false))?;
                    let r = resp.get().map_err(|e| CvError::internal(e.to_string()))?;
                    let path = text(r.get_path()).map_err(|e| CvError::internal(e.to_string()))?;
                    let hold = r.get_hold().map_err(|e| CvError::internal(e.to_string()))?;
                    Ok((PathBuf::from(path), hold))
                })
                .await;
            match leased {
                Ok((path, hold)) => {
                    entry.holds.borrow_mut().push(hold);
                    entry.volume_files.borrow_mut().push(path);
                }
                Err(e) => {
                    guard.failed = true;
                    return Err(e);
                }
            }
        }
        let engine = capvisor_rpc::host::resolve_engine(spec.engine, st.ctx.auto_engine);
        let booted = if spec.engine == Engine::Auto && engine == Engine::Kvm {
            // `auto` meaning kvm tries our kvm engine first and falls back
            // to QEMU if it does not reach guest-init.
            match st.guard(boot(st, &entry, Engine::Kvm, KVM_AUTO_TIMEOUT)).await {
                Err(e) if e.code != ErrorCode::StaleSession => {
                    let first = e.message.lines().next().unwrap_or("").to_string();
                    tracing::warn!(vm = %entry.name, "engine kvm did not boot ({first}); falling back to qemu");
                    st.audit_vm(&entry.name, "vm.create", "vms", "engine-fallback", Err(&e), &first);
                    let _ = std::fs::rename(entry.run_dir.join("console.log"), entry.run_dir.join("console.kvm.log"));
                    st.guard(boot(st, &entry, Engine::Qemu, BOOT_TIMEOUT)).await
                }
                r => r,
            }
        } else {
            st.guard(boot(st, &entry, engine, BOOT_TIMEOUT)).await
        };
        let run = match booted {
            Ok(run) => run,
            Err(e) => {
                guard.failed = true;
                return Err(e);
            }
        };
        guard.entry = None;
        entry.boot_ms.set(t0.elapsed().as_millis() as u64);
        let mut run = run;
        watch_exit(entry.clone(), run.machine.clone(), run.agent_failed.take());
        *entry.running.borrow_mut() = Some(run);
        entry.state.set(VmState::Running);
        tracing::info!(vm = %entry.name, ms = entry.boot_ms.get(), "VM running");
        Ok(entry)
    }

    /// This session's VM `name`. Errors: `notFound`; `staleSession`.
    pub fn entry(&self, name: &str) -> CvResult<Rc<VmEntry>> {
        self.st.check()?;
        self.st
            .vms
            .borrow()
            .get(name)
            .cloned()
            .ok_or_else(|| CvError::not_found(format!("this session has no VM named {name:?}")))
    }

    /// Stops VM `name` if running and forgets it (`VmFactory.remove`; not
    /// audited here). Errors: `notFound`; `invalidArgument` while it is
    /// still starting; `staleSession`.
    pub async fn remove_entry(&self, name: &str) -> CvResult<()> {
        let e = self.entry(name)?;
        if e.state.get() == VmState::Starting {
            return Err(CvError::invalid(format!("VM {name:?} is still starting")));
        }
        // Marked first, so no call through an old cap gets in while the VM
        // stops.
        e.removed.set(true);
        stop_vm(&e).await;
        self.st.vms.borrow_mut().remove(name);
        let _ = std::fs::remove_dir_all(&e.run_dir);
        Ok(())
    }

    fn vm_cap(&self, entry: Rc<VmEntry>) -> vm::Client {
        capnp_rpc::new_client(VmImpl { st: self.st.clone(), entry, grant: None })
    }
}

/// A VM still booting: dropped before it is disarmed (boot failed, or the
/// create call was cancelled), it marks the VM removed and forgets it (its
/// run directory stays for the logs), and audits a cancellation.
struct Unborn {
    st: Rc<SessionState>,
    entry: Option<Rc<VmEntry>>,
    /// The boot failed (audited by `create` with its error), as opposed to
    /// the call being cancelled.
    failed: bool,
}

impl Drop for Unborn {
    fn drop(&mut self) {
        let Some(entry) = self.entry.take() else { return };
        entry.removed.set(true);
        entry.holds.borrow_mut().clear();
        let mut vms = self.st.vms.borrow_mut();
        if vms.get(&entry.name).is_some_and(|e| Rc::ptr_eq(e, &entry)) {
            vms.remove(&entry.name);
        }
        drop(vms);
        if entry.state.get() == VmState::Starting {
            entry.set_ended(VmState::Stopped);
        }
        if !self.failed {
            tracing::info!(vm = %entry.name, "create cancelled mid-boot; VM forgotten");
            self.st.audit_vm(&entry.name, "vm.create.cancelled", "vms", "create", Ok(()), &entry.name);
        }
    }
}

/// Marks the VM crashed/stopped when its machine ends on its own, and
/// crashed when its agent link fails (`agent_failed`: a guest message over
/// [`GUEST`], a protocol violation); a link that merely closes (the guest
/// powering off) is left to the machine's own end.
fn watch_exit(
    entry: Rc<VmEntry>,
    machine: machine::Client,
    agent_failed: Option<tokio::sync::oneshot::Receiver<capnp::Error>>,
) {
    tokio::task::spawn_local(async move {
        let link_broken = async {
            match agent_failed {
                Some(rx) => match rx.await {
                    Ok(e) if e.kind != capnp::ErrorKind::Disconnected => e,
                    _ => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        let (state, detail) = tokio::select! {
            r = machine.wait_exit_request().send().promise => {
                match r.as_ref().map(|r| r.get().and_then(|r| r.get_status())) {
                    Ok(Ok(s)) => (
                        s.get_state().unwrap_or(VmState::Crashed),
                        s.get_detail().ok().and_then(|t| t.to_str().ok()).unwrap_or("").to_string(),
                    ),
                    Ok(Err(e)) => (VmState::Crashed, format!("the vmm answered malformed: {e}")),
                    // The vmm process died (or hung up) under the VM.
                    Err(e) => (VmState::Crashed, format!("the vmm process ended unexpectedly ({})", e.extra)),
                }
            }
            e = link_broken => (VmState::Crashed, format!("the guest broke its agent link: {}", e.extra)),
        };
        if entry.state.get() == VmState::Running {
            *entry.detail.borrow_mut() = capvisor_rpc::error::printable(&detail, false).into_owned();
            entry.set_ended(if state == VmState::Crashed { VmState::Crashed } else { VmState::Stopped });
            entry.holds.borrow_mut().clear();
            tracing::info!(vm = %entry.name, "VM ended: {detail}");
            // Drop the handles; stop_vm reaps the vmm when asked.
            if let Some(mut run) = entry.running.borrow_mut().take() {
                if let Some(child) = run.child.as_mut() {
                    let _ = child.start_kill();
                }
                tokio::task::spawn_local(run.finish());
            }
        }
    });
}

fn first_line(e: &CvError) -> String {
    e.message.lines().next().unwrap_or("").to_string()
}

impl vm_factory::Server for VmFactoryImpl {
    async fn create(
        self: CapRc<Self>,
        params: vm_factory::CreateParams,
        mut results: vm_factory::CreateResults,
    ) -> capnp::Result<()> {
        let p = params.get()?;
        let res = self.do_create(p.get_spec()?).await;
        let detail = res.as_ref().err().map(first_line).unwrap_or_default();
        let vm_name = match &res {
            Ok(e) => e.name.clone(),
            Err(_) => p.get_spec()?.get_name()?.to_str().unwrap_or("").to_string(),
        };
        self.st.audit_vm(&vm_name, "vm.create", "vms", "create", res.as_ref().map(|_| ()), &detail);
        results.get().set_vm(self.vm_cap(res?));
        Ok(())
    }

    async fn list(
        self: CapRc<Self>,
        _: vm_factory::ListParams,
        mut results: vm_factory::ListResults,
    ) -> capnp::Result<()> {
        self.st.check()?;
        write_vms(&self.st, &|_| true, results.get());
        Ok(())
    }

    async fn get(
        self: CapRc<Self>,
        params: vm_factory::GetParams,
        mut results: vm_factory::GetResults,
    ) -> capnp::Result<()> {
        let name = text(params.get()?.get_vm_name())?;
        let entry = self.entry(&name)?;
        results.get().set_vm(self.vm_cap(entry));
        Ok(())
    }

    async fn remove(
        self: CapRc<Self>,
        params: vm_factory::RemoveParams,
        _: vm_factory::RemoveResults,
    ) -> capnp::Result<()> {
        let name = text(params.get()?.get_vm_name())?;
        let res = self.remove_entry(&name).await;
        self.st.audit_vm(&name, "vm.remove", "vms", "remove", res.as_ref().map(|_| ()), &name);
        Ok(res?)
    }

    async fn images(
        self: CapRc<Self>,
        _: vm_factory::ImagesParams,
        mut results: vm_factory::ImagesResults,
    ) -> capnp::Result<()> {
        self.st.check()?;
        write_images(&self.st, &|_| true, results.get());
        Ok(())
    }

    /// The session's `NetLog` (all its VMs). Errors: `notFound` unless the
    /// bundle holds "netlog"; the proxy's start failing.
    async fn net_log(
        self: CapRc<Self>,
        _: vm_factory::NetLogParams,
        mut results: vm_factory::NetLogResults,
    ) -> capnp::Result<()> {
        self.st.check()?;
        results.get().set_log(session_net_log(&self.st)?);
        Ok(())
    }

    /// A narrowed factory over this session's VMs (`crate::narrow_vms`).
    /// Errors: `invalidArgument` for a malformed narrowing; `staleSession`.
    async fn narrow(
        self: CapRc<Self>,
        params: vm_factory::NarrowParams,
        mut results: vm_factory::NarrowResults,
    ) -> capnp::Result<()> {
        self.st.check()?;
        let f = crate::narrow_vms::narrowed(&self.st, params.get()?.get_narrowing()?)?;
        results.get().set_vms(f);
        Ok(())
    }
}

/// The VMs of session `st` that `keep` keeps, by name, into `results`
/// (`VmFactory.list`).
pub fn write_vms(st: &SessionState, keep: &dyn Fn(&str) -> bool, results: vm_factory::list_results::Builder<'_>) {
    let vms: Vec<Rc<VmEntry>> = st.vms.borrow().values().filter(|e| keep(&e.name)).cloned().collect();
    let mut list = results.init_vms(vms.len() as u32);
    for (i, e) in vms.iter().enumerate() {
        e.fill_info(list.reborrow().get(i as u32));
    }
}

/// The session's own `NetLog` (its wrapper over the proxy's).
///
/// Errors: `notFound` unless the bundle holds "netlog"; `unavailable`
/// when the proxy cannot start.
pub fn session_net_log(st: &Rc<SessionState>) -> CvResult<capvisor_rpc::schema::capvisor_capnp::net_log::Client> {
    if !st.ctx.bundle.has_cap("netlog") {
        return Err(CvError::not_found("this session's bundle does not hold the netlog capability"));
    }
    let inner = crate::proxy::ensure(st)?.proxy.log_request().send().pipeline.get_log();
    Ok(capnp_rpc::new_client(crate::wrap::NetLogWrapper { scope: Scope::session(st), inner }))
}

/// The images session `st` may boot and `keep` keeps, into `results`
/// (`VmFactory.images`).
pub fn write_images(st: &SessionState, keep: &dyn Fn(&str) -> bool, results: vm_factory::images_results::Builder<'_>) {
    {
        let ctx = &st.ctx;
        let allowed: Vec<_> =
            ctx.bundle.images.iter().filter(|n| keep(n)).filter_map(|n| ctx.images.get(n).map(|i| (n, i))).collect();
        let mut list = results.init_images(allowed.len() as u32);
        for (i, (name, img)) in allowed.into_iter().enumerate() {
            let mut b = list.reborrow().get(i as u32);
            b.set_name(name.as_str());
            b.set_kind(if img.rootfs.is_some() { "debian" } else { "base" });
            b.set_kernel_release(img.kernel_release.as_str());
            b.set_rootfs_bytes(img.rootfs.as_ref().and_then(|p| std::fs::metadata(p).ok()).map_or(0, |m| m.len()));
            b.set_writable_mib(img.writable_mib);
        }
    }
}

/// `Vm`: exactly one VM of the session for the capability's whole life.
pub struct VmImpl {
    /// The session this cap belongs to: its context, VMs and revocation
    /// flag (every call checks it first).
    pub st: Rc<SessionState>,
    /// The VM this cap designates.
    pub entry: Rc<VmEntry>,
    /// The grant it serves, when it is the inside of a shared narrowed
    /// `Vm` (`crate::narrow`): its calls and everything reached through
    /// it are bound to the grant and audited with its chain.
    pub grant: Option<Rc<crate::grants::GrantNode>>,
}

impl VmImpl {
    fn scope(&self) -> Scope {
        Scope::vm(&self.st, &self.entry).with_grant(self.grant.clone())
    }

    fn audit(&self, action: &str, method: &str, outcome: Result<(), &CvError>, detail: &str) {
        let chain = self.scope().chain();
        self.st.audit_chain(&self.entry.name, &chain, action, "vms", method, outcome, detail);
    }

    fn check(&self) -> CvResult<()> {
        self.scope().check()
    }
}

impl vm::Server for VmImpl {
    async fn info(self: CapRc<Self>, _: vm::InfoParams, mut results: vm::InfoResults) -> capnp::Result<()> {
        self.check()?;
        self.entry.fill_info(results.get().init_info());
        Ok(())
    }

    async fn exec(self: CapRc<Self>, params: vm::ExecParams, mut results: vm::ExecResults) -> capnp::Result<()> {
        self.check()?;
        let guest = self.entry.guest()?;
        let scope = self.scope();
        let p = params.get()?;
        // Rebuilt field by field (rpc::exec::ExecRequest): a struct copied
        // whole would carry fields this worker does not know, capabilities
        // included, past the membrane.
        let mut spec = capvisor_rpc::exec::ExecRequest::read_from(p.get_spec()?)??;
        // Secrets become placeholders here; secretEnv never reaches the guest.
        let secret_env = crate::secrets::exec_env(&self.st, &std::mem::take(&mut spec.secret_env)).await?;
        spec.env.extend(secret_env);
        let mut req = guest.exec_request();
        {
            let mut r = req.get();
            spec.write_to(r.reborrow().init_spec());
            r.set_stdout(SinkWrapper::wrap(&scope, p.get_stdout()?));
            r.set_stderr(SinkWrapper::wrap(&scope, p.get_stderr()?));
        }
        let resp = scope.forward(req.send().promise).await;
        // The program only: arguments and environment may hold secrets.
        let program = spec.argv.first().map(String::as_str).unwrap_or("");
        let outcome = resp.as_ref().map(|_| ()).map_err(|e| crate::wrap::relay(e.clone(), true));
        self.audit("vm.exec", "exec", outcome.as_ref().map(|_| ()), program);
        let inner = resp?.get()?.get_process()?;
        if let Some(g) = &self.grant {
            g.track_process(inner.clone());
        }
        results.get().set_process(capnp_rpc::new_client(ProcessWrapper { scope, inner }));
        Ok(())
    }

    async fn connect(
        self: CapRc<Self>,
        params: vm::ConnectParams,
        mut results: vm::ConnectResults,
    ) -> capnp::Result<()> {
        self.check()?;
        let guest = self.entry.guest()?;
        let scope = self.scope();
        let p = params.get()?;
        let port = p.get_port();
        let mut req = guest.connect_request();
        req.get().set_port(port);
        req.get().set_down(SinkWrapper::wrap(&scope, p.get_down()?));
        let res = scope.forward(req.send().promise).await;
        let outcome = res.as_ref().map(|_| ()).map_err(|e| crate::wrap::relay(e.clone(), true));
        self.audit("vm.connect", "connect", outcome.as_ref().map(|_| ()), &format!("{}:{port}", self.entry.name));
        let up = res?.get()?.get_up()?;
        results.get().set_up(SinkWrapper::wrap(&scope, up));
        Ok(())
    }

    async fn files(self: CapRc<Self>, _: vm::FilesParams, mut results: vm::FilesResults) -> capnp::Result<()> {
        self.check()?;
        let inner = self.entry.guest()?.files_request().send().pipeline.get_files();
        results.get().set_files(capnp_rpc::new_client(FilesWrapper { scope: self.scope(), inner }));
        Ok(())
    }

    async fn stop(self: CapRc<Self>, _: vm::StopParams, _: vm::StopResults) -> capnp::Result<()> {
        let res = self.check();
        if res.is_ok() {
            stop_vm(&self.entry).await;
        }
        self.audit("vm.stop", "stop", res.as_ref().map(|_| ()), &self.entry.name);
        Ok(res?)
    }

    async fn ping(self: CapRc<Self>, _: vm::PingParams, _: vm::PingResults) -> capnp::Result<()> {
        self.check()?;
        let g = self.entry.guest()?;
        self.scope().forward(async { g.ping_request().send().promise.await.map(drop) }).await
    }

    /// A narrowed `Vm` over this one (`crate::narrow`). Errors:
    /// `invalidArgument` for a malformed narrowing; `staleSession`.
    async fn narrow(self: CapRc<Self>, params: vm::NarrowParams, mut results: vm::NarrowResults) -> capnp::Result<()> {
        self.check()?;
        let r = params.get()?.get_narrowing()?;
        let n = crate::narrow::Narrowing::read(r)?;
        let vm = crate::narrow::narrowed(&self.st, &self.entry, n, r.get_call_budget(), None, self.grant.clone());
        results.get().set_vm(vm);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::valid_name;

    #[test]
    fn vm_names() {
        assert!(valid_name("vm-1"));
        assert!(valid_name("a"));
        assert!(!valid_name(""));
        assert!(!valid_name("-a"));
        assert!(!valid_name("A"));
        assert!(!valid_name("../etc"));
        assert!(!valid_name(&"a".repeat(33)));
    }
}
