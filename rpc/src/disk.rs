//! Blank ext4 disk images on the host: the one place capvisor runs
//! mkfs.ext4(8) (e2fsprogs) for a guest disk. Used for each VM's writable
//! layer (the worker) and for persistent volumes (the broker). The file is
//! made sparse (only written blocks take host disk), formatted under a
//! temporary name and renamed into place, so a crash leaves no
//! half-formatted image under the final name. The host only ever formats
//! a file it has just created: it never parses a disk a guest has written.

use crate::{CvError, CvResult};
use std::path::Path;

/// Largest disk image [`create_ext4`] makes, MiB (1 TiB).
pub const MAX_DISK_MIB: u64 = 1024 * 1024;

/// The `PATH` mkfs.ext4 is looked up in (services run with an empty
/// environment).
const SBIN_PATH: &str = "/usr/sbin:/sbin:/usr/bin:/bin";

/// Creates `path` as a sparse raw image of `size_mib` MiB holding an empty
/// ext4 file system labelled `label` (at most 16 bytes, mkfs.ext4 `-L`):
/// no reserved blocks (`-m 0`), lazy inode table and journal
/// initialisation (the guest kernel finishes them), its root directory
/// owned by `root_owner` (uid, gid; `-E root_owner`). The file's size is
/// the file system's: writes past it fail with ENOSPC in the guest.
/// `path` must not exist; `path` + `.new` is used while formatting.
///
/// Errors: `invalidArgument` for a size of 0 or above [`MAX_DISK_MIB`];
/// `alreadyExists` when `path` exists; `internal` when the file cannot be
/// made or mkfs.ext4 fails (its stderr in the message; the partial file
/// is removed).
pub fn create_ext4(path: &Path, size_mib: u64, label: &str, root_owner: (u32, u32)) -> CvResult<()> {
    if size_mib == 0 || size_mib > MAX_DISK_MIB {
        return Err(CvError::invalid(format!("a disk must be 1 to {MAX_DISK_MIB} MiB (asked {size_mib})")));
    }
    if path.exists() {
        return Err(CvError::new(
            capvisor_schema::common_capnp::ErrorCode::AlreadyExists,
            format!("{} exists", path.display()),
        ));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = std::path::PathBuf::from(tmp);
    let made = (|| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| CvError::internal(format!("cannot create {}: {e}", tmp.display())))?;
        f.set_len(size_mib * 1024 * 1024)
            .map_err(|e| CvError::internal(format!("cannot size {}: {e}", tmp.display())))?;
        drop(f);
        let label: String = label.chars().take(16).collect();
        let out = std::process::Command::new("mkfs.ext4")
            .env_clear()
            .env("PATH", SBIN_PATH)
            .args(["-q", "-F", "-m", "0", "-L", &label])
            .arg("-E")
            .arg(format!("lazy_itable_init=1,lazy_journal_init=1,root_owner={}:{}", root_owner.0, root_owner.1))
            .arg(&tmp)
            .output()
            .map_err(|e| CvError::internal(format!("cannot run mkfs.ext4 (package e2fsprogs): {e}")))?;
        if !out.status.success() {
            return Err(CvError::internal(format!(
                "mkfs.ext4 of {} failed ({}): {}",
                tmp.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        std::fs::rename(&tmp, path).map_err(|e| CvError::internal(format!("cannot rename {}: {e}", tmp.display())))
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    made
}

/// Host disk a file occupies: its allocated blocks (`st_blocks` × 512,
/// stat(2)), bytes; 0 when it cannot be read.
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has_mkfs() -> bool {
        std::process::Command::new("mkfs.ext4").env("PATH", SBIN_PATH).arg("-V").output().is_ok()
    }

    #[test]
    fn makes_a_sparse_ext4_image_of_the_asked_size() {
        if !has_mkfs() {
            println!("skipped: mkfs.ext4 (e2fsprogs) is not installed");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v.ext4");
        create_ext4(&p, 64, "capvisor-test-label-long", (1000, 1000)).unwrap();
        let len = std::fs::metadata(&p).unwrap().len();
        assert_eq!(len, 64 * 1024 * 1024);
        assert!(allocated_bytes(&p) < len / 2, "sparse: {} bytes allocated", allocated_bytes(&p));
        // The ext4 superblock magic 0xEF53 at byte 1024 + 56 (ext4 disk layout).
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1024 + 56..1024 + 58], &[0x53, 0xEF]);
        // The label was cut to 16 bytes (s_volume_name at 1024 + 120).
        assert_eq!(&bytes[1024 + 120..1024 + 136], b"capvisor-test-la");
        assert!(!d.path().join("v.ext4.new").exists());
        // No second create over an existing image.
        let e = create_ext4(&p, 64, "x", (0, 0)).unwrap_err();
        assert_eq!(e.code, capvisor_schema::common_capnp::ErrorCode::AlreadyExists);
        // Bad sizes are refused before anything is made.
        let q = d.path().join("q.ext4");
        assert_eq!(
            create_ext4(&q, 0, "x", (0, 0)).unwrap_err().code,
            capvisor_schema::common_capnp::ErrorCode::InvalidArgument
        );
        assert!(create_ext4(&q, MAX_DISK_MIB + 1, "x", (0, 0)).is_err());
        assert!(!q.exists());
    }

    #[test]
    fn a_failed_format_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        // A directory that does not exist: the file cannot be made.
        let p = d.path().join("missing").join("v.ext4");
        assert!(create_ext4(&p, 8, "x", (0, 0)).is_err());
        assert!(!d.path().join("missing").exists());
    }
}
