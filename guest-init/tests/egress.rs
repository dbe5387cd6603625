//! The real egress steering (AnyIP route, sockmap, sk_lookup program,
//! relay) in a fresh network namespace of a dedicated thread, against a
//! fake host `Egress` served in-process over a socketpair: what a guest
//! program sees, and what reaches the host.
//!
//! Needs root (CAP_NET_ADMIN, CAP_BPF) and a kernel with BPF sk_lookup
//! (>= 5.9); otherwise each test prints why and passes without running.
//! Nothing leaves the namespace (it has only `lo`).

use capnp::capability::Rc as CapRc;
use capvisor_guest_init::egress::{Relay, RelayLimits, Steering};
use capvisor_rpc::conn::{self, INTERNAL};
use capvisor_rpc::CvError;
use capvisor_schema::common_capnp::byte_sink;
use capvisor_schema::guest_capnp::egress;
use std::cell::RefCell;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::rc::Rc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// What the fake host saw.
#[derive(Default)]
struct Seen {
    resolves: Vec<String>,
    connects: Vec<(String, u16)>,
}

/// The fake `Egress`: `resolve` allows `api.test` only; `connect` records
/// (host, port) and echoes the guest's bytes back, except: host
/// `10.9.9.9` is denied, and host `203.0.113.9` gets a sink while `down` is
/// dropped at once (upstream failed after connecting).
struct FakeEgress {
    seen: Rc<RefCell<Seen>>,
}

impl egress::Server for FakeEgress {
    async fn resolve(
        self: CapRc<Self>,
        params: egress::ResolveParams,
        mut results: egress::ResolveResults,
    ) -> capnp::Result<()> {
        let name = params.get()?.get_name()?.to_string()?;
        results.get().set_allowed(name == "api.test");
        self.seen.borrow_mut().resolves.push(name);
        Ok(())
    }

    async fn connect(
        self: CapRc<Self>,
        params: egress::ConnectParams,
        mut results: egress::ConnectResults,
    ) -> capnp::Result<()> {
        let p = params.get()?;
        let host = p.get_host()?.to_string()?;
        let port = p.get_port();
        let down = p.get_down()?;
        self.seen.borrow_mut().connects.push((host.clone(), port));
        match host.as_str() {
            "10.9.9.9" => Err(CvError::denied("no rule allows 10.9.9.9").to_rpc()),
            "203.0.113.9" => {
                drop(down);
                results.get().set_up(capnp_rpc::new_client(Echo { down: None }));
                Ok(())
            }
            _ => {
                results.get().set_up(capnp_rpc::new_client(Echo { down: Some(down) }));
                Ok(())
            }
        }
    }
}

/// The upstream of the fake: whatever the guest writes comes back down.
struct Echo {
    down: Option<byte_sink::Client>,
}

impl byte_sink::Server for Echo {
    async fn write(self: CapRc<Self>, params: byte_sink::WriteParams) -> capnp::Result<()> {
        let data = params.get()?.get_data()?;
        let Some(down) = &self.down else { return Ok(()) };
        let mut req = down.write_request();
        req.get().set_data(data);
        req.send().await
    }

    async fn done(self: CapRc<Self>, _: byte_sink::DoneParams, _: byte_sink::DoneResults) -> capnp::Result<()> {
        if let Some(down) = &self.down {
            down.done_request().send().promise.await?;
        }
        Ok(())
    }
}

struct Env {
    relay: Rc<Relay>,
    seen: Rc<RefCell<Seen>>,
}

