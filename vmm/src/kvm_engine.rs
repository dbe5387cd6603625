//! Engine `kvm`: the VM runs inside this vmm process on capvisor's own
//! VMM (crate `capvisor-kvm`, in `vmm/kvm`), with no QEMU.
//!
//! Devices: COM1 (the console log, bounded by a
//! [`crate::engine::ConsoleRing`]), i8042 reset, ACPI PM (power off /
//! reset), the boot-timer port, and one virtio-console with port 0 as a console
//! (no backend) and port 1 named `capvisor.agent` on the agent socket the
//! worker handed us — the same port guest-init finds under QEMU, so
//! guest-init does not care which engine runs it. Devices are found by
//! ACPI (a DSDT `LNRO0005` per virtio-mmio slot), so Debian's stock
//! kernel needs no `virtio_mmio.device=` arguments.
//!
//! Confinement (docs/vmm-confinement.md): after the machine is built and
//! before any vCPU or device thread starts, the process confines itself
//! with Landlock (read-only kernel + initramfs, read-write run dir) and a
//! seccomp allowlist (no network, no exec). No switch turns it off: a VM
//! whose confinement cannot be applied does not start.
//!
//! Threads: one per vCPU, the queue-notification thread, the console pump,
//! and an owner thread that holds the [`capvisor_kvm::vm::Vm`] and takes
//! pause / resume / stop commands from the vmm's RPC thread.
//!
//! [`KvmEngine`] is that VM behind [`Engine`]: it starts in `running` (the
//! vCPUs run once [`KvmEngine::start`] returns), reports boot milestones
//! measured in this process, and classifies the end with [`exit_outcome`].

use crate::engine::{ConsoleLog, Engine, EngineKind, Lifecycle, Status};
use anyhow::Context;
use capvisor_kvm::devices::boot_timer::{BootTimer, BootTimes};
use capvisor_kvm::devices::virtio::block::io::VirtioBlock;
use capvisor_kvm::devices::virtio::console::io::{ConsolePort, VirtioConsole};
use capvisor_kvm::vm::{BootSource, VmBuilder, VmExit};
use capvisor_rpc::vmconfig::VmConfig;
use capvisor_rpc::CvError;
use capvisor_schema::capvisor_capnp::VmState;
use futures::future::LocalBoxFuture;
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// One kvm-engine VM, running inside this process.
pub struct KvmEngine {
    life: Lifecycle,
    console: ConsoleLog,
    handle: KvmHandle,
}

impl KvmEngine {
    /// Builds the VM for `cfg` with `agent` on the virtio-console port
    /// `capvisor.agent` and COM1 appending to `console`, confines this
    /// process, starts the vCPUs and returns in state `running`; a local
    /// task records the end.
    ///
    /// Errors: those of building and confining the VM (see the module
    /// docs): /dev/kvm unusable, kernel or initramfs unreadable, a disk
    /// failing to open, confinement failing. Must be called inside a `LocalSet`.
    pub fn start(
        cfg: &VmConfig,
        channels: impl Into<crate::engine::GuestChannels>,
        console: ConsoleLog,
    ) -> anyhow::Result<Rc<Self>> {
        let started = run_machine(cfg, channels.into(), &console)?;
        tracing::info!(confinement = %started.handle.confinement, "kvm engine started VM {}", cfg.name);
        let mut status = Status::new(VmState::Running, std::process::id(), EngineKind::Kvm);
        status.boot = started.handle.boot_times();
        let engine = Rc::new(KvmEngine { life: Lifecycle::new(status), console, handle: started.handle });
        let weak = Rc::downgrade(&engine);
        let exit = started.exit;
        tokio::task::spawn_local(async move {
            let exit = exit.await.unwrap_or_else(|_| VmExit::InternalError("the VM owner thread died".into()));
            if let Some(engine) = weak.upgrade() {
                engine.life.set_boot(engine.handle.boot_times());
                let (state, detail) = exit_outcome(exit, engine.console.panic_line());
                engine.life.end(state, detail);
            }
        });
        Ok(engine)
    }
}

