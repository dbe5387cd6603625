//! capvisor's supervisor: what `capvisor serve` runs (DESIGN.md, "Processes
//! and the capability graph"; docs/processes.md).
//!
//! [`serve`] reads the manifest, checks the host (qemu on PATH, capvisor
//! binaries present), builds every guest image the manifest defines
//! (`capvisor_images::ensure_base`), binds the gateway's Unix socket
//! (directory 0700, socket 0600; 2750 and 0660 with `[gateway]
//! socket_group`, see [`identity`], which also drops `serve --user` to its
//! service user), spawns `capvisor-broker` and
//! `capvisor-gateway` with their socketpairs at fixed descriptors
//! (`capvisor_rpc::spawn::prepare`: PDEATHSIG, close-on-exec, own process
//! group so a terminal's Ctrl-C reaches only the supervisor), and then
//! waits for SIGINT/SIGTERM or a child's exit. A gateway that dies is
//! restarted on the same socket (at most [`GATEWAY_RESTARTS`] times in
//! [`GATEWAY_RESTART_WINDOW`]) and introduced to the broker, so sessions
//! and VMs carry on; the broker's exit ends everything. Shutdown is orderly:
//! SIGTERM to gateway and broker (the broker revokes every session, workers
//! stop their VMs), up to [`SHUTDOWN_GRACE`] of waiting, SIGKILL for what
//! is left, and the socket is removed.

use anyhow::{bail, Context};
use capvisor_broker::BrokerConfig;
use capvisor_manifest::{BuiltImage, Manifest};
use capvisor_rpc::{conn, fdpass, paths, spawn};
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod identity;

/// How long shutdown waits for gateway and broker after SIGTERM before SIGKILL.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);
/// Most gateway restarts within [`GATEWAY_RESTART_WINDOW`]; one more crash
/// is a crash loop and serve shuts everything down.
pub const GATEWAY_RESTARTS: usize = 5;
/// The window [`GATEWAY_RESTARTS`] counts in.
pub const GATEWAY_RESTART_WINDOW: Duration = Duration::from_secs(60);
/// Pause before restarting a crashed gateway, so a crash on every start
/// does not spin.
pub const GATEWAY_RESTART_DELAY: Duration = Duration::from_millis(200);
/// How long the gateway may take to answer the readiness probe.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// The QEMU binary the `qemu` engine runs.
pub const QEMU: &str = "qemu-system-x86_64";

/// What [`serve`] needs. The CLI fills it from `capvisor_rpc::paths`.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Manifest TOML file; `None`: the embedded default
    /// (`capvisor_manifest::Manifest::default_manifest`).
    pub manifest_path: Option<PathBuf>,
    /// The gateway socket to bind (its directory is created with mode 0700).
    pub socket: PathBuf,
    /// State directory (accounts, audit log, session run dirs); created 0700.
    pub state_dir: PathBuf,
    /// Cache directory for guest kernels and images.
    pub cache_dir: PathBuf,
    /// Directory holding `capvisor-broker`, `capvisor-gateway`, `capvisor-worker`
    /// (and `capvisor-vmm`, which the worker finds beside itself).
    pub bin_dir: PathBuf,
    /// The guest-init executable put into the base image as `/init`.
    pub guest_init: PathBuf,
}

/// Loads the manifest: the embedded default for `None`, else the file.
/// Returns it with a label for messages (`"default"` or the path).
///
/// Errors: the file cannot be read, or does not parse/validate; the message
/// names the file and the offending key.
pub fn load_manifest(path: Option<&Path>) -> anyhow::Result<(Manifest, String)> {
    match path {
        None => Ok((Manifest::default_manifest(), "default".to_string())),
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading manifest {}", p.display()))?;
            let m = Manifest::parse(&text).map_err(|e| anyhow::anyhow!("manifest {}: {e:#}", p.display()))?;
            Ok((m, p.display().to_string()))
        }
    }
}

/// Finds executable `name` on `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
}

