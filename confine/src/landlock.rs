//! The Landlock ruleset QEMU runs under (landlock(7), the kernel's
//! Documentation/userspace-api/landlock.rst).
//!
//! Handled, so denied unless a rule grants them: every file-system right
//! the `landlock` crate knows (up to ABI 10), TCP bind and connect (ABI 4),
//! and the abstract-Unix-socket and signal scopes (ABI 6). Granted
//! ([`QemuPolicy`]):
//!
//! | list | rights |
//! |---|---|
//! | `exec`: the QEMU binary, shared-library directories (`/usr/lib`, `/lib64`, ...; QEMU's accelerator modules live there too) | read, execute (+ list for directories) |
//! | `read_only`: firmware (`/usr/share/qemu`, `/usr/share/seabios`, `/usr/lib/ipxe/qemu`, or `<bindir>/../share/qemu`), `/etc/ld.so.cache`, the VM's kernel, initramfs and read-only disks | read (+ list) |
//! | `read_write`: the VM's run directory, writable disks, `/dev/null` (QEMU probes file locking on it) | read, write, truncate (+ list, create and remove files and directories beneath) |
//! | `devices`: `/dev/kvm` when QEMU uses KVM | read, write, device ioctls |
//!
//! Nothing else: no other file is readable (`/etc/passwd`, other VMs' run
//! directories, the user's home), no TCP bind or connect (no port rule),
//! no signals or abstract Unix sockets outside QEMU's own domain.
//!
//! The ruleset is built in the parent ([`QemuPolicy::prepare`]) and
//! enforced in the child before exec ([`PreparedRuleset::restrict_in_child`]),
//! so the `execve` of QEMU itself is the first access it checks.

use crate::{ConfineError, Layer};
use ::landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, Scope, ABI,
};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The newest ABI whose rights this module handles.
pub const TARGET_ABI: i32 = 10;

fn target() -> ABI {
    ABI::V10
}

/// The kernel's Landlock ABI version: `landlock_create_ruleset(NULL, 0,
/// LANDLOCK_CREATE_RULESET_VERSION)`; 0 when Landlock is unavailable
/// (not built in, or missing from `lsm=`).
pub fn abi() -> i32 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: the version query takes no attribute pointer and creates no fd.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    i32::try_from(v).unwrap_or(0).max(0)
}

/// What QEMU may touch. Paths may be files or directories (a directory
/// rule covers everything beneath it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QemuPolicy {
    /// Read and execute: the QEMU binary and shared-library directories.
    pub exec: Vec<PathBuf>,
    /// Read: firmware, the loader cache, the VM's kernel, initramfs,
    /// read-only disks.
    pub read_only: Vec<PathBuf>,
    /// Read and write: the VM's run directory, writable disks.
    pub read_write: Vec<PathBuf>,
    /// Read, write and ioctl: device nodes (`/dev/kvm`).
    pub devices: Vec<PathBuf>,
    /// Leave outgoing TCP (`connect`) unrestricted; binding a TCP port stays
    /// refused. Landlock network rules are per port (ABI 4), so "any port"
    /// means not handling `LANDLOCK_ACCESS_NET_CONNECT_TCP` at all. Set for
    /// the session's egress proxy, and so for the broker and workers above
    /// it (a child's domain can only narrow its parent's). Default: off.
    pub connect_tcp: bool,
}

/// `program` as an absolute, symlink-free path: searched in `PATH` when it
/// has no slash (execvp(3)), then canonicalized.
///
/// Errors: not found, or not reachable.
pub fn resolve_program(program: &str) -> Result<PathBuf, ConfineError> {
    let found = if program.contains('/') {
        Some(PathBuf::from(program))
    } else {
        std::env::var_os("PATH")
            .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into())
            .to_string_lossy()
            .split(':')
            .map(|d| Path::new(d).join(program))
            .find(|p| p.is_file())
    };
    let p = found.ok_or_else(|| ConfineError::new(Layer::Landlock, format!("{program} not found in PATH")))?;
    p.canonicalize().map_err(|e| ConfineError::new(Layer::Landlock, format!("{}: {e}", p.display())))
}

fn push_existing(v: &mut Vec<PathBuf>, p: impl AsRef<Path>) {
    if let Ok(c) = p.as_ref().canonicalize() {
        if !v.contains(&c) {
            v.push(c);
        }
    }
}

impl QemuPolicy {
    /// What any QEMU started from `program` (an absolute path, see
    /// [`resolve_program`]) needs to start: the binary, the shared-library
    /// directories, firmware and the loader cache (those that exist here;
    /// found with `strace -e trace=%file` on QEMU 7.2 booting `-M microvm`).
    pub fn for_qemu(program: &Path) -> Self {
        let mut p = QemuPolicy::default();
        push_existing(&mut p.exec, program);
        for d in ["/usr/lib", "/lib", "/lib64", "/usr/lib64", "/usr/local/lib"] {
            push_existing(&mut p.exec, d);
        }
        if let Some(prefix) = program.parent().and_then(Path::parent) {
            // QEMU finds modules in <bindir>/../lib/.../qemu and firmware
            // in <bindir>/../share/qemu.
            push_existing(&mut p.exec, prefix.join("lib"));
            push_existing(&mut p.read_only, prefix.join("share/qemu"));
        }
        for f in ["/usr/share/qemu", "/usr/share/seabios", "/usr/lib/ipxe/qemu", "/etc/ld.so.cache"] {
            push_existing(&mut p.read_only, f);
        }
        // QEMU's block layer opens /dev/null to probe for OFD locks before
        // it opens a disk image (util/osdep.c, qemu_probe_lock_ops).
        push_existing(&mut p.read_write, "/dev/null");
        p
    }

