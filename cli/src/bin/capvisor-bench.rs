//! `capvisor-bench`: boot, exec and data-path figures on this machine, in
//! one run (README, "Benchmarks"). Starts its own `capvisor serve` with
//! private dirs (binaries beside this one; the guest image cache is the
//! usual one), drives it through the host-client library, and compares
//! with a bare QEMU boot and a raw Unix-socket round trip measured in the
//! same run.
//!
//! Options: `--boots N` (default 9), `--execs N` (200), `--pings N` (2000),
//! `--cli-runs N` (50), `--chains N` (200), `--relay-chains N` (50),
//! `--delay-ms D` (10): round trips counted through a relay adding D per
//! direction (module `rtt`). `--cli-only --bin-dir DIR [--guest-init PATH]`
//! measures only `capvisor vm exec` with DIR's server and CLI.
//! `--image-boots N` (default 5; 0 skips) cold boots of each of `base` and
//! `debian`, the debian writable layer's host disk, and image build times;
//! `--cold-image` adds one cold build of the debian image (minutes; module
//! `images`). `--egress-mib M` (default 256; 0 skips) and
//! `--egress-requests N` (100): guest traffic through the egress proxy
//! beside the host's direct traffic (module `egress`); `--egress-only`
//! runs just that section. `--revokes N` (default 50), `--redeems N` (200)
//! and `--narrow-calls N` (2000; 0 skips a part, all three 0 the section):
//! delegation figures with their own serve, revoke -> a holder's call
//! failing, share tokens redeemed per second, one narrowing layer's added
//! latency (module `grants`); `--grants-only` runs just that section.

