//! The KVM backend on kvm-ioctls / kvm-bindings.
//!
//! Also knows about the machines we build on: `/dev/kvm` may be backed by
//! the paging-based nested hypervisor `kvm_pvm` ([`is_nested_pvm`]), under
//! which small 64-bit guests run but stock Linux kernels do not.

use std::path::Path;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, kvm_pit_config, kvm_regs, kvm_segment, kvm_userspace_memory_region,
    CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuExit as KvmExit, VcpuFd, VmFd};
use vm_memory::{GuestAddress, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{CpuSetup, Hypervisor, HypervisorError, Result, Vcpu, VcpuExit, Vm, VmConfig};
use crate::boot::x86_64::cpu::{boot_msrs, filter_cpuid, set_lapic_lints, CpuidEntry, CpuidParams};
use crate::boot::x86_64::regs::{X86BootState, X86Segment};

/// Path of the KVM device.
pub const KVM_PATH: &str = "/dev/kvm";
/// Address of the 3-page TSS region KVM needs on Intel (just below 4 GiB,
/// inside the MMIO gap, clear of the virtio-mmio windows).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// True when `/dev/kvm` exists.
pub fn kvm_available() -> bool {
    Path::new(KVM_PATH).exists()
}

/// True when KVM is the paging-based nested hypervisor (`kvm_pvm`): tiny
/// guests run, unmodified Linux kernels do not boot.
pub fn is_nested_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

fn call_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> HypervisorError {
    move |e| HypervisorError::Call { op, errno: e.errno() }
}

/// An open `/dev/kvm` plus the CPUID it supports.
pub struct KvmHypervisor {
    kvm: Kvm,
    supported_cpuid: CpuId,
}

impl std::fmt::Debug for KvmHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmHypervisor").finish_non_exhaustive()
    }
}

impl KvmHypervisor {
    /// Open `/dev/kvm` and read KVM_GET_SUPPORTED_CPUID.
    ///
    /// Errors: [`HypervisorError::NotAvailable`] when the device is missing
    /// or cannot be opened; [`HypervisorError::Call`].
    pub fn new() -> Result<Self> {
        if !kvm_available() {
            return Err(HypervisorError::NotAvailable(format!("{KVM_PATH} does not exist")));
        }
        let kvm =
            Kvm::new().map_err(|e| HypervisorError::NotAvailable(format!("open {KVM_PATH}: errno {}", e.errno())))?;
        let supported_cpuid =
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(call_err("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(KvmHypervisor { kvm, supported_cpuid })
    }
}

impl Hypervisor for KvmHypervisor {
    type Vm = KvmVm;

    fn create_vm(&self, config: &VmConfig) -> Result<KvmVm> {
        let fd = self.kvm.create_vm().map_err(call_err("KVM_CREATE_VM"))?;
        if config.irqchip {
            fd.set_tss_address(KVM_TSS_ADDRESS).map_err(call_err("KVM_SET_TSS_ADDR"))?;
            fd.create_irq_chip().map_err(call_err("KVM_CREATE_IRQCHIP"))?;
            let pit = kvm_pit_config { flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
            fd.create_pit2(pit).map_err(call_err("KVM_CREATE_PIT2"))?;
        }
        Ok(KvmVm {
            tsc_deadline: config.irqchip && self.kvm.check_extension(Cap::TscDeadlineTimer),
            irqchip: config.irqchip,
            fd,
            cpuid: self.supported_cpuid.clone(),
            memory: Mutex::new(Vec::new()),
        })
    }
}

/// A KVM VM.
pub struct KvmVm {
    fd: VmFd,
    cpuid: CpuId,
    irqchip: bool,
    tsc_deadline: bool,
    /// Mappings handed to KVM, kept alive as long as the VM; index = slot.
    memory: Mutex<Vec<Arc<MmapRegion>>>,
}

impl std::fmt::Debug for KvmVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVm").finish_non_exhaustive()
    }
}

impl KvmVm {
    /// The VM file descriptor (irqfd / ioeventfd registration).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}

impl Vm for KvmVm {
    type Vcpu = KvmVcpu;

