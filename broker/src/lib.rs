//! capvisor's broker (DESIGN.md, "Processes and the capability graph";
//! docs/processes.md): authenticates principals, keeps the credential
//! store, mints sessions and resume tokens, spawns one worker per session,
//! routes attached client sockets to their worker, and writes the audit log.
//!
//! Process contract: `capvisor-broker --gateways-fd 3 --config-fd 4` with
//! fd 3 = the supervisor's fd channel introducing each gateway it starts
//! (see [`run`]: per gateway an RPC stream on which the broker serves
//! `Broker` as its bootstrap with [`capvisor_rpc::conn::INTERNAL`] limits,
//! and the fd channel on which that gateway passes attach connections, tag
//! = token), fd 4 = a memfd holding the schema `BrokerConfig` message
//! ([`BrokerConfig`]). It runs until SIGTERM/SIGINT or until the
//! supervisor's channel ends, then revokes every session, waits (bounded)
//! for the workers and exits 0. A gateway's end is not the broker's: the
//! supervisor restarts a crashed gateway and introduces the new one.
//!
//! - [`config`]: the configuration ([`BrokerConfig`]).
//! - [`store`]: the credential store (Argon2id, atomic file writes).
//! - [`token`]: session ids, resume tokens, the hashed token index.
//! - [`throttle`]: delays for failed password logins.
//! - [`audit`]: the JSONL audit log; [`audit_db`]: its SQLite index.
//! - [`launch`]: spawning workers.
//! - [`volumes`]: persistent volumes; [`secrets`]: the encrypted secret store.
//! - [`service`]: the session logic; [`server`]: the capnp servers.

pub mod audit;
pub mod audit_db;
pub mod config;
pub mod grants;
pub mod launch;
pub mod secrets;
pub mod server;
pub mod service;
pub mod store;
pub mod throttle;
pub mod token;
pub mod volumes;

#[cfg(test)]
mod tests;

pub use config::BrokerConfig;
pub use service::BrokerService;

use anyhow::Context;
use capvisor_rpc::conn;
use capvisor_rpc::fdpass::FdChannel;
use capvisor_rpc::schema::internal_capnp::broker;
use std::os::fd::RawFd;

pub use capvisor_rpc::now_ms;

/// The broker process's main loop (see the crate docs). Must run inside
/// [`conn::run_local`].
///
/// `gateways_fd` is the supervisor's fd channel: each gateway the
/// supervisor starts (the first and every restart after a crash) arrives
/// as two messages, tag [`GATEWAY_RPC_TAG`] carrying the RPC stream the
/// broker serves `Broker` on, then tag [`GATEWAY_ATTACH_TAG`] carrying the
/// SOCK_SEQPACKET channel on which that gateway passes attach connections.
/// A gateway going away ends only its own connections (logins in
/// progress); sessions, workers and VMs carry on, and clients resume with
/// their token through the next gateway. The broker runs until the
/// supervisor's channel closes or SIGTERM/SIGINT.
///
/// Errors: a bad configuration message, an unusable state directory or
/// credential store, descriptors that are not the expected sockets.
pub async fn run(gateways_fd: RawFd, config_fd: RawFd) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut cfg = BrokerConfig::from_fd(config_fd)?;
    prepare_interception(&mut cfg)?;
    let launcher = launch::ProcessLauncher { worker_bin: cfg.worker_bin.clone() };
    // From here on the broker, its workers, their vmms and QEMU stay
    // inside this Landlock domain (before any thread exists).
    match capvisor_confine::service::confine_self(&confinement_policy(&cfg)?) {
        Ok(status) => tracing::info!("confined: landlock {status}"),
        Err(e) if cfg.manifest.confinement.requirements().landlock => {
            anyhow::bail!("cannot confine the broker: {e} (the manifest's [confinement] required names landlock)")
        }
        Err(e) => tracing::warn!("NOT confined by Landlock ([confinement] required allows it): {e}"),
    }
    let n = capvisor_confine::service::deny_dangerous_syscalls().context("cannot confine the broker")?;
    tracing::info!(
        "confined: seccomp denies {} dangerous system calls ({n} BPF instructions)",
        capvisor_confine::service::DENIED.len()
    );
    let svc = BrokerService::new(cfg, Box::new(launcher), store::default_params())?;
    // SAFETY: the supervisor hands us this descriptor at this number
    // (docs/processes.md) and nothing else in this process uses it.
    let gateways = unsafe { FdChannel::from_raw(gateways_fd)? };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tracing::info!("broker serving");
    let ticker = svc.clone();
    tokio::task::spawn_local(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            ticker.audit_log().flush_due();
        }
    });
    tokio::select! {
        r = serve_gateways(svc.clone(), gateways) => tracing::info!("supervisor channel closed ({r:?}); shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM; shutting down"),
        _ = int.recv() => tracing::info!("SIGINT; shutting down"),
    }
    svc.shutdown().await;
    svc.audit_log().flush_all();
    if let Some(ix) = svc.audit_log().index() {
        if !ix.sync_timeout(std::time::Duration::from_secs(5)) {
            tracing::warn!("the audit index did not catch up within 5 s; the next start rebuilds it");
        }
    }
    tracing::info!("broker stopped");
    Ok(())
}

