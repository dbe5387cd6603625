//! The assembled machine: [`VmBuilder`] turns a configuration into a
//! [`Vm`] (KVM VM, guest RAM, kernel + initramfs or raw test code, ACPI
//! tables, legacy devices, virtio-mmio slots, vCPUs), and [`Vm`] runs it
//! with one thread per vCPU.
//!
//! Machine layout (x86_64):
//!
//! | what | where | interrupt (GSI) |
//! |---|---|---|
//! | RAM | 0 .. min(size, 3 GiB), rest from 4 GiB ([`crate::memory`]) | |
//! | boot structures, zero page, cmdline | first 128 KiB ([`crate::boot::x86_64`]) | |
//! | ACPI tables | 0xE0000.. ([`crate::acpi`]) | |
//! | i8042 (reset only) | ports 0x60-0x64 | |
//! | ACPI PM register (reset / S5) | port 0x3C0 | |
//! | COM1 16550A | ports 0x3F8-0x3FF | 4 |
//! | boot timer | port 0x440 ([`crate::devices::boot_timer`]) | |
//! | virtio-mmio slot n | 0xD000_0000 + n * 0x1000, 4 KiB | 5 + n (n < 19) |
//! | IOAPIC / LAPIC (in-kernel) | 0xFEC0_0000 / 0xFEE0_0000 | |
//!
//! Interrupts: with the in-kernel irqchip (the default), every device's
//! [`IrqLine`] eventfd is bound to its GSI with KVM_IRQFD, so raising it
//! never leaves the kernel. Queue notifications: each virtio queue's
//! QueueNotify register is bound with KVM_IOEVENTFD (datamatch = queue
//! index) to an eventfd; one notifier thread ("virtio-notify") waits on all
//! of them with epoll and calls the transport's QueueNotify handler, so a
//! guest kick costs no exit to userspace on the vCPU thread. Where
//! KVM_IOEVENTFD fails, the MMIO-exit path handles the same write.
//!
//! Lifecycle: [`VmBuilder::build`] -> [`Vm::run`] (starts the vCPU threads)
//! -> [`Vm::wait`] (blocks until the guest powers off, resets, triple-faults,
//! fails, or [`Vm::stop`] is called) -> [`VmExit`]. [`Vm::pause`] parks every
//! vCPU outside `KVM_RUN`; [`Vm::resume`] lets them continue.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use linux_loader::cmdline::Cmdline;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi::{self, AcpiConfig, VirtioMmioSlot};
use crate::boot::x86_64::{self as boot, layout};
use crate::bus::{Buses, SharedDevice};
use crate::devices::boot_timer::{self, BootTimer, BootTimerDevice, BootTimes, Milestone, TimedWriter};
use crate::devices::i8042::{self, I8042};
use crate::devices::serial::io::register_com1;
use crate::devices::serial::{SerialDevice, SerialOut};
use crate::devices::virtio::mmio::{reg, window_address, MmioTransport};
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
use crate::devices::{Device, IrqLine};
use crate::hypervisor::kvm::{KvmHypervisor, KvmVm};
use crate::hypervisor::{CpuSetup, Hypervisor, Vcpu, Vm as _, VmConfig};
use crate::memory::{create_guest_memory, VIRTIO_MMIO_SIZE};
use crate::vcpu::{kick_until, spawn_with, ThreadInit, VcpuControl, VcpuError, VcpuHandle, VcpuRunner, VcpuStop};

