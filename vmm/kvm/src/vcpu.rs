//! The vCPU loop: one OS thread per vCPU, entering the guest and
//! dispatching each exit to the port-I/O or MMIO [`Bus`](crate::bus::Bus)
//! until the guest halts, resets, powers off, shuts down, fails, or the VMM
//! stops it.
//!
//! Control ([`VcpuControl`], shared by all vCPUs of a VM): before every
//! `KVM_RUN` the loop passes a checkpoint that
//! * returns [`VcpuStop::Stopped`] once a stop was requested;
//! * parks the thread on a condition variable while a pause is requested
//!   (the thread counts itself as parked, so [`VcpuControl::wait_parked`]
//!   knows when every vCPU is out of the guest), until resume or stop.
//!
//! A thread inside `KVM_RUN` is kicked out with a real-time signal
//! ([`KICK_SIGNAL_OFFSET`] above SIGRTMIN, no-op handler installed once per
//! process): `KVM_RUN` returns EINTR, the loop reaches the checkpoint. A
//! kick that lands between the checkpoint and `KVM_RUN` is lost, so callers
//! repeat it until the thread is parked or finished ([`kick_until`]).

use std::os::unix::thread::JoinHandleExt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::bus::Buses;
use crate::devices::boot_timer::{BootTimer, Milestone};
use crate::devices::IoAction;
use crate::hypervisor::{HypervisorError, Vcpu, VcpuExit};

/// Signal used to kick vCPU threads: SIGRTMIN + this offset.
pub const KICK_SIGNAL_OFFSET: i32 = 0;

/// Why a vCPU loop ended normally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// `HLT` without an in-kernel irqchip (the tiny test guests' "exit").
    Halted,
    /// The guest asked for a reset (i8042 0xFE, the ACPI reset register, or
    /// KVM system event reset).
    Reset,
    /// The guest asked to be powered off (ACPI S5).
    PoweredOff,
    /// Triple fault (KVM_EXIT_SHUTDOWN) or a shutdown system event.
    Shutdown,
    /// A stop was requested ([`VcpuHandle::stop`], [`VcpuControl::request_stop`]).
    Stopped,
    /// Another KVM system event (e.g. 3 = crash).
    SystemEvent(u32),
}

/// Why a vCPU loop failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The hypervisor call failed.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// VM entry failed.
    #[error("VM entry failed: hardware reason {reason:#x}")]
    FailEntry {
        /// Hardware reason code.
        reason: u64,
    },
    /// KVM could not emulate an instruction or hit another internal error
    /// (seen when stock Linux runs under kvm_pvm).
    #[error("KVM internal error (suberror {suberror}) at rip {rip:#x}: {detail}")]
    InternalError {
        /// Instruction pointer, if it could be read (0 otherwise).
        rip: u64,
        /// KVM_INTERNAL_ERROR_* code (1 = emulation failure).
        suberror: u32,
        /// Registers, the kernel's extra data words and the instruction bytes at RIP.
        detail: String,
    },
    /// An exit this loop does not handle.
    #[error("unhandled exit reason {0}")]
    Unhandled(u32),
    /// The vCPU thread panicked or could not be spawned.
    #[error("vCPU thread: {0}")]
    Thread(String),
}

/// Exit counters of one vCPU loop.
#[derive(Debug, Default)]
pub struct VcpuStats {
    /// Port I/O exits.
    pub pio_exits: AtomicU64,
    /// MMIO exits.
    pub mmio_exits: AtomicU64,
    /// Accesses that hit no device (reads returned 0xff).
    pub unmapped: AtomicU64,
    /// Times the loop was kicked out of the guest.
    pub kicks: AtomicU64,
}

const RUN: u8 = 0;
const PAUSE: u8 = 1;
const STOP: u8 = 2;

/// Run / pause / stop requests shared by the vCPU loops of one VM.
#[derive(Debug, Default)]
pub struct VcpuControl {
    state: AtomicU8,
    parked: Mutex<usize>,
    cond: Condvar,
}

impl VcpuControl {
    /// A control in the running state.
    pub fn new() -> Self {
        Self::default()
    }

    fn set(&self, state: u8) {
        // Change the state under the lock so a thread between its check and
        // its wait cannot miss the notification.
        let g = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        if self.state.load(Ordering::Acquire) != STOP {
            self.state.store(state, Ordering::Release);
        }
        drop(g);
        self.cond.notify_all();
    }