/// Checks that [`QEMU`] is on `PATH`.
///
/// Errors: it is not, with the Debian package to install.
pub fn check_qemu() -> anyhow::Result<PathBuf> {
    find_on_path(QEMU).ok_or_else(|| {
        anyhow::anyhow!("{QEMU} is not on PATH; capvisor boots guests with QEMU: apt-get install qemu-system-x86")
    })
}

/// The capvisor binaries [`serve`] needs in `bin_dir`.
pub const BINARIES: &[&str] = &["capvisor-broker", "capvisor-gateway", "capvisor-worker", "capvisor-vmm"];

fn check_binaries(bin_dir: &Path) -> anyhow::Result<()> {
    for b in BINARIES {
        let p = bin_dir.join(b);
        if !p.is_file() {
            bail!("{} is missing (build it with `cargo build --workspace`, or set CAPVISOR_BIN_DIR)", p.display());
        }
    }
    Ok(())
}

/// Builds (or finds cached) every image the manifest defines. Images with
/// the same kernel source share one build.
///
/// Errors: whatever `capvisor_images::ensure_image` reports, naming the image.
pub fn build_images(
    manifest: &Manifest,
    cache_dir: &Path,
    guest_init: &Path,
) -> anyhow::Result<BTreeMap<String, BuiltImage>> {
    let mut by_kernel: BTreeMap<String, BuiltImage> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (name, img) in &manifest.images {
        if !by_kernel.contains_key(&img.kernel) {
            if !guest_init.is_file() {
                bail!(
                    "image {name}: guest-init binary {} not found (build it with `make guest-init`, or set CAPVISOR_GUEST_INIT)",
                    guest_init.display()
                );
            }
            let source: capvisor_images::KernelSource = img.kernel.parse().with_context(|| format!("image {name}"))?;
            let mut progress = |line: &str| eprintln!("capvisor: {line}");
            let built = match capvisor_images::ensure_image(cache_dir, source, guest_init, &mut progress) {
                Ok(b) => b,
                // The minimal kernel is built from source; Debian's cloud
                // kernel needs no build, so it is the fallback.
                Err(e) if source == capvisor_images::KernelSource::Minimal => {
                    eprintln!("capvisor: image {name}: the minimal kernel is not available ({e:#}); falling back to Debian's cloud kernel");
                    capvisor_images::ensure_image(
                        cache_dir,
                        capvisor_images::KernelSource::DebianCloud,
                        guest_init,
                        &mut progress,
                    )
                    .with_context(|| format!("building image {name} with the fallback kernel"))?
                }
                Err(e) => return Err(e).with_context(|| format!("building image {name}")),
            };
            by_kernel.insert(img.kernel.clone(), built);
        }
        let mut built = by_kernel[&img.kernel].clone();
        if img.has_rootfs() {
            // Same kernel and initramfs, plus the Debian root image.
            let spec = capvisor_images::rootfs::RootfsSpec {
                distribution: img.distribution().to_string(),
                packages: img.packages.clone(),
            };
            let mut progress = |line: &str| eprintln!("capvisor: {line}");
            built.rootfs = Some(
                capvisor_images::rootfs::ensure_rootfs(cache_dir, &spec, &mut progress)
                    .with_context(|| format!("building image {name}"))?,
            );
            built.writable_mib = img.writable_mib();
        }
        out.insert(name.clone(), built);
    }
    Ok(out)
}

/// Removes the socket file when dropped.
struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the gateway socket at `path`: creates its directory (0700, ours),
/// refuses if a live server answers there, removes a stale socket, binds,
/// and sets mode 0600.
///
/// Errors: "another capvisor serve is running on PATH"; the path exists and
/// is not a socket; the directory belongs to someone else; I/O errors.
pub fn bind_socket(path: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    bind_socket_for(path, None)
}

/// [`bind_socket`], with `group` (`[gateway] socket_group`): directory
/// 2750 and socket 0660 with that group ([`identity::prepare_socket_dir`],
/// [`identity::set_socket_mode`]).
///
/// Errors: as [`bind_socket`]; we are not in `group`.
pub fn bind_socket_for(path: &Path, group: Option<u32>) -> anyhow::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    identity::prepare_socket_dir(dir, group)?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!("{} exists and is not a socket; remove it or choose another --socket", path.display());
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => bail!("another capvisor serve is running on {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::info!(socket = %path.display(), "removing stale socket");
                std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
            }
            Err(e) => bail!("{} exists and cannot be probed ({e}); remove it if no server uses it", path.display()),
        }
    }
    let listener =
        std::os::unix::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    identity::set_socket_mode(path, group)?;
    Ok(listener)
}

