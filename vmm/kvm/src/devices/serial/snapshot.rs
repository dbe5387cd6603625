//! Serde snapshot of the UART registers and receive FIFO (mirrors
//! vm-superio's `SerialState`).

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use super::{SerialDevice, SerialOut};
use crate::devices::IrqLine;

/// Saved UART state.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// DLL.
    pub baud_divisor_low: u8,
    /// DLM.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Unread receive FIFO contents.
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    /// Capture the register state.
    pub fn save(&self) -> SerialSnapshot {
        let s = self.inner.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Rebuild a UART from `snap`. A receive FIFO longer than the UART's
    /// 64 bytes is truncated (a snapshot is input too).
    pub fn restore(snap: &SerialSnapshot, irq: IrqLine, out: SerialOut) -> Self {
        let mut in_buffer = snap.in_buffer.clone();
        in_buffer.truncate(64);
        let state = SerialState {
            baud_divisor_low: snap.baud_divisor_low,
            baud_divisor_high: snap.baud_divisor_high,
            interrupt_enable: snap.interrupt_enable,
            interrupt_identification: snap.interrupt_identification,
            line_control: snap.line_control,
            line_status: snap.line_status,
            modem_control: snap.modem_control,
            modem_status: snap.modem_status,
            scratch: snap.scratch,
            in_buffer,
        };
        let inner = match Serial::from_state(&state, irq.clone(), NoEvents, out) {
            Ok(s) => s,
            // from_state only fails on an oversized FIFO, excluded above.
            Err(_) => Serial::with_events(irq.clone(), NoEvents, Box::new(std::io::sink()) as SerialOut),
        };
        SerialDevice { inner, irq, errors: 0 }
    }
}
