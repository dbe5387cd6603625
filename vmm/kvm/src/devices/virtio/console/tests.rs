//! virtio-console tests (VIRTIO 1.2 section 5.3): the MULTIPORT control
//! protocol as Linux's `virtio_console` drives it, and the host pump over a
//! socketpair, against guest memory from vm-memory.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::event::*;
use super::io::{ConsoleBackend, ConsolePort, VirtioConsole};
use super::*;
use crate::devices::virtio::mmio::{reg, MmioTransport};
use crate::devices::virtio::queue::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::devices::virtio::snapshot::VirtioDeviceState;
use crate::devices::virtio::{features, status, ActivateContext, VirtioDevice, VirtioInterrupt, INT_USED_RING};
use crate::devices::{Device, IrqLine};
use crate::testutil::{mem, DriverQueue};

const MEM: usize = 8 << 20;
const QSIZE: u16 = 16;
const BUF_LEN: u32 = 0x400;

fn qbase(qi: usize) -> u64 {
    0x10000 + 0x1000 * qi as u64
}
fn buf_addr(qi: usize, desc: u16) -> u64 {
    0x100000 + 0x10000 * qi as u64 + u64::from(desc) * u64::from(BUF_LEN)
}

/// The guest driver's side of all queues of a console.
struct Driver {
    m: GuestMemoryMmap,
    qs: Vec<DriverQueue>,
    next_desc: Vec<u16>,
    seen_used: Vec<u16>,
}

impl Driver {
    fn new(m: &GuestMemoryMmap, nqueues: usize) -> Self {
        Driver {
            m: m.clone(),
            qs: (0..nqueues).map(|i| DriverQueue::new(QSIZE, qbase(i))).collect(),
            next_desc: vec![0; nqueues],
            seen_used: vec![0; nqueues],
        }
    }
    fn ctx(&self, irq: &Arc<VirtioInterrupt>, acked: u64) -> ActivateContext {
        ActivateContext {
            mem: self.m.clone(),
            queues: self.qs.iter().map(|d| d.device_queue()).collect(),
            interrupt: irq.clone(),
            acked_features: acked,
        }
    }
    fn alloc(&mut self, qi: usize) -> u16 {
        let d = self.next_desc[qi];
        self.next_desc[qi] = (d + 1) % QSIZE;
        d
    }
    /// Post an empty device-writable buffer of `len` bytes.
    fn post_rx(&mut self, qi: usize, len: u32) -> u16 {
        let d = self.alloc(qi);
        self.qs[qi].set_desc(&self.m, d, buf_addr(qi, d), len, VIRTQ_DESC_F_WRITE, 0);
        self.qs[qi].offer(&self.m, d);
        d
    }
    /// Post a device-readable buffer holding `bytes` (split in two
    /// descriptors when `split`).
    fn send(&mut self, qi: usize, bytes: &[u8], split: bool) -> u16 {
        let d = self.alloc(qi);
        self.m.write_slice(bytes, GuestAddress(buf_addr(qi, d))).unwrap();
        if split && bytes.len() > 1 {
            let d2 = self.alloc(qi);
            let half = bytes.len() / 2;
            self.qs[qi].set_desc(&self.m, d, buf_addr(qi, d), half as u32, VIRTQ_DESC_F_NEXT, d2);
            self.m.write_slice(&bytes[half..], GuestAddress(buf_addr(qi, d2))).unwrap();
            self.qs[qi].set_desc(&self.m, d2, buf_addr(qi, d2), (bytes.len() - half) as u32, 0, 0);
        } else {
            self.qs[qi].set_desc(&self.m, d, buf_addr(qi, d), bytes.len() as u32, 0, 0);
        }
        self.qs[qi].offer(&self.m, d);
        d
    }
    /// Used entries since the last call: (id, len, bytes written at the
    /// buffer of descriptor `id`).
    fn used(&mut self, qi: usize) -> Vec<(u16, u32, Vec<u8>)> {
        let idx = self.qs[qi].used_idx(&self.m);
        let mut out = Vec::new();
        while self.seen_used[qi] != idx {
            let (id, len) = self.qs[qi].used_elem(&self.m, self.seen_used[qi]);
            let mut data = vec![0u8; len.min(BUF_LEN) as usize];
            self.m.read_slice(&mut data, GuestAddress(buf_addr(qi, id as u16))).unwrap();
            out.push((id as u16, len, data));
            self.seen_used[qi] = self.seen_used[qi].wrapping_add(1);
        }
        out
    }
    /// Control messages received since the last call.
    fn control(&mut self) -> Vec<(ControlMessage, Vec<u8>)> {
        self.used(CONTROL_RX_QUEUE)
            .into_iter()
            .map(|(_, _, data)| {
                (ControlMessage::parse(&data).expect("8-byte header"), data[CONTROL_HEADER_LEN..].to_vec())
            })
            .collect()
    }
    fn ctl(&mut self, id: u32, event: u16, value: u16) -> Vec<u8> {
        let m = ControlMessage { id, event, value }.encode(&[]);
        self.send(CONTROL_TX_QUEUE, &m, false);
        m
    }
}

