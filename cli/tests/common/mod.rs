//! Shared test harness: a real `capvisor serve` with private socket, state
//! and config dirs, driven through the real `capvisor` CLI.

#![allow(dead_code)]

pub mod tls_upstream;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The directory holding the workspace's built binaries (`capvisor` and,
/// after `cargo build --workspace`, every server binary beside it).
pub fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_capvisor")).parent().unwrap().to_path_buf()
}

/// A running `capvisor serve` with its own temporary directory. Dropping it
/// sends SIGTERM, then SIGKILL after 2 s; [`Server::stop`] checks the shutdown.
pub struct Server {
    /// Everything of this server's: `serve.log`, `manifest.toml`, `run/`,
    /// `state/` and one `config/<who>` per client.
    pub dir: tempfile::TempDir,
    /// The gateway socket, `dir/run/gateway.sock` (`CAPVISOR_SOCKET`).
    pub socket: PathBuf,
    /// The state directory, `dir/state` (`CAPVISOR_STATE_DIR`).
    pub state: PathBuf,
    child: Option<Child>,
    /// Extra environment for serve.
    envs: Vec<(String, String)>,
}

impl Server {
    /// Starts `capvisor serve` (with `manifest` TOML if given) and waits for its socket.
    pub fn start(manifest: Option<&str>) -> Server {
        Self::start_with_env(manifest, &[])
    }

    /// Like [`Server::start`] with extra environment for `serve` (and so
    /// for every process below it).
    pub fn start_with_env(manifest: Option<&str>, envs: &[(&str, &str)]) -> Server {
        for b in ["capvisor-gateway", "capvisor-broker", "capvisor-worker", "capvisor-vmm", "capvisor-guest-init"] {
            assert!(bin_dir().join(b).exists(), "{b} is not built: run `cargo build --workspace` first");
        }
        let dir = tempfile::Builder::new().prefix("capvisor-test.").tempdir().unwrap();
        let socket = dir.path().join("run/gateway.sock");
        let state = dir.path().join("state");
        if let Some(m) = manifest {
            std::fs::write(dir.path().join("manifest.toml"), m).unwrap();
        }
        let envs = envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut s = Server { dir, socket, state, child: None, envs };
        s.launch();
        s
    }

