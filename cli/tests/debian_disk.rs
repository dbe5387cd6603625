//! The `debian` image's disk end to end through `capvisor serve` (issue 8):
//! the per-VM writable layer is the guest's disk quota (ENOSPC inside the
//! guest at its size, the host file never larger, another VM unaffected,
//! the layer deleted with the VM), and a wheel copied in with `vm cp`
//! installs with pip into a venv with no network.
//!
//! Needs `cargo build --workspace` first and python3 on the host (it
//! writes the test's wheel). The debian image comes from the user's cache
//! (`~/.cache/capvisor`, built once by the first `capvisor serve`); the
//! small writable layer of the first test does not change its cache key.

mod common;
use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// The writable layer this file's first test gives each debian VM, MiB.
const LAYER_MIB: u64 = 64;

/// The default manifest with debian's writable layer cut to [`LAYER_MIB`].
fn small_layer_manifest() -> String {
    let default = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifest/default.toml")).unwrap();
    let from = "writable_mib = 2048";
    assert!(default.contains(from), "manifest/default.toml no longer says `{from}`");
    default.replace(from, &format!("writable_mib = {LAYER_MIB}"))
}

/// The writable layer file of `vm` (`state/sessions/<session>/<vm>/writable.ext4`),
/// wherever the session's run dir is.
fn layer_of(s: &Server, vm: &str) -> PathBuf {
    let sessions = s.state.join("sessions");
    let found: Vec<PathBuf> = std::fs::read_dir(&sessions)
        .unwrap_or_else(|e| panic!("{}: {e}", sessions.display()))
        .flatten()
        .map(|d| d.path().join(vm).join("writable.ext4"))
        .filter(|p| p.exists())
        .collect();
    assert_eq!(found.len(), 1, "writable layers of {vm}: {found:?}");
    found.into_iter().next().unwrap()
}

/// Runs `script` with `bash -c` in `vm` as root; returns (exit code, stdout, stderr).
fn sh(s: &Server, vm: &str, script: &str) -> (Option<i32>, String, String) {
    let o = s.cli("owner", &["vm", "exec", vm, "--", "bash", "-c", script], None);
    (o.status.code(), stdout(&o), stderr(&o))
}