/// Runs `body` on a thread with its own network namespace (lo up, the
/// steering set up, the relay running against [`FakeEgress`] over a capnp
/// connection on a socketpair). Returns without running it, after saying
/// why, when the host cannot do this.
fn with_steering<F, Fut>(limits: RelayLimits, body: F)
where
    F: FnOnce(Env) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    // SAFETY: geteuid(2) only reads.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root for a network namespace, a route and bpf(2)");
        return;
    }
    let t = std::thread::spawn(move || {
        // SAFETY: unshare(2) of this thread's network namespace only.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!("skipped: unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
            return;
        }
        capvisor_guest_init::init::loopback_up();
        let steering = match Steering::setup() {
            Ok(s) => s,
            Err(e) if e.step.starts_with("bpf") => {
                eprintln!("skipped: this host refuses the BPF steering: {e}");
                return;
            }
            Err(e) => panic!("steering set-up failed: {e}"),
        };
        conn::run_local(async move {
            let seen = Rc::new(RefCell::new(Seen::default()));
            let (a, b) = tokio::net::UnixStream::pair().unwrap();
            let fake: egress::Client = capnp_rpc::new_client(FakeEgress { seen: seen.clone() });
            let (_none, _h): (egress::Client, _) = conn::serve(a, fake.client, INTERNAL);
            let (host, _h2): (egress::Client, _) = conn::connect(b, None, INTERNAL);
            let relay = Relay::new(limits);
            relay.set_upstream(Some(host));
            tokio::task::spawn_local(relay.clone().run(steering));
            tokio::time::timeout(Duration::from_secs(60), body(Env { relay, seen })).await.expect("test timed out");
        });
    });
    t.join().expect("test thread panicked");
}

fn a_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut p = id.to_be_bytes().to_vec();
    p.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in name.split('.') {
        p.push(l.len() as u8);
        p.extend_from_slice(l.as_bytes());
    }
    p.extend_from_slice(&[0, (qtype >> 8) as u8, qtype as u8, 0, 1]);
    p
}

/// Asks `server` (from a socket connected to it, so an answer from any
/// other address would be dropped) and returns (rcode, answer addresses).
async fn ask(server: SocketAddrV4, name: &str, qtype: u16) -> (u8, Vec<Ipv4Addr>) {
    let s = UdpSocket::bind("0.0.0.0:0").await.unwrap();
    s.connect(server).await.unwrap();
    let q = a_query(0x4242, name, qtype);
    s.send(&q).await.unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), s.recv(&mut buf)).await.expect("no DNS answer").unwrap();
    let r = &buf[..n];
    assert_eq!(&r[..2], &[0x42, 0x42], "id");
    assert!(r[2] & 0x80 != 0, "a response");
    let ancount = u16::from_be_bytes([r[6], r[7]]) as usize;
    // Question echoed, then fixed-size A records (name pointer, 10 bytes, 4 of data).
    let mut addrs = Vec::new();
    let mut at = q.len();
    for _ in 0..ancount {
        assert_eq!(&r[at..at + 4], &[0xc0, 12, 0, 1], "A record for the question's name");
        addrs.push(Ipv4Addr::new(r[at + 12], r[at + 13], r[at + 14], r[at + 15]));
        at += 16;
    }
    assert_eq!(at, n, "nothing after the answers");
    (r[3] & 0xf, addrs)
}

/// Sends `msg`, half-closes, and reads until EOF.
async fn echo_round(mut s: TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await.expect("echo stalled").unwrap();
    got
}

/// Reads until the connection ends; `Err` with the io kind of a failure.
async fn read_end(s: &mut TcpStream) -> Result<usize, std::io::ErrorKind> {
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.expect("not closed in 5 s") {
        Ok(n) => Ok(n),
        Err(e) => Err(e.kind()),
    }
}