/// Runs capvisor until SIGINT/SIGTERM (see the crate docs). Blocking; builds
/// its own single-threaded runtime, so call it from a thread that has none
/// (the CLI's main thread: the children's PDEATHSIG is tied to it).
///
/// Prints `capvisor: serving on <socket> (manifest: default|<path>)` on
/// stdout once the gateway answers.
///
/// Errors: a bad manifest (names the file and key), qemu missing, a
/// binary missing, an image build failure, another server on the socket,
/// a child failing to start or to become ready, or a child exiting
/// unexpectedly (named, with its status; everything else is shut down
/// first). A clean shutdown after a signal returns `Ok(())`.
pub fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    let (manifest, label) = load_manifest(opts.manifest_path.as_deref())?;
    check_qemu()?;
    check_binaries(&opts.bin_dir)?;
    let images = build_images(&manifest, &opts.cache_dir, &opts.guest_init)?;
    paths::ensure_private_dir(&opts.state_dir)
        .with_context(|| format!("preparing state directory {}", opts.state_dir.display()))?;
    let owner_uids = if manifest.local.owner_uids.is_empty() {
        vec![nix::unistd::getuid().as_raw()]
    } else {
        manifest.local.owner_uids.clone()
    };
    let cfg = BrokerConfig {
        manifest,
        images,
        state_dir: opts.state_dir.clone(),
        owner_uids,
        worker_bin: opts.bin_dir.join("capvisor-worker"),
    };
    run_services(&opts, cfg, &label, None)
}

/// The second half of [`serve`], for a resolved broker configuration
/// (images already built, state directory made): binds the socket, runs
/// gateway and broker until SIGINT/SIGTERM, until `stop` fires (when
/// given), or until a child exits, then shuts down and removes the socket.
/// Uses `opts.socket` and `opts.bin_dir`; `label` names the manifest in the
/// ready line. Blocking, like [`serve`].
///
/// Errors: as [`serve`] from the socket step on.
pub fn run_services(
    opts: &ServeOptions,
    cfg: BrokerConfig,
    label: &str,
    stop: Option<tokio::sync::oneshot::Receiver<()>>,
) -> anyhow::Result<()> {
    let auth = cfg.manifest.gateway.auth.join(",");
    let listener = bind_socket_for(&opts.socket, cfg.manifest.gateway.socket_gid)?;
    let guard = SocketGuard(opts.socket.clone());
    let res = conn::run_local(supervise(opts, cfg, auth, listener.into(), label, stop));
    drop(guard);
    res
}

struct Child {
    name: &'static str,
    child: tokio::process::Child,
    status: Option<std::process::ExitStatus>,
}

impl Child {
    /// Whether the child still runs (reaps it if it has exited).
    fn running(&mut self) -> bool {
        if self.status.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.status = Some(st);
            }
        }
        self.status.is_none()
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        if self.status.is_none() {
            if let Some(pid) = self.child.id() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
            }
        }
    }
}

fn spawn_child(name: &'static str, bin_dir: &Path, args: &[String], fds: Vec<spawn::Inherit>) -> anyhow::Result<Child> {
    let path = bin_dir.join(name);
    let mut cmd = tokio::process::Command::new(&path);
    cmd.args(args).stdin(std::process::Stdio::null()).process_group(0);
    spawn::prepare(&mut cmd, &fds);
    let child = cmd.spawn().with_context(|| format!("starting {}", path.display()))?;
    drop(fds);
    Ok(Child { name, child, status: None })
}

