//! PID 1 set-up inside the guest: file systems, console descriptors,
//! hostname, loopback, kernel modules, the agent port; and power-off.
//!
//! Every step logs failures to stderr (the serial console) and carries on;
//! none of these functions panics.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the module list and the modules live: `order` holds one file
/// name per line (e.g. `virtio_ring.ko`), loaded in that order.
pub const MODULES_DIR: &str = "/lib/modules/capvisor";

/// The virtio-serial port name the host exposes for the agent channel.
pub const AGENT_PORT_NAME: &str = "capvisor.agent";

/// How long [`find_agent_port`] polls, and how often.
pub const PORT_TIMEOUT: Duration = Duration::from_secs(20);
/// Poll interval of [`find_agent_port`].
pub const PORT_POLL: Duration = Duration::from_millis(20);

/// The guest's hostname.
pub const HOSTNAME: &str = "capvisor";

/// I/O port of the kvm engine's boot-timer pseudo-device
/// (`vmm/kvm/src/devices/boot_timer`, `BOOT_TIMER_PORT`): writing
/// [`BOOT_TIMER_MAGIC`] there records "init ready" in the VMM's boot
/// figures. QEMU's `microvm` machine has nothing at 0x440, so under the
/// qemu engine the write goes to an unassigned port and is dropped.
pub const BOOT_TIMER_PORT: u16 = 0x440;
/// The byte [`signal_boot_ready`] writes to [`BOOT_TIMER_PORT`].
pub const BOOT_TIMER_MAGIC: u8 = 123;

fn log(msg: impl AsRef<str>) {
    eprintln!("guest-init: [{} ms] {}", crate::boottime_ms(), msg.as_ref());
}

/// Mounts the basic file systems, creating mount points as needed; a
/// mount that is already there (EBUSY) is fine. In order: /proc (proc),
/// /sys (sysfs), /dev (devtmpfs), /dev/pts (devpts, `mode=0620,ptmxmode=0666`),
/// /dev/shm, /tmp (mode 1777) and /run (mode 0755) as tmpfs. Also creates
/// the /dev/fd, /dev/stdin, /dev/stdout, /dev/stderr symlinks.
pub fn mount_basics() {
    use nix::mount::{mount, MsFlags};
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let table: &[(&str, &str, MsFlags, &str)] = &[
        ("proc", "/proc", nosuid_nodev_noexec, ""),
        ("sysfs", "/sys", nosuid_nodev_noexec, ""),
        ("devtmpfs", "/dev", MsFlags::MS_NOSUID, "mode=0755"),
        ("devpts", "/dev/pts", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, "mode=0620,ptmxmode=0666"),
        ("tmpfs", "/dev/shm", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, "mode=1777"),
        ("tmpfs", "/tmp", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, "mode=1777"),
        ("tmpfs", "/run", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, "mode=0755"),
    ];
    for (fstype, target, flags, data) in table {
        if let Err(e) = std::fs::create_dir_all(target) {
            log(format!("mkdir {target}: {e}"));
        }
        let data = if data.is_empty() { None } else { Some(*data) };
        match mount(Some(*fstype), *target, Some(*fstype), *flags, data) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => log(format!("mount {fstype} on {target}: {e}")),
        }
    }
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        match std::os::unix::fs::symlink(to, link) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => log(format!("symlink {link}: {e}")),
        }
    }
}

/// Makes sure descriptors 0, 1 and 2 are open (on /dev/console, else
/// /dev/null), so no later descriptor (the agent port, a pipe) lands on
/// them and log lines never end up in the wrong file. Call after /dev is
/// mounted.
pub fn ensure_stdio() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
            continue;
        }
        for dev in [c"/dev/console", c"/dev/null"] {
            // SAFETY: open(2) with a valid C string.
            let n = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
            if n < 0 {
                continue;
            }
            if n != fd {
                // SAFETY: duplicating onto the closed slot, closing the spare.
                unsafe {
                    libc::dup2(n, fd);
                    libc::close(n);
                }
            }
            break;
        }
    }
}

/// Sets the hostname to [`HOSTNAME`].
pub fn set_hostname() {
    set_hostname_to(HOSTNAME);
}

/// Sets the hostname to `name` (sethostname(2)); failures are logged.
pub fn set_hostname_to(name: &str) {
    if let Err(e) = nix::unistd::sethostname(name) {
        log(format!("sethostname: {e}"));
    }
}

