//! virtio-blk tests (VIRTIO 1.2 section 5.2) against guest memory from
//! vm-memory and a raw image in a temporary file.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::io::{config_offset, VirtioBlock};
use super::snapshot::BlockSnapshot;
use super::*;
use crate::devices::virtio::mmio::{reg, MmioTransport};
use crate::devices::virtio::queue::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::devices::virtio::snapshot::VirtioDeviceState;
use crate::devices::virtio::{features, ActivateContext, VirtioDevice, VirtioInterrupt, INT_USED_RING};
use crate::devices::{Device, DeviceState, IrqLine};
use crate::testutil::{mem, DriverQueue};

const MEM: usize = 1 << 20;
const Q: u64 = 0x10000;
const HDR: u64 = 0x20000;
const DATA: u64 = 0x30000;
const STATUS: u64 = 0x40000;
const SECTORS: u64 = 64;

/// A temporary raw image, removed on drop.
struct TempImage(PathBuf);

impl TempImage {
    fn new(contents: &[u8]) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "capvisor-blk-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&p, contents).unwrap();
        TempImage(p)
    }
    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Image whose sector `s` is filled with byte `s`.
fn pattern() -> Vec<u8> {
    (0..SECTORS).flat_map(|s| std::iter::repeat_n(s as u8, 512)).collect()
}

struct Rig {
    m: GuestMemoryMmap,
    d: DriverQueue,
    dev: VirtioBlock,
    irq: Arc<VirtioInterrupt>,
    next_desc: u16,
}

impl Rig {
    fn new(dev: VirtioBlock) -> Self {
        let m = mem(MEM);
        let d = DriverQueue::new(16, Q);
        let irq = Arc::new(VirtioInterrupt::new(IrqLine::new().unwrap()));
        let mut dev = dev;
        dev.activate(ActivateContext {
            mem: m.clone(),
            queues: vec![d.device_queue()],
            interrupt: irq.clone(),
            acked_features: dev.device_features(),
        })
        .unwrap();
        Rig { m, d, dev, irq, next_desc: 0 }
    }

    fn file(img: &TempImage, read_only: bool) -> Self {
        Self::new(VirtioBlock::open(&img.0, read_only, b"capvisor-disk-0").unwrap())
    }

    /// Offer a chain of `(addr, len, writable)` buffers; returns its head.
    fn offer(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % self.d.size;
            let last = i + 1 == bufs.len();
            let flags = if writable { VIRTQ_DESC_F_WRITE } else { 0 } | if last { 0 } else { VIRTQ_DESC_F_NEXT };
            self.d.set_desc(&self.m, idx, addr, len, flags, (idx + 1) % self.d.size);
        }
        self.next_desc = (head + bufs.len() as u16) % self.d.size;
        self.d.offer(&self.m, head);
        head
    }

    fn header(&self, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes()); // reserved: ignored
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.m.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Submit, notify, return (used id, used len, status byte).
    fn run(&mut self, bufs: &[(u64, u32, bool)]) -> (u32, u32, u8) {
        self.m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let head = self.offer(bufs);
        let before = self.d.used_idx(&self.m);
        self.dev.queue_notify(0);
        assert_eq!(self.d.used_idx(&self.m), before.wrapping_add(1), "exactly one chain completed");
        let (id, len) = self.d.used_elem(&self.m, before);
        assert_eq!(id, u32::from(head));
        (id, len, self.m.read_obj(GuestAddress(STATUS)).unwrap())
    }

    fn read_guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.m.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

const OK: u8 = status_code::VIRTIO_BLK_S_OK;
const IOERR: u8 = status_code::VIRTIO_BLK_S_IOERR;
const UNSUPP: u8 = status_code::VIRTIO_BLK_S_UNSUPP;
use request_type::*;