fn msg(id: u32, event: u16, value: u16) -> ControlMessage {
    ControlMessage { id, event, value }
}

const AGENT: &str = "capvisor.agent";
const ALL_FEATURES: u64 = features::VIRTIO_F_VERSION_1 | VIRTIO_CONSOLE_F_MULTIPORT;

/// Console port 0 without backend + agent port 1 on a socketpair;
/// activated with MULTIPORT. Returns the peer (agent side) socket.
struct Rig {
    dev: VirtioConsole,
    host: ConsoleBackend,
    drv: Driver,
    irq: Arc<VirtioInterrupt>,
    peer: UnixStream,
}

impl Rig {
    fn new() -> Self {
        Self::with_features(ALL_FEATURES)
    }
    fn with_features(acked: u64) -> Self {
        let (ours, peer) = UnixStream::pair().unwrap();
        let (mut dev, host) =
            VirtioConsole::new(vec![ConsolePort::console(None), ConsolePort::named(AGENT, ours)]).unwrap();
        let m = mem(MEM);
        let drv = Driver::new(&m, dev.queue_max_sizes().len());
        let irq = Arc::new(VirtioInterrupt::new(IrqLine::new().unwrap()));
        dev.activate(drv.ctx(&irq, acked)).unwrap();
        peer.set_nonblocking(true).unwrap();
        Rig { dev, host, drv, irq, peer }
    }
    fn notify(&mut self, qi: usize) {
        self.dev.queue_notify(qi as u16);
    }
    /// Linux's bring-up: control buffers, DEVICE_READY, PORT_ADD handling
    /// (fill the port's receiveq, PORT_READY), open the agent port.
    fn bring_up(&mut self) {
        for _ in 0..8 {
            self.drv.post_rx(CONTROL_RX_QUEUE, 4096);
        }
        self.notify(CONTROL_RX_QUEUE);
        self.drv.ctl(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 1);
        self.notify(CONTROL_TX_QUEUE);
        let adds = self.drv.control();
        assert_eq!(
            adds.iter().map(|m| m.0).collect::<Vec<_>>(),
            vec![msg(0, VIRTIO_CONSOLE_DEVICE_ADD, 1), msg(1, VIRTIO_CONSOLE_DEVICE_ADD, 1)]
        );
        for id in 0..2u32 {
            self.drv.ctl(id, VIRTIO_CONSOLE_PORT_READY, 1);
        }
        self.notify(CONTROL_TX_QUEUE);
        self.drv.ctl(1, VIRTIO_CONSOLE_PORT_OPEN, 1);
        self.notify(CONTROL_TX_QUEUE);
        // re-post what the device consumed
        for _ in 0..8 {
            self.drv.post_rx(CONTROL_RX_QUEUE, 4096);
        }
        self.notify(CONTROL_RX_QUEUE);
        self.drv.control();
    }
    fn status(&self, port: usize) -> PortStatus {
        self.host.core().port_status(port).unwrap()
    }
    fn peer_read_all(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.peer.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        out
    }
}

fn has_pollin(host: &ConsoleBackend) -> bool {
    host.poll_fds().iter().skip(1).any(|p| p.events & libc::POLLIN != 0)
}

