//! One VM's life cycle and the `Machine` capability (schema
//! `internal.capnp`) the vmm serves to its worker.
//!
//! States: `starting` (QEMU spawned, QMP not answered yet) -> `running`
//! (QMP says the guest runs) <-> `paused` -> `stopped` (asked to stop, or
//! the guest powered off) / `crashed` (the console shows "Kernel panic",
//! QEMU failed or died unexpectedly, or the VM could not be started at
//! all: bad config, missing kernel, missing QEMU, engine `kvm`).
//!
//! Everything runs on the vmm's single-threaded `LocalSet`.

use crate::kvm_engine::{self, KvmHandle};
use crate::qemu::{self, qmp::Qmp};
use capvisor_rpc::vmconfig::VmConfig;
use capvisor_schema::capvisor_capnp::{Engine, VmState};
use capnp::capability::Rc as CapRc;
use capvisor_kvm::devices::boot_timer::BootTimes;
use capvisor_kvm::vm::VmExit;
use capvisor_rpc::spawn::{self, Inherit};
use capvisor_rpc::CvError;
use capvisor_schema::internal_capnp::{machine, machine_status};
use std::cell::{Cell, RefCell};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, watch};

/// Largest `consoleTail` answer, bytes.
pub const MAX_CONSOLE_TAIL: u32 = 1 << 20;
/// How long `stop` waits for QEMU to obey `quit` before SIGKILL.
const QUIT_WAIT: Duration = Duration::from_secs(3);
/// How much of QEMU's stderr is kept for error messages, bytes.
const STDERR_KEEP: usize = 4096;

/// A snapshot of the machine's state (schema `MachineStatus`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// Current state.
    pub state: VmState,
    /// Why it stopped or crashed (empty otherwise).
    pub detail: String,
    /// The engine process id, or 0.
    pub pid: u32,
    /// The engine that runs the VM (`Qemu` or `Kvm`, never `Auto`).
    pub engine: Engine,
    /// Boot milestones measured inside the vmm (engine kvm; default otherwise).
    pub boot: BootTimes,
}

impl Status {
    /// Whether the machine has ended (`stopped` or `crashed`).
    pub fn ended(&self) -> bool {
        matches!(self.state, VmState::Stopped | VmState::Crashed)
    }

    fn write(&self, mut b: machine_status::Builder<'_>) {
        b.set_state(self.state);
        b.set_detail(self.detail.as_str());
        b.set_pid(self.pid);
        b.set_engine(self.engine);
        let mut t = b.init_boot();
        t.set_vm_built_us(self.boot.vm_built_us.unwrap_or(0));
        t.set_first_run_us(self.boot.first_run_us.unwrap_or(0));
        t.set_first_exit_us(self.boot.first_exit_us.unwrap_or(0));
        t.set_first_serial_us(self.boot.first_serial_us.unwrap_or(0));
        t.set_init_ready_us(self.boot.init_ready_us.unwrap_or(0));
    }
}

/// One VM run by this vmm.
pub struct Vm {
    status: watch::Sender<Status>,
    console: Option<PathBuf>,
    qmp: RefCell<Option<Qmp>>,
    kill_tx: Option<mpsc::UnboundedSender<()>>,
    stop_requested: Cell<bool>,
    shutdown_reason: RefCell<Option<String>>,
    stderr_tail: Rc<RefCell<Vec<u8>>>,
    /// Engine kvm's handle; set once at start, never changed.
    kvm: Option<KvmHandle>,
}

impl Vm {
    /// Starts the VM described by `cfg` (or records why it cannot start):
    /// validates the config, checks the kernel and initramfs exist, creates
    /// `run_dir`, spawns QEMU with `agent` as its agent channel, and returns
    /// at once; the state moves on in local tasks. Never fails: a VM that
    /// cannot start is returned in state `crashed` with the reason in `detail`.
    ///
    /// Must be called inside a `LocalSet`.
    pub fn start(cfg: anyhow::Result<VmConfig>, agent: OwnedFd) -> Rc<Vm> {
        match Self::try_start(cfg, agent) {
            Ok(vm) => vm,
            Err(e) => {
                tracing::error!("VM did not start: {e:#}");
                Self::failed(format!("the VM did not start: {e:#}"))
            }
        }
    }

