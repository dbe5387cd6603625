//! x86_64 boot, following the Linux x86 boot protocol
//! (`Documentation/arch/x86/boot.rst`, "64-bit BOOT PROTOCOL") and the
//! Intel SDM Vol. 3A (2.5 control registers, 3.4.5 segment descriptors,
//! 4.5 4-level paging, 9.8.5 initializing IA-32e mode).
//!
//! Fixed guest physical layout of the boot structures (all in the first MiB):
//!
//! | address | what |
//! |---|---|
//! | [`layout::GDT_ADDR`] 0x500 | GDT: null, null, `__BOOT_CS` 0x10, `__BOOT_DS` 0x18, TSS 0x20 |
//! | [`layout::IDT_ADDR`] 0x520 | empty IDT (limit 7) |
//! | [`layout::ZERO_PAGE_ADDR`] 0x7000 | `struct boot_params` |
//! | [`layout::BOOT_STACK`] 0x8ff0 | initial RSP |
//! | [`layout::PML4_ADDR`] 0x9000 | PML4, then PDPT at 0xa000, four page directories at 0xb000-0xefff |
//! | [`layout::CMDLINE_ADDR`] 0x20000 | kernel command line, NUL-terminated, max [`layout::CMDLINE_MAX`] |
//! | [`layout::HIMEM_START`] 0x100000 | kernel (bzImage protected-mode part or ELF segments) |

pub mod cpu;
pub mod kernel;
pub mod layout;
pub mod paging;
pub mod regs;
pub mod zeropage;

#[cfg(test)]
mod tests;

use linux_loader::cmdline::Cmdline;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use self::kernel::{InitrdPlacement, LoadedKernel};
use self::regs::X86BootState;
use super::BootError;

/// Prepare a guest that enters 64-bit code at `entry` directly: writes the
/// GDT, IDT and identity page tables for the first 4 GiB, and returns the
/// vCPU state (long mode, paging on, RSP = [`layout::BOOT_STACK`], RSI = 0).
///
/// Errors: [`BootError::GuestWrite`] when memory lacks the first 64 KiB.
pub fn setup_long_mode(mem: &GuestMemoryMmap, entry: GuestAddress) -> Result<X86BootState, BootError> {
    regs::write_gdt_and_idt(mem)?;
    paging::write_identity_page_tables(mem)?;
    Ok(X86BootState::long_mode(entry.0, layout::BOOT_STACK, 0))
}

/// Prepare a Linux boot by the 64-bit boot protocol: GDT, page tables,
/// command line at [`layout::CMDLINE_ADDR`], zero page at
/// [`layout::ZERO_PAGE_ADDR`] (setup header, e820 map from `mem`, initramfs
/// location), and the vCPU state entering `kernel.entry` with RSI pointing
/// at the zero page.
///
/// Errors: [`BootError::Cmdline`] for a command line longer than
/// [`layout::CMDLINE_MAX`] - 1 bytes; [`BootError::GuestWrite`] when memory is
/// too small.
pub fn configure_linux_boot(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<InitrdPlacement>,
) -> Result<X86BootState, BootError> {
    configure_linux_boot_with_acpi(mem, kernel, cmdline, initrd, None)
}

/// [`configure_linux_boot`], also recording the ACPI RSDP address in
/// `boot_params.acpi_rsdp_addr` (zero-page offset 0x070,
/// `Documentation/arch/x86/zero-page.rst`; boot protocol 2.14) when
/// `rsdp` is given.
///
/// Errors: as [`configure_linux_boot`].
pub fn configure_linux_boot_with_acpi(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<InitrdPlacement>,
    rsdp: Option<u64>,
) -> Result<X86BootState, BootError> {
    regs::write_gdt_and_idt(mem)?;
    paging::write_identity_page_tables(mem)?;
    let cmdline_len = zeropage::write_cmdline(mem, cmdline)?;
    let e820 = zeropage::e820_map(&crate::memory::ram_ranges_of(mem));
    let mut params = zeropage::build_boot_params(kernel.setup_header, cmdline_len, initrd, &e820)?;
    if let Some(addr) = rsdp {
        params.acpi_rsdp_addr = addr;
    }
    zeropage::write_boot_params(mem, &params)?;
    Ok(X86BootState::long_mode(kernel.entry.0, layout::BOOT_STACK, layout::ZERO_PAGE_ADDR))
}