    /// Ask every loop to park at its next checkpoint (no-op after a stop).
    pub fn request_pause(&self) {
        self.set(PAUSE);
    }

    /// Let parked loops continue (no-op after a stop).
    pub fn resume(&self) {
        self.set(RUN);
    }

    /// Ask every loop to end with [`VcpuStop::Stopped`] at its next
    /// checkpoint; wakes parked loops. Final.
    pub fn request_stop(&self) {
        let g = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        self.state.store(STOP, Ordering::Release);
        drop(g);
        self.cond.notify_all();
    }

    /// True once a stop was requested.
    pub fn stop_requested(&self) -> bool {
        self.state.load(Ordering::Acquire) == STOP
    }

    /// True while a pause is requested.
    pub fn pause_requested(&self) -> bool {
        self.state.load(Ordering::Acquire) == PAUSE
    }

    /// Number of loops parked right now.
    pub fn parked(&self) -> usize {
        *self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait up to `timeout` until at least `n` loops are parked; true if so.
    pub fn wait_parked(&self, n: usize, timeout: Duration) -> bool {
        let g = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self.cond.wait_timeout_while(g, timeout, |parked| *parked < n).unwrap_or_else(|p| p.into_inner());
        *g >= n
    }

    /// The loop's checkpoint: true = stop now. Parks while paused.
    fn checkpoint(&self) -> bool {
        match self.state.load(Ordering::Acquire) {
            RUN => false,
            STOP => true,
            _ => {
                let mut g = self.parked.lock().unwrap_or_else(|p| p.into_inner());
                *g += 1;
                self.cond.notify_all();
                while self.state.load(Ordering::Acquire) == PAUSE {
                    g = self.cond.wait(g).unwrap_or_else(|p| p.into_inner());
                }
                *g -= 1;
                drop(g);
                self.cond.notify_all();
                self.state.load(Ordering::Acquire) == STOP
            }
        }
    }
}

/// Runs one vCPU against the buses.
pub struct VcpuRunner<V: Vcpu> {
    vcpu: V,
    buses: Arc<Buses>,
    control: Arc<VcpuControl>,
    stats: Arc<VcpuStats>,
    timer: Option<Arc<BootTimer>>,
    mem: Option<GuestMemoryMmap>,
    thread_init: Option<ThreadInit>,
}

/// Runs first on every vCPU thread [`spawn_with`] starts, before the first
/// `KVM_RUN` (e.g. to narrow the thread's seccomp filter to the vCPU list,
/// docs/vmm-confinement.md). An error ends that vCPU with
/// [`VcpuError::Thread`] before it runs guest code.
pub type ThreadInit = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

impl<V: Vcpu> VcpuRunner<V> {
    /// A runner for `vcpu` (its boot state already set) dispatching to
    /// `buses`, with its own [`VcpuControl`].
    pub fn new(vcpu: V, buses: Arc<Buses>) -> Self {
        VcpuRunner {
            vcpu,
            buses,
            control: Arc::default(),
            stats: Arc::default(),
            timer: None,
            mem: None,
            thread_init: None,
        }
    }

    /// Share `control` with other vCPUs of the same VM.
    pub fn with_control(mut self, control: Arc<VcpuControl>) -> Self {
        self.control = control;
        self
    }

    /// Record [`Milestone::FirstRun`] / [`Milestone::FirstExit`] into `timer`.
    pub fn with_boot_timer(mut self, timer: Arc<BootTimer>) -> Self {
        self.timer = Some(timer);
        self
    }

    /// Guest memory, used only to quote the instruction bytes at RIP in
    /// [`VcpuError::InternalError`].
    pub fn with_memory(mut self, mem: GuestMemoryMmap) -> Self {
        self.mem = Some(mem);
        self
    }

    /// Run `init` first on the vCPU thread (see [`ThreadInit`]).
    pub fn with_thread_init(mut self, init: Option<ThreadInit>) -> Self {
        self.thread_init = init;
        self
    }

    /// Exit counters (shared; readable while the loop runs).
    pub fn stats(&self) -> Arc<VcpuStats> {
        self.stats.clone()
    }

    /// The control this loop obeys.
    pub fn control(&self) -> Arc<VcpuControl> {
        self.control.clone()
    }