impl Engine for KvmEngine {
    fn lifecycle(&self) -> &Lifecycle {
        &self.life
    }

    /// The status with the boot milestones as of now.
    fn status(&self) -> Status {
        let mut s = self.life.status();
        s.boot = self.handle.boot_times();
        s
    }

    /// Stops the vCPUs at once (`grace` is not used: the guest had its
    /// chance through `Guest.shutdown` before this call, and ACPI
    /// power-button delivery is not wired on engine kvm).
    fn stop(&self, _grace: Duration) -> LocalBoxFuture<'_, Status> {
        Box::pin(async move {
            if self.life.status().ended() {
                return self.life.status();
            }
            self.kill();
            self.life.settle().await
        })
    }

    /// Tells the owner thread to stop the vCPUs for good.
    fn kill(&self) {
        self.handle.stop();
    }

    /// Parks every vCPU.
    fn pause(&self) -> LocalBoxFuture<'_, Result<(), CvError>> {
        Box::pin(self.life.transition(VmState::Running, VmState::Paused, async {
            self.handle.pause().await.map_err(CvError::unavailable)
        }))
    }

    /// Lets the parked vCPUs run again.
    fn resume(&self) -> LocalBoxFuture<'_, Result<(), CvError>> {
        Box::pin(self.life.transition(VmState::Paused, VmState::Running, async {
            self.handle.resume().await.map_err(CvError::unavailable)
        }))
    }

    fn console_tail(&self, max_bytes: u32) -> Vec<u8> {
        self.console.tail(max_bytes)
    }
}

/// How a kvm-engine VM ended: a "Kernel panic" line on the console
/// (`panic_line`) makes any end `crashed`; otherwise a stop on request, a
/// power-off, a reset (`reboot=k`: the i8042 reset line) or a halt is
/// `stopped`, and a triple fault (`Shutdown`), a KVM internal error or a
/// crashed vCPU thread is `crashed`.
pub fn exit_outcome(exit: VmExit, panic_line: Option<String>) -> (VmState, String) {
    match (exit, panic_line) {
        (_, Some(p)) => (VmState::Crashed, format!("guest kernel panic: {p}")),
        (VmExit::Stopped, None) => (VmState::Stopped, "stopped on request".to_string()),
        (VmExit::PoweredOff, None) => (VmState::Stopped, "the guest powered off".to_string()),
        (VmExit::Reset, None) => (VmState::Stopped, "the guest rebooted (reboot ends the VM)".to_string()),
        (VmExit::Halted, None) => (VmState::Stopped, "the guest halted".to_string()),
        (VmExit::Shutdown, None) => (VmState::Crashed, "the guest triple-faulted".to_string()),
        (VmExit::InternalError(d), None) => (VmState::Crashed, format!("KVM could not run the guest: {d}")),
        (VmExit::Panicked(d), None) => (VmState::Crashed, format!("guest crash: {d}")),
    }
}

/// Commands to the owner thread.
enum Cmd {
    Pause(tokio::sync::oneshot::Sender<Result<(), String>>),
    Resume(tokio::sync::oneshot::Sender<()>),
    Stop,
}

/// A running kvm-engine VM, as seen from the RPC thread.
struct KvmHandle {
    cmd: mpsc::Sender<Cmd>,
    timer: Arc<BootTimer>,
    /// What confinement is in force (for logs).
    confinement: String,
}

/// A started VM: its handle and the receiver of its exit.
struct Started {
    /// Commands and boot times.
    handle: KvmHandle,
    /// Resolves once, with how the VM ended.
    exit: tokio::sync::oneshot::Receiver<VmExit>,
}

