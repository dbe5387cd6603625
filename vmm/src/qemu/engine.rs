//! [`QemuEngine`]: the `qemu` engine behind [`Engine`] — QEMU as a child
//! process (spawned with [`super::args`]), driven over QMP ([`Qmp`]), its
//! exit watched and classified.
//!
//! Local tasks, each holding the engine weakly:
//! - the child's owner: reaps QEMU, sends SIGKILL on [`Engine::kill`], and
//!   records the end ([`exit_outcome`]);
//! - the stderr reader: logs QEMU's stderr and keeps its last
//!   [`STDERR_KEEP`] bytes for the crash detail;
//! - QMP: handshake, first `query-status` (`starting` -> `running`), then
//!   events: `SHUTDOWN` (its reason names a guest power-off or reboot),
//!   `STOP` / `RESUME` (`running` <-> `paused`, also when paused from
//!   elsewhere).

use super::qmp::Qmp;
use crate::engine::{ConsoleLog, Engine, EngineKind, Lifecycle, Status};
use capvisor_rpc::spawn::{self, Inherit};
use capvisor_rpc::vmconfig::VmConfig;
use capvisor_rpc::CvError;
use capvisor_schema::capvisor_capnp::VmState;
use futures::future::LocalBoxFuture;
use std::cell::{Cell, RefCell};
use std::os::fd::OwnedFd;
use std::process::ExitStatus;
use std::rc::{Rc, Weak};
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

/// How long `stop` waits for QEMU to obey `quit` before SIGKILL.
const QUIT_WAIT: Duration = Duration::from_secs(3);
/// How much of QEMU's stderr is kept for error messages, bytes.
pub const STDERR_KEEP: usize = 4096;
/// How long the owner lets the stderr reader drain after QEMU exited.
const STDERR_DRAIN: Duration = Duration::from_millis(50);

/// One QEMU process running one VM.
pub struct QemuEngine {
    life: Lifecycle,
    console: ConsoleLog,
    /// Set once the QMP handshake is done; cleared when QEMU exits.
    qmp: RefCell<Option<Qmp>>,
    kill_tx: mpsc::UnboundedSender<()>,
    stop_requested: Cell<bool>,
    /// The reason of QMP's last `SHUTDOWN` event (`guest-shutdown`, ...).
    shutdown_reason: RefCell<Option<String>>,
    stderr_tail: Rc<RefCell<Vec<u8>>>,
}

impl QemuEngine {
    /// Spawns QEMU ([`super::qemu_binary`]) for `cfg` with `agent` as the
    /// guest's agent channel and the serial console going to `console`;
    /// hardware KVM when [`capvisor_rpc::host::host_kvm_usable`], TCG
    /// otherwise. Returns at once in state `starting`.
    ///
    /// Errors: QEMU cannot be spawned (not installed), or the QMP
    /// socketpair cannot be made. Must be called inside a `LocalSet`.
    pub fn start(
        cfg: &VmConfig,
        channels: impl Into<crate::engine::GuestChannels>,
        console: ConsoleLog,
    ) -> anyhow::Result<Rc<Self>> {
        Self::spawn(&super::qemu_binary(), cfg, channels, console, capvisor_rpc::host::host_kvm_usable())
    }

