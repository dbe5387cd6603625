//! Tests of the virtio-mmio register file (VIRTIO 1.2 4.2.2) against real
//! guest memory from vm-memory, and of the constants taken from
//! `virtio-bindings`. The virtqueue's own tests are in `queue_tests.rs`.

use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::{reg, MmioTransport, MMIO_MAGIC_VALUE, VENDOR_ID};
use super::queue::*;
use super::*;
use crate::devices::{Device, DeviceState};
use crate::testutil::{mem, DriverQueue, TestDevice, TestDeviceLog};

const MEM: usize = 1 << 20;
const Q: u64 = 0x10000; // queue structures
const BUF: u64 = 0x20000; // buffers

// ---------------------------------------------------------------- mmio

const OFFERED: u64 = features::VIRTIO_F_VERSION_1 | features::VIRTIO_F_INDIRECT_DESC | 1;

fn transport() -> (MmioTransport, Arc<Mutex<TestDeviceLog>>, GuestMemoryMmap) {
    let m = mem(MEM);
    let (dev, log) = TestDevice::new(device_type::CONSOLE, OFFERED);
    let irq = Arc::new(VirtioInterrupt::new(crate::devices::IrqLine::new().unwrap()));
    (MmioTransport::new(Box::new(dev), m.clone(), irq), log, m)
}

fn r(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Driver init per 3.1.1 up to FEATURES_OK with `accept` features.
fn negotiate(t: &mut MmioTransport, accept: u64) -> u32 {
    w(t, reg::STATUS, status::ACKNOWLEDGE);
    w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(t, reg::DRIVER_FEATURES_SEL, 0);
    w(t, reg::DRIVER_FEATURES, accept as u32);
    w(t, reg::DRIVER_FEATURES_SEL, 1);
    w(t, reg::DRIVER_FEATURES, (accept >> 32) as u32);
    w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    r(t, reg::STATUS)
}

fn setup_queue(t: &mut MmioTransport, index: u32, d: &DriverQueue) {
    w(t, reg::QUEUE_SEL, index);
    w(t, reg::QUEUE_NUM, u32::from(d.size));
    w(t, reg::QUEUE_DESC_LOW, d.desc as u32);
    w(t, reg::QUEUE_DESC_HIGH, (d.desc >> 32) as u32);
    w(t, reg::QUEUE_DRIVER_LOW, d.avail as u32);
    w(t, reg::QUEUE_DRIVER_HIGH, 0);
    w(t, reg::QUEUE_DEVICE_LOW, d.used as u32);
    w(t, reg::QUEUE_DEVICE_HIGH, 0);
    w(t, reg::QUEUE_READY, 1);
}

const DRIVER_OK_ALL: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

#[test]
fn identification_registers() {
    let (mut t, _, _) = transport();
    assert_eq!(r(&mut t, reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r(&mut t, reg::MAGIC_VALUE), MMIO_MAGIC_VALUE);
    assert_eq!(r(&mut t, reg::VERSION), 2);
    assert_eq!(r(&mut t, reg::DEVICE_ID), device_type::CONSOLE);
    assert_eq!(r(&mut t, reg::VENDOR_ID), VENDOR_ID);
    assert_eq!(r(&mut t, reg::SHM_LEN_LOW), u32::MAX, "no shared memory regions");
    assert_eq!(r(&mut t, reg::SHM_BASE_HIGH), u32::MAX);
}

#[test]
fn feature_pages_and_negotiation() {
    let (mut t, log, _) = transport();
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), OFFERED as u32);
    w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), (OFFERED >> 32) as u32);
    w(&mut t, reg::DEVICE_FEATURES_SEL, 2);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);

    // before DRIVER, DriverFeatures writes are ignored
    w(&mut t, reg::DRIVER_FEATURES, 1);
    assert_eq!(t.acked_features(), 0);

    let accept = features::VIRTIO_F_VERSION_1 | 1;
    let st = negotiate(&mut t, accept);
    assert_ne!(st & status::FEATURES_OK, 0, "subset with VERSION_1 is accepted");
    assert_eq!(t.acked_features(), accept);
    // after FEATURES_OK, features are frozen
    w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
    w(&mut t, reg::DRIVER_FEATURES, 0);
    assert_eq!(t.acked_features(), accept);

    w(&mut t, reg::STATUS, DRIVER_OK_ALL);
    assert!(t.is_activated());
    assert_eq!(log.lock().unwrap().acked_features, accept);
}

