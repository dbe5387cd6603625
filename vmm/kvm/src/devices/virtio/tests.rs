//! Tests of the split virtqueue (VIRTIO 1.2 2.7) and the virtio-mmio
//! register file (4.2.2) against real guest memory from vm-memory.

use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::{reg, MmioTransport, MMIO_MAGIC_VALUE, VENDOR_ID};
use super::queue::*;
use super::*;
use crate::devices::{Device, DeviceState};
use crate::testutil::{mem, write_desc, DriverQueue, TestDevice, TestDeviceLog};

const MEM: usize = 1 << 20;
const Q: u64 = 0x10000; // queue structures
const BUF: u64 = 0x20000; // buffers

fn setup(size: u16) -> (GuestMemoryMmap, DriverQueue, Queue) {
    let m = mem(MEM);
    let d = DriverQueue::new(size, Q);
    let q = d.device_queue();
    (m, d, q)
}

// ---------------------------------------------------------------- queue

#[test]
fn good_chain_is_parsed_and_returned_through_the_used_ring() {
    let (m, mut d, mut q) = setup(8);
    m.write_slice(b"hello ", GuestAddress(BUF)).unwrap();
    m.write_slice(b"world", GuestAddress(BUF + 0x100)).unwrap();
    d.set_desc(&m, 2, BUF, 6, VIRTQ_DESC_F_NEXT, 5);
    d.set_desc(&m, 5, BUF + 0x100, 5, VIRTQ_DESC_F_NEXT, 7);
    d.set_desc(&m, 7, BUF + 0x200, 64, VIRTQ_DESC_F_WRITE, 0);
    d.offer(&m, 2);

    let chain = q.pop(&m).unwrap().expect("one chain available");
    assert_eq!(chain.head_index, 2);
    assert_eq!(
        chain.descriptors,
        vec![
            Descriptor { addr: GuestAddress(BUF), len: 6, writable: false },
            Descriptor { addr: GuestAddress(BUF + 0x100), len: 5, writable: false },
            Descriptor { addr: GuestAddress(BUF + 0x200), len: 64, writable: true },
        ]
    );
    assert_eq!(chain.readable_len(), 11);
    assert_eq!(chain.writable_len(), 64);
    assert_eq!(chain.read_all(&m, 1024).unwrap(), b"hello world");
    assert_eq!(chain.read_all(&m, 3).unwrap(), b"hel");
    assert_eq!(chain.write_all(&m, b"done").unwrap(), 4);
    let mut got = [0u8; 4];
    m.read_slice(&mut got, GuestAddress(BUF + 0x200)).unwrap();
    assert_eq!(&got, b"done");

    assert_eq!(q.pop(&m).unwrap(), None, "ring drained");
    q.add_used(&m, chain.head_index, 4).unwrap();
    assert_eq!(d.used_idx(&m), 1);
    assert_eq!(d.used_elem(&m, 0), (2, 4));
    assert_eq!((q.next_avail(), q.next_used()), (1, 1));
}

#[test]
fn descriptor_outside_guest_memory_is_rejected_and_consumed() {
    let (m, mut d, mut q) = setup(8);
    // starts inside, ends outside
    d.set_desc(&m, 0, MEM as u64 - 8, 16, 0, 0);
    // entirely outside
    d.set_desc(&m, 1, 1 << 40, 1, 0, 0);
    // address + length overflows u64
    d.set_desc(&m, 2, u64::MAX - 3, 16, 0, 0);
    // good first descriptor, bad second one
    d.set_desc(&m, 3, BUF, 8, VIRTQ_DESC_F_NEXT, 4);
    d.set_desc(&m, 4, MEM as u64, 1, VIRTQ_DESC_F_WRITE, 0);
    for head in 0..4 {
        d.offer(&m, head);
    }
    for (head, addr, len) in [(0, MEM as u64 - 8, 16), (1, 1 << 40, 1), (2, u64::MAX - 3, 16), (3, MEM as u64, 1)] {
        assert_eq!(
            q.pop(&m),
            Err(QueueError::InvalidChain { head_index: head, reason: ChainError::OutOfBounds { addr, len } })
        );
    }
    assert_eq!(q.next_avail(), 4, "bad chains are consumed so the device can return them");
    assert_eq!(q.pop(&m), Ok(None));
}

