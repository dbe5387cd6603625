//! Per-vCPU architectural set-up beyond the entry registers: the CPUID the
//! guest sees, the boot MSRs, and the local APIC's LINT0/LINT1 pins.
//!
//! Everything here is pure data manipulation (no hypervisor calls) so it
//! can be unit-tested; [`crate::hypervisor::kvm`] applies it.
//!
//! References: Intel SDM Vol. 2A "CPUID" (leaves 1, 4, 6, 0xA, 0xB, 0x1F),
//! Vol. 3A 11.5.1 (LVT), Vol. 4 (MSR indices); the register set follows
//! what Firecracker and cloud-hypervisor program before entering Linux.

/// `kvm_cpuid_entry2.flags`: the entry depends on the subleaf (`index`).
pub const CPUID_FLAG_SIGNIFICANT_INDEX: u32 = 1;

/// One CPUID leaf/subleaf as the hypervisor reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidEntry {
    /// Leaf (EAX input).
    pub function: u32,
    /// Subleaf (ECX input), meaningful with [`CPUID_FLAG_SIGNIFICANT_INDEX`].
    pub index: u32,
    /// KVM flags.
    pub flags: u32,
    /// EAX output.
    pub eax: u32,
    /// EBX output.
    pub ebx: u32,
    /// ECX output.
    pub ecx: u32,
    /// EDX output.
    pub edx: u32,
}

/// What the guest CPUID depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidParams {
    /// This vCPU's index = APIC id = x2APIC id.
    pub vcpu_id: u8,
    /// vCPUs in the VM (all cores of one package, one thread per core).
    pub vcpus: u8,
    /// Advertise the TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER with an
    /// in-kernel LAPIC).
    pub tsc_deadline: bool,
}

/// CPUID bit positions used by [`filter_cpuid`] (SDM Vol. 2A Table 3-10/3-11).
pub mod bits {
    /// Leaf 1 ECX: VMX (hidden: no nested virtualization).
    pub const ECX_VMX: u32 = 5;
    /// Leaf 1 ECX: perfmon and debug capability MSR (hidden: no PMU).
    pub const ECX_PDCM: u32 = 15;
    /// Leaf 1 ECX: TSC-deadline timer mode.
    pub const ECX_TSC_DEADLINE: u32 = 24;
    /// Leaf 1 ECX: running under a hypervisor.
    pub const ECX_HYPERVISOR: u32 = 31;
    /// Leaf 1 EDX: multiple logical processors per package.
    pub const EDX_HTT: u32 = 28;
    /// Leaf 6 EAX: Turbo Boost.
    pub const LEAF6_EAX_TURBO: u32 = 1;
    /// Leaf 6 ECX: energy/performance bias (IA32_ENERGY_PERF_BIAS).
    pub const LEAF6_ECX_EPB: u32 = 3;
    /// Leaf 0x80000001 ECX: SVM (hidden: no nested virtualization).
    pub const EXT_ECX_SVM: u32 = 2;
    /// Leaf 1 ECX: CMPXCHG16B.
    pub const ECX_CX16: u32 = 13;
}

/// Which host quirks the guest CPUID works around.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuidPolicy {
    /// Hardware-backed KVM: only the filtering of [`filter_cpuid_with`].
    Host,
    /// The paging-based nested hypervisor `kvm_pvm`: additionally hide
    /// features whose instructions it cannot emulate (see
    /// [`NESTED_PVM_HIDDEN`]; best effort, see there).
    NestedPvm,
}

impl CpuidPolicy {
    /// [`CpuidPolicy::NestedPvm`] when `/sys/module/kvm_pvm` exists, else
    /// [`CpuidPolicy::Host`].
    pub fn for_host() -> Self {
        if crate::hypervisor::kvm::is_nested_pvm() {
            CpuidPolicy::NestedPvm
        } else {
            CpuidPolicy::Host
        }
    }
}

