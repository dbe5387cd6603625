//! Compiling and installing the seccomp-BPF filters (seccomp(2)).
//!
//! Every program starts with seccompiler's architecture check (a syscall
//! made with another ABI, e.g. `int 0x80` i386 calls, kills the process in
//! every mode), then compares the syscall number against the allowlist;
//! anything else gets the [`SeccompMode`]'s deny action. x32 syscalls
//! (`nr | 0x4000_0000`) match no entry and are denied.
//!
//! `clone3` passes its flags in memory, which BPF cannot read, so a second
//! tiny filter answers every `clone3` with `ENOSYS`: glibc (2.34+) then falls
//! back to `clone`, whose flags the main filter checks. The main filter lists
//! `clone3` as allowed so that the shim's `ERRNO` is the winning action
//! (seccomp(2): with several filters the highest-precedence action wins:
//! KILL_PROCESS > KILL_THREAD > TRAP > ERRNO > USER_NOTIF > TRACE > LOG > ALLOW).

use std::fmt;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use super::allowlist::{entries, rules, union};
use super::{SandboxError, ThreadKind, SECCOMP_MODE_ENV};

#[cfg(not(target_arch = "x86_64"))]
compile_error!("the vmm seccomp allowlist is written for x86_64 syscall numbers");

/// What happens when a thread makes a syscall outside its allowlist. No
/// mode turns the filter off: the debugging modes still refuse the call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SeccompMode {
    /// `SECCOMP_RET_KILL_PROCESS`: the whole process dies with SIGSYS (and a
    /// core dump if enabled); the kernel logs the syscall number (audit
    /// type 1326 / dmesg). Production default.
    #[default]
    Kill,
    /// `SECCOMP_RET_ERRNO(EPERM)`, installed with `SECCOMP_FILTER_FLAG_LOG`:
    /// the call fails with EPERM, the process goes on, and the kernel logs
    /// every denial (dmesg / audit, if `errno` is in
    /// `/proc/sys/kernel/seccomp/actions_logged`). `CAPVISOR_SECCOMP=log`.
    Log,
    /// `SECCOMP_RET_TRAP`: a SIGSYS handler prints the denied syscall and its
    /// first three arguments to stderr and makes the call fail with EPERM.
    /// For hosts where dmesg/audit is out of reach. `CAPVISOR_SECCOMP=trap`.
    Trap,
}

impl SeccompMode {
    /// Parse a [`SECCOMP_MODE_ENV`] value: `None`, `""` or `"kill"` ->
    /// [`SeccompMode::Kill`], `"log"`, `"trap"`.
    ///
    /// Errors: [`SandboxError::InvalidMode`] for anything else (fail closed:
    /// a typo must not silently weaken or change the policy).
    pub fn parse(value: Option<&str>) -> Result<Self, SandboxError> {
        match value.map(str::trim) {
            None | Some("") | Some("kill") => Ok(SeccompMode::Kill),
            Some("log") => Ok(SeccompMode::Log),
            Some("trap") => Ok(SeccompMode::Trap),
            Some(other) => Err(SandboxError::InvalidMode(other.to_string())),
        }
    }

    /// The mode selected by [`SECCOMP_MODE_ENV`].
    ///
    /// Errors: as [`SeccompMode::parse`].
    pub fn from_env() -> Result<Self, SandboxError> {
        let v = std::env::var(SECCOMP_MODE_ENV).ok();
        Self::parse(v.as_deref())
    }

    fn deny_action(self) -> SeccompAction {
        match self {
            SeccompMode::Kill => SeccompAction::KillProcess,
            SeccompMode::Log => SeccompAction::Errno(libc::EPERM as u32),
            SeccompMode::Trap => SeccompAction::Trap,
        }
    }

    fn install_flags(self) -> libc::c_ulong {
        match self {
            SeccompMode::Log => libc::SECCOMP_FILTER_FLAG_LOG,
            _ => 0,
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::Kill => "kill",
            SeccompMode::Log => "log (denials fail with EPERM and are logged by the kernel)",
            SeccompMode::Trap => "trap (denials fail with EPERM and are printed to stderr)",
        })
    }
}

