//! The gateway confines itself once its descriptors are set up
//! (docs/confinement.md, "gateway"). It is the process that parses
//! untrusted bytes from any local user, so after start it may only do what
//! serving needs: accept on the inherited listener, read and write its
//! sockets, pass descriptors to the broker, allocate memory and wait.
//!
//! Two layers, both irreversible, both applied to the single thread the
//! gateway runs on (`capvisor_rpc::conn::run_local` is a `current_thread`
//! runtime; [`confine`] refuses to run when another thread exists):
//!
//! 1. **Landlock** (landlock(7), kernel
//!    `Documentation/userspace-api/landlock.rst`): every filesystem right
//!    the kernel knows is handled and none is granted, so no file can be
//!    opened, created or executed; TCP bind/connect handled and not
//!    granted (ABI 4); abstract Unix sockets and signals scoped to the
//!    process (ABI 6). Best effort: an older ABI enforces what it knows,
//!    reported in [`Confined`].
//! 2. **seccomp-BPF** (seccomp(2), `SECCOMP_SET_MODE_FILTER` through
//!    `seccompiler`): an allowlist ([`ALLOWED`] plus argument-checked
//!    `ioctl`, `mmap`/`mprotect` without `PROT_EXEC`, `tgkill` of our own
//!    process); any other system call kills the process (`SIGSYS`), which
//!    the supervisor sees as a crash and restarts. No `open`, `socket`,
//!    `connect`, `bind`, `execve`, `clone`/`fork`, `ptrace` or `kill`.
//!
//! There is no switch to turn either layer off. `PR_SET_NO_NEW_PRIVS` is
//! already set by `capvisor_rpc::spawn::prepare`; [`confine`] sets it again
//! (seccomp needs it).

use landlock::{Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetStatus, Scope, ABI};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// The newest Landlock ABI whose rights this module handles.
const TARGET_ABI: ABI = ABI::V6;

/// System calls the gateway may make without argument checks once
/// serving: socket I/O on descriptors it holds, epoll, memory, time,
/// signals (tokio's SIGTERM handler), randomness (hash seeds) and exit.
/// Measured with `strace -f` over logins, attaches, refused and garbage
/// connections, and shutdown.
pub const ALLOWED: &[(i64, &str)] = &[
    (libc::SYS_read, "read"),
    (libc::SYS_readv, "readv"),
    (libc::SYS_write, "write"),
    (libc::SYS_writev, "writev"),
    (libc::SYS_close, "close"),
    (libc::SYS_dup, "dup"),
    (libc::SYS_dup3, "dup3"),
    (libc::SYS_fcntl, "fcntl"),
    (libc::SYS_recvfrom, "recvfrom"),
    (libc::SYS_recvmsg, "recvmsg"),
    (libc::SYS_sendto, "sendto"),
    (libc::SYS_sendmsg, "sendmsg"),
    (libc::SYS_accept4, "accept4"),
    (libc::SYS_shutdown, "shutdown"),
    (libc::SYS_getsockopt, "getsockopt"),
    (libc::SYS_getsockname, "getsockname"),
    (libc::SYS_getpeername, "getpeername"),
    (libc::SYS_epoll_wait, "epoll_wait"),
    (libc::SYS_epoll_pwait, "epoll_pwait"),
    (libc::SYS_epoll_pwait2, "epoll_pwait2"),
    (libc::SYS_epoll_ctl, "epoll_ctl"),
    (libc::SYS_poll, "poll"),
    (libc::SYS_ppoll, "ppoll"),
    (libc::SYS_futex, "futex"),
    (libc::SYS_munmap, "munmap"),
    (libc::SYS_mremap, "mremap"),
    (libc::SYS_madvise, "madvise"),
    (libc::SYS_brk, "brk"),
    (libc::SYS_rt_sigaction, "rt_sigaction"),
    (libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
    (libc::SYS_rt_sigreturn, "rt_sigreturn"),
    (libc::SYS_sigaltstack, "sigaltstack"),
    (libc::SYS_clock_gettime, "clock_gettime"),
    (libc::SYS_clock_nanosleep, "clock_nanosleep"),
    (libc::SYS_nanosleep, "nanosleep"),
    (libc::SYS_gettimeofday, "gettimeofday"),
    (libc::SYS_sched_yield, "sched_yield"),
    (libc::SYS_getrandom, "getrandom"),
    (libc::SYS_getpid, "getpid"),
    (libc::SYS_gettid, "gettid"),
    (libc::SYS_getuid, "getuid"),
    (libc::SYS_geteuid, "geteuid"),
    (libc::SYS_getgid, "getgid"),
    (libc::SYS_getegid, "getegid"),
    (libc::SYS_restart_syscall, "restart_syscall"),
    (libc::SYS_exit, "exit"),
    (libc::SYS_exit_group, "exit_group"),
];

/// What [`confine`] applied, for the log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confined {
    /// The kernel's Landlock status: `fully enforced`, `partially
    /// enforced` (older ABI) or `not enforced: <why>`.
    pub landlock: String,
    /// BPF instructions in the installed seccomp filter.
    pub seccomp_instructions: usize,
}

