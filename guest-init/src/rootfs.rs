//! Switching PID 1 into a real root file system: a read-only root image
//! (ext4 on virtio-blk) under an overlayfs whose upper layer is a per-VM
//! writable ext4 disk; and looking users up in that root's `/etc/passwd`
//! and `/etc/group`.
//!
//! The host asks for the switch on the kernel command line (`/proc/cmdline`,
//! see [`RootPlan::from_cmdline`]):
//! `capvisor.root=/dev/vda capvisor.upper=/dev/vdb capvisor.hostname=<vm>`.
//! Without `capvisor.root=` nothing happens (the base image stays on its
//! initramfs). The switch follows util-linux `switch_root(8)`: the initramfs
//! is the kernel's `rootfs` and cannot be `pivot_root(2)`ed away, so the new
//! root is moved onto `/` (`mount --move`) and PID 1 `chroot(2)`s into it.
//! PID 1 stays guest-init (its open descriptors stay open); programs it
//! execs afterwards see the new root. Layout (overlayfs, see the kernel's
//! `Documentation/filesystems/overlayfs.rst`):
//!
//! - `/run/capvisor/ro`: the root image, ext4, `MS_RDONLY` (lowerdir)
//! - `/run/capvisor/rw`: the writable disk, ext4; `upper/` and `work/` on it
//! - `/run/capvisor/root`: the overlay, moved onto `/`
//!
//! `/proc`, `/sys` and `/dev` (with `/dev/pts` and `/dev/shm` under it) are
//! moved into the new root; `/tmp` (mode 1777) and `/run` (0755) are fresh
//! tmpfs there.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// What the kernel command line asks of guest-init.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RootPlan {
    /// `capvisor.root=`: the read-only root image's block device; `None`:
    /// stay on the initramfs.
    pub root: Option<PathBuf>,
    /// `capvisor.upper=`: the writable layer's block device (ext4, made by
    /// the host); required with `root`.
    pub upper: Option<PathBuf>,
    /// `capvisor.hostname=`: the hostname (the VM name); `None`: keep
    /// [`crate::init::HOSTNAME`].
    pub hostname: Option<String>,
    /// `capvisor.vol=<device>:<rw|ro>:<path>`, one word per volume, in
    /// order: persistent volumes (ext4, formatted by the host) to mount
    /// once the root is in place ([`mount_volumes`]).
    pub volumes: Vec<VolumeMount>,
}

/// One volume to mount (a `capvisor.vol=` word).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeMount {
    /// Its block device (`/dev/vdc`).
    pub device: PathBuf,
    /// Mounted read-only (the device is read-only too).
    pub read_only: bool,
    /// Absolute mount point in the guest (made if missing).
    pub path: PathBuf,
}

impl VolumeMount {
    /// Parses `<device>:<rw|ro>:<path>`; `None` when malformed (both paths
    /// absolute, no `..` component in the mount point).
    pub fn parse(v: &str) -> Option<VolumeMount> {
        let mut it = v.splitn(3, ':');
        let (dev, mode, path) = (it.next()?, it.next()?, it.next()?);
        let read_only = match mode {
            "ro" => true,
            "rw" => false,
            _ => return None,
        };
        let path = Path::new(path);
        let ok = dev.starts_with("/dev/")
            && path.is_absolute()
            && path.components().all(|c| matches!(c, std::path::Component::RootDir | std::path::Component::Normal(_)))
            && path != Path::new("/");
        ok.then(|| VolumeMount { device: dev.into(), read_only, path: path.to_path_buf() })
    }
}