/// GSI of COM1 (ISA IRQ 4).
pub const SERIAL_GSI: u32 = 4;
/// GSI of virtio-mmio slot 0; slot n uses `FIRST_VIRTIO_GSI + n`.
pub const FIRST_VIRTIO_GSI: u32 = 5;
/// Number of virtio-mmio slots (GSIs 5..=23 of the 24-pin IOAPIC).
pub const MAX_VIRTIO_SLOTS: usize = (acpi::IOAPIC_PINS - FIRST_VIRTIO_GSI) as usize;
/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 254;
/// How long [`Vm::pause`] waits for the vCPUs to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the boot vCPU enters.
pub enum BootSource {
    /// A Linux kernel by the 64-bit boot protocol (`Documentation/arch/x86/boot.rst`).
    Linux {
        /// ELF `vmlinux` or bzImage.
        kernel: PathBuf,
        /// Optional initramfs (cpio, possibly compressed).
        initramfs: Option<PathBuf>,
        /// Kernel command line (the builder may append `virtio_mmio.device=` entries).
        cmdline: String,
    },
    /// 64-bit code copied to `entry` and entered directly in long mode with
    /// identity paging (tests and benchmarks).
    Raw {
        /// Machine code.
        code: Vec<u8>,
        /// Guest physical load and entry address.
        entry: u64,
    },
}

impl std::fmt::Debug for BootSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BootSource::Linux { kernel, initramfs, cmdline } => f
                .debug_struct("Linux")
                .field("kernel", kernel)
                .field("initramfs", initramfs)
                .field("cmdline", cmdline)
                .finish(),
            BootSource::Raw { code, entry } => {
                f.debug_struct("Raw").field("len", &code.len()).field("entry", entry).finish()
            }
        }
    }
}

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (ACPI S5 via the sleep control register).
    PoweredOff,
    /// The guest asked for a reset (i8042 0xFE, ACPI reset register, KVM
    /// reset event). The VMM decides whether to boot again.
    Reset,
    /// Triple fault (KVM_EXIT_SHUTDOWN) or a shutdown system event.
    Shutdown,
    /// A vCPU executed `HLT` without an in-kernel irqchip (tiny guests only;
    /// with the irqchip, HLT waits in the kernel for an interrupt).
    Halted,
    /// [`Vm::stop`] was called (or the `Vm` dropped) before the guest ended.
    Stopped,
    /// KVM could not go on: emulation failure, entry failure, unhandled exit
    /// or a failing ioctl; the text names the vCPU, the reason and the
    /// register state.
    InternalError(String),
    /// The guest reported a crash (KVM_SYSTEM_EVENT_CRASH) or a VMM vCPU
    /// thread panicked.
    Panicked(String),
}

/// Errors building or driving a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error("VM configuration: {0}")]
    Config(String),
    /// Opening or programming KVM failed.
    #[error(transparent)]
    Hypervisor(#[from] crate::hypervisor::HypervisorError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// Kernel, initramfs, boot structures.
    #[error(transparent)]
    Boot(#[from] crate::boot::BootError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// Device registration.
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
    /// Reading the kernel / initramfs, eventfds, threads.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// vCPU thread start.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// [`Vm::run`] twice, [`Vm::pause`] before run, and the like.
    #[error("VM state: {0}")]
    State(String),
}

/// Configuration of a [`Vm`]; see the setters for defaults.
pub struct VmBuilder {
    boot: BootSource,
    mem_mib: u64,
    vcpus: u8,
    serial_out: Option<SerialOut>,
    devices: Vec<Box<dyn VirtioDevice>>,
    acpi: bool,
    virtio_cmdline: bool,
    irqchip: bool,
    ioeventfd: bool,
    timer: Option<Arc<BootTimer>>,
    pio: Vec<(u16, u16, SharedDevice)>,
}

impl std::fmt::Debug for VmBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBuilder")
            .field("boot", &self.boot)
            .field("mem_mib", &self.mem_mib)
            .field("vcpus", &self.vcpus)
            .field("devices", &self.devices.len())
            .field("acpi", &self.acpi)
            .field("virtio_cmdline", &self.virtio_cmdline)
            .field("irqchip", &self.irqchip)
            .finish_non_exhaustive()
    }
}

impl VmBuilder {
    /// A builder booting `boot` with 256 MiB, 1 vCPU, serial output
    /// discarded, no virtio devices, ACPI on, in-kernel irqchip on,
    /// ioeventfd on.
    pub fn new(boot: BootSource) -> Self {
        VmBuilder {
            boot,
            mem_mib: 256,
            vcpus: 1,
            serial_out: None,
            devices: Vec::new(),
            acpi: true,
            virtio_cmdline: false,
            irqchip: true,
            ioeventfd: true,
            timer: None,
            pio: Vec::new(),
        }
    }

