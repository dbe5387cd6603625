//! Boot timer: a pseudo-device and a set of timestamps that say how long
//! a VM took to come up, in microseconds since the VMM process started.
//!
//! Milestones ([`BootTimes`]):
//!
//! 1. process start (the origin, see [`process_start`]);
//! 2. `vm_built_us`: memory, kernel, tables and devices in place;
//! 3. `first_run_us`: the boot vCPU enters `KVM_RUN` for the first time
//!    (the guest's first instruction);
//! 4. `first_exit_us`: the first exit of any vCPU back to the VMM;
//! 5. `first_serial_us`: the first byte the guest writes to the serial port
//!    (the earliest sign of the kernel we can observe without touching it);
//! 6. `init_ready_us`: the guest wrote [`MAGIC`] to port [`BOOT_TIMER_PORT`]:
//!    capvisor-guest-init (PID 1) does that once it is serving `Guest` on its
//!    agent port (`guest-init/src/init.rs`, `signal_boot_ready`).
//!
//! The port: [`BOOT_TIMER_PORT`] = 0x440, one byte wide. It is not used by
//! the PC platform nor by QEMU's `microvm` machine: `info mtree` of QEMU 7.2
//! `-M microvm,x-option-roms=off,rtc=off` lists only pic 0x20/0xa0, pit 0x40,
//! kvmvapic 0x7e, elcr 0x4d0/0x4d1 and fw_cfg 0x510-0x51b (plus 0x3f8 and
//! 0x60/0x64 when serial / i8042 are configured), and writes to unassigned
//! ports of QEMU's `io` region are dropped; so under the qemu engine the
//! guest's marker write is harmless.
//! Avoided on purpose: 0x80 (POST), 0xe9 (debugcon), 0x402 (our test
//! guests), 0x510 (fw_cfg), 0x3c0 (our ACPI PM register).

pub mod io;
pub mod snapshot;
#[cfg(test)]
mod tests;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The I/O port the guest writes [`MAGIC`] to.
pub const BOOT_TIMER_PORT: u16 = 0x440;
/// The byte that marks "init ready" (Firecracker's boot-timer value, 123).
pub const MAGIC: u8 = 123;

const UNSET: u64 = u64::MAX;

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// Record "now" as the process start, if nothing was recorded yet. Call it
/// first thing in `main` for microsecond precision; otherwise
/// [`process_start`] derives the start from `/proc/self/stat` (clock-tick,
/// usually 10 ms, precision).
pub fn mark_process_start() -> Instant {
    *PROCESS_START.get_or_init(Instant::now)
}

/// Start time of this process (see [`mark_process_start`]). Falls back to
/// the first call of this function when `/proc` is unreadable.
pub fn process_start() -> Instant {
    *PROCESS_START.get_or_init(|| {
        let now = Instant::now();
        process_age().and_then(|age| now.checked_sub(age)).unwrap_or(now)
    })
}

/// Age of the process from `/proc/self/stat` field 22 (`starttime`, clock
/// ticks after boot, proc(5)) and `CLOCK_BOOTTIME`.
fn process_age() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // comm (field 2) may contain spaces; fields after the last ')' start at field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    let start_ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0)?;
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return None;
    }
    let now = Duration::new(u64::try_from(ts.tv_sec).ok()?, u32::try_from(ts.tv_nsec).ok()?);
    let start = Duration::from_micros(start_ticks.checked_mul(1_000_000)? / hz);
    now.checked_sub(start)
}

/// The boot milestones, in microseconds since process start; `None` until
/// reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootTimes {
    /// The VM was assembled (memory, kernel, tables, devices).
    pub vm_built_us: Option<u64>,
    /// The boot vCPU first entered the guest.
    pub first_run_us: Option<u64>,
    /// The first vCPU exit reached the VMM.
    pub first_exit_us: Option<u64>,
    /// The guest wrote its first serial byte.
    pub first_serial_us: Option<u64>,
    /// The guest's init wrote [`MAGIC`] to [`BOOT_TIMER_PORT`].
    pub init_ready_us: Option<u64>,
}