    fn add_memory_region(&self, guest_base: GuestAddress, mapping: Arc<MmapRegion>) -> Result<u32> {
        let mut regions = self.memory.lock().map_err(|_| HypervisorError::Invalid("memory list poisoned".into()))?;
        let slot = u32::try_from(regions.len()).map_err(|_| HypervisorError::Invalid("too many slots".into()))?;
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_base.0,
            memory_size: mapping.size() as u64,
            userspace_addr: mapping.as_ptr() as u64,
        };
        // SAFETY: `mapping` is a live anonymous/file mapping of `size` bytes;
        // we keep an Arc to it in `self.memory` for the lifetime of the VM, so
        // the host memory KVM maps stays valid while the guest can touch it.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(call_err("KVM_SET_USER_MEMORY_REGION"))?;
        regions.push(mapping);
        Ok(slot)
    }

    fn create_vcpu(&self, id: u8) -> Result<KvmVcpu> {
        let fd = self.fd.create_vcpu(u64::from(id)).map_err(call_err("KVM_CREATE_VCPU"))?;
        Ok(KvmVcpu {
            fd,
            id,
            cpuid: self.cpuid.clone(),
            irqchip: self.irqchip,
            tsc_deadline: self.tsc_deadline,
            cpu_configured: false,
        })
    }

    fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<()> {
        if !self.irqchip {
            return Err(HypervisorError::Invalid("irqfd needs the in-kernel irqchip".into()));
        }
        self.fd.register_irqfd(evt, gsi).map_err(call_err("KVM_IRQFD"))
    }

    fn register_ioeventfd(&self, evt: &EventFd, addr: u64, datamatch: u32) -> Result<()> {
        self.fd.register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch).map_err(call_err("KVM_IOEVENTFD"))
    }
}

/// A KVM vCPU.
pub struct KvmVcpu {
    fd: VcpuFd,
    id: u8,
    cpuid: CpuId,
    irqchip: bool,
    tsc_deadline: bool,
    cpu_configured: bool,
}

impl std::fmt::Debug for KvmVcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVcpu").field("id", &self.id).finish_non_exhaustive()
    }
}

fn to_kvm_segment(s: &X86Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: s.unusable,
        padding: 0,
    }
}

impl KvmVcpu {
    /// The vCPU file descriptor.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn set_cpuid(&mut self, vcpus: u8) -> Result<()> {
        let mut entries: Vec<CpuidEntry> = self
            .cpuid
            .as_slice()
            .iter()
            .map(|e| CpuidEntry {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect();
        filter_cpuid(&mut entries, &CpuidParams { vcpu_id: self.id, vcpus, tsc_deadline: self.tsc_deadline });
        let raw: Vec<kvm_cpuid_entry2> = entries
            .iter()
            .map(|e| kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                ..Default::default()
            })
            .collect();
        let cpuid = CpuId::from_entries(&raw).map_err(|_| HypervisorError::Invalid("too many CPUID entries".into()))?;
        self.fd.set_cpuid2(&cpuid).map_err(call_err("KVM_SET_CPUID2"))
    }

    fn set_msrs(&mut self, msrs: &[(u32, u64)]) -> Result<()> {
        let entries: Vec<kvm_msr_entry> =
            msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        let list = Msrs::from_entries(&entries).map_err(|_| HypervisorError::Invalid("too many MSRs".into()))?;
        let n = self.fd.set_msrs(&list).map_err(call_err("KVM_SET_MSRS"))?;
        if n != entries.len() {
            let failed = entries.get(n).map_or(0, |e| e.index);
            return Err(HypervisorError::Invalid(format!(
                "KVM_SET_MSRS set {n} of {}; MSR {failed:#x} refused",
                entries.len()
            )));
        }
        Ok(())
    }

    fn setup_lapic(&mut self) -> Result<()> {
        let mut lapic = self.fd.get_lapic().map_err(call_err("KVM_GET_LAPIC"))?;
        // SAFETY: `regs` is a plain [c_char; 1024]; viewing it as bytes of the
        // same length is sound (same size, alignment 1, no invalid values).
        let bytes = unsafe { std::slice::from_raw_parts_mut(lapic.regs.as_mut_ptr().cast::<u8>(), lapic.regs.len()) };
        set_lapic_lints(bytes);
        self.fd.set_lapic(&lapic).map_err(call_err("KVM_SET_LAPIC"))
    }
}

impl Vcpu for KvmVcpu {
    fn configure_cpu(&mut self, setup: &CpuSetup) -> Result<()> {
        self.set_cpuid(setup.vcpus.max(1))?;
        self.set_msrs(&boot_msrs())?;
        if self.irqchip {
            self.setup_lapic()?;
        }
        self.cpu_configured = true;
        Ok(())
    }

