//! Extracting the uncompressed ELF `vmlinux` from an x86 bzImage (`vmlinuz`).
//!
//! The bzImage layout is the x86 boot protocol (kernel
//! `Documentation/arch/x86/boot.rst`): the setup header holds
//! `setup_sects` at 0x1F1, the magic `HdrS` at 0x202, and (protocol 2.08+)
//! `payload_offset` / `payload_length` at 0x248 / 0x24C, relative to the
//! protected-mode code that starts at `(setup_sects + 1) * 512`. The
//! payload is the compressed vmlinux followed by its uncompressed size as a
//! little-endian u32 (the kernel's `size_append`).
//!
//! Debian 6.1 kernels compress with LZ4 in the *legacy* frame format (`lz4
//! -l`, kernel `lib/decompress_unlz4.c`): the magic `0x184C2102` (LE), then
//! blocks, each a u32 LE compressed length followed by an independent LZ4
//! block that decompresses to at most 8 MiB. A length equal to the magic
//! starts a new concatenated stream; the stream ends where the input ends or
//! at a length that cannot be a block (the size trailer).

use anyhow::{bail, ensure, Context};

/// Legacy LZ4 frame magic, as a little-endian u32.
pub const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// Largest uncompressed size of one legacy LZ4 block (8 MiB).
pub const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// Largest compressed size an 8 MiB block can have (LZ4_compressBound).
const LZ4_LEGACY_BOUND: usize = LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK / 255 + 16;

/// Returns the ELF vmlinux inside `bzimage`.
///
/// Finds the payload through the setup header when present (else by
/// searching the LZ4 magic), decompresses it, and checks the result starts
/// with `\x7fELF` and, when the header gives it, has the size the trailer
/// announces.
///
/// Errors: a payload compressed with anything other than LZ4 (named in the
/// message: gzip, xz, zstd, bzip2, lzma, lzo), a corrupt LZ4 block, or a
/// result that is not ELF.
pub fn extract(bzimage: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (payload, exact) = match payload(bzimage) {
        Some(p) => (p, true),
        None => {
            let magic = LZ4_LEGACY_MAGIC.to_le_bytes();
            let at = find(bzimage, &magic)
                .context("no bzImage setup header and no LZ4 payload found in the kernel image")?;
            (&bzimage[at..], false)
        }
    };
    if payload.len() < 4 || payload[..4] != LZ4_LEGACY_MAGIC.to_le_bytes() {
        bail!("the kernel payload is {}-compressed; only LZ4 (legacy frame) is supported", compression_name(payload));
    }
    let (body, expect) = if exact && payload.len() >= 8 {
        let n = payload.len();
        (&payload[..n - 4], Some(u32::from_le_bytes(payload[n - 4..].try_into().unwrap()) as usize))
    } else {
        (payload, None)
    };
    let out = lz4_legacy_decompress(body)?;
    if let Some(e) = expect {
        ensure!(out.len() == e, "decompressed kernel is {} bytes, the bzImage trailer says {e}", out.len());
    }
    ensure!(out.starts_with(b"\x7fELF"), "the decompressed kernel payload is not an ELF file");
    Ok(out)
}

/// The payload slice named by the setup header, if the image has one
/// (boot protocol 2.08+).
fn payload(img: &[u8]) -> Option<&[u8]> {
    if img.len() < 0x250 || &img[0x202..0x206] != b"HdrS" {
        return None;
    }
    let version = u16::from_le_bytes([img[0x206], img[0x207]]);
    if version < 0x0208 {
        return None;
    }
    let setup_sects = match img[0x1F1] {
        0 => 4,
        n => n as usize,
    };
    let pm = (setup_sects + 1) * 512;
    let off = u32::from_le_bytes(img[0x248..0x24C].try_into().ok()?) as usize;
    let len = u32::from_le_bytes(img[0x24C..0x250].try_into().ok()?) as usize;
    img.get(pm.checked_add(off)?..pm.checked_add(off)?.checked_add(len)?)
}

