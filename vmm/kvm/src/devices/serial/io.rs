//! Bus wiring of the UART: COM1 at ports 0x3f8..=0x3ff, byte-wide registers.

use std::sync::{Arc, Mutex};

use super::SerialDevice;
use crate::bus::{Bus, BusError};
use crate::devices::{Device, DeviceState, IoAction};

/// COM1 base port.
pub const COM1_BASE: u64 = 0x3f8;
/// Number of UART registers (ports).
pub const COM1_LEN: u64 = 8;

impl Device for SerialDevice {
    fn name(&self) -> &str {
        "serial"
    }

    /// 1-byte reads return the register; wider reads return the register in
    /// byte 0 and zeros above (UART registers are 8 bits wide).
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(off), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.read_reg(off);
        }
    }

    /// Only byte 0 of a write is used.
    fn write(&mut self, offset: u64, data: &[u8]) -> IoAction {
        if let (Ok(off), Some(&v)) = (u8::try_from(offset), data.first()) {
            self.write_reg(off, v);
        }
        IoAction::None
    }

    fn snapshot(&self) -> DeviceState {
        DeviceState::Serial(self.save())
    }
}

/// Register `serial` on the port bus at COM1.
///
/// Errors: [`BusError::Overlap`].
pub fn register_com1(pio: &mut Bus, serial: Arc<Mutex<SerialDevice>>) -> Result<(), BusError> {
    pio.insert(COM1_BASE, COM1_LEN, serial)
}
