//! Relay figures (`cargo bench -p capvisor-proxy --bench relay`): bytes
//! through `Egress.connect` against the same bytes over plain loopback
//! TCP, the time of one small relayed exchange against a direct one (and
//! through the peek path: a rule on scheme makes the proxy read the first
//! bytes before it dials), and the memory 100 open idle relayed
//! connections take: the bench process's VmRSS (/proc/self/status, proc(5))
//! before and after, with the proxy, the guest stand-in and the upstream
//! all in this process, so the figure is an upper bound for the proxy.
//!
//! Layout, close to a deployment minus the VM: the proxy runs on a thread
//! of its own (its own `current_thread` runtime, as in its process), the
//! guest-init stand-in on the main thread (an `Egress` client over a Unix
//! socketpair), the upstream on a third thread (blocking std sockets on
//! 127.0.0.1). Loopback only. Prints one line per figure.

use capnp::capability::Rc as CapRc;
use capvisor_proxy::policy::{Action, Rule};
use capvisor_proxy::{Config, ProxyState};
use capvisor_rpc::conn::{self, INTERNAL};
use capvisor_schema::common_capnp::byte_sink;
use capvisor_schema::guest_capnp::egress;
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::rc::Rc;
use std::time::{Duration, Instant};

const BULK: usize = 256 << 20;
const ROUNDS: usize = 300;
const IDLE: usize = 100;

/// This process's resident set, KiB (`VmRSS` in /proc/self/status).
fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Counts bytes; `done` fires the receiver with the total.
struct CountSink {
    n: Rc<Cell<u64>>,
    tx: std::cell::RefCell<Option<tokio::sync::oneshot::Sender<u64>>>,
}

impl byte_sink::Server for CountSink {
    async fn write(self: CapRc<Self>, p: byte_sink::WriteParams) -> capnp::Result<()> {
        self.n.set(self.n.get() + p.get()?.get_data()?.len() as u64);
        Ok(())
    }
    async fn done(self: CapRc<Self>, _: byte_sink::DoneParams, _: byte_sink::DoneResults) -> capnp::Result<()> {
        if let Some(tx) = self.tx.borrow_mut().take() {
            let _ = tx.send(self.n.get());
        }
        Ok(())
    }
}

fn count_sink() -> (byte_sink::Client, tokio::sync::oneshot::Receiver<u64>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    (capnp_rpc::new_client(CountSink { n: Rc::new(Cell::new(0)), tx: std::cell::RefCell::new(Some(tx)) }), rx)
}

/// Starts the proxy thread serving VM "bench" on one end of a socketpair,
/// with one rule allowing `api.test`:`port` (of scheme `scheme`, "" any:
/// a scheme makes every connection go through the peek).
fn start_proxy(port: u16, scheme: &'static str) -> std::os::unix::net::UnixStream {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        conn::run_local(async move {
            let cfg = Config {
                session_id: "bench".into(),
                rules: vec![Rule { scheme: scheme.into(), ..Rule::host("api.test", Action::Allow).on_port(port) }],
                resolve: vec![("api.test".into(), vec!["127.0.0.1".parse().unwrap()])],
                log_capacity: 0,
                ..Config::default()
            };
            let state = ProxyState::new(cfg).unwrap();
            a.set_nonblocking(true).unwrap();
            let task = capvisor_proxy::serve_vm(&state, "bench", tokio::net::UnixStream::from_std(a).unwrap()).unwrap();
            let _ = task.await;
        })
    });
    b
}

async fn connect(eg: &egress::Client, port: u16, down: byte_sink::Client) -> byte_sink::Client {
    let mut req = eg.connect_request();
    req.get().set_host("api.test");
    req.get().set_port(port);
    req.get().set_down(down);
    req.send().promise.await.unwrap().get().unwrap().get_up().unwrap()
}

