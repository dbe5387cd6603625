//! The hypervisor boundary: the few operations the engine needs from an
//! accelerator, so that a second backend (Apple's Hypervisor.framework) can
//! sit beside [`kvm`] without touching the vCPU loop or the devices.
//!
//! Shape: [`Hypervisor::create_vm`] -> [`Vm`]; [`Vm::add_memory_region`] maps
//! guest RAM; [`Vm::create_vcpu`] -> [`Vcpu`]; [`Vcpu::set_boot_state`] loads
//! the architectural entry state; [`Vcpu::run`] enters the guest and returns a
//! [`VcpuExit`] that borrows the backend's exit data (I/O buffers the VMM
//! fills for reads).

use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::x86_64::regs::X86BootState;

pub mod kvm;
#[cfg(test)]
mod kvm_tests;

/// Errors from a hypervisor backend. Carries the failing operation and the
/// OS error number where there is one.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The accelerator device is not present (e.g. no `/dev/kvm`).
    #[error("hypervisor not available: {0}")]
    NotAvailable(String),
    /// An accelerator call failed; `op` names the call (e.g. `KVM_CREATE_VM`).
    #[error("{op} failed: errno {errno}")]
    Call {
        /// The failing operation.
        op: &'static str,
        /// The OS error number.
        errno: i32,
    },
    /// A request the backend cannot express (bad slot count, region too large...).
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// Result alias for hypervisor calls.
pub type Result<T> = std::result::Result<T, HypervisorError>;

/// Options for [`Hypervisor::create_vm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Create the in-kernel interrupt controllers (x86: PIC, IOAPIC, LAPIC)
    /// and the PIT. Needed to boot Linux; tiny test guests run without.
    pub irqchip: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig { irqchip: true }
    }
}

/// Why a vCPU left guest mode. Borrowed data lives in the backend's shared
/// run structure and is valid until the next [`Vcpu::run`].
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// `in` from `port`; fill `data` (1, 2 or 4 bytes) before the next run.
    IoIn {
        /// Port number.
        port: u16,
        /// Buffer the guest reads, little-endian.
        data: &'a mut [u8],
    },
    /// `out` of `data` (1, 2 or 4 bytes) to `port`.
    IoOut {
        /// Port number.
        port: u16,
        /// Bytes written by the guest, little-endian.
        data: &'a [u8],
    },
    /// Read of unbacked guest physical address `addr`; fill `data` (1..=8 bytes).
    MmioRead {
        /// Guest physical address.
        addr: u64,
        /// Buffer the guest reads, little-endian.
        data: &'a mut [u8],
    },
    /// Write of `data` (1..=8 bytes) to unbacked guest physical address `addr`.
    MmioWrite {
        /// Guest physical address.
        addr: u64,
        /// Bytes written by the guest, little-endian.
        data: &'a [u8],
    },
    /// The guest executed `HLT` with no in-kernel irqchip to wait on.
    Hlt,
    /// Triple fault or an explicit shutdown request.
    Shutdown,
    /// A system event (KVM_SYSTEM_EVENT_*: 1 shutdown, 2 reset, 3 crash).
    SystemEvent(u32),
    /// `run` returned early because a signal arrived or immediate-exit was
    /// requested (EINTR / EAGAIN); no guest state changed.
    Interrupted,
    /// The hardware refused VM entry; `reason` is the hardware code.
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// The accelerator could not emulate an instruction or hit another
    /// internal error (KVM_EXIT_INTERNAL_ERROR; `suberror` 1 = emulation
    /// failure, 2 = simultaneous exceptions, 3 = event delivery failure,
    /// 4 = unexpected exit reason; `data` = the `internal.data` words).
    InternalError {
        /// KVM_INTERNAL_ERROR_* code.
        suberror: u32,
        /// Extra words the kernel supplied (at most 16).
        data: Vec<u64>,
    },
    /// Any other exit; the number is the backend's raw exit reason.
    Other(u32),
}

/// An accelerator that can create VMs.
pub trait Hypervisor {
    /// The VM type of this backend.
    type Vm: Vm;
    /// Create an empty VM (no memory, no vCPUs).
    ///
    /// Errors: [`HypervisorError::Call`] when the accelerator refuses.
    fn create_vm(&self, config: &VmConfig) -> Result<Self::Vm>;
}