/// A CPU feature hidden under [`CpuidPolicy::NestedPvm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HiddenFeature {
    /// CPUID leaf.
    pub leaf: u32,
    /// CPUID subleaf.
    pub subleaf: u32,
    /// Output register: 'a', 'b', 'c' or 'd'.
    pub reg: char,
    /// Bit in that register.
    pub bit: u32,
    /// Linux's `X86_FEATURE_*` number (word * 32 + bit, 6.1 layout) for
    /// `clearcpuid=`; `None` when a named option (`noxsave`) clears it.
    pub linux_bit: Option<u16>,
    /// `/proc/cpuinfo` name.
    pub name: &'static str,
}

const fn hf(leaf: u32, reg: char, bit: u32, linux_bit: Option<u16>, name: &'static str) -> HiddenFeature {
    HiddenFeature { leaf, subleaf: 0, reg, bit, linux_bit, name }
}

/// Features hidden under [`CpuidPolicy::NestedPvm`]. kvm_pvm runs much of
/// a stock guest kernel through KVM's instruction emulator (as its log suggests:
/// "INTERNAL_ERROR in batch emul ... cpl=0"), which lacks `cmpxchg16b`, `xrstor`,
/// `popcnt`, FS/GS-base, `rdtscp`, `rdrand`/`rdseed`, PKU, BMI, ... Seen
/// failing in forced boots: `lock cmpxchg16b` (SLUB), `xrstor` (FPU init),
/// `popcnt` (`__bitmap_weight`); the rest are hidden before they fail.
///
/// CPUID is only a hint there: a guest's `cpuid` often runs natively and
/// returns the host's answer (XSAVE and POPCNT stayed visible to Linux),
/// so the same list goes onto the kernel command line
/// ([`nested_pvm_cmdline`]), which Linux always obeys.
pub const NESTED_PVM_HIDDEN: &[HiddenFeature] = &[
    hf(1, 'c', bits::ECX_CX16, Some(4 * 32 + 13), "cx16"),
    hf(1, 'c', 26, None, "xsave"), // `noxsave` (also drops AVX*)
    hf(1, 'c', 28, None, "avx"),
    hf(1, 'c', 23, Some(4 * 32 + 23), "popcnt"),
    hf(1, 'c', 30, Some(4 * 32 + 30), "rdrand"),
    hf(1, 'c', 17, Some(4 * 32 + 17), "pcid"),
    hf(1, 'c', 22, Some(4 * 32 + 22), "movbe"),
    hf(0x8000_0001, 'd', 27, Some(32 + 27), "rdtscp"),
    hf(0x8000_0001, 'c', 5, Some(6 * 32 + 5), "abm"),
    hf(7, 'b', 0, Some(9 * 32), "fsgsbase"),
    hf(7, 'b', 3, Some(9 * 32 + 3), "bmi1"),
    hf(7, 'b', 5, Some(9 * 32 + 5), "avx2"),
    hf(7, 'b', 8, Some(9 * 32 + 8), "bmi2"),
    hf(7, 'b', 10, Some(9 * 32 + 10), "invpcid"),
    hf(7, 'b', 18, Some(9 * 32 + 18), "rdseed"),
    hf(7, 'b', 20, Some(9 * 32 + 20), "smap"),
    hf(7, 'b', 23, Some(9 * 32 + 23), "clflushopt"),
    hf(7, 'b', 24, Some(9 * 32 + 24), "clwb"),
    hf(7, 'c', 3, Some(16 * 32 + 3), "pku"),
    hf(7, 'c', 4, Some(16 * 32 + 4), "ospke"),
    hf(7, 'c', 22, Some(16 * 32 + 22), "rdpid"),
];

/// Kernel command-line options matching [`NESTED_PVM_HIDDEN`]:
/// `noxsave clearcpuid=<X86_FEATURE numbers>` (Linux 6.1 takes numbers).
pub fn nested_pvm_cmdline() -> String {
    let bits: Vec<String> = NESTED_PVM_HIDDEN.iter().filter_map(|f| f.linux_bit).map(|b| b.to_string()).collect();
    format!("noxsave clearcpuid={}", bits.join(","))
}

