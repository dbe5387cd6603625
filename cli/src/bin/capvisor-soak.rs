//! `capvisor-soak`: capvisor's reliability suite in one bounded run
//! (docs/soak.md). It starts a private `capvisor serve` (binaries beside
//! this one, a temporary state and run dir, a manifest written for the
//! run) on a loopback Unix socket and drives it through the host-client
//! library:
//!
//! - phase A: `--sessions` short sessions (local and password logins,
//!   some attached to their worker, CapSet, cheap calls, a typed
//!   `notFound` on purpose, logout), `--concurrency` at once, while a
//!   hostile child process floods the gateway (garbage preambles,
//!   oversized and garbage frames, bogus attaches, idle connections past
//!   the per-uid bound, wrong passwords) and an owner probe logs in every
//!   second;
//! - phase B: `--vms` VMs at once (small memory, engine `auto`) with an
//!   exec loop each;
//! - phase C: kill -9 of a vmm, a QEMU, a worker, the gateway and the
//!   broker (`--kill`), checking the typed outcome clients see;
//!
//! then stops serve with SIGTERM and prints the report: sessions served,
//! calls, errors by code, p50/p99 latency, peak RSS per process kind,
//! processes left (must be 0), audit lines lost (must be 0). Exit code 0
//! when every must-hold figure holds, 1 when one does not, 2 on a usage
//! error, 3 when the global `--deadline-secs` passed.

use clap::Parser;
use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

#[path = "soak/hostile.rs"]
mod hostile;
#[path = "common/procs.rs"]
mod procs;
#[path = "soak/server.rs"]
mod server;
#[path = "soak/sessions.rs"]
mod sessions;
#[path = "soak/stats.rs"]
mod stats;
#[path = "soak/vms.rs"]
mod vms;

use stats::{ms, pct};