impl KvmHandle {
    /// Parks every vCPU.
    ///
    /// Errors: the vCPUs did not park in time, or the VM has ended.
    async fn pause(&self) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.cmd.send(Cmd::Pause(tx)).map_err(|_| "the VM has ended".to_string())?;
        rx.await.map_err(|_| "the VM has ended".to_string())?
    }

    /// Lets parked vCPUs run again.
    async fn resume(&self) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.cmd.send(Cmd::Resume(tx)).map_err(|_| "the VM has ended".to_string())?;
        rx.await.map_err(|_| "the VM has ended".to_string())
    }

    /// Stops the vCPUs for good; the exit arrives on [`Started::exit`] as
    /// `Stopped` (or how it ended before). No-op once the VM has ended.
    fn stop(&self) {
        let _ = self.cmd.send(Cmd::Stop);
    }

    /// Boot milestones so far (µs since the vmm process started).
    fn boot_times(&self) -> BootTimes {
        self.timer.times()
    }
}

/// The kernel command line for the kvm engine: the qemu engine's, with
/// `reboot=k` (the i8042 reset line ends the VM as a reset) instead of
/// `reboot=t`, so a triple fault stays distinguishable as a crash. Under
/// the nested `kvm_pvm` it also hides the CPU features that hypervisor
/// cannot emulate ([`kernel_cmdline_for`]).
pub fn kernel_cmdline(cfg: &VmConfig) -> String {
    kernel_cmdline_for(cfg, capvisor_kvm::hypervisor::kvm::is_nested_pvm())
}

/// [`kernel_cmdline`] with the kvm_pvm decision made by the caller: with
/// `nested_pvm`, [`capvisor_kvm::boot::x86_64::cpu::nested_pvm_cmdline`]
/// (`noxsave clearcpuid=...`) goes before the user's extra options.
pub fn kernel_cmdline_for(cfg: &VmConfig, nested_pvm: bool) -> String {
    let c = crate::qemu::kernel_cmdline(cfg, None).replace("reboot=t", "reboot=k");
    if nested_pvm {
        let pvm = capvisor_kvm::boot::x86_64::cpu::nested_pvm_cmdline();
        c.replacen("rdinit=/init", &format!("rdinit=/init {pvm}"), 1)
    } else {
        c
    }
}