    fn internal_error(&self, suberror: u32, data: &[u64]) -> VcpuError {
        let rip = self.vcpu.instruction_pointer().unwrap_or(0);
        let mut detail = self.vcpu.debug_state();
        if !data.is_empty() {
            let words: Vec<String> = data.iter().map(|w| format!("{w:#x}")).collect();
            detail.push_str(&format!(" data=[{}]", words.join(",")));
        }
        if let (Some(mem), Some(phys)) = (&self.mem, self.vcpu.translate(rip)) {
            let mut insn = [0u8; 16];
            if mem.read_slice(&mut insn, GuestAddress(phys)).is_ok() {
                let hex: Vec<String> = insn.iter().map(|b| format!("{b:02x}")).collect();
                detail.push_str(&format!(" insn={}", hex.join(" ")));
            }
        }
        VcpuError::InternalError { rip, suberror, detail }
    }

    /// Run until the guest stops (see [`VcpuStop`]).
    ///
    /// Errors: [`VcpuError`] for entry failures, emulation failures,
    /// unhandled exits and failing hypervisor calls.
    pub fn run(&mut self) -> Result<VcpuStop, VcpuError> {
        let mut entered = false;
        let mut exited = false;
        loop {
            if self.control.checkpoint() {
                return Ok(VcpuStop::Stopped);
            }
            if !entered {
                entered = true;
                if let Some(t) = &self.timer {
                    t.mark(Milestone::FirstRun);
                }
            }
            let Self { vcpu, buses, stats, timer, .. } = self;
            let exit = vcpu.run()?;
            if !exited && !matches!(exit, VcpuExit::Interrupted) {
                exited = true;
                if let Some(t) = timer {
                    t.mark(Milestone::FirstExit);
                }
            }
            let action = match exit {
                VcpuExit::IoIn { port, data } => {
                    stats.pio_exits.fetch_add(1, Ordering::Relaxed);
                    if buses.pio.read(u64::from(port), data).is_err() {
                        stats.unmapped.fetch_add(1, Ordering::Relaxed);
                    }
                    IoAction::None
                }
                VcpuExit::IoOut { port, data } => {
                    stats.pio_exits.fetch_add(1, Ordering::Relaxed);
                    buses.pio.write(u64::from(port), data).unwrap_or_else(|_| {
                        stats.unmapped.fetch_add(1, Ordering::Relaxed);
                        IoAction::None
                    })
                }
                VcpuExit::MmioRead { addr, data } => {
                    stats.mmio_exits.fetch_add(1, Ordering::Relaxed);
                    if buses.mmio.read(addr, data).is_err() {
                        stats.unmapped.fetch_add(1, Ordering::Relaxed);
                    }
                    IoAction::None
                }
                VcpuExit::MmioWrite { addr, data } => {
                    stats.mmio_exits.fetch_add(1, Ordering::Relaxed);
                    buses.mmio.write(addr, data).unwrap_or_else(|_| {
                        stats.unmapped.fetch_add(1, Ordering::Relaxed);
                        IoAction::None
                    })
                }
                VcpuExit::Hlt => return Ok(VcpuStop::Halted),
                VcpuExit::Shutdown => return Ok(VcpuStop::Shutdown),
                VcpuExit::SystemEvent(kind) => {
                    return Ok(match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VcpuStop::Shutdown,
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => VcpuStop::Reset,
                        other => VcpuStop::SystemEvent(other),
                    })
                }
                VcpuExit::Interrupted => {
                    stats.kicks.fetch_add(1, Ordering::Relaxed);
                    vcpu.set_immediate_exit(false);
                    IoAction::None
                }
                VcpuExit::FailEntry { reason } => return Err(VcpuError::FailEntry { reason }),
                VcpuExit::InternalError { suberror, data } => return Err(self.internal_error(suberror, &data)),
                VcpuExit::Other(n) => return Err(VcpuError::Unhandled(n)),
            };
            match action {
                IoAction::None => {}
                IoAction::Reset => return Ok(VcpuStop::Reset),
                IoAction::PowerOff => return Ok(VcpuStop::PoweredOff),
            }
        }
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    static mut RESULT: i32 = 0;
    ONCE.call_once(|| {
        let r = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler);
        // SAFETY: written once inside call_once, read only after it returns.
        unsafe { RESULT = r.err().map_or(0, |e| e.errno()) };
    });
    // SAFETY: call_once has completed, no concurrent writer remains.
    match unsafe { RESULT } {
        0 => Ok(()),
        errno => Err(VcpuError::Thread(format!("installing the kick signal handler: errno {errno}"))),
    }
}

