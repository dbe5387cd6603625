//! 16550A UART (COM1) on vm-superio's `Serial`: the guest's console output
//! goes to a `Write` sink (a log file, a pipe, or [`CaptureWriter`] in
//! tests); host input can be queued with [`SerialDevice::enqueue_input`].
//! The interrupt (IRQ 4 on a PC) is an [`IrqLine`].

pub mod io;
pub mod snapshot;
#[cfg(test)]
mod tests;

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::IrqLine;

/// Boxed output sink of the serial port.
pub type SerialOut = Box<dyn Write + Send>;

/// The UART state machine.
pub struct SerialDevice {
    pub(crate) inner: Serial<IrqLine, NoEvents, SerialOut>,
    irq: IrqLine,
    /// Bytes dropped because the sink failed or the input FIFO was full.
    pub(crate) errors: u64,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").field("errors", &self.errors).finish()
    }
}

impl SerialDevice {
    /// A UART in reset state writing transmitted bytes to `out`.
    pub fn new(irq: IrqLine, out: SerialOut) -> Self {
        SerialDevice { inner: Serial::new(irq.clone(), out), irq, errors: 0 }
    }

    /// Read register `offset` (0..=7, DLAB-dependent per the 16550 datasheet).
    pub fn read_reg(&mut self, offset: u8) -> u8 {
        self.inner.read(offset)
    }

    /// Write `value` to register `offset` (0..=7). Transmit-register writes go
    /// to the sink; sink or interrupt errors are counted, not propagated.
    pub fn write_reg(&mut self, offset: u8, value: u8) {
        if self.inner.write(offset, value).is_err() {
            self.errors += 1;
        }
    }

    /// Queue host input for the guest to read; returns how many bytes fit in
    /// the receive FIFO (64 bytes).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.inner.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(_) => {
                self.errors += 1;
                0
            }
        }
    }

    /// The interrupt line.
    pub fn irq(&self) -> &IrqLine {
        &self.irq
    }

    /// Count of dropped bytes / failed interrupt deliveries.
    pub fn errors(&self) -> u64 {
        self.errors
    }
}

/// A `Write` sink that appends to a shared buffer; clone it to read what the
/// guest printed.
#[derive(Clone, Debug, Default)]
pub struct CaptureWriter(pub Arc<Mutex<Vec<u8>>>);

impl CaptureWriter {
    /// A copy of everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

impl Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().map_err(|_| std::io::Error::other("capture buffer poisoned"))?.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