#[test]
fn features_and_configuration_space() {
    let img = TempImage::new(&pattern());
    let rw = VirtioBlock::open(&img.0, false, b"x").unwrap();
    let f = rw.device_features();
    for bit in [
        features::VIRTIO_F_VERSION_1,
        feature::VIRTIO_BLK_F_SEG_MAX,
        feature::VIRTIO_BLK_F_BLK_SIZE,
        feature::VIRTIO_BLK_F_FLUSH,
    ] {
        assert_ne!(f & bit, 0, "{bit:#x} offered");
    }
    assert_eq!(f & feature::VIRTIO_BLK_F_RO, 0);
    assert_eq!(rw.device_type(), 2);
    assert_eq!(rw.queue_max_sizes(), &[QUEUE_SIZE]);
    let mut cap = [0u8; 8];
    rw.read_config(config_offset::CAPACITY as u64, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    let mut v = [0u8; 4];
    rw.read_config(config_offset::SEG_MAX as u64, &mut v);
    assert_eq!(u32::from_le_bytes(v), SEG_MAX);
    rw.read_config(config_offset::BLK_SIZE as u64, &mut v);
    assert_eq!(u32::from_le_bytes(v), 512);
    // byte-wise reads, reads past the end, huge offsets
    let mut b = [0xaau8; 1];
    rw.read_config(0, &mut b);
    assert_eq!(b[0], SECTORS as u8);
    let mut past = [0xaau8; 8];
    rw.read_config(1000, &mut past);
    assert_eq!(past, [0; 8]);
    rw.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 8]);

    let ro = VirtioBlock::open(&img.0, true, b"x").unwrap();
    assert_ne!(ro.device_features() & feature::VIRTIO_BLK_F_RO, 0);
}

#[test]
fn partial_trailing_sector_is_not_exposed() {
    let img = TempImage::new(&[7u8; 512 * 3 + 100]);
    let dev = VirtioBlock::open(&img.0, true, b"").unwrap();
    assert_eq!(dev.disk().capacity(), 3);
}

#[test]
fn read_and_write_round_trip_through_the_image_file() {
    let img = TempImage::new(&pattern());
    let mut r = Rig::file(&img, false);

    // read sectors 3..5 into two data buffers (split at an odd place)
    r.header(VIRTIO_BLK_T_IN, 3);
    let (_, len, st) = r.run(&[(HDR, 16, false), (DATA, 700, true), (DATA + 0x1000, 324, true), (STATUS, 1, true)]);
    assert_eq!((st, len), (OK, 1024 + 1));
    let mut got = r.read_guest(DATA, 700);
    got.extend(r.read_guest(DATA + 0x1000, 324));
    assert_eq!(&got[..512], &[3u8; 512][..]);
    assert_eq!(&got[512..], &[4u8; 512][..]);
    assert_ne!(r.irq.status() & INT_USED_RING, 0, "used-buffer interrupt");
    assert!(r.irq.line().take_count() > 0);

    // write 2 sectors at 10
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    r.m.write_slice(&data, GuestAddress(DATA)).unwrap();
    r.header(VIRTIO_BLK_T_OUT, 10);
    let (_, len, st) = r.run(&[(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)]);
    assert_eq!((st, len), (OK, 1));
    let file = img.contents();
    assert_eq!(&file[10 * 512..12 * 512], &data[..]);
    assert_eq!(&file[9 * 512..10 * 512], &[9u8; 512][..], "neighbours untouched");
    assert_eq!(&file[12 * 512..13 * 512], &[12u8; 512][..]);

    // and read it back through the device
    r.m.write_slice(&[0u8; 1024], GuestAddress(DATA + 0x2000)).unwrap();
    r.header(VIRTIO_BLK_T_IN, 10);
    let (_, _, st) = r.run(&[(HDR, 16, false), (DATA + 0x2000, 1024, true), (STATUS, 1, true)]);
    assert_eq!(st, OK);
    assert_eq!(r.read_guest(DATA + 0x2000, 1024), data);

    // the last sector is readable; zero-length reads are fine
    r.header(VIRTIO_BLK_T_IN, SECTORS - 1);
    assert_eq!(r.run(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]).2, OK);
    r.header(VIRTIO_BLK_T_IN, SECTORS);
    assert_eq!(r.run(&[(HDR, 16, false), (STATUS, 1, true)]).2, OK);
    assert_eq!(r.dev.disk().stats.ok, 5);
}

