//! Split virtqueue, device side (VIRTIO 1.2 section 2.7).
//!
//! Layout in guest memory for a queue of `size` entries (2.7, table in 2.6):
//!
//! | part | alignment | bytes |
//! |---|---|---|
//! | descriptor table (2.7.5) | 16 | 16 * size: `addr: le64, len: le32, flags: le16, next: le16` |
//! | available ring (2.7.6) | 2 | 6 + 2 * size: `flags, idx, ring[size], used_event` |
//! | used ring (2.7.8) | 4 | 6 + 8 * size: `flags, idx, ring[size] {id: le32, len: le32}, avail_event` |
//!
//! Everything read from guest memory is untrusted: every descriptor index
//! is checked against the queue (or indirect table) size, every buffer
//! `[addr, addr + len)` against guest memory, chains longer than the table
//! are rejected (this is how a `next` loop is detected, 2.7.5.1: "A driver
//! MUST NOT create a descriptor chain longer than the Queue Size of the
//! device"), and no input leads to a panic.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Descriptor flag: the chain continues at `next` (2.7.5).
pub const VIRTQ_DESC_F_NEXT: u16 = virtio_ring::VRING_DESC_F_NEXT as u16;
/// Descriptor flag: buffer is device-writable (2.7.5).
pub const VIRTQ_DESC_F_WRITE: u16 = virtio_ring::VRING_DESC_F_WRITE as u16;
/// Descriptor flag: buffer holds an indirect descriptor table (2.7.5.3).
pub const VIRTQ_DESC_F_INDIRECT: u16 = virtio_ring::VRING_DESC_F_INDIRECT as u16;
/// Available ring flag: the driver does not want used-buffer interrupts (2.7.7).
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16;
/// Largest split queue size (2.7: "The maximum Queue Size value is
/// 32768"). Ours: `virtio-bindings` has no constant for it.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Size of one descriptor (2.7.5: `struct virtq_desc`, 16 bytes).
const DESC_SIZE: u64 = std::mem::size_of::<virtio_ring::vring_desc>() as u64;

/// Why a descriptor chain was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A head or `next` index is >= the table size.
    #[error("descriptor index {index} out of range (table size {size})")]
    IndexOutOfRange {
        /// The offending index.
        index: u16,
        /// Table size.
        size: u32,
    },
    /// The descriptor itself could not be read.
    #[error("descriptor at {addr:#x} unreadable")]
    DescriptorRead {
        /// Guest physical address of the descriptor.
        addr: u64,
    },
    /// A buffer (or indirect table) is not entirely inside guest RAM.
    #[error("buffer {addr:#x}+{len:#x} outside guest memory")]
    OutOfBounds {
        /// Buffer start.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// More descriptors than the table holds: a `next` loop.
    #[error("chain longer than {limit} descriptors (loop)")]
    TooLong {
        /// The limit (table size).
        limit: u32,
    },
    /// INDIRECT used without VIRTIO_F_INDIRECT_DESC negotiated.
    #[error("indirect descriptor without VIRTIO_F_INDIRECT_DESC")]
    IndirectNotNegotiated,
    /// INDIRECT inside an indirect table (2.7.5.3.1: not allowed).
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    /// INDIRECT together with NEXT (2.7.5.3.1: not allowed).
    #[error("indirect descriptor with NEXT set")]
    IndirectWithNext,
    /// Indirect table length zero, not a multiple of 16, or over 32768 entries.
    #[error("indirect table length {0} invalid")]
    BadIndirectLength(u32),
    /// A device-readable descriptor after a device-writable one (2.7.4.2).
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
}

/// Errors of queue operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The queue is not ready / not activated.
    #[error("queue not ready")]
    NotReady,
    /// Queue configuration rejected by [`Queue::validate`].
    #[error("invalid queue configuration: {0}")]
    InvalidConfig(&'static str),
    /// A ring field could not be read or written.
    #[error("{what} at {addr:#x} inaccessible")]
    RingAccess {
        /// Which field.
        what: &'static str,
        /// Guest physical address.
        addr: u64,
    },
    /// `avail.idx` moved more than `size` entries past what was consumed; the
    /// queue is unusable until reset (device should set DEVICE_NEEDS_RESET).
    #[error("avail idx {avail_idx} is {ahead} entries ahead of {next_avail} (size {size})")]
    AvailIndexJump {
        /// Driver's index.
        avail_idx: u16,
        /// Our next index.
        next_avail: u16,
        /// Distance.
        ahead: u16,
        /// Queue size.
        size: u16,
    },
    /// The chain at `head_index` is malformed. It has been consumed from the
    /// available ring; the device should return it with `add_used(head, 0)`
    /// when `head_index` is in range.
    #[error("chain at head {head_index}: {reason}")]
    InvalidChain {
        /// Head index read from the available ring.
        head_index: u16,
        /// What was wrong.
        reason: ChainError,
    },
    /// `add_used` with a head index >= queue size.
    #[error("used id {0} out of range")]
    UsedIdOutOfRange(u16),
}