    /// Adds a VM's files: `read_only` ones (kernel, initramfs, read-only
    /// disks) and `read_write` ones (run directory, writable disks); with
    /// `kvm`, `/dev/kvm`.
    ///
    /// Errors: a VM path does not exist (it would fail in QEMU anyway, with
    /// a worse message).
    pub fn with_vm(mut self, read_only: &[&Path], read_write: &[&Path], kvm: bool) -> Result<Self, ConfineError> {
        let canon = |p: &Path| {
            p.canonicalize().map_err(|e| ConfineError::new(Layer::Landlock, format!("{}: {e}", p.display())))
        };
        for p in read_only {
            self.read_only.push(canon(p)?);
        }
        for p in read_write {
            self.read_write.push(canon(p)?);
        }
        if kvm {
            self.devices.push(canon(Path::new("/dev/kvm"))?);
        }
        Ok(self)
    }

    /// Builds the ruleset (opening every path) for a child to enforce.
    ///
    /// Errors: Landlock is unavailable (ABI 0: the reason says so), a path
    /// cannot be opened, or the kernel refused the ruleset.
    pub fn prepare(&self) -> Result<PreparedRuleset, ConfineError> {
        let e = |m: String| ConfineError::new(Layer::Landlock, m);
        let kernel_abi = abi();
        if kernel_abi == 0 {
            return Err(e("the kernel has no Landlock (not built in, or not in lsm=)".into()));
        }
        let ll = |x: ::landlock::RulesetError| e(x.to_string());
        let file_only = AccessFs::from_file(target());
        let mut rules = Vec::new();
        let mut rule = |p: &Path, rights: BitFlags<AccessFs>| -> Result<(), ConfineError> {
            let fd = PathFd::new(p).map_err(|x| e(format!("{}: {x}", p.display())))?;
            let rights = if p.is_dir() { rights } else { rights & file_only };
            rules.push(PathBeneath::new(fd, rights));
            Ok(())
        };
        for p in &self.exec {
            rule(p, AccessFs::ReadFile | AccessFs::ReadDir | AccessFs::Execute)?;
        }
        for p in &self.read_only {
            rule(p, AccessFs::ReadFile | AccessFs::ReadDir)?;
        }
        for p in &self.read_write {
            rule(
                p,
                AccessFs::ReadFile
                    | AccessFs::ReadDir
                    | AccessFs::WriteFile
                    | AccessFs::Truncate
                    | AccessFs::MakeReg
                    | AccessFs::RemoveFile
                    | AccessFs::MakeDir
                    | AccessFs::RemoveDir,
            )?;
        }
        for p in &self.devices {
            rule(p, AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev)?;
        }
        let created = Ruleset::default()
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(AccessFs::from_all(target()))
            .map_err(ll)?
            .handle_access(if self.connect_tcp { AccessNet::BindTcp.into() } else { AccessNet::from_all(target()) })
            .map_err(ll)?
            .scope(Scope::from_all(target()))
            .map_err(ll)?
            .create()
            .map_err(ll)?
            .add_rules(rules.into_iter().map(Ok::<_, ::landlock::RulesetError>))
            .map_err(ll)?;
        let fd: Option<OwnedFd> = created.into();
        let fd = fd.ok_or_else(|| e("the kernel gave no ruleset descriptor".into()))?;
        Ok(PreparedRuleset { fd, abi: kernel_abi })
    }
}

/// A Landlock ruleset descriptor (close-on-exec) ready to be enforced in a
/// child.
#[derive(Debug)]
pub struct PreparedRuleset {
    fd: OwnedFd,
    abi: i32,
}

impl PreparedRuleset {
    /// The kernel's ABI version.
    pub fn abi(&self) -> i32 {
        self.abi
    }

    /// One line for a [`crate::Report`]: `ABI 7 partially enforced`
    /// (rights of ABIs above the kernel's are not), or `ABI 10 fully enforced`.
    pub fn describe(&self) -> String {
        if self.abi >= TARGET_ABI {
            format!("ABI {} fully enforced", self.abi)
        } else {
            format!("ABI {} partially enforced (handles up to {TARGET_ABI})", self.abi)
        }
    }