/// Decompresses a legacy-frame LZ4 stream (see the module docs).
///
/// Errors: no magic at the start, a block that fails to decompress.
pub fn lz4_legacy_decompress(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    ensure!(
        data.len() >= 4 && u32::from_le_bytes(data[..4].try_into().unwrap()) == LZ4_LEGACY_MAGIC,
        "not a legacy LZ4 stream (magic 0x184C2102 missing)"
    );
    let mut pos = 4;
    let mut out = Vec::new();
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    while data.len() >= pos + 4 {
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
        if len == LZ4_LEGACY_MAGIC as usize {
            pos += 4;
            continue;
        }
        if len == 0 || len > LZ4_LEGACY_BOUND || pos + 4 + len > data.len() {
            break; // the size trailer or padding
        }
        let src = &data[pos + 4..pos + 4 + len];
        let n = lz4_flex::block::decompress_into(src, &mut block)
            .map_err(|e| anyhow::anyhow!("LZ4 block at offset {pos} is corrupt: {e}"))?;
        out.extend_from_slice(&block[..n]);
        pos += 4 + len;
    }
    ensure!(!out.is_empty(), "the LZ4 stream holds no blocks");
    Ok(out)
}

fn compression_name(p: &[u8]) -> &'static str {
    match p {
        [0x1f, 0x8b, ..] => "gzip",
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => "xz",
        [0x28, 0xb5, 0x2f, 0xfd, ..] => "zstd",
        [b'B', b'Z', b'h', ..] => "bzip2",
        [0x5d, 0, 0, ..] => "lzma",
        [0x89, b'L', b'Z', b'O', ..] => "lzo",
        [0x04, 0x22, 0x4d, 0x18, ..] => "LZ4 (modern frame)",
        _ => "an unknown format",
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Legacy-frames `data` the way `lz4 -l` does: 8 MiB blocks.
    fn legacy(data: &[u8]) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(LZ4_LEGACY_BLOCK) {
            let c = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            out.extend_from_slice(&c);
        }
        out
    }

    fn fake_elf(len: usize) -> Vec<u8> {
        let mut v = b"\x7fELF\x02\x01\x01".to_vec();
        let mut x = 1u32;
        while v.len() < len {
            // Compressible but not trivial.
            x = x.wrapping_mul(1103515245).wrapping_add(12345);
            v.push(if (x >> 16) & 3 == 0 { (x >> 8) as u8 } else { b'a' + (v.len() % 7) as u8 });
        }
        v
    }

    /// A minimal bzImage: a setup header pointing at `payload`.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 3u8;
        let pm = (setup_sects as usize + 1) * 512;
        let mut img = vec![0u8; pm + 100];
        img[0x1F1] = setup_sects;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020Fu16.to_le_bytes());
        img[0x248..0x24C].copy_from_slice(&100u32.to_le_bytes());
        img[0x24C..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(payload);
        img.extend_from_slice(&[0xAA; 64]); // trailing code / padding
        img
    }

    #[test]
    fn extracts_multi_block_lz4_via_setup_header() {
        let elf = fake_elf(LZ4_LEGACY_BLOCK * 2 + 12345);
        let mut payload = legacy(&elf);
        payload.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        let got = extract(&bzimage(&payload)).unwrap();
        assert_eq!(got.len(), elf.len());
        assert!(got == elf);
    }

    #[test]
    fn extracts_by_magic_search_and_stops_at_trailer() {
        let elf = fake_elf(300_000);
        let mut img = vec![0x90u8; 777];
        img.extend_from_slice(&legacy(&elf));
        img.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        img.extend_from_slice(&[0u8; 9]);
        assert!(extract(&img).unwrap() == elf);
    }

    #[test]
    fn rejects_other_compressions_and_non_elf() {
        let err = extract(&bzimage(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0])).unwrap_err().to_string();
        assert!(err.contains("gzip"), "{err}");
        let err = extract(&bzimage(&[0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0])).unwrap_err().to_string();
        assert!(err.contains("zstd"), "{err}");
        let mut payload = legacy(b"not an elf file at all, just text");
        payload.extend_from_slice(&33u32.to_le_bytes());
        let err = extract(&bzimage(&payload)).unwrap_err().to_string();
        assert!(err.contains("not an ELF"), "{err}");
    }

    #[test]
    fn corrupt_block_is_an_error() {
        let elf = fake_elf(100_000);
        let mut s = legacy(&elf);
        let n = s.len();
        for b in &mut s[20..n] {
            *b ^= 0x5a;
        }
        // The first length is intact, the block data is garbage: either the
        // decoder notices or the output differs; it never panics.
        match lz4_legacy_decompress(&s) {
            Err(_) => {}
            Ok(v) => assert!(v != elf),
        }
    }
}