impl std::fmt::Display for Confined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "landlock {}; seccomp kill ({} BPF instructions)", self.landlock, self.seccomp_instructions)
    }
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> anyhow::Result<SeccompCondition> {
    Ok(SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)?)
}

/// The gateway's seccomp program, compiled for the calling process (the
/// `tgkill` rule names its pid).
///
/// Errors: a rule the compiler rejects (ruled out by the unit tests).
pub fn seccomp_program() -> anyhow::Result<BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED.iter().map(|(nr, _)| (*nr, vec![])).collect();
    let no_exec = SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64);
    // mmap(addr, len, prot, ...) and mprotect(addr, len, prot) without PROT_EXEC.
    rules.insert(libc::SYS_mmap, vec![SeccompRule::new(vec![cond(2, no_exec.clone(), 0)?])?]);
    rules.insert(libc::SYS_mprotect, vec![SeccompRule::new(vec![cond(2, no_exec, 0)?])?]);
    // Non-blocking and close-on-exec toggles only (std and tokio use them on sockets).
    let ioctls = [libc::FIONBIO, libc::FIOCLEX, libc::FIONCLEX];
    rules.insert(
        libc::SYS_ioctl,
        ioctls
            .iter()
            .map(|r| SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, *r)?]).map_err(anyhow::Error::from))
            .collect::<anyhow::Result<_>>()?,
    );
    // A panic's abort raises SIGABRT at ourselves, nobody else.
    rules.insert(
        libc::SYS_tgkill,
        vec![SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, u64::from(std::process::id()))?])?],
    );
    let filter = SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, TargetArch::x86_64)?;
    Ok(BpfProgram::try_from(filter)?)
}

/// Confines the calling process as the module docs describe. Call it once
/// every descriptor is set up and the runtime runs, before serving the
/// first connection. Irreversible.
///
/// Errors: another thread exists (Landlock before ABI 8 and this seccomp
/// filter would miss it); the kernel refuses the Landlock ruleset or the
/// seccomp filter. The gateway then exits rather than serve unconfined.
pub fn confine() -> anyhow::Result<Confined> {
    let threads = std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0);
    anyhow::ensure!(threads == 1, "the gateway must confine itself while single-threaded ({threads} threads)");
    let program = seccomp_program()?;
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(TARGET_ABI))?
        .handle_access(AccessNet::from_all(TARGET_ABI))?
        .scope(Scope::from_all(TARGET_ABI))?
        .create()?
        .restrict_self()?;
    let landlock = match status.ruleset {
        RulesetStatus::FullyEnforced => "fully enforced".to_string(),
        RulesetStatus::PartiallyEnforced => "partially enforced (older kernel ABI)".to_string(),
        RulesetStatus::NotEnforced => format!("not enforced: {:?}", status.landlock),
    };
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) only sets a flag of
    // this process; its arguments are plain integers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        anyhow::bail!("PR_SET_NO_NEW_PRIVS: {}", std::io::Error::last_os_error());
    }
    seccompiler::apply_filter(&program)?;
    Ok(Confined { landlock, seccomp_instructions: program.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_compiles_and_names_no_dangerous_call() {
        let p = seccomp_program().unwrap();
        assert!(!p.is_empty() && p.len() < 4096);
        for bad in [
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_fork,
            libc::SYS_ptrace,
            libc::SYS_kill,
        ] {
            assert!(ALLOWED.iter().all(|(nr, _)| *nr != bad), "syscall {bad} must not be allowed");
        }
    }
}
