//! The engine seam: what runs a VM, behind one trait (DESIGN.md, "Engines").
//!
//! - [`Engine`]: status, stop, kill, pause, resume, wait for the end,
//!   console tail. Implemented by [`crate::qemu::QemuEngine`] (QEMU over
//!   QMP), [`crate::kvm_engine::KvmEngine`] (capvisor's own VMM, in this
//!   process) and [`Failed`] (a VM that could not start).
//! - [`Lifecycle`]: the one state machine every engine drives:
//!
//!   ```text
//!   starting -> running <-> paused
//!       \           \          \
//!        +-----------+----------+--> stopped | crashed   (final)
//!   ```
//!
//!   `starting`: the engine runs but has not said the guest runs (QEMU
//!   before QMP answered; the kvm engine starts in `running`). `stopped`:
//!   asked to stop, or the guest powered off / rebooted. `crashed`: a guest
//!   kernel panic, the engine failing or dying unexpectedly, or the VM never
//!   starting at all. Moves between live states are compare-and-set
//!   ([`Lifecycle::set_state_if`]), so an engine event racing an RPC cannot
//!   move the machine backwards; the first end is final.
//! - [`ConsoleLog`]: `run_dir/console.log`, the guest's serial console,
//!   which both engines write through a [`ConsoleRing`] (at most
//!   [`MAX_CONSOLE_LOG`] bytes on disk, the newest kept) and read back.
//! - [`start`]: validates the config, picks the engine and starts it;
//!   never fails (a VM that cannot start is a [`Failed`] engine).
//!
//! Everything runs on the vmm's single-threaded `LocalSet`: no `Send`.

use capvisor_kvm::devices::boot_timer::BootTimes;
use capvisor_rpc::vmconfig::VmConfig;
use capvisor_rpc::CvError;
use capvisor_schema::capvisor_capnp::VmState;
use capvisor_schema::internal_capnp::machine_status;
use futures::future::LocalBoxFuture;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;
use tokio::sync::watch;

/// Which engine runs a VM (schema `Engine`; a running VM's is `qemu` or
/// `kvm`, never `auto`).
pub use capvisor_schema::capvisor_capnp::Engine as EngineKind;

/// Largest `consoleTail` answer, bytes.
pub const MAX_CONSOLE_TAIL: u32 = 1 << 20;
/// Most bytes of guest console output kept on disk per VM
/// (`run_dir/console.log`); older output is dropped, the newest half at
/// least is always there ([`ConsoleRing`]).
pub const MAX_CONSOLE_LOG: u64 = 1 << 20;
/// The console log's file name inside the VM's run dir.
pub const CONSOLE_LOG: &str = "console.log";
/// How much of the console's end is searched for a kernel panic, bytes.
const PANIC_SCAN: u64 = 64 * 1024;
/// How long [`Lifecycle::settle`] waits for the end after a kill.
pub const KILL_WAIT: Duration = Duration::from_secs(10);

/// A snapshot of the machine's state (schema `MachineStatus`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// Current state.
    pub state: VmState,
    /// Why it stopped or crashed (empty otherwise).
    pub detail: String,
    /// The process running the guest (QEMU's, or the vmm's own for engine
    /// kvm), or 0 when none ever ran.
    pub pid: u32,
    /// The engine that runs the VM (`Qemu` or `Kvm`, never `Auto`).
    pub engine: EngineKind,
    /// Boot milestones measured inside the vmm (engine kvm; all unset otherwise).
    pub boot: BootTimes,
}

impl Status {
    /// A live status in `state` with no detail and no boot times.
    pub fn new(state: VmState, pid: u32, engine: EngineKind) -> Self {
        Status { state, detail: String::new(), pid, engine, boot: BootTimes::default() }
    }

    /// Whether the machine has ended (`stopped` or `crashed`).
    pub fn ended(&self) -> bool {
        is_final(self.state)
    }

