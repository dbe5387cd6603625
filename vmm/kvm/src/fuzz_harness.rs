//! Fuzz entry points over guest-controlled input, shared by the cargo-fuzz
//! targets in `vmm/kvm/fuzz/` and the deterministic pseudo-random `#[test]`s
//! below (which run on stable in every `cargo test`).
//!
//! * [`virtqueue`]: arbitrary bytes become guest memory and a queue
//!   configuration; the device side pops, reads, writes and returns every
//!   chain (VIRTIO 1.2 2.7).
//! * [`mmio`]: arbitrary bytes become a sequence of guest register accesses
//!   on a virtio-mmio window (4.2.2) whose device consumes its queues on
//!   notify.
//!
//! Both check invariants with `assert!` - a failing assertion is a bug found.
//! The virtqueue harness drives the ring both with [`Queue::pop`] /
//! [`Queue::add_used`] and through the devices' loop,
//! [`Queue::process_chains`].

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::devices::virtio::mmio::{reg, MmioTransport, MMIO_MAGIC_VALUE};
use crate::devices::virtio::queue::{ChainOutcome, DescriptorChain, Queue, QueueError, MAX_QUEUE_SIZE};
use crate::devices::virtio::snapshot::VirtioDeviceState;
use crate::devices::virtio::{
    device_type, features, status, ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt,
};
use crate::devices::{Device, IrqLine};

/// Guest memory size used by the harnesses (64 KiB).
pub const FUZZ_MEM: usize = 64 << 10;

fn le_u64(b: &[u8]) -> u64 {
    b.iter().take(8).rev().fold(0, |a, &x| (a << 8) | u64::from(x))
}

/// Guest memory for the harnesses.
pub fn fuzz_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), FUZZ_MEM)]).expect("64 KiB mapping")
}

/// Check the invariants of a chain popped from a queue of `size`
/// entries, read its readable bytes and echo them into its writable ones;
/// returns the number of bytes written.
fn check_chain(chain: &DescriptorChain, mem: &GuestMemoryMmap, size: u16) -> u32 {
    assert!(chain.head_index < size);
    assert!(chain.descriptors.len() <= usize::from(size) + usize::from(MAX_QUEUE_SIZE));
    let mut writable = false;
    for d in &chain.descriptors {
        assert!(d.len == 0 || mem.check_range(d.addr, d.len as usize));
        assert!(!writable || d.writable, "readable after writable");
        writable |= d.writable;
    }
    let data = chain.read_all(mem, 4096).expect("validated readable buffers");
    chain.write_all(mem, &data).expect("validated writable buffers") as u32
}

/// Drain `q` with [`Queue::pop`] / [`Queue::add_used`] directly; checks
/// chain invariants. Returns the number of chains seen (good or bad).
/// `validated`: the queue passed [`Queue::validate`], so returning
/// in-range heads must succeed (an unvalidated queue may have misaligned
/// or unmapped rings, which must fail cleanly instead).
fn drain(q: &mut Queue, mem: &GuestMemoryMmap, budget: usize, validated: bool) -> usize {
    let mut seen = 0;
    for _ in 0..budget {
        match q.pop(mem) {
            Ok(Some(chain)) => {
                seen += 1;
                let n = check_chain(&chain, mem, q.size);
                let r = q.add_used(mem, chain.head_index, n);
                assert!(r.is_ok() || !validated, "add_used on a validated queue: {r:?}");
            }
            Ok(None) => break,
            Err(QueueError::InvalidChain { head_index, .. }) => {
                seen += 1;
                // Out-of-range heads cannot be returned; others can.
                let r = q.add_used(mem, head_index, 0);
                if head_index >= q.size {
                    assert_eq!(r, Err(QueueError::UsedIdOutOfRange(head_index)));
                } else {
                    assert!(r.is_ok() || !validated, "add_used on a validated queue: {r:?}");
                }
            }
            Err(_) => break,
        }
    }
    seen
}

