//! Landlock for capvisor's own long-lived services: the broker confines
//! itself at start, and each worker again, narrower, at its start
//! (docs/vmm-confinement.md, "broker and workers"). A Landlock domain is
//! inherited by every process started after it, and nested domains only
//! narrow: the broker's policy bounds its workers, a worker's bounds its
//! vmms and QEMU, which narrow it further (QEMU's own policy in
//! [`crate::landlock`], the kvm engine's in `capvisor_kvm::sandbox`).
//!
//! What a service's domain grants ([`service_policy`]; the writable
//! directory is the broker's state directory, or a worker's session run
//! directory, so a worker cannot touch the credential store, the audit log
//! or another session's files); everything else is denied, including every
//! TCP bind and signals or abstract Unix sockets outside the domain. TCP
//! connect stays open ([`QemuPolicy::connect_tcp`]): the session's egress
//! proxy, a worker's child, must reach upstream servers, and a child's
//! domain cannot widen its parent's:
//!
//! | list | paths | why |
//! |---|---|---|
//! | exec | capvisor's binary directory, QEMU and the shared-library directories ([`crate::landlock::QemuPolicy::for_qemu`]), `/bin/true`, `mkfs.ext4` ([`MKFS`]) | workers, vmms and QEMU are started from there; the network-namespace probe; formatting a VM's writable layer |
//! | read | firmware and the loader cache (same), the images' directories, `/proc` (read-write when not root: an unprivileged network namespace writes its id maps there), `/sys`, [`ETC_READ`] (`/etc/passwd`, `/etc/group`, `/etc/nsswitch.conf`, the resolver's files), [`TRUST_READ`] (the system's root certificates) | VM images; peer credentials and groups; cgroup and CPU facts; user names; the session proxy's name lookups and upstream TLS roots |
//! | read-write | the broker's state directory (credential store, audit log, session run directories) or the worker's session run directory; the cgroup file systems (`[confinement] cgroup_root`, default `/sys/fs/cgroup`) | what the service and its children write |
//! | devices | `/dev/null`, `/dev/kvm` where present | child stdio; the kvm engine and KVM-accelerated QEMU |
//!
//! So a compromised broker or worker cannot write the operator's home,
//! `/etc` or any other file outside the state directory, cannot read
//! `/etc/shadow`, SSH keys or other users' files, and cannot listen on a
//! TCP port.

use crate::landlock::{resolve_program, QemuPolicy};
use crate::{ConfineError, Layer};
use std::path::{Path, PathBuf};

/// Files under `/etc` the services read (user and group names, the name
/// service switch that tells libc where they are, the resolver's
/// configuration).
pub const ETC_READ: &[&str] = &[
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    // The resolver's files (resolv.conf(5), hosts(5), host.conf(5),
    // gai.conf(5)): the session's egress proxy, a worker's child under its
    // domain, resolves upstream names with getaddrinfo(3).
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/gai.conf",
];

/// The system's trust store (those that exist are readable): the session's
/// egress proxy, a worker's child under its domain, loads the roots it
/// verifies upstream TLS with (`rustls-native-certs`: Debian's
/// `/etc/ssl/certs`, whose entries link into `/usr/share/ca-certificates`
/// and `/usr/local/share/ca-certificates`; Fedora's `/etc/pki`).
pub const TRUST_READ: &[&str] = &[
    "/etc/ssl/certs",
    "/usr/share/ca-certificates",
    "/usr/local/share/ca-certificates",
    "/etc/pki/tls/certs",
    "/etc/pki/ca-trust",
];

/// Threads of the calling process (entries of `/proc/self/task`; 0 when
/// unreadable). Both layers here apply to the calling thread and the ones
/// it starts later, so they are applied while this is 1.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}

/// The e2fsprogs programs the worker runs to format a VM's writable layer
/// (those present are executable in a service's domain).
pub const MKFS: &[&str] = &["/usr/sbin/mkfs.ext4", "/usr/sbin/mke2fs", "/sbin/mkfs.ext4", "/sbin/mke2fs"];

fn push(v: &mut Vec<PathBuf>, p: &Path) {
    if let Ok(c) = p.canonicalize() {
        if !v.contains(&c) {
            v.push(c);
        }
    }
}