    /// [`QemuEngine::start`] with the program and the accelerator chosen
    /// by the caller (tests run stand-ins for QEMU).
    pub(crate) fn spawn(
        program: &str,
        cfg: &VmConfig,
        channels: impl Into<crate::engine::GuestChannels>,
        console: ConsoleLog,
        kvm: bool,
    ) -> anyhow::Result<Rc<Self>> {
        use anyhow::Context;
        let crate::engine::GuestChannels { agent, egress } = channels.into();
        let (qmp_ours, qmp_theirs) = spawn::stream_pair()?;
        let (confinement, report) = confinement(program, cfg, kvm)?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(super::args(cfg, kvm, super::host_tsc_khz()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        // Before `prepare`'s hook: ours writes to descriptors opened here,
        // which `prepare` may renumber over.
        confinement.install(cmd.as_std_mut());
        let (console_ours, console_theirs) = spawn::stream_pair()?;
        let mut fds = vec![
            Inherit { fd: agent, target: super::AGENT_FD },
            Inherit { fd: qmp_theirs, target: super::QMP_FD },
            Inherit { fd: console_theirs, target: super::CONSOLE_FD },
        ];
        if let Some(fd) = egress {
            fds.push(Inherit { fd, target: super::EGRESS_FD });
        }
        spawn::prepare(&mut cmd, &fds);
        let spawned = cmd.spawn();
        // Our copies of the handed-over descriptors close here, so the
        // worker sees the agent channel end when QEMU does.
        drop(fds);
        let mut child =
            spawned.with_context(|| format!("starting {program} (is QEMU installed?) confined by: {report}"))?;
        let pid = child.id().unwrap_or(0);
        tracing::info!(
            pid,
            accel = if kvm { "kvm" } else { "tcg" },
            "qemu started for VM {}; confinement: {report}; -sandbox {}",
            cfg.name,
            super::QEMU_SANDBOX
        );

        let (kill_tx, kill_rx) = mpsc::unbounded_channel::<()>();
        let engine = Rc::new(QemuEngine {
            life: Lifecycle::new(Status::new(VmState::Starting, pid, EngineKind::Qemu)),
            console,
            qmp: RefCell::new(None),
            kill_tx,
            stop_requested: Cell::new(false),
            shutdown_reason: RefCell::new(None),
            stderr_tail: Rc::default(),
        });
        if let Some(stderr) = child.stderr.take() {
            tokio::task::spawn_local(read_stderr(stderr, engine.stderr_tail.clone()));
        }
        let console_done = tokio::task::spawn_local(pump_console(console_ours, engine.console.clone()));
        tokio::task::spawn_local(own_child(child, kill_rx, console_done, Rc::downgrade(&engine)));
        tokio::task::spawn_local(drive_qmp(qmp_ours, Rc::downgrade(&engine)));
        Ok(engine)
    }

    /// The QMP session.
    ///
    /// Errors: `unavailable` until the handshake is done and after QEMU exited.
    fn qmp(&self) -> Result<Qmp, CvError> {
        self.qmp.borrow().clone().ok_or_else(|| CvError::unavailable("QMP is not connected"))
    }

    /// Runs a QMP command for a state transition.
    async fn qmp_command(&self, command: &str) -> Result<(), CvError> {
        let qmp = self.qmp()?;
        qmp.execute(command, None).await.map_err(|e| CvError::unavailable(format!("{e:#}")))?;
        Ok(())
    }

    /// Records QEMU's end.
    fn on_exit(&self, exit: std::io::Result<ExitStatus>) {
        *self.qmp.borrow_mut() = None;
        let stderr = String::from_utf8_lossy(&self.stderr_tail.borrow()).trim().to_string();
        let reason = self.shutdown_reason.borrow().clone();
        let (state, detail) =
            exit_outcome(&exit, self.console.panic_line(), self.stop_requested.get(), reason.as_deref(), &stderr);
        self.life.end(state, detail);
    }

    async fn stop_inner(&self, grace: Duration) -> Status {
        if self.life.status().ended() {
            return self.life.status();
        }
        self.stop_requested.set(true);
        let qmp = self.qmp.borrow().clone();
        if let Some(qmp) = &qmp {
            if !grace.is_zero() {
                match qmp.execute("system_powerdown", None).await {
                    Ok(_) => {
                        if let Some(s) = self.life.wait_exit_within(grace).await {
                            return s;
                        }
                    }
                    Err(e) => tracing::info!("system_powerdown: {e:#}"),
                }
            }
            if let Err(e) = qmp.execute_timeout("quit", None, QUIT_WAIT).await {
                tracing::info!("quit: {e:#}");
            }
            if let Some(s) = self.life.wait_exit_within(QUIT_WAIT).await {
                return s;
            }
        }
        self.kill();
        self.life.settle().await
    }
}

impl Engine for QemuEngine {
    fn lifecycle(&self) -> &Lifecycle {
        &self.life
    }

    /// ACPI power button (QMP `system_powerdown`) and up to `grace` for the
    /// guest to power off (skipped when `grace` is zero), then QMP `quit`
    /// and up to 3 s, then SIGKILL.
    fn stop(&self, grace: Duration) -> LocalBoxFuture<'_, Status> {
        Box::pin(self.stop_inner(grace))
    }

    /// SIGKILL to QEMU if it still runs.
    fn kill(&self) {
        self.stop_requested.set(true);
        let _ = self.kill_tx.send(());
    }

    /// QMP `stop`.
    fn pause(&self) -> LocalBoxFuture<'_, Result<(), CvError>> {
        Box::pin(self.life.transition(VmState::Running, VmState::Paused, self.qmp_command("stop")))
    }

