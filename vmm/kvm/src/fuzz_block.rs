//! Fuzz entry points for the virtio device parsers, shared by the
//! cargo-fuzz targets `block` and `console_ctrl` in `vmm/kvm/fuzz/` and the
//! deterministic pseudo-random `#[test]`s below (run by every `cargo test`).
//!
//! * [`fuzz_block_request`]: arbitrary bytes become guest memory and a
//!   request queue; every chain is executed by the virtio-blk request
//!   engine (VIRTIO 1.2 section 5.2.6) against an in-memory disk.
//! * [`fuzz_console_control`]: arbitrary bytes become guest memory, the six
//!   queues of a two-port MULTIPORT console (5.3.2) and a program of
//!   queue notifications, host input / EOF / reconnects, direct control
//!   messages (5.3.6.2), resets and snapshot round trips.
//!
//! Both check invariants with `assert!` - a failing assertion is a bug found.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::virtio::block::{status_code, BlockDisk, DiskImage, MemImage, SECTOR_SIZE};
use crate::devices::virtio::console::{
    ConsoleCore, PortConfig, MAX_PENDING_CONTROL, TX_BUFFER_LIMIT, VIRTIO_CONSOLE_F_MULTIPORT,
};
use crate::devices::virtio::queue::{ChainOutcome, Queue, QueueError};
use crate::devices::virtio::{features, ActivateContext, VirtioInterrupt};
use crate::devices::IrqLine;

/// Guest memory size of the harnesses (64 KiB).
pub const FUZZ_MEM: usize = 64 << 10;

thread_local! {
    static MEM: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), FUZZ_MEM)]).expect("64 KiB mapping");
}

fn load(mem: &GuestMemoryMmap, data: &[u8]) {
    let mut img = vec![0u8; FUZZ_MEM];
    let n = data.len().min(FUZZ_MEM);
    img[..n].copy_from_slice(&data[..n]);
    mem.write_slice(&img, GuestAddress(0)).expect("memory image");
}

fn byte(data: &[u8], i: usize) -> u8 {
    data.get(i).copied().unwrap_or(0)
}

fn in_image(offset: u64, len: usize, size: u64) -> bool {
    offset.checked_add(len as u64).is_some_and(|end| end <= size)
}

/// A [`MemImage`] that counts writes (a read-only disk must see none).
struct CountingImage {
    inner: MemImage,
    writes: Arc<AtomicU64>,
}

