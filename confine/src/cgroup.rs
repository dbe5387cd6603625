//! Cgroups for sessions and VMs: memory and pids limits
//! (Documentation/admin-guide/cgroup-v2.rst; on v1
//! Documentation/admin-guide/cgroup-v1/memory.rst and pids.rst).
//!
//! [`Cgroup::own`] finds, once, where this process may make cgroups: its
//! own cgroup in a cgroup v2 hierarchy whose subtree offers the `memory`
//! and `pids` controllers, else its own cgroups in the cgroup v1 `memory`
//! and `pids` hierarchies (read from /proc/self/cgroup and
//! /proc/self/mountinfo). capvisor only ever creates cgroups below its own,
//! never at the root of a hierarchy someone else placed it in.
//!
//! A [`Cgroup`] names the same node in each hierarchy used (one directory
//! on v2; a `memory` and a `pids` directory on v1). The layout capvisor
//! makes (docs/vmm-confinement.md):
//!
//! ```text
//! <own>/capvisor-<broker pid>/session-<id>/worker     the session's worker
//! <own>/capvisor-<broker pid>/session-<id>/vm-<name>  a VM's vmm and QEMU
//! ```
//!
//! The worker sits in a leaf of its own because cgroup v2 lets no process
//! live in a cgroup that has enabled controllers for children ("no
//! internal processes", cgroup-v2.rst 2.4.2); the session cgroup carries
//! the session's limits over the worker and its VMs together.
//!
//! Processes are moved in by the child itself between fork and exec
//! ([`Placement::enter_in_child`] writes `0`, "this process", to the
//! `cgroup.procs` files opened in the parent), so nothing runs outside the
//! cgroup first.

use crate::{ConfineError, Layer};
use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where cgroup file systems are mounted unless the manifest says
/// otherwise (`[confinement] cgroup_root`).
pub const DEFAULT_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup API in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// Separate `memory` and `pids` hierarchies.
    V1,
    /// The unified hierarchy.
    V2,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        })
    }
}

/// Limits of one cgroup. `None` leaves the kernel's default (no limit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Memory, bytes: v2 `memory.max` (and `memory.swap.max` = 0); v1
    /// `memory.limit_in_bytes` and, where the kernel accounts swap,
    /// `memory.memsw.limit_in_bytes` with the same value (memory + swap =
    /// memory: the cgroup cannot spill into swap).
    pub memory_bytes: Option<u64>,
    /// Tasks (processes and threads): `pids.max`.
    pub pids: Option<u64>,
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.memory_bytes {
            Some(b) => write!(f, "memory={}MiB", b >> 20)?,
            None => f.write_str("memory=max")?,
        }
        match self.pids {
            Some(p) => write!(f, " pids={p}"),
            None => f.write_str(" pids=max"),
        }
    }
}

/// Name prefix of the subtree a broker makes below its own cgroup:
/// `capvisor-<broker pid>`.
pub const SUBTREE_PREFIX: &str = "capvisor-";
/// Name prefix of a session's cgroup: `session-<session id>`.
pub const SESSION_PREFIX: &str = "session-";
/// Name of the leaf a session's worker runs in.
pub const WORKER_LEAF: &str = "worker";
/// Name prefix of a VM's cgroup: `vm-<VM name>`.
pub const VM_PREFIX: &str = "vm-";

/// Memory one VM may use beyond its guest RAM, MiB: QEMU itself (about
/// 60 MiB resident for a 256 MiB TCG guest booted to guest-init and
/// running commands), its TCG translation cache (bounded to
/// 64 MiB by `-accel tcg,tb-size=64`), page cache of the kernel and
/// initramfs it reads (charged to the first reader, reclaimable), and the
/// vmm process (about 10 MiB). docs/bounds.md.
pub const VM_OVERHEAD_MIB: u64 = 192;
/// Tasks one VM may have besides one per vCPU: the vmm (tokio thread and
/// blocking pool), QEMU's main, RCU and I/O threads, and QEMU's block
/// thread pool (up to 64 workers). docs/bounds.md.
pub const VM_PIDS_BASE: u64 = 128;
/// Memory a session's worker may use, MiB (its own budget within the
/// session's cgroup).
pub const WORKER_MEMORY_MIB: u64 = 256;
/// Tasks a session's worker may have (tokio thread and blocking pool).
pub const WORKER_PIDS: u64 = 64;

