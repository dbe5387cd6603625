//! virtio-blk (VIRTIO 1.2 section 5.2): request parsing and execution
//! against a raw disk image.
//!
//! One request queue (5.2.2). Every request is a descriptor chain (5.2.6):
//!
//! ```text
//! struct virtio_blk_req {
//!     le32 type;          // device-readable header, 16 bytes
//!     le32 reserved;
//!     le64 sector;        // in 512-byte units, whatever blk_size says
//!     u8   data[];        // readable for OUT, writable for IN / GET_ID
//!     u8   status;        // the last device-writable byte
//! }
//! ```
//!
//! The chain is parsed as two byte streams (2.6.4 "Message Framing": the
//! device must not assume a particular arrangement of descriptors): the
//! device-readable stream holds the 16-byte header followed, for OUT, by
//! the data; the device-writable stream holds, for IN / GET_ID, the data
//! followed by the 1-byte status, which is always the last writable byte.
//!
//! Everything in the chain is guest-controlled, so every request is
//! checked before any disk access:
//!
//! * no device-writable byte at all -> there is nowhere to put a status;
//!   the chain is returned with used length 0 ([`Completion::status`] `None`);
//! * header shorter than 16 bytes, data in the wrong direction (readable
//!   data for IN, writable data for OUT / FLUSH), a data length that is
//!   not a multiple of 512, `sector * 512 + len` overflowing or past the
//!   end of the disk -> `VIRTIO_BLK_S_IOERR`;
//! * OUT on a read-only disk -> `VIRTIO_BLK_S_IOERR` without touching the
//!   image (5.2.6.1: "A device MUST set the status byte to
//!   VIRTIO_BLK_S_IOERR for a write request if the VIRTIO_BLK_F_RO feature
//!   if offered, and MUST NOT write any data");
//! * unknown request types (DISCARD, WRITE_ZEROES, ... are not offered)
//!   -> `VIRTIO_BLK_S_UNSUPP` (5.2.6.1).
//!
//! Data moves between guest memory and the image through a bounded bounce
//! buffer ([`BOUNCE_LEN`]) with positional I/O (`pread`/`pwrite` through
//! [`std::os::unix::fs::FileExt`]), so a request's size never decides how
//! much host memory is allocated.

pub mod io;
pub mod snapshot;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::queue::{ChainOutcome, Descriptor, DescriptorChain, Processed, Queue};

/// Sector size of `sector` in the request header (5.2.6: always 512
/// bytes). Ours: `virtio-bindings` has no constant for it.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the request header `type, reserved, sector` (5.2.6:
/// `struct virtio_blk_outhdr`).
pub const REQUEST_HEADER_LEN: u64 = std::mem::size_of::<virtio_bindings::virtio_blk::virtio_blk_outhdr>() as u64;
/// Length of the GET_ID string (5.2.6: `VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;
/// QueueNumMax of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// `seg_max` advertised in the configuration (5.2.4): data segments per
/// request; the header and the status need two more descriptors, so a
/// driver without indirect descriptors still fits a full ring.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Bounce buffer between guest memory and the image.
pub const BOUNCE_LEN: usize = 64 << 10;

/// Feature bits (VIRTIO 1.2 section 5.2.3) as masks; the bit numbers come
/// from `virtio-bindings` (`virtio_blk::VIRTIO_BLK_F_*`).
pub mod feature {
    use virtio_bindings::virtio_blk as b;
    /// Maximum size of any single segment is in `size_max`.
    pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << b::VIRTIO_BLK_F_SIZE_MAX;
    /// Maximum number of segments in a request is in `seg_max`.
    pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << b::VIRTIO_BLK_F_SEG_MAX;
    /// Disk-style geometry in `geometry`.
    pub const VIRTIO_BLK_F_GEOMETRY: u64 = 1 << b::VIRTIO_BLK_F_GEOMETRY;
    /// The device is read-only.
    pub const VIRTIO_BLK_F_RO: u64 = 1 << b::VIRTIO_BLK_F_RO;
    /// Block size of the disk is in `blk_size`.
    pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << b::VIRTIO_BLK_F_BLK_SIZE;
    /// Cache flush command support.
    pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << b::VIRTIO_BLK_F_FLUSH;
    /// Topology information in `topology`.
    pub const VIRTIO_BLK_F_TOPOLOGY: u64 = 1 << b::VIRTIO_BLK_F_TOPOLOGY;
    /// Writeback / writethrough cache mode in `writeback`.
    pub const VIRTIO_BLK_F_CONFIG_WCE: u64 = 1 << b::VIRTIO_BLK_F_CONFIG_WCE;
    /// Discard command support.
    pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << b::VIRTIO_BLK_F_DISCARD;
    /// Write zeroes command support.
    pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << b::VIRTIO_BLK_F_WRITE_ZEROES;
}

