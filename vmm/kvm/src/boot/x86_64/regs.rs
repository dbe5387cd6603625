//! GDT and the architectural vCPU entry state for 64-bit mode (Intel SDM
//! Vol. 3A 3.4.5 "Segment Descriptors", 9.8.5 "Initializing IA-32e Mode";
//! boot.rst "64-bit BOOT PROTOCOL": `__BOOT_CS` = 0x10, `__BOOT_DS` = 0x18,
//! 4 GiB flat segments, interrupts off, RSI = zero page).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;
use crate::boot::BootError;

/// CR0.PE: protected mode enable.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.ET: extension type (hard-wired to 1 on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0.PG: paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PAE: physical address extension (required for long mode).
pub const CR4_PAE: u64 = 1 << 5;
/// EFER.LME: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set; IF (bit 9) stays clear.
pub const RFLAGS_RESERVED: u64 = 0x2;

/// Selector of the 64-bit code segment (`__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// Selector of the data segment (`__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;
/// Selector of the TSS.
pub const BOOT_TSS: u16 = 0x20;

/// Descriptor flags (access byte + G/D/L nibble) per SDM 3.4.5.
const CODE64_FLAGS: u16 = 0xa09b; // G, L, P, DPL0, S, type 0xb execute/read, accessed
const DATA_FLAGS: u16 = 0xc093; // G, D/B, P, DPL0, S, type 0x3 read/write, accessed
const TSS_FLAGS: u16 = 0x808b; // G, P, type 0xb busy 64-bit TSS

/// The GDT written at [`layout::GDT_ADDR`]: null, null, code 0x10, data 0x18, TSS 0x20.
pub const GDT: [u64; 5] =
    [0, 0, gdt_entry(CODE64_FLAGS, 0, 0xfffff), gdt_entry(DATA_FLAGS, 0, 0xfffff), gdt_entry(TSS_FLAGS, 0, 0xfffff)];

/// Encode a segment descriptor from `flags` (bits 0-7 access byte, bits
/// 12-15 G/DB/L/AVL), a 32-bit `base` and a 20-bit `limit` (SDM Figure 3-8).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << (56 - 24))
        | (((flags as u64) & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// A segment register as the hypervisor loads it (hidden part included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct X86Segment {
    /// Linear base address.
    pub base: u64,
    /// Limit in bytes (already scaled by the granularity bit).
    pub limit: u32,
    /// Selector value.
    pub selector: u16,
    /// Type field (4 bits).
    pub type_: u8,
    /// Present.
    pub present: u8,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operation size (D/B).
    pub db: u8,
    /// Descriptor type: 1 code/data, 0 system.
    pub s: u8,
    /// 64-bit code segment (L).
    pub l: u8,
    /// Granularity (4 KiB limit units).
    pub g: u8,
    /// Available for software.
    pub avl: u8,
    /// Unusable segment (null selector).
    pub unusable: u8,
}

impl X86Segment {
    /// Decode a GDT descriptor `entry` loaded through `selector` (SDM 3.4.5).
    pub fn from_gdt_entry(selector: u16, entry: u64) -> Self {
        let g = ((entry >> 55) & 1) as u8;
        let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
        let limit = if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit };
        X86Segment {
            base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
            limit,
            selector,
            type_: ((entry >> 40) & 0xf) as u8,
            present: ((entry >> 47) & 1) as u8,
            dpl: ((entry >> 45) & 3) as u8,
            db: ((entry >> 54) & 1) as u8,
            s: ((entry >> 44) & 1) as u8,
            l: ((entry >> 53) & 1) as u8,
            g,
            avl: ((entry >> 52) & 1) as u8,
            unusable: u8::from(((entry >> 47) & 1) == 0),
        }
    }
}

/// A descriptor table register (GDTR/IDTR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct X86DescriptorTable {
    /// Linear base.
    pub base: u64,
    /// Limit (size in bytes - 1).
    pub limit: u16,
}

/// Everything a vCPU needs to start executing 64-bit code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct X86BootState {
    /// Entry point (guest virtual = physical, identity-mapped).
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Frame pointer (set equal to RSP).
    pub rbp: u64,
    /// Zero page address for Linux, 0 otherwise.
    pub rsi: u64,
    /// RFLAGS (interrupts disabled).
    pub rflags: u64,
    /// Code segment.
    pub cs: X86Segment,
    /// Data segments DS, ES, FS, GS, SS share this descriptor.
    pub ds: X86Segment,
    /// Task register.
    pub tr: X86Segment,
    /// GDTR.
    pub gdt: X86DescriptorTable,
    /// IDTR.
    pub idt: X86DescriptorTable,
    /// CR0 (PE | ET | PG).
    pub cr0: u64,
    /// CR3: PML4 base.
    pub cr3: u64,
    /// CR4 (PAE).
    pub cr4: u64,
    /// IA32_EFER (LME | LMA).
    pub efer: u64,
}

impl X86BootState {
    /// The 64-bit entry state for the tables written by
    /// [`write_gdt_and_idt`] and [`super::paging::write_identity_page_tables`].
    pub fn long_mode(rip: u64, rsp: u64, rsi: u64) -> Self {
        X86BootState {
            rip,
            rsp,
            rbp: rsp,
            rsi,
            rflags: RFLAGS_RESERVED,
            cs: X86Segment::from_gdt_entry(BOOT_CS, GDT[usize::from(BOOT_CS >> 3)]),
            ds: X86Segment::from_gdt_entry(BOOT_DS, GDT[usize::from(BOOT_DS >> 3)]),
            tr: X86Segment::from_gdt_entry(BOOT_TSS, GDT[usize::from(BOOT_TSS >> 3)]),
            gdt: X86DescriptorTable { base: layout::GDT_ADDR, limit: (std::mem::size_of_val(&GDT) - 1) as u16 },
            idt: X86DescriptorTable { base: layout::IDT_ADDR, limit: 7 },
            cr0: CR0_PE | CR0_ET | CR0_PG,
            cr3: layout::PML4_ADDR,
            cr4: CR4_PAE,
            efer: EFER_LME | EFER_LMA,
        }
    }
}

/// Write [`GDT`] at [`layout::GDT_ADDR`] and a zeroed 8-byte IDT at
/// [`layout::IDT_ADDR`].
///
/// Errors: [`BootError::GuestWrite`] when those addresses are not RAM.
pub fn write_gdt_and_idt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, entry) in GDT.iter().enumerate() {
        let addr = layout::GDT_ADDR + (i as u64) * 8;
        mem.write_obj(entry.to_le(), GuestAddress(addr)).map_err(|_| BootError::GuestWrite { what: "GDT", addr })?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_ADDR))
        .map_err(|_| BootError::GuestWrite { what: "IDT", addr: layout::IDT_ADDR })
}
