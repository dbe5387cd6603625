//! Round-trip figures of `capvisor-bench` (README, "Benchmarks"): how many
//! network round trips a whole `capvisor vm exec NAME -- true` process
//! costs, and a pipelined capability chain against the same calls awaited
//! one by one.
//!
//! Round trips are counted with a latency-injecting relay: a Unix-socket
//! proxy in front of the gateway socket that holds every chunk for D in
//! each direction, so each round trip costs 2·D more; the count is
//! (p50 with D − p50 without) / 2·D, rounded.
//!
//! `capvisor-bench --cli-only --bin-dir DIR [--guest-init PATH]` runs only
//! the CLI figure against `DIR/capvisor serve`, with `DIR/capvisor`: that is
//! how an older build (another wire format) is measured for comparison.

use anyhow::{bail, ensure, Context};
use capnp::traits::HasTypeId;
use capvisor_client::{connect, ops};
use capvisor_rpc::schema::capvisor_capnp::{session, vm_factory};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Longest a single `capvisor vm exec` may take before it is killed.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest `capvisor vm create` (a cold boot, TCG included) may take.
const CREATE_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest `capvisor serve` may take to open its socket (first image build).
const SERVE_TIMEOUT: Duration = Duration::from_secs(900);

fn arg_str(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

/// The delay the relay adds per chunk and direction (`--delay-ms`, default 10).
pub fn delay_arg() -> Duration {
    Duration::from_millis(crate::arg("--delay-ms", 10).max(1) as u64)
}

/// A Unix-socket relay that delays every chunk by a settable amount in
/// each direction; byte order kept, EOF forwarded (after the same delay)
/// both ways. Plain threads with blocking sockets and `thread::sleep`
/// (precise to tens of µs, where a tokio timer rounds up to the next ms).
/// Stopped, its connections closed and its socket removed on drop.
pub struct Relay {
    /// Where clients connect.
    pub path: PathBuf,
    delay_us: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// Every relayed socket still open, to close them all on drop.
    open: Arc<Mutex<Vec<Weak<UnixStream>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Listens on `path`; every connection is relayed to a fresh connection
    /// to `upstream`. The delay starts at 0.
    pub fn start(path: &Path, upstream: &Path) -> anyhow::Result<Relay> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
        let delay_us = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(vec![]));
        let (d, st, op, up) = (delay_us.clone(), stop.clone(), open.clone(), upstream.to_path_buf());
        let thread = std::thread::Builder::new().name("bench-relay".into()).spawn(move || {
            for client in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                // Upstream unreachable: dropping `client` closes it, the client sees EOF.
                let Ok(server) = UnixStream::connect(&up) else { continue };
                let (client, server) = (Arc::new(client), Arc::new(server));
                {
                    let mut op = op.lock().unwrap();
                    op.retain(|s: &Weak<UnixStream>| s.strong_count() > 0);
                    op.extend([Arc::downgrade(&client), Arc::downgrade(&server)]);
                }
                pipe(client.clone(), server.clone(), d.clone());
                pipe(server, client, d.clone());
            }
        })?;
        Ok(Relay { path: path.to_path_buf(), delay_us, stop, open, thread: Some(thread) })
    }

    /// Sets the per-chunk, per-direction delay for chunks read from now on.
    pub fn set_delay(&self, d: Duration) {
        self.delay_us.store(d.as_micros() as u64, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop, which then sees `stop`.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Every relay thread blocked in read returns 0 and ends.
        for s in self.open.lock().unwrap().drain(..).filter_map(|s| s.upgrade()) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Copies `r` to `w` on two threads, each chunk written `delay` after it
/// was read. The reader never waits for the writer, so the added latency
/// does not throttle throughput; the channel keeps the order. EOF (or a
/// read error) becomes a shutdown of `w`'s write side, delayed the same.
/// A failed write shuts `r` down so its reader ends too. A socket closes
/// when the last thread holding it ends.
fn pipe(r: Arc<UnixStream>, w: Arc<UnixStream>, delay_us: Arc<AtomicU64>) {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Option<Vec<u8>>)>();
    let r_ctl = r.clone();
    let _ = std::thread::Builder::new().name("bench-relay-rd".into()).spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = (&*r).read(&mut buf).unwrap_or(0);
            let at = Instant::now() + Duration::from_micros(delay_us.load(Ordering::SeqCst));
            let chunk = (n > 0).then(|| buf[..n].to_vec());
            if tx.send((at, chunk)).is_err() || n == 0 {
                break;
            }
        }
    });
    let _ = std::thread::Builder::new().name("bench-relay-wr".into()).spawn(move || {
        while let Ok((at, chunk)) = rx.recv() {
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            match chunk {
                Some(c) => {
                    if (&*w).write_all(&c).is_err() {
                        let _ = r_ctl.shutdown(std::net::Shutdown::Read);
                        break;
                    }
                }
                None => {
                    let _ = w.shutdown(std::net::Shutdown::Write);
                    break;
                }
            }
        }
    });
}