/// capvisor's reliability suite: sessions under a hostile flood, many VMs
/// with exec traffic, kill -9 of each process kind; bounded, loopback
/// only, stops by itself. Prints a report; exit 0 when every must-hold
/// figure holds (0 processes left, 0 audit lines lost, no unexpected
/// error, every kill with its typed outcome), 1 otherwise, 3 past the
/// deadline.
#[derive(Parser, Debug)]
#[command(name = "capvisor-soak", version)]
pub struct Args {
    /// Sessions of phase A (each: login, CapSet, calls, logout).
    #[arg(long, default_value_t = 200)]
    sessions: usize,
    /// Phase-A clients at once (tokio tasks on one thread; stays below the
    /// gateway's 64 login connections per uid).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// VMs running at once in phase B (0: no VM phase).
    #[arg(long, default_value_t = 20)]
    vms: usize,
    /// Guest memory of each VM, MiB.
    #[arg(long, default_value_t = 128)]
    vm_mib: u32,
    /// Seconds of exec traffic in phase B/C (half before the kills, half after).
    #[arg(long, default_value_t = 30)]
    exec_secs: u64,
    /// Process kinds to kill -9 in phase C, in this order, comma separated:
    /// vmm, qemu, worker, gateway, broker (broker ends everything). Empty: none.
    #[arg(long, value_delimiter = ',', default_value = "vmm,qemu,worker,gateway,broker")]
    kill: Vec<String>,
    /// No hostile flood during phase A.
    #[arg(long)]
    no_hostile: bool,
    /// Small run: 40 sessions, 4 VMs, 10 s of exec traffic.
    #[arg(long)]
    quick: bool,
    /// Global deadline, seconds: past it everything is killed and the run fails (exit 3).
    #[arg(long, default_value_t = 600)]
    deadline_secs: u64,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Directory holding capvisor and the server binaries (default: beside this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Keep the run's directory (serve.log, audit.jsonl) and print its path.
    #[arg(long)]
    keep: bool,
    /// Internal: run as the hostile flood child.
    #[arg(long, hide = true)]
    hostile_child: bool,
    /// Internal (hostile child): which part, `idle` or `bad`.
    #[arg(long, hide = true)]
    hostile_part: Option<String>,
    /// Internal (hostile child): gateway socket.
    #[arg(long, hide = true)]
    socket: Option<PathBuf>,
    /// Internal (hostile child): bad connections of each kind.
    #[arg(long, hide = true, default_value_t = 0)]
    hostile_bad: usize,
    /// Internal (hostile child): idle connections.
    #[arg(long, hide = true, default_value_t = 0)]
    hostile_idle: usize,
    /// Internal (hostile child): wrong-password attempts.
    #[arg(long, hide = true, default_value_t = 0)]
    hostile_wrong: usize,
    /// Internal (hostile child): time bound, seconds.
    #[arg(long, hide = true, default_value_t = 60)]
    hostile_secs: u64,
}

/// Password accounts of the session load.
const ACCOUNTS: usize = 16;

fn main() {
    let mut args = Args::parse();
    if args.hostile_child {
        std::process::exit(hostile::child_main(&args));
    }
    if args.quick {
        args.sessions = args.sessions.min(40);
        args.vms = args.vms.min(4);
        args.exec_secs = args.exec_secs.min(10);
    }
    for k in &args.kill {
        if !["vmm", "qemu", "worker", "gateway", "broker", ""].contains(&k.as_str()) {
            eprintln!("capvisor-soak: --kill: unknown kind {k:?} (vmm, qemu, worker, gateway, broker)");
            std::process::exit(2);
        }
    }
    std::process::exit(run(args));
}

/// Pids the deadline watchdog kills (serve, the hostile child).
static SERVE_PID: AtomicU32 = AtomicU32::new(0);
static HOSTILE_PIDS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

fn watchdog(limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        let step = stats::STEP.lock().map(|s| s.clone()).unwrap_or_default();
        eprintln!("capvisor-soak: FAILED: the global deadline of {limit:?} passed during: {step}; killing the run");
        let mut pids = HOSTILE_PIDS.lock().map(|v| v.clone()).unwrap_or_default();
        pids.push(SERVE_PID.load(Ordering::SeqCst));
        for pid in pids {
            if pid != 0 {
                for p in procs::below(&procs::table(), pid) {
                    server::signal(p.pid, nix::sys::signal::Signal::SIGKILL);
                }
                server::signal(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        std::process::exit(3);
    });
}

/// Everything the report prints.
#[derive(Default, serde::Serialize)]
struct Figures {
    sessions_asked: usize,
    sessions_served: u64,
    concurrency: usize,
    calls: u64,
    errors: Vec<(String, bool, u64)>,
    unexpected_errors: u64,
    unexpected_samples: Vec<String>,
    call_p50_ms: f64,
    call_p99_ms: f64,
    login_p50_ms: f64,
    login_p99_ms: f64,
    owner_probe_tries: u64,
    owner_probe_ok: u64,
    owner_probe_failures: Vec<String>,
    hostile: Option<hostile::Report>,
    hostile_other_uid: bool,
    vms_asked: usize,
    vms_running_at_once: usize,
    boot_p50_ms: f64,
    boot_max_ms: f64,
    execs_ok: u64,
    exec_failures_unaffected: Vec<String>,
    kills: Vec<(String, String, bool)>,
    peak_rss_kib: Vec<(String, u64, usize)>,
    serve_stopped_by_sigterm: Option<bool>,
    processes_left: Vec<String>,
    audit_expected: usize,
    audit_found: usize,
    audit_lost: usize,
    audit_lost_samples: Vec<String>,
    failures: Vec<String>,
}

fn msf(d: Option<Duration>) -> f64 {
    d.map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
}

fn run(args: Args) -> i32 {
    let t_start = Instant::now();
    watchdog(Duration::from_secs(args.deadline_secs));
    let me = std::env::current_exe().expect("current_exe");
    let bin_dir = args.bin_dir.clone().unwrap_or_else(|| me.parent().expect("bin dir").to_path_buf());
    let guest_init = std::env::var_os("CAPVISOR_GUEST_INIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir.join("capvisor-guest-init"));
    let work = tempfile::Builder::new().prefix("capvisor-soak.").tempdir().expect("tempdir");
    let manifest = server::manifest(args.concurrency + 16, args.vms, args.vm_mib);
    eprintln!("capvisor-soak: starting capvisor serve in {} ...", work.path().display());
    let mut serve = match server::Serve::start(
        &bin_dir,
        &guest_init,
        work.path(),
        &manifest,
        Duration::from_secs(args.deadline_secs),
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("capvisor-soak: FAILED: {e:#}");
            return 1;
        }
    };
    SERVE_PID.store(serve.pid, Ordering::SeqCst);
    let sampler = server::Sampler::start(serve.pid);
    let socket = serve.socket.clone();
    let st: stats::Shared = Rc::new(RefCell::new(stats::Stats::default()));
    let mut fig = Figures {
        sessions_asked: args.sessions,
        concurrency: args.concurrency,
        vms_asked: args.vms,
        ..Default::default()
    };

    capvisor_rpc::conn::run_local(async {
        // The owner's admin session: password accounts for the load and the
        // hostile client's target.
        let admin = match sessions::login(&st, &socket, None, true).await {
            Ok(a) => a,
            Err(e) => {
                fig.failures.push(format!("owner login failed: {e}"));
                return;
            }
        };
        let accounts = capvisor_client::ops::accounts(&admin.session);
        let mut names: Vec<(String, &str)> =
            (0..ACCOUNTS).map(|k| (format!("soak{k}"), server::ACCOUNT_PASSWORD)).collect();
        names.push((server::TARGET_ACCOUNT.into(), server::TARGET_PASSWORD));
        for (n, pw) in &names {
            let r =
                sessions::timed(&st, "Accounts.add", &[], capvisor_client::ops::add_account(&accounts, n, "user", pw))
                    .await;
            match r {
                Ok(()) => st.borrow_mut().expect("account.add", "ok", &admin.id, ""),
                Err(e) => fig.failures.push(format!("Accounts.add {n}: {e}")),
            }
        }

        // Phase A, with the flood and the owner probe.
        let t_a = Instant::now();
        let mut children = vec![];
        if !args.no_hostile {
            let other_uid = nix::unistd::geteuid().is_root();
            fig.hostile_other_uid = other_uid;
            for part in [hostile::Part::Idle, hostile::Part::Bad] {
                let p = hostile::Params {
                    part,
                    socket: socket.clone(),
                    bad: (args.sessions / 4).clamp(5, 60),
                    // Past the per-uid bound when the flood runs as another
                    // uid; well below it when it shares ours (module docs).
                    idle: if other_uid { capvisor_gateway::MAX_RPC_PER_UID + 16 } else { 8 },
                    wrong: (args.sessions / 10).clamp(6, 24),
                    limit: Duration::from_secs(90),
                };
                match hostile::spawn(&me, &p) {
                    Ok(c) => {
                        HOSTILE_PIDS.lock().unwrap().push(c.id());
                        children.push(c);
                    }
                    Err(e) => fig.failures.push(format!("cannot start the hostile client: {e}")),
                }
            }
        }
        let (stop_probe, probe_rx) = tokio::sync::oneshot::channel();
        let probe = tokio::task::spawn_local(sessions::owner_probe(st.clone(), socket.clone(), probe_rx));
        stats::step("phase A: sessions under the flood");
        sessions::run(&st, &socket, args.sessions, args.concurrency, ACCOUNTS).await;
        stats::step("phase A: waiting for the hostile clients");
        for c in children {
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                let _ = tx.send(c.wait_with_output());
            });
            match tokio::time::timeout(Duration::from_secs(150), rx).await {
                Ok(Ok(Ok(out))) => match serde_json::from_slice::<hostile::Report>(&out.stdout) {
                    Ok(r) => fig.hostile.get_or_insert_with(Default::default).merge(r),
                    Err(e) => fig.failures.push(format!("hostile client report unreadable ({e}); exit {}", out.status)),
                },
                _ => fig.failures.push("hostile client did not finish in 150 s".into()),
            }
        }
        let _ = stop_probe.send(());
        if let Ok(p) = probe.await {
            fig.owner_probe_tries = p.tries;
            fig.owner_probe_ok = p.ok;
            fig.owner_probe_failures = p.failures;
        }
        eprintln!("capvisor-soak: phase A done in {:.1} s", t_a.elapsed().as_secs_f64());

        // Phase B: VMs with exec traffic; phase C: kills while it runs.
        let kill = |k: &str| args.kill.iter().any(|x| x == k);
        let doomed: vms::Doomed = Default::default();
        let results: vms::LoopResults = Default::default();
        let mut sess = vec![];
        if args.vms > 0 {
            let t_b = Instant::now();
            stats::step("phase B: booting VMs");
            let (s, boots) = vms::start_vms(&st, serve.pid, &socket, args.vms).await;
            sess = s;
            fig.boot_p50_ms = msf(pct(&boots, 50));
            fig.boot_max_ms = msf(pct(&boots, 100));
            let census = vms::census(serve.pid);
            fig.vms_running_at_once = census.get("qemu-system-x86_64").copied().unwrap_or(0);
            eprintln!(
                "capvisor-soak: phase B: {} VMs running after {:.1} s ({census:?})",
                fig.vms_running_at_once,
                t_b.elapsed().as_secs_f64()
            );
            let stop = Rc::new(Cell::new(false));
            stats::step("phase B: exec traffic");
            let loops = vms::start_loops(&st, &sess, stop.clone(), doomed.clone(), results.clone());
            tokio::time::sleep(Duration::from_secs(args.exec_secs / 2)).await;
            sampler.sample_now(serve.pid);
            let n = sess.len();
            if kill("vmm") && !sess.is_empty() && !sess[0].vms.is_empty() {
                stats::step("phase C: kill -9 of a vmm");
                let o = vms::kill_vm_process(serve.pid, &sess[0], 0, false, &doomed).await;
                fig.kills.push((o.kind, o.seen, o.pass));
            }
            if kill("qemu") {
                let at = if sess.first().is_some_and(|s| s.vms.len() > 1) {
                    Some((0, 1))
                } else if n > 1 && !sess[1].vms.is_empty() {
                    Some((1, 0))
                } else {
                    None
                };
                if let Some((j, v)) = at {
                    stats::step("phase C: kill -9 of a qemu");
                    let o = vms::kill_vm_process(serve.pid, &sess[j], v, true, &doomed).await;
                    fig.kills.push((o.kind, o.seen, o.pass));
                }
            }
            if kill("worker") && n > 0 {
                stats::step("phase C: kill -9 of a worker");
                let o = vms::kill_worker(serve.pid, &socket, &mut sess[n - 1], &doomed).await;
                fig.kills.push((o.kind, o.seen, o.pass));
            }
            tokio::time::sleep(Duration::from_secs(args.exec_secs - args.exec_secs / 2)).await;
            stats::step("phase C: stopping the exec loops");
            stop.set(true);
            for l in loops {
                let _ = l.await;
            }
            // Every VM not killed on purpose carried on: no failure in its
            // loop, and one more exec works now.
            for s in sess.iter().filter(|s| !s.dead) {
                for (name, vm) in &s.vms {
                    if doomed.borrow().contains_key(name) {
                        continue;
                    }
                    let (ok, fail) = results.borrow().get(name).cloned().unwrap_or_default();
                    fig.execs_ok += ok;
                    if let Some(f) = fail {
                        fig.exec_failures_unaffected.push(format!("{name}: {f}"));
                    }
                    let r =
                        stats::bounded(30, capvisor_client::ops::exec_collect(vm, &["echo", "after"], b"", 64)).await;
                    if !matches!(&r, Ok(o) if o.stdout == b"after\n") {
                        fig.exec_failures_unaffected
                            .push(format!("{name}: exec after the kills -> {:?}", r.map(|o| o.exit)));
                    }
                }
            }
            for (name, (ok, _)) in results.borrow().iter() {
                if doomed.borrow().contains_key(name) {
                    fig.execs_ok += ok;
                }
            }
        } else {
            for k in ["vmm", "qemu", "worker"].into_iter().filter(|k| kill(k)) {
                fig.kills.push((k.into(), "not run: no VMs (--vms 0)".into(), true));
            }
        }
        stats::step("removing VMs, logging out");
        vms::teardown(&st, &sess).await;
        let _ = sessions::logout(&st, &admin).await;
        drop(admin);

        if kill("gateway") {
            stats::step("phase C: kill -9 of the gateway");
            let (o, alive) = vms::kill_gateway(&st, &mut serve, &socket).await;
            fig.kills.push((o.kind, o.seen, o.pass));
            if !alive && kill("broker") {
                fig.kills.push(("broker".into(), "not run: serve had stopped with the gateway".into(), true));
            }
        }
        if kill("broker") && serve.exited().is_none() {
            stats::step("phase C: kill -9 of the broker");
            let o = vms::kill_broker(&st, &mut serve, &socket).await;
            fig.kills.push((o.kind, o.seen, o.pass));
        }
    });