    /// Spawns `capvisor serve` on this server's directories (and its
    /// `manifest.toml`, if any) and waits for its socket.
    fn launch(&mut self) {
        let mut cmd = Command::new(bin_dir().join("capvisor"));
        cmd.arg("serve");
        let manifest = self.dir.path().join("manifest.toml");
        if manifest.exists() {
            cmd.arg("--manifest").arg(manifest);
        }
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("serve.log")).unwrap();
        cmd.env("CAPVISOR_SOCKET", &self.socket)
            .env("CAPVISOR_STATE_DIR", &self.state)
            .env("CAPVISOR_BIN_DIR", bin_dir())
            .env("CAPVISOR_GUEST_INIT", bin_dir().join("capvisor-guest-init"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        cmd.envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.child = Some(cmd.spawn().unwrap());
        let t0 = Instant::now();
        while !self.socket.exists() {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("capvisor serve exited ({st}):\n{}", self.log());
            }
            assert!(t0.elapsed() < Duration::from_secs(900), "serve did not come up:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops serve with SIGTERM (asserting a clean exit within 60 s) and
    /// starts it again on the same state dir, socket and manifest: what a
    /// host reboot keeps.
    pub fn restart(&mut self) {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) takes plain integers; the child is not reaped
        // yet, so its pid is still ours.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "serve did not end within 60 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "serve exited with {status}:\n{}", self.log());
        self.launch();
    }

    /// serve's stdout and stderr so far (those of its children included);
    /// empty if unreadable.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// Client `who`'s `CAPVISOR_CONFIG_DIR`, `dir/config/<who>` (holds its
    /// `session.json` after a login).
    pub fn config_dir(&self, who: &str) -> PathBuf {
        self.dir.path().join("config").join(who)
    }

    /// Runs the CLI as client `who` (its own config dir) with optional stdin.
    pub fn cli(&self, who: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = Command::new(bin_dir().join("capvisor"));
        cmd.args(args)
            .env("CAPVISOR_SOCKET", &self.socket)
            .env("CAPVISOR_CONFIG_DIR", self.config_dir(who))
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(data) = stdin {
            let mut i = child.stdin.take().unwrap();
            let data = data.to_vec();
            std::thread::spawn(move || {
                let _ = i.write_all(&data);
            });
        }
        child.wait_with_output().unwrap()
    }

    /// Runs the CLI as client `who` on a real terminal (util-linux
    /// `script` gives it a pty), typing `input`; the pty's output is stdout.
    pub fn cli_in_pty(&self, who: &str, args: &[&str], input: &[u8]) -> Output {
        let mut line = bin_dir().join("capvisor").display().to_string();
        for a in args {
            line.push(' ');
            line.push_str(a);
        }
        let mut child = Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .env("CAPVISOR_SOCKET", &self.socket)
            .env("CAPVISOR_CONFIG_DIR", self.config_dir(who))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("util-linux script");
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }

    /// Like `cli` but asserts exit code `code` and returns stdout.
    pub fn cli_ok(&self, who: &str, args: &[&str], stdin: Option<&[u8]>, code: i32) -> Output {
        let out = self.cli(who, args, stdin);
        assert_eq!(
            out.status.code(),
            Some(code),
            "capvisor {args:?}: expected exit {code}\nstdout: {}\nstderr: {}\nserve log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        out
    }

    /// Processes (pid, argv[0]) whose command line or environment mentions this server's dir.
    pub fn our_processes(&self) -> Vec<(u32, String)> {
        let needle = self.dir.path().to_string_lossy().into_owned();
        let me = std::process::id();
        let server_pid = self.child.as_ref().map(|c| c.id());
        let table = proc_table();
        let mut found: Vec<(u32, String)> = vec![];
        // Everything below serve (children get an empty environment, so
        // only qemu's command line names our directories) ...
        if let Some(root) = server_pid {
            let mut frontier = vec![root];
            while let Some(p) = frontier.pop() {
                for row in table.iter().filter(|r| r.ppid == p) {
                    found.push((row.pid, row.argv0.clone()));
                    frontier.push(row.pid);
                }
            }
        }
        // ... and anything that names our directories (orphans included).
        for row in &table {
            if row.pid != me
                && Some(row.pid) != server_pid
                && row.mentions(&needle)
                && !found.iter().any(|(p, _)| *p == row.pid)
            {
                found.push((row.pid, row.argv0.clone()));
            }
        }
        found
    }

    /// Number of qemu processes of this server.
    pub fn qemu_count(&self) -> usize {
        self.our_processes().iter().filter(|(_, a)| a.contains("qemu")).count()
    }

    /// SIGTERM to serve; waits for a clean exit and checks nothing of ours is left running.
    pub fn stop(self) {
        self.stop_with(libc::SIGTERM)
    }

    /// Waits (up to 60 s) for serve to end on its own, e.g. after a child
    /// crashed; returns its status, whatever of ours still runs 5 s later,
    /// and serve's log.
    pub fn wait_for_exit(self) -> (std::process::ExitStatus, Vec<(u32, String)>, String) {
        self.end(None)
    }

    /// Like [`Server::stop`] with another signal (SIGINT = Ctrl-C).
    pub fn stop_with(self, signal: i32) {
        let socket = self.socket.clone();
        let (status, left, log) = self.end(Some(signal));
        assert!(status.success(), "serve exited with {status}:\n{log}");
        assert!(left.is_empty(), "processes left behind after shutdown: {left:?}\n{log}");
        assert!(!socket.exists(), "socket left behind");
    }

    /// Sends `signal` to serve (if any), waits up to 60 s for it to end, then
    /// up to 5 s for everything of ours to go (what runs now, by pid and
    /// start time, and anything still below or naming our directories).
    fn end(mut self, signal: Option<i32>) -> (std::process::ExitStatus, Vec<(u32, String)>, String) {
        let before: Vec<(u32, u64)> =
            self.our_processes().iter().filter_map(|(p, _)| start_time(*p).map(|t| (*p, t))).collect();
        let mut child = self.child.take().unwrap();
        if let Some(sig) = signal {
            // SAFETY: kill(2) takes plain integers; the child is not reaped
            // yet, so its pid is still ours.
            unsafe { libc::kill(child.id() as i32, sig) };
        }
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("serve did not end within 60 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let survivors = |s: &Self| {
            let mut left = s.our_processes();
            for (pid, t) in &before {
                if start_time(*pid) == Some(*t) && !left.iter().any(|(p, _)| p == pid) {
                    left.push((*pid, format!("pid {pid} (ran before serve ended)")));
                }
            }
            left
        };
        // Give reaped children a moment to vanish from /proc.
        let t0 = Instant::now();
        let mut left = survivors(&self);
        while !left.is_empty() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(100));
            left = survivors(&self);
        }
        (status, left, self.log())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) takes plain integers; the child is not reaped
            // yet, so its pid is still ours.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            std::thread::sleep(Duration::from_secs(2));
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `o`'s stdout as text (invalid UTF-8 replaced).
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `o`'s stderr as text (invalid UTF-8 replaced).
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// One row of /proc: pid, parent pid, argv[0], command line and environment.
pub struct ProcRow {
    /// Process id.
    pub pid: u32,
    /// Parent process id (field 4 of /proc/PID/stat).
    pub ppid: u32,
    /// The first NUL-separated word of /proc/PID/cmdline.
    pub argv0: String,
    cmdline: Vec<u8>,
    environ: Vec<u8>,
}

impl ProcRow {
    fn mentions(&self, needle: &str) -> bool {
        String::from_utf8_lossy(&self.cmdline).contains(needle)
            || String::from_utf8_lossy(&self.environ).contains(needle)
    }
}

/// Every live process that is not a zombie.
pub fn proc_table() -> Vec<ProcRow> {
    let mut rows = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let mut f = rest.split_whitespace();
        if f.next() == Some("Z") {
            continue;
        }
        let Some(ppid) = f.next().and_then(|p| p.parse().ok()) else { continue };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let argv0 = String::from_utf8_lossy(cmdline.split(|c| *c == 0).next().unwrap_or(b"")).into_owned();
        rows.push(ProcRow { pid, ppid, argv0, cmdline, environ });
    }
    rows
}

/// A process's start time (clock ticks after boot, field 22 of
/// /proc/PID/stat), to tell it from a later process with the same pid;
/// `None` when it is gone or a zombie.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    if f.first() == Some(&"Z") {
        return None;
    }
    f.get(19)?.parse().ok()
}

/// Writes a pure-Python wheel `capsum-1.0-py3-none-any.whl` into `dir`
/// (PEP 427: the package, METADATA, WHEEL and a RECORD with sha256 digests)
/// with the host's python3, and returns its path.
pub fn make_wheel(dir: &Path) -> PathBuf {
    let whl = dir.join("capsum-1.0-py3-none-any.whl");
    let script = r#"
import base64, hashlib, sys, zipfile
files = {
    "capsum/__init__.py": "def squares(n):\n    return sum(i * i for i in range(n + 1))\n",
    "capsum-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: capsum\nVersion: 1.0\n",
    "capsum-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: capvisor-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED) as z:
    for name, text in files.items():
        data = text.encode()
        z.writestr(name, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("capsum-1.0.dist-info/RECORD,,")
    z.writestr("capsum-1.0.dist-info/RECORD", "\n".join(record) + "\n")
"#;
    let out = Command::new("python3").arg("-c").arg(script).arg(&whl).output().expect("python3 on the host");
    assert!(out.status.success(), "making the wheel: {}", String::from_utf8_lossy(&out.stderr));
    whl
}