/// A service's policy (see the module docs): `rw_dir` read-write,
/// `bin_dir` executable, each of `image_files`' directory readable, QEMU
/// (`qemu`, resolved in `PATH` when it has no slash) and its libraries
/// executable when it is installed, `cgroup_root` (manifest
/// `[confinement] cgroup_root`) writable when it exists.
///
/// Errors: `rw_dir` or `bin_dir` does not exist.
pub fn service_policy(
    rw_dir: &Path,
    bin_dir: &Path,
    image_files: &[&Path],
    qemu: &str,
    cgroup_root: &Path,
) -> Result<QemuPolicy, ConfineError> {
    let canon =
        |p: &Path| p.canonicalize().map_err(|e| ConfineError::new(Layer::Landlock, format!("{}: {e}", p.display())));
    let mut p = match resolve_program(qemu) {
        Ok(q) => QemuPolicy::for_qemu(&q),
        Err(_) => QemuPolicy::for_qemu(Path::new("/nonexistent/bin/qemu")),
    };
    p.exec.push(canon(bin_dir)?);
    // The network-namespace probe runs it (`crate::netns::NetnsPlan::probe`).
    push(&mut p.exec, Path::new("/bin/true"));
    // The worker formats each VM's writable layer over a root image.
    for mkfs in MKFS {
        push(&mut p.exec, Path::new(mkfs));
    }
    for f in image_files {
        if let Some(dir) = f.parent() {
            push(&mut p.read_only, dir);
        }
    }
    for r in ["/sys"].iter().chain(ETC_READ).chain(TRUST_READ) {
        push(&mut p.read_only, Path::new(r));
    }
    // Unprivileged, a fresh network namespace needs a user namespace whose
    // id maps are written to /proc/self/{setgroups,uid_map,gid_map}
    // (crate::netns); what else an unprivileged uid may write in /proc is
    // its own processes' files. As root /proc stays read-only.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        push(&mut p.read_only, Path::new("/proc"));
    } else {
        push(&mut p.read_write, Path::new("/proc"));
    }
    p.read_write.push(canon(rw_dir)?);
    push(&mut p.read_write, cgroup_root);
    // Each session's egress proxy (capvisor-proxy, started by its worker)
    // connects to upstream servers; Landlock domains only narrow, so the
    // worker and the broker above it leave TCP connect open (bind stays
    // refused). Neither opens a TCP socket itself.
    p.connect_tcp = true;
    for d in ["/dev/null", "/dev/kvm"] {
        push(&mut p.devices, Path::new(d));
    }
    Ok(p)
}

/// Enforces `policy` on the calling process: every thread it starts from
/// now on, and every program it runs, inherit it. Call while the process
/// has one thread (Landlock before ABI 8 restricts only the calling
/// thread). Irreversible. Returns the one-line status (`ABI 7 partially
/// enforced ...`).
///
/// Errors: another thread exists; Landlock is unavailable (the reason
/// says why); a path cannot be opened; the kernel refused.
pub fn confine_self(policy: &QemuPolicy) -> Result<String, ConfineError> {
    let threads = thread_count();
    if threads != 1 {
        return Err(ConfineError::new(Layer::Landlock, format!("must be applied single-threaded ({threads} threads)")));
    }
    let mut prepared = policy.prepare()?;
    prepared
        .restrict_in_child()
        .map_err(|e| ConfineError::new(Layer::Landlock, format!("landlock_restrict_self: {e}")))?;
    Ok(prepared.describe())
}

