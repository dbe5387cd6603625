//! A writer for the "newc" cpio format the Linux kernel unpacks as an
//! initramfs (kernel `Documentation/driver-api/early-userspace/buffer-format.rst`).
//!
//! Each entry is a 110-byte ASCII header — magic `070701` and 13 fields of
//! 8 hex digits (ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
//! devminor, rdevmajor, rdevminor, namesize including the NUL, check = 0) —
//! then the NUL-terminated name padded to a multiple of 4 bytes (counting
//! from the header's start), then the file data padded to a multiple of 4.
//! The archive ends with an entry named `TRAILER!!!`.
//!
//! Names are written without a leading `/`; parent directories are created
//! on demand (mode 0755) so every entry's directory exists before it is
//! unpacked. Timestamps are 0 and owners root, so equal inputs give equal
//! archives.

use std::collections::BTreeSet;
use std::io::{self, Write};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Streams a newc archive into `W`.
pub struct CpioWriter<W: Write> {
    out: W,
    /// Bytes written so far (for padding).
    pos: u64,
    next_ino: u32,
    dirs: BTreeSet<String>,
    names: BTreeSet<String>,
    files: usize,
}

impl<W: Write> CpioWriter<W> {
    /// A writer that has written nothing yet.
    pub fn new(out: W) -> Self {
        Self { out, pos: 0, next_ino: 1, dirs: BTreeSet::new(), names: BTreeSet::new(), files: 0 }
    }

    /// Entries written so far (directories, files, links, nodes).
    pub fn entries(&self) -> usize {
        self.files
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.pos
    }

    /// Whether an entry named `path` was written.
    pub fn contains(&self, path: &str) -> bool {
        self.names.contains(norm(path))
    }

    /// A directory with permission bits `perm` (and any missing parents, 0755).
    /// Writing the same directory twice is a no-op.
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        let p = norm(path);
        if p.is_empty() || self.dirs.contains(p) {
            return Ok(());
        }
        self.parents(p)?;
        self.dirs.insert(p.to_string());
        self.entry(p, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// A regular file with `data` and permission bits `perm`.
    ///
    /// Errors: `AlreadyExists` if `path` was written before.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let p = norm(path);
        self.parents(p)?;
        self.entry(p, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// A symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let p = norm(path);
        self.parents(p)?;
        self.entry(p, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// A character device node (e.g. `dev/console`, 5:1).
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        let p = norm(path);
        self.parents(p)?;
        self.entry(p, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the `TRAILER!!!` entry, flushes and returns the sink.
    pub fn finish(mut self) -> io::Result<W> {
        self.raw_entry("TRAILER!!!", 0, 0, 1, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn parents(&mut self, p: &str) -> io::Result<()> {
        check_name(p)?;
        if let Some((parent, _)) = p.rsplit_once('/') {
            if !self.dirs.contains(parent) {
                self.dir(parent, 0o755)?;
            }
        }
        Ok(())
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        check_name(name)?;
        if !self.names.insert(name.to_string()) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("duplicate cpio entry {name:?}")));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.files += 1;
        self.raw_entry(name, ino, mode, nlink, rdev, data)
    }

    fn raw_entry(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file larger than 4 GiB"))?;
        let header = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() + 1,
            0, // check
        );
        debug_assert_eq!(header.len(), 110);
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = ((4 - (self.pos % 4)) % 4) as usize;
        self.put(&[0u8; 3][..n])
    }
}

fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad cpio path {name:?}")));
    }
    Ok(())
}

fn norm(path: &str) -> &str {
    path.trim_start_matches('/').trim_end_matches('/')
}

/// One entry read back by [`parse`] (tests and diagnostics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Name as stored (no leading `/`).
    pub name: String,
    /// Full mode (type and permission bits).
    pub mode: u32,
    /// Link count.
    pub nlink: u32,
    /// Device numbers of a device node.
    pub rdev: (u32, u32),
    /// File data or symlink target.
    pub data: Vec<u8>,
    /// Offset of the header in the archive.
    pub offset: usize,
}