#[test]
fn queue_layout_follows_the_spec() {
    assert_eq!((rx_queue(0), tx_queue(0)), (0, 1));
    assert_eq!((rx_queue(1), tx_queue(1)), (4, 5));
    assert_eq!((rx_queue(3), tx_queue(3)), (8, 9));
    assert_eq!(queue_count(2), 6);
    for i in 0..40 {
        let back = match queue_role(i) {
            QueueRole::PortRx(p) => rx_queue(p),
            QueueRole::PortTx(p) => tx_queue(p),
            QueueRole::ControlRx => CONTROL_RX_QUEUE,
            QueueRole::ControlTx => CONTROL_TX_QUEUE,
        };
        assert_eq!(back, i);
    }
}

#[test]
fn multiport_is_offered_and_negotiated_through_the_transport() {
    let (a, _b) = UnixStream::pair().unwrap();
    let (dev, _host) = VirtioConsole::new(vec![ConsolePort::console(None), ConsolePort::named(AGENT, a)]).unwrap();
    let f = dev.device_features();
    assert_ne!(f & VIRTIO_CONSOLE_F_MULTIPORT, 0);
    assert_ne!(f & features::VIRTIO_F_VERSION_1, 0);
    assert_eq!(f & (VIRTIO_CONSOLE_F_SIZE | VIRTIO_CONSOLE_F_EMERG_WRITE), 0);
    assert_eq!(dev.device_type(), 3);
    assert_eq!(dev.queue_max_sizes().len(), 6);
    let mut cfg = [0u8; 12];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[4..8], &2u32.to_le_bytes(), "max_nr_ports");
    let mut past = [0xffu8; 4];
    dev.read_config(u64::MAX - 1, &mut past);
    assert_eq!(past, [0; 4]);

    let m = mem(MEM);
    let irq = Arc::new(VirtioInterrupt::new(IrqLine::new().unwrap()));
    let mut t = MmioTransport::new(Box::new(dev), m.clone(), irq);
    let w = |t: &mut MmioTransport, off: u64, v: u32| {
        t.write(off, &v.to_le_bytes());
    };
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
    w(&mut t, reg::DRIVER_FEATURES, VIRTIO_CONSOLE_F_MULTIPORT as u32);
    w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
    w(&mut t, reg::DRIVER_FEATURES, 1);
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    let mut st = [0u8; 4];
    t.read(reg::STATUS, &mut st);
    assert_ne!(u32::from_le_bytes(st) & status::FEATURES_OK, 0);
    assert_eq!(t.acked_features(), ALL_FEATURES);
    let drv = Driver::new(&m, 6);
    for (i, d) in drv.qs.iter().enumerate() {
        w(&mut t, reg::QUEUE_SEL, i as u32);
        w(&mut t, reg::QUEUE_NUM, u32::from(d.size));
        w(&mut t, reg::QUEUE_DESC_LOW, d.desc as u32);
        w(&mut t, reg::QUEUE_DRIVER_LOW, d.avail as u32);
        w(&mut t, reg::QUEUE_DEVICE_LOW, d.used as u32);
        w(&mut t, reg::QUEUE_READY, 1);
    }
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    assert!(t.is_activated(), "{:?}", t.last_error());
}

