//! capvisor's broker (DESIGN.md, "Processes and the capability graph";
//! docs/processes.md): authenticates principals, keeps the credential
//! store, mints sessions and resume tokens, spawns one worker per session,
//! routes attached client sockets to their worker, and writes the audit log.
//!
//! Process contract: `capvisor-broker --rpc-fd 3 --attach-fd 4` with
//! fd 3 = RPC stream to the gateway (the broker serves `Broker` as its
//! bootstrap, [`capvisor_rpc::conn::INTERNAL`] limits), fd 4 = the fd
//! channel on which the gateway passes attach connections (tag = token),
//! env `CAPVISOR_BROKER_CONFIG` = JSON [`BrokerConfig`]. It runs until
//! SIGTERM/SIGINT or until the gateway's connection ends, then revokes
//! every session, waits (bounded) for the workers and exits 0.
//!
//! - [`config`]: the configuration ([`BrokerConfig`]).
//! - [`store`]: the credential store (Argon2id, atomic file writes).
//! - [`token`]: session ids, resume tokens, the hashed token index.
//! - [`throttle`]: delays for failed password logins.
//! - [`audit`]: the JSONL audit log.
//! - [`launch`]: spawning workers.
//! - [`service`]: the session logic; [`server`]: the capnp servers.

pub mod audit;
pub mod config;
pub mod launch;
pub mod server;
pub mod service;
pub mod store;
pub mod throttle;
pub mod token;

#[cfg(test)]
mod tests;

pub use config::BrokerConfig;
pub use service::BrokerService;

use capvisor_rpc::conn;
use capvisor_rpc::fdpass::FdChannel;
use capvisor_rpc::schema::internal_capnp::broker;
use std::os::fd::RawFd;

/// Now, Unix epoch milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The broker process's main loop (see the crate docs). Must run inside
/// [`conn::run_local`].
///
/// Errors: a bad `CAPVISOR_BROKER_CONFIG`, an unusable state directory or
/// credential store, descriptors that are not the expected sockets.
pub async fn run(rpc_fd: RawFd, attach_fd: RawFd, config_fd: RawFd) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let cfg = BrokerConfig::from_fd(config_fd)?;
    let launcher = launch::ProcessLauncher { worker_bin: cfg.worker_bin.clone() };
    let svc = BrokerService::new(cfg, Box::new(launcher), store::default_params())?;
    // SAFETY: the supervisor hands us these descriptors at these numbers
    // (docs/processes.md) and nothing else in this process uses them.
    let stream = unsafe { conn::stream_from_fd(rpc_fd)? };
    // SAFETY: as above: the attach SOCK_SEQPACKET socket, ours alone.
    let attach = unsafe { FdChannel::from_raw(attach_fd)? };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let bootstrap: broker::Client = capnp_rpc::new_client(server::BrokerServer::new(svc.clone()));
    let (_gateway, rpc_done) = conn::serve::<capnp::capability::Client>(stream, bootstrap.client, conn::INTERNAL);
    tracing::info!("broker serving");
    tokio::select! {
        r = rpc_done => tracing::info!("gateway connection ended ({r:?}); shutting down"),
        r = svc.clone().run_attach_loop(attach) => tracing::info!("attach channel closed ({r:?}); shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM; shutting down"),
        _ = int.recv() => tracing::info!("SIGINT; shutting down"),
    }
    svc.shutdown().await;
    tracing::info!("broker stopped");
    Ok(())
}