    // Shutdown, then the figures that must be 0.
    stats::step("stopping serve");
    sampler.sample_now(serve.pid);
    let (status, by_term) = serve.stop();
    let broker_killed = fig.kills.iter().any(|(k, s, _)| k == "broker" && !s.starts_with("not run"));
    let gateway_stopped = fig.kills.iter().any(|(k, s, _)| k == "gateway" && s.starts_with("serve stopped"));
    if !broker_killed && !gateway_stopped {
        fig.serve_stopped_by_sigterm = Some(by_term && status.is_some_and(|s| s.success()));
        if fig.serve_stopped_by_sigterm == Some(false) {
            fig.failures.push(format!("serve did not stop cleanly on SIGTERM ({status:?})"));
        }
    }
    let seen = sampler.seen.clone();
    drop(sampler);
    let seen = seen.lock().unwrap();
    fig.processes_left =
        server::left_behind(&seen, work.path(), Duration::from_secs(5), &HOSTILE_PIDS.lock().unwrap().clone());
    for (k, (kib, pids)) in &seen.peak {
        fig.peak_rss_kib.push((k.clone(), *kib, pids.len()));
    }
    drop(seen);

    let s = st.borrow();
    let mut expect = s.expect.clone();
    if let Some(h) = &fig.hostile {
        for _ in 0..h.wrong_passwords.get("denied").copied().unwrap_or(0) {
            expect.push(stats::Expect {
                action: "login".into(),
                outcome: "denied".into(),
                session: String::new(),
                principal: format!("password:{}", server::TARGET_ACCOUNT),
            });
        }
    }
    let audit = std::fs::read_to_string(serve.state.join("audit.jsonl")).unwrap_or_default();
    let (n, found, lost) = stats::audit_lost(&expect, &audit);
    fig.audit_expected = n;
    fig.audit_found = found;
    fig.audit_lost = lost.len();
    fig.audit_lost_samples = lost.iter().take(10).map(|e| format!("{e:?}")).collect();
    fig.sessions_served = s.sessions_served;
    fig.calls = s.calls;
    fig.errors = s.errors.iter().map(|((c, ok), n)| (c.clone(), *ok, *n)).collect();
    fig.unexpected_errors = s.unexpected_count();
    fig.unexpected_samples = s.unexpected.clone();
    fig.call_p50_ms = msf(pct(&s.call_lat, 50));
    fig.call_p99_ms = msf(pct(&s.call_lat, 99));
    fig.login_p50_ms = msf(pct(&s.login_lat, 50));
    fig.login_p99_ms = msf(pct(&s.login_lat, 99));
    let (call_p50, call_p99, login_p50, login_p99) =
        (pct(&s.call_lat, 50), pct(&s.call_lat, 99), pct(&s.login_lat, 50), pct(&s.login_lat, 99));
    drop(s);

