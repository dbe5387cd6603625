//! Virtio over MMIO (VIRTIO 1.2): the transport register file ([`mmio`],
//! section 4.2.2), the split virtqueue ([`queue`], section 2.7), and the
//! [`VirtioDevice`] trait a device type (console, block) implements to plug
//! into the transport.

pub mod mmio;
pub mod queue;
#[cfg(test)]
mod queue_tests;
pub mod snapshot;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use self::queue::Queue;
use self::snapshot::VirtioDeviceState;
use super::IrqLine;

/// Device status bits (VIRTIO 1.2 section 2.1), from `virtio-bindings`
/// (`virtio_config::VIRTIO_CONFIG_S_*`).
pub mod status {
    use virtio_bindings::virtio_config as c;
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest knows how to drive it.
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    /// Feature negotiation done.
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error it cannot recover from without reset.
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// Reserved feature bits (VIRTIO 1.2 section 6) as masks; the bit numbers
/// come from `virtio-bindings`.
pub mod features {
    use virtio_bindings::{virtio_config, virtio_ring};
    /// Indirect descriptors (2.7.5.3).
    pub const VIRTIO_F_INDIRECT_DESC: u64 = 1 << virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
    /// used_event / avail_event suppression (2.7.10).
    pub const VIRTIO_F_EVENT_IDX: u64 = 1 << virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    /// Compliance with VIRTIO 1.x; mandatory on the v2 MMIO transport.
    pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;
}

/// Device ids (VIRTIO 1.2 section 5), from `virtio-bindings`
/// (`virtio_ids::VIRTIO_ID_*`).
pub mod device_type {
    use virtio_bindings::virtio_ids as ids;
    /// Network card.
    pub const NET: u32 = ids::VIRTIO_ID_NET;
    /// Block device.
    pub const BLOCK: u32 = ids::VIRTIO_ID_BLOCK;
    /// Console.
    pub const CONSOLE: u32 = ids::VIRTIO_ID_CONSOLE;
    /// Entropy source.
    pub const RNG: u32 = ids::VIRTIO_ID_RNG;
    /// Socket device.
    pub const VSOCK: u32 = ids::VIRTIO_ID_VSOCK;
}

/// InterruptStatus bit: a used buffer notification (4.2.2).
pub const INT_USED_RING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: a configuration change notification (4.2.2).
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// The transport's interrupt state (InterruptStatus, 4.2.2) and the line it
/// raises. Shared between the transport and the activated device.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    line: IrqLine,
}

impl VirtioInterrupt {
    /// Interrupt state with no pending events raising `line`.
    pub fn new(line: IrqLine) -> Self {
        VirtioInterrupt { status: AtomicU32::new(0), line }
    }
    /// Set [`INT_USED_RING`] and raise the line.
    pub fn signal_used_queue(&self) {
        self.raise(INT_USED_RING);
    }
    /// Set [`INT_CONFIG`] and raise the line.
    pub fn signal_config_change(&self) {
        self.raise(INT_CONFIG);
    }
    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::AcqRel);
        // A full eventfd counter already means "pending"; nothing is lost.
        let _ = self.line.trigger();
    }
    /// Current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }
    /// InterruptACK: clear `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }
    /// Clear everything (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::Release);
    }
    /// The line.
    pub fn line(&self) -> &IrqLine {
        &self.line
    }
}

/// What a device receives when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory the queues live in.
    pub mem: GuestMemoryMmap,
    /// All queues of the device, index = queue number; validated when ready.
    pub queues: Vec<Queue>,
    /// Interrupt to signal used buffers / config changes.
    pub interrupt: Arc<VirtioInterrupt>,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// Errors activating a device; the transport sets DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A ready queue's configuration is invalid.
    #[error("queue {index}: {error}")]
    BadQueue {
        /// Queue number.
        index: usize,
        /// Reason.
        error: queue::QueueError,
    },
    /// The device cannot start (missing required queue, backend failure).
    #[error("device activation failed: {0}")]
    Device(String),
}

/// A virtio device type behind the MMIO transport.
///
/// Config space accesses arrive with offsets relative to the start of the
/// device-specific configuration (MMIO offset 0x100); implementations must
/// bounds-check them.
pub trait VirtioDevice: Send {
    /// Device id (section 5, [`device_type`]).
    fn device_type(&self) -> u32;
    /// Offered feature bits; must include [`features::VIRTIO_F_VERSION_1`].
    fn device_features(&self) -> u64;
    /// QueueNumMax for each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Read device configuration at `offset`; out-of-range bytes read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write device configuration at `offset`; out-of-range writes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start operating on `ctx.queues` (DRIVER_OK).
    ///
    /// Errors: [`ActivateError`].
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// The driver wrote queue `index` to QueueNotify (only after activation;
    /// `index` is in range).
    fn queue_notify(&mut self, index: u16);
    /// Device reset (status 0): drop queues and in-flight work.
    fn reset(&mut self);
    /// Device-specific snapshot state.
    fn snapshot(&self) -> VirtioDeviceState;
    /// The queues handed over by [`VirtioDevice::activate`], with their
    /// current ring positions (empty before activation); used for snapshots.
    fn active_queues(&self) -> &[Queue];
}

pub mod block;
pub mod console;

/// Copies device configuration bytes `config[offset..]` into `data`; bytes
/// past the end of `config` (or an offset that overflows) read as 0
/// (VIRTIO 1.2 section 4.2.2, `Config` at 0x100 of the MMIO window).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}