    /// Writes this status into a schema `MachineStatus` (unset boot
    /// milestones as 0).
    pub fn write(&self, mut b: machine_status::Builder<'_>) {
        b.set_state(self.state);
        b.set_detail(self.detail.as_str());
        b.set_pid(self.pid);
        b.set_engine(self.engine);
        let mut t = b.init_boot();
        t.set_vm_built_us(self.boot.vm_built_us.unwrap_or(0));
        t.set_first_run_us(self.boot.first_run_us.unwrap_or(0));
        t.set_first_exit_us(self.boot.first_exit_us.unwrap_or(0));
        t.set_first_serial_us(self.boot.first_serial_us.unwrap_or(0));
        t.set_init_ready_us(self.boot.init_ready_us.unwrap_or(0));
    }
}

fn is_final(state: VmState) -> bool {
    matches!(state, VmState::Stopped | VmState::Crashed)
}

/// One engine running (or having run) one VM; `Machine` is served over it
/// ([`crate::machine::MachineServer`]).
///
/// Futures borrow the engine and must be polled on the vmm's `LocalSet`.
pub trait Engine {
    /// The engine's state machine (shared by every engine).
    fn lifecycle(&self) -> &Lifecycle;

    /// The current status.
    fn status(&self) -> Status {
        self.lifecycle().status()
    }

    /// Resolves with the final status once the machine has ended
    /// (`stopped` or `crashed`); at once if it already has.
    fn wait_exit(&self) -> LocalBoxFuture<'_, Status> {
        Box::pin(self.lifecycle().wait_exit())
    }

    /// Stops the machine, giving the guest up to `grace` to power off where
    /// the engine can ask it to, then ending it for good. Returns the final
    /// status (`stopped`, or `crashed` if it crashed first); a machine that
    /// already ended is returned as is. Never fails: if the engine does not
    /// end within [`KILL_WAIT`] after the kill, the status at that time.
    fn stop(&self, grace: Duration) -> LocalBoxFuture<'_, Status>;

    /// Ends the machine at once (SIGKILL to QEMU, the vCPUs stopped for
    /// engine kvm), without waiting; the end is recorded as requested
    /// (`stopped`). No-op once it has ended.
    fn kill(&self);

    /// Pauses the vCPUs (`running` -> `paused`).
    ///
    /// Errors: `notRunning` unless the machine is running; `unavailable`
    /// when the engine cannot pause now (QMP not connected yet, vCPUs not
    /// parking in time, the VM just ended).
    fn pause(&self) -> LocalBoxFuture<'_, Result<(), CvError>>;

    /// Lets paused vCPUs run again (`paused` -> `running`).
    ///
    /// Errors: `notRunning` unless the machine is paused; `unavailable`
    /// as for [`Engine::pause`].
    fn resume(&self) -> LocalBoxFuture<'_, Result<(), CvError>>;

    /// The last `max_bytes` (at most [`MAX_CONSOLE_TAIL`]) bytes of the
    /// serial console, as the guest wrote them. Empty when nothing was
    /// logged or the VM never started.
    fn console_tail(&self, max_bytes: u32) -> Vec<u8>;
}

/// The machine's state machine (see the module docs), holding the current
/// [`Status`] and waking [`Lifecycle::wait_exit`] when it ends.
pub struct Lifecycle {
    status: watch::Sender<Status>,
}