    /// In the child, between fork and exec: `PR_SET_NO_NEW_PRIVS` (landlock
    /// requires it without `CAP_SYS_ADMIN`), then
    /// `landlock_restrict_self(fd, 0)`. Irreversible.
    ///
    /// Errors: the system call's errno.
    pub fn restrict_in_child(&mut self) -> std::io::Result<()> {
        // SAFETY: prctl and the landlock syscall are async-signal-safe and
        // take no pointers.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::syscall(libc::SYS_landlock_restrict_self, self.fd.as_raw_fd(), 0u32) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(policy: &QemuPolicy, program: &str, args: &[&str]) -> std::process::Output {
        let mut cmd = std::process::Command::new(program);
        cmd.args(args);
        crate::ChildConfinement { landlock: Some(policy.prepare().unwrap()), ..Default::default() }.install(&mut cmd);
        cmd.output().unwrap()
    }

    /// A child under the QEMU policy (with a VM's run dir and kernel) can
    /// run a program from the library/binary set, read its kernel and write
    /// its run dir, and gets EACCES for a file this test made outside, for
    /// /etc/passwd, and for a TCP connect to a listener we own.
    #[test]
    fn the_qemu_policy_allows_only_the_vm_files() {
        assert!(abi() > 0, "this host has no Landlock");
        let d = tempfile::tempdir().unwrap();
        let run_dir = d.path().join("run");
        std::fs::create_dir(&run_dir).unwrap();
        let kernel = d.path().join("vmlinux");
        std::fs::write(&kernel, "kernel\n").unwrap();
        let secret = d.path().join("secret");
        std::fs::write(&secret, "secret").unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();

        let bash = resolve_program("bash").unwrap();
        let policy = QemuPolicy::for_qemu(&bash).with_vm(&[&kernel], &[&run_dir], false).unwrap();
        // Builtins only: no other program is executable under the policy.
        let script = format!(
            "exec 4<{k} && read -r l <&4 && echo \"$l\"\n\
             echo ok > {r}/console.log && read -r l < {r}/console.log && echo \"$l\"\n\
             (exec 5<{s}) 2>&1\n(exec 5</etc/passwd) 2>&1\n(exec 3<>/dev/tcp/127.0.0.1/{port}) 2>&1\ntrue",
            k = kernel.display(),
            r = run_dir.display(),
            s = secret.display()
        );
        let out = run(&policy, bash.to_str().unwrap(), &["-c", &script]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert_eq!(lines[0], "kernel");
        assert_eq!(lines[1], "ok");
        assert!(lines[2].ends_with(&format!("{}: Permission denied", secret.display())), "{text}");
        assert!(lines[3].ends_with("/etc/passwd: Permission denied"), "{text}");
        assert!(lines[4].ends_with("connect: Permission denied"), "TCP connect must be refused: {text}");
        listener.set_nonblocking(true).unwrap();
        assert!(listener.accept().is_err(), "no connection arrived");
    }

    /// The execve itself is checked: a program outside the exec list fails
    /// to start with EACCES (a typed spawn error, nothing ran).
    #[test]
    fn a_program_outside_the_policy_cannot_start() {
        let d = tempfile::tempdir().unwrap();
        let copy = d.path().join("true");
        std::fs::copy("/bin/true", &copy).unwrap();
        let policy = QemuPolicy::for_qemu(&resolve_program("true").unwrap());
        let mut cmd = std::process::Command::new(&copy);
        crate::ChildConfinement { landlock: Some(policy.prepare().unwrap()), ..Default::default() }.install(&mut cmd);
        let e = cmd.status().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
        assert!(policy.clone().with_vm(&[Path::new("/nonexistent/vmlinux")], &[], false).is_err());
    }

    /// Real QEMU under the policy: it starts (and stays up, paused by `-S`)
    /// with [`QemuPolicy::for_qemu`], and is refused its firmware (so it
    /// exits naming it) when the policy lacks the firmware directory:
    /// Landlock holds on QEMU itself, not only on test programs.
    #[test]
    fn qemu_starts_under_its_policy_and_not_without_its_firmware() {
        let qemu = resolve_program("qemu-system-x86_64").expect("QEMU is installed");
        let full = QemuPolicy::for_qemu(&qemu);
        let firmware = Path::new("/usr/share/qemu").canonicalize().unwrap();
        let mut lacking = full.clone();
        lacking.read_only.retain(|p| *p != firmware);
        assert_ne!(lacking, full, "the policy names the firmware directory");
        let start = |policy: &QemuPolicy| {
            let mut cmd = std::process::Command::new(&qemu);
            cmd.args(["-M", "microvm,x-option-roms=off", "-nodefaults", "-no-user-config", "-display", "none"])
                .args(["-accel", "tcg", "-m", "64", "-S"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped());
            crate::ChildConfinement { landlock: Some(policy.prepare().unwrap()), ..Default::default() }
                .install(&mut cmd);
            cmd.spawn().unwrap()
        };
        let mut ok = start(&full);
        std::thread::sleep(std::time::Duration::from_millis(1500));
        assert!(ok.try_wait().unwrap().is_none(), "QEMU exited under its own policy");
        ok.kill().unwrap();
        ok.wait().unwrap();

        let refused = start(&lacking).wait_with_output().unwrap();
        assert!(!refused.status.success());
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(err.contains("bios-microvm.bin") || err.contains("firmware"), "{err}");
    }
}