/// Request types (VIRTIO 1.2 section 5.2.6), from `virtio-bindings`.
pub mod request_type {
    use virtio_bindings::virtio_blk as b;
    /// Read.
    pub const VIRTIO_BLK_T_IN: u32 = b::VIRTIO_BLK_T_IN;
    /// Write.
    pub const VIRTIO_BLK_T_OUT: u32 = b::VIRTIO_BLK_T_OUT;
    /// Flush the write cache.
    pub const VIRTIO_BLK_T_FLUSH: u32 = b::VIRTIO_BLK_T_FLUSH;
    /// Device id string.
    pub const VIRTIO_BLK_T_GET_ID: u32 = b::VIRTIO_BLK_T_GET_ID;
    /// Discard (not offered).
    pub const VIRTIO_BLK_T_DISCARD: u32 = b::VIRTIO_BLK_T_DISCARD;
    /// Write zeroes (not offered).
    pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = b::VIRTIO_BLK_T_WRITE_ZEROES;
}

/// Status byte values (VIRTIO 1.2 section 5.2.6), from `virtio-bindings`.
pub mod status_code {
    use virtio_bindings::virtio_blk as b;
    /// Success.
    pub const VIRTIO_BLK_S_OK: u8 = b::VIRTIO_BLK_S_OK as u8;
    /// Device or driver error.
    pub const VIRTIO_BLK_S_IOERR: u8 = b::VIRTIO_BLK_S_IOERR as u8;
    /// Request unsupported by the device.
    pub const VIRTIO_BLK_S_UNSUPP: u8 = b::VIRTIO_BLK_S_UNSUPP as u8;
}

use request_type::*;
use status_code::*;

/// Positional access to a raw disk image. Offsets handed to it are always
/// inside `[0, len())` together with the buffer length.
pub trait DiskImage: Send {
    /// Image size in bytes (the device exposes `len / 512` sectors).
    fn len(&self) -> u64;
    /// Whether the image has no complete sector.
    fn is_empty(&self) -> bool {
        self.len() < SECTOR_SIZE
    }
    /// Fill `buf` from `offset`.
    ///
    /// Errors: I/O failure or a short image.
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    /// Write all of `buf` at `offset`.
    ///
    /// Errors: I/O failure.
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    /// Make completed writes durable (VIRTIO_BLK_T_FLUSH).
    ///
    /// Errors: I/O failure.
    fn flush(&mut self) -> std::io::Result<()>;
}

/// A raw image in a host file, accessed with `pread`/`pwrite`.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    len: u64,
}

impl RawFile {
    /// Wrap `file`; its current size is the disk size.
    ///
    /// Errors: `fstat` failure.
    pub fn new(file: File) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(RawFile { file, len })
    }
}

impl DiskImage for RawFile {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(&self.file, buf, offset)
    }
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        FileExt::write_all_at(&self.file, buf, offset)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// An in-memory image (tests, fuzzing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemImage(pub Vec<u8>);

impl MemImage {
    fn range(&self, offset: u64, len: usize) -> std::io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| std::io::ErrorKind::UnexpectedEof)?;
        let end = start.checked_add(len).filter(|&e| e <= self.0.len()).ok_or(std::io::ErrorKind::UnexpectedEof)?;
        Ok(start..end)
    }
}