impl Lifecycle {
    /// A machine in `initial`.
    pub fn new(initial: Status) -> Self {
        Lifecycle { status: watch::channel(initial).0 }
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// The current state.
    pub fn state(&self) -> VmState {
        self.status.borrow().state
    }

    /// Moves `from` -> `to` if the machine is in `from`; returns whether it
    /// moved. An ended machine never moves. Not for ending the machine: use
    /// [`Lifecycle::end`].
    pub fn set_state_if(&self, from: VmState, to: VmState) -> bool {
        debug_assert!(!is_final(to), "end the machine with Lifecycle::end");
        self.status.send_if_modified(|s| {
            if s.state == from && !s.ended() {
                s.state = to;
                true
            } else {
                false
            }
        })
    }

    /// Ends the machine in `state` (`stopped` or `crashed`) with `detail`,
    /// waking every [`Lifecycle::wait_exit`]. The first end is final: later
    /// calls change nothing and return false.
    pub fn end(&self, state: VmState, detail: String) -> bool {
        debug_assert!(is_final(state), "a machine ends stopped or crashed");
        let ended = self.status.send_if_modified(|s| {
            if s.ended() {
                return false;
            }
            s.state = state;
            s.detail = detail;
            true
        });
        if ended {
            tracing::info!(
                state = capvisor_rpc::names::vm_state_name(state),
                "VM ended: {}",
                self.status.borrow().detail
            );
        }
        ended
    }

    /// Records boot milestones (without waking waiters: they are not a
    /// state change).
    pub fn set_boot(&self, boot: BootTimes) {
        self.status.send_if_modified(|s| {
            s.boot = boot;
            false
        });
    }

    /// Ok if the machine is in `want`.
    ///
    /// Errors: `notRunning`, naming the current and the wanted state.
    pub fn require(&self, want: VmState) -> Result<(), CvError> {
        let st = self.state();
        if st != want {
            return Err(CvError::not_running(format!(
                "the VM is {} (needs to be {})",
                capvisor_rpc::names::vm_state_name(st),
                capvisor_rpc::names::vm_state_name(want)
            )));
        }
        Ok(())
    }

    /// A requested move `from` -> `to` (pause, resume): checks the machine
    /// is in `from`, then runs the engine's `op`, then moves the state if
    /// nothing else moved it meanwhile. `op` is not polled when the check
    /// fails.
    ///
    /// Errors: `notRunning` from the check; whatever `op` returns.
    pub async fn transition<F>(&self, from: VmState, to: VmState, op: F) -> Result<(), CvError>
    where
        F: Future<Output = Result<(), CvError>>,
    {
        self.require(from)?;
        op.await?;
        self.set_state_if(from, to);
        Ok(())
    }

    /// Resolves with the final status once the machine has ended.
    pub async fn wait_exit(&self) -> Status {
        let mut rx = self.status.subscribe();
        let r = match rx.wait_for(Status::ended).await {
            Ok(s) => s.clone(),
            Err(_) => self.status(),
        };
        r
    }

    /// [`Lifecycle::wait_exit`] for at most `limit`; `None` if the machine
    /// is still live then.
    pub async fn wait_exit_within(&self, limit: Duration) -> Option<Status> {
        tokio::time::timeout(limit, self.wait_exit()).await.ok()
    }

    /// After a kill: the final status within [`KILL_WAIT`], else the status
    /// at that time.
    pub async fn settle(&self) -> Status {
        match self.wait_exit_within(KILL_WAIT).await {
            Some(s) => s,
            None => self.status(),
        }
    }
}

/// The guest's serial console log, `run_dir/console.log` ([`CONSOLE_LOG`]).
#[derive(Clone, Debug)]
pub struct ConsoleLog {
    path: PathBuf,
}

impl ConsoleLog {
    /// Creates (or truncates) `run_dir/console.log`; `run_dir` must exist.
    ///
    /// Errors: the file cannot be created.
    pub fn create(run_dir: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let path = run_dir.join(CONSOLE_LOG);
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(ConsoleLog { path })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A writer appending to the log, keeping it at most
    /// [`MAX_CONSOLE_LOG`] bytes ([`ConsoleRing`]).
    ///
    /// Errors: the file cannot be opened for writing.
    pub fn ring(&self) -> std::io::Result<ConsoleRing> {
        ConsoleRing::open(&self.path, MAX_CONSOLE_LOG)
    }

    /// The last `max_bytes` (at most [`MAX_CONSOLE_TAIL`]) bytes, raw;
    /// empty if unreadable.
    pub fn tail(&self, max_bytes: u32) -> Vec<u8> {
        capvisor_rpc::read_tail(&self.path, max_bytes.min(MAX_CONSOLE_TAIL) as u64)
    }

    /// The first line with "Kernel panic" in the log's last 64 KiB,
    /// trimmed: a panic there makes any end a crash.
    pub fn panic_line(&self) -> Option<String> {
        panic_line(&capvisor_rpc::read_tail(&self.path, PANIC_SCAN))
    }
}

/// The writer of a console log bounded to `cap` bytes on disk, the newest
/// output kept: bytes are appended until the next write would pass `cap`;
/// then the newest `cap / 2` bytes move to the front of the file (positioned
/// read and write) and the file is cut there (`ftruncate`), so the log is
/// always a plain text file ending with the newest output, at least
/// `cap / 2` of it once that much was written. One write larger than
/// `cap / 2` keeps only its last `cap / 2` bytes.
///
/// Why one file compacted in place (not `console.log` + `console.log.1`
/// rotated, nor a ring with a header): every reader (`consoleTail`, the
/// worker's boot-failure tail, the panic scan, an operator's `tail -f`)
/// keeps reading one plain file from its end; and the kvm engine writes
/// from vCPU threads after confinement, where only calls on the open
/// descriptor (`pread64`, `pwrite64`, `ftruncate`) are allowed, no
/// `rename` or `openat`. A reader racing a compaction still sees the newest
/// output at the end: the front is rewritten first, the file cut after.
/// The cost is copying `cap / 2` bytes every `cap / 2` bytes logged.
pub struct ConsoleRing {
    file: std::fs::File,
    len: u64,
    cap: u64,
}

impl ConsoleRing {
    /// Opens `path` (created if missing) for writing after its current
    /// end, bounded to `cap` bytes (at least 2).
    ///
    /// Errors: the file cannot be opened or its size read.
    pub fn open(path: &Path, cap: u64) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let len = file.metadata()?.len();
        let mut ring = ConsoleRing { file, len, cap: cap.max(2) };
        if ring.len > ring.cap {
            ring.keep_last(ring.cap / 2)?;
        }
        Ok(ring)
    }

