//! Engine `kvm`: the VM runs inside this vmm process on capvisor's own
//! VMM (crate `capvisor-kvm`, in `vmm/kvm`), with no QEMU.
//!
//! Devices: COM1 (console log), i8042 reset, ACPI PM (power off / reset),
//! the boot-timer port, and one virtio-console with port 0 as a console
//! (no backend) and port 1 named `capvisor.agent` on the agent socket the
//! worker handed us — the same port guest-init finds under QEMU, so
//! guest-init does not care which engine runs it. Devices are found by
//! ACPI (a DSDT `LNRO0005` per virtio-mmio slot), so Debian's stock
//! kernel needs no `virtio_mmio.device=` arguments.
//!
//! Confinement (docs/vmm-confinement.md): after the machine is built and
//! before any vCPU or device thread starts, the process confines itself
//! with Landlock (read-only kernel + initramfs, read-write run dir) and a
//! seccomp allowlist (no network, no exec). Set `CAPVISOR_SANDBOX=off` to
//! skip that while debugging; it is logged.
//!
//! Threads: one per vCPU, the queue-notification thread, the console pump,
//! and an owner thread that holds the [`capvisor_kvm::vm::Vm`] and takes
//! pause / resume / stop commands from the vmm's RPC thread.

use capvisor_rpc::vmconfig::VmConfig;
use anyhow::Context;
use capvisor_kvm::devices::boot_timer::{BootTimer, BootTimes};
use capvisor_kvm::devices::virtio::block::io::VirtioBlock;
use capvisor_kvm::devices::virtio::console::io::{ConsolePort, VirtioConsole};
use capvisor_kvm::vm::{BootSource, VmBuilder, VmExit};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// Commands to the owner thread.
enum Cmd {
    Pause(tokio::sync::oneshot::Sender<Result<(), String>>),
    Resume(tokio::sync::oneshot::Sender<()>),
    Stop,
}

/// A running kvm-engine VM, as seen from the RPC thread.
pub struct KvmHandle {
    cmd: mpsc::Sender<Cmd>,
    timer: Arc<BootTimer>,
    /// What confinement is in force (for logs and status).
    pub confinement: String,
}

/// A started VM: its handle and the receiver of its exit.
pub struct Started {
    /// Commands and boot times.
    pub handle: KvmHandle,
    /// Resolves once, with how the VM ended.
    pub exit: tokio::sync::oneshot::Receiver<VmExit>,
}

impl KvmHandle {
    /// Parks every vCPU.
    ///
    /// Errors: the vCPUs did not park in time, or the VM has ended.
    pub async fn pause(&self) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.cmd.send(Cmd::Pause(tx)).map_err(|_| "the VM has ended".to_string())?;
        rx.await.map_err(|_| "the VM has ended".to_string())?
    }

    /// Lets parked vCPUs run again.
    pub async fn resume(&self) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.cmd.send(Cmd::Resume(tx)).map_err(|_| "the VM has ended".to_string())?;
        rx.await.map_err(|_| "the VM has ended".to_string())
    }

    /// Stops the vCPUs for good; the exit arrives on [`Started::exit`] as
    /// `Stopped` (or how it ended before).
    pub fn stop(&self) {
        let _ = self.cmd.send(Cmd::Stop);
    }

    /// Boot milestones so far (µs since the vmm process started).
    pub fn boot_times(&self) -> BootTimes {
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

/// Builds the machine, confines the process, starts the vCPUs.
///
/// Errors: /dev/kvm missing or unusable, kernel/initramfs unreadable, a
/// device failing to build, confinement failing (the VM is not started
/// unconfined unless `CAPVISOR_SANDBOX=off`).
pub fn start(cfg: &VmConfig, agent: OwnedFd, console_log: &Path) -> anyhow::Result<Started> {
    anyhow::ensure!(cfg.vcpus <= capvisor_kvm::vm::MAX_VCPUS as u32, "at most {} vCPUs", capvisor_kvm::vm::MAX_VCPUS);
    let serial = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(console_log)
        .with_context(|| format!("opening {}", console_log.display()))?;
    let (console, backend) =
        VirtioConsole::new(vec![ConsolePort::console(None), ConsolePort::named("capvisor.agent", agent)])
            .context("building the virtio-console")?;
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

    let confinement = if std::env::var("CAPVISOR_SANDBOX").as_deref() == Ok("off") {
        tracing::warn!("CAPVISOR_SANDBOX=off: the kvm engine runs unconfined");
        "off (CAPVISOR_SANDBOX=off)".to_string()
    } else {
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
        };
        let c = kernel_cmdline(&cfg);
        assert!(c.contains("reboot=k") && !c.contains("reboot=t") && c.ends_with("x=1"), "{c}");
        assert!(!kernel_cmdline_for(&cfg, false).contains("clearcpuid"));
        let p = kernel_cmdline_for(&cfg, true);
        assert!(p.contains("rdinit=/init noxsave clearcpuid=") && p.ends_with("x=1"), "{p}");
    }
}