    /// A VM that never ran, in state `crashed` with `detail`.
    pub fn failed(detail: String) -> Rc<Vm> {
        let (tx, _) = watch::channel(Status {
            state: VmState::Crashed,
            detail,
            pid: 0,
            engine: Engine::Qemu,
            boot: BootTimes::default(),
        });
        Rc::new(Vm {
            status: tx,
            console: None,
            qmp: RefCell::new(None),
            kill_tx: None,
            stop_requested: Cell::new(false),
            shutdown_reason: RefCell::new(None),
            stderr_tail: Rc::default(),
            kvm: None,
        })
    }

    fn try_start(cfg: anyhow::Result<VmConfig>, agent: OwnedFd) -> anyhow::Result<Rc<Vm>> {
        use anyhow::Context;
        let cfg = cfg?;
        cfg.validate()?;
        for (what, p) in [("kernel", &cfg.kernel), ("initramfs", &cfg.initramfs)] {
            let m = std::fs::metadata(p).with_context(|| format!("{what} {}", p.display()))?;
            anyhow::ensure!(m.is_file(), "{what} {} is not a regular file", p.display());
        }
        std::fs::create_dir_all(&cfg.run_dir).with_context(|| format!("creating run dir {}", cfg.run_dir.display()))?;
        let console = cfg.run_dir.join("console.log");
        std::fs::File::create(&console).with_context(|| format!("creating {}", console.display()))?;

        let kvm = capvisor_rpc::host::host_kvm_usable();
        if capvisor_rpc::host::resolve_engine(cfg.engine, Engine::Auto) == Engine::Kvm {
            return Self::start_kvm(&cfg, agent, console);
        }
        let (qmp_ours, qmp_theirs) = spawn::stream_pair()?;
        let program = qemu::qemu_binary();
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(qemu::args(&cfg, kvm, qemu::host_tsc_khz()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let fds = [Inherit { fd: agent, target: qemu::AGENT_FD }, Inherit { fd: qmp_theirs, target: qemu::QMP_FD }];
        spawn::prepare(&mut cmd, &fds);
        let spawned = cmd.spawn();
        // Our copies of the handed-over descriptors close here, so the
        // worker sees the agent channel end when QEMU does.
        drop(fds);
        let mut child = spawned.with_context(|| format!("starting {program} (is QEMU installed?)"))?;
        let pid = child.id().unwrap_or(0);
        tracing::info!(pid, accel = if kvm { "kvm" } else { "tcg" }, "qemu started for VM {}", cfg.name);

        let (status_tx, _) = watch::channel(Status {
            state: VmState::Starting,
            detail: String::new(),
            pid,
            engine: Engine::Qemu,
            boot: BootTimes::default(),
        });
        let (kill_tx, mut kill_rx) = mpsc::unbounded_channel::<()>();
        let vm = Rc::new(Vm {
            status: status_tx,
            console: Some(console),
            qmp: RefCell::new(None),
            kill_tx: Some(kill_tx),
            stop_requested: Cell::new(false),
            shutdown_reason: RefCell::new(None),
            stderr_tail: Rc::default(),
            kvm: None,
        });

        // QEMU's stderr: logged, and the tail kept for error details.
        if let Some(stderr) = child.stderr.take() {
            let tail = vm.stderr_tail.clone();
            tokio::task::spawn_local(async move {
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
            });
        }

        // The owner of the child: reaps it, kills it on request.
        let weak = Rc::downgrade(&vm);
        tokio::task::spawn_local(async move {
            let exit = loop {
                tokio::select! {
                    st = child.wait() => break st,
                    Some(()) = kill_rx.recv() => {
                        let _ = child.start_kill();
                    }
                }
            };
            // Let the stderr reader drain the last lines.
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Some(vm) = weak.upgrade() {
                vm.on_exit(exit);
            }
        });

        // QMP: handshake, first status, then events.
        let weak = Rc::downgrade(&vm);
        tokio::task::spawn_local(async move {
            let stream = match spawn::into_tokio(qmp_ours) {
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
            let Some(vm) = weak.upgrade() else { return };
            *vm.qmp.borrow_mut() = Some(qmp.clone());
            match qmp.query_status().await {
                Ok(s) if s == "running" => vm.set_state_if(VmState::Starting, VmState::Running),
                Ok(s) => tracing::info!("qemu run state after start: {s}"),
                Err(e) => tracing::warn!("query-status: {e:#}"),
            }
            drop(vm);
            while let Some(ev) = events.recv().await {
                let Some(vm) = weak.upgrade() else { return };
                tracing::debug!(event = %ev.name, data = %ev.data, "QMP event");
                match ev.name.as_str() {
                    "SHUTDOWN" => {
                        let reason = ev.data.get("reason").and_then(|r| r.as_str()).unwrap_or("unknown").to_string();
                        *vm.shutdown_reason.borrow_mut() = Some(reason);
                    }
                    "STOP" => vm.set_state_if(VmState::Running, VmState::Paused),
                    "RESUME" => vm.set_state_if(VmState::Paused, VmState::Running),
                    _ => {}
                }
            }
        });
        Ok(vm)
    }

    /// Engine kvm: builds and starts the VM in this process (see
    /// [`crate::kvm_engine`]); its exit is recorded by a local task.
    fn start_kvm(cfg: &VmConfig, agent: OwnedFd, console: PathBuf) -> anyhow::Result<Rc<Vm>> {
        let started = kvm_engine::start(cfg, agent, &console)?;
        tracing::info!(confinement = %started.handle.confinement, "kvm engine started VM {}", cfg.name);
        let (status_tx, _) = watch::channel(Status {
            state: VmState::Running,
            detail: String::new(),
            pid: std::process::id(),
            engine: Engine::Kvm,
            boot: started.handle.boot_times(),
        });
        let vm = Rc::new(Vm {
            status: status_tx,
            console: Some(console),
            qmp: RefCell::new(None),
            kill_tx: None,
            stop_requested: Cell::new(false),
            shutdown_reason: RefCell::new(None),
            stderr_tail: Rc::default(),
            kvm: Some(started.handle),
        });
        let weak = Rc::downgrade(&vm);
        let exit = started.exit;
        tokio::task::spawn_local(async move {
            let exit = exit.await.unwrap_or_else(|_| VmExit::InternalError("the VM owner thread died".into()));
            if let Some(vm) = weak.upgrade() {
                vm.on_kvm_exit(exit);
            }
        });
        Ok(vm)
    }

    fn on_kvm_exit(&self, exit: VmExit) {
        let console = self.console.as_ref().map(|p| String::from_utf8_lossy(&capvisor_rpc::read_tail(p, 64 * 1024)).into_owned()).unwrap_or_default();
        let panic_line = console.lines().find(|l| l.contains("Kernel panic")).map(|l| l.trim().to_string());
        let (state, detail) = match (exit, panic_line) {
            (_, Some(p)) => (VmState::Crashed, format!("guest kernel panic: {p}")),
            (VmExit::Stopped, None) => (VmState::Stopped, "stopped on request".to_string()),
            (VmExit::PoweredOff, None) => (VmState::Stopped, "the guest powered off".to_string()),
            (VmExit::Reset, None) => (VmState::Stopped, "the guest rebooted (reboot ends the VM)".to_string()),
            (VmExit::Halted, None) => (VmState::Stopped, "the guest halted".to_string()),
            (VmExit::Shutdown, None) => (VmState::Crashed, "the guest triple-faulted".to_string()),
            (VmExit::InternalError(d), None) => (VmState::Crashed, format!("KVM could not run the guest: {d}")),
            (VmExit::Panicked(d), None) => (VmState::Crashed, format!("guest crash: {d}")),
        };
        tracing::info!(state = capvisor_rpc::names::vm_state_name(state), "VM ended: {detail}");
        let boot = self.kvm.as_ref().map(|k| k.boot_times()).unwrap_or_default();
        self.status.send_modify(|s| {
            s.state = state;
            s.detail = detail;
            s.boot = boot;
        });
    }

    /// The current status (with fresh boot times for engine kvm).
    pub fn status(&self) -> Status {
        let mut s = self.status.borrow().clone();
        if let Some(k) = &self.kvm {
            s.boot = k.boot_times();
        }
        s
    }

    /// Resolves with the final status once the machine has ended.
    pub async fn wait_exit(&self) -> Status {
        let mut rx = self.status.subscribe();
        let r = match rx.wait_for(|s| s.ended()).await {
            Ok(s) => s.clone(),
            Err(_) => self.status(),
        };
        r
    }

    /// Stops the machine: ACPI power button (`system_powerdown`) and up to
    /// `grace` for the guest to power off, then QMP `quit`, then SIGKILL.
    /// Returns the final status (`stopped`, or `crashed` if it had crashed
    /// before). A machine that already ended is returned as is.
    pub async fn stop(&self, grace: Duration) -> Status {
        if self.status().ended() {
            return self.status();
        }
        self.stop_requested.set(true);
        if self.kvm.is_some() {
            // The guest had its chance (Guest.shutdown) before this call;
            // ACPI power-button delivery is not wired on engine kvm.
            self.kill();
            return match tokio::time::timeout(Duration::from_secs(10), self.wait_exit()).await {
                Ok(s) => s,
                Err(_) => self.status(),
            };
        }
        let qmp = self.qmp.borrow().clone();
        if let Some(qmp) = &qmp {
            if !grace.is_zero() {
                match qmp.execute("system_powerdown", None).await {
                    Ok(_) => {
                        if let Ok(s) = tokio::time::timeout(grace, self.wait_exit()).await {
                            return s;
                        }
                    }
                    Err(e) => tracing::info!("system_powerdown: {e:#}"),
                }
            }
            if let Err(e) = qmp.execute_timeout("quit", None, QUIT_WAIT).await {
                tracing::info!("quit: {e:#}");
            }
            if let Ok(s) = tokio::time::timeout(QUIT_WAIT, self.wait_exit()).await {
                return s;
            }
        }
        self.kill();
        match tokio::time::timeout(Duration::from_secs(10), self.wait_exit()).await {
            Ok(s) => s,
            Err(_) => self.status(),
        }
    }

    /// Sends SIGKILL to QEMU (if it still runs); the exit is recorded as
    /// requested (`stopped`).
    pub fn kill(&self) {
        self.stop_requested.set(true);
        if let Some(tx) = &self.kill_tx {
            let _ = tx.send(());
        }
        if let Some(k) = &self.kvm {
            k.stop();
        }
    }

    /// Pauses the vCPUs (QMP `stop`).
    ///
    /// Errors: `notRunning` unless the machine is running.
    pub async fn pause(&self) -> Result<(), CvError> {
        if let Some(k) = &self.kvm {
            self.require_state(VmState::Running)?;
            k.pause().await.map_err(CvError::unavailable)?;
            self.set_state_if(VmState::Running, VmState::Paused);
            return Ok(());
        }
        let qmp = self.require(VmState::Running)?;
        qmp.execute("stop", None).await.map_err(|e| CvError::unavailable(format!("{e:#}")))?;
        self.set_state_if(VmState::Running, VmState::Paused);
        Ok(())
    }

    /// Resumes the vCPUs (QMP `cont`).
    ///
    /// Errors: `notRunning` unless the machine is paused.
    pub async fn resume(&self) -> Result<(), CvError> {
        if let Some(k) = &self.kvm {
            self.require_state(VmState::Paused)?;
            k.resume().await.map_err(CvError::unavailable)?;
            self.set_state_if(VmState::Paused, VmState::Running);
            return Ok(());
        }
        let qmp = self.require(VmState::Paused)?;
        qmp.execute("cont", None).await.map_err(|e| CvError::unavailable(format!("{e:#}")))?;
        self.set_state_if(VmState::Paused, VmState::Running);
        Ok(())
    }

    /// The last `max_bytes` (at most [`MAX_CONSOLE_TAIL`]) bytes of the
    /// serial console log, as the guest wrote them. Empty when nothing was
    /// logged or the VM never started.
    pub fn console_tail(&self, max_bytes: u32) -> Vec<u8> {
        let Some(path) = &self.console else { return Vec::new() };
        capvisor_rpc::read_tail(path, max_bytes.min(MAX_CONSOLE_TAIL) as u64)
    }

    fn require_state(&self, want: VmState) -> Result<(), CvError> {
        let st = self.status.borrow().state;
        if st != want {
            return Err(CvError::new(
                capvisor_schema::common_capnp::ErrorCode::NotRunning,
                format!("the VM is {} (needs to be {})", capvisor_rpc::names::vm_state_name(st), capvisor_rpc::names::vm_state_name(want)),
            ));
        }
        Ok(())
    }

    fn require(&self, want: VmState) -> Result<Qmp, CvError> {
        self.require_state(want)?;
        self.qmp.borrow().clone().ok_or_else(|| CvError::unavailable("QMP is not connected"))
    }

    fn set_state_if(&self, from: VmState, to: VmState) {
        self.status.send_if_modified(|s| {
            if s.state == from {
                s.state = to;
                true
            } else {
                false
            }
        });
    }

    fn on_exit(&self, exit: std::io::Result<std::process::ExitStatus>) {
        *self.qmp.borrow_mut() = None;
        let console = self.console.as_ref().map(|p| String::from_utf8_lossy(&capvisor_rpc::read_tail(p, 64 * 1024)).into_owned()).unwrap_or_default();
        let panic_line = console.lines().find(|l| l.contains("Kernel panic")).map(|l| l.trim().to_string());
        let stderr = String::from_utf8_lossy(&self.stderr_tail.borrow()).trim().to_string();
        let reason = self.shutdown_reason.borrow().clone();
        let (state, detail) = match (&exit, panic_line) {
            (_, Some(p)) => (VmState::Crashed, format!("guest kernel panic: {p}")),
            _ if self.stop_requested.get() => (VmState::Stopped, "stopped on request".to_string()),
            (Ok(st), None) if st.success() => match reason.as_deref() {
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
        };
        tracing::info!(state = capvisor_rpc::names::vm_state_name(state), "VM ended: {detail}");
        self.status.send_modify(|s| {
            s.state = state;
            s.detail = detail;
        });
    }
}

/// The `Machine` server over a [`Vm`].
pub struct MachineServer {
    vm: Rc<Vm>,
}

impl MachineServer {
    /// Serves `vm`.
    pub fn new(vm: Rc<Vm>) -> Self {
        Self { vm }
    }

    /// `vm` as a `Machine` client.
    pub fn client(vm: Rc<Vm>) -> machine::Client {
        capnp_rpc::new_client(Self::new(vm))
    }
}

impl machine::Server for MachineServer {
    async fn status(
        self: CapRc<Self>,
        _: machine::StatusParams,
        mut results: machine::StatusResults,
    ) -> capnp::Result<()> {
        self.vm.status().write(results.get().init_status());
        Ok(())
    }

    async fn stop(
        self: CapRc<Self>,
        params: machine::StopParams,
        mut results: machine::StopResults,
    ) -> capnp::Result<()> {
        let grace = Duration::from_millis(params.get()?.get_grace_ms() as u64);
        let st = self.vm.stop(grace).await;
        st.write(results.get().init_status());
        Ok(())
    }

    async fn pause(
        self: CapRc<Self>,
        _: machine::PauseParams,
        _: machine::PauseResults,
    ) -> capnp::Result<()> {
        Ok(self.vm.pause().await?)
    }

    async fn resume(
        self: CapRc<Self>,
        _: machine::ResumeParams,
        _: machine::ResumeResults,
    ) -> capnp::Result<()> {
        Ok(self.vm.resume().await?)
    }

    async fn console_tail(
        self: CapRc<Self>,
        params: machine::ConsoleTailParams,
        mut results: machine::ConsoleTailResults,
    ) -> capnp::Result<()> {
        let max = params.get()?.get_max_bytes();
        let bytes = self.vm.console_tail(max);
        results.get().set_bytes(&bytes);
        Ok(())
    }

    async fn wait_exit(
        self: CapRc<Self>,
        _: machine::WaitExitParams,
        mut results: machine::WaitExitResults,
    ) -> capnp::Result<()> {
        let st = self.vm.wait_exit().await;
        st.write(results.get().init_status());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_vm_reports_crashed_and_refuses_pause() {
        capvisor_rpc::conn::run_local(async {
            let vm = Vm::failed("kernel /nope: No such file".into());
            let st = vm.status();
            assert_eq!(st.state, VmState::Crashed);
            assert!(st.ended());
            assert_eq!(vm.wait_exit().await, st);
            assert_eq!(vm.stop(Duration::from_secs(1)).await, st);
            let e = vm.pause().await.unwrap_err();
            assert_eq!(e.code, capvisor_schema::common_capnp::ErrorCode::NotRunning);
            assert!(vm.console_tail(100).is_empty());
        });
    }

    #[test]
    fn console_tail_is_bounded_and_raw() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.log");
        std::fs::write(&p, b"hello \xff world").unwrap();
        assert_eq!(capvisor_rpc::read_tail(&p, 5), b"world");
        assert_eq!(capvisor_rpc::read_tail(&p, 1000), b"hello \xff world");
        assert!(capvisor_rpc::read_tail(&d.path().join("missing"), 10).is_empty());
    }
}