impl DiskImage for MemImage {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.0[r]);
        Ok(())
    }
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let r = self.range(offset, buf.len())?;
        self.0[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The pieces `(address, length)` of bytes `[start, start + len)` of the
/// byte stream formed by `descs` in order (2.6.4: requests are byte
/// streams, independent of how the driver split them into descriptors).
/// Bytes past the end of the stream are not returned.
pub fn stream_segments<'a>(
    descs: impl Iterator<Item = &'a Descriptor>,
    start: u64,
    len: u64,
) -> Vec<(GuestAddress, u32)> {
    let end = start.saturating_add(len);
    let mut out = Vec::new();
    let mut pos = 0u64;
    for d in descs {
        let (d_start, d_end) = (pos, pos.saturating_add(u64::from(d.len)));
        pos = d_end;
        if d_end <= start {
            continue;
        }
        if d_start >= end {
            break;
        }
        let (s, e) = (start.max(d_start), end.min(d_end));
        if let (Some(addr), Ok(n)) = (d.addr.checked_add(s - d_start), u32::try_from(e - s)) {
            if n > 0 {
                out.push((addr, n));
            }
        }
    }
    out
}

/// Copy bytes `[start, start + max)` of the device-readable stream of
/// `chain` (fewer when the stream is shorter).
///
/// `None` when a guest memory access failed (not for chains popped from a
/// validated queue on the same memory).
pub fn read_stream(mem: &GuestMemoryMmap, chain: &DescriptorChain, start: u64, max: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for (addr, n) in stream_segments(chain.readable(), start, max as u64) {
        let at = out.len();
        out.resize(at + n as usize, 0);
        mem.read_slice(&mut out[at..], addr).ok()?;
    }
    Some(out)
}

/// What happened to a request: the status byte written (`None` when the
/// chain had no device-writable byte to hold it) and the used length to
/// return with the chain (2.7.8: bytes written into device-writable
/// buffers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The status written as the last writable byte, if there was one.
    pub status: Option<u8>,
    /// Length for the used ring.
    pub used_len: u32,
}

/// Why a request failed (diagnostics; the guest sees only the status).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No device-writable byte: nowhere to put the status.
    #[error("no device-writable status byte")]
    NoStatus,
    /// Fewer than 16 device-readable bytes.
    #[error("request header shorter than 16 bytes")]
    HeaderTooShort,
    /// Data buffers in the wrong direction for the request type.
    #[error("data buffers in the wrong direction for request type {0}")]
    DataDirection(u32),
    /// Data length not a multiple of 512.
    #[error("data length {0} not a multiple of 512")]
    Unaligned(u64),
    /// `sector * 512 + len` overflows or is past the end of the disk.
    #[error("sector {sector} + {len} bytes outside the disk")]
    OutOfRange {
        /// Header sector.
        sector: u64,
        /// Data length in bytes.
        len: u64,
    },
    /// OUT on a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// Request type not supported.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// The image returned an error.
    #[error("disk I/O error: {0:?}")]
    Io(std::io::ErrorKind),
    /// A guest memory access failed.
    #[error("guest memory access failed")]
    Memory,
}

impl RequestError {
    /// The status byte reporting this error (5.2.6).
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// Counters for diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Requests completed with VIRTIO_BLK_S_OK.
    pub ok: u64,
    /// Requests completed with IOERR or UNSUPP.
    pub failed: u64,
    /// Chains returned without a status (no writable byte, or rejected by
    /// the virtqueue layer).
    pub dropped: u64,
}

/// A disk and the request engine in front of it (the device state machine
/// without the transport plumbing, see [`io::VirtioBlock`]).
pub struct BlockDisk {
    image: Box<dyn DiskImage>,
    read_only: bool,
    id: [u8; ID_BYTES],
    bounce: Vec<u8>,
    /// Counters.
    pub stats: BlockStats,
    /// Last request error, for diagnostics.
    pub last_error: Option<RequestError>,
}