impl RootPlan {
    /// Parses a kernel command line (`/proc/cmdline`: parameters separated
    /// by white space, later ones win; quoting is not used by capvisor and
    /// not interpreted). Empty values count as absent. A hostname longer
    /// than 64 bytes (`HOST_NAME_MAX`, gethostname(2)) is cut to 64.
    pub fn from_cmdline(cmdline: &str) -> RootPlan {
        let mut plan = RootPlan::default();
        for word in cmdline.split_whitespace() {
            let Some((k, v)) = word.split_once('=') else { continue };
            if v.is_empty() {
                continue;
            }
            match k {
                "capvisor.root" => plan.root = Some(PathBuf::from(v)),
                "capvisor.upper" => plan.upper = Some(PathBuf::from(v)),
                "capvisor.vol" => plan.volumes.extend(VolumeMount::parse(v)),
                "capvisor.hostname" => {
                    let mut end = v.len().min(64);
                    while !v.is_char_boundary(end) {
                        end -= 1;
                    }
                    plan.hostname = Some(v[..end].to_string());
                }
                _ => {}
            }
        }
        plan
    }

    /// Reads `/proc/cmdline` (an empty plan when unreadable).
    pub fn from_proc() -> RootPlan {
        RootPlan::from_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default())
    }
}

/// How long [`switch_root`] waits for a block device node to appear.
pub const DEVICE_TIMEOUT: Duration = Duration::from_secs(10);

