//! The `capvisor serve` a soak run starts: private dirs, a manifest written
//! for the run, a log file; a sampler of its process tree (peak RSS per
//! process kind, every process it ever had); the scan for processes left
//! behind.

use crate::procs;
use anyhow::{bail, Context};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Password of every session-load account (`soak0`, `soak1`, ...).
pub const ACCOUNT_PASSWORD: &str = "soak-pass-0001";
/// The account the hostile client guesses passwords for (never logged
/// into by the well-behaved clients, so its login throttle harms nobody).
pub const TARGET_ACCOUNT: &str = "target";
/// The target's real password.
pub const TARGET_PASSWORD: &str = "target-real-pw";

/// The process kinds the report names, by program file name.
pub const KINDS: &[&str] =
    &["capvisor", "capvisor-gateway", "capvisor-broker", "capvisor-worker", "capvisor-vmm", "qemu-system-x86_64"];

/// The manifest of a run: owner and user bundles with room for `sessions`
/// sessions and `vms` VMs of `vm_mib` MiB each (4 per session), the
/// default image, both auth methods.
pub fn manifest(sessions: usize, vms: usize, vm_mib: u32) -> String {
    let max_total = (sessions + 64).max(256);
    let host_vms = (vms + 8).max(24);
    format!(
        r#"[gateway]
auth = ["local", "password"]
session_ttl_secs = 3600

[vms]
max_host_vms = {host_vms}

[sessions]
max_total = {max_total}
reserved_for_owner = 16

[images.base]
kernel = "minimal"

[profiles.owner]
bundle = "owner"

[profiles.user]
bundle = "user"

[bundles.owner]
caps = ["vms", "accounts"]
max_sessions = {max_total}
max_vms = 4
max_memory_mib = 512
default_memory_mib = {vm_mib}
max_vcpus = 1
images = ["base"]

[bundles.user]
caps = ["vms"]
max_sessions = 64
max_vms = 2
max_memory_mib = 512
default_memory_mib = {vm_mib}
max_vcpus = 1
images = ["base"]
"#
    )
}

/// A running `capvisor serve`.
pub struct Serve {
    /// The run's directory (socket, state, manifest, log).
    pub dir: PathBuf,
    /// Gateway socket.
    pub socket: PathBuf,
    /// State directory (holds `audit.jsonl`).
    pub state: PathBuf,
    child: Option<Child>,
    /// Its pid.
    pub pid: u32,
}

impl Serve {
    /// Starts `bin_dir/capvisor serve --manifest` under `dir` and waits
    /// (bounded by `timeout`: the first run may build the guest image) for
    /// its socket.
    ///
    /// Errors: serve exits early or its socket does not appear in time.
    pub fn start(
        bin_dir: &Path,
        guest_init: &Path,
        dir: &Path,
        manifest: &str,
        timeout: Duration,
    ) -> anyhow::Result<Serve> {
        let socket = dir.join("run/gateway.sock");
        let state = dir.join("state");
        let mpath = dir.join("manifest.toml");
        std::fs::write(&mpath, manifest)?;
        let log = std::fs::File::create(dir.join("serve.log"))?;
        let child = Command::new(bin_dir.join("capvisor"))
            .arg("serve")
            .arg("--manifest")
            .arg(&mpath)
            .env("CAPVISOR_SOCKET", &socket)
            .env("CAPVISOR_STATE_DIR", &state)
            .env("CAPVISOR_BIN_DIR", bin_dir)
            .env("CAPVISOR_GUEST_INIT", guest_init)
            .env("CAPVISOR_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}/capvisor serve", bin_dir.display()))?;
        let pid = child.id();
        let mut s = Serve { dir: dir.to_path_buf(), socket, state, child: Some(child), pid };
        let t0 = Instant::now();
        while !s.socket.exists() {
            if let Some(st) = s.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("capvisor serve exited early ({st}):\n{}", s.log_tail(40));
            }
            if t0.elapsed() > timeout {
                bail!("capvisor serve did not come up in {timeout:?}:\n{}", s.log_tail(40));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(s)
    }

