//! virtio-console with VIRTIO_CONSOLE_F_MULTIPORT (VIRTIO 1.2 section 5.3):
//! the port / control-queue state machine, free of host file descriptors.
//!
//! Queues (5.3.2), for `N` ports:
//!
//! | index | queue |
//! |---|---|
//! | 0 / 1 | port 0 receiveq / transmitq |
//! | 2 / 3 | control receiveq / control transmitq (MULTIPORT only) |
//! | 2 + 2p / 3 + 2p | port `p >= 1` receiveq / transmitq |
//!
//! The control-queue protocol (5.3.6.2: port discovery, names, open /
//! close) is in [`control`].
//!
//! Data: guest -> host bytes from a port's transmitq go to a bounded
//! per-port output buffer ([`TX_BUFFER_LIMIT`]) that the host side drains
//! ([`ConsoleCore::pending_output`] / [`ConsoleCore::consume_output`]);
//! when it is full, chains stay in the ring (the guest sees a full queue)
//! until the host drained it. Host -> guest bytes are accepted only while
//! [`ConsoleCore::wants_input`] (the guest opened the port, posted receive
//! buffers, and nothing is staged), so a host that follows it never reads
//! its backend while the guest cannot take the data: the backend's kernel
//! buffer fills and its writer is pushed back. Host EOF is reported to the
//! guest as PORT_OPEN(id, 0) once staged data has been delivered.
//!
//! The host side (file descriptors, poll loop) is in [`io`].

pub mod control;
pub mod io;
pub mod snapshot;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

pub use self::control::{event, ControlMessage, BAD_ID, CONTROL_HEADER_LEN, MAX_PENDING_CONTROL};

use self::control::event::VIRTIO_CONSOLE_PORT_OPEN;
use self::snapshot::{ConsoleSnapshot, PortSnapshot};
use super::block::read_stream;
use super::queue::{parse_chain, ChainOutcome, DescriptorChain, Processed, Queue};
use super::{ActivateContext, ActivateError, VirtioInterrupt};

// Feature bits (5.3.3) and control events (5.3.6.2) are ours:
// `virtio-bindings` 0.2 has no virtio_console module.

/// Console size in `cols`/`rows` (5.3.3; not offered).
pub const VIRTIO_CONSOLE_F_SIZE: u64 = 1 << 0;
/// Multiple ports and control virtqueues (5.3.3).
pub const VIRTIO_CONSOLE_F_MULTIPORT: u64 = 1 << 1;
/// Emergency write through `emerg_wr` (5.3.3; not offered).
pub const VIRTIO_CONSOLE_F_EMERG_WRITE: u64 = 1 << 2;

/// QueueNumMax of every queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most ports a device may have.
pub const MAX_PORTS: usize = 16;
/// Longest port name in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Guest -> host bytes buffered per port before the transmitq stalls.
pub const TX_BUFFER_LIMIT: usize = 64 << 10;
/// Index of the control receiveq.
pub const CONTROL_RX_QUEUE: usize = 2;
/// Index of the control transmitq.
pub const CONTROL_TX_QUEUE: usize = 3;

/// Receiveq index of port `port` (5.3.2).
pub fn rx_queue(port: usize) -> usize {
    if port == 0 {
        0
    } else {
        2 + 2 * port
    }
}

/// Transmitq index of port `port` (5.3.2).
pub fn tx_queue(port: usize) -> usize {
    rx_queue(port) + 1
}

/// Number of queues of a device with `ports` ports (5.3.2).
pub fn queue_count(ports: usize) -> usize {
    2 + 2 * ports.max(1)
}

/// What a queue index is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueRole {
    /// Receiveq of a port (device -> driver data).
    PortRx(usize),
    /// Transmitq of a port (driver -> device data).
    PortTx(usize),
    /// Control receiveq.
    ControlRx,
    /// Control transmitq.
    ControlTx,
}