impl DiskImage for CountingImage {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        assert!(in_image(offset, buf.len(), self.inner.len()), "read past the end reached the image");
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        assert!(in_image(offset, buf.len(), self.inner.len()), "write past the end reached the image");
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.write_all_at(buf, offset)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Layout of the block harness's request queue.
/// (Low addresses, so that short fuzz inputs reach the rings.)
const BLK_DESC: u64 = 0x40;
const BLK_AVAIL: u64 = 0x240;
const BLK_USED: u64 = 0x288;

/// virtio-blk harness. `data` is guest memory; its first bytes choose
/// the queue size (`data[0]`), read-only / indirect (`data[1]` bits 0/1),
/// the disk size in sectors (`data[2] % 40`) and the device's starting
/// ring position (`data[4..6]`). The descriptor table is at 0x40, the
/// available ring at 0x240, the used ring at 0x288 (room for 32 entries).
pub fn fuzz_block_request(data: &[u8]) {
    MEM.with(|mem| block(mem, data));
}

fn block(mem: &GuestMemoryMmap, data: &[u8]) {
    load(mem, data);
    let size = 1u16 << (byte(data, 0) % 6);
    let read_only = byte(data, 1) & 1 != 0;
    let sectors = u64::from(byte(data, 2) % 40);
    let mut q = Queue::new(size);
    q.desc_table = GuestAddress(BLK_DESC);
    q.avail_ring = GuestAddress(BLK_AVAIL);
    q.used_ring = GuestAddress(BLK_USED);
    q.indirect = byte(data, 1) & 2 != 0;
    q.ready = true;
    let start = u16::from_le_bytes([byte(data, 4), byte(data, 5)]);
    q.set_positions(start, start);
    assert!(q.validate(mem).is_ok());

    let writes = Arc::new(AtomicU64::new(0));
    let image = MemImage((0..sectors * SECTOR_SIZE).map(|i| (i % 251) as u8).collect());
    let mut disk = BlockDisk::new(Box::new(CountingImage { inner: image, writes: writes.clone() }), read_only, b"fuzz");
    let mut seen = 0u32;
    let r = q.process_chains(mem, |chain| {
        seen += 1;
        let writable = chain.writable_len();
        let c = disk.execute(mem, &chain);
        match c.status {
            None => assert_eq!(c.used_len, 0, "no status, nothing written"),
            Some(s) => {
                assert!([
                    status_code::VIRTIO_BLK_S_OK,
                    status_code::VIRTIO_BLK_S_IOERR,
                    status_code::VIRTIO_BLK_S_UNSUPP
                ]
                .contains(&s));
                assert!(writable >= 1);
                assert!(u64::from(c.used_len) <= writable, "used {} > writable {writable}", c.used_len);
                if s != status_code::VIRTIO_BLK_S_OK {
                    assert_eq!(c.used_len, 1);
                }
            }
        }
        ChainOutcome::Used(c.used_len)
    });
    seen += r.invalid as u32;
    assert!(!matches!(r.error, Some(QueueError::RingAccess { .. } | QueueError::NotReady)), "validated queue: {r:?}");
    if read_only {
        assert_eq!(writes.load(Ordering::Relaxed), 0, "read-only disk written");
    }
    let stats = disk.stats;
    assert!(stats.ok + stats.failed + stats.dropped <= u64::from(seen) + 1);

    // The device's own loop over the same ring, from the start again.
    let mut q2 = q.clone();
    q2.set_positions(start, start);
    let _ = disk.process_queue(mem, &mut q2);
    if read_only {
        assert_eq!(writes.load(Ordering::Relaxed), 0, "read-only disk written");
    }
}

/// Queue `i` of the console harness lives at `CON_QUEUES + i * CON_STRIDE`
/// (descriptors, available ring at +0x100, used ring at +0x128; room for
/// 16 entries).
const CON_QUEUES: u64 = 0x100;
const CON_STRIDE: u64 = 0x1c0;

fn console_queues(size: u16, indirect: bool) -> Vec<Queue> {
    (0..6u64)
        .map(|i| {
            let base = CON_QUEUES + i * CON_STRIDE;
            let mut q = Queue::new(size);
            q.desc_table = GuestAddress(base);
            q.avail_ring = GuestAddress(base + 0x100);
            q.used_ring = GuestAddress(base + 0x128);
            q.indirect = indirect;
            q.ready = true;
            q
        })
        .collect()
}

/// virtio-console harness. `data` is guest memory; `data[0]` bit 0: port 0
/// has a backend; `data[1]`: queue size; `data[2]` bit 0: MULTIPORT
/// negotiated, bit 1: indirect descriptors. `data[8..200]` is a program of
/// 3-byte operations (see the source); queues are at 0x100 + 0x1c0 * i.
pub fn fuzz_console_control(data: &[u8]) {
    MEM.with(|mem| {
        console(mem, data);
    });
}

fn console(mem: &GuestMemoryMmap, data: &[u8]) -> ConsoleCore {
    load(mem, data);
    let ports = vec![
        PortConfig { name: None, console: true, has_backend: byte(data, 0) & 1 != 0 },
        PortConfig { name: Some("capvisor.agent".into()), console: false, has_backend: true },
    ];
    let size = 1u16 << (byte(data, 1) % 5);
    let acked = features::VIRTIO_F_VERSION_1 | if byte(data, 2) & 1 != 0 { VIRTIO_CONSOLE_F_MULTIPORT } else { 0 };
    let indirect = byte(data, 2) & 2 != 0;
    let irq = Arc::new(VirtioInterrupt::new(IrqLine::new().expect("eventfd")));
    let ctx = || ActivateContext {
        mem: mem.clone(),
        queues: console_queues(size, indirect),
        interrupt: irq.clone(),
        acked_features: acked,
    };
    let mut core = ConsoleCore::new(ports.clone()).expect("valid ports");
    core.activate(ctx()).expect("six queues");
    let mut pushed = [0usize; 2];
    let program = data.get(8..data.len().min(200)).unwrap_or(&[]);
    for op in program.chunks_exact(3) {
        let (a, b) = (op[1], op[2]);
        let port = usize::from(a % 3); // 2 is out of range on purpose
        match op[0] % 12 {
            0..=3 => core.queue_notify(u16::from(a % 8)),
            4 => {
                let n = usize::from(b) % 64;
                let bytes = data.get(..n).unwrap_or(&[]);
                if let Some(p) = pushed.get_mut(port) {
                    *p += bytes.len();
                }
                core.push_input(port, bytes);
            }
            5 => {
                core.consume_output(port, usize::from(b) * 16);
                assert!(core.pending_output(port).len() <= TX_BUFFER_LIMIT);
            }
            6 => core.host_disconnected(port),
            7 => core.host_reconnected(port),
            8 => core.close_output(port),
            9 => {
                let at = usize::from(a) % data.len().max(1);
                core.handle_control(data.get(at..).unwrap_or(&[]));
            }
            10 => {
                let _ = core.wants_input(port);
            }
            _ => {
                if a & 1 != 0 {
                    let snap = core.save();
                    core = ConsoleCore::restore(ports.clone(), &snap).expect("own snapshot");
                } else {
                    core.reset();
                }
                core.activate(ctx()).expect("six queues");
            }
        }
        assert!(core.pending_control() <= MAX_PENDING_CONTROL);
        for (p, &total) in pushed.iter().enumerate() {
            let st = core.port_status(p).expect("port exists");
            assert!(st.staged_len <= total, "staged more than pushed");
            // A chain is only popped while there is room, but one chain may
            // carry up to the remaining room: never more than the limit.
            assert!(st.output_len <= TX_BUFFER_LIMIT);
        }
    }
    core
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::request_type;
    use crate::devices::virtio::console::event;
    use crate::devices::virtio::queue::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

    use crate::testutil::Rng;

    /// A random element of `xs` (arguments in this order so `xs` may use `rng`).
    fn pick<T: Copy>(xs: &[T], rng: &mut Rng) -> T {
        xs[rng.below(xs.len() as u64) as usize]
    }

    fn put(d: &mut [u8], at: u64, bytes: &[u8]) {
        let at = at as usize;
        if let Some(s) = d.get_mut(at..at + bytes.len()) {
            s.copy_from_slice(bytes);
        }
    }

    fn desc(d: &mut [u8], table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        put(d, table + 16 * u64::from(i), &raw);
    }

    fn flip(rng: &mut Rng, d: &mut [u8], max: u64) {
        for _ in 0..rng.below(max) {
            let i = rng.below(d.len() as u64) as usize;
            d[i] ^= 1 << rng.below(8);
        }
    }

    /// Mostly well-formed block requests so mutations reach the request
    /// engine's checks rather than stopping at the virtqueue layer.
    fn block_image(rng: &mut Rng) -> Vec<u8> {
        let mut d = vec![0u8; 0x1000 + rng.below(0x3000) as usize];
        let size_log = rng.below(4) as u8 + 2; // 4..32
        let size = 1u16 << size_log;
        d[0] = size_log;
        d[1] = rng.below(4) as u8;
        let sectors = rng.below(40);
        d[2] = sectors as u8;
        let mut next = 0u16;
        let nreq = rng.below(u64::from(size) / 2 + 1) as u16;
        let mut heads = Vec::new();
        for r in 0..nreq {
            let base = 0x400 + u64::from(r) * 0xa0;
            let t = pick(
                &[
                    request_type::VIRTIO_BLK_T_IN,
                    request_type::VIRTIO_BLK_T_OUT,
                    request_type::VIRTIO_BLK_T_FLUSH,
                    request_type::VIRTIO_BLK_T_GET_ID,
                    request_type::VIRTIO_BLK_T_DISCARD,
                    rng.next() as u32,
                ],
                rng,
            );
            let sector = pick(
                &[0, 1, sectors.saturating_sub(1), sectors, sectors + 1, u64::MAX / 512, u64::MAX, rng.next()],
                rng,
            );
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&t.to_le_bytes());
            hdr[8..16].copy_from_slice(&sector.to_le_bytes());
            put(&mut d, base, &hdr);
            let data_writable = match t {
                request_type::VIRTIO_BLK_T_OUT => rng.below(8) == 0,
                _ => rng.below(8) != 0,
            };
            let mut bufs: Vec<(u64, u32, bool)> = vec![(base, pick(&[16, 16, 16, 8, 15, 17, 32], rng), false)];
            for k in 0..rng.below(3) {
                let len = pick(&[512, 1024, 20, 0, 511, rng.below(0x300) as u32], rng);
                bufs.push((0x1000 + rng.below(0x3000) + k, len, data_writable));
            }
            if rng.below(10) != 0 {
                bufs.push((base + 0x20, pick(&[1, 1, 1, 0, 2], rng), true));
            }
            if rng.below(8) == 0 {
                // occasionally out of memory entirely
                let i = rng.below(bufs.len() as u64) as usize;
                bufs[i].0 = pick(&[FUZZ_MEM as u64 - 4, u64::MAX - 8, 1 << 40], rng);
            }
            let head = next;
            if rng.below(6) == 0 {
                // as an indirect table
                let table = base + 0x40;
                for (j, &(addr, len, w)) in bufs.iter().enumerate() {
                    let last = j + 1 == bufs.len();
                    let flags = if w { VIRTQ_DESC_F_WRITE } else { 0 } | if last { 0 } else { VIRTQ_DESC_F_NEXT };
                    desc(&mut d, table, j as u16, addr, len, flags, j as u16 + 1);
                }
                desc(&mut d, BLK_DESC, next % size, table, 16 * bufs.len() as u32, VIRTQ_DESC_F_INDIRECT, 0);
                next = next.wrapping_add(1);
            } else {
                for (j, &(addr, len, w)) in bufs.iter().enumerate() {
                    let last = j + 1 == bufs.len();
                    let flags = if w { VIRTQ_DESC_F_WRITE } else { 0 } | if last { 0 } else { VIRTQ_DESC_F_NEXT };
                    desc(&mut d, BLK_DESC, next % size, addr, len, flags, next.wrapping_add(1) % size);
                    next = next.wrapping_add(1);
                }
            }
            heads.push(head % size);
        }
        put(&mut d, BLK_AVAIL + 2, &(heads.len() as u16).to_le_bytes());
        for (i, h) in heads.iter().enumerate() {
            put(&mut d, BLK_AVAIL + 4 + 2 * i as u64, &h.to_le_bytes());
        }
        flip(rng, &mut d, 4);
        d
    }