#[test]
fn tcp_to_an_address_is_relayed_with_its_literal_and_echoes() {
    with_steering(RelayLimits::default(), |env| async move {
        let s = TcpStream::connect("93.184.216.34:443").await.unwrap();
        assert_eq!(s.peer_addr().unwrap().to_string(), "93.184.216.34:443");
        assert_eq!(echo_round(s, b"GET / HTTP/1.0\r\n\r\n").await, b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(env.seen.borrow().connects, vec![("93.184.216.34".to_string(), 443)]);
        // A dual-stack IPv6 socket to an IPv4-mapped address takes the IPv4
        // path: steered and relayed the same way.
        let s = TcpStream::connect("[::ffff:93.184.216.34]:80").await.unwrap();
        assert_eq!(echo_round(s, b"mapped").await, b"mapped");
        assert_eq!(env.seen.borrow().connects[1], ("93.184.216.34".to_string(), 80));

        // A megabyte both ways: many CHUNK-sized writes under flow control.
        let data: Vec<u8> = (0..1_048_576u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let s = TcpStream::connect("192.0.2.1:8080").await.unwrap();
        let (mut rd, mut wr) = s.into_split();
        let sent = data.clone();
        let writer = tokio::task::spawn_local(async move {
            wr.write_all(&sent).await.unwrap();
            wr.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), rd.read_to_end(&mut got)).await.unwrap().unwrap();
        writer.await.unwrap();
        assert!(got == data, "{} bytes came back, {} sent, or they differ", got.len(), data.len());
        assert_eq!(env.seen.borrow().connects[2], ("192.0.2.1".to_string(), 8080));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(env.relay.active(), 0, "finished relays are gone");
    });
}

#[test]
fn dns_answers_fake_addresses_for_allowed_names_and_connects_by_name() {
    with_steering(RelayLimits::default(), |env| async move {
        let (code, via_anyone) = ask(SocketAddrV4::new(Ipv4Addr::new(8, 8, 8, 8), 53), "api.test", 1).await;
        assert_eq!((code, via_anyone.len()), (0, 1));
        let addr = via_anyone[0];
        assert_eq!((addr.octets()[0], addr.octets()[1] & 0xfe), (198, 18), "{addr} is in 198.18.0.0/15");
        let (code, via_stub) = ask(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 53), 53), "API.test", 1).await;
        assert_eq!((code, via_stub), (0, vec![addr]), "same name, same address");

        let s = TcpStream::connect(SocketAddrV4::new(addr, 80)).await.unwrap();
        assert_eq!(echo_round(s, b"hello").await, b"hello");
        assert_eq!(env.seen.borrow().connects, vec![("api.test".to_string(), 80)]);

        // Not allowed: NXDOMAIN, for AAAA too. Allowed AAAA: no answers.
        assert_eq!(ask(SocketAddrV4::new(Ipv4Addr::new(1, 1, 1, 1), 53), "evil.test", 1).await, (3, vec![]));
        assert_eq!(ask(SocketAddrV4::new(Ipv4Addr::new(1, 1, 1, 1), 53), "evil.test", 28).await, (3, vec![]));
        assert_eq!(ask(SocketAddrV4::new(Ipv4Addr::new(1, 1, 1, 1), 53), "api.test", 28).await, (0, vec![]));
        assert_eq!(env.seen.borrow().resolves, vec!["api.test", "api.test", "evil.test", "evil.test", "api.test"]);

        // A fake address never handed out is reset and not relayed.
        let mut s = TcpStream::connect("198.19.200.1:80").await.unwrap();
        let _ = s.write_all(b"x").await;
        assert_eq!(read_end(&mut s).await, Err(std::io::ErrorKind::ConnectionReset));
        assert_eq!(env.seen.borrow().connects.len(), 1);
    });
}

#[test]
fn denied_and_failed_connects_reset_and_loopback_stays_local() {
    with_steering(RelayLimits::default(), |env| async move {
        // Denied by the host: the guest's connection is reset (not a clean EOF).
        let mut s = TcpStream::connect("10.9.9.9:443").await.unwrap();
        assert_eq!(read_end(&mut s).await, Err(std::io::ErrorKind::ConnectionReset));
        // The host dropped `down` without `done`: reset too.
        let mut s = TcpStream::connect("203.0.113.9:443").await.unwrap();
        assert_eq!(read_end(&mut s).await, Err(std::io::ErrorKind::ConnectionReset));
        assert_eq!(env.seen.borrow().connects, vec![("10.9.9.9".to_string(), 443), ("203.0.113.9".to_string(), 443)]);

        // Loopback is not steered: no listener there means refused, locally.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let e = TcpStream::connect(("127.0.0.1", port)).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
        // And a loopback listener of a guest program still gets its connections.
        let local = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
        let _c = TcpStream::connect(local.local_addr().unwrap()).await.unwrap();
        let (_a, _) = local.accept().await.unwrap();
        assert_eq!(env.seen.borrow().connects.len(), 2, "nothing more was relayed");

        // Host gone: new connections reset, questions SERVFAIL.
        env.relay.set_upstream(None);
        let mut s = TcpStream::connect("93.184.216.34:443").await.unwrap();
        assert_eq!(read_end(&mut s).await, Err(std::io::ErrorKind::ConnectionReset));
        assert_eq!(ask(SocketAddrV4::new(Ipv4Addr::new(8, 8, 8, 8), 53), "api.test", 1).await, (2, vec![]));
        assert_eq!(env.seen.borrow().connects.len(), 2);
    });
}