/// One validated descriptor: `[addr, addr + len)` is inside guest RAM
/// (or `len` is 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Buffer start (guest physical).
    pub addr: GuestAddress,
    /// Buffer length in bytes.
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    pub writable: bool,
}

/// A validated descriptor chain, indirect tables flattened, device-readable
/// descriptors first (2.7.4.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescriptorChain {
    /// Head index, the id to return in the used ring.
    pub head_index: u16,
    /// The buffers in chain order.
    pub descriptors: Vec<Descriptor>,
}

impl DescriptorChain {
    /// Device-readable buffers (driver -> device).
    pub fn readable(&self) -> impl Iterator<Item = &Descriptor> {
        self.descriptors.iter().filter(|d| !d.writable)
    }
    /// Device-writable buffers (device -> driver).
    pub fn writable(&self) -> impl Iterator<Item = &Descriptor> {
        self.descriptors.iter().filter(|d| d.writable)
    }
    /// Total bytes of device-readable buffers (u64: cannot overflow).
    pub fn readable_len(&self) -> u64 {
        self.readable().map(|d| u64::from(d.len)).sum()
    }
    /// Total bytes of device-writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.writable().map(|d| u64::from(d.len)).sum()
    }
    /// Copy up to `max` bytes of the readable buffers, in order.
    ///
    /// Errors: [`ChainError::OutOfBounds`] (cannot happen for a chain from
    /// [`Queue::pop`] on the same memory).
    pub fn read_all(&self, mem: &GuestMemoryMmap, max: usize) -> Result<Vec<u8>, ChainError> {
        let mut out = Vec::new();
        for d in self.readable() {
            if out.len() >= max {
                break;
            }
            let n = (d.len as usize).min(max - out.len());
            let start = out.len();
            out.resize(start + n, 0);
            mem.read_slice(&mut out[start..], d.addr)
                .map_err(|_| ChainError::OutOfBounds { addr: d.addr.0, len: d.len })?;
        }
        Ok(out)
    }
    /// Write `data` across the writable buffers, in order; returns the
    /// number of bytes written (less than `data.len()` when they are short).
    ///
    /// Errors: [`ChainError::OutOfBounds`].
    pub fn write_all(&self, mem: &GuestMemoryMmap, data: &[u8]) -> Result<usize, ChainError> {
        let mut done = 0;
        for d in self.writable() {
            if done == data.len() {
                break;
            }
            let n = (d.len as usize).min(data.len() - done);
            mem.write_slice(&data[done..done + n], d.addr)
                .map_err(|_| ChainError::OutOfBounds { addr: d.addr.0, len: d.len })?;
            done += n;
        }
        Ok(done)
    }
}

/// What a device did with a chain [`Queue::process_chains`] handed to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainOutcome {
    /// Done: return the chain through the used ring with this many bytes
    /// written into its device-writable buffers (2.7.8), and go on.
    Used(u32),
    /// As [`ChainOutcome::Used`], then stop: the device has nothing more
    /// to give or no room to take more (e.g. its output buffer is full).
    UsedLast(u32),
    /// The device cannot take this chain now (backpressure): it goes back
    /// to the available ring untouched (the next pop returns it again) and
    /// the loop stops.
    Defer,
    /// The device keeps the chain (e.g. partially consumed) and returns it
    /// later itself with [`Queue::add_used`]; the loop stops.
    Keep,
}

/// What one [`Queue::process_chains`] run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Processed {
    /// Chains put in the used ring (handled ones and malformed ones).
    pub used: usize,
    /// Malformed chains ([`QueueError::InvalidChain`]): returned with
    /// length 0, or left out of the used ring when their head index is
    /// out of range (it cannot be named there).
    pub invalid: usize,
    /// The ring-level error that ended the run ([`QueueError::NotReady`],
    /// [`QueueError::AvailIndexJump`], [`QueueError::RingAccess`]); chains
    /// completed before it are in the used ring.
    pub error: Option<QueueError>,
    /// The device ended the run ([`ChainOutcome::UsedLast`],
    /// [`ChainOutcome::Defer`] or [`ChainOutcome::Keep`]).
    pub stopped: bool,
    /// Chains were used and the driver wants a used-buffer notification
    /// ([`Queue::needs_notification`]): the caller raises the interrupt.
    pub notify: bool,
}