/// A VM: guest physical address space plus vCPUs.
pub trait Vm: Send + Sync {
    /// The vCPU type of this backend.
    type Vcpu: Vcpu;

    /// Map `mapping` (host memory) at guest physical `guest_base`. The VM keeps
    /// a reference to the mapping so the host memory outlives the mapping in
    /// the guest. Returns the slot number used.
    ///
    /// Errors: [`HypervisorError::Call`] (e.g. overlap with an existing slot).
    fn add_memory_region(&self, guest_base: GuestAddress, mapping: Arc<MmapRegion>) -> Result<u32>;

    /// Map every region of `mem` (see [`Vm::add_memory_region`]).
    fn add_guest_memory(&self, mem: &GuestMemoryMmap) -> Result<()> {
        for region in mem.iter() {
            self.add_memory_region(region.start_addr(), region.get_mmap())?;
        }
        Ok(())
    }

    /// Create vCPU number `id` (0-based; also its APIC id on x86).
    fn create_vcpu(&self, id: u8) -> Result<Self::Vcpu>;

    /// True when the VM has in-kernel interrupt controllers
    /// ([`VmConfig::irqchip`]).
    fn has_irqchip(&self) -> bool;

    /// Route `evt` to interrupt `gsi`: each write to the eventfd asserts
    /// the GSI (edge) in the in-kernel IOAPIC/PIC (KVM_IRQFD).
    ///
    /// Errors: [`HypervisorError::Invalid`] without an irqchip;
    /// [`HypervisorError::Call`].
    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<()>;

    /// Signal `evt` instead of exiting when the guest writes the 32-bit
    /// value `datamatch` to guest physical `addr` (KVM_IOEVENTFD, MMIO).
    ///
    /// Errors: [`HypervisorError::Call`].
    fn register_ioeventfd(&self, evt: &EventFd, addr: u64, datamatch: u32) -> Result<()>;
}

/// What a vCPU's CPU set-up depends on beyond its id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuSetup {
    /// Number of vCPUs in the VM (CPUID topology, leaf 1 counts).
    pub vcpus: u8,
}

/// One virtual CPU. `run` must be called from the thread that owns it.
pub trait Vcpu: Send {
    /// Program the CPU model: CPUID filtered by
    /// [`crate::boot::x86_64::cpu::filter_cpuid`], the boot MSRs
    /// ([`crate::boot::x86_64::cpu::boot_msrs`]) and, with an irqchip, the
    /// local APIC's LINT0 = ExtINT / LINT1 = NMI.
    ///
    /// Errors: [`HypervisorError::Call`].
    fn configure_cpu(&mut self, setup: &CpuSetup) -> Result<()>;

    /// Load the x86_64 entry state (registers, segments, control registers,
    /// EFER) built by [`crate::boot::x86_64`]. Sets a one-vCPU CPUID first
    /// when [`Vcpu::configure_cpu`] has not run (long mode needs CPUID.LM).
    fn set_boot_state(&mut self, state: &X86BootState) -> Result<()>;

    /// Enter the guest until the next exit.
    ///
    /// Errors: [`HypervisorError::Call`] for failures other than EINTR/EAGAIN
    /// (those are reported as [`VcpuExit::Interrupted`]).
    fn run(&mut self) -> Result<VcpuExit<'_>>;

    /// Make the next (or current, if a signal interrupts it) `run` return
    /// [`VcpuExit::Interrupted`] without entering the guest.
    fn set_immediate_exit(&mut self, exit: bool);

    /// Read the instruction pointer (for diagnostics and tests).
    fn instruction_pointer(&self) -> Result<u64>;

    /// A one-line register dump for diagnostics (RIP, RSP, CR0/3/4, EFER,
    /// CS, and RIP's guest physical address when it translates).
    fn debug_state(&self) -> String;

    /// Translate guest virtual `gva` through the vCPU's current paging
    /// (diagnostics); `None` when unmapped or on error.
    fn translate(&self, gva: u64) -> Option<u64>;
}