fn mbs(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    // Upstream: each connection's first byte says what to do:
    // 'D' send BULK bytes and close; 'U' read to EOF and report the count;
    // 0x01 stay open and idle (held here); anything else: echo that byte
    // and close ('E', or 0x02 which the peek judges as tcp at once).
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (up_tx, up_rx) = std::sync::mpsc::channel::<(usize, Instant)>();
    let (idle_tx, idle_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let chunk = vec![0x5au8; 1 << 20];
        let mut idle = Vec::new();
        for s in listener.incoming() {
            let mut s = s.unwrap();
            let mut op = [0u8; 1];
            if s.read_exact(&mut op).is_err() {
                continue;
            }
            match op[0] {
                b'D' => {
                    for _ in 0..BULK / chunk.len() {
                        if s.write_all(&chunk).is_err() {
                            break;
                        }
                    }
                }
                b'U' => {
                    let mut buf = vec![0u8; 1 << 20];
                    let mut n = 0;
                    while let Ok(k) = s.read(&mut buf) {
                        if k == 0 {
                            break;
                        }
                        n += k;
                    }
                    up_tx.send((n, Instant::now())).unwrap();
                }
                1 => {
                    idle.push(s);
                    idle_tx.send(()).unwrap();
                }
                _ => {
                    let _ = s.write_all(&op);
                }
            }
        }
    });

    // Direct loopback, for reference.
    let t = Instant::now();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"D").unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0;
    while let Ok(k) = s.read(&mut buf) {
        if k == 0 {
            break;
        }
        n += k;
    }
    assert_eq!(n, BULK);
    let direct_down = t.elapsed();
    let mut direct_rt: Vec<Duration> = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(b"E").unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).unwrap();
            t.elapsed()
        })
        .collect();

    let guest_end = start_proxy(port, "");
    let peek_end = start_proxy(port, "tcp");
    conn::run_local(async move {
        guest_end.set_nonblocking(true).unwrap();
        let (eg, _c) =
            conn::connect::<egress::Client>(tokio::net::UnixStream::from_std(guest_end).unwrap(), None, INTERNAL);
        // Download through the relay.
        let t = Instant::now();
        let (down, got) = count_sink();
        let up = connect(&eg, port, down).await;
        capvisor_rpc::sink::write_all(&up, b"D").await.unwrap();
        up.done_request().send().promise.await.unwrap();
        assert_eq!(got.await.unwrap(), BULK as u64);
        let relay_down = t.elapsed();
        // Upload through the relay.
        let (down, _got) = count_sink();
        let up = connect(&eg, port, down).await;
        let data = vec![0xa5u8; BULK];
        let t = Instant::now();
        capvisor_rpc::sink::write_all(&up, b"U").await.unwrap();
        capvisor_rpc::sink::write_all(&up, &data).await.unwrap();
        up.done_request().send().promise.await.unwrap();
        let (n, at) = up_rx.recv().unwrap();
        assert_eq!(n, BULK);
        let relay_up = at - t;
        drop(data);
        // Small exchanges: connect, one byte each way, upstream closes.
        let mut relay_rt = Vec::new();
        for _ in 0..ROUNDS {
            let t = Instant::now();
            let (down, got) = count_sink();
            let up = connect(&eg, port, down).await;
            capvisor_rpc::sink::write_all(&up, b"E").await.unwrap();
            assert_eq!(got.await.unwrap(), 1);
            relay_rt.push(t.elapsed());
            up.done_request().send().promise.await.unwrap();
        }
        // Small exchanges through the peek: the rule names a scheme, so
        // the proxy dials only once the first byte (0x02: tcp) is judged.
        peek_end.set_nonblocking(true).unwrap();
        let (peg, _pc) =
            conn::connect::<egress::Client>(tokio::net::UnixStream::from_std(peek_end).unwrap(), None, INTERNAL);
        let mut peek_rt = Vec::new();
        for _ in 0..ROUNDS {
            let t = Instant::now();
            let (down, got) = count_sink();
            let up = connect(&peg, port, down).await;
            capvisor_rpc::sink::write_all(&up, &[2]).await.unwrap();
            assert_eq!(got.await.unwrap(), 1);
            peek_rt.push(t.elapsed());
            up.done_request().send().promise.await.unwrap();
        }
        // Memory of IDLE open idle connections, each path.
        let mut rss = Vec::new();
        for eg in [&eg, &peg] {
            let before = vm_rss_kib();
            let mut held = Vec::new();
            for _ in 0..IDLE {
                let (down, got) = count_sink();
                let up = connect(eg, port, down).await;
                capvisor_rpc::sink::write_all(&up, &[1]).await.unwrap();
                held.push((up, got));
            }
            // Polled, not blocking: this thread runs the guest stand-in's
            // RPC, which still has to send the last writes.
            let mut n = 0;
            while n < IDLE {
                while idle_rx.try_recv().is_ok() {
                    n += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Let both sides settle (pending writes answered).
            tokio::time::sleep(Duration::from_millis(200)).await;
            rss.push((vm_rss_kib().saturating_sub(before), before));
            drop(held);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!(
            "download {BULK} B: relay {:.0} MB/s, direct {:.0} MB/s (ratio {:.2})",
            mbs(BULK, relay_down),
            mbs(BULK, direct_down),
            mbs(BULK, relay_down) / mbs(BULK, direct_down)
        );
        println!("upload {BULK} B: relay {:.0} MB/s", mbs(BULK, relay_up));
        let (r50, r99) = (percentile(&mut relay_rt, 0.5), percentile(&mut relay_rt, 0.99));
        let (d50, d99) = (percentile(&mut direct_rt, 0.5), percentile(&mut direct_rt, 0.99));
        println!(
            "connect + 1 byte each way ({ROUNDS} rounds): relay p50 {:.0} us p99 {:.0} us; direct p50 {:.0} us p99 {:.0} us",
            r50.as_secs_f64() * 1e6,
            r99.as_secs_f64() * 1e6,
            d50.as_secs_f64() * 1e6,
            d99.as_secs_f64() * 1e6
        );
        let (p50, p99) = (percentile(&mut peek_rt, 0.5), percentile(&mut peek_rt, 0.99));
        println!(
            "connect + 1 byte each way through the peek ({ROUNDS} rounds): p50 {:.0} us p99 {:.0} us",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
        for ((delta, before), path) in rss.iter().zip(["fast path", "peeked"]) {
            println!(
                "{IDLE} open idle relayed connections ({path}): VmRSS of the bench process (proxy, guest stand-in \
                 and upstream) {before} KiB -> +{delta} KiB ({:.1} KiB each)",
                *delta as f64 / IDLE as f64
            );
        }
    });
}
