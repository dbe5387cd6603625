//! capvisor-guest-init: the guest's PID 1 and the server side of the guest
//! protocol (`schema/capnp/guest.capnp`).
//!
//! Inside a VM the binary (`src/main.rs`) mounts the basic file systems,
//! loads the virtio modules, opens the virtio-serial port named
//! `capvisor.agent` and serves [`GuestServer`] as the bootstrap capability
//! on it (this end is `Side::Server`; the host dials as `Side::Client` and
//! calls `bootstrap(Side::Server)` to get a `guest::Client`).
//!
//! The servers here work on any Linux host too, which is how the tests run
//! them (`capvisor-guest-init --serve-fd N` / `--socket PATH`, or
//! [`serve_stream`] in-process).
//!
//! Modules:
//! - [`exec`]: `Guest.exec` and the `Process` capability (fork/exec, pipes,
//!   ptys, output streaming, stdin, wait, kill, resize).
//! - [`files`]: the `Files` capability.
//! - [`reaper`]: child reaping (`waitpid(-1)` as PID 1).
//! - [`pty`]: pseudo-terminal helpers.
//! - [`fdio`]: async I/O on raw descriptors (pipes, pty master, virtio port).
//! - [`rootfs`]: switching into a root image with a writable overlay;
//!   user lookup in the guest's passwd/group.
//! - [`init`]: PID 1 set-up (mounts, modules, hostname, loopback) and agent
//!   port discovery.
//! - [`egress`]: steering every guest TCP connection and DNS query into
//!   guest-init (sk_lookup BPF) and relaying them to the host's `Egress`;
//!   [`dns`]: the DNS responder and its fake-address table.

pub mod dns;
pub mod egress;
pub mod exec;
pub mod fdio;
pub mod files;
pub mod init;
pub mod pty;
pub mod reaper;
pub mod rootfs;
pub mod trust;

use capnp::capability::Rc;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capvisor_schema::common_capnp::files as files_cap;
use capvisor_schema::guest_capnp::guest;
use std::time::Duration;
use tokio::sync::watch;

/// Milliseconds since boot, `CLOCK_BOOTTIME` (includes suspend time).
pub fn boottime_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime fills a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// The running kernel's release (`uname -r`), or `"unknown"`.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_else(|_| "unknown".into())
}

/// What `Guest.shutdown` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownMode {
    /// PID 1: `sync()`, reply, then (after [`POWER_OFF_DELAY`] so the reply
    /// gets out) `sync()` again and reboot(2) with `RB_POWER_OFF`, or
    /// `RB_AUTOBOOT` when a reboot was asked for.
    PowerOff,
    /// Host / tests: `sync()`, reply, and signal the serve loop to end
    /// (see [`GuestServer::shutdown_requested`]).
    EndServing,
}

/// Delay between replying to `shutdown` and powering off.
pub const POWER_OFF_DELAY: Duration = Duration::from_millis(100);

/// Most connections `Guest.connect` keeps open at once (port forwarding);
/// one more is `quota`.
pub const MAX_FORWARDS: usize = 256;

/// The `Guest` capability.
pub struct GuestServer {
    ready_ms: u64,
    mode: ShutdownMode,
    shutdown_tx: watch::Sender<Option<bool>>,
    forwards: std::rc::Rc<std::cell::Cell<usize>>,
}

impl GuestServer {
    /// A server that reports `ready_ms` (CLOCK_BOOTTIME ms when serving
    /// began) as `initReadyMs` and shuts down per `mode`.
    pub fn new(ready_ms: u64, mode: ShutdownMode) -> Self {
        Self { ready_ms, mode, shutdown_tx: watch::channel(None).0, forwards: Default::default() }
    }

    /// A receiver that changes to `Some(reboot)` once `shutdown` was called.
    pub fn shutdown_requested(&self) -> watch::Receiver<Option<bool>> {
        self.shutdown_tx.subscribe()
    }

    /// Turns the server into a client cap (starting the reaper on this
    /// `LocalSet` if needed). Must be called inside a `LocalSet`.
    pub fn into_client(self) -> guest::Client {
        reaper::ensure_started();
        capnp_rpc::new_client(self)
    }
}