/// A split virtqueue: the driver-set configuration (size, ring addresses,
/// ready) plus the device's ring positions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queue {
    /// Largest size the device accepts (QueueNumMax).
    pub max_size: u16,
    /// Size set by the driver (QueueNum); defaults to `max_size`.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address (QueueDesc).
    pub desc_table: GuestAddress,
    /// Available ring address (QueueDriver).
    pub avail_ring: GuestAddress,
    /// Used ring address (QueueDevice).
    pub used_ring: GuestAddress,
    /// VIRTIO_F_INDIRECT_DESC negotiated.
    pub indirect: bool,
    pub(crate) next_avail: Wrapping<u16>,
    pub(crate) next_used: Wrapping<u16>,
}

impl Queue {
    /// A reset queue with QueueNumMax `max_size` (clamped to 1..=32768).
    pub fn new(max_size: u16) -> Self {
        let max_size = max_size.clamp(1, MAX_QUEUE_SIZE);
        Queue {
            max_size,
            size: max_size,
            ready: false,
            desc_table: GuestAddress(0),
            avail_ring: GuestAddress(0),
            used_ring: GuestAddress(0),
            indirect: false,
            next_avail: Wrapping(0),
            next_used: Wrapping(0),
        }
    }

    /// Back to the reset state (not ready, default size, addresses 0).
    pub fn reset(&mut self) {
        *self = Queue::new(self.max_size);
    }

    /// Index of the next available-ring entry the device will consume.
    pub fn next_avail(&self) -> u16 {
        self.next_avail.0
    }

    /// Index the device will write in `used.idx` next.
    pub fn next_used(&self) -> u16 {
        self.next_used.0
    }

    /// Set ring positions (snapshot restore).
    pub fn set_positions(&mut self, next_avail: u16, next_used: u16) {
        self.next_avail = Wrapping(next_avail);
        self.next_used = Wrapping(next_used);
    }

    /// Check the driver's configuration: size a power of two in
    /// 1..=max_size (2.7), each ring aligned (2.7, "Alignment") and
    /// entirely inside guest memory.
    ///
    /// Errors: [`QueueError::InvalidConfig`].
    pub fn validate(&self, mem: &GuestMemoryMmap) -> Result<(), QueueError> {
        let size = u64::from(self.size);
        if self.size == 0 || self.size > self.max_size || !self.size.is_power_of_two() {
            return Err(QueueError::InvalidConfig("size not a power of two within QueueNumMax"));
        }
        let parts = [
            (self.desc_table, u64::from(virtio_ring::VRING_DESC_ALIGN_SIZE), DESC_SIZE * size, "descriptor table"),
            (self.avail_ring, u64::from(virtio_ring::VRING_AVAIL_ALIGN_SIZE), 6 + 2 * size, "available ring"),
            (self.used_ring, u64::from(virtio_ring::VRING_USED_ALIGN_SIZE), 6 + 8 * size, "used ring"),
        ];
        for (addr, align, len, what) in parts {
            if addr.0 % align != 0 {
                return Err(QueueError::InvalidConfig(what));
            }
            if !mem.check_range(addr, len as usize) {
                return Err(QueueError::InvalidConfig(what));
            }
        }
        Ok(())
    }

    fn ring_addr(base: GuestAddress, offset: u64, what: &'static str) -> Result<GuestAddress, QueueError> {
        base.checked_add(offset).ok_or(QueueError::RingAccess { what, addr: base.0 })
    }

    /// The driver's `avail.idx` (acquire load).
    ///
    /// Errors: [`QueueError::RingAccess`].
    pub fn avail_idx(&self, mem: &GuestMemoryMmap) -> Result<u16, QueueError> {
        let addr = Self::ring_addr(self.avail_ring, 2, "avail.idx")?;
        mem.load::<u16>(addr, Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|_| QueueError::RingAccess { what: "avail.idx", addr: addr.0 })
    }