    /// Guest RAM in MiB.
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.mem_mib = mib;
        self
    }

    /// Number of vCPUs (1..=254; more than one needs the irqchip).
    pub fn vcpus(mut self, n: u8) -> Self {
        self.vcpus = n;
        self
    }

    /// Where the guest's COM1 output goes (a log file, a pipe, a
    /// [`crate::devices::serial::CaptureWriter`]).
    pub fn serial_output(mut self, out: SerialOut) -> Self {
        self.serial_out = Some(out);
        self
    }

    /// Put `dev` in the next virtio-mmio slot (slot n: window
    /// 0xD000_0000 + n * 0x1000, GSI 5 + n).
    pub fn virtio_device(mut self, dev: Box<dyn VirtioDevice>) -> Self {
        self.devices.push(dev);
        self
    }

    /// Write ACPI tables (default on). Without them a Linux guest needs
    /// `virtio_mmio.device=` entries ([`VmBuilder::virtio_cmdline`]) and
    /// sees one CPU and the PIC only (no MP table is written).
    pub fn acpi(mut self, on: bool) -> Self {
        self.acpi = on;
        self
    }

    /// Append `virtio_mmio.device=4K@<base>:<gsi>` for every slot to the
    /// command line (default off; for kernels without ACPI, e.g. the
    /// minimal guest kernel). Format: kernel-parameters.txt, `virtio_mmio.device`.
    pub fn virtio_cmdline(mut self, on: bool) -> Self {
        self.virtio_cmdline = on;
        self
    }

    /// In-kernel PIC/IOAPIC/LAPIC + PIT (default on; Linux needs it). Off:
    /// `HLT` exits to the VMM ([`VmExit::Halted`]), no interrupts.
    pub fn irqchip(mut self, on: bool) -> Self {
        self.irqchip = on;
        self
    }

    /// Bind QueueNotify registers with KVM_IOEVENTFD (default on).
    pub fn ioeventfd(mut self, on: bool) -> Self {
        self.ioeventfd = on;
        self
    }

    /// Record boot milestones into `timer` (default: a new one measuring
    /// from [`boot_timer::process_start`]).
    pub fn boot_timer(mut self, timer: Arc<BootTimer>) -> Self {
        self.timer = Some(timer);
        self
    }

    /// An extra port-I/O device at `[base, base + len)` (debug ports in tests).
    pub fn pio_device(mut self, base: u16, len: u16, dev: SharedDevice) -> Self {
        self.pio.push((base, len, dev));
        self
    }

    fn validate(&self) -> Result<(), VmError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(VmError::Config(format!("{} vCPUs (1..={MAX_VCPUS})", self.vcpus)));
        }
        if self.vcpus > 1 && !self.irqchip {
            return Err(VmError::Config("more than one vCPU needs the in-kernel irqchip".into()));
        }
        if self.devices.len() > MAX_VIRTIO_SLOTS {
            return Err(VmError::Config(format!("{} virtio devices (at most {MAX_VIRTIO_SLOTS})", self.devices.len())));
        }
        if self.mem_mib < 16 || self.mem_mib > (1 << 20) {
            return Err(VmError::Config(format!("{} MiB of memory (16..=1048576)", self.mem_mib)));
        }
        Ok(())
    }

    /// The virtio-mmio slots for `n` devices.
    pub fn slots(n: usize) -> Vec<VirtioMmioSlot> {
        (0..n)
            .map(|i| VirtioMmioSlot {
                base: window_address(i as u32).0,
                size: VIRTIO_MMIO_SIZE,
                gsi: FIRST_VIRTIO_GSI + i as u32,
            })
            .collect()
    }

    /// `virtio_mmio.device=` entries for `slots`.
    pub fn virtio_cmdline_entries(slots: &[VirtioMmioSlot]) -> Vec<String> {
        slots.iter().map(|s| format!("virtio_mmio.device={}K@{:#x}:{}", s.size / 1024, s.base, s.gsi)).collect()
    }

    /// Assemble the machine (nothing runs yet).
    ///
    /// Errors: [`VmError`] naming the failing step.
    pub fn build(self) -> Result<Vm, VmError> {
        self.validate()?;
        let timer = self.timer.clone().unwrap_or_else(|| Arc::new(BootTimer::default()));
        let hv = KvmHypervisor::new()?;
        let kvm = hv.create_vm(&VmConfig { irqchip: self.irqchip })?;
        let mem = create_guest_memory(self.mem_mib << 20)?;
        kvm.add_guest_memory(&mem)?;
        let slots = Self::slots(self.devices.len());

        // Boot structures.
        let state = match &self.boot {
            BootSource::Raw { code, entry } => {
                mem.write_slice(code, GuestAddress(*entry)).map_err(|_| {
                    VmError::Config(format!("raw code of {} bytes does not fit at {entry:#x}", code.len()))
                })?;
                boot::setup_long_mode(&mem, GuestAddress(*entry))?
            }
            BootSource::Linux { kernel, initramfs, cmdline } => {
                let mut f = File::open(kernel).map_err(|e| VmError::Io(format!("open {}", kernel.display()), e))?;
                let loaded = boot::kernel::load_kernel(&mem, &mut f)?;
                let initrd = match initramfs {
                    Some(p) => {
                        let mut f = File::open(p).map_err(|e| VmError::Io(format!("open {}", p.display()), e))?;
                        Some(boot::kernel::load_initrd(&mem, &loaded, &mut f)?)
                    }
                    None => None,
                };
                let mut c = Cmdline::new(layout::CMDLINE_MAX).map_err(|e| VmError::Config(e.to_string()))?;
                let mut parts: Vec<String> = Vec::new();
                if !cmdline.trim().is_empty() {
                    parts.push(cmdline.trim().to_string());
                }
                if self.virtio_cmdline {
                    parts.extend(Self::virtio_cmdline_entries(&slots));
                }
                if !parts.is_empty() {
                    c.insert_str(parts.join(" ")).map_err(|e| VmError::Config(format!("command line: {e}")))?;
                }
                let rsdp = if self.acpi {
                    let cfg = AcpiConfig { vcpus: self.vcpus, serial: true, virtio: slots.clone() };
                    Some(acpi::write_acpi_tables(&mem, &cfg)?.rsdp)
                } else {
                    None
                };
                boot::configure_linux_boot_with_acpi(&mem, &loaded, &c, initrd, rsdp)?
            }
        };
        if self.acpi && matches!(self.boot, BootSource::Raw { .. }) {
            let cfg = AcpiConfig { vcpus: self.vcpus, serial: true, virtio: slots.clone() };
            acpi::write_acpi_tables(&mem, &cfg)?;
        }

        // Devices.
        let irq = |what: &str| IrqLine::new().map_err(|e| VmError::Io(format!("eventfd for {what}"), e));
        let mut buses = Buses::default();
        let serial_irq = irq("serial")?;
        let out: SerialOut = self.serial_out.unwrap_or_else(|| Box::new(std::io::sink()));
        let serial =
            Arc::new(Mutex::new(SerialDevice::new(serial_irq.clone(), Box::new(TimedWriter::new(out, timer.clone())))));
        register_com1(&mut buses.pio, serial.clone())?;
        i8042::io::register(&mut buses.pio, Arc::new(Mutex::new(I8042::new())))?;
        acpi::power::register(&mut buses.pio, Arc::new(Mutex::new(acpi::power::AcpiPmDevice::default())))?;
        boot_timer::io::register(&mut buses.pio, Arc::new(Mutex::new(BootTimerDevice::new(timer.clone()))))?;
        for (base, len, dev) in self.pio {
            buses.pio.insert(u64::from(base), u64::from(len), dev)?;
        }
        if kvm.has_irqchip() {
            kvm.register_irqfd(serial_irq.eventfd(), SERIAL_GSI)?;
        }
        let mut transports = Vec::new();
        let mut notify: Vec<(EventFd, usize, u32)> = Vec::new();
        let mut ioeventfd_errors = Vec::new();
        for (i, (dev, slot)) in self.devices.into_iter().zip(&slots).enumerate() {
            let line = irq("virtio")?;
            if kvm.has_irqchip() {
                kvm.register_irqfd(line.eventfd(), slot.gsi)?;
            }
            let nqueues = dev.queue_max_sizes().len();
            let t = Arc::new(Mutex::new(MmioTransport::new(dev, mem.clone(), Arc::new(VirtioInterrupt::new(line)))));
            buses.mmio.insert(slot.base, slot.size, t.clone())?;
            if self.ioeventfd {
                for q in 0..nqueues as u32 {
                    let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Io("eventfd for ioeventfd".into(), e))?;
                    match kvm.register_ioeventfd(&evt, slot.base + reg::QUEUE_NOTIFY, q) {
                        Ok(()) => notify.push((evt, i, q)),
                        Err(e) => ioeventfd_errors.push(e.to_string()),
                    }
                }
            }
            transports.push(t);
        }

        // vCPUs.
        let setup = CpuSetup { vcpus: self.vcpus };
        let mut vcpus = Vec::new();
        for id in 0..self.vcpus {
            let mut v = kvm.create_vcpu(id)?;
            v.configure_cpu(&setup)?;
            if id == 0 {
                v.set_boot_state(&state)?;
            }
            vcpus.push(v);
        }
        timer.mark(Milestone::VmBuilt);
        Ok(Vm {
            kvm,
            mem,
            buses: Arc::new(buses),
            pending_vcpus: vcpus,
            handles: Vec::new(),
            control: Arc::new(VcpuControl::new()),
            exit: Arc::new(ExitSlot::default()),
            timer,
            serial,
            transports,
            notify,
            notifier: None,
            ioeventfd_errors,
            finished: None,
            vcpu_thread_init: None,
        })
    }
}

