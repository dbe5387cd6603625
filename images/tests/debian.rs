//! The real `debian` root image: built once with mmdebstrap (cached under
//! the normal cache dir, `capvisor_rpc::paths::cache_dir()`, so later runs
//! and CI reuse it) and inspected with `debugfs` (e2fsprogs) without
//! mounting it. Needs network access to deb.debian.org on the first run.

use capvisor_images::rootfs::{ensure_rootfs, RootfsSpec};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// The default manifest's `[images.debian]` as a spec.
fn default_spec() -> RootfsSpec {
    let m = capvisor_manifest::Manifest::default_manifest();
    let img = &m.images["debian"];
    RootfsSpec { distribution: img.distribution().to_string(), packages: img.packages.clone() }
}

/// `debugfs -R <request> <img>`'s stdout; fails on a debugfs error line.
fn debugfs(img: &Path, request: &str) -> String {
    let out = Command::new("debugfs").arg("-R").arg(request).arg(img).output().expect("debugfs (e2fsprogs)");
    assert!(out.status.success(), "debugfs {request}: {}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("File not found"), "debugfs {request}: {err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn debian_image_builds_and_holds_the_userland() {
    let cache = capvisor_rpc::paths::cache_dir();
    let spec = default_spec();
    let t0 = Instant::now();
    let img = ensure_rootfs(&cache, &spec, &mut |l| eprintln!("capvisor: {l}")).unwrap();
    eprintln!("first call: {:.1} s", t0.elapsed().as_secs_f64());
    let size = std::fs::metadata(&img).unwrap().len();
    eprintln!("image {}: {:.1} MiB", img.display(), size as f64 / 1048576.0);

    // The programs an agent expects.
    for f in ["/usr/bin/python3", "/usr/bin/git", "/usr/bin/node", "/usr/bin/bash", "/usr/bin/npm"] {
        let s = debugfs(&img, &format!("stat {f}"));
        assert!(s.contains("Inode:"), "{f}: {s}");
    }
    // The agent user: home owned by 1000:1000, passwd entry with uid 1000.
    let home = debugfs(&img, "stat /home/agent");
    assert!(home.contains("User:  1000") && home.contains("Group:  1000"), "{home}");
    assert!(home.contains("Type: directory"), "{home}");
    let passwd = debugfs(&img, "cat /etc/passwd");
    assert!(
        passwd.lines().any(|l| l.starts_with("agent:x:1000:1000:") && l.ends_with(":/home/agent:/bin/bash")),
        "{passwd}"
    );
    // Lean: apt's lists and the docs are gone.
    let lists = debugfs(&img, "ls /var/lib/apt/lists");
    assert!(!lists.contains("_Packages"), "{lists}");
    let label = Command::new("e2label").arg(&img).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&label.stdout).trim(), "capvisor-root");

    // A second call is a cache hit: the same file, no rebuild.
    let mtime = std::fs::metadata(&img).unwrap().modified().unwrap();
    let t1 = Instant::now();
    let mut lines = Vec::new();
    let again = ensure_rootfs(&cache, &spec, &mut |l| lines.push(l.to_string())).unwrap();
    eprintln!("cached call: {:.2} s", t1.elapsed().as_secs_f64());
    assert_eq!(again, img);
    assert_eq!(std::fs::metadata(&again).unwrap().modified().unwrap(), mtime);
    assert!(lines.iter().any(|l| l.contains("cached at")), "{lines:?}");
    assert!(!lines.iter().any(|l| l.contains("mmdebstrap")), "{lines:?}");
}
