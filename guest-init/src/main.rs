//! `capvisor-guest-init`: PID 1 of a capvisor guest, or a host-side test server.
//!
//! - As PID 1 (getpid() == 1; command-line arguments are ignored, since the
//!   kernel passes unknown boot parameters to init): mounts the basic file
//!   systems, loads the modules listed in `/lib/modules/capvisor/order`,
//!   switches into a root image when the kernel command line names one
//!   (`capvisor.root=`, see `rootfs`), sets the hostname, brings up `lo`,
//!   steers egress into itself when asked (`capvisor.egress=1`, see
//!   `egress`), finds the virtio-serial port named
//!   `capvisor.agent` and serves `Guest` on it as the bootstrap capability
//!   (`Side::Server`), reopening the port and serving again whenever a
//!   connection ends. It reaps every orphan, never exits (a PID 1 exit
//!   panics the kernel) and powers off on a fatal error (no agent port).
//! - `--serve-fd N`: serves `Guest` on the inherited stream socket N until
//!   the peer hangs up or `shutdown` is called.
//! - `--socket PATH`: listens on the Unix socket PATH (an existing socket
//!   file there is replaced) and serves each connection, until `shutdown`.
//!
//! Progress goes to stderr (the serial console as PID 1), prefixed
//! `guest-init:` with milliseconds since boot.

use capvisor_guest_init::{
    boottime_ms, fdio::FdStream, init, reaper, serve_rw, serve_stream, GuestServer, ShutdownMode,
};
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

/// Host test modes (ignored as PID 1).
#[derive(Parser, Debug)]
#[command(name = "capvisor-guest-init", about = "capvisor guest PID 1 / Guest server")]
struct Args {
    /// Serve Guest on this inherited stream-socket descriptor.
    #[arg(long, value_name = "N", conflicts_with = "socket")]
    serve_fd: Option<i32>,
    /// Listen on this Unix socket path and serve Guest on each connection.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

fn log(msg: impl AsRef<str>) {
    eprintln!("guest-init: [{} ms] {}", boottime_ms(), msg.as_ref());
}

fn main() {
    if std::process::id() == 1 {
        pid1_main();
    }
    let args = Args::parse();
    let code = match (args.serve_fd, args.socket) {
        (Some(fd), _) => capvisor_rpc::conn::run_local(serve_fd(fd)),
        (None, Some(path)) => capvisor_rpc::conn::run_local(serve_socket(path)),
        (None, None) => {
            eprintln!("capvisor-guest-init: not PID 1; use --serve-fd N or --socket PATH (see --help)");
            2
        }
    };
    std::process::exit(code);
}

/// Waits until `shutdown` was requested, then a little longer so its reply
/// reaches the peer.
async fn shutdown_requested(mut rx: tokio::sync::watch::Receiver<Option<bool>>) {
    if rx.wait_for(|v| v.is_some()).await.is_err() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(capvisor_guest_init::POWER_OFF_DELAY).await;
}

async fn serve_fd(fd: i32) -> i32 {
    // SAFETY: F_SETFD on the descriptor we were told to own; children must not inherit it.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the caller handed us this descriptor (documented flag).
    let stream = match unsafe { capvisor_rpc::conn::stream_from_fd(fd) } {
        Ok(s) => s,
        Err(e) => {
            eprintln!("capvisor-guest-init: --serve-fd {fd}: {e}");
            return 1;
        }
    };
    let server = GuestServer::new(boottime_ms(), ShutdownMode::EndServing);
    let sd = server.shutdown_requested();
    let guest = server.into_client();
    tokio::select! {
        r = serve_stream(stream, guest) => {
            if let Err(e) = r {
                eprintln!("capvisor-guest-init: connection ended: {e}");
            }
        }
        _ = shutdown_requested(sd) => {}
    }
    0
}

async fn serve_socket(path: PathBuf) -> i32 {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(m) = std::fs::symlink_metadata(&path) {
        if m.file_type().is_socket() {
            let _ = std::fs::remove_file(&path);
        }
    }
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("capvisor-guest-init: bind {}: {e}", path.display());
            return 1;
        }
    };
    let server = GuestServer::new(boottime_ms(), ShutdownMode::EndServing);
    let sd = server.shutdown_requested();
    let guest = server.into_client();
    let accept = async {
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    let g = guest.clone();
                    tokio::task::spawn_local(async move {
                        if let Err(e) = serve_stream(s, g).await {
                            eprintln!("capvisor-guest-init: connection ended: {e}");
                        }
                    });
                }
                Err(e) => {
                    eprintln!("capvisor-guest-init: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = shutdown_requested(sd) => {}
    }
    let _ = std::fs::remove_file(&path);
    0
}

