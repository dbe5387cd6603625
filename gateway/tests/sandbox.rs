//! The gateway's self-confinement (`capvisor_gateway::sandbox`) in a real
//! process. `harness = false`: `confine` must run single-threaded, and
//! libtest runs each test on a thread of its own. `main` runs this binary
//! again once per role; each child confines itself and then tries one
//! thing.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};

const ROLE: &str = "CAPVISOR_SANDBOX_TEST_ROLE";

fn child(role: &str) -> Output {
    Command::new(std::env::current_exe().unwrap()).env(ROLE, role).output().unwrap()
}

fn run_role(role: &str) {
    let report = capvisor_gateway::sandbox::confine().expect("confine");
    println!("confined: {report}");
    match role {
        "serve" => {
            // What serving needs still works: memory, time, socket I/O on
            // descriptors made before, and writing the log.
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap_or_else(|e| panic!("pair: {e}"));
            drop((a, b));
            println!("pair made after confining?");
        }
        "io" => {
            use std::io::{Read, Write};
            let v: Vec<u8> = vec![7; 1 << 20];
            let t = std::time::Instant::now();
            println!("still-working {} {}", v.len(), t.elapsed() < std::time::Duration::from_secs(5));
            let (mut a, mut b) = PAIR.with(|p| p.take()).expect("pair");
            a.write_all(b"ping").unwrap();
            let mut buf = [0u8; 4];
            b.read_exact(&mut buf).unwrap();
            println!("socket-io {}", String::from_utf8_lossy(&buf));
        }
        "open" => println!("open returned {:?}", std::fs::read("/etc/hostname")),
        "connect" => println!("connect returned {:?}", std::os::unix::net::UnixStream::connect("/nonexistent")),
        "exec" => println!("exec returned {:?}", Command::new("/bin/true").status()),
        "signal" => println!("kill returned {}", unsafe_kill_parent()),
        other => panic!("unknown role {other}"),
    }
}

thread_local! {
    static PAIR: std::cell::Cell<Option<(std::os::unix::net::UnixStream, std::os::unix::net::UnixStream)>> =
        const { std::cell::Cell::new(None) };
}

fn unsafe_kill_parent() -> i32 {
    // SAFETY: kill(2) with a pid and signal 0 (existence check) only.
    unsafe { libc::kill(libc::getppid(), 0) }
}

fn main() {
    if let Ok(role) = std::env::var(ROLE) {
        // Descriptors the gateway holds before confining (its listener and
        // broker sockets) keep working after.
        PAIR.with(|p| p.set(Some(std::os::unix::net::UnixStream::pair().unwrap())));
        run_role(&role);
        return;
    }
    let ok = child("io");
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{:?}\n{out}\n{}", ok.status, String::from_utf8_lossy(&ok.stderr));
    assert!(out.contains("still-working 1048576 true"), "{out}");
    assert!(out.contains("socket-io ping"), "{out}");
    assert!(out.contains("confined: landlock fully enforced") || out.contains("confined: landlock partially"), "{out}");
    // Making a new socket, opening a file, connecting, exec'ing and
    // signalling another process: killed by seccomp (SIGSYS), no answer.
    for bad in ["serve", "open", "connect", "exec", "signal"] {
        let o = child(bad);
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.signal(), Some(libc::SIGSYS), "{bad}: {:?}\n{out}", o.status);
        assert!(!out.contains("returned") && !out.contains("after confining"), "{bad} was not stopped: {out}");
    }
    println!("sandbox: 6 roles checked");
}
