//! `capvisor vm port NAME HOSTPORT:GUESTPORT` end to end (issue 9, item 7):
//! a host loopback listener whose connections reach a server inside a real
//! guest through `Vm.connect`, with no network in the guest at all.

mod common;
use common::*;
use std::io::{BufRead, Read, Write};
use std::process::{Command, Stdio};

#[test]
fn vm_port_forwards_host_loopback_connections_to_a_guest_server() {
    let s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--name", "w"], None, 0);
    // busybox httpd on the guest's loopback only; it daemonizes.
    s.cli_ok(
        "owner",
        &[
            "vm",
            "exec",
            "w",
            "--",
            "sh",
            "-c",
            "mkdir -p /tmp/www && echo inside > /tmp/www/index.html && httpd -p 127.0.0.1:8000 -h /tmp/www",
        ],
        None,
        0,
    );
    let mut fwd = Command::new(bin_dir().join("capvisor"))
        .args(["vm", "port", "w", "0:8000"])
        .env("CAPVISOR_SOCKET", &s.socket)
        .env("CAPVISOR_CONFIG_DIR", s.config_dir("owner"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A failed assertion below must not leave the forwarder running.
    struct Reap(u32);
    impl Drop for Reap {
        fn drop(&mut self) {
            // SAFETY: kill(2) takes plain integers; the child is not
            // reaped while this guard is armed (it is forgotten first).
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
    let reap = Reap(fwd.id());
    // The forwarder's stderr, read as it comes.
    let err_text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    {
        let (err_text, mut pipe) = (err_text.clone(), fwd.stderr.take().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                err_text.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
    }
    let mut line = String::new();
    std::io::BufReader::new(fwd.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port: u16 = line.trim().parse().unwrap_or_else(|_| panic!("vm port printed {line:?}"));
    let get = |path: &str| {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
        write!(c, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    };
    let out = get("/index.html");
    assert!(out.starts_with("HTTP/1.") && out.ends_with("inside\n"), "{out}");
    // Several connections, one after another and at once.
    let handles: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                c.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
                c.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").unwrap();
                let mut out = String::new();
                c.read_to_string(&mut out).unwrap();
                out
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap().ends_with("inside\n"));
    }
    // The guest saw connections from its own loopback (the forward is a
    // guest-local connect, not a network path into the VM).
    let o = s.cli_ok("owner", &["vm", "exec", "w", "--", "sh", "-c", "ls /sys/class/net"], None, 0);
    assert_eq!(stdout(&o), "lo\n", "the guest has no NIC");
    // Nothing on the port: the forwarder reports it and keeps serving.
    s.cli_ok(
        "owner",
        &["vm", "exec", "w", "--", "sh", "-c", "kill $(pidof httpd) && while pidof httpd; do sleep 0.1; done"],
        None,
        0,
    );
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let _ = c.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    assert!(out.is_empty(), "no server, no bytes: {:?}", String::from_utf8_lossy(&out));
    // Audited.
    let audit = std::fs::read_to_string(s.state.join("audit.jsonl")).unwrap();
    assert!(audit.contains("vm.connect"), "audit has vm.connect");
    // The failed connect is reported (the host side may see its socket
    // closed a moment before the forwarder prints why).
    let t0 = std::time::Instant::now();
    let reported = || {
        let e = err_text.lock().unwrap();
        e.contains("nothing answers") && e.contains("[unavailable]")
    };
    while !reported() && t0.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(reported(), "the failed connect is reported: {}", err_text.lock().unwrap());
    // SAFETY: kill(2) takes plain integers; the child is not reaped yet.
    unsafe { libc::kill(fwd.id() as i32, libc::SIGINT) };
    std::mem::forget(reap);
    assert!(fwd.wait().unwrap().success(), "vm port ends cleanly on Ctrl-C");
    s.cli_ok("owner", &["vm", "rm", "w"], None, 0);
    s.cli_ok("owner", &["logout"], None, 0);
    s.stop();
}
