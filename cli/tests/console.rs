//! A guest flooding its serial console under QEMU: the console log on the
//! host stays within `capvisor_vmm::engine::MAX_CONSOLE_LOG` (1 MiB) and
//! ends with the newest output (docs/bounds.md, "Guests").

mod common;
use common::*;

/// The one `console.log` below the server's directory for VM `vm`.
fn console_log(s: &Server, vm: &str) -> std::path::PathBuf {
    fn walk(dir: &std::path::Path, vm: &str, found: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, vm, found);
            } else if p.file_name().is_some_and(|n| n == "console.log")
                && p.parent().and_then(|d| d.file_name()).is_some_and(|n| n == vm)
            {
                found.push(p);
            }
        }
    }
    let mut found = Vec::new();
    walk(s.dir.path(), vm, &mut found);
    assert_eq!(found.len(), 1, "{found:?}");
    found.pop().unwrap()
}

#[test]
fn a_guest_flooding_its_console_leaves_at_most_the_bound_on_disk() {
    let s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--name", "flood"], None, 0);
    let log = console_log(&s, "flood");
    // 3 MiB to the serial console (three times the bound), then a marker.
    let sh = "head -c 3145728 /dev/zero | tr '\\0' x > /dev/ttyS0; echo; echo flood-done-7f3a > /dev/ttyS0";
    s.cli_ok("owner", &["vm", "exec", "flood", "--", "sh", "-c", sh], None, 0);
    let bound = 1 << 20;
    let t0 = std::time::Instant::now();
    loop {
        let text = std::fs::read(&log).unwrap();
        assert!(text.len() <= bound, "{} bytes on disk", text.len());
        if text.ends_with(b"flood-done-7f3a\r\n") || text.ends_with(b"flood-done-7f3a\n") {
            assert!(text.len() >= bound / 2, "the newest half at least is kept: {}", text.len());
            let xs = text.iter().filter(|&&b| b == b'x').count();
            assert!(xs >= bound / 4, "the flood itself is there too ({xs} bytes of it)");
            break;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(30), "the marker never reached the log");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The VM works on.
    let o = s.cli_ok("owner", &["vm", "exec", "flood", "--", "echo", "alive"], None, 0);
    assert_eq!(stdout(&o), "alive\n");
    s.cli_ok("owner", &["logout"], None, 0);
    s.stop();
}