#[derive(Default)]
struct ExitSlot {
    exit: Mutex<Option<VmExit>>,
    cond: Condvar,
}

impl ExitSlot {
    fn set(&self, e: VmExit) {
        let mut g = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(e);
        }
        drop(g);
        self.cond.notify_all();
    }
    fn get(&self) -> Option<VmExit> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn wait(&self, timeout: Option<Duration>) -> Option<VmExit> {
        let g = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        let g = match timeout {
            None => self.cond.wait_while(g, |e| e.is_none()).unwrap_or_else(|p| p.into_inner()),
            Some(t) => self.cond.wait_timeout_while(g, t, |e| e.is_none()).unwrap_or_else(|p| p.into_inner()).0,
        };
        g.clone()
    }
}

/// Map one vCPU loop result to the VM's exit; `None` for a requested stop.
pub fn exit_of(id: u8, r: &Result<VcpuStop, VcpuError>) -> Option<VmExit> {
    Some(match r {
        Ok(VcpuStop::Stopped) => return None,
        Ok(VcpuStop::Halted) => VmExit::Halted,
        Ok(VcpuStop::Reset) => VmExit::Reset,
        Ok(VcpuStop::PoweredOff) => VmExit::PoweredOff,
        Ok(VcpuStop::Shutdown) => VmExit::Shutdown,
        Ok(VcpuStop::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_CRASH)) => {
            VmExit::Panicked(format!("vCPU {id}: guest crash event (KVM_SYSTEM_EVENT_CRASH)"))
        }
        Ok(VcpuStop::SystemEvent(n)) => VmExit::InternalError(format!("vCPU {id}: unhandled system event {n}")),
        Err(VcpuError::Thread(m)) => VmExit::Panicked(format!("vCPU {id}: {m}")),
        Err(e) => VmExit::InternalError(format!("vCPU {id}: {e}")),
    })
}

