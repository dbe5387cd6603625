//! Starting a VM's vmm: [`VmLauncher`] is the worker's one door to new
//! VMs, a trait so the worker's logic can be tested in-process against a
//! fake `Machine` and guest-init's real `Guest` server (no VM, no vmm).
//!
//! [`ProcessVmLauncher`] spawns `capvisor-vmm --rpc-fd 3 --agent-fd 4
//! --config-fd 5` with a socketpair for `Machine`, a socketpair for the
//! guest's agent channel (the vmm hands its end to the VM; the worker
//! keeps the other and talks to guest-init on it directly), and a memfd
//! holding the schema `VmConfig` (docs/processes.md).

use capvisor_rpc::conn::{self, INTERNAL};
use capvisor_rpc::schema::internal_capnp::machine;
use capvisor_rpc::spawn::{self, Inherit};
use capvisor_rpc::vmconfig::VmConfig;
use capvisor_rpc::{paths, CvError, CvResult};

/// A started VM, as the worker holds it.
pub struct LaunchedVm {
    /// The vmm's `Machine`.
    pub machine: machine::Client,
    /// The RPC system of the `Machine` connection (aborting it tells the
    /// vmm its worker is gone), if it is one.
    pub machine_conn: Option<tokio::task::JoinHandle<Result<(), capnp::Error>>>,
    /// The worker's end of the guest's agent channel (guest-init serves
    /// `Guest` as the bootstrap on it).
    pub agent: tokio::net::UnixStream,
    /// The vmm process, if it is one.
    pub child: Option<tokio::process::Child>,
}

/// Starts VMs for a worker.
pub trait VmLauncher {
    /// Starts the VM `cfg` describes (`cfg.engine` is `Qemu` or `Kvm`,
    /// already resolved). Returns at once; the guest boots meanwhile.
    /// Must be called inside a `LocalSet`.
    ///
    /// Errors: `internal` when the vmm cannot be started (no binary, no
    /// descriptors, a config that cannot be encoded).
    fn launch(&self, cfg: &VmConfig) -> CvResult<LaunchedVm>;
}

/// Spawns `capvisor-vmm` processes (the binary beside the worker's own).
pub struct ProcessVmLauncher;

impl VmLauncher for ProcessVmLauncher {
    fn launch(&self, cfg: &VmConfig) -> CvResult<LaunchedVm> {
        let internal = |e: std::io::Error| CvError::internal(format!("cannot start the vmm: {e}"));
        let msg = cfg.to_message().map_err(|e| CvError::internal(e.to_string()))?;
        let config = spawn::config_fd(&msg).map_err(internal)?;
        let (rpc_here, rpc_there) = spawn::stream_pair().map_err(internal)?;
        let (agent_here, agent_there) = spawn::stream_pair().map_err(internal)?;
        let log = std::fs::File::create(cfg.run_dir.join("vmm.log")).map_err(internal)?;
        let mut cmd = tokio::process::Command::new(paths::binary("capvisor-vmm"));
        cmd.args(["--rpc-fd", "3", "--agent-fd", "4", "--config-fd", "5"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        let fds = [
            Inherit { fd: rpc_there, target: 3 },
            Inherit { fd: agent_there, target: 4 },
            Inherit { fd: config, target: 5 },
        ];
        spawn::prepare(&mut cmd, &fds);
        let child = cmd.spawn().map_err(internal)?;
        drop(fds);
        let (machine, conn) =
            conn::connect::<machine::Client>(spawn::into_tokio(rpc_here).map_err(internal)?, None, INTERNAL);
        Ok(LaunchedVm {
            machine,
            machine_conn: Some(conn),
            agent: spawn::into_tokio(agent_here).map_err(internal)?,
            child: Some(child),
        })
    }
}
