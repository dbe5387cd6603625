//! Starting a session's worker (docs/processes.md): `capvisor-worker
//! --rpc-fd 3 --attach-fd 4` with fd 3 = an RPC stream (the worker serves
//! `Worker`, the broker serves `SessionHost` as its bootstrap), fd 4 = an fd
//! channel for attached client sockets, and `CAPVISOR_SESSION_CONTEXT` =
//! the JSON [`SessionContext`].
//!
//! [`Launcher`] is a trait so the broker's session logic can be tested with
//! an in-process worker.

use capvisor_manifest::SessionContext;
use capvisor_rpc::fdpass::{self, FdChannel};
use capvisor_rpc::schema::internal_capnp::{session_host, worker};
use capvisor_rpc::{conn, spawn};
use std::path::PathBuf;

/// A started worker, as the broker holds it.
pub struct Launched {
    /// The worker's bootstrap cap.
    pub worker: worker::Client,
    /// Where attached client sockets go (tag `b"attach"`).
    pub attach: FdChannel,
    /// Resolves when the RPC connection to the worker ends.
    pub ended: tokio::task::JoinHandle<Result<(), capnp::Error>>,
    /// The worker process, if it is one.
    pub child: Option<tokio::process::Child>,
}

/// Starts workers.
pub trait Launcher {
    /// Starts the worker of session `ctx`, offering `host` as the broker's
    /// bootstrap cap on their connection. Must be called inside a `LocalSet`.
    ///
    /// Errors: the worker cannot be started (missing binary, no fds).
    fn launch(&self, ctx: &SessionContext, host: session_host::Client) -> anyhow::Result<Launched>;
}

/// Spawns `capvisor-worker` processes.
pub struct ProcessLauncher {
    /// Path of the worker binary.
    pub worker_bin: PathBuf,
}

impl Launcher for ProcessLauncher {
    fn launch(&self, ctx: &SessionContext, host: session_host::Client) -> anyhow::Result<Launched> {
        use anyhow::Context;
        let (rpc_ours, rpc_theirs) = spawn::stream_pair()?;
        let (att_ours, att_theirs) = fdpass::pair()?;
        let config = spawn::config_fd(&ctx.to_message()?)?;
        let mut cmd = tokio::process::Command::new(&self.worker_bin);
        cmd.args(["--rpc-fd", "3", "--attach-fd", "4", "--config-fd", "5"]).stdin(std::process::Stdio::null());
        let inherit = [
            spawn::Inherit { fd: rpc_theirs, target: 3 },
            spawn::Inherit { fd: att_theirs, target: 4 },
            spawn::Inherit { fd: config, target: 5 },
        ];
        spawn::prepare(&mut cmd, &inherit);
        let child = cmd.spawn().with_context(|| format!("starting {}", self.worker_bin.display()))?;
        drop(inherit);
        let stream = spawn::into_tokio(rpc_ours)?;
        let (worker, ended) = conn::connect::<worker::Client>(stream, Some(host.client), conn::INTERNAL);
        let attach = FdChannel::new(att_ours)?;
        Ok(Launched { worker, attach, ended, child: Some(child) })
    }
}
