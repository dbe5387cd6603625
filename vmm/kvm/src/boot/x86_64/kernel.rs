//! Kernel and initramfs loading with linux-loader: an x86_64 ELF `vmlinux`
//! (segments at their physical addresses, entry = `e_entry`) or a bzImage
//! (protected-mode part at `code32_start`, normally 1 MiB; 64-bit entry =
//! load address + 0x200 per boot.rst "64-bit BOOT PROTOCOL").

use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, ReadVolatile};

use super::layout;
use crate::boot::BootError;

/// Which image format was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// Uncompressed ELF vmlinux.
    Elf,
    /// bzImage (compressed, self-decompressing).
    BzImage,
}

/// Where a kernel landed and how to enter it.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// Image format.
    pub format: KernelFormat,
    /// 64-bit entry point (guest physical).
    pub entry: GuestAddress,
    /// First guest physical byte after the loaded image.
    pub end: u64,
    /// The bzImage setup header, for the zero page; `None` for ELF.
    pub setup_header: Option<setup_header>,
}

/// Load `image` into `mem`: tries ELF first, then bzImage.
///
/// Errors: [`BootError::KernelLoad`] with both loaders' reasons.
pub fn load_kernel<F>(mem: &GuestMemoryMmap, image: &mut F) -> Result<LoadedKernel, BootError>
where
    F: Read + ReadVolatile + Seek,
{
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let elf_err = match Elf::load(mem, None, image, himem) {
        Ok(r) => {
            return Ok(LoadedKernel {
                format: KernelFormat::Elf,
                entry: r.kernel_load,
                end: r.kernel_end,
                setup_header: None,
            })
        }
        Err(e) => e,
    };
    match BzImage::load(mem, None, image, himem) {
        Ok(r) => Ok(LoadedKernel {
            format: KernelFormat::BzImage,
            entry: GuestAddress(r.kernel_load.0.saturating_add(layout::BZIMAGE_64BIT_ENTRY_OFFSET)),
            end: r.kernel_end,
            setup_header: r.setup_header,
        }),
        Err(bz_err) => Err(BootError::KernelLoad { elf: elf_err, bzimage: bz_err }),
    }
}

/// Where an initramfs was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest physical start (page-aligned).
    pub addr: GuestAddress,
    /// Size in bytes.
    pub size: u64,
}

/// Choose the initramfs address: the highest 4 KiB-aligned start such that
/// the image ends at or below `min(top of RAM below 4 GiB,
/// initrd_addr_max + 1)` (boot.rst: "initrd_addr_max"; 0x37FFFFFF when the
/// header is absent or older than protocol 2.03) and starts at or after
/// `kernel_end`.
///
/// Errors: [`BootError::InitrdTooLarge`].
pub fn place_initrd(
    low_ram_end: u64,
    header: Option<&setup_header>,
    kernel_end: u64,
    size: u64,
) -> Result<InitrdPlacement, BootError> {
    let addr_max = match header {
        Some(h) if h.version >= 0x0203 && h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
        Some(_) => layout::DEFAULT_INITRD_ADDR_MAX,
        None => u64::from(u32::MAX),
    };
    let limit = low_ram_end.min(addr_max.saturating_add(1));
    let too_large = || BootError::InitrdTooLarge { size, limit, kernel_end };
    let start = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if start < kernel_end {
        return Err(BootError::InitrdTooLarge { size, limit, kernel_end });
    }
    Ok(InitrdPlacement { addr: GuestAddress(start), size })
}

/// Place (see [`place_initrd`]) and copy `image` into `mem`, reading it
/// from its start to its end.
///
/// Errors: [`BootError::InitrdTooLarge`], [`BootError::InitrdRead`].
pub fn load_initrd<F>(mem: &GuestMemoryMmap, kernel: &LoadedKernel, image: &mut F) -> Result<InitrdPlacement, BootError>
where
    F: Read + ReadVolatile + Seek,
{
    let size = image.seek(SeekFrom::End(0)).map_err(|e| BootError::InitrdRead(e.to_string()))?;
    image.seek(SeekFrom::Start(0)).map_err(|e| BootError::InitrdRead(e.to_string()))?;
    let low_ram_end = crate::memory::low_ram_end(mem);
    let placement = place_initrd(low_ram_end, kernel.setup_header.as_ref(), kernel.end, size)?;
    let len = usize::try_from(size).map_err(|e| BootError::InitrdRead(e.to_string()))?;
    mem.read_exact_volatile_from(placement.addr, image, len).map_err(|e| BootError::InitrdRead(e.to_string()))?;
    Ok(placement)
}