/// Role of queue `index` (5.3.2).
pub fn queue_role(index: usize) -> QueueRole {
    match index {
        0 => QueueRole::PortRx(0),
        1 => QueueRole::PortTx(0),
        CONTROL_RX_QUEUE => QueueRole::ControlRx,
        CONTROL_TX_QUEUE => QueueRole::ControlTx,
        i if i % 2 == 0 => QueueRole::PortRx(i / 2 - 1),
        i => QueueRole::PortTx(i / 2 - 1),
    }
}

/// Host-side description of one port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortConfig {
    /// Name announced with PORT_NAME (e.g. `capvisor.agent`).
    pub name: Option<String>,
    /// Announced with CONSOLE_PORT (the guest hooks it to hvc).
    pub console: bool,
    /// A host backend is attached: the port starts host-connected and its
    /// output is kept for the backend (without one, output is discarded).
    pub has_backend: bool,
}

/// Errors building a console.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConsoleError {
    /// No ports, or more than [`MAX_PORTS`].
    #[error("{0} ports (1..={MAX_PORTS} supported)")]
    PortCount(usize),
    /// Empty, too long, or NUL-containing name.
    #[error("invalid port name {0:?}")]
    BadName(String),
    /// Two ports with the same name.
    #[error("duplicate port name {0:?}")]
    DuplicateName(String),
    /// The snapshot does not fit the ports.
    #[error("snapshot has {snapshot} ports, device {device}")]
    SnapshotMismatch {
        /// Ports in the snapshot.
        snapshot: usize,
        /// Ports configured.
        device: usize,
    },
}

/// The driver-visible state of one port (diagnostics and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStatus {
    /// PORT_READY(1) received.
    pub guest_ready: bool,
    /// The guest has the port open (PORT_OPEN(1) received; always true
    /// without MULTIPORT).
    pub guest_open: bool,
    /// The host side is connected (what PORT_OPEN from us last said).
    pub host_connected: bool,
    /// Bytes waiting for the host backend.
    pub output_len: usize,
    /// Bytes from the host waiting for receive buffers.
    pub staged_len: usize,
}

#[derive(Debug)]
struct Port {
    config: PortConfig,
    guest_ready: bool,
    guest_open: bool,
    host_connected: bool,
    /// Host EOF seen; PORT_OPEN(0) goes out once `staged` is delivered.
    eof_pending: bool,
    /// The backend cannot take output any more; transmitted data is dropped.
    output_closed: bool,
    outbound: VecDeque<u8>,
    staged: VecDeque<u8>,
    /// A transmit chain partially copied into `outbound`, with the offset
    /// of the first byte not yet copied.
    tx_partial: Option<(DescriptorChain, u64)>,
}

impl Port {
    fn new(config: PortConfig) -> Self {
        let host_connected = config.has_backend;
        Port {
            config,
            guest_ready: false,
            guest_open: false,
            host_connected,
            eof_pending: false,
            output_closed: false,
            outbound: VecDeque::new(),
            staged: VecDeque::new(),
            tx_partial: None,
        }
    }
    fn discards_output(&self) -> bool {
        !self.config.has_backend || self.output_closed
    }
    /// Whether transmitted bytes can be taken now: they are discarded, or
    /// the output buffer has room.
    fn has_room(&self) -> bool {
        self.discards_output() || self.outbound.len() < TX_BUFFER_LIMIT
    }
}

/// Copy the readable bytes of `chain` from `offset` on into `p`'s output
/// buffer (or discard them); `Some((chain, next offset))` when the buffer
/// filled before the end of the chain.
fn transmit(
    p: &mut Port,
    stats: &mut ConsoleStats,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain,
    offset: u64,
) -> Option<(DescriptorChain, u64)> {
    let remaining = chain.readable_len().saturating_sub(offset);
    if p.discards_output() {
        stats.discarded_output += remaining;
        return None;
    }
    let room = TX_BUFFER_LIMIT.saturating_sub(p.outbound.len()) as u64;
    let n = remaining.min(room);
    match read_stream(mem, &chain, offset, n as usize) {
        Some(bytes) => p.outbound.extend(bytes),
        None => stats.bad_chains += 1,
    }
    (n < remaining).then_some((chain, offset + n))
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<VirtioInterrupt>,
    multiport: bool,
}

