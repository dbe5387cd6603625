//! The virtio-console control-queue protocol (VIRTIO 1.2 section 5.3.6.2),
//! used with VIRTIO_CONSOLE_F_MULTIPORT: the driver's messages from the
//! control transmitq, and ours into the control receiveq.
//!
//! Control messages (5.3.6.2) are `struct virtio_console_control { le32
//! id; le16 event; le16 value; }`, followed by the name for PORT_NAME. The
//! bring-up sequence Linux's `virtio_console` runs against us:
//!
//! 1. driver -> DEVICE_READY(1) on the control transmitq;
//! 2. device -> DEVICE_ADD(id, 1) (a.k.a. PORT_ADD) for every port;
//! 3. driver fills the port's receiveq, -> PORT_READY(id, 1);
//! 4. device -> CONSOLE_PORT(id, 1) for a console port, PORT_NAME(id, 1) +
//!    name + NUL for a named port (the guest shows it in
//!    `/sys/class/virtio-ports/vportNpM/name`), PORT_OPEN(id, 1) when the
//!    host side is connected;
//! 5. a guest process opens `/dev/vportNpM` -> PORT_OPEN(id, 1); closes it
//!    -> PORT_OPEN(id, 0).
//!
//! Device -> driver messages wait in a bounded queue
//! ([`MAX_PENDING_CONTROL`]) until the driver posts control receive
//! buffers.

use super::{ConsoleCore, CONTROL_RX_QUEUE, CONTROL_TX_QUEUE};
use crate::devices::virtio::block::read_stream;
use crate::devices::virtio::queue::ChainOutcome;

/// Control message events (VIRTIO 1.2 section 5.3.6.2; ours, not in
/// `virtio-bindings`).
pub mod event {
    /// Driver: device initialised (value 1) or failed (0).
    pub const VIRTIO_CONSOLE_DEVICE_READY: u16 = 0;
    /// Device: port `id` added (the spec's name; Linux calls it PORT_ADD).
    pub const VIRTIO_CONSOLE_DEVICE_ADD: u16 = 1;
    /// Device: port `id` removed.
    pub const VIRTIO_CONSOLE_DEVICE_REMOVE: u16 = 2;
    /// Driver: port `id` ready (value 1) or failed (0).
    pub const VIRTIO_CONSOLE_PORT_READY: u16 = 3;
    /// Device: port `id` is a console port.
    pub const VIRTIO_CONSOLE_CONSOLE_PORT: u16 = 4;
    /// Device: console size changed.
    pub const VIRTIO_CONSOLE_RESIZE: u16 = 5;
    /// Both: port `id` opened (1) / closed (0) on the sender's side.
    pub const VIRTIO_CONSOLE_PORT_OPEN: u16 = 6;
    /// Device: the name of port `id` follows the header.
    pub const VIRTIO_CONSOLE_PORT_NAME: u16 = 7;
}
use event::*;

/// Length of `struct virtio_console_control` (5.3.6.2).
pub const CONTROL_HEADER_LEN: usize = 8;
/// `id` of messages about the device rather than a port (Linux's
/// `VIRTIO_CONSOLE_BAD_ID`).
pub const BAD_ID: u32 = u32::MAX;
/// Device -> driver control messages kept while the driver has posted no
/// control buffers; more are dropped (only a misbehaving driver, e.g. one
/// repeating DEVICE_READY without draining, gets there).
pub const MAX_PENDING_CONTROL: usize = 256;

/// A parsed `struct virtio_console_control` (5.3.6.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlMessage {
    /// Port number ([`BAD_ID`] for device-wide messages).
    pub id: u32,
    /// One of [`event`].
    pub event: u16,
    /// Event argument.
    pub value: u16,
}

impl ControlMessage {
    /// Parse the first 8 bytes of `bytes`; `None` when shorter.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let b = bytes.get(..CONTROL_HEADER_LEN)?;
        Some(ControlMessage {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            event: u16::from_le_bytes([b[4], b[5]]),
            value: u16::from_le_bytes([b[6], b[7]]),
        })
    }
    /// The 8-byte little-endian encoding followed by `payload`.
    pub fn encode(&self, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(CONTROL_HEADER_LEN + payload.len());
        v.extend_from_slice(&self.id.to_le_bytes());
        v.extend_from_slice(&self.event.to_le_bytes());
        v.extend_from_slice(&self.value.to_le_bytes());
        v.extend_from_slice(payload);
        v
    }
}

