//! The zero page (`struct boot_params`) and command line, per
//! `Documentation/arch/x86/boot.rst` ("THE REAL-MODE KERNEL HEADER", "THE
//! 64-bit BOOT PROTOCOL") and `Documentation/arch/x86/zero-page.rst`.

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::kernel::InitrdPlacement;
use super::layout;
use crate::boot::BootError;

/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;

/// `hdr.boot_flag` magic (0xAA55).
pub const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `hdr.header` magic ("HdrS").
pub const HDR_MAGIC: u32 = 0x5372_6448;
/// `hdr.type_of_loader` for a loader without an assigned id.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `hdr.kernel_alignment` used for images without a setup header (16 MiB).
pub const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x100_0000;

/// One e820 map entry: `[addr, addr + size)` of `type_` (1 RAM, 2 reserved).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start (guest physical, bytes).
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// e820 type.
    pub type_: u32,
}

/// The e820 map for RAM `ranges` (guest physical start, length in bytes), as
/// produced by [`crate::memory::ram_ranges`]: the range starting at 0 is split
/// into low RAM `[0, EBDA_START)` and `[HIMEM_START, end)` (the legacy
/// 640 KiB - 1 MiB hole is left out); other ranges are RAM as given.
pub fn e820_map(ranges: &[(u64, u64)]) -> Vec<E820Entry> {
    let mut out = Vec::new();
    for &(start, len) in ranges {
        let end = start.saturating_add(len);
        if start < layout::HIMEM_START {
            let low_end = end.min(layout::EBDA_START);
            if low_end > start {
                out.push(E820Entry { addr: start, size: low_end - start, type_: E820_RAM });
            }
            if end > layout::HIMEM_START {
                out.push(E820Entry { addr: layout::HIMEM_START, size: end - layout::HIMEM_START, type_: E820_RAM });
            }
        } else if len > 0 {
            out.push(E820Entry { addr: start, size: len, type_: E820_RAM });
        }
    }
    out
}

/// Write `cmdline` NUL-terminated at [`layout::CMDLINE_ADDR`]; returns its
/// length without the NUL.
///
/// Errors: [`BootError::Cmdline`] when it is invalid or needs more than
/// [`layout::CMDLINE_MAX`] bytes with the NUL; [`BootError::GuestWrite`].
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &Cmdline) -> Result<u32, BootError> {
    let s = cmdline.as_cstring().map_err(|e| BootError::Cmdline(e.to_string()))?;
    let bytes = s.as_bytes_with_nul();
    if bytes.len() > layout::CMDLINE_MAX {
        return Err(BootError::Cmdline(format!("{} bytes with NUL, limit {}", bytes.len(), layout::CMDLINE_MAX)));
    }
    mem.write_slice(bytes, GuestAddress(layout::CMDLINE_ADDR))
        .map_err(|_| BootError::GuestWrite { what: "command line", addr: layout::CMDLINE_ADDR })?;
    Ok((bytes.len() - 1) as u32)
}

/// Build the zero page: the image's `setup_header` (bzImage) or a minimal
/// one (ELF vmlinux: boot flag, "HdrS", 16 MiB alignment), with the loader
/// type, command line pointer/size, initramfs location and the e820 map
/// filled in.
///
/// Errors: [`BootError::Layout`] for more than 128 e820 entries or an
/// initramfs above 4 GiB (the 32-bit `ramdisk_image` field).
pub fn build_boot_params(
    header: Option<setup_header>,
    cmdline_len: u32,
    initrd: Option<InitrdPlacement>,
    e820: &[E820Entry],
) -> Result<boot_params, BootError> {
    let hdr = match header {
        Some(h) => h,
        None => setup_header {
            boot_flag: BOOT_FLAG_MAGIC,
            header: HDR_MAGIC,
            kernel_alignment: DEFAULT_KERNEL_ALIGNMENT,
            ..Default::default()
        },
    };
    let mut params = boot_params { hdr, ..Default::default() };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len;
    if let Some(rd) = initrd {
        let image = u32::try_from(rd.addr.0)
            .map_err(|_| BootError::Layout(format!("initramfs at {:#x} is above 4 GiB", rd.addr.0)))?;
        let size = u32::try_from(rd.size)
            .map_err(|_| BootError::Layout(format!("initramfs of {} bytes is too large", rd.size)))?;
        params.hdr.ramdisk_image = image;
        params.hdr.ramdisk_size = size;
    }
    if e820.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(BootError::Layout(format!("{} e820 entries, limit {}", e820.len(), E820_MAX_ENTRIES_ZEROPAGE)));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.type_ };
    }
    params.e820_entries = e820.len() as u8;
    Ok(params)
}

/// Write `params` at [`layout::ZERO_PAGE_ADDR`].
///
/// Errors: [`BootError::GuestWrite`].
pub fn write_boot_params(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), BootError> {
    mem.write_obj(*params, GuestAddress(layout::ZERO_PAGE_ADDR))
        .map_err(|_| BootError::GuestWrite { what: "zero page", addr: layout::ZERO_PAGE_ADDR })
}