fn wait_for(dev: &Path) -> Result<(), String> {
    let deadline = std::time::Instant::now() + DEVICE_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    while !dev.exists() {
        if std::time::Instant::now() >= deadline {
            return Err(format!("{} did not appear within {:?}", dev.display(), DEVICE_TIMEOUT));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    Ok(())
}

fn mkdir(p: &str) -> Result<(), String> {
    std::fs::create_dir_all(p).map_err(|e| format!("mkdir {p}: {e}"))
}

/// Mounts the root image, the writable layer and the overlay, and switches
/// PID 1's root into it (see the module docs). Call after
/// [`crate::init::mount_basics`] (it needs /proc, /sys and /dev). Does
/// nothing when `plan.root` is `None`.
///
/// Errors: a message naming the step (a device that never appeared, a
/// mount(2) / chroot(2) failure with its errno); the caller logs it and
/// powers off. Earlier mounts are left as they are (the machine is going
/// down).
pub fn switch_root(plan: &RootPlan) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    let Some(root) = &plan.root else { return Ok(()) };
    let upper = plan.upper.as_ref().ok_or("capvisor.root= given without capvisor.upper=")?;
    let (ro, rw, new) = ("/run/capvisor/ro", "/run/capvisor/rw", "/run/capvisor/root");
    for d in [ro, rw, new] {
        mkdir(d)?;
    }
    wait_for(root)?;
    wait_for(upper)?;
    mount(Some(root.as_path()), ro, Some("ext4"), MsFlags::MS_RDONLY, Some("noload"))
        .map_err(|e| format!("mount root image {} (ext4, read-only): {e}", root.display()))?;
    mount(Some(upper.as_path()), rw, Some("ext4"), MsFlags::empty(), None::<&str>)
        .map_err(|e| format!("mount writable layer {} (ext4): {e}", upper.display()))?;
    mkdir("/run/capvisor/rw/upper")?;
    mkdir("/run/capvisor/rw/work")?;
    let opts = format!("lowerdir={ro},upperdir={rw}/upper,workdir={rw}/work");
    mount(Some("overlay"), new, Some("overlay"), MsFlags::empty(), Some(opts.as_str()))
        .map_err(|e| format!("mount overlay ({opts}): {e}"))?;
    // The lower and upper mounts stay in the old root's /run, out of reach
    // after the chroot; they are used only through the overlay.
    for d in ["/proc", "/sys", "/dev"] {
        let target = format!("{new}{d}");
        mkdir(&target)?;
        mount(Some(d), target.as_str(), None::<&str>, MsFlags::MS_MOVE, None::<&str>)
            .map_err(|e| format!("move {d} into the new root: {e}"))?;
    }
    std::env::set_current_dir(new).map_err(|e| format!("chdir {new}: {e}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("move the new root onto /: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    for (target, data) in [("/tmp", "mode=1777"), ("/run", "mode=0755")] {
        mkdir(target)?;
        mount(Some("tmpfs"), target, Some("tmpfs"), nosuid_nodev, Some(data))
            .map_err(|e| format!("mount tmpfs on {target}: {e}"))?;
    }
    Ok(())
}

/// Mounts each of `plan.volumes` (ext4; read-write ones `nosuid,nodev`,
/// read-only ones also `MS_RDONLY` with `noload`, so a journal left dirty
/// by a crashed VM is not replayed onto a read-only device), making the
/// mount point first. Call after [`switch_root`] (the mount points are in
/// the final root).
///
/// Errors: the first volume that cannot be mounted, naming it and the
/// errno; the caller logs it and powers off (a VM without the volume it
/// was created with must not look healthy).
pub fn mount_volumes(plan: &RootPlan) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    for v in &plan.volumes {
        wait_for(&v.device)?;
        let target = v.path.to_string_lossy().into_owned();
        mkdir(&target)?;
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        let mut data = None;
        if v.read_only {
            flags |= MsFlags::MS_RDONLY;
            data = Some("noload");
        }
        mount(Some(v.device.as_path()), target.as_str(), Some("ext4"), flags, data).map_err(|e| {
            format!(
                "mount volume {} on {target} (ext4, {}): {e}",
                v.device.display(),
                if v.read_only { "read-only" } else { "read-write" }
            )
        })?;
    }
    Ok(())
}

/// A user to run a program as, from the guest's `/etc/passwd` and
/// `/etc/group` (passwd(5), group(5)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// Login name (the numeric uid as text when it has no passwd entry).
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups: every group(5) entry listing `name` as a
    /// member, plus `gid`, ascending, without duplicates.
    pub groups: Vec<u32>,
    /// Home directory (`/` for a uid without a passwd entry).
    pub home: String,
    /// Login shell (`/bin/sh` when the entry has none).
    pub shell: String,
}

/// Looks `spec` (a login name or a numeric uid) up in the texts of
/// `/etc/passwd` and `/etc/group`. A numeric uid without an entry is
/// allowed: gid = uid, home `/`, no supplementary groups beyond gid.
/// Malformed lines are skipped.
///
/// Errors: the message "no user NAME in the guest" for an unknown name.
pub fn lookup_user(spec: &str, passwd: &str, group: &str) -> Result<User, String> {
    let numeric = spec.parse::<u32>().ok();
    let entry = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 7 {
            return None;
        }
        let (uid, gid) = (f[2].parse::<u32>().ok()?, f[3].parse::<u32>().ok()?);
        let hit = match numeric {
            Some(n) => uid == n,
            None => f[0] == spec,
        };
        hit.then(|| (f[0].to_string(), uid, gid, f[5].to_string(), f[6].to_string()))
    });
    let (name, uid, gid, home, shell) = match (entry, numeric) {
        (Some(e), _) => e,
        (None, Some(n)) => (n.to_string(), n, n, "/".to_string(), "/bin/sh".to_string()),
        (None, None) => return Err(format!("no user {spec} in the guest")),
    };
    let mut groups = vec![gid];
    for l in group.lines() {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 {
            continue;
        }
        let Ok(g) = f[2].parse::<u32>() else { continue };
        if f[3].split(',').any(|m| m == name) {
            groups.push(g);
        }
    }
    groups.sort_unstable();
    groups.dedup();
    let home = if home.is_empty() { "/".to_string() } else { home };
    let shell = if shell.is_empty() { "/bin/sh".to_string() } else { shell };
    Ok(User { name, uid, gid, groups, home, shell })
}

