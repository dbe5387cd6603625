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
//! [`IrqLine`](crate::devices::IrqLine) eventfd is bound to its GSI with KVM_IRQFD, so raising it
//! never leaves the kernel. Queue notifications: each virtio queue's
//! QueueNotify register is bound with KVM_IOEVENTFD (datamatch = queue
//! index) to an eventfd; one notifier thread ("virtio-notify") waits on all
//! of them with epoll and calls the transport's QueueNotify handler, so a
//! guest kick costs no exit to userspace on the vCPU thread. Where
//! KVM_IOEVENTFD fails, the MMIO-exit path handles the same write.
//!
//! Files: the configuration and assembly are in `vm/builder.rs`
//! ([`VmBuilder`], [`BootSource`]), the ioeventfd notifier thread in
//! `vm/notifier.rs`, the running machine ([`Vm`]) here.
//!
//! Lifecycle: [`VmBuilder::build`] -> [`Vm::run`] (starts the vCPU threads)
//! -> [`Vm::wait`] (blocks until the guest powers off, resets, triple-faults,
//! fails, or [`Vm::stop`] is called) -> [`VmExit`]. [`Vm::pause`] parks every
//! vCPU outside `KVM_RUN`; [`Vm::resume`] lets them continue.

mod builder;
mod notifier;

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;

pub use self::builder::{BootSource, VmBuilder};
use self::notifier::{Notifier, QueueEventFd};
use crate::acpi;
use crate::bus::Buses;
use crate::devices::boot_timer::{BootTimer, BootTimes};
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::hypervisor::kvm::KvmVm;
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
    notify: Vec<QueueEventFd>,
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
            let notify = std::mem::take(&mut self.notify);
            let notifier = Notifier::start(notify, self.transports.clone())
                .map_err(|e| VmError::Io("queue notifier".into(), e))?;
            self.notifier = Some(notifier);
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
            n.stop();
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
mod tests;