/// Round trips a delay adds: (p50 with D − p50 without) / 2·D.
pub fn round_trips(base_p50: Duration, delayed_p50: Duration, d: Duration) -> f64 {
    (delayed_p50.as_secs_f64() - base_p50.as_secs_f64()) / (2.0 * d.as_secs_f64())
}

/// Whole `capvisor vm exec NAME -- true` processes through the relay.
pub struct CliFigures {
    /// Delay per chunk and direction of the delayed runs.
    pub delay: Duration,
    /// Wall time of each run at delay 0.
    pub base: Vec<Duration>,
    /// Wall time of each run at `delay`.
    pub delayed: Vec<Duration>,
}

/// Runs `capvisor ARGS` to completion within `limit` (killed past it);
/// returns its wall time, or its stderr if it failed.
async fn run_capvisor(
    capvisor: &Path,
    socket: &Path,
    config_dir: &Path,
    args: &[&str],
    limit: Duration,
) -> anyhow::Result<Duration> {
    let mut cmd = tokio::process::Command::new(capvisor);
    cmd.args(args)
        .env("CAPVISOR_SOCKET", socket)
        .env("CAPVISOR_CONFIG_DIR", config_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let t = Instant::now();
    let child = cmd.spawn().with_context(|| format!("spawn {}", capvisor.display()))?;
    // On timeout the future (and the child in it) is dropped: killed, reaped by tokio.
    let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(r) => r?,
        Err(_) => bail!("`capvisor {}` took over {limit:?}; killed", args.join(" ")),
    };
    let took = t.elapsed();
    ensure!(
        out.status.success(),
        "`capvisor {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(took)
}

/// Logs in with `capvisor login` on the real `socket` (session saved in
/// `work/cli-config`), creates VM `cli` with `capvisor vm create`, then runs
/// `capvisor vm exec cli -- true` `runs` times through `relay` at delay 0
/// and `runs` times at `delay` (alternating), and logs out.
pub fn cli_figures(
    capvisor: &Path,
    socket: &Path,
    relay: &Relay,
    work: &Path,
    runs: usize,
    delay: Duration,
) -> anyhow::Result<CliFigures> {
    let config_dir = work.join("cli-config");
    std::fs::create_dir_all(&config_dir)?;
    capvisor_rpc::conn::run_local(async {
        run_capvisor(capvisor, socket, &config_dir, &["login"], CLI_TIMEOUT).await?;
        eprintln!("capvisor-bench: {} vm create --name cli ...", capvisor.display());
        run_capvisor(capvisor, socket, &config_dir, &["vm", "create", "--name", "cli"], CREATE_TIMEOUT).await?;
        let exec = ["vm", "exec", "cli", "--", "true"];
        let measured = async {
            relay.set_delay(Duration::ZERO);
            for _ in 0..3 {
                run_capvisor(capvisor, &relay.path, &config_dir, &exec, CLI_TIMEOUT).await?;
            }
            let (mut base, mut delayed) = (vec![], vec![]);
            for i in 0..runs {
                relay.set_delay(Duration::ZERO);
                base.push(run_capvisor(capvisor, &relay.path, &config_dir, &exec, CLI_TIMEOUT).await?);
                relay.set_delay(delay);
                delayed.push(run_capvisor(capvisor, &relay.path, &config_dir, &exec, CLI_TIMEOUT).await?);
                if (i + 1) % 10 == 0 {
                    eprintln!("capvisor-bench: `capvisor vm exec cli -- true` runs: {} of {runs} at each delay", i + 1);
                }
            }
            relay.set_delay(Duration::ZERO);
            anyhow::Ok(CliFigures { delay, base, delayed })
        }
        .await;
        // Logging out stops the session's VM whatever happened above.
        let out = run_capvisor(capvisor, socket, &config_dir, &["logout"], CLI_TIMEOUT).await;
        let figures = measured?;
        out?;
        Ok(figures)
    })
}

/// `capSet -> get("vms") -> VmFactory.get(name) -> Vm.ping`, all sent at
/// once: one await at the end.
async fn chain_pipelined(s: &session::Client, name: &str) -> anyhow::Result<()> {
    let f = ops::vms(s);
    ops::ping(&ops::get_vm(&f, name)).await?;
    Ok(())
}

/// The same four calls, each awaited (its capability read from the
/// response) before the next is sent.
async fn chain_awaited(s: &session::Client, name: &str) -> anyhow::Result<()> {
    let r = s.cap_set_request().send().promise.await?;
    let cs = r.get()?.get_cap_set()?;
    let mut q = cs.get_request();
    q.get().set_cap_name("vms");
    q.get().set_interface_id(vm_factory::Client::TYPE_ID);
    let r = q.send().promise.await?;
    let f: vm_factory::Client = r.get()?.get_cap().get_as_capability()?;
    let mut q = f.get_request();
    q.get().set_vm_name(name);
    let r = q.send().promise.await?;
    let vm = r.get()?.get_vm()?;
    vm.ping_request().send().promise.await?;
    Ok(())
}

/// The chain, pipelined and awaited, directly and through the relay.
pub struct ChainFigures {
    /// Delay per chunk and direction on the relayed runs.
    pub delay: Duration,
    /// Pipelined, direct connection.
    pub pipelined: Vec<Duration>,
    /// Awaited one by one, direct connection.
    pub awaited: Vec<Duration>,
    /// Pipelined, through the relay at `delay`.
    pub pipelined_delayed: Vec<Duration>,
    /// Awaited one by one, through the relay at `delay`.
    pub awaited_delayed: Vec<Duration>,
}

async fn time_chains(
    s: &session::Client,
    vm: &str,
    n: usize,
    p: &mut Vec<Duration>,
    a: &mut Vec<Duration>,
) -> anyhow::Result<()> {
    for _ in 0..n {
        let t = Instant::now();
        tokio::time::timeout(CLI_TIMEOUT, chain_pipelined(s, vm)).await.context("pipelined chain timed out")??;
        p.push(t.elapsed());
        let t = Instant::now();
        tokio::time::timeout(CLI_TIMEOUT, chain_awaited(s, vm)).await.context("awaited chain timed out")??;
        a.push(t.elapsed());
    }
    Ok(())
}

/// Times the chain on VM `vm` of the session `direct` (attached on the real
/// socket) `n` times each way (alternating), then on a second attach of the
/// same session (`token`) through `relay` at `delay`, `n_relayed` times.
pub async fn chain_figures(
    direct: &session::Client,
    token: &str,
    vm: &str,
    relay: &Relay,
    n: usize,
    n_relayed: usize,
    delay: Duration,
) -> anyhow::Result<ChainFigures> {
    let (mut p, mut a) = (vec![], vec![]);
    time_chains(direct, vm, 10, &mut p, &mut a).await?;
    let (mut pipelined, mut awaited) = (vec![], vec![]);
    time_chains(direct, vm, n, &mut pipelined, &mut awaited).await?;

    relay.set_delay(Duration::ZERO);
    let relayed = connect::attach(&relay.path, token).await?;
    time_chains(&relayed, vm, 3, &mut p, &mut a).await?;
    relay.set_delay(delay);
    let (mut pipelined_delayed, mut awaited_delayed) = (vec![], vec![]);
    let r = time_chains(&relayed, vm, n_relayed, &mut pipelined_delayed, &mut awaited_delayed).await;
    relay.set_delay(Duration::ZERO);
    r?;
    Ok(ChainFigures { delay, pipelined, awaited, pipelined_delayed, awaited_delayed })
}

const W: usize = 58;

/// Table rows for the chain (same layout as the main table).
pub fn print_chain(c: &mut ChainFigures) {
    let d = c.delay;
    let (p, a) = (crate::pct(&mut c.pipelined, 50), crate::pct(&mut c.awaited, 50));
    let (pd, ad) = (crate::pct(&mut c.pipelined_delayed, 50), crate::pct(&mut c.awaited_delayed, 50));
    println!(
        "{:<W$} {:>9.0} us",
        format!("capSet>get>VmFactory.get>ping pipelined p50 ({})", c.pipelined.len()),
        crate::us(p)
    );
    println!("{:<W$} {:>9.0} us", format!("same 4 calls, each awaited first, p50 ({})", c.awaited.len()), crate::us(a));
    for (what, base, delayed, n) in
        [("pipelined", p, pd, c.pipelined_delayed.len()), ("awaited", a, ad, c.awaited_delayed.len())]
    {
        let rt = round_trips(base, delayed, d);
        println!(
            "{:<W$} {:>12}",
            format!("  {what}: round trips ({:.1} ms at +{} ms/dir, {n})", crate::ms(delayed), d.as_millis()),
            format!("{} ({rt:.2})", rt.round())
        );
    }
}

/// Table rows for the whole-CLI figure.
pub fn print_cli(c: &mut CliFigures, label: &str) {
    let d = c.delay;
    let (b, dl) = (crate::pct(&mut c.base, 50), crate::pct(&mut c.delayed, 50));
    let rt = round_trips(b, dl, d);
    println!(
        "{:<W$} {:>9.1} ms",
        format!("{label} `vm exec NAME -- true`, whole process p50 ({})", c.base.len()),
        crate::ms(b)
    );
    println!(
        "{:<W$} {:>12}",
        format!("  its round trips ({:.1} ms p50 at +{} ms/dir, {})", crate::ms(dl), d.as_millis(), c.delayed.len()),
        format!("{} ({rt:.2})", rt.round())
    );
    println!("{:<W$} {:>9.1} ms", "  its p99 (through the relay at +0)", crate::ms(crate::pct(&mut c.base, 99)));
}

/// A `capvisor serve` we started: on drop, SIGTERM, up to 30 s for it to
/// stop its children, then SIGKILL to whatever is left below it.
pub struct Server {
    child: std::process::Child,
}

impl Server {
    /// Starts `bin_dir/capvisor serve` with private socket and state dir
    /// (under `work`), and waits (bounded) for its socket.
    pub fn start(bin_dir: &Path, work: &Path, guest_init: &Path) -> anyhow::Result<(Server, PathBuf)> {
        let socket = work.join("run/gateway.sock");
        let child = std::process::Command::new(bin_dir.join("capvisor"))
            .arg("serve")
            .env("CAPVISOR_SOCKET", &socket)
            .env("CAPVISOR_STATE_DIR", work.join("state"))
            .env("CAPVISOR_BIN_DIR", bin_dir)
            .env("CAPVISOR_GUEST_INIT", guest_init)
            .env("CAPVISOR_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawn {}/capvisor serve", bin_dir.display()))?;
        let mut server = Server { child };
        let t0 = Instant::now();
        while !socket.exists() {
            if let Some(st) = server.child.try_wait()? {
                bail!("capvisor serve exited early ({st})");
            }
            ensure!(t0.elapsed() < SERVE_TIMEOUT, "capvisor serve did not come up in {SERVE_TIMEOUT:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok((server, socket))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        stop_serve(&mut self.child);
    }
}

/// SIGTERM to `serve`, up to 30 s, then SIGKILL to it and its descendants.
pub fn stop_serve(serve: &mut std::process::Child) {
    if let Ok(Some(_)) = serve.try_wait() {
        return;
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(serve.id() as i32), nix::sys::signal::Signal::SIGTERM);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        if let Ok(Some(_)) = serve.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("capvisor-bench: capvisor serve ignored SIGTERM for 30 s; killing it and its children");
    for (pid, _) in crate::descendants(serve.id()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
    }
    let _ = serve.kill();
    let _ = serve.wait();
}

/// `capvisor-bench --cli-only --bin-dir DIR [--guest-init PATH]`: the
/// whole-CLI figure only, server and client both from DIR. Exit code.
pub fn cli_only_main() -> i32 {
    let Some(bin_dir) = arg_str("--bin-dir").map(PathBuf::from) else {
        eprintln!("capvisor-bench: --cli-only needs --bin-dir DIR (holding capvisor, capvisor-broker, ...)");
        return 2;
    };
    let bin_dir = std::fs::canonicalize(&bin_dir).unwrap_or(bin_dir);
    let guest_init = arg_str("--guest-init")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CAPVISOR_GUEST_INIT").map(PathBuf::from))
        .unwrap_or_else(|| bin_dir.join("capvisor-guest-init"));
    let runs = crate::arg("--cli-runs", 50);
    let delay = delay_arg();
    let r = (|| {
        let work = tempfile::Builder::new().prefix("capvisor-bench.").tempdir()?;
        eprintln!("capvisor-bench: starting {}/capvisor serve ...", bin_dir.display());
        let (server, socket) = Server::start(&bin_dir, work.path(), &guest_init)?;
        let relay = Relay::start(&work.path().join("relay.sock"), &socket)?;
        let figures = cli_figures(&bin_dir.join("capvisor"), &socket, &relay, work.path(), runs, delay);
        drop(relay);
        drop(server);
        figures
    })();
    match r {
        Ok(mut f) => {
            println!();
            println!("capvisor-bench --cli-only: server and CLI from {}", bin_dir.display());
            println!("{:<W$} {:>12}", "figure", "value");
            print_cli(&mut f, "CLI");
            0
        }
        Err(e) => {
            eprintln!("capvisor-bench: {e:#}");
            1
        }
    }
}

/// Stops `capvisor serve` (pid) if the bench panics while it runs, so no
/// server, worker, vmm or qemu is left behind; does nothing otherwise.
pub struct StopOnPanic(pub u32);

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        let pid = nix::unistd::Pid::from_raw(self.0 as i32);
        let below = crate::descendants(self.0);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(20)),
                _ => return,
            }
        }
        for (p, _) in below {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p as i32), nix::sys::signal::Signal::SIGKILL);
        }
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = waitpid(pid, None);
    }
}