#[test]
fn named_port_bring_up_sequence() {
    let mut r = Rig::new();
    for _ in 0..8 {
        r.drv.post_rx(CONTROL_RX_QUEUE, 4096);
    }
    r.notify(CONTROL_RX_QUEUE);
    assert!(r.drv.control().is_empty(), "nothing before DEVICE_READY");

    r.drv.ctl(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 1);
    r.notify(CONTROL_TX_QUEUE);
    let used_tx = r.drv.used(CONTROL_TX_QUEUE);
    assert_eq!(used_tx.len(), 1, "control message returned");
    assert_eq!(used_tx[0].1, 0, "nothing written into a transmit buffer");
    let got = r.drv.control();
    assert_eq!(
        got.iter().map(|m| m.0).collect::<Vec<_>>(),
        vec![msg(0, VIRTIO_CONSOLE_DEVICE_ADD, 1), msg(1, VIRTIO_CONSOLE_DEVICE_ADD, 1)]
    );
    assert_ne!(r.irq.status() & INT_USED_RING, 0);

    // port 0: a console port without backend
    r.drv.ctl(0, VIRTIO_CONSOLE_PORT_READY, 1);
    r.notify(CONTROL_TX_QUEUE);
    assert_eq!(r.drv.control().iter().map(|m| m.0).collect::<Vec<_>>(), vec![msg(0, VIRTIO_CONSOLE_CONSOLE_PORT, 1)]);

    // port 1: the agent: name (NUL-terminated, as QEMU sends it) then host open
    r.drv.ctl(1, VIRTIO_CONSOLE_PORT_READY, 1);
    r.notify(CONTROL_TX_QUEUE);
    let got = r.drv.control();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0, msg(1, VIRTIO_CONSOLE_PORT_NAME, 1));
    assert_eq!(got[0].1, b"capvisor.agent\0");
    assert_eq!(got[1].0, msg(1, VIRTIO_CONSOLE_PORT_OPEN, 1));
    assert!(r.status(1).guest_ready && !r.status(1).guest_open && r.status(1).host_connected);

    // guest-init opens /dev/vport0p1
    r.drv.ctl(1, VIRTIO_CONSOLE_PORT_OPEN, 1);
    r.notify(CONTROL_TX_QUEUE);
    assert!(r.status(1).guest_open);
    assert!(r.drv.control().is_empty());
    // and closes it
    r.drv.ctl(1, VIRTIO_CONSOLE_PORT_OPEN, 0);
    r.notify(CONTROL_TX_QUEUE);
    assert!(!r.status(1).guest_open);
}

#[test]
fn control_messages_wait_for_control_buffers() {
    let mut r = Rig::new();
    r.drv.ctl(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 1);
    r.notify(CONTROL_TX_QUEUE);
    assert_eq!(r.host.core().pending_control(), 2);
    r.drv.post_rx(CONTROL_RX_QUEUE, 4096);
    r.notify(CONTROL_RX_QUEUE);
    assert_eq!(r.drv.control().len(), 1);
    assert_eq!(r.host.core().pending_control(), 1);
    // a buffer shorter than the message gets a prefix; an empty chain is consumed too
    r.drv.ctl(1, VIRTIO_CONSOLE_PORT_READY, 1);
    r.notify(CONTROL_TX_QUEUE);
    r.drv.post_rx(CONTROL_RX_QUEUE, 4096); // PORT_ADD(1)
    r.drv.post_rx(CONTROL_RX_QUEUE, 10); // PORT_NAME, truncated
    r.notify(CONTROL_RX_QUEUE);
    let got = r.drv.used(CONTROL_RX_QUEUE);
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].1, 10);
    assert_eq!(&got[1].2[8..], b"ca");
}

#[test]
fn malformed_control_messages_are_ignored() {
    let mut r = Rig::new();
    for _ in 0..4 {
        r.drv.post_rx(CONTROL_RX_QUEUE, 4096);
    }
    r.notify(CONTROL_RX_QUEUE);
    r.drv.send(CONTROL_TX_QUEUE, &[1, 2, 3], false); // short
    r.drv.ctl(7, VIRTIO_CONSOLE_PORT_READY, 1); // no such port
    r.drv.ctl(BAD_ID, VIRTIO_CONSOLE_PORT_OPEN, 1);
    r.drv.ctl(1, VIRTIO_CONSOLE_PORT_NAME, 1); // device -> driver only
    r.drv.ctl(1, 0xffff, 1); // unknown event
    r.drv.ctl(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 0); // driver failure
    r.drv.ctl(1, VIRTIO_CONSOLE_PORT_READY, 0); // port failure
    r.notify(CONTROL_TX_QUEUE);
    assert_eq!(r.drv.used(CONTROL_TX_QUEUE).len(), 7, "every message returned");
    assert!(r.drv.control().is_empty(), "no reaction");
    assert_eq!(r.host.core().stats.bad_control, 5);
    assert!(!r.status(1).guest_ready);
    // a header split over two descriptors is still one message
    let m = msg(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 1).encode(&[]);
    r.drv.send(CONTROL_TX_QUEUE, &m, true);
    r.notify(CONTROL_TX_QUEUE);
    assert_eq!(r.drv.control().len(), 2);
}