impl std::fmt::Debug for BlockDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockDisk")
            .field("capacity", &self.capacity())
            .field("read_only", &self.read_only)
            .field("stats", &self.stats)
            .finish()
    }
}

impl BlockDisk {
    /// A disk over `image`; `id` is the GET_ID string (truncated to 20
    /// bytes, NUL-padded).
    pub fn new(image: Box<dyn DiskImage>, read_only: bool, id: &[u8]) -> Self {
        let mut idb = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        idb[..n].copy_from_slice(&id[..n]);
        BlockDisk { image, read_only, id: idb, bounce: Vec::new(), stats: BlockStats::default(), last_error: None }
    }

    /// Capacity in 512-byte sectors (`capacity`, 5.2.4); a partial last
    /// sector of the image is not exposed.
    pub fn capacity(&self) -> u64 {
        self.image.len() / SECTOR_SIZE
    }
    /// Read-only (VIRTIO_BLK_F_RO).
    pub fn read_only(&self) -> bool {
        self.read_only
    }
    /// The GET_ID string, NUL-padded.
    pub fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// Execute the request in `chain` and write its status. Never panics;
    /// see the module docs for what is checked.
    pub fn execute(&mut self, mem: &GuestMemoryMmap, chain: &DescriptorChain) -> Completion {
        let writable_len = chain.writable_len();
        // The status is the last device-writable byte.
        let status_at = writable_len
            .checked_sub(1)
            .and_then(|last| stream_segments(chain.writable(), last, 1).first().map(|s| s.0));
        let Some(status_at) = status_at else {
            self.stats.dropped += 1;
            self.last_error = Some(RequestError::NoStatus);
            return Completion { status: None, used_len: 0 };
        };
        let (status, written) = match self.run(mem, chain, writable_len - 1) {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(e) => {
                self.last_error = Some(e);
                (e.status(), 0)
            }
        };
        if mem.write_obj(status, status_at).is_err() {
            self.stats.dropped += 1;
            self.last_error = Some(RequestError::Memory);
            return Completion { status: None, used_len: 0 };
        }
        if status == VIRTIO_BLK_S_OK {
            self.stats.ok += 1;
        } else {
            self.stats.failed += 1;
        }
        // data bytes written + the status byte; cannot exceed u32 for a
        // chain whose writable part fits the data + status.
        let used_len = u32::try_from(written.saturating_add(1)).unwrap_or(u32::MAX);
        Completion { status: Some(status), used_len }
    }

