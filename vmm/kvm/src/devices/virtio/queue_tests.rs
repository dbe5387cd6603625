//! Tests of the split virtqueue (VIRTIO 1.2 2.7) against real guest
//! memory from vm-memory: chain parsing and rejection, the used ring, and
//! [`Queue::process_chains`].

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::queue::*;
use crate::testutil::{mem, write_desc, DriverQueue};

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