impl guest::Server for GuestServer {
    /// `GuestInfo`: kernel release, uptime and ready time (ms, CLOCK_BOOTTIME).
    async fn hello(self: Rc<Self>, _: guest::HelloParams, mut results: guest::HelloResults) -> capnp::Result<()> {
        let mut info = results.get().init_info();
        info.set_kernel_release(kernel_release().as_str());
        info.set_uptime_ms(boottime_ms());
        info.set_init_ready_ms(self.ready_ms);
        Ok(())
    }

    /// Starts a program (see [`exec`]); domain failures are typed exceptions.
    async fn exec(self: Rc<Self>, params: guest::ExecParams, mut results: guest::ExecResults) -> capnp::Result<()> {
        reaper::ensure_started();
        let p = params.get()?;
        let stdout = p.get_stdout()?;
        let stderr = p.get_stderr()?;
        let req = exec::ExecRequest::read_from(p.get_spec()?)??;
        results.get().set_process(exec::start(req, stdout, stderr)?);
        Ok(())
    }

    /// A `Files` capability for the guest's file system.
    async fn files(self: Rc<Self>, _: guest::FilesParams, mut results: guest::FilesResults) -> capnp::Result<()> {
        results.get().set_files(capnp_rpc::new_client::<files_cap::Client, _>(files::FilesServer));
        Ok(())
    }

    /// See [`ShutdownMode`].
    async fn shutdown(self: Rc<Self>, params: guest::ShutdownParams, _: guest::ShutdownResults) -> capnp::Result<()> {
        let reboot = params.get()?.get_reboot();
        nix::unistd::sync();
        if self.mode == ShutdownMode::PowerOff {
            tokio::task::spawn_local(async move {
                tokio::time::sleep(POWER_OFF_DELAY).await;
                init::power_off(reboot);
            });
        }
        let _ = self.shutdown_tx.send(Some(reboot));
        Ok(())
    }

    async fn ping(self: Rc<Self>, _: guest::PingParams, _: guest::PingResults) -> capnp::Result<()> {
        Ok(())
    }

    /// Connects to 127.0.0.1:`port` in the guest: the program's bytes are
    /// pumped into `down` (then `done`); `up` writes into the socket and
    /// its `done` half-closes it (dropping the write half shuts it down).
    /// At most [`MAX_FORWARDS`] at once.
    async fn connect(
        self: Rc<Self>,
        params: guest::ConnectParams,
        mut results: guest::ConnectResults,
    ) -> capnp::Result<()> {
        use capvisor_rpc::CvError;
        let p = params.get()?;
        let port = p.get_port();
        let down = p.get_down()?;
        if self.forwards.get() >= MAX_FORWARDS {
            return Err(CvError::quota(format!("at most {MAX_FORWARDS} forwarded connections at once")).into());
        }
        let stream = tokio::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port))
            .await
            .map_err(|e| CvError::unavailable(format!("nothing answers on the guest's 127.0.0.1:{port}: {e}")))?;
        let (rd, wr) = stream.into_split();
        let forwards = self.forwards.clone();
        forwards.set(forwards.get() + 1);
        tokio::task::spawn_local(async move {
            let _ = capvisor_rpc::sink::pump(rd, &down).await;
            forwards.set(forwards.get() - 1);
        });
        results.get().set_up(capvisor_rpc::sink::WriterSink::client(wr).0);
        Ok(())
    }
}

/// Serves `guest` on one connected byte stream (reader / writer halves)
/// as the bootstrap capability, this end being `Side::Server`, with
/// `capvisor_rpc::conn::INTERNAL` reader limits. Resolves when the
/// connection ends.
pub async fn serve_rw<R, W>(reader: R, writer: W, guest: guest::Client) -> capnp::Result<()>
where
    R: tokio::io::AsyncRead + Unpin + 'static,
    W: tokio::io::AsyncWrite + Unpin + 'static,
{
    capvisor_rpc::conn::rpc_system_rw(reader, writer, Side::Server, Some(guest.client), capvisor_rpc::conn::INTERNAL)
        .await
}

/// [`serve_rw`] on a tokio `UnixStream`.
pub async fn serve_stream(stream: tokio::net::UnixStream, guest: guest::Client) -> capnp::Result<()> {
    capvisor_rpc::conn::rpc_system(stream, Side::Server, Some(guest.client), capvisor_rpc::conn::INTERNAL).await
}
