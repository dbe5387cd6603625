//! i8042 keyboard controller, reduced to what a microVM needs: the CPU
//! reset command. Writing 0xFE to the command port (0x64) pulses the reset
//! line; the device reports [`IoAction::Reset`] and the vCPU loop ends the
//! VM with a typed reset. Built on vm-superio's `I8042Device`; all reads
//! return 0 (no keyboard, empty output buffer).

pub mod io;
pub mod snapshot;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::I8042Device;

use super::IoAction;

/// Command that pulses the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// Reset latch set by vm-superio when the guest issues [`CMD_RESET_CPU`].
#[derive(Clone, Debug, Default)]
pub struct ResetLatch(Arc<AtomicBool>);

impl ResetLatch {
    /// Return and clear the latch.
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::AcqRel)
    }
}

impl vm_superio::Trigger for ResetLatch {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::Release);
        Ok(())
    }
}

/// The controller state machine.
#[derive(Debug)]
pub struct I8042 {
    inner: I8042Device<ResetLatch>,
    latch: ResetLatch,
    resets: u64,
}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl I8042 {
    /// A controller with the reset line idle.
    pub fn new() -> Self {
        let latch = ResetLatch::default();
        I8042 { inner: I8042Device::new(latch.clone()), latch, resets: 0 }
    }

    /// Read register `offset` (0 data port 0x60, 4 status port 0x64).
    pub fn read_reg(&mut self, offset: u8) -> u8 {
        self.inner.read(offset)
    }

    /// Write `value` to register `offset`; returns [`IoAction::Reset`] when it
    /// was the reset command on the command port.
    pub fn write_reg(&mut self, offset: u8, value: u8) -> IoAction {
        let Ok(()) = self.inner.write(offset, value);
        if self.latch.take() {
            self.resets += 1;
            IoAction::Reset
        } else {
            IoAction::None
        }
    }

    /// How many resets the guest requested.
    pub fn resets(&self) -> u64 {
        self.resets
    }
}