#[test]
fn features_ok_refused_for_unoffered_features_or_missing_version_1() {
    for accept in [features::VIRTIO_F_VERSION_1 | (1 << 5), 1u64] {
        let (mut t, _, _) = transport();
        let st = negotiate(&mut t, accept);
        assert_eq!(st & status::FEATURES_OK, 0, "accept {accept:#x}");
        // DRIVER_OK without FEATURES_OK is ignored
        w(&mut t, reg::STATUS, DRIVER_OK_ALL);
        assert!(!t.is_activated());
    }
}

#[test]
fn status_bits_follow_the_init_order_and_cannot_be_cleared() {
    let (mut t, _, _) = transport();
    w(&mut t, reg::STATUS, status::DRIVER);
    assert_eq!(r(&mut t, reg::STATUS), 0, "DRIVER before ACKNOWLEDGE");
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    assert_eq!(r(&mut t, reg::STATUS), status::ACKNOWLEDGE | status::DRIVER, "clearing ignored");
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | 0x10);
    assert_eq!(r(&mut t, reg::STATUS), status::ACKNOWLEDGE | status::DRIVER, "unknown bit");
    w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FAILED);
    assert_ne!(r(&mut t, reg::STATUS) & status::FAILED, 0);
}

#[test]
fn queue_setup_registers() {
    let (mut t, _, _) = transport();
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 16);
    w(&mut t, reg::QUEUE_SEL, 1);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 8);
    w(&mut t, reg::QUEUE_SEL, 2);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0, "queue does not exist");
    assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    w(&mut t, reg::QUEUE_READY, 1); // ignored: no such queue
    w(&mut t, reg::QUEUE_SEL, u32::MAX);
    w(&mut t, reg::QUEUE_NUM, 4);

    let d = DriverQueue::new(8, 0x1_0000_0000 + Q); // high half used too
    setup_queue(&mut t, 0, &d);
    assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
    let q = &t.queues()[0];
    assert_eq!((q.size, q.desc_table.0, q.ready), (8, d.desc, true));
    // writes while ready are ignored
    w(&mut t, reg::QUEUE_NUM, 2);
    w(&mut t, reg::QUEUE_DESC_LOW, 0x1234);
    let q = &t.queues()[0];
    assert_eq!((q.size, q.desc_table.0), (8, d.desc));
    assert!(!t.queues()[1].ready);
}

#[test]
fn notify_reaches_the_device_only_after_driver_ok() {
    let (mut t, log, m) = transport();
    let mut d = DriverQueue::new(8, Q);
    negotiate(&mut t, features::VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, &d);
    w(&mut t, reg::QUEUE_NOTIFY, 0);
    assert!(log.lock().unwrap().notifications.is_empty(), "not before DRIVER_OK");
    w(&mut t, reg::STATUS, DRIVER_OK_ALL);
    assert!(t.is_activated());

    m.write_slice(b"ping", GuestAddress(BUF)).unwrap();
    d.set_desc(&m, 0, BUF, 4, VIRTQ_DESC_F_NEXT, 1);
    d.set_desc(&m, 1, BUF + 0x100, 16, VIRTQ_DESC_F_WRITE, 0);
    d.offer(&m, 0);
    w(&mut t, reg::QUEUE_NOTIFY, 0);
    w(&mut t, reg::QUEUE_NOTIFY, 7); // no such queue: ignored
    w(&mut t, reg::QUEUE_NOTIFY, 0x1_0000); // not a u16
    {
        let l = log.lock().unwrap();
        assert_eq!(l.notifications, vec![0]);
        assert_eq!(l.requests, vec![b"ping".to_vec()]);
    }
    assert_eq!(d.used_idx(&m), 1);
    assert_eq!(d.used_elem(&m, 0), (0, 3));
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_USED_RING);
    w(&mut t, reg::INTERRUPT_ACK, INT_USED_RING);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
}

