//! The base image builder against the real Debian packages (downloaded once
//! into the shared cache `target/capvisor-test-cache`).

use capvisor_images::{self as image, cpio};
use std::path::PathBuf;
use std::time::Instant;

fn cache_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/capvisor-test-cache"))
}

#[test]
fn builds_base_image_then_hits_cache() {
    // A static stand-in for guest-init: Debian's busybox-static.
    let tmp = tempfile::tempdir().unwrap();
    let init = tmp.path().join("fake-init");
    std::fs::copy("/bin/busybox", &init).expect("busybox-static is installed");

    let mut lines = Vec::new();
    let img = image::ensure_base(&cache_dir(), &init, &mut |l| {
        eprintln!("progress: {l}");
        lines.push(l.to_string());
    })
    .unwrap();
    assert!(img.kernel_release.ends_with("-cloud-amd64"), "{}", img.kernel_release);
    let vmlinux = std::fs::read(&img.kernel).unwrap();
    assert!(vmlinux.starts_with(b"\x7fELF"));
    drop(vmlinux);

    let buf = std::fs::read(&img.initramfs).unwrap();
    let entries = cpio::parse(&buf).unwrap();
    let get = |n: &str| entries.iter().find(|e| e.name == n).unwrap_or_else(|| panic!("{n} missing from initramfs"));
    // busybox-static is already stripped, so `strip --strip-debug` keeps it whole.
    assert_eq!(get("init").data.len(), std::fs::read(&init).unwrap().len());
    assert_eq!(get("init").mode, 0o100755);
    assert_eq!(get("bin/sh").data, b"/bin/busybox");
    assert_eq!(get("bin/sh").mode & 0o170000, 0o120000);
    assert_eq!(get("etc/passwd").data, b"root:x:0:0:root:/root:/bin/sh\n");
    for d in ["proc", "sys", "dev", "tmp", "run", "root", "usr/sbin"] {
        assert_eq!(get(d).mode & 0o170000, 0o040000, "{d} is a directory");
    }
    let order = String::from_utf8(get("lib/modules/capvisor/order").data.clone()).unwrap();
    let mods: Vec<&str> = order.lines().collect();
    assert_eq!(mods, ["virtio_ring.ko", "virtio.ko", "virtio_mmio.ko", "virtio_console.ko", "virtio_blk.ko"]);
    for m in mods {
        let data = &get(&format!("lib/modules/capvisor/{m}")).data;
        assert!(data.starts_with(b"\x7fELF"), "{m} is a plain ELF module");
    }
    // Static init: no loader copied.
    assert!(!entries.iter().any(|e| e.name.contains("ld-linux")));

    // A second call is a cache hit: same files, no download, fast.
    let t = Instant::now();
    let mut again = Vec::new();
    let img2 = image::ensure_base(&cache_dir(), &init, &mut |l| again.push(l.to_string())).unwrap();
    let took = t.elapsed();
    assert_eq!(img2, img);
    assert!(again.is_empty(), "a cache hit reports no work: {again:?}");
    assert!(took.as_millis() < 300, "cache hit took {took:?}");
    eprintln!("cache hit took {took:?}");

    // A different guest-init is a different image.
    std::fs::write(&init, b"\x7fELF-not-really").unwrap();
    let err = image::ensure_base(&cache_dir(), &init, &mut |_| {}).unwrap_err();
    assert!(format!("{err:#}").contains("ELF"), "{err:#}");
}

#[test]
fn dynamic_guest_init_brings_its_libraries() {
    // A small, stable, dynamically linked executable (so reruns hit the cache).
    let bin = PathBuf::from("/usr/bin/true");
    let img = image::ensure_base(&cache_dir(), &bin, &mut |l| eprintln!("progress: {l}")).unwrap();
    let buf = std::fs::read(&img.initramfs).unwrap();
    let entries = cpio::parse(&buf).unwrap();
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    assert!(names.iter().any(|n| n.ends_with("ld-linux-x86-64.so.2")), "loader missing");
    assert!(names.iter().any(|n| n.ends_with("/libc.so.6")), "libc missing");
}
