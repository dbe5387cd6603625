//! `capvisor-proxy --rpc-fd 3 --vm-fd 4 --config-fd 5`: one session's
//! egress proxy (docs/processes.md, "capvisor-proxy"), spawned by its
//! worker; not for people.
//!
//! - reads `ProxyConfig` (internal.capnp) from the memfd at `--config-fd`;
//! - confines itself (`capvisor_proxy::sandbox`, best effort, logged);
//! - serves `Proxy` as the bootstrap on the stream socket at `--rpc-fd`;
//! - receives each VM's "capvisor.egress" socket on the `SOCK_SEQPACKET`
//!   fd channel at `--vm-fd`, tagged `vm:<name>`, and serves `Egress` on it;
//! - exits when the worker's connection ends.

use capvisor_rpc::conn;
use capvisor_rpc::fdpass::FdChannel;
use clap::Parser;
use std::os::fd::RawFd;

#[derive(Parser)]
#[command(
    name = "capvisor-proxy",
    about = "capvisor's per-session egress proxy (spawned by capvisor-worker; not run by hand)"
)]
struct Args {
    /// Inherited stream socket to the worker; `Proxy` is served on it.
    #[arg(long, default_value_t = 3)]
    rpc_fd: RawFd,
    /// Inherited SOCK_SEQPACKET fd channel on which VM egress sockets
    /// arrive, tagged `vm:<name>`.
    #[arg(long, default_value_t = 4)]
    vm_fd: RawFd,
    /// Inherited memfd holding the schema `ProxyConfig` message.
    #[arg(long, default_value_t = 5)]
    config_fd: RawFd,
}

fn main() {
    capvisor_rpc::init_logging("proxy");
    let args = Args::parse();
    if let Err(e) = run(args) {
        tracing::error!("capvisor-proxy: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let fds = [args.rpc_fd, args.vm_fd, args.config_fd];
    anyhow::ensure!(
        fds[0] != fds[1] && fds[0] != fds[2] && fds[1] != fds[2],
        "--rpc-fd, --vm-fd and --config-fd must differ"
    );
    let rpc = capvisor_rpc::spawn::take_inherited(args.rpc_fd, "rpc")?;
    let vms = capvisor_rpc::spawn::take_inherited(args.vm_fd, "vm")?;
    let msg = capvisor_rpc::spawn::read_config(args.config_fd)?;
    let cfg = capvisor_proxy::Config::read_from(msg.get_root()?)?;
    let ask_timeout =
        msg.get_root::<capvisor_schema::internal_capnp::proxy_config::Reader<'_>>()?.get_ask_timeout_secs();
    drop(msg);
    let session = cfg.session_id.clone();
    // Before confinement: the system's root certificates are read here.
    let state = capvisor_proxy::ProxyState::new(cfg)?;
    if let Some(m) = &state.mitm {
        tracing::info!(session = %session, system_roots = m.upstream.roots.0, extra_roots = m.upstream.roots.1, "intercepting TLS");
    }
    match capvisor_proxy::sandbox::confine() {
        Ok(status) => tracing::info!(session = %session, "confined: {status}"),
        Err(e) => tracing::warn!(session = %session, "NOT confined: {e:#}"),
    }
    if ask_timeout > 0 {
        state.approvals.set_timeout(std::time::Duration::from_secs(ask_timeout.into()));
    }
    conn::run_local(async move {
        let rpc = capvisor_rpc::spawn::into_tokio(rpc)?;
        let vms = FdChannel::new(vms)?;
        capvisor_proxy::run(rpc, vms, state).await
    })
}
