//! The syscall allowlists, per [`ThreadKind`], as data: each entry is a
//! syscall, optionally narrowed by argument conditions, with the reason it
//! is there. `docs/vmm-confinement.md` lists the same entries (a test checks
//! every name appears there).
//!
//! x86_64 only (the engine is x86_64-only; syscall numbers are libc's
//! `SYS_*` for the build target).

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompRule};

use super::ThreadKind;

/// KVM ioctl request numbers (include/uapi/linux/kvm.h), generated like
/// kvm-ioctls does (its own constants are private).
#[allow(non_snake_case, missing_docs)]
pub(crate) mod kvm_nr {
    use kvm_bindings::*;
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    // system / VM ioctls used after set-up
    ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
    ioctl_iow_nr!(KVM_IRQ_LINE, KVMIO, 0x61, kvm_irq_level);
    ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
    ioctl_ior_nr!(KVM_SET_IRQCHIP, KVMIO, 0x63, kvm_irqchip);
    ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
    ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
    ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
    ioctl_iow_nr!(KVM_SET_CLOCK, KVMIO, 0x7b, kvm_clock_data);
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
    ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
    ioctl_iow_nr!(KVM_SET_PIT2, KVMIO, 0xa0, kvm_pit_state2);
    ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_msi);
    // vCPU ioctls
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
    ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
    ioctl_iow_nr!(KVM_SET_CPUID2, KVMIO, 0x90, kvm_cpuid2);
    ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
    ioctl_io_nr!(KVM_NMI, KVMIO, 0x9a);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    ioctl_iow_nr!(KVM_SET_DEBUGREGS, KVMIO, 0xa2, kvm_debugregs);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    ioctl_iow_nr!(KVM_SET_XSAVE, KVMIO, 0xa5, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    ioctl_iow_nr!(KVM_SET_XCRS, KVMIO, 0xa7, kvm_xcrs);
    ioctl_io_nr!(KVM_KVMCLOCK_CTRL, KVMIO, 0xad);
    // set-up only: NOT allowed after confinement (listed for tests and docs)
    ioctl_io_nr!(KVM_CREATE_VM, KVMIO, 0x01);
    ioctl_io_nr!(KVM_CREATE_VCPU, KVMIO, 0x41);
    ioctl_iow_nr!(KVM_SET_USER_MEMORY_REGION, KVMIO, 0x46, kvm_userspace_memory_region);
}

/// Terminal ioctls (asm-generic/ioctls.h).
const TCGETS: u64 = 0x5401;
const FIONBIO: u64 = 0x5421;
const FIONCLEX: u64 = 0x5450;
const FIOCLEX: u64 = 0x5451;

/// One allowed syscall as documented: name, number, the argument
/// condition (if any) in words, and why it is allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedSyscall {
    /// Syscall name (x86_64).
    pub name: &'static str,
    /// Syscall number (x86_64).
    pub nr: i64,
    /// `None`: any arguments. Otherwise the condition, e.g. "arg0 == AF_UNIX".
    pub only_if: Option<String>,
    /// Why the vmm needs it.
    pub why: &'static str,
}

/// An entry with its compiled-ready rules (empty = unconditional).
pub(crate) struct Entry {
    pub doc: AllowedSyscall,
    pub rules: Vec<SeccompRule>,
}

fn cond(arg: u8, len: Len, op: Op, value: u64) -> Cond {
    Cond::new(arg, len, op, value).expect("argument index <= 5")
}

fn rule(conds: Vec<Cond>) -> SeccompRule {
    SeccompRule::new(conds).expect("non-empty rule")
}

/// One rule per value: `arg == v` (32-bit compare, which is what the kernel
/// uses for `int`/`unsigned int` arguments such as the ioctl request).
fn any_of(arg: u8, values: &[u64]) -> Vec<SeccompRule> {
    values.iter().map(|&v| rule(vec![cond(arg, Len::Dword, Op::Eq, v)])).collect()
}

fn any(name: &'static str, nr: i64, why: &'static str) -> Entry {
    Entry { doc: AllowedSyscall { name, nr, only_if: None, why }, rules: vec![] }
}

fn only(name: &'static str, nr: i64, only_if: String, rules: Vec<SeccompRule>, why: &'static str) -> Entry {
    Entry { doc: AllowedSyscall { name, nr, only_if: Some(only_if), why }, rules }
}

/// `CLONE_*` flags a thread (pthread_create) must set...
const CLONE_THREAD_FLAGS: u64 =
    (libc::CLONE_VM | libc::CLONE_FS | libc::CLONE_FILES | libc::CLONE_SIGHAND | libc::CLONE_THREAD) as u64;