use capvisor_client::{connect, ops};
use capvisor_rpc::host::host_kvm_usable;
use capvisor_rpc::schema::capvisor_capnp::Engine;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "capvisor-bench/egress.rs"]
mod egress;
#[path = "capvisor-bench/grants.rs"]
mod grants;
#[path = "capvisor-bench/images.rs"]
mod images;
#[path = "common/procs.rs"]
mod procs;
#[path = "capvisor-bench/rtt.rs"]
mod rtt;
use procs::descendants;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn pct(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Raw round trip: one byte over a socketpair to a forked echo process.
fn raw_rtt(n: usize) -> Vec<Duration> {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    // SAFETY: called before any other thread exists (first thing in main).
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            drop(a);
            let mut byte = [0u8; 1];
            while b.read_exact(&mut byte).is_ok() {
                if b.write_all(&byte).is_err() {
                    break;
                }
            }
            // SAFETY: the forked echo child ends without running the parent's
            // destructors or atexit handlers (fork(2) in a single-threaded process).
            unsafe { libc::_exit(0) };
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(b);
            let mut v = Vec::with_capacity(n);
            let mut byte = [7u8; 1];
            for _ in 0..n + 50 {
                let t = Instant::now();
                a.write_all(&byte).unwrap();
                a.read_exact(&mut byte).unwrap();
                v.push(t.elapsed());
            }
            drop(a);
            let _ = nix::sys::wait::waitpid(child, None);
            v.split_off(50)
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Boots the image with plain qemu: exactly the command line the vmm uses
/// (`capvisor_vmm::qemu::args`: same machine, accel, kernel, initramfs,
/// command line, devices; agent and QMP on socketpairs nobody talks on,
/// the serial console on a socketpair read here), started directly,
/// without capvisor around it. Returns the time until guest-init's first
/// line reaches the console. Must run inside a
/// `LocalSet` (the cold boots run in the same loop, alternating with these,
/// so drift in host load hits both series alike).
async fn bare_qemu_boot(kernel: &Path, initramfs: &Path, dir: &Path) -> Duration {
    let run_dir = dir.join(format!("bare-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir).expect("run dir");
    let cfg = capvisor_vmm::VmConfig {
        name: "bare".into(),
        run_dir: run_dir.clone(),
        kernel: kernel.to_path_buf(),
        initramfs: initramfs.to_path_buf(),
        memory_mib: 256,
        vcpus: 1,
        engine: Engine::Qemu,
        extra_cmdline: String::new(),
        disks: vec![],
        confine: Default::default(),
        egress: false,
    };
    let args = capvisor_vmm::qemu::args(&cfg, host_kvm_usable(), capvisor_vmm::qemu::host_tsc_khz());
    let (agent, _agent_peer) = capvisor_rpc::spawn::stream_pair().expect("socketpair");
    let (qmp, _qmp_peer) = capvisor_rpc::spawn::stream_pair().expect("socketpair");
    let (console_ours, console) = capvisor_rpc::spawn::stream_pair().expect("socketpair");
    let mut console_ours = capvisor_rpc::spawn::into_tokio(console_ours).expect("console socket");
    {
        let mut cmd = tokio::process::Command::new(capvisor_vmm::qemu::qemu_binary());
        cmd.args(&args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let fds = [
            capvisor_rpc::spawn::Inherit { fd: agent, target: capvisor_vmm::qemu::AGENT_FD },
            capvisor_rpc::spawn::Inherit { fd: qmp, target: capvisor_vmm::qemu::QMP_FD },
            capvisor_rpc::spawn::Inherit { fd: console, target: capvisor_vmm::qemu::CONSOLE_FD },
        ];
        capvisor_rpc::spawn::prepare(&mut cmd, &fds);
        let t0 = Instant::now();
        let mut child = cmd.spawn().expect("spawn qemu");
        drop(fds);
        let mut text = Vec::new();
        let took = loop {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 4096];
            let left = Duration::from_secs(120).saturating_sub(t0.elapsed());
            let n = tokio::time::timeout(left, console_ours.read(&mut buf))
                .await
                .expect("bare qemu: guest-init never printed on the console")
                .expect("bare qemu: console read");
            assert!(n > 0, "bare qemu: the console closed before guest-init printed");
            text.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&text).contains("guest-init") {
                break t0.elapsed();
            }
        };
        let _ = child.kill().await;
        took
    }
}

/// RSS of `pid` without the mapping that holds guest RAM (the anonymous
/// mapping of exactly `guest_kib`), in KiB: the VMM's own memory.
fn rss_without_guest_kib(pid: u32, guest_kib: u64) -> u64 {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else { return 0 };
    let (mut total, mut guest, mut in_guest) = (0u64, 0u64, false);
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        match (f.next(), f.next()) {
            (Some("Size:"), Some(v)) => in_guest = v.parse::<u64>().ok() == Some(guest_kib),
            (Some("Rss:"), Some(v)) => {
                let v: u64 = v.parse().unwrap_or(0);
                total += v;
                if in_guest {
                    guest += v;
                }
            }
            _ => {}
        }
    }
    total - guest
}

/// Engine kvm measured from inside the vmm: spawns `capvisor-vmm` like a
/// worker does (engine kvm, 256 MiB) `runs` times and reads the boot
/// milestones from `Machine.status`. Returns (vmm start -> first guest
/// instruction, µs), (vmm RSS, KiB), (vmm RSS without guest RAM, KiB).
fn kvm_engine_figures(
    image: &capvisor_manifest::BuiltImage,
    dir: &Path,
    runs: usize,
) -> (Vec<u64>, Vec<u64>, Vec<u64>) {
    use capvisor_client::schema::internal_capnp::machine;
    let (mut first, mut rss, mut own) = (vec![], vec![], vec![]);
    for i in 0..runs {
        let run_dir = dir.join(format!("kvm-{i}"));
        std::fs::create_dir_all(&run_dir).expect("run dir");
        let cfg = capvisor_vmm::VmConfig {
            name: format!("kvm-{i}"),
            run_dir,
            kernel: image.kernel.clone(),
            initramfs: image.initramfs.clone(),
            memory_mib: 256,
            vcpus: 1,
            engine: Engine::Kvm,
            extra_cmdline: String::new(),
            disks: vec![],
            confine: Default::default(),
            egress: false,
        };
        capvisor_rpc::conn::run_local(async {
            let (rpc_ours, rpc_theirs) = capvisor_rpc::spawn::stream_pair().unwrap();
            let (_agent_ours, agent_theirs) = capvisor_rpc::spawn::stream_pair().unwrap();
            let config = capvisor_rpc::spawn::config_fd(&cfg.to_message().unwrap()).unwrap();
            let mut cmd = tokio::process::Command::new(capvisor_rpc::paths::binary("capvisor-vmm"));
            cmd.args(["--rpc-fd", "3", "--agent-fd", "4", "--config-fd", "5"]).stderr(Stdio::null());
            let fds = [
                capvisor_rpc::spawn::Inherit { fd: rpc_theirs, target: 3 },
                capvisor_rpc::spawn::Inherit { fd: agent_theirs, target: 4 },
                capvisor_rpc::spawn::Inherit { fd: config, target: 5 },
            ];
            capvisor_rpc::spawn::prepare(&mut cmd, &fds);
            let mut child = cmd.spawn().expect("spawn capvisor-vmm");
            drop(fds);
            let pid = child.id().unwrap_or(0);
            let (m, conn) = capvisor_rpc::conn::connect::<machine::Client>(
                capvisor_rpc::spawn::into_tokio(rpc_ours).unwrap(),
                None,
                capvisor_rpc::conn::INTERNAL,
            );
            let t0 = Instant::now();
            loop {
                let r = m.status_request().send().promise.await.expect("Machine.status");
                let st = r.get().unwrap().get_status().unwrap();
                let us = st.get_boot().unwrap().get_first_run_us();
                if us > 0 {
                    first.push(us);
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "engine kvm never ran a guest instruction: {:?}",
                    st.get_detail().unwrap().to_str()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            rss.push(rss_kib(pid));
            own.push(rss_without_guest_kib(pid, 256 * 1024));
            let mut q = m.stop_request();
            q.get().set_grace_ms(0);
            let _ = q.send().promise.await;
            conn.abort();
            let _ = child.wait().await;
        });
    }
    (first, rss, own)
}

/// The delegation section (module `grants`) with `--revokes`, `--redeems`
/// and `--narrow-calls`; skipped (no serve started) when all three are 0.
fn grants_figures(bin_dir: &Path, guest_init: &Path, work: &Path) -> grants::GrantFigures {
    let (revokes, redeems, calls) = (arg("--revokes", 50), arg("--redeems", 200), arg("--narrow-calls", 2000));
    if revokes + redeems + calls == 0 {
        return grants::GrantFigures::default();
    }
    grants::figures(bin_dir, guest_init, work, revokes, redeems, calls).expect("delegation figures")
}

fn main() {
    if std::env::args().any(|a| a == "--cli-only") {
        std::process::exit(rtt::cli_only_main());
    }
    if std::env::args().any(|a| a == "--egress-only") {
        let bin_dir = capvisor_rpc::paths::bin_dir();
        let work = tempfile::Builder::new().prefix("capvisor-bench.").tempdir().expect("tempdir");
        let guest_init = std::env::var_os("CAPVISOR_GUEST_INIT")
            .map(PathBuf::from)
            .unwrap_or_else(|| bin_dir.join("capvisor-guest-init"));
        let mib = arg("--egress-mib", 256) as u64;
        let mut figs = egress::figures(&bin_dir, &guest_init, work.path(), mib, arg("--egress-requests", 100))
            .expect("egress figures");
        egress::print(&mut figs);
        return;
    }
    if std::env::args().any(|a| a == "--grants-only") {
        let bin_dir = capvisor_rpc::paths::bin_dir();
        let work = tempfile::Builder::new().prefix("capvisor-bench.").tempdir().expect("tempdir");
        let guest_init = std::env::var_os("CAPVISOR_GUEST_INIT")
            .map(PathBuf::from)
            .unwrap_or_else(|| bin_dir.join("capvisor-guest-init"));
        let mut figs = grants_figures(&bin_dir, &guest_init, work.path());
        println!();
        println!("{:<58} {:>12}", "figure", "value");
        grants::print(&mut figs);
        return;
    }
    let boots = arg("--boots", 9);
    let execs = arg("--execs", 200);
    let pings = arg("--pings", 2000);
    let mut raw = raw_rtt(pings);

    let bin_dir = capvisor_rpc::paths::bin_dir();
    let work = tempfile::Builder::new().prefix("capvisor-bench.").tempdir().expect("tempdir");
    let socket = work.path().join("run/gateway.sock");
    let guest_init = std::env::var_os("CAPVISOR_GUEST_INIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir.join("capvisor-guest-init"));
    eprintln!("capvisor-bench: starting capvisor serve ...");
    let mut serve = Command::new(bin_dir.join("capvisor"))
        .arg("serve")
        .env("CAPVISOR_SOCKET", &socket)
        .env("CAPVISOR_STATE_DIR", work.path().join("state"))
        .env("CAPVISOR_GUEST_INIT", &guest_init)
        .env("CAPVISOR_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn capvisor serve");
    let _stop_on_panic = rtt::StopOnPanic(serve.id());
    let t0 = Instant::now();
    while !socket.exists() {
        assert!(serve.try_wait().unwrap().is_none(), "capvisor serve exited early");
        assert!(t0.elapsed() < Duration::from_secs(900), "capvisor serve did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The same image `serve` boots for the default manifest's `base`.
    let source: capvisor_images::KernelSource =
        capvisor_manifest::Manifest::default_manifest().images["base"].kernel.parse().expect("kernel source");
    let image = capvisor_images::ensure_image(&capvisor_rpc::paths::cache_dir(), source, &guest_init, &mut |_| {})
        .expect("image");

    let serve_pid = serve.id();
    let delay = rtt::delay_arg();
    let relay = rtt::Relay::start(&work.path().join("relay.sock"), &socket).expect("relay");
    let figures = capvisor_rpc::conn::run_local(async {
        let login = connect::login_local(&socket).await.expect("login");
        let session = connect::attach(&socket, &login.token).await.expect("attach");
        let vms = ops::vms(&session);

        // Cold boots through capvisor and bare QEMU boots alternate.
        let (mut cold, mut bare) = (vec![], vec![]);
        for i in 0..boots {
            let t = Instant::now();
            let spec = ops::VmSpec { name: format!("cold-{i}"), ..Default::default() };
            let vm = ops::create_vm(&vms, &spec);
            let out = ops::exec_collect(&vm, &["true"], b"", 1 << 20).await.expect("exec");
            assert_eq!(out.exit, ops::Exit::Code(0));
            cold.push(t.elapsed());
            ops::remove_vm(&vms, &spec.name).await.expect("remove");
            bare.push(bare_qemu_boot(&image.kernel, &image.initramfs, work.path()).await);
            eprintln!(
                "capvisor-bench: #{}: cold create -> first exec result {:.0} ms; bare qemu boot to init {:.0} ms",
                i + 1,
                ms(cold[i]),
                ms(bare[i])
            );
        }

        let vm = ops::create_vm(&vms, &ops::VmSpec { name: "warm".into(), ..Default::default() });
        let engine = ops::engine_name(ops::vm_info(&vm).await.expect("info").engine);
        let procs = descendants(serve_pid);
        let rss: Vec<(String, u64)> = procs
            .iter()
            .filter(|(_, a)| a.contains("capvisor-vmm") || a.contains("qemu") || a.contains("capvisor-worker"))
            .map(|(p, a)| {
                (Path::new(a).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(), rss_kib(*p))
            })
            .collect();
        let mut exec_rt = vec![];
        for _ in 0..execs {
            let t = Instant::now();
            let out = ops::exec_collect(&vm, &["true"], b"", 1 << 20).await.expect("exec");
            assert_eq!(out.exit, ops::Exit::Code(0));
            exec_rt.push(t.elapsed());
        }
        for _ in 0..50 {
            ops::ping(&vm).await.expect("ping");
        }
        let mut info_rt = vec![];
        for _ in 0..pings {
            let t = Instant::now();
            ops::vm_info(&vm).await.expect("info");
            info_rt.push(t.elapsed());
        }
        let mut ping_rt = vec![];
        for _ in 0..pings {
            let t = Instant::now();
            ops::ping(&vm).await.expect("ping");
            ping_rt.push(t.elapsed());
        }
        let chains = rtt::chain_figures(
            &session,
            &login.token,
            "warm",
            &relay,
            arg("--chains", 200),
            arg("--relay-chains", 50),
            delay,
        )
        .await
        .expect("chain figures");
        ops::remove_vm(&vms, "warm").await.expect("remove");
        ops::logout(&session).await.expect("logout");
        (cold, bare, exec_rt, ping_rt, info_rt, rss, engine, chains)
    });
    let (mut cold, mut bare, mut exec_rt, mut ping_rt, mut info_rt, rss, engine, mut chains) = figures;
    let mut cli =
        rtt::cli_figures(&bin_dir.join("capvisor"), &socket, &relay, work.path(), arg("--cli-runs", 50), delay)
            .expect("CLI figures");
    drop(relay);
    let image_boots = arg("--image-boots", 5);
    let mut image_figs = if image_boots > 0 {
        capvisor_rpc::conn::run_local(images::boot_figures(&socket, &work.path().join("state"), image_boots))
            .expect("image figures")
    } else {
        images::BootFigures::default()
    };

    rtt::stop_serve(&mut serve);
    let mut build_figs = if image_boots > 0 {
        let cold = std::env::args().any(|a| a == "--cold-image");
        images::build_figures(&capvisor_rpc::paths::cache_dir(), &guest_init, cold).expect("image build figures")
    } else {
        images::BuildFigures::default()
    };

    let egress_mib = arg("--egress-mib", 256) as u64;
    let mut egress_figs = if egress_mib > 0 {
        egress::figures(&bin_dir, &guest_init, work.path(), egress_mib, arg("--egress-requests", 100))
            .expect("egress figures")
    } else {
        egress::EgressFigures::default()
    };

    let mut grant_figs = grants_figures(&bin_dir, &guest_init, work.path());

    let kvm_usable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    let (mut kvm_first, mut kvm_rss, mut kvm_own) =
        if kvm_usable { kvm_engine_figures(&image, work.path(), boots) } else { (vec![], vec![], vec![]) };

    let cold_p50 = pct(&mut cold, 50);
    let bare_p50 = pct(&mut bare, 50);
    let raw_p50 = pct(&mut raw, 50);
    let ping_p50 = pct(&mut ping_rt, 50);
    println!();
    let accel = if engine == "qemu" {
        if host_kvm_usable() {
            " (KVM)"
        } else {
            " (TCG)"
        }
    } else {
        ""
    };
    println!(
        "capvisor-bench on {} cores, engine {engine}{accel} (the one `auto` picked), kernel {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        image.kernel_release
    );
    println!("{:<58} {:>12}", "figure", "value");
    println!("{:<58} {:>9.0} ms", format!("cold create -> first exec result (median of {})", cold.len()), ms(cold_p50));
    println!(
        "{:<58} {:>9.0} ms",
        format!("bare qemu boot to init, same kernel+initramfs (median of {})", bare.len()),
        ms(bare_p50)
    );
    println!("{:<58} {:>10.2}x", "ratio ours / bare (medians)", cold_p50.as_secs_f64() / bare_p50.as_secs_f64());
    // The fastest boot of each series is the least disturbed by host noise.
    let (cold_min, bare_min) = (pct(&mut cold, 0), pct(&mut bare, 0));
    println!(
        "{:<58} {:>10.2}x",
        format!("ratio of the fastest boots ({:.0} / {:.0} ms)", ms(cold_min), ms(bare_min)),
        cold_min.as_secs_f64() / bare_min.as_secs_f64()
    );
    println!(
        "{:<58} {:>9.0} us",
        format!("exec `true` round trip p50 ({} calls)", exec_rt.len()),
        us(pct(&mut exec_rt, 50))
    );
    println!(
        "{:<58} {:>9.0} us",
        format!("exec `true` round trip p99 ({} calls)", exec_rt.len()),
        us(pct(&mut exec_rt, 99))
    );
    println!(
        "{:<58} {:>9.0} us",
        format!("no-op to guest-init, whole chain p50 ({} calls)", ping_rt.len()),
        us(ping_p50)
    );
    println!(
        "{:<58} {:>9.0} us",
        format!("no-op to guest-init, whole chain p99 ({} calls)", ping_rt.len()),
        us(pct(&mut ping_rt, 99))
    );
    println!(
        "{:<58} {:>9.0} us",
        format!("client -> worker only (Vm.info) p50 ({} calls)", info_rt.len()),
        us(pct(&mut info_rt, 50))
    );
    println!(
        "{:<58} {:>9.0} us",
        format!("client -> worker only (Vm.info) p99 ({} calls)", info_rt.len()),
        us(pct(&mut info_rt, 99))
    );
    println!(
        "{:<58} {:>9.0} us",
        format!("raw Unix-socket round trip, 2 processes p50 ({} calls)", raw.len()),
        us(raw_p50)
    );
    println!("{:<58} {:>9.0} us", "raw Unix-socket round trip p99", us(pct(&mut raw, 99)));
    println!("{:<58} {:>10.2}x", "ratio whole chain / raw (p50)", ping_p50.as_secs_f64() / raw_p50.as_secs_f64());
    rtt::print_chain(&mut chains);
    rtt::print_cli(&mut cli, "CLI");
    if image_boots > 0 {
        images::print(&mut image_figs, &mut build_figs);
    }
    if egress_mib > 0 {
        egress::print(&mut egress_figs);
    }
    grants::print(&mut grant_figs);
    for (name, kib) in &rss {
        println!("{:<58} {:>8.1} MiB", format!("engine {engine}: RSS of {name} (running VM)"), *kib as f64 / 1024.0);
    }
    if kvm_usable {
        let med = |v: &mut Vec<u64>| {
            v.sort();
            v[v.len() / 2]
        };
        println!(
            "{:<58} {:>9.1} ms",
            format!("engine kvm: vmm start -> first guest instruction (median of {})", kvm_first.len()),
            med(&mut kvm_first) as f64 / 1000.0
        );
        println!(
            "{:<58} {:>8.1} MiB",
            "engine kvm: RSS of capvisor-vmm incl. guest pages touched",
            med(&mut kvm_rss) as f64 / 1024.0
        );
        println!(
            "{:<58} {:>8.1} MiB",
            "engine kvm: RSS of capvisor-vmm without guest RAM",
            med(&mut kvm_own) as f64 / 1024.0
        );
        let qemu_total: u64 = rss.iter().filter(|(n, _)| n != "capvisor-worker").map(|(_, k)| *k).sum();
        println!(
            "{:<58} {:>8.1} MiB",
            "engine qemu: RSS of capvisor-vmm + qemu (same guest)",
            qemu_total as f64 / 1024.0
        );
    } else {
        println!("engine kvm: skipped (/dev/kvm is not usable here)");
    }
    if host_kvm_usable() {
        println!("engine kvm: boot to init and create -> first exec are the figures above (auto picked kvm)");
    } else {
        println!("engine kvm: boot to init and create -> first exec skipped: /dev/kvm is the nested kvm_pvm, where stock Linux kernels cannot boot");
    }
}
