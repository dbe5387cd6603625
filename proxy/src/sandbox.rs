//! The proxy confines itself once its descriptors are taken and its
//! configuration read, before its runtime starts a thread
//! (docs/processes.md, "capvisor-proxy").
//!
//! Landlock (landlock(7), kernel `Documentation/userspace-api/landlock.rst`):
//! every file-system right the `landlock` crate knows is handled and only
//! reading is granted, only on what the system resolver (getaddrinfo(3),
//! glibc's NSS) reads: [`RESOLVER_FILES`] and the shared-library
//! directories it loads NSS modules from ([`LIBRARY_DIRS`]). No file can
//! be written, created or executed. TCP bind is handled and not granted
//! (ABI 4); TCP connect is not handled, so the proxy reaches any upstream
//! port (Landlock's net rules are per port). Abstract Unix sockets and
//! signals are scoped to the process (ABI 6). On top, the seccomp filter
//! of `capvisor_confine::service::deny_dangerous_syscalls` (ptrace, mount,
//! bpf, module loading, ... fail with EPERM).
//!
//! Best effort: `ProxyConfig` has no "required" switch, so a kernel
//! without Landlock (or an older ABI) leaves the proxy less confined and
//! the status line says so; the binary logs it.

use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use std::path::Path;

/// The newest Landlock ABI whose rights are handled.
const TARGET_ABI: ABI = ABI::V10;

/// Files the system resolver reads (those that exist are readable).
pub const RESOLVER_FILES: &[&str] =
    &["/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/host.conf", "/etc/gai.conf", "/etc/ld.so.cache"];

/// Directories NSS modules (`libnss_*.so`) are loaded from (read only).
pub const LIBRARY_DIRS: &[&str] = &["/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib"];

/// Applies the Landlock domain and the seccomp deny filter described in
/// the module docs to the calling process. Call while it has one thread.
/// Irreversible. Returns a one-line status.
///
/// Errors: another thread exists, a ruleset call failed, or the seccomp
/// filter was refused (the caller decides whether to go on).
pub fn confine() -> anyhow::Result<String> {
    let threads = capvisor_confine::service::thread_count();
    anyhow::ensure!(threads == 1, "the proxy must confine itself while single-threaded ({threads} threads)");
    // The seccomp filter first: its own single-thread check reads /proc,
    // which the Landlock domain then hides.
    let seccomp = capvisor_confine::service::deny_dangerous_syscalls()?;
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    let file_only = AccessFs::from_file(TARGET_ABI);
    let mut rules = Vec::new();
    for p in RESOLVER_FILES.iter().chain(LIBRARY_DIRS) {
        let Ok(path) = Path::new(p).canonicalize() else { continue };
        let Ok(fd) = PathFd::new(&path) else { continue };
        let rights = if path.is_dir() { read } else { read & file_only };
        rules.push(PathBeneath::new(fd, rights));
    }
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(TARGET_ABI))?
        .handle_access(AccessNet::BindTcp)?
        .scope(Scope::from_all(TARGET_ABI))?
        .create()?
        .add_rules(rules.into_iter().map(Ok::<_, landlock::RulesetError>))?
        .restrict_self()?;
    let landlock = match status.ruleset {
        RulesetStatus::FullyEnforced => "fully enforced".to_string(),
        RulesetStatus::PartiallyEnforced => "partially enforced (older kernel ABI)".to_string(),
        RulesetStatus::NotEnforced => format!("NOT enforced ({:?})", status.landlock),
    };
    Ok(format!(
        "landlock ABI {} {landlock}; seccomp deny list ({seccomp} BPF instructions)",
        capvisor_confine::landlock::abi()
    ))
}