/// ...and the ones that must be clear (new namespaces, ptrace games, vfork).
const CLONE_FORBIDDEN: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_PTRACE
    | libc::CLONE_UNTRACED
    | libc::CLONE_VFORK
    | libc::CLONE_PARENT) as u64;

/// `madvise` advice values a Rust process uses (allocator, thread stacks,
/// guest RAM hints). Excludes MADV_HWPOISON / MADV_SOFT_OFFLINE (memory
/// failure injection, CAP_SYS_ADMIN) and everything else not listed.
const MADVISE_OK: &[u64] = &[
    libc::MADV_NORMAL as u64,
    libc::MADV_RANDOM as u64,
    libc::MADV_SEQUENTIAL as u64,
    libc::MADV_WILLNEED as u64,
    libc::MADV_DONTNEED as u64,
    libc::MADV_FREE as u64,
    libc::MADV_REMOVE as u64,
    libc::MADV_DONTFORK as u64,
    libc::MADV_DOFORK as u64,
    libc::MADV_MERGEABLE as u64,
    libc::MADV_UNMERGEABLE as u64,
    libc::MADV_HUGEPAGE as u64,
    libc::MADV_NOHUGEPAGE as u64,
    libc::MADV_DONTDUMP as u64,
    libc::MADV_DODUMP as u64,
];

/// The KVM ioctls the main thread may issue after set-up (VM-level:
/// interrupts, irqfd/ioeventfd wiring, snapshot state).
pub(crate) fn kvm_main_ioctls() -> Vec<(&'static str, u64)> {
    use kvm_nr::*;
    vec![
        ("KVM_CHECK_EXTENSION", KVM_CHECK_EXTENSION()),
        ("KVM_IRQ_LINE", KVM_IRQ_LINE()),
        ("KVM_GET_IRQCHIP", KVM_GET_IRQCHIP()),
        ("KVM_SET_IRQCHIP", KVM_SET_IRQCHIP()),
        ("KVM_SET_GSI_ROUTING", KVM_SET_GSI_ROUTING()),
        ("KVM_IRQFD", KVM_IRQFD()),
        ("KVM_IOEVENTFD", KVM_IOEVENTFD()),
        ("KVM_GET_CLOCK", KVM_GET_CLOCK()),
        ("KVM_SET_CLOCK", KVM_SET_CLOCK()),
        ("KVM_GET_PIT2", KVM_GET_PIT2()),
        ("KVM_SET_PIT2", KVM_SET_PIT2()),
        ("KVM_SIGNAL_MSI", KVM_SIGNAL_MSI()),
    ]
}

/// The KVM ioctls a vCPU thread may issue: run, and get/set of its own
/// architectural state (boot, reset, snapshot/restore); plus raising
/// interrupts from devices emulated on the vCPU thread.
pub(crate) fn kvm_vcpu_ioctls() -> Vec<(&'static str, u64)> {
    use kvm_nr::*;
    vec![
        ("KVM_RUN", KVM_RUN()),
        ("KVM_GET_REGS", KVM_GET_REGS()),
        ("KVM_SET_REGS", KVM_SET_REGS()),
        ("KVM_GET_SREGS", KVM_GET_SREGS()),
        ("KVM_SET_SREGS", KVM_SET_SREGS()),
        ("KVM_GET_MSRS", KVM_GET_MSRS()),
        ("KVM_SET_MSRS", KVM_SET_MSRS()),
        ("KVM_GET_FPU", KVM_GET_FPU()),
        ("KVM_SET_FPU", KVM_SET_FPU()),
        ("KVM_GET_LAPIC", KVM_GET_LAPIC()),
        ("KVM_SET_LAPIC", KVM_SET_LAPIC()),
        ("KVM_SET_CPUID2", KVM_SET_CPUID2()),
        ("KVM_GET_CPUID2", KVM_GET_CPUID2()),
        ("KVM_GET_MP_STATE", KVM_GET_MP_STATE()),
        ("KVM_SET_MP_STATE", KVM_SET_MP_STATE()),
        ("KVM_NMI", KVM_NMI()),
        ("KVM_GET_VCPU_EVENTS", KVM_GET_VCPU_EVENTS()),
        ("KVM_SET_VCPU_EVENTS", KVM_SET_VCPU_EVENTS()),
        ("KVM_GET_DEBUGREGS", KVM_GET_DEBUGREGS()),
        ("KVM_SET_DEBUGREGS", KVM_SET_DEBUGREGS()),
        ("KVM_GET_XSAVE", KVM_GET_XSAVE()),
        ("KVM_SET_XSAVE", KVM_SET_XSAVE()),
        ("KVM_GET_XCRS", KVM_GET_XCRS()),
        ("KVM_SET_XCRS", KVM_SET_XCRS()),
        ("KVM_KVMCLOCK_CTRL", KVM_KVMCLOCK_CTRL()),
        ("KVM_IRQ_LINE", KVM_IRQ_LINE()),
        ("KVM_SIGNAL_MSI", KVM_SIGNAL_MSI()),
    ]
}

