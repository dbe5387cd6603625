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
//! TCP bind and connect and signals or abstract Unix sockets outside the
//! domain:
//!
//! | list | paths | why |
//! |---|---|---|
//! | exec | capvisor's binary directory, QEMU and the shared-library directories ([`crate::landlock::QemuPolicy::for_qemu`]), `/bin/true` | workers, vmms and QEMU are started from there; the network-namespace probe |
//! | read | firmware and the loader cache (same), the images' directories, `/proc`, `/sys`, `/etc/passwd`, `/etc/group`, `/etc/nsswitch.conf` | VM images; peer credentials and groups; cgroup and CPU facts; user names |
//! | read-write | the broker's state directory (credential store, audit log, session run directories) or the worker's session run directory; the cgroup file systems under `/sys/fs/cgroup` | what the service and its children write |
//! | devices | `/dev/null`, `/dev/kvm` where present | child stdio; the kvm engine and KVM-accelerated QEMU |
//!
//! So a compromised broker or worker cannot write the operator's home,
//! `/etc` or any other file outside the state directory, cannot read
//! `/etc/shadow`, SSH keys or other users' files, and cannot open a TCP
//! connection.

use crate::landlock::{resolve_program, QemuPolicy};
use crate::{ConfineError, Layer};
use std::path::{Path, PathBuf};

/// Files under `/etc` the services read (user and group names, the name
/// service switch that tells libc where they are).
pub const ETC_READ: &[&str] = &["/etc/passwd", "/etc/group", "/etc/nsswitch.conf"];

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
/// executable when it is installed.
///
/// Errors: `rw_dir` or `bin_dir` does not exist.
pub fn service_policy(
    rw_dir: &Path,
    bin_dir: &Path,
    image_files: &[&Path],
    qemu: &str,
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
    for f in image_files {
        if let Some(dir) = f.parent() {
            push(&mut p.read_only, dir);
        }
    }
    for r in ["/proc", "/sys"].iter().chain(ETC_READ) {
        push(&mut p.read_only, Path::new(r));
    }
    p.read_write.push(canon(rw_dir)?);
    push(&mut p.read_write, Path::new("/sys/fs/cgroup"));
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
    let threads = std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0);
    if threads != 1 {
        return Err(ConfineError::new(Layer::Landlock, format!("must be applied single-threaded ({threads} threads)")));
    }
    let mut prepared = policy.prepare()?;
    prepared
        .restrict_in_child()
        .map_err(|e| ConfineError::new(Layer::Landlock, format!("landlock_restrict_self: {e}")))?;
    Ok(prepared.describe())
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
        let mut policy = service_policy(&state, &bin, &[&kernel], "qemu-system-x86_64").unwrap();
        // The shell that plays the broker here.
        let bash = resolve_program("bash").unwrap();
        policy.exec.push(bash.clone());
        let script = format!(
            "echo ok > {s}/accounts.json && read -r l < {s}/accounts.json && echo \"$l\"\n\
             read -r l < {k} && echo \"$l\"\n\
             read -r l < /etc/passwd && echo passwd-readable\n\
             {b}/capvisor-worker && echo worker-ran\n\
             (echo x > {e}/new) 2>&1\n(exec 5<{e}/secret) 2>&1\n(exec 5</etc/shadow) 2>&1\n\
             ({e}/other) 2>&1\ntrue",
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
        assert_eq!(&lines[..4], ["ok", "kernel", "passwd-readable", "worker-ran"], "{text}");
        assert_eq!(lines.len(), 8, "{text}");
        for l in &lines[4..] {
            assert!(l.ends_with("Permission denied"), "expected EACCES: {text}");
        }
        assert!(!elsewhere.join("new").exists());
        assert!(service_policy(&d.path().join("missing"), &bin, &[], "qemu-system-x86_64").is_err());
    }
}