#[test]
fn pending_control_messages_are_bounded() {
    let mut r = Rig::new();
    for _ in 0..(MAX_PENDING_CONTROL / 2 + 10) / usize::from(QSIZE) + 1 {
        for _ in 0..QSIZE {
            r.drv.ctl(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 1);
        }
        r.notify(CONTROL_TX_QUEUE);
    }
    let core = r.host.core();
    assert_eq!(core.pending_control(), MAX_PENDING_CONTROL);
    assert!(core.stats.dropped_control > 0);
}

#[test]
fn guest_to_host_bytes_reach_the_socket() {
    let mut r = Rig::new();
    r.bring_up();
    r.drv.send(tx_queue(1), b"hello ", false);
    r.drv.send(tx_queue(1), b"from the guest", true);
    r.notify(tx_queue(1));
    let used = r.drv.used(tx_queue(1));
    assert_eq!(used.len(), 2, "chains returned as soon as buffered");
    assert!(used.iter().all(|u| u.1 == 0));
    assert_eq!(r.status(1).output_len, 20);
    assert!(r.host.poll_fds().iter().any(|p| p.events & libc::POLLOUT != 0));
    r.host.process();
    assert_eq!(r.peer_read_all(), b"hello from the guest");
    assert_eq!(r.status(1).output_len, 0);
    // console port 0 has no backend: its output is discarded, chains still returned
    r.drv.send(tx_queue(0), b"[    0.000000] Linux", false);
    r.notify(tx_queue(0));
    assert_eq!(r.drv.used(tx_queue(0)).len(), 1);
    assert_eq!(r.status(0).output_len, 0);
    assert_eq!(r.host.core().stats.discarded_output, 20);
}

#[test]
fn host_to_guest_bytes_land_in_posted_receive_buffers() {
    let mut r = Rig::new();
    r.bring_up();
    r.drv.post_rx(rx_queue(1), 8);
    r.drv.post_rx(rx_queue(1), 64);
    r.notify(rx_queue(1));
    assert!(has_pollin(&r.host));
    r.peer.write_all(b"0123456789abcdef").unwrap();
    r.irq.ack(INT_USED_RING);
    r.host.process();
    let used = r.drv.used(rx_queue(1));
    assert_eq!(
        used.iter().map(|u| (u.1, u.2.clone())).collect::<Vec<_>>(),
        vec![(8, b"01234567".to_vec()), (8, b"89abcdef".to_vec())]
    );
    assert_ne!(r.irq.status() & INT_USED_RING, 0, "interrupt raised from the host side");
}

#[test]
fn no_reading_while_the_guest_has_no_buffers_or_the_port_closed() {
    let mut r = Rig::new();
    r.bring_up();
    // open, but no receive buffers: the backend is not read
    assert!(!has_pollin(&r.host));
    r.peer.write_all(b"early").unwrap();
    r.host.process();
    assert_eq!(r.status(1).staged_len, 0, "left in the socket");
    // fill the socket until the peer is pushed back
    let chunk = [0x61u8; 4096];
    let mut sent = 5usize;
    loop {
        match r.peer.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
        assert!(sent < 64 << 20, "socket never filled");
    }
    r.host.process();
    assert_eq!(r.status(1).staged_len, 0);

    // buffers posted: reading resumes, exactly what fits is delivered
    for _ in 0..4 {
        r.drv.post_rx(rx_queue(1), 1024);
    }
    r.notify(rx_queue(1));
    assert!(has_pollin(&r.host), "resumed on queue notify");
    r.host.process();
    let got: Vec<u8> = r.drv.used(rx_queue(1)).into_iter().flat_map(|u| u.2).collect();
    assert_eq!(got.len(), 4096);
    assert_eq!(&got[..5], b"early");
    let staged = r.status(1).staged_len;
    assert!(staged > 0, "the rest of one read is staged");
    assert!(!has_pollin(&r.host), "nothing more is read while data is staged");

    // the guest closes the port: staged data is kept, nothing delivered
    r.drv.ctl(1, VIRTIO_CONSOLE_PORT_OPEN, 0);
    r.notify(CONTROL_TX_QUEUE);
    r.drv.post_rx(rx_queue(1), 1024);
    r.notify(rx_queue(1));
    r.host.process();
    assert!(r.drv.used(rx_queue(1)).is_empty());
    assert_eq!(r.status(1).staged_len, staged);
    // reopened: delivery continues where it stopped
    r.drv.ctl(1, VIRTIO_CONSOLE_PORT_OPEN, 1);
    r.notify(CONTROL_TX_QUEUE);
    let u = r.drv.used(rx_queue(1));
    assert_eq!(u.len(), 1);
    assert!(u[0].2.iter().all(|&b| b == 0x61));
}