fn ioctl_entry(names_values: &[(&'static str, u64)], why: &'static str) -> Entry {
    let values: Vec<u64> = names_values.iter().map(|(_, v)| *v).collect();
    let names: Vec<&str> = names_values.iter().map(|(n, _)| *n).collect();
    only("ioctl", libc::SYS_ioctl, format!("arg1 (request) in {{{}}}", names.join(", ")), any_of(1, &values), why)
}

/// Syscalls both thread kinds need: memory, time, futexes, signals of the
/// process's own, I/O on descriptors that are already open, thread exit.
fn common(pid: u32) -> Vec<Entry> {
    let no_exec = |arg| vec![rule(vec![cond(arg, Len::Dword, Op::MaskedEq(libc::PROT_EXEC as u64), 0)])];
    vec![
        any("read", libc::SYS_read, "reads on open descriptors (eventfds, images, sockets)"),
        any("readv", libc::SYS_readv, "vectored reads (tokio/std, virtio buffers)"),
        any("pread64", libc::SYS_pread64, "positioned reads of disk images"),
        any("preadv", libc::SYS_preadv, "vectored positioned reads (virtio-blk)"),
        any("write", libc::SYS_write, "console log, eventfd signals, stderr logging, sockets"),
        any("writev", libc::SYS_writev, "vectored writes (tokio/std, virtio buffers)"),
        any("pwrite64", libc::SYS_pwrite64, "positioned writes to writable disk images"),
        any("pwritev", libc::SYS_pwritev, "vectored positioned writes (virtio-blk)"),
        any("lseek", libc::SYS_lseek, "file offsets on image files"),
        any("fsync", libc::SYS_fsync, "virtio-blk flush"),
        any("fdatasync", libc::SYS_fdatasync, "virtio-blk flush"),
        only(
            "sendto",
            libc::SYS_sendto,
            "arg4 (dest_addr) == NULL".into(),
            vec![rule(vec![cond(4, Len::Qword, Op::Eq, 0)])],
            "send() on already connected sockets; an explicit destination is refused",
        ),
        any("sendmsg", libc::SYS_sendmsg, "sends on inherited connected stream sockets (capnp-rpc, agent channel)"),
        any("close", libc::SYS_close, "dropping descriptors (incl. a vCPU fd when its thread ends)"),
        only(
            "mmap",
            libc::SYS_mmap,
            "arg2 (prot) without PROT_EXEC".into(),
            no_exec(2),
            "allocator, thread stacks, guest RAM; never executable (W^X)",
        ),
        only(
            "mprotect",
            libc::SYS_mprotect,
            "arg2 (prot) without PROT_EXEC".into(),
            no_exec(2),
            "guard pages (thread stacks, sigaltstack); never executable",
        ),
        any("munmap", libc::SYS_munmap, "allocator, thread stacks"),
        any("mremap", libc::SYS_mremap, "glibc realloc of large blocks"),
        only(
            "madvise",
            libc::SYS_madvise,
            "arg2 (advice) in {NORMAL, RANDOM, SEQUENTIAL, WILLNEED, DONTNEED, FREE, REMOVE, DONTFORK, DOFORK, MERGEABLE, UNMERGEABLE, HUGEPAGE, NOHUGEPAGE, DONTDUMP, DODUMP}".into(),
            any_of(2, MADVISE_OK),
            "allocator trimming, thread stack release at exit, guest RAM hints",
        ),
        any("brk", libc::SYS_brk, "glibc malloc heap"),
        any("futex", libc::SYS_futex, "mutexes, condvars, thread join, parking"),
        any("clock_gettime", libc::SYS_clock_gettime, "time (vDSO fallback)"),
        any("clock_getres", libc::SYS_clock_getres, "timer resolution (vDSO fallback)"),
        any("gettimeofday", libc::SYS_gettimeofday, "time (vDSO fallback)"),
        any("nanosleep", libc::SYS_nanosleep, "std::thread::sleep"),
        any("clock_nanosleep", libc::SYS_clock_nanosleep, "std::thread::sleep (glibc)"),
        any("sched_yield", libc::SYS_sched_yield, "spin-wait back-off"),
        any("getpid", libc::SYS_getpid, "own pid (signals to own threads)"),
        any("gettid", libc::SYS_gettid, "own thread id"),
        any("getrandom", libc::SYS_getrandom, "HashMap keys, random ids; no file access needed"),
        any("rt_sigprocmask", libc::SYS_rt_sigprocmask, "signal masks around thread creation and in handlers"),
        any("rt_sigreturn", libc::SYS_rt_sigreturn, "return from the vCPU kick handler (and the SIGSYS handler in trap mode)"),
        any("sigaltstack", libc::SYS_sigaltstack, "Rust's per-thread stack-overflow handler (set up and torn down per thread)"),
        only(
            "tgkill",
            libc::SYS_tgkill,
            format!("arg0 (tgid) == own pid ({pid})"),
            vec![rule(vec![cond(0, Len::Dword, Op::Eq, u64::from(pid))])],
            "vCPU kick (pthread_kill), abort(); never another process",
        ),
        any("exit", libc::SYS_exit, "thread exit"),
        any("exit_group", libc::SYS_exit_group, "process exit"),
        any("restart_syscall", libc::SYS_restart_syscall, "kernel-internal restart after a signal"),
    ]
}

/// Main-thread-only syscalls.
fn main_only() -> Vec<Entry> {
    vec![
        any("recvfrom", libc::SYS_recvfrom, "recv() on inherited connected sockets"),
        any("recvmsg", libc::SYS_recvmsg, "reads on inherited sockets (capnp-rpc, agent channel)"),
        any("shutdown", libc::SYS_shutdown, "half-close of an existing stream (tokio poll_shutdown)"),
        only(
            "socketpair",
            libc::SYS_socketpair,
            "arg0 == AF_UNIX and (arg1 & 0xf) == SOCK_STREAM".into(),
            vec![rule(vec![
                cond(0, Len::Dword, Op::Eq, libc::AF_UNIX as u64),
                cond(1, Len::Dword, Op::MaskedEq(0xf), libc::SOCK_STREAM as u64),
            ])],
            "tokio's signal driver wakes itself through a Unix stream pair; a pair reaches nothing outside",
        ),
        any("epoll_create1", libc::SYS_epoll_create1, "tokio/mio reactor"),
        any("epoll_ctl", libc::SYS_epoll_ctl, "tokio/mio reactor"),
        any("epoll_wait", libc::SYS_epoll_wait, "tokio/mio reactor"),
        any("epoll_pwait", libc::SYS_epoll_pwait, "tokio/mio reactor (glibc may use the p-variant)"),
        any("epoll_pwait2", libc::SYS_epoll_pwait2, "tokio/mio reactor (newer mio)"),
        any("poll", libc::SYS_poll, "device I/O threads (the virtio-console pump) wait on their backends"),
        any("ppoll", libc::SYS_ppoll, "poll with a signal mask (same use)"),
        any("eventfd2", libc::SYS_eventfd2, "tokio waker, device interrupt lines, irqfd/ioeventfd"),
        any(
            "openat",
            libc::SYS_openat,
            "file access after confinement; which paths is Landlock's job (policy read-only / read-write paths)",
        ),
        any("fstat", libc::SYS_fstat, "metadata of open files"),
        any("newfstatat", libc::SYS_newfstatat, "std::fs::metadata (fallback)"),
        any("statx", libc::SYS_statx, "std::fs::metadata"),
        any("ftruncate", libc::SYS_ftruncate, "writable images / files in the run dir"),
        any("fallocate", libc::SYS_fallocate, "discard / preallocation on writable images"),
        only(
            "fcntl",
            libc::SYS_fcntl,
            "arg1 (cmd) in {F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC}".into(),
            any_of(
                1,
                &[
                    libc::F_GETFD as u64,
                    libc::F_SETFD as u64,
                    libc::F_GETFL as u64,
                    libc::F_SETFL as u64,
                    libc::F_DUPFD_CLOEXEC as u64,
                ],
            ),
            "non-blocking / close-on-exec flags, OwnedFd::try_clone",
        ),
        only(
            "clone",
            libc::SYS_clone,
            "arg0 (flags) has CLONE_VM|FS|FILES|SIGHAND|THREAD and no CLONE_NEW*/PTRACE/UNTRACED/VFORK/PARENT".into(),
            vec![rule(vec![cond(
                0,
                Len::Qword,
                Op::MaskedEq(CLONE_THREAD_FLAGS | CLONE_FORBIDDEN),
                CLONE_THREAD_FLAGS,
            )])],
            "spawning threads (vCPU threads, tokio blocking pool); never a process or a namespace",
        ),
        any(
            "clone3",
            libc::SYS_clone3,
            "answered ENOSYS by a second filter (its flags sit in memory BPF cannot read), so glibc falls back to clone",
        ),
        any("set_robust_list", libc::SYS_set_robust_list, "glibc, at the start of every new thread"),
        any("rseq", libc::SYS_rseq, "glibc, at the start of every new thread"),
        only(
            "prctl",
            libc::SYS_prctl,
            "arg0 in {PR_SET_NAME, PR_SET_NO_NEW_PRIVS}".into(),
            any_of(0, &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64]),
            "thread names (std::thread::Builder::name); no_new_privs (one-way) before a thread narrows its filter",
        ),
        only(
            "seccomp",
            libc::SYS_seccomp,
            "arg0 == SECCOMP_SET_MODE_FILTER and arg1 (flags) within TSYNC|LOG".into(),
            vec![rule(vec![
                cond(0, Len::Dword, Op::Eq, u64::from(libc::SECCOMP_SET_MODE_FILTER)),
                cond(
                    1,
                    Len::Dword,
                    Op::MaskedEq(!(libc::SECCOMP_FILTER_FLAG_TSYNC | libc::SECCOMP_FILTER_FLAG_LOG) & 0xffff_ffff),
                    0,
                ),
            ])],
            "a thread stacking its narrower filter (only ever adds restrictions; no user-notification listener)",
        ),
        any("rt_sigaction", libc::SYS_rt_sigaction, "tokio signal handlers, the vCPU kick handler"),
        any("sched_getaffinity", libc::SYS_sched_getaffinity, "std::thread::available_parallelism"),
    ]
}

/// vCPU-thread-only syscalls.
fn vcpu_only() -> Vec<Entry> {
    vec![only(
        "fcntl",
        libc::SYS_fcntl,
        "arg1 (cmd) == F_GETFD".into(),
        any_of(1, &[libc::F_GETFD as u64]),
        "std's debug-build check that a descriptor is still open when it is dropped (e.g. the vCPU fd at thread end)",
    )]
}

/// All entries for `kind`, with `pid` the process id `tgkill` is limited to.
pub(crate) fn entries(kind: ThreadKind, pid: u32) -> Vec<Entry> {
    let mut v = common(pid);
    match kind {
        ThreadKind::Main => {
            v.extend(main_only());
            v.push(ioctl_entry(
                &[
                    [("FIONBIO", FIONBIO), ("FIOCLEX", FIOCLEX), ("FIONCLEX", FIONCLEX), ("TCGETS", TCGETS)].as_slice(),
                    kvm_main_ioctls().as_slice(),
                ]
                .concat(),
                "set non-blocking / close-on-exec, isatty for logging; VM-level KVM ioctls after set-up",
            ));
        }
        ThreadKind::Vcpu => {
            v.extend(vcpu_only());
            v.push(ioctl_entry(
                &kvm_vcpu_ioctls(),
                "KVM_RUN and this vCPU's state; interrupts from devices emulated on the vCPU thread",
            ));
        }
    }
    v
}

/// The documented allowlist for `kind` (what [`super::seccomp_filters`]
/// compiles). `tgkill`'s condition names the calling process's pid.
pub fn allowlist(kind: ThreadKind) -> Vec<AllowedSyscall> {
    entries(kind, std::process::id()).into_iter().map(|e| e.doc).collect()
}

/// Rules map for seccompiler: syscall number -> rules (empty = always).
pub(crate) fn rules(entries: &[Entry]) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut m: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for e in entries {
        add(&mut m, e.doc.nr, &e.rules);
    }
    m
}

/// Union of two rule maps: a syscall allowed unconditionally in either is
/// unconditional; otherwise the rule lists are concatenated (rules are ORed).
pub(crate) fn union(
    a: &BTreeMap<i64, Vec<SeccompRule>>,
    b: &BTreeMap<i64, Vec<SeccompRule>>,
) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut m = a.clone();
    for (nr, r) in b {
        add(&mut m, *nr, r);
    }
    m
}

fn add(m: &mut BTreeMap<i64, Vec<SeccompRule>>, nr: i64, rules: &[SeccompRule]) {
    match m.get_mut(&nr) {
        None => {
            m.insert(nr, rules.to_vec());
        }
        // already unconditional
        Some(existing) if existing.is_empty() => {}
        Some(existing) => {
            if rules.is_empty() {
                existing.clear();
            } else {
                for r in rules {
                    if !existing.contains(r) {
                        existing.push(r.clone());
                    }
                }
            }
        }
    }
}
