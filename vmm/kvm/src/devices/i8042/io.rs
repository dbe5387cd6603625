//! Bus wiring of the i8042: ports 0x60..=0x64 (data at offset 0, command /
//! status at offset 4), byte-wide.

use std::sync::{Arc, Mutex};

use super::I8042;
use crate::bus::{Bus, BusError};
use crate::devices::{Device, DeviceState, IoAction};

/// First port (data).
pub const I8042_BASE: u64 = 0x60;
/// Range length: 0x60..=0x64.
pub const I8042_LEN: u64 = 5;
/// Offset of the command/status port (0x64).
pub const COMMAND_OFFSET: u64 = 4;

impl Device for I8042 {
    fn name(&self) -> &str {
        "i8042"
    }
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(off), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.read_reg(off);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> IoAction {
        match (u8::try_from(offset), data.first()) {
            (Ok(off), Some(&v)) => self.write_reg(off, v),
            _ => IoAction::None,
        }
    }
    fn snapshot(&self) -> DeviceState {
        DeviceState::I8042(self.save())
    }
}

/// Register `dev` at ports 0x60..=0x64.
///
/// Errors: [`BusError::Overlap`].
pub fn register(pio: &mut Bus, dev: Arc<Mutex<I8042>>) -> Result<(), BusError> {
    pio.insert(I8042_BASE, I8042_LEN, dev)
}