/// A running vCPU thread.
pub struct VcpuHandle {
    join: JoinHandle<Result<VcpuStop, VcpuError>>,
    control: Arc<VcpuControl>,
    stats: Arc<VcpuStats>,
    done: Arc<AtomicBool>,
}

impl std::fmt::Debug for VcpuHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuHandle").field("finished", &self.join.is_finished()).finish()
    }
}

/// Start `runner` on a new thread named `name`. A panic inside the loop is
/// caught and returned as [`VcpuError::Thread`]. `on_exit` runs on the vCPU
/// thread with the loop's result just before the thread ends.
///
/// Errors: [`VcpuError::Thread`] when the kick handler cannot be installed
/// or the thread cannot be spawned.
pub fn spawn_with<V, F>(mut runner: VcpuRunner<V>, name: &str, on_exit: F) -> Result<VcpuHandle, VcpuError>
where
    V: Vcpu + 'static,
    F: FnOnce(&Result<VcpuStop, VcpuError>) + Send + 'static,
{
    install_kick_handler()?;
    let control = runner.control.clone();
    let stats = runner.stats.clone();
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let join = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            if let Some(init) = runner.thread_init.take() {
                if let Err(e) = init() {
                    let r = Err(VcpuError::Thread(format!("vCPU thread set-up failed: {e}")));
                    on_exit(&r);
                    done2.store(true, Ordering::Release);
                    return r;
                }
            }
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| runner.run())).unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".into());
                Err(VcpuError::Thread(format!("vCPU loop panicked: {msg}")))
            });
            on_exit(&r);
            done2.store(true, Ordering::Release);
            r
        })
        .map_err(|e| VcpuError::Thread(e.to_string()))?;
    Ok(VcpuHandle { join, control, stats, done })
}

/// Start `runner` on a new thread named `name` (see [`spawn_with`]).
///
/// Errors: as [`spawn_with`].
pub fn spawn<V: Vcpu + 'static>(runner: VcpuRunner<V>, name: &str) -> Result<VcpuHandle, VcpuError> {
    spawn_with(runner, name, |_| {})
}

impl VcpuHandle {
    /// Exit counters.
    pub fn stats(&self) -> &VcpuStats {
        &self.stats
    }

    /// The control this vCPU obeys.
    pub fn control(&self) -> &Arc<VcpuControl> {
        &self.control
    }

    /// True once the loop has returned.
    pub fn is_finished(&self) -> bool {
        self.done.load(Ordering::Acquire) || self.join.is_finished()
    }

    /// Send one kick signal (interrupts `KVM_RUN` if the thread is inside
    /// it). No-op once the loop has finished.
    pub fn kick(&self) {
        if self.join.is_finished() {
            return;
        }
        // SAFETY: the JoinHandle has not been joined (we hold it), so the
        // pthread_t stays valid even if the thread has just exited.
        unsafe { libc::pthread_kill(self.join.as_pthread_t(), kick_signal()) };
    }

    /// Wait for the loop to end on its own.
    ///
    /// Errors: the loop's [`VcpuError`], or [`VcpuError::Thread`] on panic.
    pub fn join(self) -> Result<VcpuStop, VcpuError> {
        self.join.join().map_err(|_| VcpuError::Thread("vCPU thread panicked".into()))?
    }

    /// Wait up to `timeout` for the loop to end on its own; on timeout the
    /// handle is returned unchanged.
    pub fn join_timeout(self, timeout: Duration) -> Result<Result<VcpuStop, VcpuError>, VcpuHandle> {
        let deadline = Instant::now() + timeout;
        while !self.join.is_finished() {
            if Instant::now() >= deadline {
                return Err(self);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(self.join())
    }

    /// Request a stop on this vCPU's control (with a shared control: on
    /// every vCPU of the VM), kick the thread until it has left, and join
    /// it. Returns the loop's result ([`VcpuStop::Stopped`] unless the
    /// guest ended first).
    ///
    /// Errors: as [`VcpuHandle::join`].
    pub fn stop(self) -> Result<VcpuStop, VcpuError> {
        self.control.request_stop();
        kick_until(std::slice::from_ref(&self), || false);
        self.join()
    }
}

/// Kick every unfinished handle every millisecond until all have finished
/// or `done()` returns true.
pub fn kick_until(handles: &[VcpuHandle], mut done: impl FnMut() -> bool) {
    loop {
        if done() || handles.iter().all(|h| h.join.is_finished()) {
            return;
        }
        for h in handles {
            h.kick();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