    /// Run the request; `data_in_len` is the writable stream minus the
    /// status byte. Returns the number of data bytes written to the
    /// writable stream.
    fn run(&mut self, mem: &GuestMemoryMmap, chain: &DescriptorChain, data_in_len: u64) -> Result<u64, RequestError> {
        let readable_len = chain.readable_len();
        if readable_len < REQUEST_HEADER_LEN {
            return Err(RequestError::HeaderTooShort);
        }
        let header = read_stream(mem, chain, 0, REQUEST_HEADER_LEN as usize).ok_or(RequestError::Memory)?;
        let le = |b: &[u8]| b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
        let request_type = le(header.get(0..4).unwrap_or(&[])) as u32;
        let sector = le(header.get(8..16).unwrap_or(&[]));
        let data_out_len = readable_len - REQUEST_HEADER_LEN;
        match request_type {
            VIRTIO_BLK_T_IN => {
                if data_out_len != 0 {
                    return Err(RequestError::DataDirection(request_type));
                }
                let offset = self.check_range(sector, data_in_len)?;
                self.read_into(mem, chain, offset, data_in_len)?;
                Ok(data_in_len)
            }
            VIRTIO_BLK_T_OUT => {
                if data_in_len != 0 {
                    return Err(RequestError::DataDirection(request_type));
                }
                if self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                let offset = self.check_range(sector, data_out_len)?;
                self.write_from(mem, chain, offset, data_out_len)?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if data_in_len != 0 || data_out_len != 0 {
                    return Err(RequestError::DataDirection(request_type));
                }
                if !self.read_only {
                    self.image.flush().map_err(|e| RequestError::Io(e.kind()))?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                if data_out_len != 0 {
                    return Err(RequestError::DataDirection(request_type));
                }
                // NUL-padded, no terminator when 20 bytes long (5.2.6).
                let n = usize::try_from(data_in_len).unwrap_or(usize::MAX).min(ID_BYTES);
                let mut done = 0usize;
                for (addr, len) in stream_segments(chain.writable(), 0, n as u64) {
                    let len = len as usize;
                    mem.write_slice(&self.id[done..done + len], addr).map_err(|_| RequestError::Memory)?;
                    done += len;
                }
                Ok(done as u64)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// Byte offset of `sector` after checking `[sector * 512, + len)` is a
    /// whole number of sectors inside the disk.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        if len % SECTOR_SIZE != 0 {
            return Err(RequestError::Unaligned(len));
        }
        sector
            .checked_mul(SECTOR_SIZE)
            .filter(|&off| off.checked_add(len).is_some_and(|end| end <= self.capacity() * SECTOR_SIZE))
            .ok_or(RequestError::OutOfRange { sector, len })
    }

    fn bounce(&mut self) -> Vec<u8> {
        let mut b = std::mem::take(&mut self.bounce);
        b.resize(BOUNCE_LEN, 0);
        b
    }

    /// Disk `[offset, offset + len)` -> the first `len` writable bytes.
    fn read_into(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: &DescriptorChain,
        offset: u64,
        len: u64,
    ) -> Result<(), RequestError> {
        let mut buf = self.bounce();
        let r = (|| {
            let mut pos = offset;
            for (addr, n) in stream_segments(chain.writable(), 0, len) {
                let mut done = 0usize;
                while done < n as usize {
                    let k = (n as usize - done).min(buf.len());
                    self.image.read_exact_at(&mut buf[..k], pos).map_err(|e| RequestError::Io(e.kind()))?;
                    let at = addr.checked_add(done as u64).ok_or(RequestError::Memory)?;
                    mem.write_slice(&buf[..k], at).map_err(|_| RequestError::Memory)?;
                    done += k;
                    pos += k as u64;
                }
            }
            Ok(())
        })();
        self.bounce = buf;
        r
    }

    /// Readable bytes after the header -> disk `[offset, offset + len)`.
    fn write_from(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: &DescriptorChain,
        offset: u64,
        len: u64,
    ) -> Result<(), RequestError> {
        let mut buf = self.bounce();
        let r = (|| {
            let mut pos = offset;
            for (addr, n) in stream_segments(chain.readable(), REQUEST_HEADER_LEN, len) {
                let mut done = 0usize;
                while done < n as usize {
                    let k = (n as usize - done).min(buf.len());
                    let at = addr.checked_add(done as u64).ok_or(RequestError::Memory)?;
                    mem.read_slice(&mut buf[..k], at).map_err(|_| RequestError::Memory)?;
                    self.image.write_all_at(&buf[..k], pos).map_err(|e| RequestError::Io(e.kind()))?;
                    done += k;
                    pos += k as u64;
                }
            }
            Ok(())
        })();
        self.bounce = buf;
        r
    }

    /// Consume every available chain of `queue` with
    /// [`Queue::process_chains`]: execute it and return it through the used
    /// ring; malformed chains (rejected by the virtqueue layer) are
    /// returned with length 0 and counted in [`BlockStats::dropped`]. At
    /// most `2 * queue.size` chains per call (the driver notifies again).
    /// The caller raises the used-buffer interrupt when
    /// [`Processed::notify`] is set; a ring-level error ends the run
    /// ([`Processed::error`]), with the chains completed before it in the
    /// used ring.
    pub fn process_queue(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue) -> Processed {
        let r = queue.process_chains(mem, |chain| ChainOutcome::Used(self.execute(mem, &chain).used_len));
        self.stats.dropped += r.invalid as u64;
        r
    }
}
