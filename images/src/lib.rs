//! capvisor-images: the guest image builder (DESIGN.md, "Guest"), run by
//! the supervisor before it serves (and by tests and `capvisor-bench`); the
//! per-VM vmm only boots what it builds.
//!
//! Guest images: the initramfs-only *base* image, and ([`rootfs`]) the
//! read-only Debian root images (`[images.NAME] packages`) booted with
//! base's kernel and initramfs.
//!
//! [`ensure_base`] turns Debian's `linux-image-cloud-amd64` kernel and
//! `busybox-static` plus capvisor's guest-init binary into
//! - `vmlinux`: the uncompressed ELF kernel (QEMU's microvm boots it by its
//!   PVH note), extracted from the package's bzImage ([`vmlinux`]);
//! - `initramfs.cpio`: an uncompressed newc archive ([`cpio`]) holding
//!   `/init` (guest-init), busybox and its applet links, the virtio modules
//!   guest-init loads (`/lib/modules/capvisor/*.ko` in the order given by
//!   `/lib/modules/capvisor/order`), and a minimal `/etc`;
//! - `release`: the kernel release (`uname -r` in the guest).
//!
//! [`ensure_image`] does the same with another [`KernelSource`]: with
//! [`KernelSource::Minimal`] the kernel is capvisor's own build
//! ([`kernel::ensure_minimal`], everything built in) and the initramfs
//! carries no modules (an empty `order`).
//!
//! Images are cached under `cache_dir/images/base-<key>/`, where the key is
//! a SHA-256 over the kernel (the kernel `.deb`'s SHA-256, or the minimal
//! kernel's build id), busybox's `.deb` SHA-256, guest-init's SHA-256 and
//! [`BUILDER_VERSION`]. A hit runs no external command and takes
//! milliseconds.

pub mod apt;
pub mod cpio;
pub mod elf;
pub mod kernel;
pub mod rootfs;
pub mod vmlinux;

use anyhow::{bail, ensure, Context};
use capvisor_manifest::BuiltImage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use kernel::KernelSource;

/// Bumped whenever the image layout changes, so old cache entries are not reused.
pub const BUILDER_VERSION: &str = "capvisor-base-image-v3";
/// The Debian metapackage naming the current cloud kernel.
pub const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";
/// The Debian package providing a static `/bin/busybox`.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";
/// Kernel modules guest-init loads, in load order (module names; the
/// files are `<name>.ko`). Built-in ones (listed in `modules.builtin`) are left out.
pub const MODULES: [&str; 5] = ["virtio_ring", "virtio", "virtio_mmio", "virtio_console", "virtio_blk"];
/// Where the modules live in the initramfs.
pub const MODULE_DIR: &str = "lib/modules/capvisor";

/// Builds (or finds in the cache) the base image for `guest_init`.
///
/// - `cache_dir`: capvisor's cache directory (e.g. `capvisor_rpc::paths::cache_dir()`);
///   `.deb`s go to `debs/`, images to `images/base-<16 hex>/`.
/// - `guest_init`: the guest-init executable, installed as `/init` (with
///   its debug info stripped when `strip` is available). A
///   dynamically linked one (a debug build) gets its ELF interpreter and the
///   libraries `ldd` lists copied to the same paths; a static one needs none.
/// - `progress`: called with short human-readable lines while working.
///
/// Blocking; may download two packages with `apt-get download` on a miss.
/// Concurrent callers are safe: each builds in its own temporary
/// directory beside the target and renames it into place.
///
/// Errors: apt's lists are empty (says to run `apt-get update`), a download
/// fails, the kernel payload is not LZ4, a module is missing, guest-init
/// cannot be read, or any I/O error — each with context.
pub fn ensure_base(cache_dir: &Path, guest_init: &Path, progress: &mut dyn FnMut(&str)) -> anyhow::Result<BuiltImage> {
    ensure_image(cache_dir, KernelSource::DebianCloud, guest_init, progress)
}