/// System calls no capvisor process needs and that widen the kernel's
/// attack surface or reach outside the process: debugging other processes,
/// mounts and namespaces joined by descriptor, kernel modules and kexec,
/// BPF and perf, keyrings, userfaultfd and io_uring, handle-based opens
/// (the classic container escape), clock and host-name changes, raw port
/// I/O. The list follows the denials of Docker's default seccomp profile
/// that apply to unprivileged services. `unshare` stays allowed: the vmm
/// gives QEMU a fresh network namespace with it.
pub const DENIED: &[(i64, &str)] = &[
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
    (libc::SYS_mount, "mount"),
    (libc::SYS_umount2, "umount2"),
    (libc::SYS_pivot_root, "pivot_root"),
    (libc::SYS_chroot, "chroot"),
    (libc::SYS_setns, "setns"),
    (libc::SYS_open_tree, "open_tree"),
    (libc::SYS_move_mount, "move_mount"),
    (libc::SYS_fsopen, "fsopen"),
    (libc::SYS_fsmount, "fsmount"),
    (libc::SYS_fspick, "fspick"),
    (libc::SYS_mount_setattr, "mount_setattr"),
    (libc::SYS_swapon, "swapon"),
    (libc::SYS_swapoff, "swapoff"),
    (libc::SYS_reboot, "reboot"),
    (libc::SYS_kexec_load, "kexec_load"),
    (libc::SYS_kexec_file_load, "kexec_file_load"),
    (libc::SYS_init_module, "init_module"),
    (libc::SYS_finit_module, "finit_module"),
    (libc::SYS_delete_module, "delete_module"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_perf_event_open, "perf_event_open"),
    (libc::SYS_keyctl, "keyctl"),
    (libc::SYS_add_key, "add_key"),
    (libc::SYS_request_key, "request_key"),
    (libc::SYS_userfaultfd, "userfaultfd"),
    (libc::SYS_io_uring_setup, "io_uring_setup"),
    (libc::SYS_io_uring_enter, "io_uring_enter"),
    (libc::SYS_io_uring_register, "io_uring_register"),
    (libc::SYS_open_by_handle_at, "open_by_handle_at"),
    (libc::SYS_name_to_handle_at, "name_to_handle_at"),
    (libc::SYS_acct, "acct"),
    (libc::SYS_settimeofday, "settimeofday"),
    (libc::SYS_clock_settime, "clock_settime"),
    (libc::SYS_clock_adjtime, "clock_adjtime"),
    (libc::SYS_adjtimex, "adjtimex"),
    (libc::SYS_quotactl, "quotactl"),
    (libc::SYS_lookup_dcookie, "lookup_dcookie"),
    (libc::SYS_fanotify_init, "fanotify_init"),
    (libc::SYS_iopl, "iopl"),
    (libc::SYS_ioperm, "ioperm"),
    (libc::SYS_syslog, "syslog"),
    (libc::SYS_vhangup, "vhangup"),
    (libc::SYS_sethostname, "sethostname"),
    (libc::SYS_setdomainname, "setdomainname"),
];

/// The BPF program of [`deny_dangerous_syscalls`].
///
/// Errors: the compiler rejected the rules (ruled out by the tests).
pub fn deny_program() -> std::io::Result<seccompiler::BpfProgram> {
    let rules = DENIED.iter().map(|(nr, _)| (*nr, vec![])).collect();
    seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        seccompiler::TargetArch::x86_64,
    )
    .and_then(seccompiler::BpfProgram::try_from)
    .map_err(|x| std::io::Error::other(format!("seccomp: {x}")))
}