    /// The last `n` lines of serve's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// serve's exit status if it has ended (reaps it).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits up to `limit` for serve to end on its own.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.exited() {
                return Some(st);
            }
            if t0.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then up to 60 s for serve to end; SIGKILL to it and its
    /// tree if it does not. Returns its status and whether it ended on
    /// SIGTERM alone.
    pub fn stop(&mut self) -> (Option<std::process::ExitStatus>, bool) {
        if let Some(st) = self.exited() {
            return (Some(st), true);
        }
        signal(self.pid, nix::sys::signal::Signal::SIGTERM);
        if let Some(st) = self.wait_exit(Duration::from_secs(60)) {
            return (Some(st), true);
        }
        self.kill_tree();
        (self.child.as_mut().and_then(|c| c.wait().ok()), false)
    }

    /// SIGKILL to serve and everything below it (the deadline's last resort).
    pub fn kill_tree(&mut self) {
        for p in procs::below(&procs::table(), self.pid) {
            signal(p.pid, nix::sys::signal::Signal::SIGKILL);
        }
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if self.exited().is_none() {
            self.stop();
        }
    }
}

/// Sends `sig` to `pid` (errors ignored: it may be gone).
pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// What the sampler saw.
#[derive(Default)]
pub struct Seen {
    /// Peak `VmHWM` per kind, KiB, and how many processes of that kind.
    pub peak: BTreeMap<String, (u64, BTreeSet<u32>)>,
    /// Every (pid, start time) seen below serve.
    pub all: BTreeSet<(u32, u64)>,
}

/// Samples serve's process tree every 200 ms on a thread until dropped.
pub struct Sampler {
    /// What it saw so far.
    pub seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The report's kind of a process, by program name.
pub fn kind_of(p: &procs::Proc) -> Option<&'static str> {
    let name = p.name();
    KINDS.iter().copied().find(|k| *k == name || (k.starts_with("qemu") && name.starts_with("qemu-system")))
}

impl Sampler {
    /// Starts sampling below `root` (serve's pid; serve itself is counted too).
    pub fn start(root: u32) -> Sampler {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st2.load(Ordering::Relaxed) {
                sample(root, &s2);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Sampler { seen, stop, thread: Some(thread) }
    }

    /// Takes one sample now (e.g. right before a kill).
    pub fn sample_now(&self, root: u32) {
        sample(root, &self.seen);
    }
}

fn sample(root: u32, seen: &Mutex<Seen>) {
    let table = procs::table();
    let mut rows = procs::below(&table, root);
    rows.extend(table.iter().filter(|p| p.pid == root).cloned());
    let mut s = seen.lock().unwrap();
    for p in rows {
        s.all.insert((p.pid, p.start));
        if let Some(k) = kind_of(&p) {
            let hwm = procs::hwm_kib(p.pid);
            let e = s.peak.entry(k.to_string()).or_default();
            e.0 = e.0.max(hwm);
            e.1.insert(p.pid);
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Processes of this run still alive: any process the sampler saw (same
/// pid and start time) and any whose command line names the run's
/// directory `dir`, except this process and its hostile child helper.
/// Waits up to `grace` for them to go (reaped children take a moment to
/// leave /proc).
pub fn left_behind(seen: &Seen, dir: &Path, grace: Duration, exclude: &[u32]) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id();
    let t0 = Instant::now();
    loop {
        let left: Vec<String> = procs::table()
            .into_iter()
            .filter(|p| p.pid != me && !exclude.contains(&p.pid))
            .filter(|p| seen.all.contains(&(p.pid, p.start)) || p.cmdline.contains(&needle))
            .map(|p| format!("{} {}", p.pid, p.argv0))
            .collect();
        if left.is_empty() || t0.elapsed() > grace {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