/// Reads the kernel command line and, when it asks for a root image
/// (`capvisor.root=`), switches into it ([`crate::rootfs::switch_root`]);
/// sets the hostname (`capvisor.hostname=`, else [`HOSTNAME`]). A failed
/// switch is logged as `root switch failed: <step>: <errno>` on the
/// console and powers the machine off, so the host sees a boot failure
/// with the console tail rather than a guest that never answers. Returns
/// whether a switch happened.
pub fn root_and_hostname() -> bool {
    let plan = crate::rootfs::RootPlan::from_proc();
    let switched = plan.root.is_some();
    if switched {
        let t0 = crate::boottime_ms();
        if let Err(e) = crate::rootfs::switch_root(&plan) {
            log(format!("root switch failed: {e}; powering off"));
            power_off(false);
            // Not PID 1 (cannot happen here): do not serve a half-built root.
            std::process::exit(1);
        }
        log(format!(
            "switched root to {} ({} ms)",
            plan.root.as_deref().unwrap_or(Path::new("?")).display(),
            crate::boottime_ms() - t0
        ));
    }
    if let Err(e) = crate::rootfs::mount_volumes(&plan) {
        log(format!("volume mount failed: {e}; powering off"));
        power_off(false);
        std::process::exit(1);
    }
    if !plan.volumes.is_empty() {
        log(format!("mounted {} volume(s)", plan.volumes.len()));
    }
    let name = plan.hostname.as_deref().unwrap_or(HOSTNAME);
    set_hostname_to(name);
    if let Err(e) = hosts_entry(Path::new("/etc/hosts"), name) {
        log(format!("/etc/hosts: {e}"));
    }
    switched
}

/// Makes the guest's own name resolve locally, as Debian's installer does
/// (`127.0.1.1 NAME` in `hosts`, appended when no line names it yet), so
/// programs that look up their hostname (git, sudo) never ask DNS, and so
/// never the egress proxy.
///
/// Errors: `hosts` cannot be read or written (a missing file is created).
pub fn hosts_entry(hosts: &Path, name: &str) -> std::io::Result<()> {
    use std::io::Write;
    let have = match std::fs::read_to_string(hosts) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let named = have
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .any(|l| l.split_whitespace().skip(1).any(|n| n == name));
    if named {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(hosts)?;
    if !have.is_empty() && !have.ends_with('\n') {
        f.write_all(b"\n")?;
    }
    writeln!(f, "127.0.1.1\t{name}")
}

/// Brings the loopback interface `lo` up (SIOCSIFFLAGS | IFF_UP); the
/// kernel then configures 127.0.0.1/8 and ::1 on it.
pub fn loopback_up() {
    // SAFETY: a datagram socket used only for the interface ioctls, closed by OwnedFd.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            log(format!("loopback: socket: {}", std::io::Error::last_os_error()));
            return;
        }
        let _s = OwnedFd::from_raw_fd(s);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            log(format!("loopback: SIOCGIFFLAGS: {}", std::io::Error::last_os_error()));
            return;
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr) < 0 {
            log(format!("loopback: SIOCSIFFLAGS: {}", std::io::Error::last_os_error()));
        }
    }
}

/// Loads the modules listed in `<dir>/order` with finit_module(2), in
/// order. Blank lines and `#` comments are skipped; a module that is
/// already loaded (EEXIST) counts as loaded. Failures are logged and
/// skipped. Returns (loaded, failed); a missing `order` file is (0, 0).
pub fn load_modules(dir: &Path) -> (usize, usize) {
    let order = match std::fs::read_to_string(dir.join("order")) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (0, 0),
        Err(e) => {
            log(format!("{}/order: {e}", dir.display()));
            return (0, 1);
        }
    };
    let (mut ok, mut failed) = (0, 0);
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let path = dir.join(name);
        let f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                log(format!("module {}: {e}", path.display()));
                failed += 1;
                continue;
            }
        };
        match nix::kmod::finit_module(&f, c"", nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => ok += 1,
            Err(e) => {
                log(format!("module {}: finit_module: {e}", path.display()));
                failed += 1;
            }
        }
    }
    (ok, failed)
}