#[test]
fn message_framing_does_not_matter() {
    // 2.6.4: header split over descriptors, data and status in one buffer.
    let img = TempImage::new(&pattern());
    let mut r = Rig::file(&img, false);
    r.header(VIRTIO_BLK_T_IN, 5);
    r.m.write_obj(0xffu8, GuestAddress(DATA + 512)).unwrap();
    r.m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let before = r.d.used_idx(&r.m);
    r.offer(&[(HDR, 3, false), (HDR + 3, 13, false), (DATA, 513, true)]);
    r.dev.queue_notify(0);
    assert_eq!(r.d.used_elem(&r.m, before).1, 513);
    assert_eq!(r.read_guest(DATA, 512), vec![5u8; 512]);
    assert_eq!(r.read_guest(DATA + 512, 1), vec![OK], "status is the last writable byte");

    // OUT with header and data in one readable buffer
    r.m.write_slice(&[0x5a; 512], GuestAddress(HDR + 16)).unwrap();
    r.header(VIRTIO_BLK_T_OUT, 1);
    assert_eq!(r.run(&[(HDR, 16 + 512, false), (STATUS, 1, true)]).2, OK);
    assert_eq!(&img.contents()[512..1024], &[0x5a; 512][..]);
}

#[test]
fn large_request_goes_through_the_bounce_buffer_in_pieces() {
    let img = TempImage::new(&vec![0u8; 256 << 10]);
    let mut r = Rig::file(&img, false);
    let data: Vec<u8> = (0..(160u32 << 10)).map(|i| (i % 251) as u8).collect();
    r.m.write_slice(&data, GuestAddress(0x80000)).unwrap();
    r.header(VIRTIO_BLK_T_OUT, 8);
    assert_eq!(r.run(&[(HDR, 16, false), (0x80000, data.len() as u32, false), (STATUS, 1, true)]).2, OK);
    assert_eq!(&img.contents()[8 * 512..8 * 512 + data.len()], &data[..]);
    r.header(VIRTIO_BLK_T_IN, 8);
    assert_eq!(r.run(&[(HDR, 16, false), (0x40100, data.len() as u32, true), (STATUS, 1, true)]).2, OK);
    assert_eq!(r.read_guest(0x40100, data.len()), data);
}

#[test]
fn flush_and_get_id() {
    let img = TempImage::new(&pattern());
    let mut r = Rig::file(&img, false);
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(r.run(&[(HDR, 16, false), (STATUS, 1, true)]), (0, 1, OK));

    r.header(VIRTIO_BLK_T_GET_ID, 0);
    r.m.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();
    let (_, len, st) = r.run(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
    assert_eq!((st, len), (OK, 21));
    let mut want = [0u8; 20];
    want[..15].copy_from_slice(b"capvisor-disk-0");
    assert_eq!(r.read_guest(DATA, 20), want, "NUL-padded id");

    // a 20-byte id has no terminator; a short buffer gets a prefix
    let mut r = Rig::new(VirtioBlock::open(&img.0, false, b"0123456789abcdefghijKLMN").unwrap());
    r.header(VIRTIO_BLK_T_GET_ID, 0);
    let (_, len, st) = r.run(&[(HDR, 16, false), (DATA, 8, true), (STATUS, 1, true)]);
    assert_eq!((st, len), (OK, 9));
    assert_eq!(r.read_guest(DATA, 8), b"01234567");
    assert_eq!(r.dev.disk().id(), b"0123456789abcdefghij");

    // flush with data buffers is malformed
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(r.run(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]).2, IOERR);
}