#[test]
fn zero_length_descriptor_is_not_a_bounds_violation() {
    let (m, mut d, mut q) = setup(4);
    d.set_desc(&m, 0, 1 << 40, 0, 0, 0);
    d.offer(&m, 0);
    let c = q.pop(&m).unwrap().unwrap();
    assert_eq!(c.descriptors.len(), 1);
    assert_eq!(c.read_all(&m, 100).unwrap(), b"");
}

#[test]
fn looping_chains_are_detected_by_the_length_limit() {
    let (m, mut d, mut q) = setup(4);
    // 0 -> 1 -> 0 -> ...
    d.set_desc(&m, 0, BUF, 1, VIRTQ_DESC_F_NEXT, 1);
    d.set_desc(&m, 1, BUF, 1, VIRTQ_DESC_F_NEXT, 0);
    // 2 -> 2 (self loop)
    d.set_desc(&m, 2, BUF, 1, VIRTQ_DESC_F_NEXT, 2);
    d.offer(&m, 0);
    d.offer(&m, 2);
    for head in [0, 2] {
        assert_eq!(
            q.pop(&m),
            Err(QueueError::InvalidChain { head_index: head, reason: ChainError::TooLong { limit: 4 } })
        );
    }
    // a chain of exactly queue-size descriptors is fine: 0 -> 1 -> 2 -> 3
    for i in 0..3 {
        d.set_desc(&m, i, BUF, 1, VIRTQ_DESC_F_NEXT, i + 1);
    }
    d.set_desc(&m, 3, BUF, 1, 0, 0);
    d.offer(&m, 0);
    assert_eq!(q.pop(&m).unwrap().unwrap().descriptors.len(), 4);
}

#[test]
fn indices_out_of_the_queue_size_are_rejected() {
    let (m, mut d, mut q) = setup(4);
    // head index from the avail ring beyond the table
    d.offer(&m, 4);
    d.offer(&m, 0xffff);
    // next index beyond the table
    d.set_desc(&m, 1, BUF, 1, VIRTQ_DESC_F_NEXT, 9);
    d.offer(&m, 1);
    assert_eq!(
        q.pop(&m),
        Err(QueueError::InvalidChain { head_index: 4, reason: ChainError::IndexOutOfRange { index: 4, size: 4 } })
    );
    assert_eq!(
        q.pop(&m),
        Err(QueueError::InvalidChain {
            head_index: 0xffff,
            reason: ChainError::IndexOutOfRange { index: 0xffff, size: 4 }
        })
    );
    assert_eq!(
        q.pop(&m),
        Err(QueueError::InvalidChain { head_index: 1, reason: ChainError::IndexOutOfRange { index: 9, size: 4 } })
    );
    // and the device cannot return an out-of-range id
    assert_eq!(q.add_used(&m, 4, 0), Err(QueueError::UsedIdOutOfRange(4)));
    assert_eq!(d.used_idx(&m), 0);
}

#[test]
fn process_chains_returns_good_chains_with_their_length_and_bad_ones_with_zero() {
    let (m, mut d, mut q) = setup(8);
    m.write_slice(b"ping", GuestAddress(BUF)).unwrap();
    d.set_desc(&m, 0, BUF, 4, VIRTQ_DESC_F_NEXT, 1);
    d.set_desc(&m, 1, BUF + 0x100, 16, VIRTQ_DESC_F_WRITE, 0);
    d.set_desc(&m, 2, BUF + 0x200, 16, VIRTQ_DESC_F_NEXT, 9); // next out of range
    d.set_desc(&m, 3, BUF + 0x300, 8, VIRTQ_DESC_F_WRITE, 0);
    for head in [0, 2, 42, 3] {
        d.offer(&m, head); // 42: head out of range, cannot be returned
    }
    let mut handed = Vec::new();
    let r = q.process_chains(&m, |chain| {
        let data = chain.read_all(&m, 64).unwrap();
        let n = chain.write_all(&m, b"pong!").unwrap();
        handed.push((chain.head_index, data));
        ChainOutcome::Used(n as u32)
    });
    assert_eq!(handed, vec![(0, b"ping".to_vec()), (3, Vec::new())], "only valid chains reach the device");
    assert_eq!(r, Processed { used: 3, invalid: 2, error: None, stopped: false, notify: true });
    assert_eq!(d.used_idx(&m), 3);
    assert_eq!([d.used_elem(&m, 0), d.used_elem(&m, 1), d.used_elem(&m, 2)], [(0, 5), (2, 0), (3, 5)]);
    assert_eq!((q.next_avail(), q.next_used()), (4, 3));
    // empty ring: nothing to do, no interrupt
    let r = q.process_chains(&m, |_| panic!("no chain"));
    assert_eq!(r, Processed::default());
}