/// Starts a gateway on `listener` with fresh pipes to the broker, after
/// introducing those pipes to the broker on its supervisor channel
/// (`capvisor_broker::run`).
async fn start_gateway(
    opts: &ServeOptions,
    auth: &str,
    listener: &OwnedFd,
    broker_ch: &fdpass::FdChannel,
) -> anyhow::Result<Child> {
    let (rpc_b, rpc_g) = spawn::stream_pair()?;
    let (att_b, att_g) = fdpass::pair()?;
    broker_ch.send(capvisor_broker::GATEWAY_RPC_TAG, &rpc_b).await.context("introducing the gateway to the broker")?;
    broker_ch
        .send(capvisor_broker::GATEWAY_ATTACH_TAG, &att_b)
        .await
        .context("introducing the gateway to the broker")?;
    drop((rpc_b, att_b));
    let listener = listener.try_clone().context("duplicating the gateway socket")?;
    spawn_child(
        "capvisor-gateway",
        &opts.bin_dir,
        &[
            "--listen-fd".into(),
            "3".into(),
            "--broker-fd".into(),
            "4".into(),
            "--attach-fd".into(),
            "5".into(),
            format!("--auth={auth}"),
        ],
        vec![
            spawn::Inherit { fd: listener, target: 3 },
            spawn::Inherit { fd: rpc_g, target: 4 },
            spawn::Inherit { fd: att_g, target: 5 },
        ],
    )
}

/// Whether a gateway that just died may be restarted: true while fewer
/// than [`GATEWAY_RESTARTS`] restarts happened in the last
/// [`GATEWAY_RESTART_WINDOW`] (and then records this one).
fn may_restart(restarts: &mut std::collections::VecDeque<std::time::Instant>) -> bool {
    let now = std::time::Instant::now();
    while restarts.front().is_some_and(|t| now.duration_since(*t) > GATEWAY_RESTART_WINDOW) {
        restarts.pop_front();
    }
    if restarts.len() >= GATEWAY_RESTARTS {
        return false;
    }
    restarts.push_back(now);
    true
}

async fn supervise(
    opts: &ServeOptions,
    cfg: BrokerConfig,
    auth: String,
    listener: OwnedFd,
    label: &str,
    stop: Option<tokio::sync::oneshot::Receiver<()>>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (gw_sup, gw_b) = fdpass::pair()?;
    let broker_ch = fdpass::FdChannel::new(gw_sup)?;
    let config = spawn::config_fd(&cfg.to_message()?)?;
    let broker = spawn_child(
        "capvisor-broker",
        &opts.bin_dir,
        &["--gateways-fd".into(), "3".into(), "--config-fd".into(), "4".into()],
        vec![spawn::Inherit { fd: gw_b, target: 3 }, spawn::Inherit { fd: config, target: 4 }],
    )?;
    let mut children = vec![broker];
    match start_gateway(opts, &auth, &listener, &broker_ch).await {
        Ok(g) => children.push(g),
        Err(e) => {
            shutdown(&mut children).await;
            return Err(e);
        }
    }

    // Readiness: the gateway answers authMethods on the socket.
    let ready = tokio::select! {
        r = probe(&opts.socket) => r,
        (name, st) = wait_any(&mut children) => Err(anyhow::anyhow!("{name} exited during start-up ({st})")),
    };
    if let Err(e) = ready {
        shutdown(&mut children).await;
        return Err(e.context("capvisor did not start"));
    }
    println!("capvisor: serving on {} (manifest: {label})", opts.socket.display());
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let mut stop = std::pin::pin!(async move {
        match stop {
            Some(rx) => {
                let _ = rx.await;
            }
            None => futures::future::pending().await,
        }
    });
    let mut restarts = std::collections::VecDeque::new();
    let outcome = loop {
        let (name, status) = tokio::select! {
            _ = &mut stop => { tracing::info!("stop requested: shutting down"); break Ok(()) }
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break Ok(()) }
            exited = wait_any(&mut children) => exited,
        };
        // A gateway also ends when its broker does: let a dying broker be
        // seen before deciding.
        tokio::time::sleep(GATEWAY_RESTART_DELAY).await;
        let broker_alive = children.iter_mut().any(|c| c.name == "capvisor-broker" && c.running());
        if name != "capvisor-gateway" || !broker_alive || !may_restart(&mut restarts) {
            break Err(anyhow::anyhow!("{}; shut everything down", exit_report(&mut children).await));
        }
        tracing::warn!("capvisor-gateway exited unexpectedly ({status}); restarting it (sessions and VMs carry on)");
        eprintln!("capvisor: the gateway exited unexpectedly ({status}); restarting it");
        children.retain(|c| c.status.is_none());
        match start_gateway(opts, &auth, &listener, &broker_ch).await {
            Ok(g) => children.push(g),
            Err(e) => break Err(e.context("restarting the gateway")),
        }
    };
    shutdown(&mut children).await;
    outcome
}

