//! The proxy's own confinement (`capvisor_proxy::sandbox::confine`),
//! applied to this test process: it runs without libtest's harness
//! (`harness = false`), so `main` is the only thread, as in the proxy.
//! After confinement the process cannot read a file outside the resolver
//! list, write anywhere or bind a TCP port, and can still resolve
//! `localhost` through the system resolver and connect to a loopback
//! listener it opened before. The parent run makes a scratch directory,
//! runs itself as the confined child, and removes the directory.

use std::io::{ErrorKind, Read, Write};

fn main() {
    if capvisor_confine::landlock::abi() < 4 {
        eprintln!("sandbox test skipped: Landlock ABI {} has no TCP rules", capvisor_confine::landlock::abi());
        return;
    }
    if let Some(dir) = std::env::var_os("CAPVISOR_SANDBOX_CHILD") {
        return child(std::path::Path::new(&dir));
    }
    let dir = std::env::temp_dir().join(format!("capvisor-proxy-sandbox-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .env("CAPVISOR_SANDBOX_CHILD", &dir)
        .output()
        .unwrap();
    let created = dir.join("new").exists();
    std::fs::remove_dir_all(&dir).unwrap();
    print!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!created, "the confined child created a file");
}

fn child(dir: &std::path::Path) {
    let secret = dir.join("secret");
    std::fs::write(&secret, "s").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();

    let status = capvisor_proxy::sandbox::confine().expect("confine");
    println!("confined: {status}");
    assert!(!status.contains("NOT enforced"), "{status}");

    let denied = |what: &str, r: std::io::Result<()>| {
        let e = r.err().unwrap_or_else(|| panic!("{what} must be refused"));
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{what}: {e}");
        println!("{what}: refused ({e})");
    };
    denied("read a file the test made", std::fs::read(&secret).map(|_| ()));
    denied("read /etc/passwd", std::fs::File::open("/etc/passwd").map(|_| ()));
    denied("create a file", std::fs::File::create(dir.join("new")).map(|_| ()));
    denied("bind a TCP port", std::net::TcpListener::bind("127.0.0.1:0").map(|_| ()));

    let addrs: Vec<_> =
        std::net::ToSocketAddrs::to_socket_addrs(&("localhost", port)).expect("resolve localhost").collect();
    assert!(addrs.iter().any(|a| a.ip().is_loopback()), "{addrs:?}");
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("TCP connect stays open");
    let (mut s, _) = listener.accept().unwrap();
    c.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    println!("resolve localhost and TCP connect: ok");
}
