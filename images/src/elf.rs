//! Just enough ELF (the System V gABI's file and program headers) to tell
//! whether a binary is dynamically linked (`PT_INTERP`), and the shared
//! objects it needs at run time according to `ldd`.

use anyhow::{ensure, Context};
use std::path::{Path, PathBuf};

const PT_INTERP: u32 = 3;

/// The `PT_INTERP` path of a 64-bit little-endian ELF file (e.g.
/// `/lib64/ld-linux-x86-64.so.2`), or `None` for a static binary.
///
/// Errors: not a 64-bit little-endian ELF file, truncated headers.
pub fn interpreter(elf: &[u8]) -> anyhow::Result<Option<String>> {
    ensure!(elf.len() >= 64 && elf.starts_with(b"\x7fELF"), "not an ELF file");
    ensure!(elf[4] == 2 && elf[5] == 1, "not a 64-bit little-endian ELF file");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    let phoff = u64_at(0x20) as usize;
    let phentsize = u16_at(0x36) as usize;
    let phnum = u16_at(0x38) as usize;
    ensure!(phentsize >= 56, "bad ELF program header size {phentsize}");
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        ensure!(elf.len() >= ph + 56, "truncated ELF program headers");
        if u32_at(ph) == PT_INTERP {
            let off = u64_at(ph + 8) as usize;
            let size = u64_at(ph + 32) as usize;
            let raw = elf.get(off..off + size).context("truncated ELF interpreter path")?;
            let s = String::from_utf8_lossy(raw).trim_end_matches('\0').to_string();
            return Ok(Some(s));
        }
    }
    Ok(None)
}

/// Absolute paths of the shared objects `ldd` lists for `bin`, the
/// dynamic loader included (`linux-vdso` and other virtual objects are
/// left out).
///
/// Errors: `ldd` fails or reports a library as "not found".
pub fn needed_libs(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = std::process::Command::new("ldd").arg(bin).output().context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "ldd {} failed: {}", bin.display(), String::from_utf8_lossy(&out.stderr).trim());
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        ensure!(!line.contains("not found"), "ldd {}: {line}", bin.display());
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)".
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_dynamic_and_static_binaries() {
        // The test binary itself is dynamically linked on glibc hosts.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let interp = interpreter(&me).unwrap();
        assert!(interp.as_deref().is_some_and(|p| p.contains("ld-")), "{interp:?}");
        // Debian's busybox-static is static, when installed.
        if let Ok(bb) = std::fs::read("/bin/busybox") {
            assert_eq!(interpreter(&bb).unwrap(), None);
        }
        assert!(interpreter(b"#!/bin/sh\n").is_err());
        let libs = needed_libs(&std::env::current_exe().unwrap()).unwrap();
        assert!(libs.iter().any(|l| l.to_string_lossy().contains("libc.so")), "{libs:?}");
    }
}