#[test]
fn transmit_stalls_while_the_backend_is_full_and_resumes() {
    let mut r = Rig::new();
    r.bring_up();
    let big = vec![0x42u8; 1000];
    let mut sent = 0usize;
    let mut returned = 0usize;
    // keep the ring full; the peer does not read
    for _ in 0..2000 {
        let used = r.drv.used(tx_queue(1)).len();
        returned += used;
        if sent - returned >= usize::from(QSIZE) {
            break; // the device stopped returning chains
        }
        r.drv.send(tx_queue(1), &big, false);
        sent += 1;
        r.notify(tx_queue(1));
        r.host.process();
    }
    returned += r.drv.used(tx_queue(1)).len();
    assert_eq!(sent - returned, usize::from(QSIZE), "ring full: guest pushed back");
    assert!(r.status(1).output_len >= TX_BUFFER_LIMIT - big.len());
    // the peer drains; the pump refills from the ring and returns the chains
    let mut got = 0usize;
    for _ in 0..10000 {
        got += r.peer_read_all().len();
        r.host.process();
        returned += r.drv.used(tx_queue(1)).len();
        if returned == sent && r.status(1).output_len == 0 {
            got += r.peer_read_all().len();
            break;
        }
    }
    assert_eq!(returned, sent);
    assert_eq!(got, sent * big.len(), "no byte lost");
}

#[test]
fn backend_eof_closes_the_port_after_staged_data() {
    let mut r = Rig::new();
    r.bring_up();
    r.drv.post_rx(rx_queue(1), 4);
    r.notify(rx_queue(1));
    r.peer.write_all(b"last words").unwrap();
    r.peer.shutdown(std::net::Shutdown::Both).unwrap();
    r.host.process();
    assert_eq!(r.drv.used(rx_queue(1))[0].2, b"last");
    assert!(r.drv.control().is_empty(), "EOF waits for the staged bytes");
    assert!(r.status(1).host_connected);
    r.drv.post_rx(rx_queue(1), 64);
    r.notify(rx_queue(1));
    r.host.process(); // reads EOF now
    assert_eq!(r.drv.used(rx_queue(1))[0].2, b" words");
    // one more buffer so the EOF read happens
    r.drv.post_rx(rx_queue(1), 64);
    r.notify(rx_queue(1));
    r.host.process();
    let ctl = r.drv.control();
    assert_eq!(ctl.iter().map(|m| m.0).collect::<Vec<_>>(), vec![msg(1, VIRTIO_CONSOLE_PORT_OPEN, 0)]);
    assert!(!r.status(1).host_connected);
    assert!(!has_pollin(&r.host));
    // guest writes after the peer is gone: discarded, never stuck
    for _ in 0..3 {
        r.drv.send(tx_queue(1), b"anyone there?", false);
    }
    r.notify(tx_queue(1));
    r.host.process();
    r.notify(tx_queue(1));
    assert_eq!(r.drv.used(tx_queue(1)).len(), 3);
    assert_eq!(r.status(1).output_len, 0);
    // PORT_READY again (driver re-probe) does not claim the host is connected
    r.drv.ctl(1, VIRTIO_CONSOLE_PORT_READY, 1);
    r.notify(CONTROL_TX_QUEUE);
    assert_eq!(r.drv.control().iter().map(|m| m.0.event).collect::<Vec<_>>(), vec![VIRTIO_CONSOLE_PORT_NAME]);
}