/// Builds the machine, confines the process, starts the vCPUs and the
/// owner thread.
///
/// Errors: /dev/kvm missing or unusable, kernel/initramfs unreadable, a
/// device failing to build, confinement failing (the VM is never started
/// unconfined).
fn run_machine(
    cfg: &VmConfig,
    channels: crate::engine::GuestChannels,
    console_log: &ConsoleLog,
) -> anyhow::Result<Started> {
    anyhow::ensure!(cfg.vcpus <= capvisor_kvm::vm::MAX_VCPUS as u32, "at most {} vCPUs", capvisor_kvm::vm::MAX_VCPUS);
    // COM1 writes from the vCPU threads into the bounded console log
    // (positioned writes on this descriptor only: fine after confinement).
    let serial = console_log.ring().with_context(|| format!("opening {}", console_log.path().display()))?;
    let mut ports = vec![ConsolePort::console(None), ConsolePort::named("capvisor.agent", channels.agent)];
    if let Some(egress) = channels.egress {
        ports.push(ConsolePort::named("capvisor.egress", egress));
    }
    let (console, backend) = VirtioConsole::new(ports).context("building the virtio-console")?;
    let mut builder = VmBuilder::new(BootSource::Linux {
        kernel: cfg.kernel.clone(),
        initramfs: Some(cfg.initramfs.clone()),
        cmdline: kernel_cmdline(cfg),
    })
    .memory_mib(cfg.memory_mib as u64)
    .vcpus(cfg.vcpus as u8)
    .serial_output(Box::new(serial))
    .virtio_device(Box::new(console));
    for (i, d) in cfg.disks.iter().enumerate() {
        let blk = VirtioBlock::open(&d.path, d.read_only, format!("disk{i}").as_bytes())
            .with_context(|| format!("opening disk {}", d.path.display()))?;
        builder = builder.virtio_device(Box::new(blk));
    }
    let mut vm = builder.build().context("building the VM (is /dev/kvm usable?)")?;

    let confinement = {
        let policy = capvisor_kvm::sandbox::SandboxPolicy::for_vm(
            cfg.kernel.clone(),
            Some(cfg.initramfs.clone()),
            cfg.disks.iter().filter(|d| d.read_only).map(|d| d.path.clone()),
            cfg.disks.iter().filter(|d| !d.read_only).map(|d| d.path.clone()),
            cfg.run_dir.clone(),
        )?;
        let report = capvisor_kvm::sandbox::confine(&policy).context("confining the vmm process")?;
        // Each vCPU thread narrows itself further to the vCPU list.
        let filters = Arc::new(report.filters.clone());
        vm.set_vcpu_thread_init(Arc::new(move || {
            filters.apply_to_current_thread(capvisor_kvm::sandbox::ThreadKind::Vcpu).map_err(|e| e.to_string())
        }));
        report.to_string()
    };
    tracing::info!("kvm engine confined: {confinement}");

    let pump = backend.spawn().context("starting the console pump")?;
    let timer = vm.boot_timer().clone();
    vm.run().context("starting the vCPUs")?;
    let (cmd_tx, cmd_rx) = mpsc::channel::<Cmd>();
    let (exit_tx, exit_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("vm-owner".into())
        .spawn(move || {
            let exit = loop {
                if let Some(exit) = vm.wait_timeout(Duration::from_millis(20)) {
                    break exit;
                }
                match cmd_rx.try_recv() {
                    Ok(Cmd::Pause(reply)) => {
                        let _ = reply.send(vm.pause().map_err(|e| e.to_string()));
                    }
                    Ok(Cmd::Resume(reply)) => {
                        vm.resume();
                        let _ = reply.send(());
                    }
                    Ok(Cmd::Stop) | Err(mpsc::TryRecvError::Disconnected) => break vm.stop(),
                    Err(mpsc::TryRecvError::Empty) => {}
                }
            };
            drop(pump);
            let _ = exit_tx.send(exit);
        })
        .context("starting the VM owner thread")?;
    Ok(Started { handle: KvmHandle { cmd: cmd_tx, timer, confinement }, exit: exit_rx })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_classified() {
        let panic = Some("Kernel panic - not syncing: x".to_string());
        assert_eq!(exit_outcome(VmExit::PoweredOff, panic).0, VmState::Crashed);
        for (exit, state, detail) in [
            (VmExit::Stopped, VmState::Stopped, "stopped on request"),
            (VmExit::PoweredOff, VmState::Stopped, "the guest powered off"),
            (VmExit::Reset, VmState::Stopped, "the guest rebooted (reboot ends the VM)"),
            (VmExit::Halted, VmState::Stopped, "the guest halted"),
            (VmExit::Shutdown, VmState::Crashed, "the guest triple-faulted"),
            (
                VmExit::InternalError("emulation failure".into()),
                VmState::Crashed,
                "KVM could not run the guest: emulation failure",
            ),
            (VmExit::Panicked("vcpu0".into()), VmState::Crashed, "guest crash: vcpu0"),
        ] {
            assert_eq!(exit_outcome(exit, None), (state, detail.to_string()));
        }
    }

    #[test]
    fn cmdline_reboots_through_the_keyboard_controller() {
        let cfg = VmConfig {
            name: "t".into(),
            run_dir: "/r".into(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
            memory_mib: 128,
            vcpus: 1,
            engine: capvisor_schema::capvisor_capnp::Engine::Kvm,
            extra_cmdline: "x=1".into(),
            disks: vec![],
            confine: Default::default(),
            egress: false,
        };
        let c = kernel_cmdline(&cfg);
        assert!(c.contains("reboot=k") && !c.contains("reboot=t") && c.ends_with("x=1"), "{c}");
        assert!(!kernel_cmdline_for(&cfg, false).contains("clearcpuid"));
        let p = kernel_cmdline_for(&cfg, true);
        assert!(p.contains("rdinit=/init noxsave clearcpuid=") && p.ends_with("x=1"), "{p}");
    }
}