    judge(&mut fig, &args);
    print_report(&fig, &args, t_start.elapsed(), [call_p50, call_p99, login_p50, login_p99]);
    if let Some(p) = &args.json {
        if let Err(e) = std::fs::write(p, serde_json::to_vec_pretty(&fig).expect("serialize")) {
            eprintln!("capvisor-soak: cannot write {}: {e}", p.display());
        }
    }
    if args.keep {
        let kept = work.keep();
        println!("run directory kept: {}", kept.display());
    }
    if fig.failures.is_empty() {
        0
    } else {
        1
    }
}

/// Adds a failure for every must-hold figure that does not hold.
fn judge(fig: &mut Figures, args: &Args) {
    let f = &mut fig.failures;
    if fig.sessions_served != fig.sessions_asked as u64 {
        f.push(format!("sessions served {} of {}", fig.sessions_served, fig.sessions_asked));
    }
    if fig.unexpected_errors > 0 {
        f.push(format!("{} unexpected errors", fig.unexpected_errors));
    }
    if !fig.processes_left.is_empty() {
        f.push(format!("{} processes left after shutdown", fig.processes_left.len()));
    }
    if fig.audit_lost > 0 {
        f.push(format!("{} audit lines lost", fig.audit_lost));
    }
    if fig.hostile_other_uid && fig.owner_probe_ok != fig.owner_probe_tries {
        f.push(format!("owner logins during the flood: {} of {}", fig.owner_probe_ok, fig.owner_probe_tries));
    }
    if let Some(h) = &fig.hostile {
        if !h.misbehaved.is_empty() || h.idle_never_closed > 0 {
            f.push(format!("gateway misbehaved toward the hostile client: {:?}", h.misbehaved));
        }
        if h.wrong_passwords.keys().any(|k| k.starts_with("ok")) {
            f.push("a wrong password logged in".into());
        }
    }
    if args.vms > 0 && fig.vms_running_at_once < args.vms {
        f.push(format!("only {} of {} VMs ran at once", fig.vms_running_at_once, args.vms));
    }
    if !fig.exec_failures_unaffected.is_empty() {
        f.push(format!("{} VMs not killed on purpose failed", fig.exec_failures_unaffected.len()));
    }
    for (k, seen, pass) in &fig.kills {
        if !pass {
            f.push(format!("kill -9 {k}: {seen}"));
        }
    }
}