/// The compiled BPF programs: per [`ThreadKind`], their union (the
/// process-wide filter), and the `clone3` -> ENOSYS shim. Compiled for the
/// calling process: `tgkill` is limited to its pid, so compile in the
/// process that applies them (not before a `fork`).
#[derive(Clone, Debug)]
pub struct SeccompFilters {
    mode: SeccompMode,
    main: BpfProgram,
    vcpu: BpfProgram,
    process: BpfProgram,
    clone3_enosys: BpfProgram,
}

fn compile(
    rules: std::collections::BTreeMap<i64, Vec<seccompiler::SeccompRule>>,
    mode: SeccompMode,
) -> Result<BpfProgram, SandboxError> {
    let filter = SeccompFilter::new(rules, mode.deny_action(), SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| SandboxError::Compile(e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| SandboxError::Compile(e.to_string()))
}

/// Compile the filters for `mode`.
///
/// Errors: [`SandboxError::Compile`] (a program over the kernel's 4096
/// instruction limit, which the unit tests rule out).
pub fn seccomp_filters(mode: SeccompMode) -> Result<SeccompFilters, SandboxError> {
    let pid = std::process::id();
    let main = rules(&entries(ThreadKind::Main, pid));
    let vcpu = rules(&entries(ThreadKind::Vcpu, pid));
    // vCPU rules first: KVM_RUN is then the first ioctl request compared.
    let process = union(&vcpu, &main);
    let shim = [(libc::SYS_clone3, vec![])].into_iter().collect();
    let clone3_enosys =
        SeccompFilter::new(shim, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), TargetArch::x86_64)
            .and_then(BpfProgram::try_from)
            .map_err(|e| SandboxError::Compile(e.to_string()))?;
    Ok(SeccompFilters {
        mode,
        main: compile(main, mode)?,
        vcpu: compile(vcpu, mode)?,
        process: compile(process, mode)?,
        clone3_enosys,
    })
}

impl SeccompFilters {
    /// The deny mode these filters were compiled for.
    pub fn mode(&self) -> SeccompMode {
        self.mode
    }

    /// The program for `kind`, or the process-wide union for `None`.
    pub fn program(&self, kind: Option<ThreadKind>) -> &[seccompiler::sock_filter] {
        match kind {
            Some(ThreadKind::Main) => &self.main,
            Some(ThreadKind::Vcpu) => &self.vcpu,
            None => &self.process,
        }
    }

    /// The `clone3` -> ENOSYS shim program.
    pub fn clone3_shim(&self) -> &[seccompiler::sock_filter] {
        &self.clone3_enosys
    }

    /// Instructions in [`SeccompFilters::program`].
    pub fn len(&self, kind: Option<ThreadKind>) -> usize {
        self.program(kind).len()
    }

    /// Install the process-wide filter (union of all thread kinds) and the
    /// `clone3` shim on every thread of the process
    /// (`SECCOMP_FILTER_FLAG_TSYNC`). Sets `no_new_privs`.
    ///
    /// Errors: [`SandboxError::Install`], including a TSYNC failure when a
    /// thread already runs a filter that is not an ancestor of ours (e.g. a
    /// vCPU thread that narrowed itself first: always install this first).
    pub fn apply_to_all_threads(&self) -> Result<(), SandboxError> {
        if self.mode == SeccompMode::Trap {
            install_sigsys_handler()?;
        }
        let flags = libc::SECCOMP_FILTER_FLAG_TSYNC | self.mode.install_flags();
        // The shim first: the main filter does not allow arbitrary seccomp() calls.
        install(&self.clone3_enosys, flags)?;
        install(&self.process, flags)
    }

