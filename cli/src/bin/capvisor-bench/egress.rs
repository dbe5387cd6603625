//! Egress figures of `capvisor-bench` (issue 9, README "Benchmarks"): a
//! guest's traffic through guest-init's relay and the session's
//! `capvisor-proxy` to an upstream the bench runs on 127.0.0.1, beside the
//! same traffic from the host straight to that upstream, in one run.
//!
//! The bench starts its own `capvisor serve` with `[net] egress = true`
//! (TLS interception on, as by default), rules for `bench.test` (resolved
//! to 127.0.0.1 by `[net.resolve]`) and nothing else. Plain HTTP is
//! relayed byte for byte; HTTPS is intercepted: the guest's TLS ends in
//! the proxy, which makes its own TLS connection to the upstream
//! (`tests/upstream/https_upstream.py`, Python, a test CA the manifest's
//! `[net] ca_certs` adds).
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
//! - HTTPS through the interception: a `--egress-mib` download with curl in
//!   a `debian` guest against host curl straight to the upstream, and
//!   small HTTPS requests (new connection and TLS handshake each, Python
//!   `http.client`) from the guest against the host; then the proxy's RSS
//!   with 100 intercepted TLS connections (handshake done) held open.

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
    /// HTTPS download through the interception (guest curl).
    pub https_guest: Option<Duration>,
    /// HTTPS download host curl -> upstream directly.
    pub https_host: Option<Duration>,
    /// Per-request HTTPS times through the interception, µs.
    pub https_small_guest: Vec<u64>,
    /// Per-request HTTPS times host -> upstream directly, µs.
    pub https_small_host: Vec<u64>,
    /// Proxy RSS, KiB, with 100 intercepted TLS connections open.
    pub https_rss: Option<u64>,
}