#[test]
fn process_chains_stops_defers_and_keeps_on_the_devices_word() {
    let (m, mut d, mut q) = setup(4);
    for i in 0..4 {
        d.set_desc(&m, i, BUF + 0x100 * u64::from(i), 8, VIRTQ_DESC_F_WRITE, 0);
        d.offer(&m, i);
    }
    // UsedLast: returned, then stop
    let r = q.process_chains(&m, |_| ChainOutcome::UsedLast(1));
    assert_eq!((r.used, r.stopped, q.next_avail()), (1, true, 1));
    // Defer: back in the ring untouched, returned by the next run
    let r = q.process_chains(&m, |c| {
        assert_eq!(c.head_index, 1);
        ChainOutcome::Defer
    });
    assert_eq!((r.used, r.stopped, r.notify, q.next_avail()), (0, true, false, 1));
    // Keep: consumed, not in the used ring; the device returns it itself
    let mut kept = None;
    let r = q.process_chains(&m, |c| {
        kept = Some(c);
        ChainOutcome::Keep
    });
    assert_eq!((r.used, r.stopped, q.next_avail(), d.used_idx(&m)), (0, true, 2, 1));
    assert_eq!(kept.as_ref().map(|c| c.head_index), Some(1));
    // the rest, with the driver asking for no interrupts (2.7.7)
    m.write_obj(VIRTQ_AVAIL_F_NO_INTERRUPT, GuestAddress(d.avail)).unwrap();
    let r = q.process_chains(&m, |_| ChainOutcome::Used(2));
    assert_eq!(r, Processed { used: 2, invalid: 0, error: None, stopped: false, notify: false });
    q.add_used(&m, 1, 0).unwrap();
    assert_eq!(d.used_idx(&m), 4);
    assert_eq!([d.used_elem(&m, 1), d.used_elem(&m, 2), d.used_elem(&m, 3)], [(2, 2), (3, 2), (1, 0)]);
}

#[test]
fn process_chains_reports_ring_errors_and_is_bounded() {
    let (m, mut d, mut q) = setup(4);
    m.write_obj(9u16, GuestAddress(q.avail_ring.0 + 2)).unwrap();
    let r = q.process_chains(&m, |_| panic!("no chain"));
    assert_eq!(r.error, Some(QueueError::AvailIndexJump { avail_idx: 9, next_avail: 0, ahead: 9, size: 4 }));
    assert_eq!((r.used, q.next_avail()), (0, 0));
    let mut not_ready = Queue::new(4);
    assert_eq!(not_ready.process_chains(&m, |_| panic!("no chain")).error, Some(QueueError::NotReady));
    // a driver that keeps refilling cannot hold the device longer than 2 * size chains
    m.write_obj(0u16, GuestAddress(q.avail_ring.0 + 2)).unwrap();
    d.set_desc(&m, 0, BUF, 8, 0, 0);
    d.offer(&m, 0);
    let mut calls = 0;
    let r = q.process_chains(&m, |_| {
        calls += 1;
        d.offer(&m, 0);
        ChainOutcome::Used(0)
    });
    assert_eq!((calls, r.used, r.stopped, r.error), (8, 8, false, None));
}

#[test]
fn avail_index_running_ahead_of_the_ring_is_a_queue_error() {
    let (m, _d, mut q) = setup(4);
    m.write_obj(5u16, GuestAddress(q.avail_ring.0 + 2)).unwrap();
    assert_eq!(q.pop(&m), Err(QueueError::AvailIndexJump { avail_idx: 5, next_avail: 0, ahead: 5, size: 4 }));
    assert_eq!(q.next_avail(), 0, "nothing consumed");
}

#[test]
fn readable_after_writable_is_rejected() {
    let (m, mut d, mut q) = setup(4);
    d.set_desc(&m, 0, BUF, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1);
    d.set_desc(&m, 1, BUF, 8, 0, 0);
    d.offer(&m, 0);
    assert_eq!(q.pop(&m), Err(QueueError::InvalidChain { head_index: 0, reason: ChainError::ReadableAfterWritable }));
}