    fn set_boot_state(&mut self, st: &X86BootState) -> Result<()> {
        if !self.cpu_configured {
            self.set_cpuid(1)?;
        }
        let mut sregs = self.fd.get_sregs().map_err(call_err("KVM_GET_SREGS"))?;
        sregs.cs = to_kvm_segment(&st.cs);
        let ds = to_kvm_segment(&st.ds);
        sregs.ds = ds;
        sregs.es = ds;
        sregs.fs = ds;
        sregs.gs = ds;
        sregs.ss = ds;
        sregs.tr = to_kvm_segment(&st.tr);
        sregs.gdt.base = st.gdt.base;
        sregs.gdt.limit = st.gdt.limit;
        sregs.idt.base = st.idt.base;
        sregs.idt.limit = st.idt.limit;
        sregs.cr0 = st.cr0;
        sregs.cr3 = st.cr3;
        sregs.cr4 = st.cr4;
        sregs.efer = st.efer;
        self.fd.set_sregs(&sregs).map_err(call_err("KVM_SET_SREGS"))?;
        let regs =
            kvm_regs { rip: st.rip, rsp: st.rsp, rbp: st.rbp, rsi: st.rsi, rflags: st.rflags, ..Default::default() };
        self.fd.set_regs(&regs).map_err(call_err("KVM_SET_REGS"))?;
        // x87 control word and MXCSR at their reset values (SDM Vol. 1 8.1.5, 10.2.3).
        let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
        self.fd.set_fpu(&fpu).map_err(call_err("KVM_SET_FPU"))
    }

    fn run(&mut self) -> Result<VcpuExit<'_>> {
        let run_ptr: *const kvm_bindings::kvm_run = self.fd.get_kvm_run();
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                KvmExit::IoIn(port, data) => VcpuExit::IoIn { port, data },
                KvmExit::IoOut(port, data) => VcpuExit::IoOut { port, data },
                KvmExit::MmioRead(addr, data) => VcpuExit::MmioRead { addr, data },
                KvmExit::MmioWrite(addr, data) => VcpuExit::MmioWrite { addr, data },
                KvmExit::Hlt => VcpuExit::Hlt,
                KvmExit::Shutdown => VcpuExit::Shutdown,
                KvmExit::SystemEvent(kind, _) => VcpuExit::SystemEvent(kind),
                KvmExit::Intr => VcpuExit::Interrupted,
                KvmExit::FailEntry(reason, _) => VcpuExit::FailEntry { reason },
                KvmExit::InternalError => {
                    // SAFETY: `run_ptr` points into the vCPU's kvm_run mapping,
                    // which lives as long as `self.fd`; this exit variant holds
                    // no reference into it, and with exit reason
                    // KVM_EXIT_INTERNAL_ERROR `internal` is the union member
                    // the kernel filled. Plain-old-data copy.
                    let internal = unsafe { (*run_ptr).__bindgen_anon_1.internal };
                    let n = (internal.ndata as usize).min(internal.data.len());
                    VcpuExit::InternalError { suberror: internal.suberror, data: internal.data[..n].to_vec() }
                }
                KvmExit::Unsupported(n) => VcpuExit::Other(n),
                _ => VcpuExit::Other(u32::MAX),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(VcpuExit::Interrupted),
            Err(e) => Err(HypervisorError::Call { op: "KVM_RUN", errno: e.errno() }),
        }
    }

    fn set_immediate_exit(&mut self, exit: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(exit));
    }

    fn instruction_pointer(&self) -> Result<u64> {
        self.fd.get_regs().map(|r| r.rip).map_err(call_err("KVM_GET_REGS"))
    }

    fn debug_state(&self) -> String {
        let mut out = String::new();
        match self.fd.get_regs() {
            Ok(r) => out.push_str(&format!(
                "rip={:#x} rsp={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rflags={:#x}",
                r.rip, r.rsp, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rflags
            )),
            Err(e) => out.push_str(&format!("KVM_GET_REGS errno {}", e.errno())),
        }
        if let Ok(s) = self.fd.get_sregs() {
            out.push_str(&format!(
                " cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
                s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector
            ));
        }
        if let Some(p) = self.instruction_pointer().ok().and_then(|rip| self.translate(rip)) {
            out.push_str(&format!(" rip_phys={p:#x}"));
        }
        out
    }

    fn translate(&self, gva: u64) -> Option<u64> {
        let t = self.fd.translate_gva(gva).ok()?;
        (t.valid != 0).then_some(t.physical_address)
    }
}
