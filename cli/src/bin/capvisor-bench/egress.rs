//! Egress figures of `capvisor-bench` (issue 9, README "Benchmarks"): a
//! guest's traffic through guest-init's relay and the session's
//! `capvisor-proxy` to an upstream the bench runs on 127.0.0.1, beside the
//! same traffic from the host straight to that upstream, in one run.
//!
//! The bench starts its own `capvisor serve` with `[net] egress = true`, a
//! rule for `bench.test` (resolved to 127.0.0.1 by `[net.resolve]`) and
//! nothing else. Plain HTTP: the proxy relays bytes without looking into
//! them (TLS interception is a later slice), so HTTPS would add only the
//! guest's own TLS cost.
//!
//! - Download of `--egress-mib` MiB (default 256) with busybox `wget -O
//!   /dev/null` in a `base` guest, timed around the exec, against a direct
//!   read on the host. Under TCG the guest's copying dominates.
//! - Small requests, a new connection each (`--egress-requests`, default
//!   100): Python's `http.client` in a `debian` guest (DNS through
//!   guest-init, connect, GET, read) against the same script on the host;
//!   p50 and p99 of each, timed inside the script.
//! - The proxy's RSS (VmRSS) with 100 idle relayed connections held open by
//!   the guest, beside its RSS with none.

use anyhow::{ensure, Context};
use capvisor_client::{connect, ops};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What the egress part measured.
#[derive(Debug, Default)]
pub struct EgressFigures {
    /// MiB moved per download.
    pub mib: u64,
    /// Through the proxy (guest wall clock around the exec).
    pub download_guest: Option<Duration>,
    /// Host -> upstream directly.
    pub download_host: Option<Duration>,
    /// Per-request times through the proxy, µs.
    pub small_guest: Vec<u64>,
    /// Per-request times host -> upstream directly, µs.
    pub small_host: Vec<u64>,
    /// Proxy RSS, KiB: idle, and with the held connections open.
    pub proxy_rss: Option<(u64, u64, usize)>,
}

/// A loopback HTTP/1.0 upstream: `/big/<MiB>` answers that many MiB of
/// zeros, anything else a 2-byte body. Runs until the process ends.
fn upstream() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&buf).lines().next().unwrap_or("").to_string();
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                if let Some(mib) = path.strip_prefix("/big/").and_then(|m| m.parse::<u64>().ok()) {
                    let _ = write!(c, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", mib << 20);
                    let zeros = vec![0u8; 1 << 20];
                    for _ in 0..mib {
                        if c.write_all(&zeros).is_err() {
                            return;
                        }
                    }
                } else {
                    let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
                }
            });
        }
    });
    Ok(port)
}

/// The small-request script: `n` GETs of `/small`, a new connection each;
/// prints one line of per-request microseconds.
fn small_script(host: &str, port: u16, n: usize) -> String {
    format!(
        "import http.client, time\nts = []\nfor _ in range({n}):\n    t = time.perf_counter()\n    \
         c = http.client.HTTPConnection('{host}', {port}, timeout=30)\n    c.request('GET', '/small')\n    \
         assert c.getresponse().read() == b'ok'\n    c.close()\n    ts.append(int((time.perf_counter() - t) * 1e6))\n\
         print(' '.join(map(str, ts)))\n"
    )
}

/// The `capvisor-proxy` below `serve_pid`, if any.
fn proxy_pid(serve_pid: u32) -> Option<u32> {
    super::procs::descendants(serve_pid).into_iter().find(|(_, a)| a.ends_with("capvisor-proxy")).map(|(p, _)| p)
}