#[test]
fn out_of_range_and_unaligned_requests_fail_with_ioerr() {
    let img = TempImage::new(&pattern());
    let before = img.contents();
    let mut r = Rig::file(&img, false);
    for (t, sector, len, writable) in [
        (VIRTIO_BLK_T_IN, SECTORS, 512, true),      // first sector past the end
        (VIRTIO_BLK_T_IN, SECTORS - 1, 1024, true), // straddles the end
        (VIRTIO_BLK_T_OUT, SECTORS, 512, false),
        (VIRTIO_BLK_T_OUT, SECTORS - 1, 1024, false),
        (VIRTIO_BLK_T_IN, 0, 100, true), // not a multiple of 512
        (VIRTIO_BLK_T_OUT, 0, 513, false),
    ] {
        r.header(t, sector);
        let (_, len_used, st) = r.run(&[(HDR, 16, false), (DATA, len, writable), (STATUS, 1, true)]);
        assert_eq!((st, len_used), (IOERR, 1), "type {t} sector {sector} len {len}");
    }
    assert_eq!(img.contents(), before, "nothing written");
    assert!(matches!(r.dev.disk().last_error, Some(RequestError::Unaligned(513))));
}

#[test]
fn overflowing_sector_arithmetic_is_ioerr() {
    let img = TempImage::new(&pattern());
    let mut r = Rig::file(&img, false);
    for sector in [u64::MAX, u64::MAX / 512 + 1, (u64::MAX - 511) / 512, 1 << 55] {
        for (t, writable) in [(VIRTIO_BLK_T_IN, true), (VIRTIO_BLK_T_OUT, false)] {
            r.header(t, sector);
            assert_eq!(
                r.run(&[(HDR, 16, false), (DATA, 1024, writable), (STATUS, 1, true)]).2,
                IOERR,
                "sector {sector:#x}"
            );
            assert!(matches!(r.dev.disk().last_error, Some(RequestError::OutOfRange { .. })));
        }
    }
}

#[test]
fn chain_without_a_status_byte_is_returned_with_length_zero() {
    let img = TempImage::new(&pattern());
    let before = img.contents();
    let mut r = Rig::file(&img, false);
    r.header(VIRTIO_BLK_T_OUT, 0);
    r.m.write_slice(&[0x11; 512], GuestAddress(DATA)).unwrap();
    let before_idx = r.d.used_idx(&r.m);
    let head = r.offer(&[(HDR, 16, false), (DATA, 512, false)]);
    r.dev.queue_notify(0);
    assert_eq!(r.d.used_elem(&r.m, before_idx), (u32::from(head), 0));
    // a zero-length "status" descriptor does not count either
    let head = r.offer(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 0, true)]);
    r.dev.queue_notify(0);
    assert_eq!(r.d.used_elem(&r.m, before_idx.wrapping_add(1)), (u32::from(head), 0));
    assert_eq!(img.contents(), before, "request without a status is not executed");
    assert_eq!(r.dev.disk().stats.dropped, 2);
    assert_eq!(r.dev.disk().last_error, Some(RequestError::NoStatus));
}

#[test]
fn short_or_misplaced_header_is_ioerr() {
    let img = TempImage::new(&pattern());
    let mut r = Rig::file(&img, false);
    r.header(VIRTIO_BLK_T_IN, 0);
    // 15 readable bytes
    assert_eq!(r.run(&[(HDR, 15, false), (DATA, 512, true), (STATUS, 1, true)]).2, IOERR);
    // header in a device-writable buffer: nothing readable at all
    assert_eq!(r.run(&[(HDR, 16, true), (STATUS, 1, true)]).2, IOERR);
    // only a status byte
    assert_eq!(r.run(&[(STATUS, 1, true)]).2, IOERR);
    assert_eq!(r.dev.disk().last_error, Some(RequestError::HeaderTooShort));
}

