//! Bus wiring of the boot timer: one byte-wide port at [`BOOT_TIMER_PORT`].

use std::sync::{Arc, Mutex};

use super::{BootTimerDevice, BOOT_TIMER_PORT};
use crate::bus::{Bus, BusError};
use crate::devices::{Device, DeviceState, IoAction};

impl Device for BootTimerDevice {
    fn name(&self) -> &str {
        "boot-timer"
    }

    /// Reads return 0 (nothing to report to the guest).
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    /// Only byte 0 of a write at offset 0 counts.
    fn write(&mut self, offset: u64, data: &[u8]) -> IoAction {
        if let (0, Some(&v)) = (offset, data.first()) {
            self.write_value(v);
        }
        IoAction::None
    }

    fn snapshot(&self) -> DeviceState {
        DeviceState::BootTimer(self.save())
    }
}

/// Register `dev` at [`BOOT_TIMER_PORT`].
///
/// Errors: [`BusError::Overlap`].
pub fn register(pio: &mut Bus, dev: Arc<Mutex<BootTimerDevice>>) -> Result<(), BusError> {
    pio.insert(u64::from(BOOT_TIMER_PORT), 1, dev)
}
