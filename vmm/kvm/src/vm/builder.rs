//! [`VmBuilder`]: a machine configuration (boot source, memory, vCPUs,
//! devices) and its assembly into a [`Vm`]: KVM VM, guest RAM, kernel +
//! initramfs or raw test code, ACPI tables, legacy devices, virtio-mmio
//! slots with their irqfds and ioeventfds, vCPUs.

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use linux_loader::cmdline::Cmdline;
use vm_memory::{Bytes, GuestAddress};

use super::notifier::register_ioeventfds;
use super::{ExitSlot, Vm, VmError, FIRST_VIRTIO_GSI, MAX_VCPUS, MAX_VIRTIO_SLOTS, SERIAL_GSI};
use crate::acpi::{self, AcpiConfig, VirtioMmioSlot};
use crate::boot::x86_64::{self as boot, layout};
use crate::bus::{Buses, SharedDevice};
use crate::devices::boot_timer::{self, BootTimer, BootTimerDevice, Milestone, TimedWriter};
use crate::devices::i8042::{self, I8042};
use crate::devices::serial::io::register_com1;
use crate::devices::serial::{SerialDevice, SerialOut};
use crate::devices::virtio::mmio::{window_address, MmioTransport};
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
use crate::devices::IrqLine;
use crate::hypervisor::kvm::KvmHypervisor;
use crate::hypervisor::{CpuSetup, Hypervisor, Vcpu, Vm as _, VmConfig};
use crate::memory::{create_guest_memory, VIRTIO_MMIO_SIZE};
use crate::vcpu::VcpuControl;

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
    /// `HLT` exits to the VMM ([`VmExit::Halted`](super::VmExit::Halted)), no interrupts.
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
        let mut notify = Vec::new();
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
                register_ioeventfds(&kvm, i, slot.base, nqueues, &mut notify, &mut ioeventfd_errors)?;
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