    /// Take the next available chain, if any.
    ///
    /// Returns `Ok(None)` when the ring is empty. A malformed chain is
    /// consumed and reported as [`QueueError::InvalidChain`]; ring-level
    /// corruption ([`QueueError::AvailIndexJump`], [`QueueError::RingAccess`])
    /// consumes nothing.
    pub fn pop(&mut self, mem: &GuestMemoryMmap) -> Result<Option<DescriptorChain>, QueueError> {
        if !self.ready || self.size == 0 {
            return Err(QueueError::NotReady);
        }
        let avail_idx = self.avail_idx(mem)?;
        let ahead = avail_idx.wrapping_sub(self.next_avail.0);
        if ahead == 0 {
            return Ok(None);
        }
        if ahead > self.size {
            return Err(QueueError::AvailIndexJump {
                avail_idx,
                next_avail: self.next_avail.0,
                ahead,
                size: self.size,
            });
        }
        let slot = u64::from(self.next_avail.0 % self.size);
        let addr = Self::ring_addr(self.avail_ring, 4 + 2 * slot, "avail.ring")?;
        let head_index = mem
            .read_obj::<u16>(addr)
            .map(u16::from_le)
            .map_err(|_| QueueError::RingAccess { what: "avail.ring", addr: addr.0 })?;
        self.next_avail += Wrapping(1);
        parse_chain(mem, self.desc_table, u32::from(self.size), head_index, self.indirect)
            .map(Some)
            .map_err(|reason| QueueError::InvalidChain { head_index, reason })
    }

    /// Put chain `head_index` in the used ring with `len` bytes written, then
    /// publish the new `used.idx` (release store, 2.7.8.2).
    ///
    /// Errors: [`QueueError::UsedIdOutOfRange`], [`QueueError::RingAccess`],
    /// [`QueueError::NotReady`].
    pub fn add_used(&mut self, mem: &GuestMemoryMmap, head_index: u16, len: u32) -> Result<(), QueueError> {
        if !self.ready || self.size == 0 {
            return Err(QueueError::NotReady);
        }
        if head_index >= self.size {
            return Err(QueueError::UsedIdOutOfRange(head_index));
        }
        let slot = u64::from(self.next_used.0 % self.size);
        let elem = Self::ring_addr(self.used_ring, 4 + 8 * slot, "used.ring")?;
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&u32::from(head_index).to_le_bytes());
        bytes[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&bytes, elem).map_err(|_| QueueError::RingAccess { what: "used.ring", addr: elem.0 })?;
        self.next_used += Wrapping(1);
        let idx_addr = Self::ring_addr(self.used_ring, 2, "used.idx")?;
        mem.store(self.next_used.0.to_le(), idx_addr, Ordering::Release)
            .map_err(|_| QueueError::RingAccess { what: "used.idx", addr: idx_addr.0 })
    }

    /// The device side of a queue notification, for every device: pop
    /// each available chain and hand it to `handle`, which returns what it
    /// did ([`ChainOutcome`]); put handled chains in the used ring with the
    /// length `handle` returns, and malformed chains (rejected by
    /// [`Queue::pop`]) with length 0 without calling `handle`.
    ///
    /// Bounded: at most `2 * size` chains per call, so a driver refilling
    /// the ring from another vCPU cannot keep the caller here forever (it
    /// notifies again). Stops early when the ring is empty, when `handle`
    /// says so, or at a ring-level error ([`Processed::error`]; nothing is
    /// consumed by the failing step). The caller raises the used-buffer
    /// interrupt when [`Processed::notify`] is set.
    pub fn process_chains<F>(&mut self, mem: &GuestMemoryMmap, mut handle: F) -> Processed
    where
        F: FnMut(DescriptorChain) -> ChainOutcome,
    {
        let mut r = Processed::default();
        if !self.ready || self.size == 0 {
            r.error = Some(QueueError::NotReady);
            return r;
        }
        for _ in 0..u32::from(self.size) * 2 {
            let before = self.next_avail;
            let (head, len, last) = match self.pop(mem) {
                Ok(Some(chain)) => {
                    let head = chain.head_index;
                    match handle(chain) {
                        ChainOutcome::Used(len) => (head, len, false),
                        ChainOutcome::UsedLast(len) => (head, len, true),
                        ChainOutcome::Defer => {
                            self.next_avail = before;
                            r.stopped = true;
                            break;
                        }
                        ChainOutcome::Keep => {
                            r.stopped = true;
                            break;
                        }
                    }
                }
                Ok(None) => break,
                Err(QueueError::InvalidChain { head_index, .. }) => {
                    r.invalid += 1;
                    (head_index, 0, false)
                }
                Err(e) => {
                    r.error = Some(e);
                    break;
                }
            };
            match self.add_used(mem, head, len) {
                Ok(()) => r.used += 1,
                // Only a malformed chain's head can be out of range.
                Err(QueueError::UsedIdOutOfRange(_)) => {}
                Err(e) => {
                    r.error = Some(e);
                    break;
                }
            }
            if last {
                r.stopped = true;
                break;
            }
        }
        r.notify = r.used > 0 && self.needs_notification(mem);
        r
    }

    /// Whether the driver wants an interrupt for used buffers (2.7.7: the
    /// VIRTQ_AVAIL_F_NO_INTERRUPT hint; VIRTIO_F_EVENT_IDX is not offered).
    /// Unreadable flags count as "notify".
    pub fn needs_notification(&self, mem: &GuestMemoryMmap) -> bool {
        mem.load::<u16>(self.avail_ring, Ordering::Acquire)
            .map(|f| u16::from_le(f) & VIRTQ_AVAIL_F_NO_INTERRUPT == 0)
            .unwrap_or(true)
    }
}

