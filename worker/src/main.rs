//! `capvisor-worker --rpc-fd 3 --attach-fd 4 --config-fd 5`: one session's
//! worker (see `capvisor_worker::serve`). Spawned by the broker only (see
//! docs/processes.md); not for people.

use capvisor_manifest::SessionContext;
use capvisor_rpc::conn;
use capvisor_rpc::fdpass::FdChannel;
use clap::Parser;

#[derive(Parser)]
#[command(about = "capvisor per-session worker (spawned by capvisor-broker; not run by hand)")]
struct Args {
    /// Inherited stream socket to the broker.
    #[arg(long)]
    rpc_fd: i32,
    /// Inherited SOCK_SEQPACKET fd channel on which attached client sockets arrive.
    #[arg(long)]
    attach_fd: i32,
    /// Inherited memfd holding the schema `SessionContext` message.
    #[arg(long)]
    config_fd: i32,
}

fn main() -> anyhow::Result<()> {
    capvisor_rpc::init_logging("worker");
    let args = Args::parse();
    let msg = capvisor_rpc::spawn::read_config(args.config_fd)?;
    let ctx = SessionContext::read_from(msg.get_root()?)?;
    conn::run_local(async move {
        // SAFETY: the broker handed us these descriptors at these numbers.
        let broker = unsafe { conn::stream_from_fd(args.rpc_fd)? };
        // SAFETY: as above.
        let attach = unsafe { FdChannel::from_raw(args.attach_fd)? };
        capvisor_worker::serve::run(broker, attach, ctx).await
    })
}