    /// QMP `cont`.
    fn resume(&self) -> LocalBoxFuture<'_, Result<(), CvError>> {
        Box::pin(self.life.transition(VmState::Paused, VmState::Running, self.qmp_command("cont")))
    }

    fn console_tail(&self, max_bytes: u32) -> Vec<u8> {
        self.console.tail(max_bytes)
    }
}

/// The layers QEMU gets beyond `-sandbox` and `prepare`'s no_new_privs
/// (docs/vmm-confinement.md), as `cfg.confine` asks: a fresh network
/// namespace, the Landlock ruleset for this VM's files
/// ([`capvisor_confine::landlock::QemuPolicy`]), and the report of them
/// with the cgroup the worker put this vmm in (QEMU inherits it).
///
/// Errors: a layer asked for cannot be prepared (`confinement: landlock:
/// ...`); the VM then does not start.
pub fn confinement(
    program: &str,
    cfg: &VmConfig,
    kvm: bool,
) -> anyhow::Result<(capvisor_confine::ChildConfinement, capvisor_confine::Report)> {
    use capvisor_confine::{landlock, netns, ChildConfinement, Layer, Report};
    let mut report = Report::default();
    let mut child = ChildConfinement::default();
    if !cfg.confine.cgroup.is_empty() {
        let dirs: Vec<String> = cfg.confine.cgroup.iter().map(|d| d.display().to_string()).collect();
        report.applied(Layer::Cgroup, format!("inherited from the vmm ({})", dirs.join(", ")));
    }
    if cfg.confine.netns {
        let plan = netns::NetnsPlan::new();
        report.applied(Layer::Netns, plan.describe());
        child.netns = Some(plan);
    }
    if cfg.confine.landlock {
        let prepared = (|| {
            let exe = landlock::resolve_program(program)?;
            let mut ro: Vec<&std::path::Path> = vec![&cfg.kernel, &cfg.initramfs];
            let mut rw: Vec<&std::path::Path> = vec![&cfg.run_dir];
            for d in &cfg.disks {
                if d.read_only {
                    ro.push(&d.path)
                } else {
                    rw.push(&d.path)
                }
            }
            landlock::QemuPolicy::for_qemu(&exe).with_vm(&ro, &rw, kvm)?.prepare()
        })()
        .map_err(|e| anyhow::anyhow!("confinement: {e}"))?;
        report.applied(Layer::Landlock, prepared.describe());
        child.landlock = Some(prepared);
    }
    Ok((child, report))
}