    /// A console image: control messages queued on the control transmitq,
    /// buffers posted on the receive queues, data on the transmitqs, and an
    /// operation program favouring notifications.
    fn console_image(rng: &mut Rng) -> Vec<u8> {
        let mut d = vec![0u8; 0x2400];
        d[0] = rng.below(2) as u8;
        let size_log = rng.below(4) as u8 + 1; // 2..16
        let size = 1u16 << size_log;
        d[1] = size_log;
        d[2] = if rng.below(8) == 0 { rng.below(4) as u8 } else { 1 | (rng.below(2) as u8) << 1 };
        // program
        for k in 0..64 {
            let at = 8 + 3 * k;
            let op = if rng.below(3) == 0 { rng.below(12) as u8 } else { rng.below(4) as u8 };
            d[at] = op;
            d[at + 1] = pick(&[2, 3, 0, 1, 4, 5, rng.next() as u8], rng);
            d[at + 2] = rng.next() as u8;
        }
        for qi in 0..6u64 {
            let base = CON_QUEUES + qi * CON_STRIDE;
            let n = rng.below(u64::from(size) + 1) as u16;
            for i in 0..n {
                let buf = 0xc00 + qi * 0x400 + u64::from(i) * 0x40;
                let writable = matches!(qi, 0 | 2 | 4) ^ (rng.below(10) == 0);
                if qi == 3 {
                    let id = pick(&[0u32, 1, 2, u32::MAX, rng.next() as u32], rng);
                    let ev = pick(
                        &[
                            event::VIRTIO_CONSOLE_DEVICE_READY,
                            event::VIRTIO_CONSOLE_PORT_READY,
                            event::VIRTIO_CONSOLE_PORT_OPEN,
                            event::VIRTIO_CONSOLE_PORT_NAME,
                            rng.below(9) as u16,
                            rng.next() as u16,
                        ],
                        rng,
                    );
                    let val = pick(&[0u16, 1, 1, rng.next() as u16], rng);
                    let mut m = [0u8; 8];
                    m[0..4].copy_from_slice(&id.to_le_bytes());
                    m[4..6].copy_from_slice(&ev.to_le_bytes());
                    m[6..8].copy_from_slice(&val.to_le_bytes());
                    put(&mut d, buf, &m);
                } else if !writable {
                    put(&mut d, buf, b"guest bytes!");
                }
                let len = pick(&[8, 12, 0x40, 4, 0, 9], rng);
                desc(&mut d, base, i, buf, len, if writable { VIRTQ_DESC_F_WRITE } else { 0 }, 0);
                put(&mut d, base + 0x100 + 4 + 2 * u64::from(i), &i.to_le_bytes());
            }
            put(&mut d, base + 0x100 + 2, &n.to_le_bytes());
        }
        flip(rng, &mut d[0x100..], 4);
        d
    }

