//! Guest RAM on vm-memory's `GuestMemoryMmap` (anonymous private mappings),
//! laid out around the 32-bit MMIO gap:
//!
//! ```text
//! 0 ............ RAM ............ 0xC000_0000 | MMIO gap (virtio-mmio at 0xD000_0000..) | 4 GiB .. RAM above ..
//! ```
//!
//! RAM up to `MMIO_GAP_START` (3 GiB) sits at 0; anything beyond continues
//! at 4 GiB.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Start of the 32-bit MMIO gap (3 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Base of the first virtio-mmio device window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window (register file + config space).
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Size zero or not a multiple of 4 KiB.
    #[error("guest memory size {0:#x} must be a non-zero multiple of 4 KiB")]
    BadSize(u64),
    /// mmap failed.
    #[error("mapping guest memory failed: {0}")]
    Mmap(String),
}

/// RAM ranges (guest physical start, length in bytes) for `size` bytes of RAM:
/// `[0, min(size, 3 GiB))` and, when larger, `[4 GiB, 4 GiB + rest)`.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_GAP_START);
    let mut v = vec![(GuestAddress(0), low)];
    if size > low {
        v.push((GuestAddress(MMIO_GAP_END), size - low));
    }
    v
}

/// Allocate `size` bytes of guest RAM laid out by [`ram_ranges`].
///
/// Errors: [`MemoryError::BadSize`], [`MemoryError::Mmap`].
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if size == 0 || size % 4096 != 0 {
        return Err(MemoryError::BadSize(size));
    }
    let ranges = ram_ranges(size)
        .into_iter()
        .map(|(a, l)| usize::try_from(l).map(|l| (a, l)).map_err(|_| MemoryError::BadSize(size)))
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Mmap(e.to_string()))
}

/// The RAM ranges of `mem` as (start, length) pairs, in address order.
pub fn ram_ranges_of(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    v.sort_unstable();
    v
}

/// End (exclusive) of RAM below the MMIO gap: where the region holding
/// guest physical 0 ends, clamped to [`MMIO_GAP_START`]; 0 if there is none.
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.find_region(GuestAddress(0)).map(|r| r.start_addr().0.saturating_add(r.len()).min(MMIO_GAP_START)).unwrap_or(0)
}