/// The bytes dd(1) says it copied (its `N bytes (...) copied, ...` line).
fn dd_bytes(stderr: &str) -> u64 {
    stderr
        .lines()
        .find(|l| l.contains(" bytes ") && l.contains("copied"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in dd's output: {stderr:?}"))
}

#[test]
fn the_writable_layer_is_the_vms_disk_quota_and_goes_with_the_vm() {
    let s = Server::start(Some(&small_layer_manifest()));
    s.cli_ok("owner", &["login"], None, 0);
    for vm in ["full", "other"] {
        s.cli_ok("owner", &["vm", "create", "--image", "debian", "--name", vm], None, 0);
    }
    let layer = layer_of(&s, "full");
    let limit = LAYER_MIB << 20;
    assert_eq!(std::fs::metadata(&layer).unwrap().len(), limit, "the layer is made at its size");

    // df in the guest shows the layer's size (ext4's own metadata aside).
    let (c, out, err) = sh(&s, "full", "df -k --output=size / | tail -1");
    assert_eq!(c, Some(0), "{err}");
    let size_kib: u64 = out.trim().parse().unwrap_or_else(|_| panic!("df: {out:?}"));
    assert!(
        size_kib * 1024 <= limit && size_kib * 1024 >= limit * 3 / 4,
        "df says / is {size_kib} KiB for a {LAYER_MIB} MiB layer"
    );

    // Writing past the size fails with ENOSPC, after filling what there is.
    let (c, _, err) = sh(&s, "full", &format!("dd if=/dev/zero of=/root/big bs=1M count={}", 2 * LAYER_MIB));
    assert_eq!(c, Some(1), "dd past the layer's size must fail: {err}");
    assert!(err.contains("No space left on device"), "{err}");
    let written = dd_bytes(&err);
    assert!(written >= limit / 2 && written <= limit, "dd wrote {written} bytes into a {limit} byte layer: {err}");
    let (c, out, err) = sh(&s, "full", "sync; df -k --output=avail / | tail -1");
    assert_eq!(c, Some(0), "{err}");
    assert!(out.trim().parse::<u64>().unwrap() < 2048, "the layer is full: {out} KiB left");

    // On the host the layer holds the data but never more than its size.
    let m = std::fs::metadata(&layer).unwrap();
    assert_eq!(m.len(), limit, "the layer never grows past its size");
    let used = m.blocks() * 512;
    println!(
        "figures: {LAYER_MIB} MiB layer: df size {size_kib} KiB, dd wrote {written} bytes before ENOSPC, host file \
         uses {used} bytes"
    );
    assert!(used <= limit + (1 << 20), "{} uses {used} bytes on the host", layer.display());
    assert!(used >= written / 2, "the guest's {written} bytes landed in {} ({used} bytes used)", layer.display());

    // The VM keeps working: after the delete a small write succeeds.
    let (c, out, err) = sh(&s, "full", "rm /root/big && echo after > /root/small && cat /root/small");
    assert_eq!((c, out.as_str()), (Some(0), "after\n"), "{err}");

    // Another VM's layer is its own: it writes what the full one could not.
    let (c, out, err) =
        sh(&s, "other", "dd if=/dev/zero of=/root/f bs=1M count=16 2>/dev/null && sync && du -m /root/f");
    assert_eq!(c, Some(0), "{err}");
    assert!(out.starts_with("16\t"), "{out}");
    let other_layer = layer_of(&s, "other");
    assert_ne!(other_layer, layer);

    // Removing a VM deletes its layer, and only its.
    s.cli_ok("owner", &["vm", "rm", "full"], None, 0);
    assert!(!layer.exists(), "{} kept after vm rm", layer.display());
    assert!(other_layer.exists());
    let (c, out, _) = sh(&s, "other", "du -m /root/f");
    assert_eq!((c, out.starts_with("16\t")), (Some(0), true), "{out}");
    s.cli_ok("owner", &["vm", "rm", "other"], None, 0);
    assert!(!other_layer.exists(), "{} kept after vm rm", other_layer.display());
    s.cli_ok("owner", &["logout"], None, 0);
    s.stop();
}

#[test]
fn a_wheel_copied_in_with_vm_cp_installs_with_pip_without_network() {
    let dir = tempfile::tempdir().unwrap();
    let whl = make_wheel(dir.path());
    let s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--image", "debian", "--name", "py"], None, 0);
    let dst = "py:/tmp/capsum-1.0-py3-none-any.whl";
    s.cli_ok("owner", &["vm", "cp", whl.to_str().unwrap(), dst], None, 0);
    // The guest has no network: pip must not need an index.
    let (c, out, _) = sh(&s, "py", "ls /sys/class/net");
    assert_eq!((c, out.as_str()), (Some(0), "lo\n"), "the guest has no network interface but lo");

    let script = "python3 -m venv ~/v && ~/v/bin/pip install -q --no-index --disable-pip-version-check \
                  /tmp/capsum-1.0-py3-none-any.whl && cd / && ~/v/bin/python -c \
                  'import capsum; print(capsum.squares(10)); print(capsum.__file__)'";
    let o = s.cli("owner", &["vm", "exec", "--user", "agent", "py", "--", "bash", "-c", script], None);
    assert_eq!(o.status.code(), Some(0), "stdout: {}\nstderr: {}", stdout(&o), stderr(&o));
    assert_eq!(
        stdout(&o),
        "385\n/home/agent/v/lib/python3.11/site-packages/capsum/__init__.py\n",
        "stderr: {}",
        stderr(&o)
    );
    // Installed into the agent's venv only: the system python does not have it.
    let o = s.cli("owner", &["vm", "exec", "--user", "agent", "py", "--", "python3", "-c", "import capsum"], None);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("No module named 'capsum'"), "{}", stderr(&o));
    s.cli_ok("owner", &["vm", "rm", "py"], None, 0);
    s.cli_ok("owner", &["logout"], None, 0);
    s.stop();
}
