//! Starting a session's worker (docs/processes.md): `capvisor-worker
//! --rpc-fd 3 --attach-fd 4` with fd 3 = an RPC stream (the worker serves
//! `Worker`, the broker serves `SessionHost` as its bootstrap), fd 4 = an fd
//! channel for attached client sockets, and `CAPVISOR_SESSION_CONTEXT` =
//! the JSON [`SessionContext`].
//!
//! [`Launcher`] is a trait so the broker's session logic can be tested with
//! an in-process worker.
//!
//! [`ProcessLauncher`] starts each worker in its session's cgroup
//! (docs/vmm-confinement.md): `<own cgroup>/capvisor-<broker pid>/session-<id>/worker`,
//! the session cgroup limited to its bundle's budget
//! (`capvisor_confine::cgroup::session_limits`); the worker makes its VMs'
//! cgroups beside its leaf. The session cgroup is removed once the worker's
//! connection ended and its processes are gone, and the broker's subtree
//! with it when it was the last; subtrees of brokers that are gone are
//! removed at the first launch. A session cgroup that cannot be made does
//! not stop the session: its worker then runs where the broker does, and
//! each VM create finds no session cgroup and fails when the manifest
//! requires the `cgroup` layer (audited by the worker).

use capvisor_confine::cgroup::{self, Cgroup};
use capvisor_manifest::SessionContext;
use capvisor_rpc::fdpass::{self, FdChannel};
use capvisor_rpc::schema::internal_capnp::{session_host, worker};
use capvisor_rpc::{conn, spawn};
use std::path::PathBuf;
use std::time::Duration;

/// How long a session's cgroup is retried for removal after its worker's
/// connection ended.
pub const SESSION_CGROUP_REMOVE_WAIT: Duration = Duration::from_secs(60);

/// The broker's subtree, `<own cgroup>/capvisor-<broker pid>`, made (and
/// stale subtrees cleaned) at the first launch, found again by path later.
fn subtree(root: &std::path::Path) -> Result<Cgroup, capvisor_confine::ConfineError> {
    static OWN: std::sync::OnceLock<Result<Cgroup, capvisor_confine::ConfineError>> = std::sync::OnceLock::new();
    let own = OWN
        .get_or_init(|| {
            let own = Cgroup::own(root)?;
            for note in own.clean_stale(cgroup::SUBTREE_PREFIX) {
                tracing::info!("{note}");
            }
            Ok(own)
        })
        .clone()?;
    own.child(&format!("{}{}", cgroup::SUBTREE_PREFIX, std::process::id()))
}

/// Makes session `ctx`'s cgroup with its limits and its worker leaf.
fn session_cgroup(ctx: &SessionContext) -> Result<(Cgroup, Cgroup), capvisor_confine::ConfineError> {
    let b = &ctx.bundle;
    let name = format!("{}{}", cgroup::SESSION_PREFIX, ctx.session_id);
    // The subtree may be removed by the last session's cleanup between
    // our mkdirs: try again once.
    let session = match subtree(&ctx.confinement.cgroup_root)?.child(&name) {
        Ok(s) => s,
        Err(_) => subtree(&ctx.confinement.cgroup_root)?.child(&name)?,
    };
    session.set_limits(&cgroup::session_limits(b.max_vms, b.max_memory_mib, b.max_vcpus))?;
    let worker = session.child(cgroup::WORKER_LEAF)?;
    Ok((session, worker))
}

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
        // The session's cgroup, entered between fork and exec (before
        // `prepare`'s hook renumbers descriptors).
        let session = match session_cgroup(ctx).and_then(|(s, w)| Ok((s, w.placement()?))) {
            Ok((s, placement)) => {
                tracing::info!(session = %ctx.session_id, "session cgroup {}", s.describe());
                capvisor_confine::ChildConfinement { cgroup: Some(placement), ..Default::default() }
                    .install(cmd.as_std_mut());
                Some(s)
            }
            Err(e) => {
                tracing::warn!(session = %ctx.session_id, "no session cgroup ({e}); its VMs get none either");
                None
            }
        };
        let inherit = [
            spawn::Inherit { fd: rpc_theirs, target: 3 },
            spawn::Inherit { fd: att_theirs, target: 4 },
            spawn::Inherit { fd: config, target: 5 },
        ];
        spawn::prepare(&mut cmd, &inherit);
        let child = cmd.spawn().with_context(|| format!("starting {}", self.worker_bin.display()));
        let child = child.inspect_err(|_| {
            if let Some(s) = &session {
                s.clone().remove_when_empty(SESSION_CGROUP_REMOVE_WAIT, true);
            }
        })?;
        drop(inherit);
        let stream = spawn::into_tokio(rpc_ours)?;
        let (worker, ended) = conn::connect::<worker::Client>(stream, Some(host.client), conn::INTERNAL);
        let ended = remove_after(ended, session);
        let attach = FdChannel::new(att_ours)?;
        Ok(Launched { worker, attach, ended, child: Some(child) })
    }
}

/// Wraps the worker's connection task: when it ends (or the wrapper is
/// dropped, which aborts the connection too), the session cgroup is removed
/// once empty, and the broker's subtree with it if no other session is left.
fn remove_after(
    ended: tokio::task::JoinHandle<Result<(), capnp::Error>>,
    session: Option<Cgroup>,
) -> tokio::task::JoinHandle<Result<(), capnp::Error>> {
    struct Guard {
        conn: tokio::task::AbortHandle,
        session: Option<Cgroup>,
    }
    impl Drop for Guard {
        fn drop(&mut self) {
            self.conn.abort();
            if let Some(s) = self.session.take() {
                s.remove_when_empty(SESSION_CGROUP_REMOVE_WAIT, true);
            }
        }
    }
    let guard = Guard { conn: ended.abort_handle(), session };
    tokio::task::spawn_local(async move {
        let _guard = guard;
        match ended.await {
            Ok(r) => r,
            Err(e) => Err(capnp::Error::failed(format!("worker connection task: {e}"))),
        }
    })
}