    /// Bytes in the file now.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was logged (or kept).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Moves the last `keep` bytes to the front and cuts the file there.
    fn keep_last(&mut self, keep: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let keep = keep.min(self.len);
        let mut buf = vec![0u8; keep as usize];
        self.file.read_exact_at(&mut buf, self.len - keep)?;
        self.file.write_all_at(&buf, 0)?;
        self.file.set_len(keep)?;
        self.len = keep;
        Ok(())
    }
}

impl std::io::Write for ConsoleRing {
    /// Logs all of `buf` (reports `buf.len()`), compacting first when it
    /// would pass the bound.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let half = self.cap / 2;
        if buf.len() as u64 > half {
            let tail = &buf[buf.len() - half as usize..];
            self.file.write_all_at(tail, 0)?;
            self.file.set_len(half)?;
            self.len = half;
            return Ok(buf.len());
        }
        if self.len + buf.len() as u64 > self.cap {
            self.keep_last(half)?;
        }
        self.file.write_all_at(buf, self.len)?;
        self.len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn panic_line(console: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(console);
    text.lines().find(|l| l.contains("Kernel panic")).map(|l| l.trim().to_string())
}

/// A VM that never ran: `crashed` with the reason, engine `qemu`, pid 0.
/// Stop and kill change nothing; pause and resume answer `notRunning`.
pub struct Failed {
    life: Lifecycle,
}

impl Failed {
    /// A VM that did not start because of `detail`.
    pub fn new(detail: String) -> Self {
        let mut st = Status::new(VmState::Crashed, 0, EngineKind::Qemu);
        st.detail = detail;
        Failed { life: Lifecycle::new(st) }
    }
}

impl Engine for Failed {
    fn lifecycle(&self) -> &Lifecycle {
        &self.life
    }