/// [`ensure_base`] with the kernel from `kernel_source`:
/// - [`KernelSource::DebianCloud`]: exactly [`ensure_base`];
/// - [`KernelSource::Minimal`]: the kernel comes from
///   [`kernel::ensure_minimal`] (the first call builds it from
///   `linux-source-6.1`, which takes minutes; its progress lines go to
///   `progress`) and the initramfs holds no modules (an empty `order`).
///
/// Errors: those of [`ensure_base`], and for `Minimal` those of [`kernel::ensure_minimal`].
pub fn ensure_image(
    cache_dir: &Path,
    kernel_source: KernelSource,
    guest_init: &Path,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<BuiltImage> {
    let t0 = Instant::now();
    std::fs::create_dir_all(cache_dir).with_context(|| format!("creating {}", cache_dir.display()))?;
    let res = apt::resolve(cache_dir, KERNEL_METAPACKAGE, BUSYBOX_PACKAGE)?;
    let debs = cache_dir.join("debs");
    let kernel = match kernel_source {
        KernelSource::DebianCloud => KernelInput::Deb(apt::fetch(&res.kernel, &debs, progress)?),
        KernelSource::Minimal => KernelInput::Minimal(kernel::ensure_minimal(cache_dir, progress)?),
    };
    let busybox_deb = apt::fetch(&res.busybox, &debs, progress)?;
    let init_hash = file_sha256_memo(cache_dir, guest_init)?;

    let kernel_id = match &kernel {
        KernelInput::Deb(_) => res.kernel.sha256.clone(),
        KernelInput::Minimal(k) => k.id(),
    };
    let key = image_key(kernel_source, &kernel_id, &res.busybox.sha256, &init_hash);
    let images = cache_dir.join("images");
    let dir = images.join(format!("base-{}", &key[..16]));
    if let Some(img) = complete(&dir) {
        touch(&dir);
        return Ok(img);
    }

    std::fs::create_dir_all(&images)?;
    let tmp = tempfile::Builder::new().prefix(".build-base-").tempdir_in(&images)?;
    build(tmp.path(), &kernel, &busybox_deb, guest_init, progress)?;
    match std::fs::rename(tmp.path(), &dir) {
        Ok(()) => {
            // The directory moved; nothing is left for TempDir to delete.
            let _ = tmp.keep();
        }
        Err(e) => {
            // Another builder won the race: use its (identical) result.
            if complete(&dir).is_none() {
                return Err(e).with_context(|| format!("renaming the new image to {}", dir.display()));
            }
        }
    }
    let img = complete(&dir).with_context(|| format!("image {} is incomplete after building", dir.display()))?;
    touch(&dir);
    prune(&images, &dir, "base", KEEP_IMAGES);
    progress(&format!(
        "image base ({kernel_source} kernel) ready: {} (took {:.1} s)",
        dir.display(),
        t0.elapsed().as_secs_f64()
    ));
    Ok(img)
}

/// Where an image's kernel comes from, once fetched / built.
enum KernelInput {
    /// The kernel `.deb` (vmlinuz + modules).
    Deb(PathBuf),
    /// capvisor's minimal kernel (no modules).
    Minimal(kernel::MinimalKernel),
}

/// The image cache key (hex SHA-256) of a kernel (`kernel_id`: the
/// `.deb`'s SHA-256, or the minimal kernel's [`kernel::MinimalKernel::id`]),
/// busybox's `.deb` SHA-256 and guest-init's SHA-256. Debian-cloud images
/// keep the key they had before kernel sources existed.
fn image_key(source: KernelSource, kernel_id: &str, busybox_sha: &str, init_sha: &str) -> String {
    let mut h = Sha256::new();
    let tagged;
    let kernel_part = match source {
        KernelSource::DebianCloud => kernel_id,
        _ => {
            tagged = format!("{source}:{kernel_id}");
            &tagged
        }
    };
    for part in [BUILDER_VERSION, kernel_part, busybox_sha, init_sha] {
        h.update(part.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// How many base images a build keeps (the most recently used ones; see `prune`).
pub const KEEP_IMAGES: usize = 4;
/// Images used (or builds started) this recently are never pruned.
const PRUNE_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);

/// How many root images (`debian-*`, hundreds of MiB each) a build keeps.
pub const KEEP_ROOT_IMAGES: usize = 2;

/// Marks `dir` as used now (its mtime), for [`prune`].
pub(crate) fn touch(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

/// Removes old images after a build or a cache hit: of the directories
/// named `<family>-<16 hex digits>` other than `keep`, all but the
/// `keep_n` - 1 most recently used go if unused for an hour, and so do
/// abandoned `.build-*` / `.unpack-*` directories. A VM already running
/// from a removed base image is unaffected (QEMU read its files at start);
/// a root image in use stays open by its QEMU, so its blocks are freed
/// only when that VM ends. Errors are ignored.
pub(crate) fn prune(images: &Path, keep: &Path, family: &str, keep_n: usize) {
    let now = std::time::SystemTime::now();
    let age = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .unwrap_or_default()
    };
    let Ok(rd) = std::fs::read_dir(images) else { return };
    let mut bases = Vec::new();
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p == keep {
            continue;
        }
        let in_family = name
            .strip_prefix(family)
            .and_then(|k| k.strip_prefix('-'))
            .is_some_and(|k| k.len() == 16 && k.bytes().all(|c| c.is_ascii_hexdigit()));
        if in_family {
            bases.push((age(&p), p));
        } else if (name.starts_with(".build-") || name.starts_with(".unpack-")) && age(&p) > PRUNE_GRACE {
            let _ = std::fs::remove_dir_all(&p);
        }
    }
    bases.sort();
    for (a, p) in bases.into_iter().skip(keep_n.saturating_sub(1)) {
        if a > PRUNE_GRACE {
            let _ = std::fs::remove_dir_all(&p);
        }
    }
}

/// The image in `dir` if all of its files are there.
fn complete(dir: &Path) -> Option<BuiltImage> {
    let kernel = dir.join("vmlinux");
    let initramfs = dir.join("initramfs.cpio");
    let release = std::fs::read_to_string(dir.join("release")).ok()?.trim().to_string();
    (kernel.is_file() && initramfs.is_file() && !release.is_empty()).then_some(BuiltImage {
        kernel,
        initramfs,
        kernel_release: release,
        rootfs: None,
        writable_mib: 0,
    })
}

/// Builds the image files into `out`.
fn build(
    out: &Path,
    kernel: &KernelInput,
    busybox_deb: &Path,
    guest_init: &Path,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<()> {
    let work = tempfile::Builder::new().prefix(".unpack-").tempdir_in(out.parent().unwrap_or(out))?;
    let kdir = work.path().join("kernel");
    let bdir = work.path().join("busybox");
    apt::unpack(busybox_deb, &bdir)?;

    // The kernel.
    let release = match kernel {
        KernelInput::Deb(kernel_deb) => {
            progress(&format!("unpacking {} ...", file_name(kernel_deb)));
            apt::unpack(kernel_deb, &kdir)?;
            let (vmlinuz, release) = find_vmlinuz(&kdir.join("boot"))?;
            progress("extracting vmlinux (LZ4) ...");
            let bz = std::fs::read(&vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
            let elf =
                vmlinux::extract(&bz).with_context(|| format!("extracting vmlinux from {}", vmlinuz.display()))?;
            std::fs::write(out.join("vmlinux"), &elf)?;
            release
        }
        KernelInput::Minimal(k) => {
            std::fs::copy(&k.vmlinux, out.join("vmlinux"))
                .with_context(|| format!("copying {}", k.vmlinux.display()))?;
            k.release.clone()
        }
    };

    // The initramfs.
    let cpio_path = out.join("initramfs.cpio");
    let f = std::fs::File::create(&cpio_path)?;
    let mut w = cpio::CpioWriter::new(std::io::BufWriter::with_capacity(1 << 20, f));
    for d in ["bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "root", "etc", MODULE_DIR] {
        w.dir(d, 0o755)?;
    }
    w.dir("tmp", 0o1777)?;
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.char_dev("dev/null", 0o666, 1, 3)?;

    // Debug builds carry tens of MiB of debug info the guest never reads
    // (and a TCG guest unpacks slowly): drop it when `strip` is at hand.
    let stripped = work.path().join("init.stripped");
    let strip_ok = std::process::Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&stripped)
        .arg(guest_init)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let init_src = if strip_ok { stripped.as_path() } else { guest_init };
    let init = std::fs::read(init_src).with_context(|| format!("reading guest-init {}", init_src.display()))?;
    let interp = elf::interpreter(&init).with_context(|| format!("guest-init {}", guest_init.display()))?;
    w.file("init", 0o755, &init)?;
    drop(init);
    if let Some(interp) = interp {
        // A dynamically linked guest-init (a debug build): bring its loader
        // and libraries along at the same paths.
        let mut libs = elf::needed_libs(guest_init)?;
        libs.push(PathBuf::from(interp));
        for lib in libs {
            let name = lib.to_string_lossy().into_owned();
            if w.contains(&name) {
                continue;
            }
            let data = std::fs::read(&lib).with_context(|| format!("reading {}", lib.display()))?;
            w.file(&name, 0o755, &data)?;
        }
    }

    let busybox = bdir.join("bin/busybox");
    let bb = std::fs::read(&busybox).with_context(|| format!("{} has no bin/busybox", file_name(busybox_deb)))?;
    w.file("bin/busybox", 0o755, &bb)?;
    drop(bb);
    for applet in busybox_applets(&busybox)? {
        if applet == "bin/busybox" || applet == "init" || applet == "linuxrc" || w.contains(&applet) {
            continue;
        }
        w.symlink(&applet, "/bin/busybox")?;
    }
    if !w.contains("bin/sh") {
        w.symlink("bin/sh", "/bin/busybox")?;
    }

    w.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
    w.file("etc/group", 0o644, b"root:x:0:\n")?;
    w.file("etc/hostname", 0o644, b"capvisor\n")?;

    // The minimal kernel has everything built in: an empty `order`.
    let mod_root = kdir.join("lib/modules").join(&release);
    let builtin = std::fs::read_to_string(mod_root.join("modules.builtin")).unwrap_or_default();
    let mut order = String::new();
    for m in MODULES.into_iter().filter(|_| matches!(kernel, KernelInput::Deb(_))) {
        if builtin.lines().any(|l| l.rsplit('/').next() == Some(&format!("{m}.ko"))) {
            continue;
        }
        let data = read_module(&mod_root.join("kernel"), m)?;
        w.file(&format!("{MODULE_DIR}/{m}.ko"), 0o644, &data)?;
        order.push_str(&format!("{m}.ko\n"));
    }
    w.file(&format!("{MODULE_DIR}/order"), 0o644, order.as_bytes())?;

    let (n, bytes) = (w.entries(), w.bytes());
    progress(&format!("writing initramfs ({n} files, {:.1} MiB) ...", bytes as f64 / 1048576.0));
    let f = w.finish()?.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    std::fs::write(out.join("release"), format!("{release}\n"))?;
    Ok(())
}

/// `boot/vmlinuz-<release>` in the unpacked kernel package, and the release.
fn find_vmlinuz(boot: &Path) -> anyhow::Result<(PathBuf, String)> {
    for e in std::fs::read_dir(boot).with_context(|| format!("the kernel package has no {}", boot.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(rel) = name.strip_prefix("vmlinuz-") {
            return Ok((e.path(), rel.to_string()));
        }
    }
    bail!("the kernel package has no boot/vmlinuz-*")
}

/// The contents of module `name` somewhere under `root`: `name.ko` as is,
/// `name.ko.xz` / `name.ko.zst` decompressed with the `xz` / `zstd` tool.
fn read_module(root: &Path, name: &str) -> anyhow::Result<Vec<u8>> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
                continue;
            }
            let f = e.file_name().to_string_lossy().into_owned();
            if f == format!("{name}.ko") {
                return Ok(std::fs::read(e.path())?);
            }
            for (ext, tool) in [("xz", "xz"), ("zst", "zstd")] {
                if f == format!("{name}.ko.{ext}") {
                    let out = std::process::Command::new(tool)
                        .args(["-d", "-c"])
                        .arg(e.path())
                        .output()
                        .with_context(|| format!("module {f} is {ext}-compressed and `{tool}` could not be run"))?;
                    ensure!(
                        out.status.success(),
                        "{tool} -d {f} failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                    return Ok(out.stdout);
                }
            }
        }
    }
    bail!("kernel module {name}.ko not found under {} (and not built in)", root.display())
}

/// Applet paths (`bin/ls`, `usr/bin/awk`, ...) from `busybox --list-full`.
fn busybox_applets(busybox: &Path) -> anyhow::Result<Vec<String>> {
    let out = std::process::Command::new(busybox)
        .arg("--list-full")
        .output()
        .with_context(|| format!("running {} --list-full", busybox.display()))?;
    ensure!(out.status.success(), "busybox --list-full failed");
    let list: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().trim_start_matches('/').to_string())
        .filter(|l| !l.is_empty())
        .collect();
    ensure!(list.len() > 10, "busybox --list-full listed only {} applets", list.len());
    Ok(list)
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
}