/// [`lookup_user`] on the running system's `/etc/passwd` and `/etc/group`
/// (missing files read as empty).
pub fn lookup_user_here(spec: &str) -> Result<User, String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    lookup_user(spec, &passwd, &group)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_without_root_is_empty() {
        let p = RootPlan::from_cmdline("console=ttyS0 reboot=t panic=-1 quiet\n");
        assert_eq!(p, RootPlan::default());
    }

    #[test]
    fn cmdline_with_root_upper_hostname() {
        let p = RootPlan::from_cmdline(
            "console=ttyS0 capvisor.root=/dev/vda capvisor.upper=/dev/vdb capvisor.hostname=web-1 quiet\n",
        );
        assert_eq!(p.root.as_deref(), Some(Path::new("/dev/vda")));
        assert_eq!(p.upper.as_deref(), Some(Path::new("/dev/vdb")));
        assert_eq!(p.hostname.as_deref(), Some("web-1"));
    }

    #[test]
    fn cmdline_volumes_in_order_malformed_ones_dropped() {
        let p = RootPlan::from_cmdline(
            "capvisor.vol=/dev/vdc:rw:/work capvisor.vol=/dev/vdd:ro:/srv/data capvisor.vol=/dev/vde:xx:/a \
             capvisor.vol=/dev/vdf:rw:/a/../etc capvisor.vol=/dev/vdg:rw:/ capvisor.vol=vdh:rw:/b \
             capvisor.vol=/dev/vdi:rw:rel capvisor.vol=/dev/vdj:rw",
        );
        assert_eq!(
            p.volumes,
            vec![
                VolumeMount { device: "/dev/vdc".into(), read_only: false, path: "/work".into() },
                VolumeMount { device: "/dev/vdd".into(), read_only: true, path: "/srv/data".into() },
            ]
        );
        assert!(p.root.is_none());
    }

    #[test]
    fn cmdline_empty_values_absent_later_wins_long_hostname_cut() {
        let long = "h".repeat(100);
        let p = RootPlan::from_cmdline(&format!(
            "capvisor.root= capvisor.upper=/dev/vdb capvisor.upper=/dev/vdc capvisor.hostname={long}"
        ));
        assert_eq!(p.root, None);
        assert_eq!(p.upper.as_deref(), Some(Path::new("/dev/vdc")));
        assert_eq!(p.hostname.as_deref().map(str::len), Some(64));
    }

    #[test]
    fn switch_without_root_does_nothing_and_root_needs_upper() {
        assert_eq!(switch_root(&RootPlan::default()), Ok(()));
        let p = RootPlan { root: Some("/dev/vda".into()), ..Default::default() };
        assert!(switch_root(&p).unwrap_err().contains("capvisor.upper"));
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        garbage line\n\
        agent:x:1000:1000:Agent,,,:/home/agent:/bin/bash\n\
        nobody:x:65534:65534:nobody:/nonexistent:\n";
    const GROUP: &str = "root:x:0:\nsudo:x:27:agent\nagent:x:1000:\nusers:x:100:root,agent\nbad\n";

    #[test]
    fn user_by_name_with_groups() {
        let u = lookup_user("agent", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str(), u.shell.as_str()), (1000, 1000, "/home/agent", "/bin/bash"));
        assert_eq!(u.groups, vec![27, 100, 1000]);
        let r = lookup_user("root", PASSWD, GROUP).unwrap();
        assert_eq!((r.uid, r.home.as_str()), (0, "/root"));
        assert_eq!(r.groups, vec![0, 100]);
    }

    #[test]
    fn user_by_uid_and_unknown_uid() {
        let u = lookup_user("1000", PASSWD, GROUP).unwrap();
        assert_eq!(u.name, "agent");
        let n = lookup_user("65534", PASSWD, GROUP).unwrap();
        assert_eq!(n.shell, "/bin/sh", "empty shell field defaults");
        let x = lookup_user("4242", PASSWD, GROUP).unwrap();
        assert_eq!((x.uid, x.gid, x.home.as_str(), x.groups.clone()), (4242, 4242, "/", vec![4242]));
    }

    #[test]
    fn unknown_name_is_an_error() {
        assert_eq!(lookup_user("mallory", PASSWD, GROUP).unwrap_err(), "no user mallory in the guest");
        assert!(lookup_user("agent", "", "").is_err());
    }
}