fn print_report(fig: &Figures, args: &Args, took: Duration, lat: [Option<Duration>; 4]) {
    let mib = |k: u64| k as f64 / 1024.0;
    println!();
    println!(
        "capvisor-soak report ({} cores, {:.0} s, deadline {} s)",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        took.as_secs_f64(),
        args.deadline_secs
    );
    println!(
        "sessions served            {} of {} ({} at once)",
        fig.sessions_served, fig.sessions_asked, fig.concurrency
    );
    println!("calls                      {}", fig.calls);
    println!("errors by code             (= meant: a typed error the call provokes or a kill -9 causes)");
    for (code, meant, n) in &fig.errors {
        println!("  {:<24} {:>6} {}", code, n, if *meant { "meant" } else { "UNEXPECTED" });
    }
    for u in &fig.unexpected_samples {
        println!("    e.g. {u}");
    }
    println!("call latency               p50 {}, p99 {}", ms(lat[0]), ms(lat[1]));
    println!("login latency              p50 {}, p99 {}", ms(lat[2]), ms(lat[3]));
    println!(
        "owner logins during flood  {} of {} worked{}",
        fig.owner_probe_ok,
        fig.owner_probe_tries,
        if fig.hostile_other_uid { "" } else { " (flood shared our uid)" }
    );
    for p in fig.owner_probe_failures.iter().take(5) {
        println!("    failed: {p}");
    }
    match &fig.hostile {
        Some(h) => {
            println!(
                "hostile (uid {:<11})    garbage {}, oversized {}, garbage frames {}: {} closed silently, {} frames closed; slowest close {} ms",
                if fig.hostile_other_uid { "65534,65533".to_string() } else { h.uid.to_string() },
                h.garbage,
                h.oversized, h.garbage_frames, h.closed_silently, h.garbage_frames_closed, h.slowest_close_ms
            );
            println!(
                "                           bogus attaches {}: {} refused staleSession",
                h.bogus_attach, h.bogus_attach_refused
            );
            println!(
                "                           idle {}: {} closed at once, {} at the login deadline, {} never",
                h.idle, h.idle_closed_at_once, h.idle_closed_at_deadline, h.idle_never_closed
            );
            println!("                           wrong passwords {:?}", h.wrong_passwords);
            for m in h.misbehaved.iter().take(5) {
                println!("    misbehaved: {m}");
            }
        }
        None => println!("hostile                    off"),
    }
    println!(
        "VMs                        {} of {} at once ({} MiB each); create->first exec p50 {:.0} ms, max {:.0} ms; {} execs ok",
        fig.vms_running_at_once, fig.vms_asked, args.vm_mib, fig.boot_p50_ms, fig.boot_max_ms, fig.execs_ok
    );
    for e in &fig.exec_failures_unaffected {
        println!("    failed: {e}");
    }
    for (k, seen, pass) in &fig.kills {
        println!("kill -9 {:<18} {} [{}]", k, seen, if *pass { "as designed" } else { "FAIL" });
    }
    println!("peak RSS (VmHWM) per kind  (largest process of the kind; processes seen)");
    for (k, kib, n) in &fig.peak_rss_kib {
        println!("  {:<24} {:>8.1} MiB ({n})", k, mib(*kib));
    }
    match fig.serve_stopped_by_sigterm {
        Some(ok) => println!("serve stopped by SIGTERM   {}", if ok { "cleanly" } else { "NOT cleanly" }),
        None => println!("serve stopped by SIGTERM   n/a (serve had ended after a kill -9)"),
    }
    println!("processes left             {}", fig.processes_left.len());
    for p in fig.processes_left.iter().take(10) {
        println!("    {p}");
    }
    println!(
        "audit lines lost           {} (expected {}, found {})",
        fig.audit_lost, fig.audit_expected, fig.audit_found
    );
    for l in &fig.audit_lost_samples {
        println!("    {l}");
    }
    if fig.failures.is_empty() {
        println!("result                     PASS");
    } else {
        println!("result                     FAIL");
        for f in &fig.failures {
            println!("    {f}");
        }
    }
}