/// Leaf 0xB / 0x1F level types (SDM Vol. 2A, CPUID leaf 0BH, ECX[15:8]).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

fn set_bit(v: &mut u32, bit: u32, on: bool) {
    if on {
        *v |= 1 << bit;
    } else {
        *v &= !(1 << bit);
    }
}

/// Bits needed to number `n` items (ceil(log2 n)); 0 for n <= 1.
pub fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// The topology subleaves of leaf `function` (0xB or 0x1F) for `p`: SMT
/// level (1 thread per core), core level (`vcpus` cores), then an invalid
/// level that ends the enumeration; EDX is the x2APIC id in each.
pub fn topology_leaves(function: u32, p: &CpuidParams) -> [CpuidEntry; 3] {
    let id = u32::from(p.vcpu_id);
    let n = u32::from(p.vcpus.max(1));
    let e = |index: u32, eax: u32, ebx: u32, level_type: u32| CpuidEntry {
        function,
        index,
        flags: CPUID_FLAG_SIGNIFICANT_INDEX,
        eax,
        ebx,
        ecx: index | (level_type << 8),
        edx: id,
    };
    [e(0, 0, 1, LEVEL_SMT), e(1, bits_for(n), n, LEVEL_CORE), e(2, 0, 0, 0)]
}

/// Turn the hypervisor's supported CPUID into what vCPU `p.vcpu_id` sees:
/// only clears bits the host offered, except for the hypervisor bit, HTT,
/// the TSC-deadline bit (when `p.tsc_deadline`) and the topology fields.
///
/// * leaf 1: hypervisor bit set; APIC id in EBX\[31:24\]; logical processor
///   count in EBX\[23:16\] and HTT when more than one vCPU; VMX and PDCM
///   cleared; TSC-deadline per `p`;
/// * leaf 4: cores per package (EAX\[31:26\]) and threads sharing each cache
///   (EAX\[25:14\]: 1 for L1/L2, all vCPUs for L3);
/// * leaf 6: Turbo Boost and EPB cleared;
/// * leaf 0xA: zeroed (no architectural PMU);
/// * leaves 0xB and 0x1F: rewritten by [`topology_leaves`] (0x1F only if
///   the host had it);
/// * leaf 0x80000001: SVM cleared;
/// * under `kvm_pvm` ([`CpuidPolicy::for_host`]): [`NESTED_PVM_HIDDEN`] cleared.
pub fn filter_cpuid(entries: &mut Vec<CpuidEntry>, p: &CpuidParams) {
    filter_cpuid_with(entries, p, CpuidPolicy::for_host());
}

/// [`filter_cpuid`] with an explicit [`CpuidPolicy`].
pub fn filter_cpuid_with(entries: &mut Vec<CpuidEntry>, p: &CpuidParams, policy: CpuidPolicy) {
    let n = u32::from(p.vcpus.max(1));
    let max_basic = entries.iter().find(|e| e.function == 0).map_or(0, |e| e.eax);
    let had_1f = entries.iter().any(|e| e.function == 0x1f);
    entries.retain(|e| e.function != 0xb && e.function != 0x1f);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(p.vcpu_id) << 24) | ((n.min(255)) << 16);
                set_bit(&mut e.ecx, bits::ECX_HYPERVISOR, true);
                set_bit(&mut e.ecx, bits::ECX_VMX, false);
                set_bit(&mut e.ecx, bits::ECX_PDCM, false);
                set_bit(&mut e.ecx, bits::ECX_TSC_DEADLINE, p.tsc_deadline);
                set_bit(&mut e.edx, bits::EDX_HTT, n > 1);
            }
            4 => {
                let level = (e.eax >> 5) & 0x7;
                if e.eax & 0x1f != 0 {
                    let sharing = if level >= 3 { n - 1 } else { 0 };
                    e.eax = (e.eax & 0x3fff) | ((sharing.min(0xfff)) << 14) | (((n - 1).min(0x3f)) << 26);
                }
            }
            6 => {
                set_bit(&mut e.eax, bits::LEAF6_EAX_TURBO, false);
                set_bit(&mut e.ecx, bits::LEAF6_ECX_EPB, false);
            }
            0xa => {
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
            }
            0x8000_0001 => set_bit(&mut e.ecx, bits::EXT_ECX_SVM, false),
            _ => {}
        }
    }
    if policy == CpuidPolicy::NestedPvm {
        for h in NESTED_PVM_HIDDEN {
            for e in entries.iter_mut().filter(|e| e.function == h.leaf && e.index == h.subleaf) {
                let reg = match h.reg {
                    'a' => &mut e.eax,
                    'b' => &mut e.ebx,
                    'c' => &mut e.ecx,
                    _ => &mut e.edx,
                };
                set_bit(reg, h.bit, false);
            }
        }
    }
    if max_basic >= 0xb {
        entries.extend(topology_leaves(0xb, p));
    }
    if had_1f && max_basic >= 0x1f {
        entries.extend(topology_leaves(0x1f, p));
    }
}