/// Parses a newc archive up to its trailer (which is not returned).
///
/// Errors: bad magic, truncated data, a missing trailer, a name without NUL.
pub fn parse(buf: &[u8]) -> anyhow::Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let field = |h: &[u8], i: usize| -> anyhow::Result<u32> {
        let s = std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i])?;
        Ok(u32::from_str_radix(s, 16)?)
    };
    loop {
        anyhow::ensure!(pos & 3 == 0, "entry at {pos} is not 4-byte aligned");
        anyhow::ensure!(buf.len() >= pos + 110, "truncated header at {pos} (no trailer)");
        let h = &buf[pos..pos + 110];
        anyhow::ensure!(&h[..6] == b"070701", "bad magic at {pos}");
        let mode = field(h, 1)?;
        let nlink = field(h, 4)?;
        let size = field(h, 6)? as usize;
        let rdev = (field(h, 9)?, field(h, 10)?);
        let namesize = field(h, 11)? as usize;
        let name_start = pos + 110;
        anyhow::ensure!(namesize >= 1 && buf.len() >= name_start + namesize, "truncated name at {pos}");
        let name_raw = &buf[name_start..name_start + namesize];
        anyhow::ensure!(name_raw[namesize - 1] == 0, "name at {pos} is not NUL-terminated");
        let name = String::from_utf8(name_raw[..namesize - 1].to_vec())?;
        let data_start = (name_start + namesize).div_ceil(4) * 4;
        anyhow::ensure!(buf.len() >= data_start + size, "truncated data of {name:?}");
        if name == "TRAILER!!!" {
            return Ok(out);
        }
        out.push(Entry { name, mode, nlink, rdev, data: buf[data_start..data_start + size].to_vec(), offset: pos });
        pos = (data_start + size).div_ceil(4) * 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_alignment_and_trailer() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/init", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.file("/lib/modules/capvisor/a.ko", 0o644, &[1, 2, 3]).unwrap();
        w.symlink("/bin/sh", "/bin/busybox").unwrap();
        w.dir("/tmp", 0o1777).unwrap();
        w.dir("/tmp", 0o1777).unwrap(); // idempotent
        w.char_dev("/dev/console", 0o600, 5, 1).unwrap();
        assert!(w.file("init", 0o755, b"again").is_err(), "duplicates are refused");
        assert!(w.file("a/../b", 0o644, b"").is_err(), "dot-dot is refused");
        let buf = w.finish().unwrap();
        assert_eq!(buf.len() % 4, 0);
        // The trailer is the last header.
        let tail = String::from_utf8_lossy(&buf[buf.len().saturating_sub(124)..]).into_owned();
        assert!(tail.contains("TRAILER!!!"), "{tail:?}");

        let entries = parse(&buf).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "init",
                "lib",
                "lib/modules",
                "lib/modules/capvisor",
                "lib/modules/capvisor/a.ko",
                "bin",
                "bin/sh",
                "tmp",
                "dev",
                "dev/console"
            ]
        );
        for e in &entries {
            assert_eq!(e.offset % 4, 0, "{} misaligned", e.name);
        }
        let init = &entries[0];
        assert_eq!(init.mode, S_IFREG | 0o755);
        assert_eq!(init.data, b"#!/bin/sh\necho hi\n");
        assert_eq!(entries[4].data, [1, 2, 3]);
        let sh = entries.iter().find(|e| e.name == "bin/sh").unwrap();
        assert_eq!(sh.mode, S_IFLNK | 0o777);
        assert_eq!(sh.data, b"/bin/busybox");
        let tmp = entries.iter().find(|e| e.name == "tmp").unwrap();
        assert_eq!(tmp.mode, S_IFDIR | 0o1777);
        let con = entries.iter().find(|e| e.name == "dev/console").unwrap();
        assert_eq!((con.mode, con.rdev), (S_IFCHR | 0o600, (5, 1)));
    }

    #[test]
    fn parse_rejects_missing_trailer() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("x", 0o644, b"abc").unwrap();
        let mut buf = w.finish().unwrap();
        buf.truncate(buf.len() - 120);
        assert!(parse(&buf).is_err());
    }
}