/// Which milestone to record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Milestone {
    /// [`BootTimes::vm_built_us`].
    VmBuilt,
    /// [`BootTimes::first_run_us`].
    FirstRun,
    /// [`BootTimes::first_exit_us`].
    FirstExit,
    /// [`BootTimes::first_serial_us`].
    FirstSerial,
    /// [`BootTimes::init_ready_us`].
    InitReady,
}

/// Shared, lock-free recorder of [`BootTimes`]; each milestone keeps the
/// first time it was reached.
#[derive(Debug)]
pub struct BootTimer {
    origin: Instant,
    slots: [AtomicU64; 5],
}

impl Default for BootTimer {
    fn default() -> Self {
        Self::new(process_start())
    }
}

impl BootTimer {
    /// A recorder measuring from `origin`.
    pub fn new(origin: Instant) -> Self {
        BootTimer { origin, slots: std::array::from_fn(|_| AtomicU64::new(UNSET)) }
    }

    fn slot(&self, m: Milestone) -> &AtomicU64 {
        &self.slots[m as usize]
    }

    /// Microseconds from the origin to now.
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX - 1)
    }

    /// Record `m` now unless it was recorded before; returns true when this
    /// call recorded it.
    pub fn mark(&self, m: Milestone) -> bool {
        let slot = self.slot(m);
        if slot.load(Ordering::Relaxed) != UNSET {
            return false;
        }
        slot.compare_exchange(UNSET, self.now_us(), Ordering::AcqRel, Ordering::Relaxed).is_ok()
    }

    /// Set `m` to `us` (snapshot restore).
    pub fn set(&self, m: Milestone, us: Option<u64>) {
        self.slot(m).store(us.unwrap_or(UNSET), Ordering::Release);
    }

    /// True once `m` was recorded.
    pub fn reached(&self, m: Milestone) -> bool {
        self.slot(m).load(Ordering::Acquire) != UNSET
    }

    /// The milestones so far.
    pub fn times(&self) -> BootTimes {
        let get = |m| {
            let v = self.slot(m).load(Ordering::Acquire);
            (v != UNSET).then_some(v)
        };
        BootTimes {
            vm_built_us: get(Milestone::VmBuilt),
            first_run_us: get(Milestone::FirstRun),
            first_exit_us: get(Milestone::FirstExit),
            first_serial_us: get(Milestone::FirstSerial),
            init_ready_us: get(Milestone::InitReady),
        }
    }
}

/// The pseudo-device on [`BOOT_TIMER_PORT`]: a write of [`MAGIC`] records
/// [`Milestone::InitReady`]; other values are counted and ignored; reads
/// return 0.
#[derive(Debug)]
pub struct BootTimerDevice {
    timer: Arc<BootTimer>,
    /// Writes of [`MAGIC`] seen (the first one sets the milestone).
    pub(crate) marks: u64,
    /// Writes of other values.
    pub(crate) ignored: u64,
}

impl BootTimerDevice {
    /// A device recording into `timer`.
    pub fn new(timer: Arc<BootTimer>) -> Self {
        BootTimerDevice { timer, marks: 0, ignored: 0 }
    }

    /// The guest wrote `value`.
    pub fn write_value(&mut self, value: u8) {
        if value == MAGIC {
            self.marks += 1;
            self.timer.mark(Milestone::InitReady);
        } else {
            self.ignored += 1;
        }
    }

    /// The shared recorder.
    pub fn timer(&self) -> &Arc<BootTimer> {
        &self.timer
    }

    /// Writes of [`MAGIC`] so far.
    pub fn marks(&self) -> u64 {
        self.marks
    }
}

/// A `Write` wrapper for the serial sink that records
/// [`Milestone::FirstSerial`] on the first non-empty write.
pub struct TimedWriter<W> {
    inner: W,
    timer: Arc<BootTimer>,
    seen: bool,
}

impl<W> TimedWriter<W> {
    /// Wrap `inner`.
    pub fn new(inner: W, timer: Arc<BootTimer>) -> Self {
        TimedWriter { inner, timer, seen: false }
    }
}

impl<W: Write> Write for TimedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.seen && !buf.is_empty() {
            self.seen = true;
            self.timer.mark(Milestone::FirstSerial);
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
