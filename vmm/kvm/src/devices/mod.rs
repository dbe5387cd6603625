//! Devices. One folder per device, each with the same files:
//!
//! * `mod.rs` - the device's state machine,
//! * `io.rs` - its bus wiring (addresses, [`Device`] impl, registration),
//! * `snapshot.rs` - its serde snapshot state,
//! * `tests.rs` - its tests.
//!
//! `virtio/` holds the virtio-mmio transport (`mmio.rs`) and the split
//! virtqueue (`queue.rs`) that virtio devices (console, block) plug into.

use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub mod boot_timer;
pub mod i8042;
pub mod serial;
pub mod virtio;

/// What the VMM must do after a device write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoAction {
    /// Nothing: resume the guest.
    None,
    /// The guest asked for a system reset (e.g. i8042 command 0xFE); the
    /// vCPU loop ends with [`crate::vcpu::VcpuStop::Reset`].
    Reset,
    /// The guest asked to be powered off (ACPI S5 through the sleep control
    /// register, [`crate::acpi::power`]); the vCPU loop ends with
    /// [`crate::vcpu::VcpuStop::PoweredOff`].
    PowerOff,
}

/// Snapshot of one device, as stored by the VMM (one variant per device kind).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum DeviceState {
    /// A device without state worth saving.
    Stateless,
    /// 16550 UART.
    Serial(serial::snapshot::SerialSnapshot),
    /// i8042 controller.
    I8042(i8042::snapshot::I8042Snapshot),
    /// virtio-mmio transport with its device.
    VirtioMmio(virtio::snapshot::MmioTransportSnapshot),
    /// Boot timer pseudo-device.
    BootTimer(boot_timer::snapshot::BootTimerSnapshot),
}

/// A device on a bus. Accesses arrive with the offset from the start of the
/// device's range and a 1..=8 byte little-endian buffer. Implementations
/// must not panic on any offset, width or value: all of them are chosen by
/// the guest.
pub trait Device: Send {
    /// Short name for diagnostics ("serial", "i8042", "virtio-mmio").
    fn name(&self) -> &str;
    /// Guest read of `data.len()` bytes at `offset`; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> IoAction;
    /// Current snapshot state.
    fn snapshot(&self) -> DeviceState;
}

/// An edge-triggered interrupt line backed by an eventfd (registered with
/// KVM as an irqfd once an irqchip exists). Cloning shares the eventfd.
#[derive(Clone, Debug)]
pub struct IrqLine {
    evt: Arc<EventFd>,
}

impl IrqLine {
    /// A new, non-blocking line.
    ///
    /// Errors: eventfd creation failure.
    pub fn new() -> std::io::Result<Self> {
        Ok(IrqLine { evt: Arc::new(EventFd::new(EFD_NONBLOCK)?) })
    }

    /// Raise the interrupt.
    ///
    /// Errors: eventfd write failure (counter overflow).
    pub fn trigger(&self) -> std::io::Result<()> {
        self.evt.write(1)
    }

    /// The eventfd (for KVM_IRQFD or an event loop).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Number of triggers since the last call (0 when none; consumes them).
    pub fn take_count(&self) -> u64 {
        self.evt.read().unwrap_or(0)
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        IrqLine::trigger(self)
    }
}