    const ITERATIONS: u64 = 3000;

    #[test]
    fn block_requests_survive_random_and_structured_input() {
        let mut rng = Rng(0x5eed_b10c_0000_0001);
        for i in 0..ITERATIONS {
            let data = if i % 4 == 3 {
                (0..rng.below(0x5000)).map(|_| rng.next() as u8).collect()
            } else {
                block_image(&mut rng)
            };
            fuzz_block_request(&data);
        }
    }

    #[test]
    fn console_control_survives_random_and_structured_input() {
        let mut rng = Rng(0x5eed_c0de_0000_0002);
        for i in 0..ITERATIONS {
            let data = if i % 4 == 3 {
                (0..rng.below(0x4000)).map(|_| rng.next() as u8).collect()
            } else {
                console_image(&mut rng)
            };
            fuzz_console_control(&data);
        }
    }

    /// Seed corpora for cargo-fuzz from the structured generators:
    /// `cargo test -p capvisor-kvm --lib write_seed_corpus -- --ignored`
    /// writes 64 inputs each into `fuzz/corpus/{block,console_ctrl}/`.
    #[test]
    #[ignore]
    fn write_seed_corpus() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let mut rng = Rng(0x5eed);
        for (target, make) in [("block", block_image as fn(&mut Rng) -> Vec<u8>), ("console_ctrl", console_image)] {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..64 {
                std::fs::write(dir.join(format!("seed-{i:02}")), make(&mut rng)).unwrap();
            }
        }
    }

    /// The structured console input gets ports through the bring-up.
    #[test]
    fn structured_console_input_reaches_open_ports_and_data() {
        let mut rng = Rng(11);
        let (mut ready, mut open, mut output, mut control) = (0, 0, 0, 0);
        MEM.with(|mem| {
            for _ in 0..500 {
                let core = console(mem, &console_image(&mut rng));
                let st = core.port_status(1).expect("port 1");
                ready += usize::from(st.guest_ready);
                open += usize::from(st.guest_open);
                output += usize::from(st.output_len > 0 || core.stats.discarded_output > 0);
                control += usize::from(core.stats.bad_control > 0);
            }
        });
        assert!(ready > 10 && open > 10 && output > 10 && control > 10, "{ready} {open} {output} {control}");
    }

    /// The structured generator reaches the interesting outcomes (so the
    /// random test is not just exercising the early exits).
    #[test]
    fn structured_block_input_reaches_every_status() {
        use crate::devices::virtio::block::RequestError;
        let mut rng = Rng(7);
        let mut seen = std::collections::HashSet::new();
        MEM.with(|mem| {
            for _ in 0..500 {
                let data = block_image(&mut rng);
                load(mem, &data);
                let size = 1u16 << (data[0] % 6);
                let mut q = Queue::new(size);
                q.desc_table = GuestAddress(BLK_DESC);
                q.avail_ring = GuestAddress(BLK_AVAIL);
                q.used_ring = GuestAddress(BLK_USED);
                q.indirect = data[1] & 2 != 0;
                q.ready = true;
                let image = MemImage(vec![0; usize::from(data[2] % 40) * 512]);
                let mut disk = BlockDisk::new(Box::new(image), data[1] & 1 != 0, b"");
                while let Ok(Some(c)) = q.pop(mem) {
                    let done = disk.execute(mem, &c);
                    seen.insert(match (done.status, disk.last_error) {
                        (Some(0), _) => "ok",
                        (None, _) => "no-status",
                        (_, Some(RequestError::OutOfRange { .. })) => "range",
                        (_, Some(RequestError::ReadOnly)) => "ro",
                        (_, Some(RequestError::Unsupported(_))) => "unsupp",
                        (_, Some(RequestError::DataDirection(_))) => "direction",
                        (_, Some(RequestError::HeaderTooShort)) => "short",
                        (_, Some(RequestError::Unaligned(_))) => "unaligned",
                        _ => "other",
                    });
                    disk.last_error = None;
                }
            }
        });
        for want in ["ok", "no-status", "range", "ro", "unsupp", "direction", "short", "unaligned"] {
            assert!(seen.contains(want), "{want} never reached: {seen:?}");
        }
    }
}