const IND: u64 = 0x30000; // indirect tables

#[test]
fn indirect_table_is_flattened() {
    let (m, mut d, mut q) = setup(4);
    q.indirect = true;
    m.write_slice(b"abcdef", GuestAddress(BUF)).unwrap();
    write_desc(&m, IND, 0, BUF, 3, VIRTQ_DESC_F_NEXT, 2);
    write_desc(&m, IND, 2, BUF + 3, 3, VIRTQ_DESC_F_NEXT, 1);
    write_desc(&m, IND, 1, BUF + 0x100, 32, VIRTQ_DESC_F_WRITE, 0);
    // WRITE on the indirect descriptor itself is ignored (2.7.5.3.2)
    d.set_desc(&m, 3, IND, 3 * 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE, 0);
    d.offer(&m, 3);
    let c = q.pop(&m).unwrap().unwrap();
    assert_eq!(c.head_index, 3);
    assert_eq!(c.descriptors.len(), 3);
    assert_eq!(c.read_all(&m, 100).unwrap(), b"abcdef");
    assert_eq!(c.writable_len(), 32);
    // a direct readable descriptor may precede the indirect one
    d.set_desc(&m, 0, BUF, 1, VIRTQ_DESC_F_NEXT, 3);
    d.offer(&m, 0);
    assert_eq!(q.pop(&m).unwrap().unwrap().read_all(&m, 100).unwrap(), b"aabcdef");
}

#[test]
fn malformed_indirect_tables_are_rejected() {
    type Build = Box<dyn Fn(&GuestMemoryMmap, &DriverQueue)>;
    let cases: Vec<(&str, Build, ChainError)> = vec![
        (
            "length not a multiple of 16",
            Box::new(|m, d| d.set_desc(m, 0, IND, 20, VIRTQ_DESC_F_INDIRECT, 0)),
            ChainError::BadIndirectLength(20),
        ),
        (
            "zero length",
            Box::new(|m, d| d.set_desc(m, 0, IND, 0, VIRTQ_DESC_F_INDIRECT, 0)),
            ChainError::BadIndirectLength(0),
        ),
        (
            "more than 32768 entries",
            Box::new(|m, d| d.set_desc(m, 0, IND, 16 * 32769, VIRTQ_DESC_F_INDIRECT, 0)),
            ChainError::BadIndirectLength(16 * 32769),
        ),
        (
            "table outside memory",
            Box::new(|m, d| d.set_desc(m, 0, MEM as u64 - 16, 32, VIRTQ_DESC_F_INDIRECT, 0)),
            ChainError::OutOfBounds { addr: MEM as u64 - 16, len: 32 },
        ),
        (
            "indirect with next",
            Box::new(|m, d| d.set_desc(m, 0, IND, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)),
            ChainError::IndirectWithNext,
        ),
        (
            "nested indirect",
            Box::new(|m, d| {
                write_desc(m, IND, 0, IND + 0x100, 16, VIRTQ_DESC_F_INDIRECT, 0);
                d.set_desc(m, 0, IND, 16, VIRTQ_DESC_F_INDIRECT, 0);
            }),
            ChainError::NestedIndirect,
        ),
        (
            "loop inside the table",
            Box::new(|m, d| {
                write_desc(m, IND, 0, BUF, 1, VIRTQ_DESC_F_NEXT, 1);
                write_desc(m, IND, 1, BUF, 1, VIRTQ_DESC_F_NEXT, 0);
                d.set_desc(m, 0, IND, 32, VIRTQ_DESC_F_INDIRECT, 0);
            }),
            ChainError::TooLong { limit: 2 },
        ),
        (
            "next beyond the table",
            Box::new(|m, d| {
                write_desc(m, IND, 0, BUF, 1, VIRTQ_DESC_F_NEXT, 2);
                d.set_desc(m, 0, IND, 32, VIRTQ_DESC_F_INDIRECT, 0);
            }),
            ChainError::IndexOutOfRange { index: 2, size: 2 },
        ),
        (
            "buffer in the table outside memory",
            Box::new(|m, d| {
                write_desc(m, IND, 0, 1 << 33, 8, 0, 0);
                d.set_desc(m, 0, IND, 16, VIRTQ_DESC_F_INDIRECT, 0);
            }),
            ChainError::OutOfBounds { addr: 1 << 33, len: 8 },
        ),
    ];
    for (name, build, want) in cases {
        let (m, mut d, mut q) = setup(4);
        q.indirect = true;
        build(&m, &d);
        d.offer(&m, 0);
        assert_eq!(q.pop(&m), Err(QueueError::InvalidChain { head_index: 0, reason: want }), "{name}");
    }
}

