//! Serde snapshot state of virtio-console (VIRTIO 1.2 section 5.3).
//!
//! The live queues belong to the device's shared core (the host pump
//! thread uses them too), so the console saves its own ring positions and
//! re-applies them when the transport re-activates it after a restore.

/// Saved state of one port.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortSnapshot {
    /// PORT_READY(1) received from the driver.
    pub guest_ready: bool,
    /// The guest has the port open.
    pub guest_open: bool,
    /// The host side was connected.
    pub host_connected: bool,
    /// Host EOF seen, PORT_OPEN(0) not yet sent.
    pub eof_pending: bool,
    /// The backend stopped taking output.
    pub output_closed: bool,
    /// Guest -> host bytes not yet written to the backend.
    pub outbound: Vec<u8>,
    /// Host -> guest bytes not yet in receive buffers.
    pub staged: Vec<u8>,
    /// A transmit chain partially consumed: head index and byte offset.
    pub tx_partial: Option<(u16, u64)>,
}

/// Saved virtio-console device.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsoleSnapshot {
    /// Per-port state, index = port id.
    pub ports: Vec<PortSnapshot>,
    /// Device -> driver control messages not yet delivered.
    pub control_out: Vec<Vec<u8>>,
    /// `(next_avail, next_used)` of every queue while activated (empty otherwise).
    pub queue_positions: Vec<(u16, u16)>,
}