/// Run [`Queue::process_chains`] on `q`, picking each chain's outcome from
/// the 2-bit fields of `choices`; checks the run's accounting.
fn process(q: &mut Queue, mem: &GuestMemoryMmap, choices: u8, validated: bool) {
    let (size, start) = (q.size, q.next_avail());
    let (mut handed, mut deferred, mut kept) = (0usize, false, 0usize);
    let r = q.process_chains(mem, |chain| {
        let n = check_chain(&chain, mem, size);
        let outcome = match (choices >> (2 * (handed % 4))) & 3 {
            0 => ChainOutcome::Used(n),
            1 => ChainOutcome::UsedLast(n),
            2 => ChainOutcome::Defer,
            _ => ChainOutcome::Keep,
        };
        handed += 1;
        deferred = outcome == ChainOutcome::Defer;
        kept += usize::from(outcome == ChainOutcome::Keep);
        outcome
    });
    let popped = handed + r.invalid - usize::from(deferred);
    assert_eq!(q.next_avail(), start.wrapping_add(popped as u16), "{r:?}");
    assert!(popped <= 2 * usize::from(size));
    assert!(r.used <= popped - kept, "{r:?}");
    if validated {
        assert!(!matches!(r.error, Some(QueueError::RingAccess { what: "used.ring" | "used.idx", .. })), "{r:?}");
    }
}

/// Virtqueue harness: `data[..FUZZ_MEM]` is guest memory; a 32-byte header
/// at the start of `data` picks size, ring addresses, indirect support and
/// the device's starting ring positions.
pub fn virtqueue(mem: &GuestMemoryMmap, data: &[u8]) {
    let mut img = vec![0u8; FUZZ_MEM];
    let n = data.len().min(FUZZ_MEM);
    img[..n].copy_from_slice(&data[..n]);
    mem.write_slice(&img, GuestAddress(0)).expect("memory image");
    let hdr = |i: usize| data.get(i).copied().unwrap_or(0);
    let mut q = Queue::new(1 << (hdr(0) % 9));
    q.size = if hdr(1) & 0x80 != 0 { u16::from(hdr(1)) } else { q.max_size };
    // addresses: mostly inside memory, sometimes anywhere
    let addr = |i: usize| {
        let raw = le_u64(data.get(i..).unwrap_or(&[]));
        if hdr(2) & 1 != 0 {
            raw
        } else {
            raw % (FUZZ_MEM as u64 + 64)
        }
    };
    q.desc_table = GuestAddress(addr(8));
    q.avail_ring = GuestAddress(addr(16));
    q.used_ring = GuestAddress(addr(24));
    q.indirect = hdr(3) & 1 != 0;
    q.ready = true;
    q.set_positions(u16::from(hdr(4)) | (u16::from(hdr(5)) << 8), u16::from(hdr(6)));
    let valid = q.validate(mem).is_ok();
    if !valid && hdr(2) & 2 == 0 {
        return; // a transport never activates an invalid queue
    }
    let mut q2 = q.clone();
    drain(&mut q, mem, 64, valid);
    // The same queue again through the device loop, from the same image.
    mem.write_slice(&img, GuestAddress(0)).expect("memory image");
    process(&mut q2, mem, hdr(7), valid);
}

/// A virtio device that consumes every chain of a notified queue.
struct EchoDevice {
    max: Vec<u16>,
    ctx: Option<ActivateContext>,
    config: [u8; 8],
}

impl VirtioDevice for EchoDevice {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }
    fn device_features(&self) -> u64 {
        features::VIRTIO_F_VERSION_1 | features::VIRTIO_F_INDIRECT_DESC
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.max
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset.checked_add(i as u64).and_then(|o| self.config.get(o as usize)).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(s) = offset.checked_add(i as u64).and_then(|o| self.config.get_mut(o as usize)) {
                *s = *b;
            }
        }
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        for q in ctx.queues.iter().filter(|q| q.ready) {
            assert!(q.validate(&ctx.mem).is_ok(), "transport activated an invalid queue");
        }
        self.ctx = Some(ctx);
        Ok(())
    }
    fn queue_notify(&mut self, index: u16) {
        let Some(ctx) = self.ctx.as_mut() else { panic!("notify before activation") };
        let Some(q) = ctx.queues.get_mut(usize::from(index)) else { panic!("notify out of range") };
        if !q.ready {
            return;
        }
        let size = q.size;
        let r = q.process_chains(&ctx.mem, |chain| ChainOutcome::Used(check_chain(&chain, &ctx.mem, size)));
        assert!(!matches!(r.error, Some(QueueError::RingAccess { what: "used.ring" | "used.idx", .. })), "{r:?}");
        if r.notify {
            ctx.interrupt.signal_used_queue();
        }
    }
    fn reset(&mut self) {
        self.ctx = None;
    }
    fn snapshot(&self) -> VirtioDeviceState {
        VirtioDeviceState::Stateless
    }
    fn active_queues(&self) -> &[Queue] {
        self.ctx.as_ref().map_or(&[], |c| c.queues.as_slice())
    }
}