/// Counters for diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsoleStats {
    /// Malformed chains returned with length 0.
    pub bad_chains: u64,
    /// Ring-level errors (avail index jumps, unreadable rings).
    pub ring_errors: u64,
    /// Control messages from the driver that were short, for unknown
    /// ports, or of an event the device does not accept.
    pub bad_control: u64,
    /// Device -> driver control messages dropped ([`MAX_PENDING_CONTROL`]).
    pub dropped_control: u64,
    /// Guest -> host bytes discarded (no backend / backend closed).
    pub discarded_output: u64,
}

/// The console device state machine: ports, control protocol, queues.
/// Thread-agnostic; [`io::VirtioConsole`] shares it between the vCPU
/// (queue notifications) and the host pump.
pub struct ConsoleCore {
    ports: Vec<Port>,
    active: Option<Active>,
    control_out: VecDeque<Vec<u8>>,
    /// Ring positions and partial transmit heads from a snapshot, applied
    /// at the next activation.
    restore: Option<ConsoleSnapshot>,
    /// Counters.
    pub stats: ConsoleStats,
}

impl std::fmt::Debug for ConsoleCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleCore")
            .field("ports", &self.ports)
            .field("active", &self.active.is_some())
            .field("control_out", &self.control_out.len())
            .finish()
    }
}

impl ConsoleCore {
    /// A console with `ports` (port `i` gets id `i`).
    ///
    /// Errors: [`ConsoleError`] for a bad port list.
    pub fn new(ports: Vec<PortConfig>) -> Result<Self, ConsoleError> {
        if ports.is_empty() || ports.len() > MAX_PORTS {
            return Err(ConsoleError::PortCount(ports.len()));
        }
        let mut names = std::collections::HashSet::new();
        for name in ports.iter().filter_map(|p| p.name.as_ref()) {
            if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains('\0') {
                return Err(ConsoleError::BadName(name.clone()));
            }
            if !names.insert(name) {
                return Err(ConsoleError::DuplicateName(name.clone()));
            }
        }
        Ok(ConsoleCore {
            ports: ports.into_iter().map(Port::new).collect(),
            active: None,
            control_out: VecDeque::new(),
            restore: None,
            stats: ConsoleStats::default(),
        })
    }

    /// Rebuild from `snap` (port flags, buffered bytes, pending control
    /// messages); ring positions and partially transmitted chains are
    /// applied when the transport re-activates the device.
    ///
    /// Errors: [`ConsoleError`], including a port count mismatch.
    pub fn restore(ports: Vec<PortConfig>, snap: &ConsoleSnapshot) -> Result<Self, ConsoleError> {
        let mut core = Self::new(ports)?;
        if snap.ports.len() != core.ports.len() {
            return Err(ConsoleError::SnapshotMismatch { snapshot: snap.ports.len(), device: core.ports.len() });
        }
        for (p, s) in core.ports.iter_mut().zip(&snap.ports) {
            p.guest_ready = s.guest_ready;
            p.guest_open = s.guest_open;
            p.host_connected = s.host_connected && p.config.has_backend;
            p.eof_pending = s.eof_pending && p.config.has_backend;
            p.output_closed = s.output_closed;
            p.outbound = s.outbound.iter().copied().collect();
            p.staged = s.staged.iter().copied().collect();
        }
        core.control_out = snap.control_out.iter().take(MAX_PENDING_CONTROL).cloned().collect();
        core.restore = Some(snap.clone());
        Ok(core)
    }

