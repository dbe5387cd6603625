//! `capvisor images`: the images a session may boot, from `VmFactory.images`
//! (the default manifest's `base` and `debian`; the debian root image is
//! built on the first run and cached under the normal cache dir).

mod common;
use common::*;

/// Rows of `capvisor images` as (name, kind, root image, writable).
fn rows(out: &str) -> Vec<Vec<String>> {
    out.lines().skip(1).map(|l| l.split_whitespace().map(str::to_string).collect()).collect()
}

#[test]
fn images_lists_what_the_bundle_allows() {
    // The user bundle may boot only base; owner keeps base and debian.
    let manifest = capvisor_manifest::DEFAULT_TOML
        .replacen("images = [\"base\", \"debian\"]", "IMAGES_OWNER", 1)
        .replacen("images = [\"base\", \"debian\"]", "images = [\"base\"]", 1)
        .replacen("IMAGES_OWNER", "images = [\"base\", \"debian\"]", 1);
    assert_ne!(manifest, capvisor_manifest::DEFAULT_TOML);
    let s = Server::start(Some(&manifest));
    s.cli_ok("owner", &["login"], None, 0);
    let out = stdout(&s.cli_ok("owner", &["images"], None, 0));
    assert!(out.starts_with("NAME"), "{out}");
    let r = rows(&out);
    assert_eq!(r.iter().map(|r| r[0].as_str()).collect::<Vec<_>>(), ["base", "debian"], "{out}");
    // base: busybox in an initramfs, no root image or writable layer.
    assert_eq!(r[0][1], "base", "{out}");
    assert!(r[0][2].starts_with("6."), "{out}");
    assert_eq!(&r[0][3..], ["-", "-"], "{out}");
    // debian: a root image of hundreds of MiB, 2048 MiB writable layer, same kernel.
    assert_eq!(r[1][1], "debian", "{out}");
    assert_eq!(r[1][2], r[0][2], "{out}");
    let mib: u64 = r[1][3].parse().unwrap();
    assert!(mib > 100, "{out}");
    assert_eq!(&r[1][4..], ["MiB", "2048", "MiB"], "{out}");

    s.cli_ok("owner", &["account", "add", "bob", "--profile", "user", "--password-stdin"], Some(b"bob-secret-1\n"), 0);
    s.cli_ok("bob", &["login", "--user", "bob", "--password-stdin"], Some(b"bob-secret-1\n"), 0);
    let out = stdout(&s.cli_ok("bob", &["images"], None, 0));
    let r = rows(&out);
    assert_eq!(r.iter().map(|r| r[0].as_str()).collect::<Vec<_>>(), ["base"], "bob's bundle has only base: {out}");
    s.stop();
}