    /// Narrow the calling thread to `kind`'s filter (stacked on whatever it
    /// runs under already). vCPU threads call this first thing; the main
    /// thread once it spawns no more vCPU threads.
    ///
    /// Errors: [`SandboxError::Install`].
    pub fn apply_to_current_thread(&self, kind: ThreadKind) -> Result<(), SandboxError> {
        if self.mode == SeccompMode::Trap {
            install_sigsys_handler()?;
        }
        let flags = self.mode.install_flags();
        if kind == ThreadKind::Main {
            install(&self.clone3_enosys, flags)?;
        }
        install(self.program(Some(kind)), flags)
    }
}

/// Compile for `mode` and narrow the calling thread to `kind`'s filter
/// ([`SeccompFilters::apply_to_current_thread`]).
///
/// Errors: [`SandboxError::Compile`], [`SandboxError::Install`].
pub fn apply_seccomp(kind: ThreadKind, mode: SeccompMode) -> Result<(), SandboxError> {
    seccomp_filters(mode)?.apply_to_current_thread(kind)
}

/// Compile for `mode` and install the process-wide filter on all threads
/// ([`SeccompFilters::apply_to_all_threads`]).
///
/// Errors: [`SandboxError::Compile`], [`SandboxError::Install`].
pub fn apply_to_all_threads(mode: SeccompMode) -> Result<(), SandboxError> {
    seccomp_filters(mode)?.apply_to_all_threads()
}

/// `prctl(PR_SET_NO_NEW_PRIVS)` + `seccomp(SECCOMP_SET_MODE_FILTER, flags, prog)`.
fn install(prog: &[seccompiler::sock_filter], flags: libc::c_ulong) -> Result<(), SandboxError> {
    let insns: Vec<libc::sock_filter> =
        prog.iter().map(|i| libc::sock_filter { code: i.code, jt: i.jt, jf: i.jf, k: i.k }).collect();
    let len = u16::try_from(insns.len()).map_err(|_| SandboxError::Install("filter too long".into()))?;
    let fprog = libc::sock_fprog { len, filter: insns.as_ptr().cast_mut() };
    // SAFETY: plain prctl; NO_NEW_PRIVS is one-way and required by seccomp for
    // unprivileged filter installation.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SandboxError::Install(format!("PR_SET_NO_NEW_PRIVS: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: `fprog` points at `insns`, alive for the call; the kernel copies it.
    let rc = unsafe {
        libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, flags, &fprog as *const libc::sock_fprog)
    };
    match rc {
        0 => Ok(()),
        r if r > 0 => Err(SandboxError::Install(format!("TSYNC failed: thread {r} runs an incompatible filter"))),
        _ => Err(SandboxError::Install(format!("seccomp(SET_MODE_FILTER): {}", std::io::Error::last_os_error()))),
    }
}

/// Names of syscalls likely to show up in a denial (x86_64), for the trap
/// handler's message. Others print as their number.
const NOTABLE: &[(i64, &str)] = &[
    (libc::SYS_open, "open"),
    (libc::SYS_poll, "poll"),
    (libc::SYS_ppoll, "ppoll"),
    (libc::SYS_pipe2, "pipe2"),
    (libc::SYS_dup, "dup"),
    (libc::SYS_dup3, "dup3"),
    (libc::SYS_socket, "socket"),
    (libc::SYS_connect, "connect"),
    (libc::SYS_accept, "accept"),
    (libc::SYS_accept4, "accept4"),
    (libc::SYS_bind, "bind"),
    (libc::SYS_listen, "listen"),
    (libc::SYS_getsockopt, "getsockopt"),
    (libc::SYS_setsockopt, "setsockopt"),
    (libc::SYS_getsockname, "getsockname"),
    (libc::SYS_getpeername, "getpeername"),
    (libc::SYS_ioctl, "ioctl"),
    (libc::SYS_fcntl, "fcntl"),
    (libc::SYS_prctl, "prctl"),
    (libc::SYS_madvise, "madvise"),
    (libc::SYS_mmap, "mmap"),
    (libc::SYS_mprotect, "mprotect"),
    (libc::SYS_clone, "clone"),
    (libc::SYS_fork, "fork"),
    (libc::SYS_vfork, "vfork"),
    (libc::SYS_execve, "execve"),
    (libc::SYS_execveat, "execveat"),
    (libc::SYS_kill, "kill"),
    (libc::SYS_tgkill, "tgkill"),
    (libc::SYS_unlinkat, "unlinkat"),
    (libc::SYS_renameat2, "renameat2"),
    (libc::SYS_mkdirat, "mkdirat"),
    (libc::SYS_getdents64, "getdents64"),
    (libc::SYS_readlinkat, "readlinkat"),
    (libc::SYS_faccessat2, "faccessat2"),
    (libc::SYS_uname, "uname"),
    (libc::SYS_prlimit64, "prlimit64"),
    (libc::SYS_timerfd_create, "timerfd_create"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_unshare, "unshare"),
    (libc::SYS_setns, "setns"),
    (libc::SYS_mount, "mount"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_io_uring_setup, "io_uring_setup"),
    (libc::SYS_userfaultfd, "userfaultfd"),
];

