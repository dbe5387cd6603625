use super::*;
use std::os::unix::fs::PermissionsExt;

#[test]
fn manifest_errors_name_the_file_and_key() {
    let (m, label) = load_manifest(None).unwrap();
    assert_eq!(label, "default");
    assert!(m.profiles.contains_key("owner"));

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let e = format!("{:#}", load_manifest(Some(&missing)).unwrap_err());
    assert!(e.contains("nope.toml"), "{e}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, capvisor_manifest::DEFAULT_TOML.replace("[gateway]", "[gateway]\nbogus_key = 1")).unwrap();
    let e = format!("{:#}", load_manifest(Some(&bad)).unwrap_err());
    assert!(e.contains("bad.toml") && e.contains("bogus_key"), "{e}");

    let bad2 = dir.path().join("bad2.toml");
    std::fs::write(&bad2, capvisor_manifest::DEFAULT_TOML.replace("bundle = \"user\"", "bundle = \"ghost\"")).unwrap();
    let e = format!("{:#}", load_manifest(Some(&bad2)).unwrap_err());
    assert!(e.contains("bad2.toml") && e.contains("profiles.user") && e.contains("ghost"), "{e}");

    let good = dir.path().join("good.toml");
    std::fs::write(&good, capvisor_manifest::DEFAULT_TOML).unwrap();
    assert_eq!(load_manifest(Some(&good)).unwrap().1, good.display().to_string());
}

#[test]
fn socket_binding_rules() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run/sub/gw.sock");
    let l = bind_socket(&sock).unwrap();
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(sock.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);

    // A live server: refused, socket untouched.
    let e = bind_socket(&sock).unwrap_err().to_string();
    assert_eq!(e, format!("another capvisor serve is running on {}", sock.display()));
    assert!(sock.exists());

    // Stale (nobody listening): replaced.
    drop(l);
    let _l2 = bind_socket(&sock).unwrap();

    // Not a socket: refused, file untouched.
    let file = dir.path().join("run/file");
    std::fs::write(&file, b"keep me").unwrap();
    let e = bind_socket(&file).unwrap_err().to_string();
    assert!(e.contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn path_lookup_and_binary_checks() {
    assert!(find_on_path("sh").is_some());
    assert!(find_on_path("capvisor-no-such-tool").is_none());
    let dir = tempfile::tempdir().unwrap();
    let e = check_binaries(dir.path()).unwrap_err().to_string();
    assert!(e.contains("capvisor-broker") && e.contains("cargo build"), "{e}");
}

#[test]
fn images_need_guest_init() {
    let dir = tempfile::tempdir().unwrap();
    let m = Manifest::default_manifest();
    let e = format!("{:#}", build_images(&m, dir.path(), &dir.path().join("no-init")).unwrap_err());
    assert!(e.contains("no-init") && e.contains("image base"), "{e}");
}
