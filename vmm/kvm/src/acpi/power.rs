//! The ACPI power-management register the FADT points at: one 8-bit I/O
//! port serving as reset register (ACPI 6.5 4.8.4.6), sleep control register
//! (4.8.4.3.1) and sleep status register (4.8.4.3.2) of a hardware-reduced
//! platform.
//!
//! * Write [`RESET_VALUE`] -> [`IoAction::Reset`] (Linux `acpi_reboot`,
//!   the default x86 reboot method).
//! * Write with `SLP_EN` (bit 5) set and `SLP_TYP` (bits 2-4) =
//!   [`S5_SLP_TYP`] -> [`IoAction::PowerOff`] (Linux `acpi_power_off` ->
//!   `acpi_hw_extended_sleep`).
//! * Any other write is ignored; reads return 0 (no wake status).

use std::sync::{Arc, Mutex};

use crate::bus::{Bus, BusError};
use crate::devices::{Device, DeviceState, IoAction};

/// The I/O port (cloud-hypervisor's choice; VGA is absent per the FADT).
pub const ACPI_PM_PORT: u16 = 0x3c0;
/// Value the FADT says to write to the reset register.
pub const RESET_VALUE: u8 = 1;
/// SLP_TYP for S5 (soft off), as in the DSDT's `\_S5_` package.
pub const S5_SLP_TYP: u8 = 5;
/// SLP_EN bit of the sleep control register (ACPI 6.5 Table 4.21).
pub const SLP_EN: u8 = 1 << 5;

/// The register's state: what the guest asked for so far (diagnostics).
#[derive(Debug, Default)]
pub struct AcpiPmDevice {
    /// Reset requests seen.
    pub resets: u64,
    /// Power-off requests seen.
    pub power_offs: u64,
}

impl AcpiPmDevice {
    /// Decode a write of `value`.
    pub fn write_value(&mut self, value: u8) -> IoAction {
        if value == RESET_VALUE {
            self.resets += 1;
            return IoAction::Reset;
        }
        if value & SLP_EN != 0 && (value >> 2) & 0x7 == S5_SLP_TYP {
            self.power_offs += 1;
            return IoAction::PowerOff;
        }
        IoAction::None
    }
}

impl Device for AcpiPmDevice {
    fn name(&self) -> &str {
        "acpi-pm"
    }
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> IoAction {
        match (offset, data.first()) {
            (0, Some(&v)) => self.write_value(v),
            _ => IoAction::None,
        }
    }
    fn snapshot(&self) -> DeviceState {
        DeviceState::Stateless
    }
}

/// Register `dev` at [`ACPI_PM_PORT`] (one port).
///
/// Errors: [`BusError::Overlap`].
pub fn register(pio: &mut Bus, dev: Arc<Mutex<AcpiPmDevice>>) -> Result<(), BusError> {
    pio.insert(u64::from(ACPI_PM_PORT), 1, dev)
}