#[derive(Serialize, Deserialize, PartialEq)]
struct HashMemo {
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    sha256: String,
}

/// SHA-256 (hex) of `path`, memoised in `cache_dir/hashes/` by the file's
/// device, inode, size and mtime, so a cache hit does not re-read a large
/// (debug) guest-init binary.
fn file_sha256_memo(cache_dir: &Path, path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let canon = std::fs::canonicalize(path).with_context(|| format!("guest-init binary {}", path.display()))?;
    let m = std::fs::metadata(&canon)?;
    let mut memo = HashMemo {
        path: canon.clone(),
        dev: m.dev(),
        ino: m.ino(),
        size: m.len(),
        mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        sha256: String::new(),
    };
    let dir = cache_dir.join("hashes");
    let memo_path =
        dir.join(format!("{}.json", &hex::encode(Sha256::digest(canon.to_string_lossy().as_bytes()))[..32]));
    if let Ok(old) =
        std::fs::read(&memo_path).map_err(anyhow::Error::from).and_then(|b| Ok(serde_json::from_slice::<HashMemo>(&b)?))
    {
        memo.sha256 = old.sha256.clone();
        if old == memo {
            return Ok(memo.sha256);
        }
    }
    let data = std::fs::read(&canon).with_context(|| format!("reading {}", canon.display()))?;
    memo.sha256 = hex::encode(Sha256::digest(&data));
    std::fs::create_dir_all(&dir)?;
    let tmp = memo_path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec(&memo)?)?;
    std::fs::rename(&tmp, &memo_path)?;
    Ok(memo.sha256)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_keeps_recent_and_newest_images() {
        let d = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        let mk = |name: &str, stale: bool| {
            let p = d.path().join(name);
            std::fs::create_dir(&p).unwrap();
            std::fs::write(p.join("vmlinux"), b"x").unwrap();
            if stale {
                std::fs::File::open(&p).unwrap().set_modified(old).unwrap();
            }
            p
        };
        let key = |i: usize| format!("{i:016x}");
        let keep = mk(&format!("base-{}", key(99)), true);
        let stale: Vec<_> = (0..5).map(|i| mk(&format!("base-{}", key(i)), true)).collect();
        let fresh = mk(&format!("base-{}", key(50)), false);
        let abandoned = mk(".build-base-x", true);
        // Other families and names that only look alike are not touched.
        let roots: Vec<_> = (0..3).map(|i| mk(&format!("debian-{}", key(i)), true)).collect();
        let alike = mk(&format!("base-x-{}", key(1)), true);
        prune(d.path(), &keep, "base", KEEP_IMAGES);
        assert!(keep.exists() && fresh.exists());
        assert!(!abandoned.exists());
        // KEEP_IMAGES - 1 others survive: the fresh one and the newest stale ones.
        let left = stale.iter().filter(|p| p.exists()).count();
        assert_eq!(left, KEEP_IMAGES - 2);
        assert!(roots.iter().all(|p| p.exists()) && alike.exists());
        // Root images keep KEEP_ROOT_IMAGES: the one in use and the newest other.
        prune(d.path(), &roots[0], "debian", KEEP_ROOT_IMAGES);
        assert_eq!(roots.iter().filter(|p| p.exists()).count(), KEEP_ROOT_IMAGES);
        assert!(roots[0].exists());
    }

    #[test]
    fn image_key_depends_on_the_kernel() {
        let (bb, init) = ("b".repeat(64), "i".repeat(64));
        let deb = image_key(KernelSource::DebianCloud, "abc", &bb, &init);
        // Debian-cloud keys are what they were before kernel sources existed.
        let mut h = Sha256::new();
        for part in [BUILDER_VERSION, "abc", &bb, &init] {
            h.update(part.as_bytes());
            h.update(b"\n");
        }
        assert_eq!(deb, hex::encode(h.finalize()));
        let min = image_key(KernelSource::Minimal, "abc", &bb, &init);
        assert_ne!(deb, min, "the kernel source is part of the key");
        assert_ne!(min, image_key(KernelSource::Minimal, "minimal-0123", &bb, &init), "so is the kernel build");
        assert_ne!(min, image_key(KernelSource::Minimal, "abc", &bb, &"j".repeat(64)), "and guest-init");
    }

    /// A minimal-kernel image: the kernel's vmlinux and release as they are,
    /// no modules and an empty `order` (uses the real busybox-static package,
    /// fetched into the shared test cache like tests/image.rs does).
    #[test]
    fn minimal_kernel_image_has_no_modules() {
        let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/capvisor-test-cache");
        std::fs::create_dir_all(&cache).unwrap();
        let res = apt::resolve(&cache, KERNEL_METAPACKAGE, BUSYBOX_PACKAGE).unwrap();
        let busybox_deb = apt::fetch(&res.busybox, &cache.join("debs"), &mut |_| {}).unwrap();

        let tmp = tempfile::tempdir().unwrap();
        let kdir = tmp.path().join("minimal-0123456789abcdef");
        std::fs::create_dir(&kdir).unwrap();
        std::fs::write(kdir.join("vmlinux"), b"\x7fELF fake kernel").unwrap();
        std::fs::write(kdir.join("release"), "6.1.0-capvisor\n").unwrap();
        std::fs::write(kdir.join("config"), "CONFIG_64BIT=y\n").unwrap();
        let k = kernel::MinimalKernel::open(&kdir).unwrap();
        let out = tmp.path().join("image");
        std::fs::create_dir(&out).unwrap();
        build(&out, &KernelInput::Minimal(k), &busybox_deb, Path::new("/bin/busybox"), &mut |_| {}).unwrap();

        let img = complete(&out).unwrap();
        assert_eq!(img.kernel_release, "6.1.0-capvisor");
        assert_eq!(std::fs::read(&img.kernel).unwrap(), b"\x7fELF fake kernel");
        let entries = cpio::parse(&std::fs::read(&img.initramfs).unwrap()).unwrap();
        let order = entries.iter().find(|e| e.name == format!("{MODULE_DIR}/order")).expect("order file");
        assert!(order.data.is_empty(), "order: {:?}", String::from_utf8_lossy(&order.data));
        assert!(!entries.iter().any(|e| e.name.ends_with(".ko")), "no modules");
        assert!(entries.iter().any(|e| e.name == "init"));
    }

    #[test]
    fn hash_memo_tracks_changes() {
        let cache = tempfile::tempdir().unwrap();
        let f = cache.path().join("bin");
        std::fs::write(&f, b"one").unwrap();
        let a = file_sha256_memo(cache.path(), &f).unwrap();
        assert_eq!(a, hex::encode(Sha256::digest(b"one")));
        assert_eq!(file_sha256_memo(cache.path(), &f).unwrap(), a);
        std::fs::write(&f, b"two!").unwrap();
        assert_eq!(file_sha256_memo(cache.path(), &f).unwrap(), hex::encode(Sha256::digest(b"two!")));
    }
}
