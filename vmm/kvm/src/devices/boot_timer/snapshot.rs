//! Serde snapshot of the boot timer: the milestones reached so far and the
//! device's counters. Restored milestones keep their original values (they
//! describe the original boot, not the restore).

use std::sync::Arc;

use super::{BootTimer, BootTimerDevice, BootTimes, Milestone};

/// Saved boot-timer state.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootTimerSnapshot {
    /// Milestones at snapshot time.
    pub times: BootTimes,
    /// Writes of the magic value.
    pub marks: u64,
    /// Writes of other values.
    pub ignored: u64,
}

impl BootTimerDevice {
    /// Capture the state.
    pub fn save(&self) -> BootTimerSnapshot {
        BootTimerSnapshot { times: self.timer.times(), marks: self.marks, ignored: self.ignored }
    }

    /// Rebuild from `snap`, writing its milestones into `timer`.
    pub fn restore(snap: &BootTimerSnapshot, timer: Arc<BootTimer>) -> Self {
        let t = &snap.times;
        for (m, v) in [
            (Milestone::VmBuilt, t.vm_built_us),
            (Milestone::FirstRun, t.first_run_us),
            (Milestone::FirstExit, t.first_exit_us),
            (Milestone::FirstSerial, t.first_serial_us),
            (Milestone::InitReady, t.init_ready_us),
        ] {
            timer.set(m, v);
        }
        BootTimerDevice { timer, marks: snap.marks, ignored: snap.ignored }
    }
}
