//! Confinement of the `capvisor-vmm` process when it runs the `kvm` engine:
//! a Landlock file-system/network/scope ruleset plus a seccomp-BPF syscall
//! allowlist. What is allowed and why: `docs/vmm-confinement.md`.
//!
//! References followed: seccomp(2) (filter semantics, action precedence,
//! `SECCOMP_FILTER_FLAG_TSYNC` / `SECCOMP_FILTER_FLAG_LOG`), landlock(7) and
//! the kernel's `Documentation/userspace-api/landlock.rst` (handled vs
//! granted access rights, ABI versions, best-effort compatibility, rights
//! are checked when a file is *opened*, so descriptors opened earlier stay
//! usable).
//!
//! # Shape
//!
//! - [`apply_landlock`]: file access limited to [`SandboxPolicy::read_only`]
//!   and [`SandboxPolicy::read_write`]; no TCP bind/connect; no abstract Unix
//!   sockets or signals outside the sandbox. Best effort: on a kernel without
//!   Landlock the returned [`LandlockStatus`] says so, for the caller to log.
//! - [`seccomp_filters`]: compiled BPF for the [`ThreadKind::Main`] thread
//!   (event loop / RPC), [`ThreadKind::Vcpu`] threads, and their union (the
//!   process-wide filter).
//! - [`apply_to_all_threads`]: the union filter on every thread (TSYNC);
//!   [`apply_seccomp`]: a thread narrows itself to its own kind's filter
//!   (stacked on the union; seccomp filters only ever add restrictions).
//! - [`confine`]: Landlock, then the process-wide seccomp filter. One call.
//!
//! # Ordering (why one process-wide filter first, then per-thread narrowing)
//!
//! Landlock before ABI 8 (`LANDLOCK_RESTRICT_SELF_TSYNC`) restricts only the
//! calling thread and the threads it creates afterwards, so [`confine`] must
//! run while the process is single-threaded (it checks, and refuses with
//! [`SandboxError::ThreadsRunning`] otherwise). Threads inherit both the
//! Landlock domain and the seccomp filters of the thread that creates them,
//! and a filter can never be widened, so the filter installed by
//! [`confine`] must allow everything any later thread needs: it is the union
//! of the main and vCPU lists. Each vCPU thread then calls
//! [`SeccompFilters::apply_to_current_thread`]`(ThreadKind::Vcpu)` first
//! thing, and the main thread may narrow itself to [`ThreadKind::Main`] once
//! it will spawn no more vCPU threads (a vCPU thread created by a narrowed
//! main thread would die at its first `KVM_RUN`).
//!
//! Call [`confine`] after: `/dev/kvm` is opened, the VM and its vCPUs are
//! created, guest memory is mapped into the VM, kernel/initramfs are loaded,
//! disk images and the console log are opened; and before: vCPU threads are
//! spawned and the tokio runtime starts any blocking-pool thread. The setup
//! ioctls (`KVM_CREATE_VM`, `KVM_CREATE_VCPU`, `KVM_SET_USER_MEMORY_REGION`,
//! `KVM_CREATE_IRQCHIP`, ...) are not in the allowlist.

use std::fmt;
use std::path::PathBuf;

mod allowlist;
mod fs;
mod seccomp;
#[cfg(test)]
mod tests;

pub use allowlist::{allowlist, AllowedSyscall};
pub use fs::{apply_landlock, landlock_abi, LandlockStatus};
pub use seccomp::{apply_seccomp, apply_to_all_threads, seccomp_filters, SeccompFilters, SeccompMode};

/// Environment variable selecting the [`SeccompMode`]: unset or `kill`
/// (production), `log`, or `trap`. Any other value is an error.
pub const SECCOMP_MODE_ENV: &str = "CAPVISOR_SECCOMP";

/// The kinds of threads in the vmm process, each with its own allowlist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread: tokio `current_thread` runtime, capnp-rpc on the
    /// inherited sockets, device back ends, spawning and kicking vCPU threads.
    Main,
    /// A vCPU thread: `KVM_RUN` and the vCPU state ioctls, exit dispatch to
    /// the devices (which may write the console log, signal eventfds, or do
    /// block I/O on already open descriptors).
    Vcpu,
}

/// What the sandbox allows. Paths must exist when the policy is applied;
/// a path that is a directory grants access to everything beneath it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SandboxPolicy {
    /// Readable (files: read; directories: read and list): kernel,
    /// initramfs, read-only disk images.
    pub read_only: Vec<PathBuf>,
    /// Readable and writable (files: read, write, truncate; directories also:
    /// create/remove regular files and directories beneath): the VM's run
    /// directory, writable disk images.
    pub read_write: Vec<PathBuf>,
    /// What a denied syscall does.
    pub seccomp_mode: SeccompMode,
}

