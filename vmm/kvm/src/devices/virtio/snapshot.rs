//! Serde snapshot state of the virtio-mmio transport and its queues.

use std::num::Wrapping;

use vm_memory::GuestAddress;

use super::queue::Queue;

/// Device-specific virtio state (one variant per device type as they come).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VirtioDeviceState {
    /// The device keeps nothing beyond its queues.
    Stateless,
    /// virtio-console (5.3).
    Console(super::console::snapshot::ConsoleSnapshot),
    /// virtio-blk (5.2).
    Block(super::block::snapshot::BlockSnapshot),
}

/// Saved queue: driver configuration plus ring positions.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    /// QueueNumMax.
    pub max_size: u16,
    /// QueueNum.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available index the device consumes.
    pub next_avail: u16,
    /// Next used index the device publishes.
    pub next_used: u16,
}

impl QueueSnapshot {
    /// Capture `q`.
    pub fn from_queue(q: &Queue) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table.0,
            avail_ring: q.avail_ring.0,
            used_ring: q.used_ring.0,
            next_avail: q.next_avail.0,
            next_used: q.next_used.0,
        }
    }

    /// Load into `q` (its `max_size` is the device's and stays; a snapshot
    /// is validated again at activation).
    pub fn apply(&self, q: &mut Queue) {
        q.size = self.size;
        q.ready = self.ready;
        q.desc_table = GuestAddress(self.desc_table);
        q.avail_ring = GuestAddress(self.avail_ring);
        q.used_ring = GuestAddress(self.used_ring);
        q.next_avail = Wrapping(self.next_avail);
        q.next_used = Wrapping(self.next_used);
    }
}

/// Saved virtio-mmio transport.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioTransportSnapshot {
    /// DeviceID, to match the snapshot with a device.
    pub device_type: u32,
    /// Status.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Accepted features.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// DRIVER_OK accepted and the device running.
    pub activated: bool,
    /// Per-queue state.
    pub queues: Vec<QueueSnapshot>,
    /// Device-specific state.
    pub device: VirtioDeviceState,
}