#[test]
fn connections_beyond_the_bound_are_reset() {
    let limits = RelayLimits { connections: 2, ..RelayLimits::default() };
    with_steering(limits, |env| async move {
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect("192.0.2.7:22").await.unwrap();
            s.write_all(b"ping").await.unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await.unwrap();
            held.push(s);
        }
        assert_eq!(env.relay.active(), 2);
        let mut third = TcpStream::connect("192.0.2.7:22").await.unwrap();
        assert_eq!(read_end(&mut third).await, Err(std::io::ErrorKind::ConnectionReset));
        assert_eq!(env.seen.borrow().connects.len(), 2, "the third never reached the host");
        // One closes; a new one is admitted.
        let first = held.remove(0);
        assert_eq!(echo_round(first, b"").await, b"");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(env.relay.active(), 1);
        let s = TcpStream::connect("192.0.2.7:22").await.unwrap();
        assert_eq!(echo_round(s, b"again").await, b"again");
    });
}

/// One newc (SVR4 cpio) entry, as `vm_boot.rs` builds them.
fn newc_entry(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8], ino: u32) {
    let namez = format!("{name}\0");
    let fields = [ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, 0, 0, namez.len() as u32, 0];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(namez.as_bytes());
    while out.len() & 3 != 0 {
        out.push(0);
    }
    out.extend_from_slice(data);
    while out.len() & 3 != 0 {
        out.push(0);
    }
}

/// Runs `sh -c script` in the guest: (exit code, stdout + stderr).
async fn sh(g: &capvisor_schema::guest_capnp::guest::Client, script: &str) -> (i32, String) {
    use capvisor_rpc::sink::CollectSink;
    use capvisor_schema::common_capnp::exit_status;
    let (o, orx) = CollectSink::client(1 << 20);
    let (e, erx) = CollectSink::client(1 << 20);
    let mut q = g.exec_request();
    {
        let mut p = q.get();
        p.set_stdout(o);
        p.set_stderr(e);
        let mut a = p.init_spec().init_argv(3);
        a.set(0, "sh");
        a.set(1, "-c");
        a.set(2, script);
    }
    let p = q.send().promise.await.unwrap().get().unwrap().get_process().unwrap();
    let w = p.wait_request().send().promise.await.unwrap();
    let code = match w.get().unwrap().get_status().unwrap().which().unwrap() {
        exit_status::Code(c) => c,
        exit_status::Signal(s) => 128 + s,
    };
    let mut out = orx.await.unwrap();
    out.extend(erx.await.unwrap());
    (code, String::from_utf8_lossy(&out).into_owned())
}

