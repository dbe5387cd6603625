//! `capvisor-broker --rpc-fd 3 --attach-fd 4 --config-fd 5` (see the library docs).

use clap::Parser;

/// capvisor's broker. Started by `capvisor serve`; not for direct use.
#[derive(Parser)]
#[command(name = "capvisor-broker", version)]
struct Args {
    /// Inherited RPC stream to the gateway (the broker serves `Broker` on it).
    #[arg(long, default_value_t = 3)]
    rpc_fd: i32,
    /// Inherited SOCK_SEQPACKET fd channel on which the gateway passes attach connections.
    #[arg(long, default_value_t = 4)]
    attach_fd: i32,
    /// Inherited memfd holding the schema `BrokerConfig` message.
    #[arg(long, default_value_t = 5)]
    config_fd: i32,
}

fn main() -> std::process::ExitCode {
    capvisor_rpc::init_logging("broker");
    let args = Args::parse();
    match capvisor_rpc::conn::run_local(capvisor_broker::run(args.rpc_fd, args.attach_fd, args.config_fd)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("capvisor-broker: {e:#}");
            eprintln!("capvisor-broker: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