#[test]
fn peer_dropped_is_eof_and_a_new_backend_reconnects() {
    let mut r = Rig::new();
    r.bring_up();
    r.drv.post_rx(rx_queue(1), 64);
    r.notify(rx_queue(1));
    let (dummy, _other) = UnixStream::pair().unwrap();
    drop(std::mem::replace(&mut r.peer, dummy));
    r.host.process();
    assert_eq!(r.drv.control().iter().map(|m| m.0).collect::<Vec<_>>(), vec![msg(1, VIRTIO_CONSOLE_PORT_OPEN, 0)]);
    // the VMM attaches a new agent connection
    let (ours, peer) = UnixStream::pair().unwrap();
    r.host.attach(1, ours).unwrap();
    assert_eq!(r.drv.control().iter().map(|m| m.0).collect::<Vec<_>>(), vec![msg(1, VIRTIO_CONSOLE_PORT_OPEN, 1)]);
    (&peer).write_all(b"again").unwrap();
    r.host.process();
    assert_eq!(r.drv.used(rx_queue(1))[0].2, b"again");
    let (x, _y) = UnixStream::pair().unwrap();
    assert!(r.host.attach(9, x).is_err());
}

#[test]
fn pump_thread_moves_bytes_both_ways() {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let (mut dev, host) = VirtioConsole::new(vec![ConsolePort::named(AGENT, ours)]).unwrap();
    let m = mem(MEM);
    let mut drv = Driver::new(&m, 4);
    let irq = Arc::new(VirtioInterrupt::new(IrqLine::new().unwrap()));
    dev.activate(drv.ctx(&irq, ALL_FEATURES)).unwrap();
    let pump = host.spawn().unwrap();
    for _ in 0..4 {
        drv.post_rx(CONTROL_RX_QUEUE, 4096);
    }
    dev.queue_notify(CONTROL_RX_QUEUE as u16);
    drv.ctl(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 1);
    drv.ctl(0, VIRTIO_CONSOLE_PORT_READY, 1);
    drv.ctl(0, VIRTIO_CONSOLE_PORT_OPEN, 1);
    dev.queue_notify(CONTROL_TX_QUEUE as u16);
    let events: Vec<u16> = drv.control().iter().map(|m| m.0.event).collect();
    assert_eq!(events, vec![VIRTIO_CONSOLE_DEVICE_ADD, VIRTIO_CONSOLE_PORT_NAME, VIRTIO_CONSOLE_PORT_OPEN]);

    // host -> guest: buffers posted after the data arrived
    peer.write_all(b"ping").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    drv.post_rx(rx_queue(0), 64);
    dev.queue_notify(rx_queue(0) as u16);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while got.is_empty() && Instant::now() < deadline {
        got = drv.used(rx_queue(0));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(got[0].2, b"ping");
    assert!(irq.line().take_count() > 0, "irqfd written");

    // guest -> host
    drv.send(tx_queue(0), b"pong", false);
    dev.queue_notify(tx_queue(0) as u16);
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4];
    peer.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");

    // EOF from the host side while the pump runs
    drv.post_rx(rx_queue(0), 64);
    dev.queue_notify(rx_queue(0) as u16);
    drop(peer);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut ctl = Vec::new();
    while ctl.is_empty() && Instant::now() < deadline {
        ctl = drv.control();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(ctl.iter().map(|m| m.0).collect::<Vec<_>>(), vec![msg(0, VIRTIO_CONSOLE_PORT_OPEN, 0)]);
    let host = pump.stop().expect("pump joined");
    assert!(!host.core().port_status(0).unwrap().host_connected);
}

#[test]
fn without_multiport_port_zero_is_a_plain_console() {
    let mut r = Rig::with_features(features::VIRTIO_F_VERSION_1);
    // port 0 has no backend in this rig; check data flow with a backed port 0 instead
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let (mut dev, mut host) =
        VirtioConsole::new(vec![ConsolePort { name: None, console: true, backend: Some(ours.into()) }]).unwrap();
    let m = mem(MEM);
    let mut drv = Driver::new(&m, 4);
    let irq = Arc::new(VirtioInterrupt::new(IrqLine::new().unwrap()));
    dev.activate(drv.ctx(&irq, features::VIRTIO_F_VERSION_1)).unwrap();
    drv.post_rx(rx_queue(0), 64);
    dev.queue_notify(0);
    peer.write_all(b"in").unwrap();
    host.process();
    assert_eq!(drv.used(0)[0].2, b"in");
    drv.send(1, b"out", false);
    dev.queue_notify(1);
    host.process();
    let mut buf = [0u8; 3];
    peer.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"out");
    // control queues are not used without MULTIPORT
    drv.post_rx(CONTROL_RX_QUEUE, 64);
    drv.ctl(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 1);
    dev.queue_notify(CONTROL_TX_QUEUE as u16);
    dev.queue_notify(CONTROL_RX_QUEUE as u16);
    assert!(drv.used(CONTROL_TX_QUEUE).is_empty());
    assert!(drv.used(CONTROL_RX_QUEUE).is_empty());
    // notify on queues of other ports is ignored
    r.drv.send(tx_queue(1), b"x", false);
    r.notify(tx_queue(1));
    r.notify(99);
    assert!(r.drv.used(tx_queue(1)).is_empty());
}