#[test]
fn data_in_the_wrong_direction_is_ioerr() {
    let img = TempImage::new(&pattern());
    let before = img.contents();
    let mut r = Rig::file(&img, false);
    // IN whose data buffer is device-readable
    r.header(VIRTIO_BLK_T_IN, 0);
    r.m.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(r.run(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]).2, IOERR);
    assert_eq!(r.read_guest(DATA, 512), vec![0x77; 512], "read-only buffer untouched");
    // OUT whose data buffer is device-writable
    r.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(r.run(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]).2, IOERR);
    // GET_ID with readable data
    r.header(VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(r.run(&[(HDR, 16, false), (DATA, 20, false), (STATUS, 1, true)]).2, IOERR);
    assert_eq!(r.dev.disk().last_error, Some(RequestError::DataDirection(VIRTIO_BLK_T_GET_ID)));
    assert_eq!(img.contents(), before);
}

#[test]
fn read_only_disk_refuses_writes() {
    let img = TempImage::new(&pattern());
    let before = img.contents();
    let mut r = Rig::file(&img, true);
    r.m.write_slice(&[0x42; 512], GuestAddress(DATA)).unwrap();
    r.header(VIRTIO_BLK_T_OUT, 2);
    assert_eq!(r.run(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]).2, IOERR);
    assert_eq!(r.dev.disk().last_error, Some(RequestError::ReadOnly));
    assert_eq!(img.contents(), before);
    // reads and flushes still work
    r.header(VIRTIO_BLK_T_IN, 2);
    assert_eq!(r.run(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]).2, OK);
    assert_eq!(r.read_guest(DATA, 512), vec![2u8; 512]);
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(r.run(&[(HDR, 16, false), (STATUS, 1, true)]).2, OK);
}

#[test]
fn unknown_request_types_are_unsupported() {
    let img = TempImage::new(&pattern());
    let mut r = Rig::file(&img, false);
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES, 2, 0xffff_ffff] {
        r.header(t, 0);
        assert_eq!(r.run(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]).2, UNSUPP, "type {t}");
    }
}

#[test]
fn chains_rejected_by_the_virtqueue_are_returned_and_processing_continues() {
    let img = TempImage::new(&pattern());
    let mut r = Rig::file(&img, false);
    // descriptor outside guest memory
    r.offer(&[(HDR, 16, false), (MEM as u64 - 8, 512, true), (STATUS, 1, true)]);
    // then a good request
    r.header(VIRTIO_BLK_T_IN, 1);
    r.offer(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    r.dev.queue_notify(0);
    assert_eq!(r.d.used_idx(&r.m), 2);
    assert_eq!(r.d.used_elem(&r.m, 0), (0, 0));
    assert_eq!(r.d.used_elem(&r.m, 1), (3, 513));
    assert_eq!(r.read_guest(DATA, 512), vec![1u8; 512]);
    assert_eq!(r.dev.disk().stats.dropped, 1);
}

#[test]
fn image_shorter_than_advertised_gives_ioerr_not_a_panic() {
    let img = TempImage::new(&pattern());
    let mut r = Rig::file(&img, false);
    std::fs::OpenOptions::new().write(true).open(&img.0).unwrap().set_len(512).unwrap();
    r.header(VIRTIO_BLK_T_IN, 4);
    assert_eq!(r.run(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]).2, IOERR);
    assert!(matches!(r.dev.disk().last_error, Some(RequestError::Io(_))));
}

#[test]
fn notify_before_activation_or_on_a_missing_queue_is_ignored() {
    let mut dev = VirtioBlock::new(Box::new(MemImage(vec![0; 4096])), false, b"m");
    dev.queue_notify(0);
    dev.queue_notify(9);
    let m = mem(MEM);
    let irq = Arc::new(VirtioInterrupt::new(IrqLine::new().unwrap()));
    let not_ready = crate::devices::virtio::queue::Queue::new(16);
    let ctx = ActivateContext { mem: m, queues: vec![not_ready], interrupt: irq, acked_features: 0 };
    assert!(dev.activate(ctx).is_err(), "request queue must be ready");
    assert!(dev.active_queues().is_empty());
}

