//! Fixed guest physical addresses of the x86_64 boot structures (bytes).
//! Values follow the conventions of `Documentation/arch/x86/boot.rst` and
//! the rust-vmm reference VMMs.

/// GDT base.
pub const GDT_ADDR: u64 = 0x500;
/// IDT base (an empty IDT; the kernel installs its own).
pub const IDT_ADDR: u64 = 0x520;
/// `struct boot_params` ("zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer (grows down, below the page tables).
pub const BOOT_STACK: u64 = 0x8ff0;
/// PML4 table.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of [`PD_COUNT`] page directories (2 MiB pages).
pub const PD_ADDR: u64 = 0xb000;
/// Number of page directories: 4 x 1 GiB = the first 4 GiB identity-mapped,
/// which covers RAM below the MMIO gap and the gap itself.
pub const PD_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Capacity of the command line buffer including the NUL (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX: usize = 2048;
/// Start of the Extended BIOS Data Area; low RAM in the e820 map ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory (1 MiB), where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Offset of the 64-bit entry point (`startup_64`) from a bzImage's load address
/// (boot.rst, "64-bit BOOT PROTOCOL").
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Default `initrd_addr_max` for boot protocol <= 2.02 (boot.rst).
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
