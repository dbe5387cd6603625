//! Serde snapshot state of virtio-blk (VIRTIO 1.2 section 5.2). Requests
//! complete synchronously inside a queue notification, so there is no
//! in-flight state: the queue positions are saved by the transport.

/// Saved virtio-blk device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockSnapshot {
    /// Capacity in 512-byte sectors (5.2.4), checked against the image on restore.
    pub capacity: u64,
    /// VIRTIO_BLK_F_RO offered.
    pub read_only: bool,
    /// GET_ID string (NUL-padded, 20 bytes).
    pub id: Vec<u8>,
}