/// How a QEMU run ended, from what is known when the process is gone:
/// - a "Kernel panic" line on the console (`panic_line`): `crashed`,
///   whatever else happened;
/// - otherwise, after [`Engine::stop`] / [`Engine::kill`]: `stopped`;
/// - a clean exit: `stopped`, named by the last `SHUTDOWN` event's reason
///   (`guest-shutdown`: the guest powered off; `guest-reset`: it rebooted,
///   which `-no-reboot` turns into an exit);
/// - any other exit: `crashed`, with QEMU's exit status and `stderr` tail.
pub fn exit_outcome(
    exit: &std::io::Result<ExitStatus>,
    panic_line: Option<String>,
    stop_requested: bool,
    shutdown_reason: Option<&str>,
    stderr: &str,
) -> (VmState, String) {
    match (exit, panic_line) {
        (_, Some(p)) => (VmState::Crashed, format!("guest kernel panic: {p}")),
        _ if stop_requested => (VmState::Stopped, "stopped on request".to_string()),
        (Ok(st), None) if st.success() => match shutdown_reason {
            Some("guest-shutdown") => (VmState::Stopped, "the guest powered off".to_string()),
            Some("guest-reset") => (VmState::Stopped, "the guest rebooted (reboot ends the VM)".to_string()),
            Some(r) => (VmState::Stopped, format!("qemu shut down ({r})")),
            None => (VmState::Stopped, "qemu exited".to_string()),
        },
        (Ok(st), None) => (
            VmState::Crashed,
            if stderr.is_empty() {
                format!("qemu exited unexpectedly ({st})")
            } else {
                format!("qemu exited unexpectedly ({st}): {stderr}")
            },
        ),
        (Err(e), None) => (VmState::Crashed, format!("waiting for qemu failed: {e}")),
    }
}

/// Logs QEMU's stderr lines and keeps the last [`STDERR_KEEP`] bytes in `tail`.
async fn read_stderr(stderr: tokio::process::ChildStderr, tail: Rc<RefCell<Vec<u8>>>) {
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::warn!("qemu: {line}");
        let mut t = tail.borrow_mut();
        t.extend_from_slice(line.as_bytes());
        t.push(b'\n');
        if t.len() > STDERR_KEEP {
            let cut = t.len() - STDERR_KEEP;
            t.drain(..cut);
        }
    }
}

/// How long the owner lets the console pump log QEMU's last output after
/// QEMU exited (the panic scan reads it).
const CONSOLE_DRAIN: Duration = Duration::from_secs(2);

/// Copies what QEMU's serial console writes (its end of the console
/// socketpair) into `console` through a [`crate::engine::ConsoleRing`],
/// until QEMU closes it. Never writes to the socket: QEMU would take that
/// as guest input.
async fn pump_console(socket: OwnedFd, console: ConsoleLog) {
    use std::io::Write;
    use tokio::io::AsyncReadExt;
    let (mut stream, mut ring) = match (spawn::into_tokio(socket), console.ring()) {
        (Ok(s), Ok(r)) => (s, r),
        (Err(e), _) | (_, Err(e)) => return tracing::error!("console: {e}"),
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                if let Err(e) = ring.write_all(&buf[..n]) {
                    tracing::warn!("console log: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("console socket: {e}");
                break;
            }
        }
    }
}

/// The owner of the child: reaps it, kills it on request, lets the console
/// pump finish, records its end.
async fn own_child(
    mut child: tokio::process::Child,
    mut kill_rx: mpsc::UnboundedReceiver<()>,
    console_done: tokio::task::JoinHandle<()>,
    engine: Weak<QemuEngine>,
) {
    let exit = loop {
        tokio::select! {
            st = child.wait() => break st,
            Some(()) = kill_rx.recv() => {
                let _ = child.start_kill();
            }
        }
    };
    // Let the stderr reader drain the last lines, and the console pump
    // log the last output (its socket ends with QEMU).
    tokio::time::sleep(STDERR_DRAIN).await;
    let _ = tokio::time::timeout(CONSOLE_DRAIN, console_done).await;
    if let Some(engine) = engine.upgrade() {
        engine.on_exit(exit);
    }
}