/// TLS interception (manifest `[net] egress` and `intercept_tls`): loads
/// or makes the install's egress CA in `state_dir/egress-ca`
/// (`capvisor_proxy::ca::load_or_create`; key 0600) and reads the
/// manifest's `[net] ca_certs`, before the broker confines itself; every
/// session's proxy gets them in `SessionContext.net`.
///
/// Errors: the CA cannot be made or loaded, a `ca_certs` file is unreadable.
pub fn prepare_interception(cfg: &mut BrokerConfig) -> anyhow::Result<()> {
    if !cfg.manifest.net.intercepts() {
        return Ok(());
    }
    let dir = cfg.state_dir.join("egress-ca");
    let ca = capvisor_proxy::ca::load_or_create(&dir).with_context(|| format!("the egress CA in {}", dir.display()))?;
    cfg.manifest.net.prepare_interception((ca.cert, ca.key))?;
    tracing::info!("egress: intercepting TLS with the CA in {}", dir.display());
    Ok(())
}

/// The broker's Landlock policy (`capvisor_confine::service`): its state
/// directory, the binaries next to the worker, the images of `cfg`.
///
/// Errors: the state or binary directory does not exist.
pub fn confinement_policy(cfg: &BrokerConfig) -> anyhow::Result<capvisor_confine::landlock::QemuPolicy> {
    let bin_dir = cfg.worker_bin.parent().unwrap_or(std::path::Path::new("/"));
    let images: Vec<&std::path::Path> = cfg
        .images
        .values()
        .flat_map(|i| [i.kernel.as_path(), i.initramfs.as_path()].into_iter().chain(i.rootfs.as_deref()))
        .collect();
    Ok(capvisor_confine::service::service_policy(
        &cfg.state_dir,
        bin_dir,
        &images,
        "qemu-system-x86_64",
        &cfg.manifest.confinement.cgroup_root,
    )?)
}

/// Tag of the supervisor's message carrying a gateway's RPC stream.
pub const GATEWAY_RPC_TAG: &[u8] = b"gateway-rpc";
/// Tag of the supervisor's message carrying a gateway's attach channel; it
/// follows the [`GATEWAY_RPC_TAG`] message of the same gateway.
pub const GATEWAY_ATTACH_TAG: &[u8] = b"gateway-attach";

/// Serves every gateway the supervisor introduces on `ch` (see [`run`]),
/// each on its own task, until the channel ends (`Ok`) or fails.
pub async fn serve_gateways(svc: std::rc::Rc<BrokerService>, ch: FdChannel) -> std::io::Result<()> {
    let mut generation = 0u64;
    loop {
        let rpc = match ch.recv().await {
            Ok((tag, fd)) if tag == GATEWAY_RPC_TAG => fd,
            Ok((tag, _)) => {
                tracing::warn!("unexpected message {:?} on the supervisor channel", String::from_utf8_lossy(&tag));
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                tracing::warn!("malformed message on the supervisor channel: {e}");
                continue;
            }
            Err(e) => return Err(e),
        };
        let attach = match ch.recv().await {
            Ok((tag, fd)) if tag == GATEWAY_ATTACH_TAG => FdChannel::new(fd)?,
            Ok((tag, _)) => {
                tracing::warn!("expected the gateway's attach channel, got {:?}", String::from_utf8_lossy(&tag));
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        generation += 1;
        let stream = capvisor_rpc::spawn::into_tokio(rpc)?;
        let detail = format!("gateway #{generation} connected");
        svc.audit(audit::AuditRecord::new("gateway.connect", "Broker", "", "ok").detail(&detail));
        tracing::info!("{detail}");
        let svc = svc.clone();
        tokio::task::spawn_local(async move {
            let bootstrap: broker::Client = capnp_rpc::new_client(server::BrokerServer::new(svc.clone()));
            let (_gateway, rpc_done) =
                conn::serve::<capnp::capability::Client>(stream, bootstrap.client, conn::INTERNAL);
            tokio::select! {
                r = rpc_done => tracing::info!("gateway #{generation}: connection ended ({r:?})"),
                r = svc.clone().run_attach_loop(attach) => tracing::info!("gateway #{generation}: attach channel closed ({r:?})"),
            }
        });
    }
}