fn read_desc(mem: &GuestMemoryMmap, table: GuestAddress, index: u16) -> Result<(u64, u32, u16, u16), ChainError> {
    let addr = table.checked_add(u64::from(index) * DESC_SIZE).ok_or(ChainError::DescriptorRead { addr: table.0 })?;
    let mut raw = [0u8; 16];
    mem.read_slice(&mut raw, addr).map_err(|_| ChainError::DescriptorRead { addr: addr.0 })?;
    let le64 = |b: &[u8]| b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
    Ok((le64(&raw[0..8]), le64(&raw[8..12]) as u32, le64(&raw[12..14]) as u16, le64(&raw[14..16]) as u16))
}

/// Walk and validate the chain starting at `head` in the descriptor table
/// at `table` with `table_size` entries. `allow_indirect` is
/// VIRTIO_F_INDIRECT_DESC. Bounded: at most `table_size` descriptors in the
/// main chain plus at most 32768 in one indirect table.
///
/// Errors: every [`ChainError`].
pub fn parse_chain(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    table_size: u32,
    head: u16,
    allow_indirect: bool,
) -> Result<DescriptorChain, ChainError> {
    let mut descriptors = Vec::new();
    let mut seen_writable = false;
    walk(mem, table, table_size, head, allow_indirect, false, &mut descriptors, &mut seen_writable)?;
    Ok(DescriptorChain { head_index: head, descriptors })
}

#[allow(clippy::too_many_arguments)]
fn walk(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    table_size: u32,
    start: u16,
    allow_indirect: bool,
    in_indirect: bool,
    out: &mut Vec<Descriptor>,
    seen_writable: &mut bool,
) -> Result<(), ChainError> {
    let mut index = start;
    let mut count: u32 = 0;
    loop {
        if u32::from(index) >= table_size {
            return Err(ChainError::IndexOutOfRange { index, size: table_size });
        }
        count += 1;
        if count > table_size {
            return Err(ChainError::TooLong { limit: table_size });
        }
        let (addr, len, flags, next) = read_desc(mem, table, index)?;
        if flags & VIRTQ_DESC_F_INDIRECT != 0 {
            if in_indirect {
                return Err(ChainError::NestedIndirect);
            }
            if !allow_indirect {
                return Err(ChainError::IndirectNotNegotiated);
            }
            if flags & VIRTQ_DESC_F_NEXT != 0 {
                return Err(ChainError::IndirectWithNext);
            }
            if len == 0 || len % DESC_SIZE as u32 != 0 || len / DESC_SIZE as u32 > u32::from(MAX_QUEUE_SIZE) {
                return Err(ChainError::BadIndirectLength(len));
            }
            if !mem.check_range(GuestAddress(addr), len as usize) {
                return Err(ChainError::OutOfBounds { addr, len });
            }
            // The device ignores WRITE on the indirect descriptor itself (2.7.5.3.2).
            return walk(mem, GuestAddress(addr), len / DESC_SIZE as u32, 0, allow_indirect, true, out, seen_writable);
        }
        if len > 0 && !mem.check_range(GuestAddress(addr), len as usize) {
            return Err(ChainError::OutOfBounds { addr, len });
        }
        let writable = flags & VIRTQ_DESC_F_WRITE != 0;
        if writable {
            *seen_writable = true;
        } else if *seen_writable {
            return Err(ChainError::ReadableAfterWritable);
        }
        out.push(Descriptor { addr: GuestAddress(addr), len, writable });
        if flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(());
        }
        index = next;
    }
}
