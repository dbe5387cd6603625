//! Guest boot: everything written into guest memory before the first vCPU
//! runs, and the vCPU state that enters it.
//!
//! Only x86_64 exists today ([`x86_64`]); an aarch64 variant (device tree,
//! PSCI) would sit beside it for a Hypervisor.framework backend.

pub mod x86_64;

/// Errors while laying out or loading a guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A structure did not fit in guest memory at its fixed address.
    #[error("guest memory write of {what} at {addr:#x} failed")]
    GuestWrite {
        /// Which structure (e.g. "zero page").
        what: &'static str,
        /// Guest physical address.
        addr: u64,
    },
    /// The kernel image is neither an x86_64 ELF vmlinux nor a bzImage, or
    /// could not be read into guest memory.
    #[error("kernel load failed: elf: {elf}; bzImage: {bzimage}")]
    KernelLoad {
        /// Error from the ELF loader.
        elf: linux_loader::loader::Error,
        /// Error from the bzImage loader.
        bzimage: linux_loader::loader::Error,
    },
    /// The kernel command line is invalid or too long.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// The initramfs does not fit between the kernel end and the top of low RAM.
    #[error("initramfs of {size} bytes does not fit below {limit:#x} above the kernel end {kernel_end:#x}")]
    InitrdTooLarge {
        /// Initramfs size in bytes.
        size: u64,
        /// Highest allowed end address (exclusive).
        limit: u64,
        /// First free byte after the kernel.
        kernel_end: u64,
    },
    /// Reading the initramfs image failed.
    #[error("initramfs read failed: {0}")]
    InitrdRead(String),
    /// Guest memory is too small (or lacks the low megabyte) for the boot structures.
    #[error("guest memory layout unusable: {0}")]
    Layout(String),
}