#[test]
fn snapshot_and_restore_through_the_transport() {
    let m = mem(MEM);
    let irq = Arc::new(VirtioInterrupt::new(IrqLine::new().unwrap()));
    let dev = VirtioBlock::new(Box::new(MemImage(pattern())), true, b"snap");
    let mut t = MmioTransport::new(Box::new(dev), m.clone(), irq.clone());
    let d = DriverQueue::new(16, Q);
    let w = |t: &mut MmioTransport, off: u64, v: u32| {
        t.write(off, &v.to_le_bytes());
    };
    w(&mut t, reg::STATUS, 1);
    w(&mut t, reg::STATUS, 3);
    w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
    w(&mut t, reg::DRIVER_FEATURES, 1);
    w(&mut t, reg::STATUS, 11);
    w(&mut t, reg::QUEUE_NUM, 16);
    w(&mut t, reg::QUEUE_DESC_LOW, d.desc as u32);
    w(&mut t, reg::QUEUE_DRIVER_LOW, d.avail as u32);
    w(&mut t, reg::QUEUE_DEVICE_LOW, d.used as u32);
    w(&mut t, reg::QUEUE_READY, 1);
    w(&mut t, reg::STATUS, 15);
    assert!(t.is_activated(), "{:?}", t.last_error());
    let mut r =
        Rig { m: m.clone(), d, dev: VirtioBlock::new(Box::new(MemImage(vec![])), true, b""), irq, next_desc: 0 };
    r.header(VIRTIO_BLK_T_IN, 0);
    r.offer(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    w(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(r.d.used_idx(&m), 1);

    let DeviceState::VirtioMmio(snap) = t.snapshot() else { panic!("virtio snapshot") };
    assert_eq!((snap.queues[0].next_avail, snap.queues[0].next_used), (1, 1), "live positions");
    let VirtioDeviceState::Block(bs) = &snap.device else { panic!("block state") };
    assert_eq!(
        bs,
        &BlockSnapshot { capacity: SECTORS, read_only: true, id: b"snap\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0".to_vec() }
    );
    let json = serde_json::to_string(&snap).unwrap();
    let back: crate::devices::virtio::snapshot::MmioTransportSnapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(back, snap);

    assert!(VirtioBlock::restore(Box::new(MemImage(vec![0; 512])), bs).is_err(), "capacity mismatch");
    let dev = VirtioBlock::restore(Box::new(MemImage(pattern())), bs).unwrap();
    let irq2 = Arc::new(VirtioInterrupt::new(IrqLine::new().unwrap()));
    let mut t2 = MmioTransport::restore(Box::new(dev), m.clone(), irq2, &snap);
    assert!(t2.is_activated());
    r.header(VIRTIO_BLK_T_IN, 7);
    r.offer(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    w(&mut t2, reg::QUEUE_NOTIFY, 0);
    assert_eq!(r.d.used_idx(&m), 2, "restored device continues from the saved positions");
    assert_eq!(r.read_guest(DATA, 512), vec![7u8; 512]);
}

#[test]
fn stream_segments_cover_exactly_the_requested_range() {
    use crate::devices::virtio::queue::Descriptor;
    let d = |a: u64, l: u32| Descriptor { addr: GuestAddress(a), len: l, writable: false };
    let descs = [d(0x100, 10), d(0x200, 0), d(0x300, 5), d(0x400, 20)];
    assert_eq!(
        stream_segments(descs.iter(), 0, 35),
        vec![(GuestAddress(0x100), 10), (GuestAddress(0x300), 5), (GuestAddress(0x400), 20)]
    );
    assert_eq!(
        stream_segments(descs.iter(), 8, 10),
        vec![(GuestAddress(0x108), 2), (GuestAddress(0x300), 5), (GuestAddress(0x400), 3)]
    );
    assert_eq!(stream_segments(descs.iter(), 34, 100), vec![(GuestAddress(0x413), 1)]);
    assert!(stream_segments(descs.iter(), 35, 1).is_empty());
    assert!(stream_segments(descs.iter(), u64::MAX, u64::MAX).is_empty());
    assert!(stream_segments(descs.iter(), 3, 0).is_empty());
}