    /// Number of ports (`max_nr_ports`, 5.3.4).
    pub fn port_count(&self) -> usize {
        self.ports.len()
    }

    /// QueueNumMax of each queue.
    pub fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; queue_count(self.ports.len())]
    }

    /// The device configuration (5.3.4): `le16 cols, le16 rows, le32
    /// max_nr_ports, le32 emerg_wr`.
    pub fn config_space(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[4..8].copy_from_slice(&(self.ports.len() as u32).to_le_bytes());
        c
    }

    /// Whether the device is activated.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// State of port `port`.
    pub fn port_status(&self, port: usize) -> Option<PortStatus> {
        self.ports.get(port).map(|p| PortStatus {
            guest_ready: p.guest_ready,
            guest_open: p.guest_open,
            host_connected: p.host_connected,
            output_len: p.outbound.len(),
            staged_len: p.staged.len(),
        })
    }

    /// Device -> driver control messages not yet delivered.
    pub fn pending_control(&self) -> usize {
        self.control_out.len()
    }

    /// DRIVER_OK: take the queues. Without MULTIPORT only port 0 exists
    /// and it counts as open (5.3.5: there are no control queues).
    ///
    /// Errors: [`ActivateError::Device`] when a queue is missing.
    pub fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let multiport = ctx.acked_features & VIRTIO_CONSOLE_F_MULTIPORT != 0;
        if ctx.queues.len() != queue_count(self.ports.len()) {
            return Err(ActivateError::Device(format!(
                "{} queues, expected {}",
                ctx.queues.len(),
                queue_count(self.ports.len())
            )));
        }
        let mut active = Active { mem: ctx.mem, queues: ctx.queues, interrupt: ctx.interrupt, multiport };
        if let Some(snap) = self.restore.take() {
            for (q, &(next_avail, next_used)) in active.queues.iter_mut().zip(&snap.queue_positions) {
                q.set_positions(next_avail, next_used);
            }
            for (i, (port, s)) in self.ports.iter_mut().zip(&snap.ports).enumerate() {
                let Some((head, offset)) = s.tx_partial else { continue };
                let Some(q) = active.queues.get_mut(tx_queue(i)).filter(|q| q.ready) else { continue };
                match parse_chain(&active.mem, q.desc_table, u32::from(q.size), head, q.indirect) {
                    Ok(chain) => port.tx_partial = Some((chain, offset)),
                    Err(_) => {
                        let _ = q.add_used(&active.mem, head, 0);
                    }
                }
            }
        }
        if !multiport {
            if let Some(p) = self.ports.first_mut() {
                p.guest_open = true;
                p.guest_ready = true;
            }
        }
        self.active = Some(active);
        // Data staged before a reset can go out as soon as buffers appear.
        for p in 0..self.ports.len() {
            self.process_tx(p);
            self.deliver_rx(p);
        }
        self.deliver_control();
        Ok(())
    }

    /// Device reset: drop the queues and the driver-side port state. Bytes
    /// already taken from the guest stay queued for the backend; bytes
    /// from the host stay staged for the next driver.
    pub fn reset(&mut self) {
        self.active = None;
        self.control_out.clear();
        self.restore = None;
        for p in &mut self.ports {
            p.guest_ready = false;
            p.guest_open = false;
            p.tx_partial = None;
        }
    }

    /// QueueNotify for queue `index`.
    pub fn queue_notify(&mut self, index: u16) {
        let multiport = self.active.as_ref().is_some_and(|a| a.multiport);
        match queue_role(usize::from(index)) {
            QueueRole::ControlTx if multiport => self.process_control_tx(),
            QueueRole::ControlRx if multiport => self.deliver_control(),
            QueueRole::PortTx(p) if p < self.ports.len() && (multiport || p == 0) => self.process_tx(p),
            QueueRole::PortRx(p) if p < self.ports.len() && (multiport || p == 0) => self.deliver_rx(p),
            _ => {}
        }
    }

    /// Account for one [`Queue::process_chains`] run on queue `qi` and
    /// raise the used-buffer interrupt when the driver wants one (2.7.7).
    fn finish(active: &Active, stats: &mut ConsoleStats, r: &Processed) {
        stats.bad_chains += r.invalid as u64;
        if r.error.is_some() {
            stats.ring_errors += 1;
        }
        if r.notify {
            active.interrupt.signal_used_queue();
        }
    }

    /// Move guest -> host bytes from port `port`'s transmitq into its
    /// output buffer until the buffer is full or the ring empty; a chain
    /// that does not fit is kept partially copied ([`Port::tx_partial`])
    /// and finished first next time.
    fn process_tx(&mut self, port: usize) {
        let Some(active) = self.active.as_mut() else { return };
        let Some(p) = self.ports.get_mut(port) else { return };
        let Some(q) = active.queues.get_mut(tx_queue(port)).filter(|q| q.ready) else { return };
        let stats = &mut self.stats;
        let mem = &active.mem;
        if !p.has_room() {
            return;
        }
        let mut used_partial = false;
        if let Some((chain, offset)) = p.tx_partial.take() {
            let head = chain.head_index;
            match transmit(p, stats, mem, chain, offset) {
                Some(rest) => {
                    p.tx_partial = Some(rest);
                    return;
                }
                None => used_partial = q.add_used(mem, head, 0).is_ok(),
            }
        }
        let r = if p.has_room() {
            q.process_chains(mem, |chain| match transmit(p, stats, mem, chain, 0) {
                Some(rest) => {
                    p.tx_partial = Some(rest);
                    ChainOutcome::Keep
                }
                None if p.has_room() => ChainOutcome::Used(0),
                None => ChainOutcome::UsedLast(0),
            })
        } else {
            Processed::default()
        };
        let notify_partial = used_partial && !r.notify && q.needs_notification(mem);
        Self::finish(active, stats, &r);
        if notify_partial {
            active.interrupt.signal_used_queue();
        }
    }

    /// Move staged host -> guest bytes into port `port`'s posted receive
    /// buffers (only while the guest has the port open: Linux discards
    /// data for closed ports). Sends the deferred PORT_OPEN(0) after host
    /// EOF once everything is delivered.
    fn deliver_rx(&mut self, port: usize) {
        let Some(active) = self.active.as_mut() else { return };
        let Some(p) = self.ports.get_mut(port) else { return };
        if p.guest_open && !p.staged.is_empty() {
            if let Some(q) = active.queues.get_mut(rx_queue(port)).filter(|q| q.ready) {
                let r = q.process_chains(&active.mem, |chain| {
                    let n = chain.write_all(&active.mem, p.staged.make_contiguous()).unwrap_or(0);
                    p.staged.drain(..n);
                    if p.staged.is_empty() {
                        ChainOutcome::UsedLast(n as u32)
                    } else {
                        ChainOutcome::Used(n as u32)
                    }
                });
                Self::finish(active, &mut self.stats, &r);
            }
        }
        let p = &mut self.ports[port];
        if p.eof_pending && p.staged.is_empty() {
            p.eof_pending = false;
            p.host_connected = false;
            if active.multiport && p.guest_ready {
                self.send_control(ControlMessage { id: port as u32, event: VIRTIO_CONSOLE_PORT_OPEN, value: 0 }, &[]);
                self.deliver_control();
            }
        }
    }

    /// Whether the host should read from port `port`'s backend now: the
    /// device is active, the host side is connected, the guest has the
    /// port open, nothing is staged, and the receiveq has buffers posted.
    pub fn wants_input(&self, port: usize) -> bool {
        let (Some(active), Some(p)) = (self.active.as_ref(), self.ports.get(port)) else { return false };
        if !p.host_connected || p.eof_pending || !p.guest_open || !p.staged.is_empty() {
            return false;
        }
        active
            .queues
            .get(rx_queue(port))
            .filter(|q| q.ready)
            .and_then(|q| q.avail_idx(&active.mem).ok().map(|idx| idx != q.next_avail()))
            .unwrap_or(false)
    }

    /// Bytes from the host for port `port`: staged and delivered into
    /// posted receive buffers as far as they go.
    pub fn push_input(&mut self, port: usize, data: &[u8]) {
        if let Some(p) = self.ports.get_mut(port) {
            p.staged.extend(data);
            self.deliver_rx(port);
        }
    }

    /// The host backend of port `port` reached EOF (or failed): once the
    /// staged bytes are delivered, the guest gets PORT_OPEN(id, 0) and its
    /// reads return end-of-file.
    pub fn host_disconnected(&mut self, port: usize) {
        let Some(p) = self.ports.get_mut(port) else { return };
        if p.host_connected {
            p.eof_pending = true;
            self.deliver_rx(port);
        }
    }

    /// A (new) host backend is attached to port `port`: output flows
    /// again and the guest gets PORT_OPEN(id, 1).
    pub fn host_reconnected(&mut self, port: usize) {
        let Some(p) = self.ports.get_mut(port) else { return };
        p.config.has_backend = true;
        p.output_closed = false;
        p.eof_pending = false;
        let was = std::mem::replace(&mut p.host_connected, true);
        let notify = !was && p.guest_ready && self.active.as_ref().is_some_and(|a| a.multiport);
        if notify {
            self.send_control(ControlMessage { id: port as u32, event: VIRTIO_CONSOLE_PORT_OPEN, value: 1 }, &[]);
            self.deliver_control();
        }
        self.deliver_rx(port);
    }

    /// The first contiguous run of guest -> host bytes waiting for port
    /// `port`'s backend (empty when none).
    pub fn pending_output(&self, port: usize) -> &[u8] {
        self.ports.get(port).map_or(&[], |p| p.outbound.as_slices().0)
    }

    /// The backend took `n` bytes of [`ConsoleCore::pending_output`]; the
    /// freed room is refilled from the transmitq (releasing backpressure).
    pub fn consume_output(&mut self, port: usize, n: usize) {
        let Some(p) = self.ports.get_mut(port) else { return };
        let n = n.min(p.outbound.len());
        p.outbound.drain(..n);
        self.process_tx(port);
    }

    /// The backend of port `port` cannot take output any more (EPIPE):
    /// buffered and future guest -> host bytes are discarded so the guest
    /// never stalls on a full transmitq.
    pub fn close_output(&mut self, port: usize) {
        let Some(p) = self.ports.get_mut(port) else { return };
        p.output_closed = true;
        self.stats.discarded_output += p.outbound.len() as u64;
        p.outbound.clear();
        self.process_tx(port);
    }

    /// Capture the state (ring positions included: the live queues are
    /// behind a lock, so [`super::VirtioDevice::active_queues`] cannot
    /// lend them to the transport).
    pub fn save(&self) -> ConsoleSnapshot {
        ConsoleSnapshot {
            ports: self
                .ports
                .iter()
                .map(|p| PortSnapshot {
                    guest_ready: p.guest_ready,
                    guest_open: p.guest_open,
                    host_connected: p.host_connected,
                    eof_pending: p.eof_pending,
                    output_closed: p.output_closed,
                    outbound: p.outbound.iter().copied().collect(),
                    staged: p.staged.iter().copied().collect(),
                    tx_partial: p.tx_partial.as_ref().map(|(c, off)| (c.head_index, *off)),
                })
                .collect(),
            control_out: self.control_out.iter().cloned().collect(),
            queue_positions: self
                .active
                .as_ref()
                .map(|a| a.queues.iter().map(|q| (q.next_avail(), q.next_used())).collect())
                .unwrap_or_default(),
        }
    }
}
