//! `capvisor-gateway --listen-fd 3 --broker-fd 4 --attach-fd 5 --auth local,password`
//! (see the library docs).

use clap::Parser;

/// capvisor's gateway. Started by `capvisor serve`; not for direct use.
#[derive(Parser)]
#[command(name = "capvisor-gateway", version)]
struct Args {
    /// Inherited listening Unix stream socket (the gateway socket).
    #[arg(long, default_value_t = 3)]
    listen_fd: i32,
    /// Inherited RPC stream to the broker (which serves `Broker` on it).
    #[arg(long, default_value_t = 4)]
    broker_fd: i32,
    /// Inherited SOCK_SEQPACKET fd channel to the broker for attach connections.
    #[arg(long, default_value_t = 5)]
    attach_fd: i32,
    /// Auth methods to offer (the manifest's gateway.auth): local, password.
    #[arg(long, value_delimiter = ',', default_value = "local,password")]
    auth: Vec<String>,
}

fn main() -> std::process::ExitCode {
    capvisor_rpc::init_logging("gateway");
    let args = Args::parse();
    let res = capvisor_gateway::parse_auth(&args.auth).and_then(|auth| {
        capvisor_rpc::conn::run_local(capvisor_gateway::run(args.listen_fd, args.broker_fd, args.attach_fd, auth))
    });
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("capvisor-gateway: {e:#}");
            eprintln!("capvisor-gateway: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