    fn stop(&self, _grace: Duration) -> LocalBoxFuture<'_, Status> {
        Box::pin(async move { self.life.status() })
    }

    fn kill(&self) {}

    fn pause(&self) -> LocalBoxFuture<'_, Result<(), CvError>> {
        Box::pin(
            self.life.transition(VmState::Running, VmState::Paused, async {
                Err(CvError::unavailable("the VM never started"))
            }),
        )
    }

    fn resume(&self) -> LocalBoxFuture<'_, Result<(), CvError>> {
        Box::pin(
            self.life.transition(VmState::Paused, VmState::Running, async {
                Err(CvError::unavailable("the VM never started"))
            }),
        )
    }

    fn console_tail(&self, _max_bytes: u32) -> Vec<u8> {
        Vec::new()
    }
}

/// The guest's channels to the host, each an already-connected stream
/// socket whose bytes are one virtio-serial port of the guest.
pub struct GuestChannels {
    /// Port `capvisor.agent`: guest-init serves `Guest` on it (the worker
    /// holds the other end).
    pub agent: OwnedFd,
    /// Port `capvisor.egress` (with `VmConfig.egress`): guest-init is the
    /// client of the session proxy's `Egress` on it (the proxy holds the
    /// other end).
    pub egress: Option<OwnedFd>,
}

impl From<OwnedFd> for GuestChannels {
    /// Only the agent channel: a guest without network.
    fn from(agent: OwnedFd) -> Self {
        Self { agent, egress: None }
    }
}

/// Starts the VM described by `cfg` on the engine it asks for (`auto`:
/// [`capvisor_rpc::host::resolve_engine`]), with `agent` as the guest's
/// agent channel: validates the config, checks the kernel and initramfs
/// are regular files, creates `run_dir` and its console log, starts the
/// engine and returns at once; the state moves on in local tasks.
///
/// Never fails: a VM that cannot start (bad config, missing kernel, no
/// QEMU, /dev/kvm unusable) is a [`Failed`] engine with the reason.
///
/// Must be called inside a `LocalSet`.
pub fn start(cfg: anyhow::Result<VmConfig>, channels: impl Into<GuestChannels>) -> Rc<dyn Engine> {
    match try_start(cfg, channels.into()) {
        Ok(engine) => engine,
        Err(e) => {
            tracing::error!("VM did not start: {e:#}");
            Rc::new(Failed::new(format!("the VM did not start: {e:#}")))
        }
    }
}