#[test]
fn writing_zero_to_status_resets_everything() {
    let (mut t, log, _) = transport();
    let d = DriverQueue::new(8, Q);
    negotiate(&mut t, features::VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, &d);
    w(&mut t, reg::STATUS, DRIVER_OK_ALL);
    t.interrupt().signal_used_queue();
    w(&mut t, reg::QUEUE_SEL, 1);
    w(&mut t, reg::STATUS, 0);
    assert_eq!(r(&mut t, reg::STATUS), 0);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
    assert_eq!(t.acked_features(), 0);
    assert!(!t.is_activated());
    assert!(t.queues().iter().all(|q| !q.ready && q.size == q.max_size && q.desc_table.0 == 0));
    assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    assert_eq!(log.lock().unwrap().resets, 1);
    // notify after reset does nothing
    w(&mut t, reg::QUEUE_NOTIFY, 0);
    assert!(log.lock().unwrap().notifications.is_empty());
}

#[test]
fn writes_to_read_only_registers_are_ignored() {
    let (mut t, _, _) = transport();
    for off in [
        reg::MAGIC_VALUE,
        reg::VERSION,
        reg::DEVICE_ID,
        reg::VENDOR_ID,
        reg::DEVICE_FEATURES,
        reg::QUEUE_NUM_MAX,
        reg::INTERRUPT_STATUS,
        reg::CONFIG_GENERATION,
        reg::SHM_LEN_LOW,
    ] {
        w(&mut t, off, 0xdead_beef);
    }
    t.interrupt().signal_config_change();
    w(&mut t, reg::INTERRUPT_STATUS, 0);
    assert_eq!(r(&mut t, reg::MAGIC_VALUE), MMIO_MAGIC_VALUE);
    assert_eq!(r(&mut t, reg::VERSION), 2);
    assert_eq!(r(&mut t, reg::DEVICE_ID), device_type::CONSOLE);
    assert_eq!(r(&mut t, reg::DEVICE_FEATURES), OFFERED as u32);
    assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 16);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
    assert_eq!(r(&mut t, reg::CONFIG_GENERATION), 0);
}

#[test]
fn odd_width_or_unaligned_register_accesses_are_ignored() {
    let (mut t, _, _) = transport();
    let mut b2 = [0xaau8; 2];
    t.read(reg::MAGIC_VALUE, &mut b2);
    assert_eq!(b2, [0, 0]);
    let mut b4 = [0xaau8; 4];
    t.read(reg::MAGIC_VALUE + 1, &mut b4);
    assert_eq!(b4, [0; 4]);
    t.write(reg::STATUS, &[1]);
    t.write(reg::STATUS + 2, &1u32.to_le_bytes());
    t.write(reg::STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(r(&mut t, reg::STATUS), 0);
    // far offsets go to config space and read as zero beyond it
    let mut b8 = [0xaau8; 8];
    t.read(u64::MAX - 3, &mut b8);
    assert_eq!(b8, [0; 8]);
    t.write(u64::MAX, &[1, 2]);
}

#[test]
fn config_space_is_routed_to_the_device() {
    let (mut t, _, _) = transport();
    let mut b = [0u8; 4];
    t.read(0x104, &mut b);
    assert_eq!(b, [4, 5, 6, 7]);
    t.write(0x100, &[0xee]);
    let mut one = [0u8; 1];
    t.read(0x100, &mut one);
    assert_eq!(one, [0xee]);
    t.read(0x10e, &mut b);
    assert_eq!(b, [14, 15, 0, 0], "beyond the device's config reads zero");
    t.config_changed();
    assert_eq!(r(&mut t, reg::CONFIG_GENERATION), 1);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
}

#[test]
fn invalid_queue_at_driver_ok_sets_device_needs_reset() {
    let (mut t, log, _) = transport();
    negotiate(&mut t, features::VIRTIO_F_VERSION_1);
    let mut d = DriverQueue::new(8, Q);
    d.used = (MEM as u64) - 4; // used ring beyond RAM
    setup_queue(&mut t, 0, &d);
    w(&mut t, reg::STATUS, DRIVER_OK_ALL);
    assert!(!t.is_activated());
    assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS) & INT_CONFIG, INT_CONFIG);
    assert!(t.last_error().unwrap().contains("queue 0"));
    assert_eq!(log.lock().unwrap().activations, 0);
    // the driver recovers by resetting
    w(&mut t, reg::STATUS, 0);
    assert_eq!(r(&mut t, reg::STATUS), 0);
}