struct Notifier {
    stop: EventFd,
    join: JoinHandle<()>,
}

/// A machine built by [`VmBuilder`].
pub struct Vm {
    kvm: KvmVm,
    mem: GuestMemoryMmap,
    buses: Arc<Buses>,
    pending_vcpus: Vec<crate::hypervisor::kvm::KvmVcpu>,
    handles: Vec<VcpuHandle>,
    control: Arc<VcpuControl>,
    exit: Arc<ExitSlot>,
    timer: Arc<BootTimer>,
    serial: Arc<Mutex<SerialDevice>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    notify: Vec<(EventFd, usize, u32)>,
    notifier: Option<Notifier>,
    ioeventfd_errors: Vec<String>,
    finished: Option<VmExit>,
    vcpu_thread_init: Option<ThreadInit>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &(self.pending_vcpus.len() + self.handles.len()))
            .field("virtio", &self.transports.len())
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

const NOTIFY_STOP_TOKEN: u64 = u64::MAX;

fn notifier_loop(epoll: Epoll, notify: Vec<(EventFd, usize, u32)>, transports: Vec<Arc<Mutex<MmioTransport>>>) {
    let mut events = vec![EpollEvent::default(); notify.len() + 1];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(_) => return,
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == NOTIFY_STOP_TOKEN {
                return;
            }
            let Some((evt, slot, queue)) = notify.get(token as usize) else { continue };
            if evt.read().is_err() {
                continue;
            }
            if let Some(t) = transports.get(*slot) {
                if let Ok(mut t) = t.lock() {
                    t.write(reg::QUEUE_NOTIFY, &queue.to_le_bytes());
                }
            }
        }
    }
}