/// QMP: handshake, first status, then events until QEMU closes the socket.
async fn drive_qmp(socket: OwnedFd, engine: Weak<QemuEngine>) {
    let stream = match spawn::into_tokio(socket) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("QMP socket: {e}");
            return;
        }
    };
    let (qmp, mut events) = match Qmp::handshake(stream).await {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!("QMP handshake failed: {e:#}");
            return;
        }
    };
    let Some(e) = engine.upgrade() else { return };
    *e.qmp.borrow_mut() = Some(qmp.clone());
    match qmp.query_status().await {
        Ok(s) if s == "running" => {
            e.life.set_state_if(VmState::Starting, VmState::Running);
        }
        Ok(s) => tracing::info!("qemu run state after start: {s}"),
        Err(err) => tracing::warn!("query-status: {err:#}"),
    }
    drop(e);
    while let Some(ev) = events.recv().await {
        let Some(e) = engine.upgrade() else { return };
        tracing::debug!(event = %ev.name, data = %ev.data, "QMP event");
        match ev.name.as_str() {
            "SHUTDOWN" => {
                let reason = ev.data.get("reason").and_then(|r| r.as_str()).unwrap_or("unknown").to_string();
                *e.shutdown_reason.borrow_mut() = Some(reason);
            }
            "STOP" => {
                e.life.set_state_if(VmState::Running, VmState::Paused);
            }
            "RESUME" => {
                e.life.set_state_if(VmState::Paused, VmState::Running);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn code(c: i32) -> std::io::Result<ExitStatus> {
        Ok(ExitStatus::from_raw(c << 8))
    }

    #[test]
    fn exits_are_classified() {
        let panic = || Some("Kernel panic - not syncing: x".to_string());
        let o =
            |exit: std::io::Result<ExitStatus>, p, stop, reason, stderr| exit_outcome(&exit, p, stop, reason, stderr);
        assert_eq!(
            o(code(0), panic(), true, None, ""),
            (VmState::Crashed, "guest kernel panic: Kernel panic - not syncing: x".into())
        );
        assert_eq!(o(code(1), None, true, None, "x"), (VmState::Stopped, "stopped on request".into()));
        assert_eq!(
            o(code(0), None, false, Some("guest-shutdown"), ""),
            (VmState::Stopped, "the guest powered off".into())
        );
        assert_eq!(
            o(code(0), None, false, Some("guest-reset"), ""),
            (VmState::Stopped, "the guest rebooted (reboot ends the VM)".into())
        );
        assert_eq!(
            o(code(0), None, false, Some("host-qmp-quit"), ""),
            (VmState::Stopped, "qemu shut down (host-qmp-quit)".into())
        );
        assert_eq!(o(code(0), None, false, None, ""), (VmState::Stopped, "qemu exited".into()));
        assert_eq!(
            o(code(1), None, false, None, ""),
            (VmState::Crashed, "qemu exited unexpectedly (exit status: 1)".into())
        );
        assert_eq!(
            o(code(1), None, false, None, "qemu: could not load kernel"),
            (VmState::Crashed, "qemu exited unexpectedly (exit status: 1): qemu: could not load kernel".into())
        );
        let (st, d) = o(Err(std::io::Error::other("boom")), None, false, None, "");
        assert_eq!((st, d.as_str()), (VmState::Crashed, "waiting for qemu failed: boom"));
    }

    /// A stand-in for QEMU: a shell script in `dir` running `body`.
    fn fake_qemu(dir: &std::path::Path, body: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("fake-qemu");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p.to_string_lossy().into_owned()
    }

    fn cfg(dir: &std::path::Path) -> VmConfig {
        VmConfig {
            name: "t".into(),
            run_dir: dir.to_path_buf(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
            memory_mib: 128,
            vcpus: 1,
            engine: EngineKind::Qemu,
            extra_cmdline: String::new(),
            disks: vec![],
            // The stand-in is a shell script: its interpreter is outside the
            // QEMU Landlock policy (the boot test covers Landlock on QEMU).
            confine: capvisor_rpc::vmconfig::QemuConfinement { netns: true, landlock: false, cgroup: vec![] },
            egress: false,
        }
    }

    #[test]
    fn a_failing_qemu_is_crashed_with_its_stderr() {
        capvisor_rpc::conn::run_local(async {
            let d = tempfile::tempdir().unwrap();
            let program = fake_qemu(d.path(), "echo 'qemu: no such machine' >&2\nexit 3");
            let (agent, _peer) = spawn::stream_pair().unwrap();
            let e = QemuEngine::spawn(&program, &cfg(d.path()), agent, ConsoleLog::create(d.path()).unwrap(), false)
                .unwrap();
            let st = e.status();
            assert_eq!((st.state, st.engine), (VmState::Starting, EngineKind::Qemu));
            assert!(st.pid > 0);
            let end = e.wait_exit().await;
            assert_eq!(end.state, VmState::Crashed);
            assert_eq!(end.detail, "qemu exited unexpectedly (exit status: 3): qemu: no such machine");
            assert_eq!(e.stop(Duration::from_secs(1)).await, end, "stopping an ended machine changes nothing");
        });
    }

    #[test]
    fn a_console_flood_stays_bounded_on_disk_and_the_last_panic_is_found() {
        capvisor_rpc::conn::run_local(async {
            let d = tempfile::tempdir().unwrap();
            // 3 MiB of output on the console socket, then a panic line.
            let program = fake_qemu(
                d.path(),
                &format!(
                    "head -c 3145728 /dev/zero | tr '\\0' x >&{fd}\necho >&{fd}\n\
                     echo 'Kernel panic - not syncing: flooded' >&{fd}\nexit 0",
                    fd = super::super::CONSOLE_FD
                ),
            );
            let (agent, _peer) = spawn::stream_pair().unwrap();
            let console = ConsoleLog::create(d.path()).unwrap();
            let e = QemuEngine::spawn(&program, &cfg(d.path()), agent, console.clone(), false).unwrap();
            let end = e.wait_exit().await;
            assert_eq!(end.state, VmState::Crashed, "{}", end.detail);
            assert_eq!(end.detail, "guest kernel panic: Kernel panic - not syncing: flooded");
            let size = std::fs::metadata(console.path()).unwrap().len();
            assert!(size <= crate::engine::MAX_CONSOLE_LOG, "{size} bytes on disk");
            assert!(size >= crate::engine::MAX_CONSOLE_LOG / 2, "{size} bytes on disk");
            let tail = e.console_tail(64);
            assert!(
                tail.ends_with(b"xxx\nKernel panic - not syncing: flooded\n"),
                "{}",
                String::from_utf8_lossy(&tail)
            );
        });
    }

    #[test]
    fn a_qemu_without_qmp_refuses_pause_and_is_killed_by_stop() {
        capvisor_rpc::conn::run_local(async {
            let d = tempfile::tempdir().unwrap();
            let program = fake_qemu(d.path(), "exec sleep 60");
            let (agent, _peer) = spawn::stream_pair().unwrap();
            let e = QemuEngine::spawn(&program, &cfg(d.path()), agent, ConsoleLog::create(d.path()).unwrap(), false)
                .unwrap();
            let pid = e.status().pid;
            // Still `starting`: QMP never answered.
            assert_eq!(e.pause().await.unwrap_err().code, capvisor_schema::common_capnp::ErrorCode::NotRunning);
            let st = e.stop(Duration::from_millis(100)).await;
            assert_eq!((st.state, st.detail.as_str(), st.pid), (VmState::Stopped, "stopped on request", pid));
            assert!(!std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists(), "the stand-in was reaped");
        });
    }
}