fn try_start(cfg: anyhow::Result<VmConfig>, channels: GuestChannels) -> anyhow::Result<Rc<dyn Engine>> {
    use anyhow::Context;
    let cfg = cfg?;
    cfg.validate()?;
    anyhow::ensure!(
        cfg.egress == channels.egress.is_some(),
        "the config {} an egress port but the vmm {} an egress socket",
        if cfg.egress { "asks for" } else { "has no" },
        if channels.egress.is_some() { "got" } else { "got no" }
    );
    for (what, p) in [("kernel", &cfg.kernel), ("initramfs", &cfg.initramfs)] {
        let m = std::fs::metadata(p).with_context(|| format!("{what} {}", p.display()))?;
        anyhow::ensure!(m.is_file(), "{what} {} is not a regular file", p.display());
    }
    std::fs::create_dir_all(&cfg.run_dir).with_context(|| format!("creating run dir {}", cfg.run_dir.display()))?;
    let console = ConsoleLog::create(&cfg.run_dir)?;
    Ok(match capvisor_rpc::host::resolve_engine(cfg.engine, EngineKind::Auto) {
        EngineKind::Kvm => crate::kvm_engine::KvmEngine::start(&cfg, channels, console)?,
        _ => crate::qemu::QemuEngine::start(&cfg, channels, console)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use capvisor_schema::common_capnp::ErrorCode;

    #[test]
    fn failed_vm_reports_crashed_and_refuses_pause() {
        capvisor_rpc::conn::run_local(async {
            let vm: Rc<dyn Engine> = Rc::new(Failed::new("kernel /nope: No such file".into()));
            let st = vm.status();
            assert_eq!(st.state, VmState::Crashed);
            assert_eq!((st.pid, st.engine), (0, EngineKind::Qemu));
            assert!(st.ended());
            assert_eq!(vm.wait_exit().await, st);
            assert_eq!(vm.stop(Duration::from_secs(1)).await, st);
            vm.kill();
            assert_eq!(vm.status(), st);
            for e in [vm.pause().await.unwrap_err(), vm.resume().await.unwrap_err()] {
                assert_eq!(e.code, ErrorCode::NotRunning);
            }
            assert!(vm.console_tail(100).is_empty());
        });
    }

    #[test]
    fn bad_config_starts_a_failed_engine() {
        capvisor_rpc::conn::run_local(async {
            let (agent, _peer) = capvisor_rpc::spawn::stream_pair().unwrap();
            let vm = start(Err(anyhow::anyhow!("no config")), agent);
            let st = vm.status();
            assert_eq!(st.state, VmState::Crashed);
            assert_eq!(st.detail, "the VM did not start: no config");

            let d = tempfile::tempdir().unwrap();
            let (agent, _peer) = capvisor_rpc::spawn::stream_pair().unwrap();
            let cfg = VmConfig {
                name: "t".into(),
                run_dir: d.path().join("vm"),
                kernel: d.path().join("missing-kernel"),
                initramfs: d.path().join("missing-initramfs"),
                memory_mib: 128,
                vcpus: 1,
                engine: EngineKind::Qemu,
                extra_cmdline: String::new(),
                disks: vec![],
                confine: Default::default(),
                egress: false,
            };
            // An egress port asked for without its socket (or the other
            // way round) is refused before anything starts.
            let (a2, _p2) = capvisor_rpc::spawn::stream_pair().unwrap();
            let st = start(Ok(VmConfig { egress: true, ..cfg.clone() }), a2).status();
            assert_eq!(st.state, VmState::Crashed);
            assert!(st.detail.contains("egress"), "{}", st.detail);
            let (a3, _p3) = capvisor_rpc::spawn::stream_pair().unwrap();
            let (e3, _q3) = capvisor_rpc::spawn::stream_pair().unwrap();
            let st = start(Ok(cfg.clone()), GuestChannels { agent: a3, egress: Some(e3) }).status();
            assert!(st.detail.contains("egress"), "{}", st.detail);
            let st = start(Ok(cfg), agent).status();
            assert_eq!(st.state, VmState::Crashed);
            assert!(st.detail.contains("missing-kernel"), "{}", st.detail);
            assert!(!d.path().join("vm").exists(), "no run dir for a VM that cannot start");
        });
    }

    #[test]
    fn state_moves_are_compare_and_set_and_the_first_end_is_final() {
        capvisor_rpc::conn::run_local(async {
            let life = Lifecycle::new(Status::new(VmState::Starting, 42, EngineKind::Qemu));
            assert!(!life.set_state_if(VmState::Running, VmState::Paused));
            assert_eq!(life.state(), VmState::Starting);
            assert_eq!(life.require(VmState::Running).unwrap_err().code, ErrorCode::NotRunning);
            assert!(life.set_state_if(VmState::Starting, VmState::Running));

            // A transition whose engine op fails leaves the state alone.
            let e = life
                .transition(VmState::Running, VmState::Paused, async {
                    Err(CvError::unavailable("QMP is not connected"))
                })
                .await
                .unwrap_err();
            assert_eq!(e.code, ErrorCode::Unavailable);
            assert_eq!(life.state(), VmState::Running);
            life.transition(VmState::Running, VmState::Paused, async { Ok(()) }).await.unwrap();
            assert_eq!(life.state(), VmState::Paused);
            // The op of a refused transition is never run.
            let e = life
                .transition(VmState::Running, VmState::Paused, async { panic!("op polled after a refused check") })
                .await
                .unwrap_err();
            assert_eq!(e.code, ErrorCode::NotRunning);

            assert!(life.wait_exit_within(Duration::from_millis(10)).await.is_none());
            let boot = BootTimes { first_run_us: Some(7), ..BootTimes::default() };
            life.set_boot(boot);
            assert!(life.end(VmState::Stopped, "stopped on request".into()));
            assert!(!life.end(VmState::Crashed, "late".into()), "the first end is final");
            assert!(!life.set_state_if(VmState::Stopped, VmState::Running), "an ended machine stays ended");
            let st = life.wait_exit().await;
            assert_eq!((st.state, st.detail.as_str(), st.pid), (VmState::Stopped, "stopped on request", 42));
            assert_eq!(st.boot, boot);
            assert_eq!(life.settle().await, st);
        });
    }

    #[test]
    fn the_console_ring_keeps_the_file_bounded_and_the_newest_output() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        let log = ConsoleLog::create(d.path()).unwrap();
        let cap = 4096u64;
        let mut ring = ConsoleRing::open(log.path(), cap).unwrap();
        // A flood of numbered lines, written in pieces of every size up to
        // a UART's one byte at a time.
        let mut all = Vec::new();
        for i in 0..5000u32 {
            let line = format!("line {i:05}\n");
            all.extend_from_slice(line.as_bytes());
            if i % 3 == 0 {
                for b in line.as_bytes() {
                    ring.write_all(std::slice::from_ref(b)).unwrap();
                }
            } else {
                ring.write_all(line.as_bytes()).unwrap();
            }
            let size = std::fs::metadata(log.path()).unwrap().len();
            assert!(size <= cap, "{size} bytes on disk after line {i}");
            assert_eq!(size, ring.len());
        }
        let kept = std::fs::read(log.path()).unwrap();
        assert!(kept.len() as u64 >= cap / 2);
        assert!(all.ends_with(&kept), "the file is exactly the newest output");
        assert_eq!(log.tail(11), b"line 04999\n");
        // One write over half the bound keeps its own end.
        ring.write_all(&[b'x'; 3000]).unwrap();
        ring.write_all(b"\nKernel panic - not syncing: flood\n").unwrap();
        assert!(std::fs::metadata(log.path()).unwrap().len() <= cap);
        assert_eq!(log.panic_line().as_deref(), Some("Kernel panic - not syncing: flood"));
        // Reopened over a file that is too big (written by an older vmm).
        std::fs::write(log.path(), vec![b'y'; 10_000]).unwrap();
        let ring = ConsoleRing::open(log.path(), cap).unwrap();
        assert_eq!((ring.len(), std::fs::metadata(log.path()).unwrap().len()), (cap / 2, cap / 2));
    }

    #[test]
    fn console_tail_is_bounded_and_raw_and_panics_are_found() {
        let d = tempfile::tempdir().unwrap();
        let log = ConsoleLog::create(d.path()).unwrap();
        assert_eq!(log.path(), d.path().join(CONSOLE_LOG));
        assert!(log.tail(10).is_empty());
        assert_eq!(log.panic_line(), None);
        std::fs::write(log.path(), b"hello \xff world\n  Kernel panic - not syncing: no init  \nafter\n").unwrap();
        assert_eq!(log.tail(6), b"after\n");
        assert!(log.tail(1000).starts_with(b"hello \xff world"));
        assert_eq!(log.panic_line().as_deref(), Some("Kernel panic - not syncing: no init"));
        assert!(capvisor_rpc::read_tail(&d.path().join("missing"), 10).is_empty());
    }
}