/// Limits of one VM's cgroup: guest RAM + [`VM_OVERHEAD_MIB`], and
/// [`VM_PIDS_BASE`] + one task per vCPU.
pub fn vm_limits(memory_mib: u32, vcpus: u32) -> Limits {
    Limits {
        memory_bytes: Some((u64::from(memory_mib) + VM_OVERHEAD_MIB) << 20),
        pids: Some(VM_PIDS_BASE + u64::from(vcpus)),
    }
}

/// Limits of one session's cgroup: room for `max_vms` VMs at their
/// largest ([`vm_limits`] of `max_memory_mib`, `max_vcpus`) plus the
/// worker ([`WORKER_MEMORY_MIB`], [`WORKER_PIDS`]).
pub fn session_limits(max_vms: u32, max_memory_mib: u32, max_vcpus: u32) -> Limits {
    let vm = vm_limits(max_memory_mib, max_vcpus);
    let n = u64::from(max_vms);
    Limits {
        memory_bytes: Some(n * vm.memory_bytes.unwrap_or(0) + (WORKER_MEMORY_MIB << 20)),
        pids: Some(n * vm.pids.unwrap_or(0) + WORKER_PIDS),
    }
}

/// One cgroup node, in every hierarchy capvisor uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    version: Version,
    /// Directory holding the memory controller's files.
    memory: PathBuf,
    /// Directory holding the pids controller's files (= `memory` on v2).
    pids: PathBuf,
}

fn err(reason: impl Into<String>) -> ConfineError {
    ConfineError::new(Layer::Cgroup, reason)
}

/// One line of /proc/self/mountinfo (proc(5)) we care about.
struct Mount {
    root: String,
    point: PathBuf,
    fstype: String,
    options: Vec<String>,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(Mount {
                root: unescape(f.get(3)?),
                point: PathBuf::from(unescape(f.get(4)?)),
                fstype: r.first()?.to_string(),
                options: r.get(2).map(|o| o.split(',').map(str::to_string).collect()).unwrap_or_default(),
            })
        })
        .collect()
}

/// The directory of cgroup `path` (as /proc/self/cgroup names it) in the
/// hierarchy mounted by `m`.
fn dir_in(m: &Mount, path: &str) -> Option<PathBuf> {
    let rel = if m.root == "/" { path } else { path.strip_prefix(m.root.as_str())? };
    Some(m.point.join(rel.trim_start_matches('/')))
}

fn read_words(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p).unwrap_or_default().split_whitespace().map(str::to_string).collect()
}

fn writable(dir: &Path) -> Result<(), String> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|_| "NUL in path".to_string())?;
    // SAFETY: `c` is NUL-terminated.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
        return Err(format!("{} is not writable: {}", dir.display(), std::io::Error::last_os_error()));
    }
    Ok(())
}

fn write_file(p: &Path, v: &str) -> Result<(), ConfineError> {
    std::fs::write(p, v).map_err(|e| err(format!("writing {v:?} to {}: {e}", p.display())))
}