#[test]
fn malformed_chain_through_the_transport_is_returned_with_zero_length() {
    let (mut t, log, m) = transport();
    let mut d = DriverQueue::new(8, Q);
    negotiate(&mut t, features::VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, &d);
    w(&mut t, reg::STATUS, DRIVER_OK_ALL);
    d.set_desc(&m, 0, BUF, 1, VIRTQ_DESC_F_NEXT, 0); // self loop
    d.offer(&m, 0);
    w(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(log.lock().unwrap().chain_errors, 1);
    assert_eq!(d.used_idx(&m), 1);
    assert_eq!(d.used_elem(&m, 0), (0, 0));
}

#[test]
fn snapshot_round_trip_keeps_live_queue_positions() {
    let (mut t, _, m) = transport();
    let mut d = DriverQueue::new(8, Q);
    negotiate(&mut t, features::VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, &d);
    w(&mut t, reg::STATUS, DRIVER_OK_ALL);
    d.set_desc(&m, 0, BUF, 1, 0, 0);
    d.offer(&m, 0);
    d.offer(&m, 0);
    w(&mut t, reg::QUEUE_NOTIFY, 0);
    let DeviceState::VirtioMmio(snap) = Device::snapshot(&t) else { panic!("wrong kind") };
    assert_eq!((snap.queues[0].next_avail, snap.queues[0].next_used), (2, 2));
    assert!(snap.activated);
    let json = serde_json::to_string(&snap).unwrap();
    let back: snapshot::MmioTransportSnapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(back, snap);

    let (dev, log2) = TestDevice::new(device_type::CONSOLE, OFFERED);
    let irq = Arc::new(VirtioInterrupt::new(crate::devices::IrqLine::new().unwrap()));
    let mut t2 = MmioTransport::restore(Box::new(dev), m.clone(), irq, &back);
    assert!(t2.is_activated());
    assert_eq!(r(&mut t2, reg::STATUS), DRIVER_OK_ALL);
    assert_eq!(r(&mut t2, reg::INTERRUPT_STATUS), INT_USED_RING);
    // the restored device continues where the old one stopped
    d.offer(&m, 0);
    w(&mut t2, reg::QUEUE_NOTIFY, 0);
    assert_eq!(log2.lock().unwrap().requests.len(), 1);
    assert_eq!(d.used_idx(&m), 3);
}

// ------------------------------------------------------------ constants

/// The values taken from `virtio-bindings` are the spec's (a bump of the
/// bindings crate cannot silently change what the guest sees).
#[test]
fn constants_from_virtio_bindings_have_the_spec_values() {
    use super::block::io::{config_offset, CONFIG_LEN};
    use super::block::{feature, request_type, status_code, ID_BYTES, REQUEST_HEADER_LEN};
    // 2.1, 6, 5, 4.2.2
    assert_eq!([status::ACKNOWLEDGE, status::DRIVER, status::DRIVER_OK, status::FEATURES_OK], [1, 2, 4, 8]);
    assert_eq!([status::DEVICE_NEEDS_RESET, status::FAILED], [64, 128]);
    assert_eq!([features::VIRTIO_F_INDIRECT_DESC, features::VIRTIO_F_EVENT_IDX], [1 << 28, 1 << 29]);
    assert_eq!(features::VIRTIO_F_VERSION_1, 1 << 32);
    assert_eq!([device_type::NET, device_type::BLOCK, device_type::CONSOLE, device_type::RNG], [1, 2, 3, 4]);
    assert_eq!(device_type::VSOCK, 19);
    assert_eq!([INT_USED_RING, INT_CONFIG], [1, 2]);
    // 2.7.5, 2.7.7
    assert_eq!(
        [VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT, VIRTQ_AVAIL_F_NO_INTERRUPT],
        [1, 2, 4, 1]
    );
    // 4.2.2 table 4.1
    let regs = [
        (reg::MAGIC_VALUE, 0x000),
        (reg::VERSION, 0x004),
        (reg::DEVICE_ID, 0x008),
        (reg::VENDOR_ID, 0x00c),
        (reg::DEVICE_FEATURES, 0x010),
        (reg::DEVICE_FEATURES_SEL, 0x014),
        (reg::DRIVER_FEATURES, 0x020),
        (reg::DRIVER_FEATURES_SEL, 0x024),
        (reg::QUEUE_SEL, 0x030),
        (reg::QUEUE_NUM_MAX, 0x034),
        (reg::QUEUE_NUM, 0x038),
        (reg::QUEUE_READY, 0x044),
        (reg::QUEUE_NOTIFY, 0x050),
        (reg::INTERRUPT_STATUS, 0x060),
        (reg::INTERRUPT_ACK, 0x064),
        (reg::STATUS, 0x070),
        (reg::QUEUE_DESC_LOW, 0x080),
        (reg::QUEUE_DESC_HIGH, 0x084),
        (reg::QUEUE_DRIVER_LOW, 0x090),
        (reg::QUEUE_DRIVER_HIGH, 0x094),
        (reg::QUEUE_DEVICE_LOW, 0x0a0),
        (reg::QUEUE_DEVICE_HIGH, 0x0a4),
        (reg::SHM_SEL, 0x0ac),
        (reg::SHM_LEN_LOW, 0x0b0),
        (reg::SHM_LEN_HIGH, 0x0b4),
        (reg::SHM_BASE_LOW, 0x0b8),
        (reg::SHM_BASE_HIGH, 0x0bc),
        (reg::QUEUE_RESET, 0x0c0),
        (reg::CONFIG_GENERATION, 0x0fc),
        (reg::CONFIG, 0x100),
    ];
    for (got, want) in regs {
        assert_eq!(got, want);
    }
    // 5.2.3, 5.2.4, 5.2.6
    assert_eq!(
        [
            feature::VIRTIO_BLK_F_SEG_MAX,
            feature::VIRTIO_BLK_F_RO,
            feature::VIRTIO_BLK_F_BLK_SIZE,
            feature::VIRTIO_BLK_F_FLUSH
        ],
        [1 << 2, 1 << 5, 1 << 6, 1 << 9]
    );
    assert_eq!(
        [request_type::VIRTIO_BLK_T_IN, request_type::VIRTIO_BLK_T_OUT, request_type::VIRTIO_BLK_T_FLUSH],
        [0, 1, 4]
    );
    assert_eq!(request_type::VIRTIO_BLK_T_GET_ID, 8);
    assert_eq!(
        [status_code::VIRTIO_BLK_S_OK, status_code::VIRTIO_BLK_S_IOERR, status_code::VIRTIO_BLK_S_UNSUPP],
        [0, 1, 2]
    );
    assert_eq!((REQUEST_HEADER_LEN, ID_BYTES), (16, 20));
    assert_eq!(
        [config_offset::CAPACITY, config_offset::SIZE_MAX, config_offset::SEG_MAX, config_offset::BLK_SIZE],
        [0, 8, 12, 20]
    );
    assert_eq!((config_offset::NUM_QUEUES, CONFIG_LEN), (34, 36));
}