impl ConsoleCore {
    /// Pop and parse the driver's control messages (5.3.6.2).
    pub(super) fn process_control_tx(&mut self) {
        let Some(active) = self.active.as_mut() else { return };
        let Some(q) = active.queues.get_mut(CONTROL_TX_QUEUE).filter(|q| q.ready) else { return };
        let mut messages = Vec::new();
        let r = q.process_chains(&active.mem, |chain| {
            messages.push(read_stream(&active.mem, &chain, 0, CONTROL_HEADER_LEN).unwrap_or_default());
            ChainOutcome::Used(0)
        });
        Self::finish(active, &mut self.stats, &r);
        for m in messages {
            self.handle_control(&m);
        }
        self.deliver_control();
    }

    /// Act on one driver -> device control message (5.3.6.2).
    pub fn handle_control(&mut self, bytes: &[u8]) {
        let Some(msg) = ControlMessage::parse(bytes) else {
            self.stats.bad_control += 1;
            return;
        };
        if msg.event == VIRTIO_CONSOLE_DEVICE_READY {
            if msg.value == 1 {
                for id in 0..self.ports.len() as u32 {
                    self.send_control(ControlMessage { id, event: VIRTIO_CONSOLE_DEVICE_ADD, value: 1 }, &[]);
                }
            }
            return;
        }
        let id = msg.id;
        let Some(port) = usize::try_from(id).ok().filter(|&p| p < self.ports.len()) else {
            self.stats.bad_control += 1;
            return;
        };
        match msg.event {
            VIRTIO_CONSOLE_PORT_READY => {
                let p = &mut self.ports[port];
                p.guest_ready = msg.value == 1;
                if !p.guest_ready {
                    return;
                }
                let (console, name, host) = (p.config.console, p.config.name.clone(), p.host_connected);
                if console {
                    self.send_control(ControlMessage { id, event: VIRTIO_CONSOLE_CONSOLE_PORT, value: 1 }, &[]);
                }
                if let Some(name) = name {
                    let mut payload = name.into_bytes();
                    payload.push(0);
                    self.send_control(ControlMessage { id, event: VIRTIO_CONSOLE_PORT_NAME, value: 1 }, &payload);
                }
                if host {
                    self.send_control(ControlMessage { id, event: VIRTIO_CONSOLE_PORT_OPEN, value: 1 }, &[]);
                }
            }
            VIRTIO_CONSOLE_PORT_OPEN => {
                self.ports[port].guest_open = msg.value != 0;
                if msg.value != 0 {
                    self.deliver_rx(port);
                }
            }
            _ => self.stats.bad_control += 1,
        }
    }

    pub(super) fn send_control(&mut self, msg: ControlMessage, payload: &[u8]) {
        if self.control_out.len() >= MAX_PENDING_CONTROL {
            self.stats.dropped_control += 1;
            return;
        }
        self.control_out.push_back(msg.encode(payload));
    }

    /// Put pending control messages into posted control receive buffers,
    /// one message per buffer (a buffer shorter than the message gets its
    /// prefix).
    pub(super) fn deliver_control(&mut self) {
        let Some(active) = self.active.as_mut().filter(|a| a.multiport) else { return };
        let Some(q) = active.queues.get_mut(CONTROL_RX_QUEUE).filter(|q| q.ready) else { return };
        if self.control_out.is_empty() {
            return;
        }
        let out = &mut self.control_out;
        let r = q.process_chains(&active.mem, |chain| {
            let Some(msg) = out.pop_front() else { return ChainOutcome::Defer };
            let n = chain.write_all(&active.mem, &msg).unwrap_or(0) as u32;
            if out.is_empty() {
                ChainOutcome::UsedLast(n)
            } else {
                ChainOutcome::Used(n)
            }
        });
        Self::finish(active, &mut self.stats, &r);
    }
}