/// Runs the egress figures with their own `capvisor serve` under `work`.
///
/// Errors: serve does not come up, a guest command fails, an upstream read
/// fails.
pub fn figures(
    bin_dir: &Path,
    guest_init: &Path,
    work: &Path,
    mib: u64,
    requests: usize,
) -> anyhow::Result<EgressFigures> {
    let port = upstream()?;
    let dir = work.join("egress");
    std::fs::create_dir_all(&dir)?;
    let manifest = format!(
        "{}\n[[net.rules]]\nhost = \"bench.test\"\nport = {port}\naction = \"allow\"\n[net.resolve]\n\"bench.test\" = [\"127.0.0.1\"]\n",
        capvisor_manifest::DEFAULT_TOML.replace("egress = false", "egress = true")
    );
    std::fs::write(dir.join("manifest.toml"), manifest)?;
    let socket = dir.join("run/gateway.sock");
    let mut serve = Command::new(bin_dir.join("capvisor"))
        .arg("serve")
        .arg("--manifest")
        .arg(dir.join("manifest.toml"))
        .env("CAPVISOR_SOCKET", &socket)
        .env("CAPVISOR_STATE_DIR", dir.join("state"))
        .env("CAPVISOR_GUEST_INIT", guest_init)
        .env("CAPVISOR_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .context("spawn capvisor serve")?;
    let _stop_on_panic = super::rtt::StopOnPanic(serve.id());
    let t0 = Instant::now();
    while !socket.exists() {
        ensure!(serve.try_wait()?.is_none(), "capvisor serve exited early");
        ensure!(t0.elapsed() < Duration::from_secs(900), "capvisor serve did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let serve_pid = serve.id();
    let mut figs = EgressFigures { mib, ..Default::default() };

    // Host direct, first (it does not need the VMs).
    let t = Instant::now();
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(c, "GET /big/{mib} HTTP/1.0\r\n\r\n")?;
    let mut sink = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = c.read(&mut sink)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    ensure!(total > mib << 20, "short direct download ({total} bytes)");
    figs.download_host = Some(t.elapsed());
    let host = Command::new("python3").arg("-c").arg(small_script("127.0.0.1", port, requests)).output()?;
    ensure!(host.status.success(), "host script: {}", String::from_utf8_lossy(&host.stderr));
    figs.small_host = String::from_utf8_lossy(&host.stdout).split_whitespace().filter_map(|w| w.parse().ok()).collect();

    let res = capvisor_rpc::conn::run_local(async {
        let login = connect::login_local(&socket).await?;
        let session = connect::attach(&socket, &login.token).await?;
        let vms = ops::vms(&session);
        let base = ops::create_vm(&vms, &ops::VmSpec { name: "eg-base".into(), ..Default::default() });
        ops::vm_info(&base).await?;
        let url = format!("http://bench.test:{port}/big/{mib}");
        let t = Instant::now();
        let out = ops::exec_collect(&base, &["wget", "-q", "-O", "/dev/null", &url], b"", 1 << 20).await?;
        let took = t.elapsed();
        anyhow::ensure!(out.exit == ops::Exit::Code(0), "guest wget: {}", String::from_utf8_lossy(&out.stderr));
        let deb =
            ops::create_vm(&vms, &ops::VmSpec { name: "eg-deb".into(), image: "debian".into(), ..Default::default() });
        let script = small_script("bench.test", port, requests);
        let out = ops::exec_collect(&deb, &["python3", "-c", &script], b"", 1 << 20).await?;
        anyhow::ensure!(out.exit == ops::Exit::Code(0), "guest script: {}", String::from_utf8_lossy(&out.stderr));
        let small: Vec<u64> =
            String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|w| w.parse().ok()).collect();
        // 100 idle relayed connections, held while the proxy's RSS is read.
        let idle = proxy_pid(serve_pid).map(super::rss_kib);
        let hold = format!(
            "import socket, time\ncs = [socket.create_connection(('bench.test', {port}), timeout=30) for _ in range(100)]\n\
             print('open', flush=True)\ntime.sleep(4)\n"
        );
        let vm = deb.clone();
        let held =
            tokio::task::spawn_local(
                async move { ops::exec_collect(&vm, &["python3", "-c", &hold], b"", 1 << 20).await },
            );
        tokio::time::sleep(Duration::from_secs(3)).await;
        let busy = proxy_pid(serve_pid).map(super::rss_kib);
        let held = held.await??;
        anyhow::ensure!(
            held.exit == ops::Exit::Code(0),
            "guest hold script: {}",
            String::from_utf8_lossy(&held.stderr)
        );
        ops::remove_vm(&vms, "eg-base").await?;
        ops::remove_vm(&vms, "eg-deb").await?;
        ops::logout(&session).await?;
        anyhow::Ok((took, small, idle.zip(busy)))
    });
    super::rtt::stop_serve(&mut serve);
    let (took, small, rss) = res?;
    figs.download_guest = Some(took);
    figs.small_guest = small;
    figs.proxy_rss = rss.map(|(i, b)| (i, b, 100));
    Ok(figs)
}

fn pct_us(v: &mut [u64], p: usize) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

/// Prints the figures as rows of the bench's table.
pub fn print(f: &mut EgressFigures) {
    let mbs = |d: Duration| (f.mib << 20) as f64 / 1e6 / d.as_secs_f64();
    if let (Some(g), Some(h)) = (f.download_guest, f.download_host) {
        println!("{:<58} {:>8.1} MB/s", format!("egress: {} MiB HTTP download, guest via proxy", f.mib), mbs(g));
        println!("{:<58} {:>8.1} MB/s", format!("egress: {} MiB HTTP download, host direct", f.mib), mbs(h));
        println!("{:<58} {:>10.2}x", "egress: download ratio guest-via-proxy / direct", mbs(g) / mbs(h));
    }
    let n = f.small_guest.len();
    for (what, v) in [("guest via proxy", &mut f.small_guest), ("host direct", &mut f.small_host)] {
        println!("{:<58} {:>9} us", format!("egress: small request, new connection, {what} p50 ({n})"), pct_us(v, 50));
        println!("{:<58} {:>9} us", format!("egress: small request, new connection, {what} p99"), pct_us(v, 99));
    }
    if let Some((idle, busy, n)) = f.proxy_rss {
        println!("{:<58} {:>8.1} MiB", "egress: proxy RSS, no connection", idle as f64 / 1024.0);
        println!(
            "{:<58} {:>8.1} MiB",
            format!("egress: proxy RSS, {n} idle relayed connections"),
            busy as f64 / 1024.0
        );
    }
}