/// Looks once for the virtio-serial port named `name` under
/// `sys_dir` (normally `/sys/class/virtio-ports`): the entry whose `name`
/// file holds `name` (trailing newline ignored). Returns `/dev/<entry>`.
pub fn scan_ports(sys_dir: &Path, name: &str) -> Option<PathBuf> {
    let rd = std::fs::read_dir(sys_dir).ok()?;
    let mut found: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("name")).map(|s| s.trim_end() == name).unwrap_or(false))
        .map(|e| Path::new("/dev").join(e.file_name()))
        .collect();
    found.sort();
    found.into_iter().next()
}

/// Polls `/sys/class/virtio-ports` for [`AGENT_PORT_NAME`] (every 1 ms at
/// first, doubling up to [`PORT_POLL`]) for up to `timeout`, also waiting for the device node to
/// appear. `None` when it never showed up.
pub async fn find_agent_port(timeout: Duration) -> Option<PathBuf> {
    let deadline = tokio::time::Instant::now() + timeout;
    // The port (or its /dev node) usually appears within a few ms of init
    // starting: poll every 1 ms at first, backing off to PORT_POLL, so a
    // boot does not lose a whole PORT_POLL on the critical path.
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(p) = scan_ports(Path::new("/sys/class/virtio-ports"), AGENT_PORT_NAME) {
            if p.exists() {
                return Some(p);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(PORT_POLL);
    }
}

/// Tells the VMM that init is serving: writes [`BOOT_TIMER_MAGIC`] to
/// [`BOOT_TIMER_PORT`] (ioperm(2) + `out`). Only as PID 1 (never on a host,
/// where the port could belong to real hardware), only once per process,
/// x86_64 only. Failures (no CAP_SYS_RAWIO, a kernel without
/// CONFIG_X86_IOPL_IOPERM) are logged and ignored.
pub fn signal_boot_ready() {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::atomic::{AtomicBool, Ordering};
        static DONE: AtomicBool = AtomicBool::new(false);
        if std::process::id() != 1 || DONE.swap(true, Ordering::AcqRel) {
            return;
        }
        let port = libc::c_ulong::from(BOOT_TIMER_PORT);
        // SAFETY: ioperm(2) only changes this thread's I/O permission bitmap.
        if unsafe { libc::ioperm(port, 1, 1) } != 0 {
            log(format!("boot timer: ioperm: {}", std::io::Error::last_os_error()));
            return;
        }
        // SAFETY: a one-byte port write, permitted by the ioperm above on
        // this same thread; it touches no memory, stack or flags.
        unsafe {
            core::arch::asm!(
                "out dx, al",
                in("dx") BOOT_TIMER_PORT,
                in("al") BOOT_TIMER_MAGIC,
                options(nomem, nostack, preserves_flags)
            );
            libc::ioperm(port, 1, 0);
        }
    }
}

/// Opens the port `O_RDWR|O_NONBLOCK|O_CLOEXEC|O_NOCTTY`.
pub fn open_port(path: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open(2) with a valid C string.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just opened, ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Syncs and powers the machine off (reboot(2) `RB_POWER_OFF`), or
/// restarts it (`RB_AUTOBOOT`) when `reboot`. Only returns if reboot(2)
/// failed (not PID 1 / no CAP_SYS_BOOT), after logging.
pub fn power_off(reboot: bool) {
    use nix::sys::reboot::{reboot as sys_reboot, RebootMode};
    nix::unistd::sync();
    log(if reboot { "rebooting" } else { "powering off" });
    let mode = if reboot { RebootMode::RB_AUTOBOOT } else { RebootMode::RB_POWER_OFF };
    let Err(e) = sys_reboot(mode);
    log(format!("reboot(2): {e}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hostname_is_added_to_hosts_once() {
        let d = tempfile::tempdir().unwrap();
        let hosts = d.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1\tlocalhost\n# 127.0.1.1 web\n").unwrap();
        hosts_entry(&hosts, "web").unwrap();
        hosts_entry(&hosts, "web").unwrap();
        let t = std::fs::read_to_string(&hosts).unwrap();
        assert_eq!(t, "127.0.0.1\tlocalhost\n# 127.0.1.1 web\n127.0.1.1\tweb\n", "a comment does not count");
        hosts_entry(&hosts, "localhost").unwrap();
        assert_eq!(std::fs::read_to_string(&hosts).unwrap(), t, "an existing name is left alone");
        let fresh = d.path().join("none");
        hosts_entry(&fresh, "a").unwrap();
        assert_eq!(std::fs::read_to_string(&fresh).unwrap(), "127.0.1.1\ta\n");
    }
}