impl Vm {
    /// Start the vCPU threads (and the queue-notification thread).
    ///
    /// Errors: [`VmError::State`] when already started; [`VmError::Vcpu`] /
    /// [`VmError::Io`] when a thread cannot start (the VM is then stopped).
    pub fn run(&mut self) -> Result<(), VmError> {
        if self.pending_vcpus.is_empty() {
            return Err(VmError::State("already started".into()));
        }
        if !self.notify.is_empty() {
            let io = |e| VmError::Io("queue notifier".into(), e);
            let epoll = Epoll::new().map_err(io)?;
            let stop = EventFd::new(EFD_NONBLOCK).map_err(io)?;
            epoll
                .ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, NOTIFY_STOP_TOKEN))
                .map_err(io)?;
            for (i, (evt, _, _)) in self.notify.iter().enumerate() {
                epoll
                    .ctl(ControlOperation::Add, evt.as_raw_fd(), EpollEvent::new(EventSet::IN, i as u64))
                    .map_err(io)?;
            }
            let notify = std::mem::take(&mut self.notify);
            let transports = self.transports.clone();
            let join = std::thread::Builder::new()
                .name("virtio-notify".into())
                .spawn(move || notifier_loop(epoll, notify, transports))
                .map_err(io)?;
            self.notifier = Some(Notifier { stop, join });
        }
        for (id, vcpu) in std::mem::take(&mut self.pending_vcpus).into_iter().enumerate() {
            let id = id as u8;
            let runner = VcpuRunner::new(vcpu, self.buses.clone())
                .with_control(self.control.clone())
                .with_boot_timer(self.timer.clone())
                .with_memory(self.mem.clone())
                .with_thread_init(self.vcpu_thread_init.clone());
            let exit = self.exit.clone();
            let control = self.control.clone();
            let on_exit = move |r: &Result<VcpuStop, VcpuError>| {
                if let Some(e) = exit_of(id, r) {
                    exit.set(e);
                    control.request_stop();
                }
            };
            match spawn_with(runner, &format!("vcpu{id}"), on_exit) {
                Ok(h) => self.handles.push(h),
                Err(e) => {
                    self.exit.set(VmExit::InternalError(format!("starting vCPU {id}: {e}")));
                    self.finish();
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// Sets what every vCPU thread runs first, before guest code (see
    /// [`ThreadInit`]); takes effect for threads [`Vm::run`] starts later.
    pub fn set_vcpu_thread_init(&mut self, init: ThreadInit) {
        self.vcpu_thread_init = Some(init);
    }

    /// Stop everything still running and join the threads; returns the exit.
    fn finish(&mut self) -> VmExit {
        if let Some(e) = &self.finished {
            return e.clone();
        }
        self.control.request_stop();
        kick_until(&self.handles, || false);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
        if let Some(n) = self.notifier.take() {
            let _ = n.stop.write(1);
            let _ = n.join.join();
        }
        self.exit.set(VmExit::Stopped);
        let e = self.exit.get().unwrap_or(VmExit::Stopped);
        self.finished = Some(e.clone());
        e
    }

    /// Block until the VM ends; stops the remaining vCPUs and returns why.
    /// Returns at once (with [`VmExit::Stopped`]) when never started.
    pub fn wait(&mut self) -> VmExit {
        if self.handles.is_empty() {
            return self.finish();
        }
        self.exit.wait(None);
        self.finish()
    }

    /// [`Vm::wait`] for at most `timeout`; `None` while the VM still runs.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<VmExit> {
        if self.finished.is_some() || self.handles.is_empty() {
            return Some(self.finish());
        }
        self.exit.wait(Some(timeout))?;
        Some(self.finish())
    }

    /// Stop the VM (vCPUs kicked out of the guest, threads joined) and
    /// return how it ended ([`VmExit::Stopped`] unless the guest ended first).
    pub fn stop(&mut self) -> VmExit {
        self.finish()
    }

    /// Park every vCPU outside the guest; returns once all are parked.
    ///
    /// Errors: [`VmError::State`] when not running, or when the vCPUs did not
    /// park within [`PAUSE_TIMEOUT`] (the pause request stays; call
    /// [`Vm::resume`] or [`Vm::stop`]).
    pub fn pause(&self) -> Result<(), VmError> {
        if self.handles.is_empty() || self.finished.is_some() || self.control.stop_requested() {
            return Err(VmError::State("not running".into()));
        }
        self.control.request_pause();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut timed_out = false;
        kick_until(&self.handles, || {
            let live = self.handles.iter().filter(|h| !h.is_finished()).count();
            if Instant::now() > deadline {
                timed_out = true;
                return true;
            }
            self.control.parked() >= live
        });
        if timed_out {
            return Err(VmError::State(format!("vCPUs did not park within {PAUSE_TIMEOUT:?}")));
        }
        Ok(())
    }

    /// Let paused vCPUs continue.
    pub fn resume(&self) {
        self.control.resume();
    }

    /// True while paused (all live vCPUs parked).
    pub fn is_paused(&self) -> bool {
        self.control.pause_requested()
    }

    /// How the VM ended, if it has (without waiting).
    pub fn exit(&self) -> Option<VmExit> {
        self.finished.clone().or_else(|| self.exit.get())
    }

    /// Boot milestones so far (µs since process start).
    pub fn boot_times(&self) -> BootTimes {
        self.timer.times()
    }

    /// The shared boot-milestone recorder.
    pub fn boot_timer(&self) -> &Arc<BootTimer> {
        &self.timer
    }

    /// Queue host input for the guest's COM1 (returns bytes accepted).
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        self.serial.lock().map(|mut s| s.enqueue_input(bytes)).unwrap_or(0)
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The virtio-mmio transports, in slot order.
    pub fn virtio_transports(&self) -> &[Arc<Mutex<MmioTransport>>] {
        &self.transports
    }

    /// KVM_IOEVENTFD registrations that failed (those queues use MMIO exits).
    pub fn ioeventfd_errors(&self) -> &[String] {
        &self.ioeventfd_errors
    }

    /// The underlying KVM VM.
    pub fn kvm(&self) -> &KvmVm {
        &self.kvm
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
#[path = "vm_tests.rs"]
mod tests;
