//! `capvisor-vmm`: one process per VM (docs/processes.md).
//!
//! `capvisor-vmm --rpc-fd 3 --agent-fd 4 --config-fd 5 [--egress-fd 6]`, with the schema
//! `VmConfig` (internal.capnp) in the memfd at fd 5:
//! - starts the VM at once on its engine (`capvisor_vmm::engine::start`:
//!   QEMU with the agent socket handed to it, or engine kvm in this process);
//! - serves `Machine` as the bootstrap cap on the RPC socket;
//! - when the RPC connection ends (the worker is gone): kills the VM, exits;
//! - when the VM ends: answers `waitExit`, then exits once the worker drops
//!   the connection or after [`LINGER`];
//! - on SIGTERM / SIGINT: kills the VM, exits.
//!
//! A VM that cannot start (bad config, missing kernel, no QEMU, /dev/kvm
//! unusable) is served in state `crashed` with the reason, so the worker
//! learns why.

use capvisor_rpc::conn;
use capvisor_vmm::engine::{self, Engine};
use capvisor_vmm::machine::MachineServer;
use capvisor_vmm::VmConfig;
use clap::Parser;
use std::os::fd::RawFd;
use std::time::Duration;

/// How long the vmm stays after the VM ended, for the worker to read the status.
const LINGER: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(name = "capvisor-vmm", about = "capvisor's per-VM process: runs one VM and serves Machine")]
struct Args {
    /// Inherited stream socket to the worker; `Machine` is served on it.
    #[arg(long, default_value_t = 3)]
    rpc_fd: RawFd,
    /// Inherited stream socket whose bytes are the guest's virtio-serial
    /// port `capvisor.agent` (the worker keeps the peer end).
    #[arg(long, default_value_t = 4)]
    agent_fd: RawFd,
    /// Inherited memfd holding the schema `VmConfig` message.
    #[arg(long, default_value_t = 5)]
    config_fd: RawFd,
    /// Inherited stream socket behind the guest's virtio-serial port
    /// `capvisor.egress` (with `VmConfig.egress`; the session's egress
    /// proxy keeps the peer end).
    #[arg(long)]
    egress_fd: Option<RawFd>,
}

fn main() {
    // Boot milestones (engine kvm) are measured from here.
    capvisor_kvm::devices::boot_timer::mark_process_start();
    capvisor_rpc::init_logging("vmm");
    let args = Args::parse();
    if let Err(e) = run(args) {
        tracing::error!("capvisor-vmm: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.rpc_fd != args.agent_fd, "--rpc-fd and --agent-fd must differ");
    let rpc = capvisor_rpc::spawn::take_inherited(args.rpc_fd, "rpc")?;
    let agent = capvisor_rpc::spawn::take_inherited(args.agent_fd, "agent")?;
    let egress = match args.egress_fd {
        Some(fd) => {
            anyhow::ensure!(
                ![args.rpc_fd, args.agent_fd, args.config_fd].contains(&fd),
                "--egress-fd must differ from the other descriptors"
            );
            Some(capvisor_rpc::spawn::take_inherited(fd, "egress")?)
        }
        None => None,
    };
    let cfg = read_config(args.config_fd);
    conn::run_local(async move {
        let stream = capvisor_rpc::spawn::into_tokio(rpc)?;
        let vm = engine::start(cfg, engine::GuestChannels { agent, egress });
        let client = MachineServer::client(vm.clone());
        let (_peer, mut conn_done) = conn::serve::<capnp::capability::Client>(stream, client.client, conn::INTERNAL);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        tokio::select! {
            _ = &mut conn_done => {
                tracing::info!("worker connection ended: stopping the VM");
                kill_and_wait(&*vm).await;
            }
            st = vm.wait_exit() => {
                tracing::info!("VM ended ({:?}); lingering for the worker", st.state);
                tokio::select! {
                    _ = &mut conn_done => {}
                    _ = tokio::time::sleep(LINGER) => {}
                }
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM: stopping the VM");
                kill_and_wait(&*vm).await;
            }
            _ = int.recv() => {
                kill_and_wait(&*vm).await;
            }
        }
        anyhow::Ok(())
    })
}

async fn kill_and_wait(vm: &dyn Engine) {
    vm.kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), vm.wait_exit()).await;
}

/// Reads the `VmConfig` message from the inherited memfd `fd`.
fn read_config(fd: RawFd) -> anyhow::Result<VmConfig> {
    let msg = capvisor_rpc::spawn::read_config(fd)?;
    Ok(VmConfig::read_from(msg.get_root()?)?)
}
