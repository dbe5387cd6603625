//! `capvisor-broker --gateways-fd 3 --config-fd 4` (see the library docs).

use clap::Parser;

/// capvisor's broker. Started by `capvisor serve`; not for direct use.
#[derive(Parser)]
#[command(name = "capvisor-broker", version)]
struct Args {
    /// Inherited SOCK_SEQPACKET fd channel on which the supervisor introduces
    /// each gateway (its RPC stream, then its attach channel).
    #[arg(long, default_value_t = 3)]
    gateways_fd: i32,
    /// Inherited memfd holding the schema `BrokerConfig` message.
    #[arg(long, default_value_t = 4)]
    config_fd: i32,
}

fn main() -> std::process::ExitCode {
    capvisor_rpc::init_logging("broker");
    let args = Args::parse();
    match capvisor_rpc::conn::run_local(capvisor_broker::run(args.gateways_fd, args.config_fd)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("capvisor-broker: {e:#}");
            eprintln!("capvisor-broker: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