impl Cgroup {
    /// This process's own cgroup, under the hierarchies mounted below
    /// `root` ([`DEFAULT_ROOT`] normally): v2 when its subtree can have
    /// `memory` and `pids`, else v1.
    ///
    /// Errors: neither works; the reason names both attempts (no
    /// hierarchy under `root`, controllers missing, not writable, ...).
    pub fn own(root: &Path) -> Result<Cgroup, ConfineError> {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| err(format!("reading /proc/self/mountinfo: {e}")))?;
        let own =
            std::fs::read_to_string("/proc/self/cgroup").map_err(|e| err(format!("reading /proc/self/cgroup: {e}")))?;
        Self::own_from(root, &parse_mountinfo(&mounts), &own)
    }

    /// The session cgroup this process (a worker) was started in: its own
    /// cgroup must be a leaf named `worker` whose parent is named
    /// `session-*` (the layout the broker makes), in the v2 hierarchy when
    /// the parent has `memory` and `pids` enabled for its children, else in
    /// the v1 `memory` and `pids` hierarchies.
    ///
    /// Errors: this process is not in such a leaf (the broker could not
    /// make the session cgroup, or the hierarchies are not under `root`).
    pub fn session_of_worker(root: &Path) -> Result<Cgroup, ConfineError> {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| err(format!("reading /proc/self/mountinfo: {e}")))?;
        let own =
            std::fs::read_to_string("/proc/self/cgroup").map_err(|e| err(format!("reading /proc/self/cgroup: {e}")))?;
        let mounts = parse_mountinfo(&mounts);
        let mounts: Vec<&Mount> = mounts.iter().filter(|m| m.point.starts_with(root)).collect();
        let session_of = |c: Cgroup| -> Option<Cgroup> {
            let p = c.parent()?;
            (c.name() == WORKER_LEAF && p.name().starts_with(SESSION_PREFIX)).then_some(p)
        };
        let v2 = mounts.iter().find(|m| m.fstype == "cgroup2").and_then(|m| {
            let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
            let d = dir_in(m, path)?;
            let s = session_of(Cgroup { version: Version::V2, memory: d.clone(), pids: d })?;
            let sub = read_words(&s.memory.join("cgroup.subtree_control"));
            (sub.iter().any(|x| x == "memory") && sub.iter().any(|x| x == "pids")).then_some(s)
        });
        if let Some(s) = v2 {
            return Ok(s);
        }
        let v1 = Self::own_v1(&mounts, &own).map_err(|e| err(format!("not in a session cgroup: {e}")))?;
        session_of(v1.clone()).ok_or_else(|| {
            err(format!(
                "not in a session cgroup (this worker is in {}; the broker could not place it, see its log)",
                v1.memory.display()
            ))
        })
    }

    fn own_from(root: &Path, mounts: &[Mount], own: &str) -> Result<Cgroup, ConfineError> {
        let mounts: Vec<&Mount> = mounts.iter().filter(|m| m.point.starts_with(root)).collect();
        let v2 = Self::own_v2(&mounts, own);
        let v2_why = match v2 {
            Ok(c) => return Ok(c),
            Err(e) => e,
        };
        match Self::own_v1(&mounts, own) {
            Ok(c) => Ok(c),
            Err(v1_why) => Err(err(format!("no usable cgroup under {}: v2: {v2_why}; v1: {v1_why}", root.display()))),
        }
    }

    fn own_v2(mounts: &[&Mount], own: &str) -> Result<Cgroup, String> {
        let m = mounts.iter().find(|m| m.fstype == "cgroup2").ok_or("not mounted")?;
        let path = own.lines().find_map(|l| l.strip_prefix("0::")).ok_or("this process is in no v2 cgroup")?;
        let dir = dir_in(m, path).ok_or_else(|| format!("our cgroup {path} is outside the mount"))?;
        let have = read_words(&dir.join("cgroup.controllers"));
        for c in ["memory", "pids"] {
            if !have.iter().any(|h| h == c) {
                return Err(format!("controller {c} is not available in {} (have: {})", dir.display(), have.join(" ")));
            }
        }
        writable(&dir)?;
        // Children get the controllers only if our own cgroup enables them
        // for its subtree; that fails (EBUSY) when this cgroup holds
        // processes and is not the root (no internal processes).
        let sub = read_words(&dir.join("cgroup.subtree_control"));
        if !(sub.iter().any(|s| s == "memory") && sub.iter().any(|s| s == "pids")) {
            std::fs::write(dir.join("cgroup.subtree_control"), "+memory +pids")
                .map_err(|e| format!("cannot enable memory and pids for {}'s children: {e}", dir.display()))?;
        }
        Ok(Cgroup { version: Version::V2, memory: dir.clone(), pids: dir })
    }

    fn own_v1(mounts: &[&Mount], own: &str) -> Result<Cgroup, String> {
        let dir = |controller: &str| -> Result<PathBuf, String> {
            let m = mounts
                .iter()
                .find(|m| m.fstype == "cgroup" && m.options.iter().any(|o| o == controller))
                .ok_or_else(|| format!("no {controller} hierarchy mounted"))?;
            let path = own
                .lines()
                .find_map(|l| {
                    let mut it = l.splitn(3, ':');
                    let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
                    ctrls.split(',').any(|c| c == controller).then_some(path)
                })
                .ok_or_else(|| format!("this process is in no {controller} cgroup"))?;
            let d = dir_in(m, path).ok_or_else(|| format!("our {controller} cgroup {path} is outside the mount"))?;
            writable(&d)?;
            Ok(d)
        };
        Ok(Cgroup { version: Version::V1, memory: dir("memory")?, pids: dir("pids")? })
    }

    /// A cgroup from its directories (v2: `memory == pids`). No check is
    /// made; for tests and for a cgroup found earlier.
    pub fn from_dirs(version: Version, memory: PathBuf, pids: PathBuf) -> Cgroup {
        Cgroup { version, memory, pids }
    }

    /// The API in use.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The directories of this cgroup: one on v2, two (memory, pids) on v1.
    pub fn dirs(&self) -> Vec<&Path> {
        if self.memory == self.pids {
            vec![&self.memory]
        } else {
            vec![&self.memory, &self.pids]
        }
    }

    /// The last path component (`session-1a2b`, `vm-web`, ...).
    pub fn name(&self) -> String {
        self.memory.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// The parent cgroup (no check that it is one of ours).
    pub fn parent(&self) -> Option<Cgroup> {
        Some(Cgroup { version: self.version, memory: self.memory.parent()?.into(), pids: self.pids.parent()?.into() })
    }

    /// The cgroup `name` below this one, created if missing (an existing
    /// one is reused). On v2 this cgroup first enables `memory` and `pids`
    /// for its children.
    ///
    /// Errors: `name` is not a plain file name; the kernel refused (no
    /// permission, a read-only mount, ENOENT when this cgroup vanished).
    pub fn child(&self, name: &str) -> Result<Cgroup, ConfineError> {
        if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
            return Err(err(format!("bad cgroup name {name:?}")));
        }
        if self.version == Version::V2 {
            let sub = read_words(&self.memory.join("cgroup.subtree_control"));
            if !(sub.iter().any(|s| s == "memory") && sub.iter().any(|s| s == "pids")) {
                write_file(&self.memory.join("cgroup.subtree_control"), "+memory +pids")?;
            }
        }
        let c = self.at(name);
        for d in c.dirs() {
            match std::fs::create_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(err(format!("creating {}: {e}", d.display()))),
            }
        }
        Ok(c)
    }

    /// The cgroup `name` below this one, by path only (nothing is made or
    /// checked; see [`Cgroup::child`]).
    pub fn at(&self, name: &str) -> Cgroup {
        Cgroup { version: self.version, memory: self.memory.join(name), pids: self.pids.join(name) }
    }

    /// Sets `limits` (see [`Limits`] for the files written).
    ///
    /// Errors: the kernel refused a value (e.g. a memory limit below the
    /// current usage, EBUSY).
    pub fn set_limits(&self, limits: &Limits) -> Result<(), ConfineError> {
        if let Some(b) = limits.memory_bytes {
            match self.version {
                Version::V2 => {
                    write_file(&self.memory.join("memory.max"), &b.to_string())?;
                    let swap = self.memory.join("memory.swap.max");
                    if swap.exists() {
                        write_file(&swap, "0")?;
                    }
                }
                Version::V1 => {
                    // memsw must stay >= the memory limit: raise the
                    // memory limit's partner after, lower it before.
                    let memsw = self.memory.join("memory.memsw.limit_in_bytes");
                    let mem = self.memory.join("memory.limit_in_bytes");
                    let current_memsw = std::fs::read_to_string(&memsw).ok().and_then(|s| s.trim().parse::<u64>().ok());
                    if current_memsw.is_some_and(|c| c < b) {
                        write_file(&memsw, &b.to_string())?;
                        write_file(&mem, &b.to_string())?;
                    } else {
                        write_file(&mem, &b.to_string())?;
                        if current_memsw.is_some() {
                            write_file(&memsw, &b.to_string())?;
                        }
                    }
                }
            }
        }
        if let Some(p) = limits.pids {
            write_file(&self.pids.join("pids.max"), &p.to_string())?;
        }
        Ok(())
    }

    /// The limits in force, read back from the kernel's files.
    pub fn limits(&self) -> Limits {
        let num = |p: PathBuf| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
        let memory_bytes = match self.version {
            Version::V2 => num(self.memory.join("memory.max")),
            // v1 reports "no limit" as a huge page-aligned number.
            Version::V1 => num(self.memory.join("memory.limit_in_bytes")).filter(|b| *b < (1 << 62)),
        };
        Limits { memory_bytes, pids: num(self.pids.join("pids.max")) }
    }

    /// True when swap is accounted with memory here (v1
    /// `memory.memsw.limit_in_bytes` exists; v2 `memory.swap.max`).
    pub fn limits_swap(&self) -> bool {
        match self.version {
            Version::V1 => self.memory.join("memory.memsw.limit_in_bytes").exists(),
            Version::V2 => self.memory.join("memory.swap.max").exists(),
        }
    }

    /// One line for a [`crate::Report`]: `v1 memory=448MiB pids=129 (memory+swap)`.
    pub fn describe(&self) -> String {
        format!("{} {}{}", self.version, self.limits(), if self.limits_swap() { " (memory+swap)" } else { "" })
    }

    /// The highest memory use recorded, bytes (v1
    /// `memory.max_usage_in_bytes`, v2 `memory.peak`), if the kernel keeps it.
    pub fn memory_peak(&self) -> Option<u64> {
        let f = match self.version {
            Version::V1 => "memory.max_usage_in_bytes",
            Version::V2 => "memory.peak",
        };
        std::fs::read_to_string(self.memory.join(f)).ok()?.trim().parse().ok()
    }

    /// The processes in this cgroup (not its children), from `cgroup.procs`
    /// of every hierarchy, deduplicated.
    pub fn procs(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .dirs()
            .iter()
            .flat_map(|d| read_words(&d.join("cgroup.procs")))
            .filter_map(|p| p.parse().ok())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Opens `cgroup.procs` of every hierarchy, close-on-exec, for a child
    /// to enter this cgroup with ([`Placement::enter_in_child`]).
    ///
    /// Errors: a file cannot be opened for writing.
    pub fn placement(&self) -> Result<Placement, ConfineError> {
        let dirs: Vec<PathBuf> = self.dirs().into_iter().map(Path::to_path_buf).collect();
        Self::placement_of(&dirs)
    }

    /// [`Cgroup::placement`] for a cgroup known only by its directories
    /// (as a `VmConfig` carries them).
    ///
    /// Errors: as [`Cgroup::placement`].
    pub fn placement_of(dirs: &[PathBuf]) -> Result<Placement, ConfineError> {
        let mut fds = Vec::new();
        for d in dirs {
            let p = d.join("cgroup.procs");
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(|e| err(format!("opening {}: {e}", p.display())))?;
            fds.push(OwnedFd::from(f));
        }
        Ok(Placement { fds })
    }

    /// Removes this cgroup and every cgroup below it (rmdir(2), deepest
    /// first). Cgroups that still hold processes stay (`EBUSY`).
    ///
    /// Errors: the first rmdir that failed for a reason other than the
    /// cgroup being gone already.
    pub fn remove(&self) -> std::io::Result<()> {
        let mut first = None;
        for d in self.dirs() {
            if let Err(e) = remove_tree(d) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Removes this cgroup ([`Cgroup::remove`]) once its processes are
    /// gone, retrying for up to `within` on a thread of its own; when
    /// `parent_too`, then also the parent if it is empty by then. Failures
    /// are logged.
    pub fn remove_when_empty(self, within: Duration, parent_too: bool) -> std::thread::JoinHandle<bool> {
        // Usually the processes are gone already: remove at once, so a
        // process that exits right after leaves nothing behind.
        if self.remove().is_ok() {
            if parent_too {
                self.remove_parent_if_empty();
            }
            return std::thread::spawn(|| true);
        }
        pending().lock().unwrap_or_else(|p| p.into_inner()).push(self.memory.clone());
        std::thread::spawn(move || {
            let _unlist = Unlist(self.memory.clone());
            let deadline = std::time::Instant::now() + within;
            let done = loop {
                match self.remove() {
                    Ok(()) => break true,
                    Err(e) if std::time::Instant::now() >= deadline => {
                        tracing::warn!("cgroup {} not removed: {e}", self.memory.display());
                        break false;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            if done && parent_too {
                self.remove_parent_if_empty();
            }
            done
        })
    }

    fn remove_parent_if_empty(&self) {
        if let Some(p) = self.parent() {
            for d in p.dirs() {
                // Other children keep it busy; that is fine.
                let _ = std::fs::remove_dir(d);
            }
        }
    }

    /// Waits up to `within` while a [`Cgroup::remove_when_empty`] of this
    /// same cgroup is still running in this process, so a cgroup made again
    /// under the same name (a VM re-created) is not removed under its new
    /// processes. Returns false if one still runs.
    pub fn wait_removal(&self, within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        loop {
            if !pending().lock().unwrap_or_else(|p| p.into_inner()).contains(&self.memory) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Removes the children of this cgroup named `<prefix><pid>` (or
    /// `<prefix><pid>-<suffix>`) whose
    /// process is gone (a crashed capvisor's subtree), with everything
    /// below them. Returns one line per subtree handled, for the log.
    pub fn clean_stale(&self, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        let me = std::process::id();
        for d in self.dirs() {
            let Ok(rd) = std::fs::read_dir(d) else { continue };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                // `<prefix><pid>`, optionally followed by `-<anything>`.
                let pid =
                    name.strip_prefix(prefix).and_then(|p| p.split('-').next()).and_then(|p| p.parse::<u32>().ok());
                let Some(pid) = pid else { continue };
                if pid == me || Path::new(&format!("/proc/{pid}")).exists() || !e.path().is_dir() {
                    continue;
                }
                match remove_tree(&e.path()) {
                    Ok(()) => out.push(format!("removed stale cgroup {}", e.path().display())),
                    Err(err) => out.push(format!("stale cgroup {} not removed: {err}", e.path().display())),
                }
            }
        }
        out
    }
}

/// Cgroups a [`Cgroup::remove_when_empty`] thread is removing.
fn pending() -> &'static std::sync::Mutex<Vec<PathBuf>> {
    static PENDING: std::sync::OnceLock<std::sync::Mutex<Vec<PathBuf>>> = std::sync::OnceLock::new();
    PENDING.get_or_init(Default::default)
}

/// Takes a path off [`pending`] when dropped.
struct Unlist(PathBuf);

impl Drop for Unlist {
    fn drop(&mut self) {
        let mut p = pending().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = p.iter().position(|x| *x == self.0) {
            p.swap_remove(i);
        }
    }
}

fn remove_tree(dir: &Path) -> std::io::Result<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut first = None;
    for e in rd.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            if let Err(x) = remove_tree(&e.path()) {
                first.get_or_insert(x);
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// Open `cgroup.procs` files of one cgroup, for a child to enter it.
#[derive(Debug)]
pub struct Placement {
    fds: Vec<OwnedFd>,
}

impl Placement {
    /// In the child, between fork and exec: writes `0` (the writing
    /// process, cgroup-v2.rst "cgroup.procs"; the same on v1) to each
    /// `cgroup.procs`, moving the child into the cgroup.
    ///
    /// Errors: the kernel's errno (e.g. `EAGAIN` when `pids.max` is reached,
    /// `ENOENT` when the cgroup was removed).
    pub fn enter_in_child(&self) -> std::io::Result<()> {
        for fd in &self.fds {
            // SAFETY: write(2) on a descriptor we own, from a static buffer.
            let n = unsafe { libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) };
            if n != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn own() -> Cgroup {
        Cgroup::own(Path::new(DEFAULT_ROOT)).unwrap_or_else(|e| panic!("this host offers no usable cgroup: {e}"))
    }

    #[test]
    fn parses_hybrid_hosts() {
        let mounts = parse_mountinfo(
            "30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
             31 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
             32 25 0:28 /outer /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n\
             33 25 0:29 / /other\\040place rw - cgroup cgroup rw,memory\n",
        );
        assert_eq!(mounts[3].point, Path::new("/other place"));
        let own = "8:pids:/outer/x\n4:memory:/process_api/abc\n0::/\n";
        let c = Cgroup::own_from(Path::new("/sys/fs/cgroup"), &mounts, own);
        // The unified hierarchy at / of a fake tree offers no controllers
        // here (its files do not exist), so v1 is chosen unless the v1
        // directories are not writable on this machine: either way the
        // error names both.
        match c {
            Ok(c) => {
                assert_eq!(c.version(), Version::V1);
                assert_eq!(c.memory, Path::new("/sys/fs/cgroup/memory/process_api/abc"));
                assert_eq!(c.pids, Path::new("/sys/fs/cgroup/pids/x"));
            }
            Err(e) => assert!(e.reason.contains("v2:") && e.reason.contains("v1:"), "{e}"),
        }
        let none = Cgroup::own_from(Path::new("/nowhere"), &mounts, own).unwrap_err();
        assert_eq!(none.layer, Layer::Cgroup);
        assert!(none.reason.contains("/nowhere") && none.reason.contains("not mounted"), "{none}");
    }

    /// Creates a cgroup under our own, sets limits, moves a child in from
    /// its pre_exec hook, sees it there, and removes the cgroup after.
    #[test]
    fn a_child_enters_its_limited_cgroup_before_exec_and_the_cgroup_goes_after() {
        let own = own();
        let top = own.child(&format!("capvisor-test-{}", std::process::id())).unwrap();
        let vm = top.child("vm-a").unwrap();
        let limits = Limits { memory_bytes: Some(64 << 20), pids: Some(8) };
        vm.set_limits(&limits).unwrap();
        assert_eq!(vm.limits(), limits);
        assert!(vm.describe().contains("memory=64MiB pids=8"), "{}", vm.describe());

        let mut cmd = std::process::Command::new("/bin/cat");
        cmd.arg("/proc/self/cgroup").stdout(std::process::Stdio::piped());
        crate::ChildConfinement { cgroup: Some(vm.placement().unwrap()), ..Default::default() }.install(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let mut out = String::new();
        child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        assert!(child.wait().unwrap().success());
        let leaf = format!("/capvisor-test-{}/vm-a", std::process::id());
        let want = if vm.version() == Version::V1 { ["memory", "pids"].as_slice() } else { [""].as_slice() };
        for c in want {
            let line = out
                .lines()
                .find(|l| l.split(':').nth(1).is_some_and(|cs| cs.split(',').any(|x| x == *c)))
                .unwrap_or_else(|| panic!("no {c} line in {out}"));
            assert!(line.ends_with(&leaf), "{c}: {line} (want ...{leaf})");
        }

        // A sleeping child keeps the cgroup busy; remove() refuses, then
        // succeeds once it is gone.
        let mut cmd = std::process::Command::new("/bin/sleep");
        cmd.arg("30");
        crate::ChildConfinement { cgroup: Some(vm.placement().unwrap()), ..Default::default() }.install(&mut cmd);
        let mut sleeper = cmd.spawn().unwrap();
        assert_eq!(vm.procs(), vec![sleeper.id()]);
        assert!(top.remove().is_err(), "a cgroup with a process cannot be removed");
        assert!(vm.dirs()[0].exists());
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        assert!(top.clone().remove_when_empty(Duration::from_secs(5), false).join().unwrap());
        for d in top.dirs() {
            assert!(!d.exists(), "{} removed", d.display());
        }
    }

    /// pids.max holds: with room for the child alone, its fork fails with EAGAIN.
    #[test]
    fn the_pids_limit_stops_a_fork() {
        let own = own();
        let top = own.child(&format!("capvisor-test-pids-{}", std::process::id())).unwrap();
        top.set_limits(&Limits { memory_bytes: None, pids: Some(1) }).unwrap();
        let mut cmd = std::process::Command::new("/usr/bin/python3");
        cmd.args(["-c", "import os\ntry:\n    pid = os.fork()\nexcept OSError as e:\n    print('refused', e.errno)\nelse:\n    print('forked') if pid else os._exit(0)"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        crate::ChildConfinement { cgroup: Some(top.placement().unwrap()), ..Default::default() }.install(&mut cmd);
        let out = cmd.output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("refused {}", libc::EAGAIN));
        assert!(top.remove_when_empty(Duration::from_secs(5), false).join().unwrap());
    }

    /// The memory limit holds: a child that writes 128 MiB in a 32 MiB
    /// cgroup is killed (SIGKILL from the cgroup's OOM killer), while one
    /// that stays below it finishes.
    #[test]
    fn the_memory_limit_ends_a_process_that_exceeds_it() {
        use std::os::unix::process::ExitStatusExt;
        let own = own();
        let top = own.child(&format!("capvisor-test-mem-{}", std::process::id())).unwrap();
        top.set_limits(&Limits { memory_bytes: Some(32 << 20), pids: None }).unwrap();
        let run = |mib: u32| {
            let mut cmd = std::process::Command::new("/usr/bin/python3");
            cmd.args(["-c", &format!("b = b'x' * ({mib} << 20); print(len(b) >> 20)")])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null());
            crate::ChildConfinement { cgroup: Some(top.placement().unwrap()), ..Default::default() }.install(&mut cmd);
            cmd.output().unwrap()
        };
        let small = run(4);
        assert!(small.status.success(), "{:?}", small.status);
        assert_eq!(String::from_utf8_lossy(&small.stdout).trim(), "4");
        let big = run(128);
        assert_eq!(big.status.signal(), Some(libc::SIGKILL), "{:?}", big.status);
        assert!(big.stdout.is_empty());
        assert!(top.memory_peak().unwrap_or(0) <= 32 << 20);
        assert!(top.remove_when_empty(Duration::from_secs(5), false).join().unwrap());
    }

    #[test]
    fn stale_subtrees_of_dead_processes_are_removed() {
        let own = own();
        let parent = own.child(&format!("capvisor-test-stale-{}", std::process::id())).unwrap();
        // A pid that is surely not running: above pid_max.
        let dead = parent.child("capvisor-99999999").unwrap();
        let dead_suffixed = parent.child("capvisor-99999998-3").unwrap();
        dead.child("session-x").unwrap().child("vm-y").unwrap();
        let alive = parent.child(&format!("capvisor-{}", std::process::id())).unwrap();
        let notes = parent.clean_stale("capvisor-");
        assert_eq!(notes.len(), 2 * dead.dirs().len(), "{notes:?}");
        assert!(dead.dirs().iter().chain(dead_suffixed.dirs().iter()).all(|d| !d.exists()));
        assert!(alive.dirs().iter().all(|d| d.exists()), "our own subtree stays");
        assert!(parent.child("../x").is_err());
        parent.remove().unwrap();
    }
}