struct StackBuf {
    buf: [u8; 256],
    len: usize,
}

impl StackBuf {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }
    fn dec(&mut self, mut v: u64) {
        let mut tmp = [0u8; 20];
        let mut i = tmp.len();
        loop {
            i -= 1;
            tmp[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&tmp[i..]);
    }
    fn hex(&mut self, v: u64) {
        let mut tmp = [0u8; 18];
        tmp[0] = b'0';
        tmp[1] = b'x';
        let mut n = 0;
        let mut x = v;
        loop {
            n += 1;
            x >>= 4;
            if x == 0 {
                break;
            }
        }
        for k in 0..n {
            let d = ((v >> (4 * (n - 1 - k))) & 0xf) as u8;
            tmp[2 + k] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
        }
        self.push(&tmp[..2 + n]);
    }
}

/// SIGSYS handler for [`SeccompMode::Trap`]: async-signal-safe (stack buffer,
/// one `write(2)`), reports the syscall and its first three arguments, and
/// makes the syscall return -EPERM (seccomp(2), SECCOMP_RET_TRAP: the
/// handler may set the return value through the ucontext).
extern "C" fn sigsys_handler(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS (SA_SIGINFO); its
    // `_sigsys` union member is { void *_call_addr; int _syscall; unsigned _arch; }
    // starting at byte 16 on 64-bit targets, so `_syscall` sits at byte 24.
    let nr = i64::from(unsafe { *(info as *const u8).add(24).cast::<i32>() });
    // SAFETY: for SA_SIGINFO handlers the third argument is the interrupted ucontext.
    let uc = unsafe { &mut *ctx.cast::<libc::ucontext_t>() };
    let g = &mut uc.uc_mcontext.gregs;
    let mut b = StackBuf { buf: [0; 256], len: 0 };
    b.push(b"capvisor seccomp: denied syscall ");
    b.dec(nr as u64);
    if let Some((_, name)) = NOTABLE.iter().find(|(n, _)| *n == nr) {
        b.push(b" (");
        b.push(name.as_bytes());
        b.push(b")");
    }
    b.push(b" args ");
    b.hex(g[libc::REG_RDI as usize] as u64);
    b.push(b" ");
    b.hex(g[libc::REG_RSI as usize] as u64);
    b.push(b" ");
    b.hex(g[libc::REG_RDX as usize] as u64);
    b.push(b" -> EPERM\n");
    // SAFETY: write(2) is async-signal-safe; the buffer lives on this stack.
    unsafe { libc::write(2, b.buf.as_ptr().cast(), b.len) };
    g[libc::REG_RAX as usize] = -i64::from(libc::EPERM);
}

fn install_sigsys_handler() -> Result<(), SandboxError> {
    // SAFETY: a zeroed sigaction is valid; we fill handler, flags and mask.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = sigsys_handler as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sa_mask is a valid sigset_t inside `sa`.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: installs a handler that only does async-signal-safe work.
    if unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(SandboxError::Install(format!("sigaction(SIGSYS): {}", std::io::Error::last_os_error())));
    }
    Ok(())
}