/// PID 1: set up the machine, then serve forever. Never returns.
fn pid1_main() -> ! {
    reaper::set_reap_all(true);
    init::mount_basics();
    init::ensure_stdio();
    log("started");
    // Modules first: they live in the initramfs, and a root image's disk
    // needs virtio_blk (a module under the debian-cloud kernel).
    let t0 = boottime_ms();
    let (ok, failed) = init::load_modules(std::path::Path::new(init::MODULES_DIR));
    let t1 = boottime_ms();
    init::root_and_hostname();
    init::loopback_up();
    log(format!(
        "modules loaded ({ok} ok, {failed} failed, {} ms); root, hostname and lo up ({} ms)",
        t1 - t0,
        boottime_ms() - t1
    ));
    // Egress steering (capvisor.egress=1 only): before the agent is served,
    // so the first exec already has the network the session allows.
    capvisor_guest_init::egress::boot();
    loop {
        let r = std::panic::catch_unwind(|| capvisor_rpc::conn::run_local(serve_agent_forever()));
        match r {
            Ok(()) => {}
            Err(_) => log("serve loop panicked; restarting in 1 s"),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

static READY_MS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// Finds the agent port and serves `Guest` on it, reopening it whenever a
/// connection ends (the host side closed, or was never connected: the port
/// then reads EOF at once). Returns only on fatal errors, after powering off.
async fn serve_agent_forever() {
    let t0 = boottime_ms();
    let Some(port) = init::find_agent_port(init::PORT_TIMEOUT).await else {
        log(format!(
            "no virtio-serial port named {} after {:?}; powering off",
            init::AGENT_PORT_NAME,
            init::PORT_TIMEOUT
        ));
        init::power_off(false);
        // Not PID 1 any more? Cannot happen; wait to be killed.
        std::future::pending::<()>().await;
        return;
    };
    log(format!("found {} as {} ({} ms)", init::AGENT_PORT_NAME, port.display(), boottime_ms() - t0));
    let ready = *READY_MS.get_or_init(boottime_ms);
    let guest = GuestServer::new(ready, ShutdownMode::PowerOff).into_client();
    let mut backoff = Duration::from_millis(5);
    let mut announced = false;
    loop {
        let fd = match init::open_port(&port) {
            Ok(fd) => fd,
            Err(e) => {
                log(format!("open {}: {e}", port.display()));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let stream = match FdStream::new(fd) {
            Ok(s) => s,
            Err(e) => {
                log(format!("register {}: {e}", port.display()));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if !announced {
            log(format!("serving on {}", port.display()));
            init::signal_boot_ready();
            announced = true;
        }
        let started = tokio::time::Instant::now();
        let r = serve_rw(stream.clone(), stream, guest.clone()).await;
        if started.elapsed() > Duration::from_secs(1) {
            // A real session ended: say so, reconnect quickly.
            log(match r {
                Ok(()) => "host connection ended; serving again".to_string(),
                Err(e) => format!("host connection ended ({e}); serving again"),
            });
            backoff = Duration::from_millis(5);
        } else {
            // Host side not connected yet: the port reads EOF at once.
            backoff = (backoff * 2).min(Duration::from_millis(100));
        }
        tokio::time::sleep(backoff).await;
    }
}
