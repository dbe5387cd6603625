//! PID 1 reaping on the host: this test process becomes a child subreaper
//! (prctl(2) `PR_SET_CHILD_SUBREAPER`), so orphans of the programs it
//! starts are re-parented to it exactly as they would be to PID 1, and the
//! reaper runs in `waitpid(-1)` mode. Its own test binary, because
//! `waitpid(-1)` would steal other tests' children.

use capvisor_guest_init::exec::{self, ExecRequest};
use capvisor_guest_init::reaper;
use capvisor_rpc::sink::CollectSink;
use capvisor_schema::common_capnp::exit_status;
use std::time::Duration;

/// Pids of our children that are zombies, from /proc/*/stat.
fn zombie_children() -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r.trim().to_string()) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 1 && f[0] == "Z" && f[1].parse::<i32>() == Ok(me) {
            out.push(pid);
        }
    }
    out
}

fn children() -> usize {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.split_whitespace().nth(1) == Some(me.as_str())))
                .unwrap_or(false)
        })
        .count()
}

#[test]
fn orphans_are_reaped_and_statuses_still_delivered() {
    // SAFETY: plain prctl.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }, 0);
    reaper::set_reap_all(true);
    capvisor_rpc::conn::run_local(async {
        reaper::ensure_started();
        // The shell exits at once; its backgrounded subshell's sleeps are
        // orphaned to us.
        let req = ExecRequest {
            argv: ["sh", "-c", "(sleep 0.3 >/dev/null 2>&1 & sleep 0.3 >/dev/null 2>&1 &) ; exit 7"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            ..Default::default()
        };
        let (o, orx) = CollectSink::client(1 << 20);
        let (e, erx) = CollectSink::client(1 << 20);
        let p = exec::start(req, o, e).unwrap();
        let w = p.wait_request().send().promise.await.unwrap();
        match w.get().unwrap().get_status().unwrap().which().unwrap() {
            exit_status::Code(c) => assert_eq!(c, 7),
            exit_status::Signal(s) => panic!("signal {s}"),
        }
        let _ = (orx.await, erx.await);
        // The sleeps are alive and ours now.
        assert!(children() >= 2, "orphans were not re-parented to us");
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(zombie_children(), Vec::<i32>::new(), "orphans left as zombies");
        assert_eq!(children(), 0);
    });
}