/// Connects to the gateway socket and calls `Gateway.authMethods`, within
/// [`READY_TIMEOUT`].
async fn probe(socket: &Path) -> anyhow::Result<()> {
    use capvisor_rpc::schema::capvisor_capnp::gateway;
    use tokio::io::AsyncWriteExt;
    tokio::time::timeout(READY_TIMEOUT, async {
        let mut s = tokio::net::UnixStream::connect(socket).await?;
        s.write_all(capvisor_rpc::attach::MAGIC_RPC).await?;
        let (gw, conn_done) = conn::connect::<gateway::Client>(s, None, conn::UNTRUSTED);
        gw.auth_methods_request().send().promise.await?;
        drop(gw);
        conn_done.abort();
        anyhow::Ok(())
    })
    .await
    .map_err(|_| anyhow::anyhow!("the gateway did not answer within {READY_TIMEOUT:?}"))?
}

/// Resolves when any still-running child exits: its name and status.
async fn wait_any(children: &mut [Child]) -> (&'static str, String) {
    let waits = children.iter_mut().filter(|c| c.status.is_none()).map(|c| {
        Box::pin(async move {
            let st = c.child.wait().await;
            if let Ok(s) = &st {
                c.status = Some(*s);
            }
            (c.name, st.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()))
        })
    });
    let waits: Vec<_> = waits.collect();
    if waits.is_empty() {
        return futures::future::pending().await;
    }
    futures::future::select_all(waits).await.0
}

/// After a child exited: waits briefly for the others that are going too
/// (the broker ends when the gateway's connection does, and vice versa),
/// then names every exited child, the ones that failed first, e.g.
/// `capvisor-gateway exited unexpectedly (signal: 9 (SIGKILL)); capvisor-broker exited (exit status: 0)`.
async fn exit_report(children: &mut [Child]) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while tokio::time::Instant::now() < deadline && children.iter().any(|c| c.status.is_none()) {
        for c in children.iter_mut().filter(|c| c.status.is_none()) {
            if let Ok(Some(st)) = c.child.try_wait() {
                c.status = Some(st);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut exited: Vec<(&'static str, std::process::ExitStatus)> =
        children.iter().filter_map(|c| c.status.map(|s| (c.name, s))).collect();
    exited.sort_by_key(|(_, s)| s.success());
    exited
        .iter()
        .enumerate()
        .map(|(i, (n, s))| if i == 0 { format!("{n} exited unexpectedly ({s})") } else { format!("{n} exited ({s})") })
        .collect::<Vec<_>>()
        .join("; ")
}

/// SIGTERM to every running child, wait up to [`SHUTDOWN_GRACE`], SIGKILL
/// the rest, reap all.
async fn shutdown(children: &mut [Child]) {
    use nix::sys::signal::Signal;
    for c in children.iter() {
        c.signal(Signal::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    for c in children.iter_mut() {
        if c.status.is_some() {
            continue;
        }
        match tokio::time::timeout_at(deadline, c.child.wait()).await {
            Ok(Ok(st)) => {
                c.status = Some(st);
                tracing::debug!("{} exited ({st})", c.name);
            }
            Ok(Err(e)) => tracing::warn!("waiting for {}: {e}", c.name),
            Err(_) => tracing::warn!("{} did not exit within {SHUTDOWN_GRACE:?}; killing it", c.name),
        }
    }
    for c in children.iter_mut() {
        if c.status.is_none() {
            c.signal(Signal::SIGKILL);
            if let Ok(st) = c.child.wait().await {
                c.status = Some(st);
            }
        }
    }
}

#[cfg(test)]
mod tests;