#[test]
fn reset_and_reinitialisation() {
    let mut r = Rig::new();
    r.bring_up();
    r.dev.reset();
    assert!(!r.host.core().is_active());
    assert!(!r.status(1).guest_ready && !r.status(1).guest_open);
    assert!(r.status(1).host_connected, "host side unaffected");
    r.dev.queue_notify(3); // after reset: ignored
    r.host.process();
    // a new driver instance on fresh rings
    let m = r.drv.m.clone();
    r.drv = Driver::new(&m, 6);
    for i in 0..6 {
        m.write_slice(&[0u8; 0x1000], GuestAddress(qbase(i))).unwrap();
    }
    r.dev.activate(r.drv.ctx(&r.irq, ALL_FEATURES)).unwrap();
    r.bring_up();
    assert!(r.status(1).guest_open);
}

#[test]
fn snapshot_restores_ports_buffers_and_ring_positions() {
    let mut r = Rig::new();
    r.bring_up();
    r.drv.post_rx(rx_queue(1), 4);
    r.notify(rx_queue(1));
    r.peer.write_all(b"staged!").unwrap();
    r.host.process();
    assert_eq!(r.drv.used(rx_queue(1))[0].2, b"stag");
    r.drv.send(tx_queue(1), b"unsent", false);
    r.notify(tx_queue(1));
    let VirtioDeviceState::Console(snap) = r.dev.snapshot() else { panic!("console state") };
    assert!(r.dev.active_queues().is_empty());
    assert_eq!(snap.ports[1].outbound, b"unsent");
    assert_eq!(snap.ports[1].staged, b"ed!");
    assert!(snap.ports[1].guest_open && snap.ports[1].guest_ready && snap.ports[1].host_connected);
    assert_eq!(snap.queue_positions.len(), 6);
    let json = serde_json::to_string(&snap).unwrap();
    let back: snapshot::ConsoleSnapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(back, snap);

    let (ours, peer) = UnixStream::pair().unwrap();
    assert!(VirtioConsole::restore(vec![ConsolePort::console(None)], &snap).is_err(), "port count");
    let (mut dev, mut host) =
        VirtioConsole::restore(vec![ConsolePort::console(None), ConsolePort::named(AGENT, ours)], &snap).unwrap();
    // the transport restores its queue config (positions 0) and re-activates
    dev.activate(r.drv.ctx(&r.irq, ALL_FEATURES)).unwrap();
    host.process();
    let mut buf = [0u8; 6];
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&peer).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"unsent");
    r.drv.post_rx(rx_queue(1), 64);
    dev.queue_notify(rx_queue(1) as u16);
    let used = r.drv.used(rx_queue(1));
    assert_eq!(used.len(), 1, "continues at the saved used index");
    assert_eq!(used[0].2, b"ed!");
}

#[test]
fn constructor_rejects_bad_port_lists() {
    let named = |n: &str| ConsolePort { name: Some(n.into()), console: false, backend: None };
    assert!(matches!(VirtioConsole::new(vec![]), Err(io::ConsoleIoError::Config(ConsoleError::PortCount(0)))));
    assert!(VirtioConsole::new((0..17).map(|_| ConsolePort::console(None)).collect()).is_err());
    assert!(VirtioConsole::new(vec![named("a"), named("a")]).is_err());
    assert!(VirtioConsole::new(vec![named("")]).is_err());
    assert!(VirtioConsole::new(vec![named("a\0b")]).is_err());
    assert!(VirtioConsole::new(vec![named(&"x".repeat(256))]).is_err());
    assert!(VirtioConsole::new(vec![named(&"x".repeat(255))]).is_ok());
}
