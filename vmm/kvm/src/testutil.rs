//! Test helpers: guest memory, a virtqueue builder writing driver-side
//! structures, a tiny x86_64 assembler, a recording virtio device and a
//! recording port device.

use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::virtio::queue::{ChainOutcome, Queue};
use crate::devices::virtio::snapshot::VirtioDeviceState;
use crate::devices::virtio::{ActivateContext, ActivateError, VirtioDevice, INT_USED_RING};
use crate::devices::{Device, DeviceState, IoAction};

/// `size` bytes of guest RAM at 0.
pub fn mem(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// Driver-side view of a split queue laid out at fixed addresses.
pub struct DriverQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub avail_idx: u16,
}

impl DriverQueue {
    /// Queue of `size` entries: descriptors at `base`, avail at base+0x1000*k, used after.
    pub fn new(size: u16, base: u64) -> Self {
        let desc = base;
        let avail = base + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        DriverQueue { size, desc, avail, used, avail_idx: 0 }
    }

    pub fn set_desc(&self, m: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc(m, self.desc, i, addr, len, flags, next);
    }

    /// Offer `head` in the avail ring and bump avail.idx.
    pub fn offer(&mut self, m: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        m.write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        m.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2)).unwrap();
    }

    pub fn used_idx(&self, m: &GuestMemoryMmap) -> u16 {
        m.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// (id, len) of used entry `slot`.
    pub fn used_elem(&self, m: &GuestMemoryMmap, slot: u16) -> (u32, u32) {
        let a = self.used + 4 + 8 * u64::from(slot % self.size);
        (m.read_obj(GuestAddress(a)).unwrap(), m.read_obj(GuestAddress(a + 4)).unwrap())
    }

    /// A device-side queue configured to match.
    pub fn device_queue(&self) -> Queue {
        let mut q = Queue::new(self.size);
        q.size = self.size;
        q.desc_table = GuestAddress(self.desc);
        q.avail_ring = GuestAddress(self.avail);
        q.used_ring = GuestAddress(self.used);
        q.ready = true;
        q
    }
}

pub fn write_desc(m: &GuestMemoryMmap, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let a = GuestAddress(table + 16 * u64::from(i));
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    m.write_slice(&raw, a).unwrap();
}

/// What the recording virtio device saw.
#[derive(Debug, Default)]
pub struct TestDeviceLog {
    pub notifications: Vec<u16>,
    pub activations: u32,
    pub resets: u32,
    pub acked_features: u64,
    /// Readable bytes of every chain processed.
    pub requests: Vec<Vec<u8>>,
    pub chain_errors: u32,
}

/// A virtio device (id configurable) that records notifications and, on
/// each notify, consumes every available chain of that queue: records its
/// readable bytes, writes b"ack" into the writable part and returns it.
pub struct TestDevice {
    pub id: u32,
    pub features: u64,
    pub max_sizes: Vec<u16>,
    pub config: Vec<u8>,
    pub log: Arc<Mutex<TestDeviceLog>>,
    pub active: Option<ActivateContext>,
}

impl TestDevice {
    pub fn new(id: u32, features: u64) -> (Self, Arc<Mutex<TestDeviceLog>>) {
        let log = Arc::new(Mutex::new(TestDeviceLog::default()));
        (
            TestDevice {
                id,
                features,
                max_sizes: vec![16, 8],
                config: (0..16).collect(),
                log: log.clone(),
                active: None,
            },
            log,
        )
    }
}

impl VirtioDevice for TestDevice {
    fn device_type(&self) -> u32 {
        self.id
    }
    fn device_features(&self) -> u64 {
        self.features
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) =
                usize::try_from(offset).ok().and_then(|o| o.checked_add(i)).and_then(|o| self.config.get_mut(o))
            {
                *slot = *b;
            }
        }
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let mut log = self.log.lock().unwrap();
        log.activations += 1;
        log.acked_features = ctx.acked_features;
        self.active = Some(ctx);
        Ok(())
    }
    fn queue_notify(&mut self, index: u16) {
        let mut log = self.log.lock().unwrap();
        log.notifications.push(index);
        let Some(ctx) = self.active.as_mut() else { return };
        let Some(q) = ctx.queues.get_mut(usize::from(index)) else { return };
        if !q.ready {
            return;
        }
        let r = q.process_chains(&ctx.mem, |chain| {
            log.requests.push(chain.read_all(&ctx.mem, 1 << 20).unwrap_or_default());
            ChainOutcome::Used(chain.write_all(&ctx.mem, b"ack").unwrap_or(0) as u32)
        });
        log.chain_errors += r.invalid as u32 + u32::from(r.error.is_some());
        if r.notify {
            ctx.interrupt.signal_used_queue();
            debug_assert!(ctx.interrupt.status() & INT_USED_RING != 0);
        }
    }
    fn reset(&mut self) {
        self.log.lock().unwrap().resets += 1;
        self.active = None;
    }
    fn snapshot(&self) -> VirtioDeviceState {
        VirtioDeviceState::Stateless
    }
    fn active_queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |c| c.queues.as_slice())
    }
}

