//! Transport wiring of virtio-blk: the [`VirtioDevice`] implementation
//! (VIRTIO 1.2 section 5.2) over a [`BlockDisk`].
//!
//! Threading: requests are executed synchronously inside
//! [`VirtioDevice::queue_notify`], i.e. on the vCPU thread whose QueueNotify
//! write exited to the VMM, with positional I/O on the image (raw files
//! are served from the page cache; a request blocks only its own vCPU).
//! Nothing else touches the queue, so [`VirtioDevice::active_queues`]
//! returns the live ring positions for snapshots.

use std::fs::OpenOptions;
use std::path::Path;

use super::snapshot::BlockSnapshot;
use super::{feature, BlockDisk, DiskImage, RawFile, QUEUE_SIZE, SECTOR_SIZE, SEG_MAX};
use crate::devices::virtio::queue::Queue;
use crate::devices::virtio::snapshot::VirtioDeviceState;
use crate::devices::virtio::{device_type, features, ActivateContext, ActivateError, VirtioDevice};

/// Size of the configuration space we expose (`struct virtio_blk_config`
/// up to and including `num_queues`, 5.2.4); reads past it return 0.
pub const CONFIG_LEN: usize = config_offset::NUM_QUEUES + 2;

/// Configuration field offsets (5.2.4), from `struct virtio_blk_config` of
/// `virtio-bindings`.
pub mod config_offset {
    use std::mem::offset_of;

    use virtio_bindings::virtio_blk::virtio_blk_config as C;
    /// `le64 capacity` (512-byte sectors).
    pub const CAPACITY: usize = offset_of!(C, capacity);
    /// `le32 size_max` (not offered: 0).
    pub const SIZE_MAX: usize = offset_of!(C, size_max);
    /// `le32 seg_max`.
    pub const SEG_MAX: usize = offset_of!(C, seg_max);
    /// `le32 blk_size`.
    pub const BLK_SIZE: usize = offset_of!(C, blk_size);
    /// `le16 num_queues` (VIRTIO_BLK_F_MQ not offered: 0).
    pub const NUM_QUEUES: usize = offset_of!(C, num_queues);
}

/// A virtio-blk device (device id 2) with one request queue.
pub struct VirtioBlock {
    disk: BlockDisk,
    features: u64,
    config: [u8; CONFIG_LEN],
    max_sizes: [u16; 1],
    active: Option<ActivateContext>,
}

impl std::fmt::Debug for VirtioBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBlock").field("disk", &self.disk).field("active", &self.active.is_some()).finish()
    }
}

/// Errors building a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Opening or inspecting the image failed.
    #[error("disk image: {0}")]
    Io(#[from] std::io::Error),
    /// A snapshot does not match the image it is restored onto.
    #[error("snapshot mismatch: {0}")]
    SnapshotMismatch(String),
}

impl VirtioBlock {
    /// A device over `image`. Offered features (5.2.3): VIRTIO_F_VERSION_1,
    /// VIRTIO_F_INDIRECT_DESC, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE
    /// (512), VIRTIO_BLK_F_FLUSH, and VIRTIO_BLK_F_RO when `read_only`.
    /// `id` is the GET_ID string (at most 20 bytes are used).
    pub fn new(image: Box<dyn DiskImage>, read_only: bool, id: &[u8]) -> Self {
        let disk = BlockDisk::new(image, read_only, id);
        let mut features = features::VIRTIO_F_VERSION_1
            | features::VIRTIO_F_INDIRECT_DESC
            | feature::VIRTIO_BLK_F_SEG_MAX
            | feature::VIRTIO_BLK_F_BLK_SIZE
            | feature::VIRTIO_BLK_F_FLUSH;
        if read_only {
            features |= feature::VIRTIO_BLK_F_RO;
        }
        let mut config = [0u8; CONFIG_LEN];
        config[config_offset::CAPACITY..config_offset::CAPACITY + 8].copy_from_slice(&disk.capacity().to_le_bytes());
        config[config_offset::SEG_MAX..config_offset::SEG_MAX + 4].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[config_offset::BLK_SIZE..config_offset::BLK_SIZE + 4]
            .copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        VirtioBlock { disk, features, config, max_sizes: [QUEUE_SIZE], active: None }
    }

    /// Open the raw image at `path` (read-only or read-write) and build a
    /// device over it.
    ///
    /// Errors: [`BlockError::Io`] when the file cannot be opened.
    pub fn open(path: &Path, read_only: bool, id: &[u8]) -> Result<Self, BlockError> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        Ok(Self::new(Box::new(RawFile::new(file)?), read_only, id))
    }

    /// Rebuild a device from `snap` over `image` (before
    /// [`crate::devices::virtio::mmio::MmioTransport::restore`], which
    /// restores the queue and re-activates the device).
    ///
    /// The read-only flag and the id come from the snapshot (the guest
    /// negotiated features with them).
    ///
    /// Errors: [`BlockError::SnapshotMismatch`] when the image size differs
    /// from the snapshot's capacity.
    pub fn restore(image: Box<dyn DiskImage>, snap: &BlockSnapshot) -> Result<Self, BlockError> {
        let dev = Self::new(image, snap.read_only, &snap.id);
        if dev.disk.capacity() != snap.capacity {
            return Err(BlockError::SnapshotMismatch(format!(
                "capacity {} sectors, snapshot has {}",
                dev.disk.capacity(),
                snap.capacity
            )));
        }
        Ok(dev)
    }

    /// The disk and its counters.
    pub fn disk(&self) -> &BlockDisk {
        &self.disk
    }

    /// Capture the device state.
    pub fn save(&self) -> BlockSnapshot {
        BlockSnapshot { capacity: self.disk.capacity(), read_only: self.disk.read_only(), id: self.disk.id().to_vec() }
    }
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }
    fn device_features(&self) -> u64 {
        self.features
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::read_config_bytes(&self.config, offset, data)
    }
    /// The configuration is read-only without VIRTIO_BLK_F_CONFIG_WCE.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if !ctx.queues.first().is_some_and(|q| q.ready) {
            return Err(ActivateError::Device("request queue not ready".into()));
        }
        self.active = Some(ctx);
        Ok(())
    }
    fn queue_notify(&mut self, index: u16) {
        let Some(ctx) = self.active.as_mut() else { return };
        let Some(q) = ctx.queues.get_mut(usize::from(index)).filter(|q| q.ready) else { return };
        // A ring-level error leaves the queue alone; chains already
        // completed before it are in the used ring and get their interrupt.
        if self.disk.process_queue(&ctx.mem, q).notify {
            ctx.interrupt.signal_used_queue();
        }
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn snapshot(&self) -> VirtioDeviceState {
        VirtioDeviceState::Block(self.save())
    }
    fn active_queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |c| c.queues.as_slice())
    }
}