#[test]
fn indirect_without_the_feature_is_rejected() {
    let (m, mut d, mut q) = setup(4);
    write_desc(&m, IND, 0, BUF, 1, 0, 0);
    d.set_desc(&m, 0, IND, 16, VIRTQ_DESC_F_INDIRECT, 0);
    d.offer(&m, 0);
    assert_eq!(q.pop(&m), Err(QueueError::InvalidChain { head_index: 0, reason: ChainError::IndirectNotNegotiated }));
}

#[test]
fn used_ring_wraps_slots_and_the_16_bit_index() {
    let (m, mut d, mut q) = setup(4);
    d.set_desc(&m, 1, BUF, 1, 0, 0);
    // start both sides just below the u16 wrap
    q.set_positions(0xfffe, 0xfffe);
    d.avail_idx = 0xfffe;
    for round in 0..6u32 {
        d.offer(&m, 1);
        let c = q.pop(&m).unwrap().unwrap();
        q.add_used(&m, c.head_index, round).unwrap();
        let idx = 0xfffeu16.wrapping_add(round as u16 + 1);
        assert_eq!(d.used_idx(&m), idx);
        assert_eq!(d.used_elem(&m, idx.wrapping_sub(1)), (1, round));
    }
    assert_eq!(q.next_used(), 4);
    assert_eq!(q.pop(&m), Ok(None));
}

#[test]
fn notification_suppression_flag_is_honoured() {
    let (m, _d, q) = setup(4);
    assert!(q.needs_notification(&m));
    m.write_obj(VIRTQ_AVAIL_F_NO_INTERRUPT, q.avail_ring).unwrap();
    assert!(!q.needs_notification(&m));
}

#[test]
fn queue_validation_checks_size_alignment_and_bounds() {
    let m = mem(MEM);
    let d = DriverQueue::new(8, Q);
    let ok = d.device_queue();
    assert_eq!(ok.validate(&m), Ok(()));
    let mut bad = ok.clone();
    bad.size = 6;
    assert!(bad.validate(&m).is_err(), "not a power of two");
    let mut bad = ok.clone();
    bad.size = 16;
    assert!(bad.validate(&m).is_err(), "above QueueNumMax");
    let mut bad = ok.clone();
    bad.size = 0;
    assert!(bad.validate(&m).is_err(), "zero");
    let mut bad = ok.clone();
    bad.desc_table = GuestAddress(Q + 8);
    assert!(bad.validate(&m).is_err(), "descriptor table misaligned");
    let mut bad = ok.clone();
    bad.used_ring = GuestAddress(Q + 2);
    assert!(bad.validate(&m).is_err(), "used ring misaligned");
    let mut bad = ok.clone();
    bad.avail_ring = GuestAddress(MEM as u64 - 8);
    assert!(bad.validate(&m).is_err(), "available ring past the end");
    let mut bad = ok;
    bad.used_ring = GuestAddress(u64::MAX - 3);
    assert!(bad.validate(&m).is_err(), "used ring overflowing");
}

#[test]
fn not_ready_queue_is_not_touched() {
    let (m, mut d, mut q) = setup(4);
    d.set_desc(&m, 0, BUF, 1, 0, 0);
    d.offer(&m, 0);
    q.ready = false;
    assert_eq!(q.pop(&m), Err(QueueError::NotReady));
    assert_eq!(q.add_used(&m, 0, 0), Err(QueueError::NotReady));
}

#[test]
fn rings_outside_memory_fail_without_panicking() {
    let m = mem(MEM);
    let mut q = Queue::new(4);
    q.ready = true;
    q.avail_ring = GuestAddress(u64::MAX - 1);
    q.used_ring = GuestAddress(u64::MAX - 1);
    assert!(matches!(q.pop(&m), Err(QueueError::RingAccess { .. })));
    assert!(matches!(q.add_used(&m, 0, 0), Err(QueueError::RingAccess { .. })));
    assert!(q.needs_notification(&m));
}

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
