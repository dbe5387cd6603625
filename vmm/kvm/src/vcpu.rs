//! The vCPU loop: one OS thread per vCPU, entering the guest and
//! dispatching each exit to the port-I/O or MMIO [`Bus`](crate::bus::Bus)
//! until the guest halts, resets, shuts down, fails, or the VMM stops it.
//!
//! Stopping: [`VcpuHandle::stop`] sets a flag and kicks the thread out of
//! `KVM_RUN` with a real-time signal ([`KICK_SIGNAL_OFFSET`] above SIGRTMIN,
//! handler installed once per process, no-op), repeating the kick until the
//! thread has left, which closes the race between checking the flag and
//! entering the guest.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bus::Buses;
use crate::devices::IoAction;
use crate::hypervisor::{HypervisorError, Vcpu, VcpuExit};

/// Signal used to kick vCPU threads: SIGRTMIN + this offset.
pub const KICK_SIGNAL_OFFSET: i32 = 0;

/// Why a vCPU loop ended normally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// `HLT` without an in-kernel irqchip (the tiny test guests' "exit").
    Halted,
    /// The guest asked for a reset (i8042 0xFE, or KVM system event reset).
    Reset,
    /// The guest asked to be powered off (ACPI S5).
    PoweredOff,
    /// Triple fault or a shutdown system event.
    Shutdown,
    /// [`VcpuHandle::stop`] was called.
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
    /// KVM could not emulate an instruction (seen when stock Linux runs under kvm_pvm).
    #[error("KVM internal error (emulation failure) at rip {rip:#x}")]
    InternalError {
        /// Instruction pointer, if it could be read.
        rip: u64,
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
}

/// Runs one vCPU against the buses.
pub struct VcpuRunner<V: Vcpu> {
    vcpu: V,
    buses: Arc<Buses>,
    stop: Arc<AtomicBool>,
    stats: Arc<VcpuStats>,
}

impl<V: Vcpu> VcpuRunner<V> {
    /// A runner for `vcpu` (its boot state already set) dispatching to `buses`.
    pub fn new(vcpu: V, buses: Arc<Buses>) -> Self {
        VcpuRunner { vcpu, buses, stop: Arc::new(AtomicBool::new(false)), stats: Arc::default() }
    }

    /// Exit counters (shared; readable while the loop runs).
    pub fn stats(&self) -> Arc<VcpuStats> {
        self.stats.clone()
    }

    /// Run until the guest stops (see [`VcpuStop`]).
    ///
    /// Errors: [`VcpuError`] for entry failures, emulation failures,
    /// unhandled exits and failing hypervisor calls.
    pub fn run(&mut self) -> Result<VcpuStop, VcpuError> {
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Ok(VcpuStop::Stopped);
            }
            let Self { vcpu, buses, stats, .. } = self;
            let exit = vcpu.run()?;
            match exit {
                VcpuExit::IoIn { port, data } => {
                    stats.pio_exits.fetch_add(1, Ordering::Relaxed);
                    if buses.pio.read(u64::from(port), data).is_err() {
                        stats.unmapped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                VcpuExit::IoOut { port, data } => {
                    stats.pio_exits.fetch_add(1, Ordering::Relaxed);
                    match buses.pio.write(u64::from(port), data) {
                        Ok(IoAction::Reset) => return Ok(VcpuStop::Reset),
                        Ok(IoAction::PowerOff) => return Ok(VcpuStop::PoweredOff),
                        Ok(IoAction::None) => {}
                        Err(_) => {
                            stats.unmapped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                VcpuExit::MmioRead { addr, data } => {
                    stats.mmio_exits.fetch_add(1, Ordering::Relaxed);
                    if buses.mmio.read(addr, data).is_err() {
                        stats.unmapped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                VcpuExit::MmioWrite { addr, data } => {
                    stats.mmio_exits.fetch_add(1, Ordering::Relaxed);
                    match buses.mmio.write(addr, data) {
                        Ok(IoAction::Reset) => return Ok(VcpuStop::Reset),
                        Ok(IoAction::PowerOff) => return Ok(VcpuStop::PoweredOff),
                        Ok(IoAction::None) => {}
                        Err(_) => {
                            stats.unmapped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
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
                VcpuExit::Interrupted => vcpu.set_immediate_exit(false),
                VcpuExit::FailEntry { reason } => return Err(VcpuError::FailEntry { reason }),
                VcpuExit::InternalError => {
                    let rip = vcpu.instruction_pointer().unwrap_or(0);
                    return Err(VcpuError::InternalError { rip });
                }
                VcpuExit::Other(n) => return Err(VcpuError::Unhandled(n)),
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
    stop: Arc<AtomicBool>,
    stats: Arc<VcpuStats>,
}

impl std::fmt::Debug for VcpuHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuHandle").field("finished", &self.join.is_finished()).finish()
    }
}

/// Start `runner` on a new thread named `name`.
///
/// Errors: [`VcpuError::Thread`] when the kick handler cannot be installed
/// or the thread cannot be spawned.
pub fn spawn<V: Vcpu + 'static>(mut runner: VcpuRunner<V>, name: &str) -> Result<VcpuHandle, VcpuError> {
    install_kick_handler()?;
    let stop = runner.stop.clone();
    let stats = runner.stats.clone();
    let join = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || runner.run())
        .map_err(|e| VcpuError::Thread(e.to_string()))?;
    Ok(VcpuHandle { join, stop, stats })
}

impl VcpuHandle {
    /// Exit counters.
    pub fn stats(&self) -> &VcpuStats {
        &self.stats
    }

    /// True once the loop has returned.
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
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

    /// Ask the loop to stop, kick it out of the guest, and wait for it.
    /// Returns the loop's result ([`VcpuStop::Stopped`] unless the guest
    /// ended first).
    ///
    /// Errors: as [`VcpuHandle::join`].
    pub fn stop(self) -> Result<VcpuStop, VcpuError> {
        self.stop.store(true, Ordering::Release);
        let tid = self.join.as_pthread_t();
        while !self.join.is_finished() {
            // SAFETY: `tid` is a live thread: the JoinHandle has not been
            // joined, so the pthread_t stays valid until `join` below.
            unsafe { libc::pthread_kill(tid, kick_signal()) };
            std::thread::sleep(Duration::from_millis(1));
        }
        self.join()
    }
}