/// A port/MMIO device recording every write as (offset, little-endian value).
#[derive(Default)]
pub struct Recorder {
    pub writes: Vec<(u64, u64)>,
}

impl Device for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> IoAction {
        let v = data.iter().rev().fold(0u64, |a, &b| (a << 8) | u64::from(b));
        self.writes.push((offset, v));
        IoAction::None
    }
    fn snapshot(&self) -> DeviceState {
        DeviceState::Stateless
    }
}

/// A tiny x86_64 assembler for the handful of instructions the KVM tests
/// use. Every method documents its encoding (Intel SDM Vol. 2).
#[derive(Default)]
pub struct Asm {
    pub code: Vec<u8>,
}

impl Asm {
    fn emit(&mut self, b: &[u8]) -> &mut Self {
        self.code.extend_from_slice(b);
        self
    }
    fn imm32(&mut self, opcode: u8, v: u32) -> &mut Self {
        self.code.push(opcode);
        self.code.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// `mov eax, imm32` = B8 id (zero-extends into RAX in 64-bit mode).
    pub fn mov_eax(&mut self, v: u32) -> &mut Self {
        self.imm32(0xb8, v)
    }
    /// `mov ebx, imm32` = BB id (zero-extends into RBX).
    pub fn mov_ebx(&mut self, v: u32) -> &mut Self {
        self.imm32(0xbb, v)
    }
    /// `mov edx, imm32` = BA id (port number for `out dx`).
    pub fn mov_edx(&mut self, v: u32) -> &mut Self {
        self.imm32(0xba, v)
    }
    /// `mov al, imm8` = B0 ib.
    pub fn mov_al(&mut self, v: u8) -> &mut Self {
        self.emit(&[0xb0, v])
    }
    /// `out dx, al` = EE.
    pub fn out_dx_al(&mut self) -> &mut Self {
        self.emit(&[0xee])
    }
    /// `out dx, eax` = EF.
    pub fn out_dx_eax(&mut self) -> &mut Self {
        self.emit(&[0xef])
    }
    /// `mov eax, dword [rbx]` = 8B 03 (ModRM 00 000 011).
    pub fn load_eax_from_rbx(&mut self) -> &mut Self {
        self.emit(&[0x8b, 0x03])
    }
    /// `mov dword [rbx], eax` = 89 03.
    pub fn store_eax_to_rbx(&mut self) -> &mut Self {
        self.emit(&[0x89, 0x03])
    }
    /// `in al, dx` = EC.
    pub fn in_al_dx(&mut self) -> &mut Self {
        self.emit(&[0xec])
    }
    /// `hlt` = F4.
    pub fn hlt(&mut self) -> &mut Self {
        self.emit(&[0xf4])
    }
    /// `jmp $` = EB FE (spin forever).
    pub fn spin(&mut self) -> &mut Self {
        self.emit(&[0xeb, 0xfe])
    }
    /// Print `s` byte by byte to port `port`: `mov edx, port` then `mov al, b; out dx, al` per byte.
    pub fn print(&mut self, port: u16, s: &[u8]) -> &mut Self {
        self.mov_edx(u32::from(port));
        for &b in s {
            self.mov_al(b).out_dx_al();
        }
        self
    }
    /// 32-bit MMIO read of `addr` into EAX: `mov ebx, addr; mov eax, [rbx]`.
    pub fn mmio_read32(&mut self, addr: u32) -> &mut Self {
        self.mov_ebx(addr).load_eax_from_rbx()
    }
    /// 32-bit MMIO write: `mov ebx, addr; mov eax, v; mov [rbx], eax`.
    pub fn mmio_write32(&mut self, addr: u32, v: u32) -> &mut Self {
        self.mov_ebx(addr).mov_eax(v).store_eax_to_rbx()
    }
    /// Report EAX on port `port` (32-bit `out`): `mov edx, port; out dx, eax`.
    pub fn report_eax(&mut self, port: u16) -> &mut Self {
        self.mov_edx(u32::from(port)).out_dx_eax()
    }
}

/// Whether a KVM test must skip (no usable /dev/kvm); says so on stderr.
pub fn skip() -> bool {
    if !crate::hypervisor::kvm::kvm_available() {
        eprintln!("skipped: /dev/kvm is absent");
        return true;
    }
    false
}

/// xorshift64*: a deterministic, seedable generator for the PRNG-driven
/// fuzz tests (the same inputs on every run).
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