/// Installs a seccomp filter (seccomp(2), `SECCOMP_SET_MODE_FILTER`) on
/// the calling process that fails every call in [`DENIED`] with `EPERM`
/// and allows the rest. Inherited by every process started after it (the
/// broker's workers, vmms and QEMU, which add their own, stricter
/// filters). Call single-threaded, like [`confine_self`]. Irreversible.
/// Returns the program's length in BPF instructions.
///
/// Errors: another thread exists; the kernel refused the filter.
pub fn deny_dangerous_syscalls() -> std::io::Result<usize> {
    let threads = thread_count();
    let e = |m: String| std::io::Error::other(format!("seccomp: {m}"));
    if threads != 1 {
        return Err(e(format!("must be applied single-threaded ({threads} threads)")));
    }
    let program = deny_program()?;
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) only sets a flag of this process.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(e(format!("PR_SET_NO_NEW_PRIVS: {}", std::io::Error::last_os_error())));
    }
    seccompiler::apply_filter(&program).map_err(|x| e(x.to_string()))?;
    Ok(program.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child under the broker policy: writes its state dir, reads
    /// /etc/passwd and an image, runs a program from the bin dir; gets
    /// EACCES writing outside, reading /etc/shadow or a file the test made
    /// elsewhere, and running a program copied outside the bin dir.
    #[test]
    fn the_broker_policy_bounds_writes_reads_and_programs() {
        assert!(crate::landlock::abi() > 0, "this host has no Landlock");
        let d = tempfile::tempdir().unwrap();
        let (state, bin, img, elsewhere) =
            (d.path().join("state"), d.path().join("bin"), d.path().join("img"), d.path().join("elsewhere"));
        for p in [&state, &bin, &img, &elsewhere] {
            std::fs::create_dir(p).unwrap();
        }
        std::fs::copy("/bin/true", bin.join("capvisor-worker")).unwrap();
        std::fs::copy("/bin/true", elsewhere.join("other")).unwrap();
        std::fs::write(img.join("vmlinux"), "kernel\n").unwrap();
        std::fs::write(elsewhere.join("secret"), "secret").unwrap();
        let kernel = img.join("vmlinux");
        let mut policy =
            service_policy(&state, &bin, &[&kernel], "qemu-system-x86_64", Path::new("/sys/fs/cgroup")).unwrap();
        // The shell that plays the broker here.
        let bash = resolve_program("bash").unwrap();
        policy.exec.push(bash.clone());
        // TCP connect stays open (the session's egress proxy below needs
        // it); binding a TCP port does not (checked with python3 if present).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // Debian's python3 (a PATH lookup may find a pyenv shim script).
        let python = resolve_program("/usr/bin/python3").ok();
        if let Some(py) = &python {
            policy.exec.push(py.clone());
        }
        let bind = match &python {
            Some(py) => format!(
                "{} -c 'import os, socket\ntry: socket.socket().bind((\"127.0.0.1\", 0)); print(\"bound\")\n\
                 except OSError as e: print(\"bind:\", os.strerror(e.errno))' 2>&1\n",
                py.display()
            ),
            None => "echo 'PermissionError: [Errno 13] Permission denied (python3 missing)'\n".into(),
        };
        let script = format!(
            "echo ok > {s}/accounts.json && read -r l < {s}/accounts.json && echo \"$l\"\n\
             read -r l < {k} && echo \"$l\"\n\
             read -r l < /etc/passwd && echo passwd-readable\n\
             {b}/capvisor-worker && echo worker-ran\n\
             (exec 3<>/dev/tcp/127.0.0.1/{port}) && echo tcp-connect-ok\n\
             (echo x > {e}/new) 2>&1\n(exec 5<{e}/secret) 2>&1\n(exec 5</etc/shadow) 2>&1\n\
             ({e}/other) 2>&1\n{bind}true",
            s = state.display(),
            k = kernel.display(),
            b = bin.display(),
            e = elsewhere.display()
        );
        let mut cmd = std::process::Command::new(&bash);
        cmd.args(["-c", &script]);
        let mut prepared = policy.prepare().unwrap();
        // SAFETY: restrict_in_child makes only prctl and landlock system calls.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || prepared.restrict_in_child());
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(&lines[..5], ["ok", "kernel", "passwd-readable", "worker-ran", "tcp-connect-ok"], "{text}");
        assert_eq!(lines.len(), 10, "{text}");
        for l in &lines[5..] {
            assert!(l.ends_with("Permission denied"), "expected EACCES: {text}");
        }
        if python.is_some() {
            assert_eq!(lines[9], "bind: Permission denied", "TCP bind must be refused: {text}");
        }
        assert!(!elsewhere.join("new").exists());
        assert!(service_policy(
            &d.path().join("missing"),
            &bin,
            &[],
            "qemu-system-x86_64",
            Path::new("/sys/fs/cgroup")
        )
        .is_err());
    }

    /// Under the deny filter, `ptrace`, `mount`, `bpf`, module loading,
    /// `setns` and `keyctl` fail with EPERM while ordinary calls work.
    #[test]
    fn denied_calls_fail_with_eperm_and_the_rest_works() {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "service::tests::deny_child", "--ignored", "--nocapture", "--test-threads=1"]);
        cmd.env("CAPVISOR_DENY_CHILD", "1");
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
        for call in ["ptrace", "mount", "bpf", "init_module", "setns", "keyctl"] {
            assert!(text.contains(&format!("{call}: EPERM")), "{call} not denied: {text}");
        }
        assert!(text.contains("getpid: ok"), "{text}");
    }

    /// The child of [`denied_calls_fail_with_eperm_and_the_rest_works`].
    /// libtest runs it on a thread of its own, so it installs the program
    /// on that thread only (the thread that then makes the calls) instead
    /// of calling [`deny_dangerous_syscalls`], which wants one thread.
    #[test]
    #[ignore]
    fn deny_child() {
        if std::env::var_os("CAPVISOR_DENY_CHILD").is_none() {
            return;
        }
        seccompiler::apply_filter(&deny_program().unwrap()).unwrap();
        let errno = |r: libc::c_long| {
            if r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) {
                "EPERM".to_string()
            } else {
                format!("returned {r} ({})", std::io::Error::last_os_error())
            }
        };
        // SAFETY: each call gets harmless arguments; denied ones never run.
        unsafe {
            println!("ptrace: {}", errno(libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0)));
            println!(
                "mount: {}",
                errno(libc::syscall(libc::SYS_mount, c"none".as_ptr(), c"/".as_ptr(), c"tmpfs".as_ptr(), 0, 0))
            );
            println!("bpf: {}", errno(libc::syscall(libc::SYS_bpf, 0, 0, 0)));
            println!("init_module: {}", errno(libc::syscall(libc::SYS_init_module, 0, 0, 0)));
            println!("setns: {}", errno(libc::syscall(libc::SYS_setns, -1, 0)));
            println!("keyctl: {}", errno(libc::syscall(libc::SYS_keyctl, 0, 0, 0)));
            println!("getpid: {}", if libc::getpid() > 0 { "ok" } else { "failed" });
        }
    }
}