impl SandboxPolicy {
    /// The policy for one VM: `kernel`, `initramfs` and `read_only_disks`
    /// read-only; `writable_disks` and `run_dir` read-write; seccomp mode
    /// from [`SECCOMP_MODE_ENV`].
    ///
    /// Errors: [`SandboxError::InvalidMode`] for an unknown mode value.
    pub fn for_vm(
        kernel: impl Into<PathBuf>,
        initramfs: Option<PathBuf>,
        read_only_disks: impl IntoIterator<Item = PathBuf>,
        writable_disks: impl IntoIterator<Item = PathBuf>,
        run_dir: impl Into<PathBuf>,
    ) -> Result<Self, SandboxError> {
        let mut read_only = vec![kernel.into()];
        read_only.extend(initramfs);
        read_only.extend(read_only_disks);
        let mut read_write = vec![run_dir.into()];
        read_write.extend(writable_disks);
        Ok(SandboxPolicy { read_only, read_write, seccomp_mode: SeccompMode::from_env()? })
    }
}

/// Errors setting up confinement. Every variant means the process is NOT
/// (fully) confined and should not go on to run a guest.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// [`confine`] was called with other threads running while the kernel
    /// cannot apply Landlock to all threads (ABI < 8).
    #[error("{0} threads are running; Landlock (ABI < 8) would only restrict the calling thread, so confine before spawning threads")]
    ThreadsRunning(usize),
    /// A policy path could not be opened for a Landlock rule.
    #[error("sandbox path {path}: {error}")]
    Path {
        /// The path.
        path: PathBuf,
        /// What went wrong.
        error: std::io::Error,
    },
    /// Building or enforcing the Landlock ruleset failed.
    #[error("landlock: {0}")]
    Landlock(String),
    /// Compiling a seccomp filter failed.
    #[error("seccomp compile: {0}")]
    Compile(String),
    /// Installing a seccomp filter failed (`prctl`/`seccomp`/TSYNC).
    #[error("seccomp install: {0}")]
    Install(String),
    /// [`SECCOMP_MODE_ENV`] has an unknown value.
    #[error("{SECCOMP_MODE_ENV}={0:?}: expected kill, log or trap")]
    InvalidMode(String),
    /// Reading process state (`/proc/self/task`) failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What [`confine`] did, for the caller to log once.
#[derive(Debug)]
pub struct ConfineReport {
    /// Landlock's outcome (may be [`LandlockStatus::NotEnforced`] on old kernels).
    pub landlock: LandlockStatus,
    /// The action for denied syscalls.
    pub seccomp_mode: SeccompMode,
    /// BPF instructions in the process-wide filter.
    pub process_filter_len: usize,
    /// The compiled filters, for vCPU threads and the main thread to narrow
    /// themselves with [`SeccompFilters::apply_to_current_thread`].
    pub filters: SeccompFilters,
}

impl fmt::Display for ConfineReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "landlock {}; seccomp {} ({} BPF instructions, all threads)",
            self.landlock, self.seccomp_mode, self.process_filter_len
        )
    }
}

/// Number of threads of this process (entries of `/proc/self/task`).
///
/// Errors: `/proc` is not readable.
pub fn thread_count() -> std::io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// Confine the calling process: [`apply_landlock`] with `policy`, then the
/// process-wide seccomp filter ([`apply_to_all_threads`]) in
/// `policy.seccomp_mode`.
///
/// Must be called while the process is single-threaded unless the kernel
/// applies Landlock to all threads (ABI >= 8); see the module docs for what
/// must be set up before and what may only happen after. Irreversible.
///
/// Errors: [`SandboxError::ThreadsRunning`]; any [`SandboxError`] from the
/// steps. On error the process may be partly confined: do not run a guest.
pub fn confine(policy: &SandboxPolicy) -> Result<ConfineReport, SandboxError> {
    // Compile first: pure computation, and it fails before anything is enforced.
    let filters = seccomp_filters(policy.seccomp_mode)?;
    let threads = thread_count()?;
    let abi = landlock_abi();
    if threads > 1 && abi > 0 && abi < 8 {
        return Err(SandboxError::ThreadsRunning(threads));
    }
    let landlock = apply_landlock(policy)?;
    filters.apply_to_all_threads()?;
    Ok(ConfineReport { landlock, seccomp_mode: policy.seccomp_mode, process_filter_len: filters.len(None), filters })
}