/// MMIO harness: `data` is a sequence of 7-byte accesses `[kind, off_lo,
/// off_hi, v0, v1, v2, v3]` on one virtio-mmio window (kind bit 0: write;
/// bits 1-2: width 4/1/2/8). Guest memory is whatever the accesses leave in
/// it plus `data` itself copied at 0.
pub fn mmio(mem: &GuestMemoryMmap, data: &[u8]) {
    let n = data.len().min(FUZZ_MEM);
    let mut img = vec![0u8; FUZZ_MEM];
    img[..n].copy_from_slice(&data[..n]);
    mem.write_slice(&img, GuestAddress(0)).expect("memory image");
    let irq = Arc::new(VirtioInterrupt::new(IrqLine::new().expect("eventfd")));
    let dev = EchoDevice { max: vec![8, 256], ctx: None, config: [0; 8] };
    let mut t = MmioTransport::new(Box::new(dev), mem.clone(), irq);
    for op in data.chunks_exact(7) {
        let width = [4usize, 1, 2, 8][usize::from((op[0] >> 1) & 3)];
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % 0x140;
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&op[3..7]);
        if op[0] & 1 != 0 {
            t.write(offset, &buf[..width]);
        } else {
            t.read(offset, &mut buf[..width]);
        }
        // invariants of the register file
        let mut m = [0u8; 4];
        t.read(reg::MAGIC_VALUE, &mut m);
        assert_eq!(u32::from_le_bytes(m), MMIO_MAGIC_VALUE);
        let st = t.status();
        if st & status::DRIVER_OK != 0 {
            assert_ne!(st & status::FEATURES_OK, 0, "DRIVER_OK without FEATURES_OK");
        }
        if st & status::FEATURES_OK != 0 {
            assert_ne!(t.acked_features() & features::VIRTIO_F_VERSION_1, 0);
            assert_eq!(t.acked_features() & !t.device().device_features(), 0);
        }
        if t.is_activated() {
            assert_ne!(st & status::DRIVER_OK, 0);
        }
    }
    // snapshots of any state serialize
    let _ = t.save();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::queue::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

    use crate::testutil::Rng;

    /// A mostly well-formed queue image (header + descriptor table + rings
    /// with plausible values) so random mutations reach deep paths.
    fn structured(rng: &mut Rng) -> Vec<u8> {
        let mut d = vec![0u8; 0x4000];
        let size_log = rng.below(5) as u8 + 1; // 2..32
        let size = 1u16 << size_log;
        d[0] = size_log;
        d[3] = (rng.next() & 1) as u8;
        let (desc, avail, used) = (0x1000u64, 0x2000u64, 0x3000u64);
        d[8..16].copy_from_slice(&desc.to_le_bytes());
        d[16..24].copy_from_slice(&avail.to_le_bytes());
        d[24..32].copy_from_slice(&used.to_le_bytes());
        for i in 0..u64::from(size) {
            let o = (desc + 16 * i) as usize;
            let flags = [
                0,
                VIRTQ_DESC_F_NEXT,
                VIRTQ_DESC_F_WRITE,
                VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
                VIRTQ_DESC_F_INDIRECT,
            ][rng.below(5) as usize];
            let addr = if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                0x1000 + 16 * rng.below(u64::from(size))
            } else {
                0x8000 + rng.below(0x8000)
            };
            let len = if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                16 * (rng.below(4) as u32 + 1)
            } else {
                rng.below(0x200) as u32
            };
            d[o..o + 8].copy_from_slice(&addr.to_le_bytes());
            d[o + 8..o + 12].copy_from_slice(&len.to_le_bytes());
            d[o + 12..o + 14].copy_from_slice(&flags.to_le_bytes());
            d[o + 14..o + 16].copy_from_slice(&(rng.below(u64::from(size) + 1) as u16).to_le_bytes());
        }
        let n = rng.below(u64::from(size) + 1) as u16;
        d[(avail + 2) as usize..(avail + 4) as usize].copy_from_slice(&n.to_le_bytes());
        for i in 0..u64::from(size) {
            let o = (avail + 4 + 2 * i) as usize;
            d[o..o + 2].copy_from_slice(&(rng.below(u64::from(size) + 2) as u16).to_le_bytes());
        }
        // random byte flips
        for _ in 0..rng.below(8) {
            let i = rng.below(d.len() as u64) as usize;
            d[i] ^= 1 << rng.below(8);
        }
        d
    }

    const ITERATIONS: u64 = 3000;

    /// cargo-fuzz find: an unvalidated queue with its used ring at an odd
    /// address; `add_used` must fail with `RingAccess` (atomic store of
    /// `used.idx` needs alignment), not panic.
    #[test]
    fn fuzz_regression_misaligned_used_ring() {
        let data = [
            0xfb, 0xee, 0x02, 0x00, 0xf4, 0xff, 0xf8, 0xf7, 0x24, 0x00, 0x02, 0xf4, 0xff, 0xf8, 0xf7, 0x24, 0x00, 0x00,
            0x00, 0xf4, 0xff, 0x00, 0x00, 0xf4, 0xff, 0xf8, 0xf7, 0x24,
        ];
        virtqueue(&fuzz_memory(), &data);
        let mem = fuzz_memory();
        let mut q = Queue::new(4);
        q.ready = true;
        q.used_ring = GuestAddress(48513 - 2);
        assert_eq!(q.add_used(&mem, 0, 0), Err(QueueError::RingAccess { what: "used.idx", addr: 48513 }));
    }

    #[test]
    fn virtqueue_survives_random_and_structured_input() {
        let mem = fuzz_memory();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for i in 0..ITERATIONS {
            let data = if i % 2 == 0 {
                structured(&mut rng)
            } else {
                (0..rng.below(0x800)).map(|_| rng.next() as u8).collect()
            };
            virtqueue(&mem, &data);
        }
    }

    /// A driver-like prefix (init + queue 0 setup + DRIVER_OK) followed by
    /// random accesses, so notifications reach activated queues.
    fn mmio_program(rng: &mut Rng) -> Vec<u8> {
        let mut p = Vec::new();
        let mut w = |off: u64, v: u32| {
            p.push(1);
            p.extend_from_slice(&(off as u16).to_le_bytes());
            p.extend_from_slice(&v.to_le_bytes());
        };
        w(reg::STATUS, 1);
        w(reg::STATUS, 3);
        w(reg::DRIVER_FEATURES_SEL, 1);
        w(reg::DRIVER_FEATURES, 1);
        w(reg::DRIVER_FEATURES_SEL, 0);
        w(reg::DRIVER_FEATURES, (rng.next() as u32) & features::VIRTIO_F_INDIRECT_DESC as u32);
        w(reg::STATUS, 11);
        w(reg::QUEUE_NUM, 8);
        w(reg::QUEUE_DESC_LOW, 0x1000);
        w(reg::QUEUE_DRIVER_LOW, 0x2000);
        w(reg::QUEUE_DEVICE_LOW, 0x3000);
        w(reg::QUEUE_READY, 1);
        w(reg::STATUS, 15);
        let regs =
            [0x0u16, 0x14, 0x20, 0x24, 0x30, 0x38, 0x44, 0x50, 0x50, 0x50, 0x64, 0x70, 0x80, 0x90, 0xa0, 0x100, 0x104];
        for _ in 0..rng.below(64) {
            let off =
                if rng.below(4) == 0 { rng.below(0x140) as u16 } else { regs[rng.below(regs.len() as u64) as usize] };
            let v = match rng.below(3) {
                0 => rng.below(4) as u32,
                1 => rng.below(16) as u32,
                _ => rng.next() as u32,
            };
            p.push(rng.next() as u8);
            p.extend_from_slice(&off.to_le_bytes());
            p.extend_from_slice(&v.to_le_bytes());
        }
        // queue contents in the same image: the program bytes overwrite low memory only
        let mut img = structured(rng);
        img[..p.len().min(0x1000)].copy_from_slice(&p[..p.len().min(0x1000)]);
        img.truncate(p.len().max(0x4000));
        // keep the program (chunks of 7) first; the rest of the image follows as data
        let mut out = p;
        out.resize(0x1000 - (0x1000 % 7), 0);
        out.extend_from_slice(&img[0x1000 - (0x1000 % 7)..]);
        out
    }

    #[test]
    fn mmio_register_file_survives_random_access_sequences() {
        let mem = fuzz_memory();
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        for i in 0..ITERATIONS {
            let data = if i % 2 == 0 {
                mmio_program(&mut rng)
            } else {
                (0..rng.below(0x400)).map(|_| rng.next() as u8).collect()
            };
            mmio(&mem, &data);
        }
    }
}