/// The HTTPS upstream: a test CA and a leaf for `bench.test` and
/// 127.0.0.1 written into `dir`, and `tests/upstream/https_upstream.py`
/// serving with it. Returns the process, its port and the CA's path.
fn https_upstream(dir: &Path) -> anyhow::Result<(std::process::Child, u16, std::path::PathBuf)> {
    use std::io::BufRead;
    std::fs::create_dir_all(dir.join("git"))?;
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(rcgen::DnType::CommonName, "capvisor-bench upstream CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key)?;
    let leaf_key = rcgen::KeyPair::generate()?;
    let leaf = rcgen::CertificateParams::new(vec!["bench.test".to_string(), "127.0.0.1".to_string()])?
        .signed_by(&leaf_key, &ca_cert, &ca_key)?;
    let ca_pem = dir.join("ca.pem");
    std::fs::write(&ca_pem, ca_cert.pem())?;
    std::fs::write(dir.join("leaf.pem"), format!("{}{}", leaf.pem(), ca_cert.pem()))?;
    std::fs::write(dir.join("leaf.key"), leaf_key.serialize_pem())?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/upstream/https_upstream.py");
    let mut child = Command::new("python3")
        .arg(script)
        .arg("--cert")
        .arg(dir.join("leaf.pem"))
        .arg("--key")
        .arg(dir.join("leaf.key"))
        .arg("--record")
        .arg(dir.join("record.jsonl"))
        .arg("--git-root")
        .arg(dir.join("git"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("python3 for the HTTPS upstream")?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    let port =
        line.trim().strip_prefix("PORT ").and_then(|p| p.parse().ok()).context("no PORT line from the upstream")?;
    Ok((child, port, ca_pem))
}

/// The small-request script over HTTPS: `n` GETs of `/small` (a 404 from
/// the upstream), a new connection and handshake each, with `ctx` (Python
/// for an `ssl.SSLContext`).
fn small_https_script(host: &str, port: u16, n: usize, ctx: &str) -> String {
    format!(
        "import http.client, ssl, time\nctx = {ctx}\nts = []\nfor _ in range({n}):\n    t = time.perf_counter()\n    \
         c = http.client.HTTPSConnection('{host}', {port}, timeout=30, context=ctx)\n    c.request('GET', '/small')\n    \
         r = c.getresponse(); r.read(); assert r.status == 404, r.status\n    c.close()\n    \
         ts.append(int((time.perf_counter() - t) * 1e6))\nprint(' '.join(map(str, ts)))\n"
    )
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
    let (mut tls_up, tls_port, ca_pem) = https_upstream(&dir.join("https"))?;
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _kill = Kill(&mut tls_up);
    let manifest = format!(
        "{}\n[[net.rules]]\nhost = \"bench.test\"\nport = {port}\naction = \"allow\"\n\
         [[net.rules]]\nhost = \"bench.test\"\nport = {tls_port}\naction = \"allow\"\n\
         [net.resolve]\n\"bench.test\" = [\"127.0.0.1\"]\n",
        capvisor_manifest::DEFAULT_TOML
            .replace("egress = false", &format!("egress = true\nca_certs = [\"{}\"]", ca_pem.display()))
    );
    std::fs::write(dir.join("manifest.toml"), manifest)?;
    let mut figs = EgressFigures { mib, ..Default::default() };
    // Host direct, first: it needs no VM, and a failure here leaves no serve behind.
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
    // HTTPS, host curl straight to the upstream.
    let big_url = format!("https://bench.test:{tls_port}/big?bytes={}", mib << 20);
    let t = Instant::now();
    let out = Command::new("curl")
        .args(["-sS", "--fail", "-o", "/dev/null", "--cacert"])
        .arg(&ca_pem)
        .args(["--resolve", &format!("bench.test:{tls_port}:127.0.0.1"), &big_url])
        .output()
        .context("curl on the host")?;
    ensure!(out.status.success(), "host curl: {}", String::from_utf8_lossy(&out.stderr));
    figs.https_host = Some(t.elapsed());
    let ctx = format!("ssl.create_default_context(cafile='{}')", ca_pem.display());
    let host =
        Command::new("python3").arg("-c").arg(small_https_script("127.0.0.1", tls_port, requests, &ctx)).output()?;
    ensure!(host.status.success(), "host https script: {}", String::from_utf8_lossy(&host.stderr));
    figs.https_small_host =
        String::from_utf8_lossy(&host.stdout).split_whitespace().filter_map(|w| w.parse().ok()).collect();

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
        if t0.elapsed() > Duration::from_secs(900) {
            super::rtt::stop_serve(&mut serve);
            anyhow::bail!("capvisor serve did not come up");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let serve_pid = serve.id();
    // Every error from here on is returned after `stop_serve` below.
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
        // HTTPS through the interception.
        let t = Instant::now();
        let out =
            ops::exec_collect(&deb, &["curl", "-sS", "--fail", "-o", "/dev/null", &big_url], b"", 1 << 20).await?;
        let https_took = t.elapsed();
        anyhow::ensure!(out.exit == ops::Exit::Code(0), "guest curl: {}", String::from_utf8_lossy(&out.stderr));
        let script = small_https_script("bench.test", tls_port, requests, "ssl.create_default_context()");
        let out = ops::exec_collect(&deb, &["python3", "-c", &script], b"", 1 << 20).await?;
        anyhow::ensure!(out.exit == ops::Exit::Code(0), "guest https script: {}", String::from_utf8_lossy(&out.stderr));
        let https_small: Vec<u64> =
            String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|w| w.parse().ok()).collect();
        let hold = format!(
            "import socket, ssl, time\nctx = ssl.create_default_context()\n\
             cs = [ctx.wrap_socket(socket.create_connection(('bench.test', {tls_port}), timeout=60), server_hostname='bench.test') for _ in range(100)]\n\
             print('open', flush=True)\ntime.sleep(6)\n"
        );
        let vm = deb.clone();
        let held =
            tokio::task::spawn_local(
                async move { ops::exec_collect(&vm, &["python3", "-c", &hold], b"", 1 << 20).await },
            );
        // Handshakes under TCG take a while: read RSS once all are open.
        let mut https_rss = None;
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if held.is_finished() {
                break;
            }
            https_rss = proxy_pid(serve_pid).map(super::rss_kib).max(https_rss);
        }
        let held = held.await??;
        anyhow::ensure!(
            held.exit == ops::Exit::Code(0),
            "guest TLS hold script: {}",
            String::from_utf8_lossy(&held.stderr)
        );
        ops::remove_vm(&vms, "eg-base").await?;
        ops::remove_vm(&vms, "eg-deb").await?;
        ops::logout(&session).await?;
        anyhow::Ok((took, small, idle.zip(busy), https_took, https_small, https_rss))
    });
    super::rtt::stop_serve(&mut serve);
    let (took, small, rss, https_took, https_small, https_rss) = res?;
    figs.https_guest = Some(https_took);
    figs.https_small_guest = https_small;
    figs.https_rss = https_rss;
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
    if let (Some(g), Some(h)) = (f.https_guest, f.https_host) {
        println!(
            "{:<58} {:>8.1} MB/s",
            format!("egress: {} MiB HTTPS download, guest via interception", f.mib),
            mbs(g)
        );
        println!("{:<58} {:>8.1} MB/s", format!("egress: {} MiB HTTPS download, host direct", f.mib), mbs(h));
        println!("{:<58} {:>10.2}x", "egress: HTTPS download ratio guest-via-proxy / direct", mbs(g) / mbs(h));
    }
    let n = f.https_small_guest.len();
    for (what, v) in [("guest via interception", &mut f.https_small_guest), ("host direct", &mut f.https_small_host)] {
        println!("{:<58} {:>9} us", format!("egress: small HTTPS request, new conn, {what} p50 ({n})"), pct_us(v, 50));
        println!("{:<58} {:>9} us", format!("egress: small HTTPS request, new conn, {what} p99"), pct_us(v, 99));
    }
    if let Some(kib) = f.https_rss {
        println!("{:<58} {:>8.1} MiB", "egress: proxy RSS, 100 intercepted TLS connections", kib as f64 / 1024.0);
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