/// A real guest (QEMU microvm, TCG) booted with `capvisor.egress=1` and the
/// `capvisor.egress` port, whose host end serves [`FakeEgress`]: busybox
/// programs in the guest reach it, and only it. Ignored by default; run
/// like `vm_boot.rs` (CV_KERNEL must have `CONFIG_BPF_SYSCALL`):
/// ```text
/// CV_KERNEL=.../vmlinux CV_INITRAMFS=.../initramfs.cpio CV_GUEST_INIT=<static guest-init> \
///     cargo test -p capvisor-guest-init --test egress -- --ignored --nocapture
/// ```
#[test]
#[ignore = "boots a VM under QEMU; needs CV_KERNEL, CV_INITRAMFS, CV_GUEST_INIT"]
fn vm_busybox_programs_go_through_egress() {
    use std::io::Write;
    use std::os::fd::IntoRawFd;
    use std::os::unix::process::CommandExt;
    let var = |n: &str| std::env::var(n).unwrap_or_else(|_| panic!("set {n}"));
    let (kernel, base, init) = (var("CV_KERNEL"), var("CV_INITRAMFS"), var("CV_GUEST_INIT"));
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initramfs.cpio");
    let mut img = std::fs::read(&base).unwrap();
    while img.len() & 3 != 0 {
        img.push(0);
    }
    newc_entry(&mut img, "init", 0o100755, &std::fs::read(&init).unwrap(), 900_001);
    newc_entry(&mut img, "TRAILER!!!", 0, b"", 0);
    std::fs::File::create(&initrd).unwrap().write_all(&img).unwrap();
    let console = dir.path().join("console.log");

    let (agent, agent_q) = std::os::unix::net::UnixStream::pair().unwrap();
    let (eg, eg_q) = std::os::unix::net::UnixStream::pair().unwrap();
    let (fa, fe) = (agent_q.into_raw_fd(), eg_q.into_raw_fd());
    // As vm_boot.rs: TCG gives the guest no timer to calibrate the TSC against.
    let tsc = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("cpu MHz")).map(|l| l.to_string()))
        .and_then(|l| l.split(':').nth(1).and_then(|v| v.trim().parse::<f64>().ok()))
        .map(|m| format!(" tsc_early_khz={}", (m * 1000.0).round() as u64))
        .unwrap_or_default();
    let mut cmd = std::process::Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm,x-option-roms=off,rtc=off", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-m", "256", "-smp", "2"])
        .args(["-kernel", &kernel, "-initrd", initrd.to_str().unwrap()])
        .args(["-append", &format!("console=ttyS0 reboot=t panic=-1 rdinit=/init capvisor.egress=1{tsc}")])
        .args(["-serial", &format!("file:{}", console.display())])
        .args(["-device", "virtio-serial-device"])
        .args(["-chardev", "socket,id=ag,fd=3", "-device", "virtserialport,chardev=ag,name=capvisor.agent"])
        .args(["-chardev", "socket,id=eg,fd=4", "-device", "virtserialport,chardev=eg,name=capvisor.egress"]);
    // SAFETY: dup2 is async-signal-safe; the descriptors are open in the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fa, 3) < 0 || libc::dup2(fe, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut qemu = cmd.spawn().expect("qemu-system-x86_64");
    // SAFETY: both came from into_raw_fd above; the child has its copies.
    unsafe {
        libc::close(fa);
        libc::close(fe);
    }
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        conn::run_local(async {
            agent.set_nonblocking(true).unwrap();
            eg.set_nonblocking(true).unwrap();
            let seen = Rc::new(RefCell::new(Seen::default()));
            let fake: egress::Client = capnp_rpc::new_client(FakeEgress { seen: seen.clone() });
            let eg = tokio::net::UnixStream::from_std(eg).unwrap();
            let (_none, _h1): (egress::Client, _) = conn::serve(eg, fake.client, INTERNAL);
            let agent = tokio::net::UnixStream::from_std(agent).unwrap();
            let (g, _h2): (capvisor_schema::guest_capnp::guest::Client, _) = conn::connect(agent, None, INTERNAL);
            tokio::time::timeout(Duration::from_secs(90), g.hello_request().send().promise)
                .await
                .expect("hello within 90 s")
                .unwrap();
            let (c, out) = sh(&g, "cat /etc/resolv.conf").await;
            assert_eq!((c, out.as_str()), (0, "nameserver 127.0.0.53\n"));
            let (c, out) = sh(&g, "printf hello | nc -w 3 93.184.216.34 443").await;
            assert_eq!((c, out.as_str()), (0, "hello"), "an address, relayed and echoed");
            let (c, out) = sh(&g, "nslookup api.test").await;
            assert!(c == 0 && out.contains("198.18.0.1"), "{c}: {out}");
            let (c, out) = sh(&g, "printf by-name | nc -w 3 api.test 80").await;
            assert_eq!((c, out.as_str()), (0, "by-name"));
            let (c, out) = sh(&g, "nslookup evil.test").await;
            assert!(c != 0 && out.contains("NXDOMAIN"), "{c}: {out}");
            // Denied by the host: reset at once, nothing echoed (busybox nc
            // takes the reset for an end of input and exits 0).
            let t = std::time::Instant::now();
            let (_, out) = sh(&g, "printf x | nc -w 3 10.9.9.9 443; echo rc=$?").await;
            assert!(!out.contains('x') && out.contains("rc="), "{out:?}");
            assert!(t.elapsed() < Duration::from_secs(2), "a denied connection fails fast: {:?}", t.elapsed());
            assert_eq!(
                seen.borrow().connects,
                vec![("93.184.216.34".to_string(), 443), ("api.test".to_string(), 80), ("10.9.9.9".to_string(), 443)]
            );
            let mut q = g.shutdown_request();
            q.get().set_reboot(false);
            let _ = tokio::time::timeout(Duration::from_secs(5), q.send().promise).await;
        })
    }));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while qemu.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = qemu.kill();
            let _ = qemu.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    eprintln!("--- console ---\n{}", log.lines().filter(|l| l.contains("guest-init")).collect::<Vec<_>>().join("\n"));
    if let Err(p) = result {
        eprintln!("full console:\n{log}");
        std::panic::resume_unwind(p);
    }
}
