//! Persistent volumes end to end (issue 8): `capvisor volume` and
//! `vm create --volume` through a real `capvisor serve`, real guests under
//! QEMU, every confinement layer in force (the worker's Landlock domain
//! must hold the principal's volume directory, QEMU's the attached file).

mod common;
use common::*;
use std::path::PathBuf;

/// The host files of every principal's volume named `name`.
fn volume_files(s: &Server, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(s.state.join("volumes")).unwrap().flatten() {
        let f = d.path().join(format!("{name}.ext4"));
        if f.exists() {
            out.push(f);
        }
    }
    out
}

fn allocated(p: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn volumes_persist_are_exclusive_bounded_and_private() {
    let mut s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    let o = s.cli_ok("owner", &["volume", "create", "work", "--size", "64M"], None, 0);
    assert_eq!(stdout(&o), "work\n");
    // Same name again, bad names, a size past the bundle's total.
    let o = s.cli_ok("owner", &["volume", "create", "work", "--size", "16"], None, 16);
    assert!(stderr(&o).contains("alreadyExists"), "{}", stderr(&o));
    s.cli_ok("owner", &["volume", "create", "../x", "--size", "16"], None, 15);
    let o = s.cli_ok("owner", &["volume", "create", "huge", "--size", "20G"], None, 13);
    assert!(stderr(&o).contains("quota"), "{}", stderr(&o));
    let files = volume_files(&s, "work");
    assert_eq!(files.len(), 1, "one file for the volume");
    let file = files[0].clone();
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 64 << 20);
    assert!(allocated(&file) < 32 << 20, "sparse: {} bytes allocated", allocated(&file));
    assert!(volume_files(&s, "huge").is_empty(), "a refused create leaves nothing");

    // Write through one VM.
    s.cli_ok("owner", &["vm", "create", "--name", "a", "--volume", "work:/work"], None, 0);
    let o = s.cli_ok("owner", &["vm", "info", "a"], None, 0);
    assert!(stdout(&o).contains("volume   work on /work (rw)"), "{}", stdout(&o));
    s.cli_ok("owner", &["vm", "exec", "a", "--", "sh", "-c", "echo hello > /work/f && sync"], None, 0);
    let o = s.cli_ok("owner", &["volume", "list"], None, 0);
    assert!(stdout(&o).lines().any(|l| l.starts_with("work") && l.contains("a (rw)")), "{}", stdout(&o));

    // Read-write is exclusive: a second VM is refused, read-write or read-only.
    for spec in ["work:/work", "work:/work:ro"] {
        let o = s.cli_ok("owner", &["vm", "create", "--name", "b", "--volume", spec], None, 22);
        assert!(stderr(&o).contains("[inUse]") && stderr(&o).contains("\"a\""), "{}", stderr(&o));
    }
    let o = s.cli_ok("owner", &["vm", "list"], None, 0);
    assert!(!stdout(&o).contains("\nb "), "the refused VM is not listed: {}", stdout(&o));
    // Nor can it be removed while attached.
    s.cli_ok("owner", &["volume", "rm", "work"], None, 22);
    assert!(file.exists());

    // The volume's size is its quota: ENOSPC in the guest, the VM carries on.
    let o =
        s.cli("owner", &["vm", "exec", "a", "--", "dd", "if=/dev/zero", "of=/work/big", "bs=1M", "count=100"], None);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("No space left on device"), "{}", stderr(&o));
    s.cli_ok("owner", &["vm", "exec", "a", "--", "sh", "-c", "rm /work/big && sync && cat /work/f"], None, 0);
    assert!(allocated(&file) <= (64 << 20) + (1 << 20), "{} bytes on the host", allocated(&file));

    // Removing the VM ends its lease; the data stays. Read-only attaches
    // share the volume, and cannot write it.
    s.cli_ok("owner", &["vm", "rm", "a"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--name", "b", "--volume", "work:/data:ro"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--name", "c", "--volume", "work:/srv/w:ro"], None, 0);
    let o = s.cli_ok("owner", &["vm", "exec", "c", "--", "cat", "/srv/w/f"], None, 0);
    assert_eq!(stdout(&o), "hello\n");
    let o = s.cli("owner", &["vm", "exec", "b", "--", "sh", "-c", "echo x > /data/x"], None);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("Read-only file system"), "{}", stderr(&o));
    s.cli_ok("owner", &["vm", "create", "--name", "d", "--volume", "work:/w"], None, 22);
    s.cli_ok("owner", &["vm", "rm", "b"], None, 0);
    s.cli_ok("owner", &["vm", "rm", "c"], None, 0);

    // Another principal (profile user) sees none of it and has its own namespace.
    s.cli_ok("owner", &["account", "add", "bob", "--profile", "user", "--password-stdin"], Some(b"bob-pass-1\n"), 0);
    s.cli_ok("bob", &["login", "--user", "bob", "--password-stdin"], Some(b"bob-pass-1\n"), 0);
    let o = s.cli_ok("bob", &["volume", "list"], None, 0);
    assert_eq!(stdout(&o).lines().count(), 1, "only the header: {}", stdout(&o));
    let o = s.cli_ok("bob", &["vm", "create", "--name", "x", "--volume", "work:/w"], None, 11);
    assert!(stderr(&o).contains("no volume named"), "{}", stderr(&o));
    s.cli_ok("bob", &["volume", "rm", "work"], None, 11);
    s.cli_ok("bob", &["volume", "create", "work", "--size", "16M"], None, 0);
    assert_eq!(volume_files(&s, "work").len(), 2, "two principals, two files");
    s.cli_ok("bob", &["volume", "rm", "work"], None, 0);
    assert_eq!(volume_files(&s, "work"), vec![file.clone()], "bob's removal left the owner's volume");

    // Across a restart of the whole service.
    s.restart();
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--name", "e", "--volume", "work:/work"], None, 0);
    let o = s.cli_ok("owner", &["vm", "exec", "e", "--", "cat", "/work/f"], None, 0);
    assert_eq!(stdout(&o), "hello\n");
    s.cli_ok("owner", &["vm", "rm", "e"], None, 0);
    s.cli_ok("owner", &["volume", "rm", "work"], None, 0);
    assert!(!file.exists(), "volume rm deletes the file");
    let audit = std::fs::read_to_string(s.state.join("audit.jsonl")).unwrap();
    for action in ["volume.create", "volume.attach", "volume.remove"] {
        assert!(audit.contains(action), "audit has {action}");
    }
    s.cli_ok("owner", &["logout"], None, 0);
    s.cli_ok("bob", &["logout"], None, 0);
    s.stop();
}

/// On the `debian` image the unprivileged `agent` user owns a new
/// volume's root, so it can work there.
#[test]
fn the_debian_agent_writes_its_volume() {
    let s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["volume", "create", "home", "--size", "32M"], None, 0);
    let o = s.cli_ok(
        "owner",
        &[
            "run",
            "--image",
            "debian",
            "--volume",
            "home:/work",
            "--user",
            "agent",
            "--",
            "bash",
            "-c",
            "cd /work && git init -q r && echo ok > r/x && stat -c %U /work && findmnt -n -o FSTYPE /work",
        ],
        None,
        0,
    );
    assert_eq!(stdout(&o), "agent\next4\n");
    s.cli_ok("owner", &["vm", "create", "--name", "r", "--volume", "home:/v:ro"], None, 0);
    let o = s.cli_ok("owner", &["vm", "exec", "r", "--", "cat", "/v/r/x"], None, 0);
    assert_eq!(stdout(&o), "ok\n");
    s.cli_ok("owner", &["vm", "rm", "r"], None, 0);
    s.cli_ok("owner", &["logout"], None, 0);
    s.stop();
}