/// MSR indices (SDM Vol. 4, Table 2-2).
pub mod msr {
    /// Time-stamp counter.
    pub const IA32_TSC: u32 = 0x10;
    /// SYSENTER code segment.
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    /// SYSENTER stack pointer.
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    /// SYSENTER instruction pointer.
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    /// Miscellaneous enables.
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    /// IA32_MISC_ENABLE bit 0: fast-strings enable.
    pub const MISC_ENABLE_FAST_STRING: u64 = 1;
    /// Default memory type and MTRR enables.
    pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
    /// IA32_MTRR_DEF_TYPE bit 11: MTRRs enabled.
    pub const MTRR_ENABLE: u64 = 1 << 11;
    /// Memory type write-back.
    pub const MTRR_MEM_TYPE_WB: u64 = 6;
    /// SYSCALL target segments.
    pub const MSR_STAR: u32 = 0xc000_0081;
    /// 64-bit SYSCALL target.
    pub const MSR_LSTAR: u32 = 0xc000_0082;
    /// Compatibility-mode SYSCALL target.
    pub const MSR_CSTAR: u32 = 0xc000_0083;
    /// SYSCALL RFLAGS mask.
    pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    /// SWAPGS target.
    pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// The MSRs written before a vCPU first runs, as (index, value): the
/// SYSENTER/SYSCALL MSRs and KERNEL_GS_BASE cleared, TSC 0, fast strings
/// on, MTRRs enabled with write-back as the default type (so the guest
/// does not run uncached).
pub fn boot_msrs() -> Vec<(u32, u64)> {
    use msr::*;
    vec![
        (IA32_SYSENTER_CS, 0),
        (IA32_SYSENTER_ESP, 0),
        (IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (IA32_TSC, 0),
        (IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (IA32_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// Offset of LVT LINT0 in the local APIC register page (SDM Vol. 3A Table 11-1).
pub const APIC_LVT0: usize = 0x350;
/// Offset of LVT LINT1.
pub const APIC_LVT1: usize = 0x360;
/// LVT delivery mode ExtINT (SDM Vol. 3A 11.5.1, bits 10:8 = 111b).
pub const APIC_MODE_EXTINT: u32 = 0x7;
/// LVT delivery mode NMI (100b).
pub const APIC_MODE_NMI: u32 = 0x4;

fn set_delivery_mode(regs: &mut [u8], off: usize, mode: u32) {
    let Some(b) = regs.get_mut(off..off + 4) else { return };
    let mut v = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    v = (v & !0x700) | (mode << 8);
    b.copy_from_slice(&v.to_le_bytes());
}

/// Program the LVT of a local APIC register page (`KVM_GET_LAPIC` layout,
/// 1024 bytes): LINT0 = ExtINT (the legacy PIC's INTR), LINT1 = NMI, as
/// the PC/AT wiring and the MADT's Local APIC NMI entry say. Short buffers
/// are left alone.
pub fn set_lapic_lints(regs: &mut [u8]) {
    set_delivery_mode(regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_delivery_mode(regs, APIC_LVT1, APIC_MODE_NMI);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Vec<CpuidEntry> {
        let e = |function, index, eax, ebx, ecx, edx| CpuidEntry { function, index, flags: 0, eax, ebx, ecx, edx };
        vec![
            e(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            e(1, 0, 0x806f8, 0x0010_0800, 0x7ffa_3223 | (1 << 5), 0x0f8b_fbff & !(1 << 28)),
            e(4, 0, 0x1c00_4121, 0, 0, 0), // L1d: level 1, type 1
            e(4, 3, 0x1c03_c163, 0, 0, 0), // L3: level 3
            e(4, 4, 0, 0, 0, 0),           // end
            e(6, 0, 0x77, 0, 0x9, 0),
            e(0xa, 0, 0x0703_0105, 0, 0, 0x603),
            e(0xb, 0, 1, 2, 0x100, 7),
            e(0xb, 1, 7, 64, 0x201, 7),
            e(0x1f, 0, 1, 2, 0x100, 7),
            e(0x8000_0001, 0, 0, 0, 0x121 | (1 << 2), 0),
        ]
    }

    fn get(v: &[CpuidEntry], f: u32, i: u32) -> CpuidEntry {
        *v.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn leaf1_identity_and_hypervisor_bit() {
        let mut v = host();
        filter_cpuid_with(&mut v, &CpuidParams { vcpu_id: 3, vcpus: 4, tsc_deadline: true }, CpuidPolicy::Host);
        let l1 = get(&v, 1, 0);
        assert_eq!(l1.ebx >> 24, 3, "APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processors");
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor");
        assert_eq!(l1.ecx & (1 << 5), 0, "no VMX");
        assert_ne!(l1.ecx & (1 << 24), 0, "TSC deadline");
        assert_ne!(l1.edx & (1 << 28), 0, "HTT with 4 vCPUs");
        let mut v = host();
        filter_cpuid_with(&mut v, &CpuidParams { vcpu_id: 0, vcpus: 1, tsc_deadline: false }, CpuidPolicy::Host);
        let l1 = get(&v, 1, 0);
        assert_eq!((l1.ecx & (1 << 24), l1.edx & (1 << 28)), (0, 0));
        assert_eq!(get(&v, 0x8000_0001, 0).ecx & (1 << 2), 0, "no SVM");
    }

    #[test]
    fn topology_leaves_describe_one_package_of_n_cores() {
        let mut v = host();
        filter_cpuid_with(&mut v, &CpuidParams { vcpu_id: 5, vcpus: 6, tsc_deadline: false }, CpuidPolicy::Host);
        for f in [0xb, 0x1f] {
            let smt = get(&v, f, 0);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
            let core = get(&v, f, 1);
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5), "leaf {f:#x}");
            let end = get(&v, f, 2);
            assert_eq!((end.ebx, (end.ecx >> 8) & 0xff, end.edx), (0, 0, 5));
            assert!(v.iter().filter(|e| e.function == f).all(|e| e.flags & CPUID_FLAG_SIGNIFICANT_INDEX != 0));
            assert_eq!(v.iter().filter(|e| e.function == f).count(), 3, "host subleaves replaced");
        }
        // no 0x1F on hosts that lack it
        let mut v: Vec<CpuidEntry> = host().into_iter().filter(|e| e.function != 0x1f).collect();
        filter_cpuid_with(&mut v, &CpuidParams { vcpu_id: 0, vcpus: 1, tsc_deadline: false }, CpuidPolicy::Host);
        assert!(v.iter().all(|e| e.function != 0x1f));
        assert_eq!(get(&v, 0xb, 1).eax, 0);
    }

    #[test]
    fn cache_pmu_and_power_leaves() {
        let mut v = host();
        filter_cpuid_with(&mut v, &CpuidParams { vcpu_id: 0, vcpus: 4, tsc_deadline: false }, CpuidPolicy::Host);
        let l1d = get(&v, 4, 0);
        assert_eq!((l1d.eax >> 26, (l1d.eax >> 14) & 0xfff, l1d.eax & 0x3fff), (3, 0, 0x0121));
        let l3 = get(&v, 4, 3);
        assert_eq!((l3.eax >> 26, (l3.eax >> 14) & 0xfff), (3, 3));
        assert_eq!(get(&v, 4, 4).eax, 0, "terminator untouched");
        let pmu = get(&v, 0xa, 0);
        assert_eq!((pmu.eax, pmu.edx), (0, 0));
        let l6 = get(&v, 6, 0);
        assert_eq!((l6.eax & 2, l6.ecx & 8), (0, 0));
    }

    #[test]
    fn nested_pvm_policy_hides_unemulated_features_only_there() {
        let l7 = CpuidEntry { function: 7, eax: 0, ebx: u32::MAX, ecx: u32::MAX, edx: u32::MAX, ..Default::default() };
        let mut v = host();
        v.push(l7);
        let p = CpuidParams { vcpu_id: 0, vcpus: 1, tsc_deadline: false };
        filter_cpuid_with(&mut v, &p, CpuidPolicy::Host);
        assert_ne!(get(&v, 1, 0).ecx & (1 << bits::ECX_CX16), 0, "host keeps CX16");
        assert_eq!(get(&v, 7, 0).ebx, u32::MAX);
        let mut v = host();
        v.push(l7);
        filter_cpuid_with(&mut v, &p, CpuidPolicy::NestedPvm);
        let l1 = get(&v, 1, 0);
        assert_eq!(l1.ecx & (1 << bits::ECX_CX16 | 1 << 23 | 1 << 26), 0, "cx16, popcnt, xsave hidden");
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor bit still set");
        let l7 = get(&v, 7, 0);
        assert_eq!(l7.ebx & (1 << 0 | 1 << 20), 0, "fsgsbase, smap hidden");
        assert_ne!(l7.ebx & (1 << 7), 0, "smep kept");
        assert_eq!(l7.ecx & (1 << 3), 0, "pku hidden");
    }

    #[test]
    fn nested_pvm_cmdline_lists_linux_feature_numbers() {
        let c = nested_pvm_cmdline();
        assert!(c.starts_with("noxsave clearcpuid="), "{c}");
        let nums: Vec<u16> = c.rsplit('=').next().unwrap().split(',').map(|n| n.parse().unwrap()).collect();
        assert!(nums.contains(&141) && nums.contains(&151), "cx16 = 4*32+13, popcnt = 4*32+23: {c}");
        assert_eq!(nums.len(), NESTED_PVM_HIDDEN.iter().filter(|f| f.linux_bit.is_some()).count());
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9, 255].map(bits_for), [0, 1, 2, 2, 3, 3, 4, 8]);
        assert_eq!(bits_for(0), 0);
    }

    #[test]
    fn msrs_are_the_usual_boot_set() {
        let m = boot_msrs();
        let get = |i| m.iter().find(|(k, _)| *k == i).map(|(_, v)| *v);
        assert_eq!(get(msr::IA32_MISC_ENABLE), Some(1));
        assert_eq!(get(msr::IA32_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(get(msr::MSR_LSTAR), Some(0));
        assert_eq!(get(msr::IA32_TSC), Some(0));
        assert_eq!(m.len(), 11);
    }

    #[test]
    fn lapic_lints_get_extint_and_nmi() {
        let mut regs = vec![0u8; 1024];
        // masked, some vector bits set, fixed mode
        regs[APIC_LVT0..APIC_LVT0 + 4].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        regs[APIC_LVT1..APIC_LVT1 + 4].copy_from_slice(&0x0001_0300u32.to_le_bytes());
        set_lapic_lints(&mut regs);
        let rd = |o: usize| u32::from_le_bytes(regs[o..o + 4].try_into().unwrap());
        assert_eq!(rd(APIC_LVT0), 0x0001_0700);
        assert_eq!(rd(APIC_LVT1), 0x0001_0400);
        let mut short = vec![0u8; 0x352];
        set_lapic_lints(&mut short); // no panic
    }
}
