//! The session's egress proxy (`capvisor-proxy`, docs/processes.md): one
//! process per session, started by this worker at the session's first VM
//! with network (manifest `[net] egress`) or the first `netpolicy` /
//! `netlog` cap asked for, and ended with the session (its RPC connection
//! to the worker closes; `PR_SET_PDEATHSIG` covers a worker crash).
//!
//! The worker introduces each VM to the proxy directly: the vmm hands one
//! end of a socketpair to the guest's virtio-serial port `capvisor.egress`
//! and the worker passes the other end to the proxy on the proxy's fd
//! channel (tag `vm:<name>`), so guest bytes flow guest-init <-> proxy with
//! no worker hop. The worker keeps only the proxy's `Proxy` cap (policy and
//! log) for the session's `NetPolicy` / `NetLog` entries.

use crate::state::SessionState;
use capvisor_rpc::conn::{self, INTERNAL};
use capvisor_rpc::fdpass::{self, FdChannel};
use capvisor_rpc::schema::internal_capnp::proxy;
use capvisor_rpc::spawn::{self, Inherit};
use capvisor_rpc::{paths, CvError, CvResult};
use std::os::fd::OwnedFd;
use std::rc::Rc;

/// A running session proxy.
pub struct SessionProxy {
    /// Its bootstrap cap.
    pub proxy: proxy::Client,
    /// Where VM sockets go (tag `vm:<name>`).
    vms: FdChannel,
    /// The RPC system of the connection; aborted (so the proxy exits) when
    /// this is dropped with the session.
    conn: tokio::task::JoinHandle<Result<(), capnp::Error>>,
    /// The process, reaped in the background once it exits.
    _child: tokio::process::Child,
}

impl Drop for SessionProxy {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl SessionProxy {
    /// Spawns `capvisor-proxy --rpc-fd 3 --vm-fd 4 --config-fd 5` (the
    /// binary beside the worker's) with the session's `[net]` settings as
    /// its `ProxyConfig`, its log in `run_dir/proxy.log`.
    ///
    /// Errors: `unavailable` when it cannot be started.
    fn spawn(st: &SessionState) -> CvResult<Self> {
        let fail = |e: std::io::Error| CvError::unavailable(format!("cannot start the egress proxy: {e}"));
        let mut msg = capnp::message::Builder::new_default();
        st.ctx.net.write_proxy_config(&st.ctx.session_id, msg.init_root());
        let config = spawn::config_fd(&msg).map_err(fail)?;
        let (rpc_here, rpc_there) = spawn::stream_pair().map_err(fail)?;
        let (vms_here, vms_there) = fdpass::pair().map_err(fail)?;
        std::fs::create_dir_all(&st.ctx.run_dir).map_err(fail)?;
        let log = std::fs::File::create(st.ctx.run_dir.join("proxy.log")).map_err(fail)?;
        let mut cmd = tokio::process::Command::new(paths::binary("capvisor-proxy"));
        cmd.args(["--rpc-fd", "3", "--vm-fd", "4", "--config-fd", "5"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        let fds = [
            Inherit { fd: rpc_there, target: 3 },
            Inherit { fd: vms_there, target: 4 },
            Inherit { fd: config, target: 5 },
        ];
        spawn::prepare(&mut cmd, &fds);
        let child = cmd.spawn().map_err(fail)?;
        drop(fds);
        let (proxy, conn) = conn::connect::<proxy::Client>(spawn::into_tokio(rpc_here).map_err(fail)?, None, INTERNAL);
        tracing::info!(pid = child.id().unwrap_or(0), "egress proxy started");
        Ok(Self { proxy, vms: FdChannel::new(vms_here).map_err(fail)?, conn, _child: child })
    }

    /// Hands VM `vm`'s end of its egress port to the proxy.
    ///
    /// Errors: `unavailable` when the proxy is gone.
    pub async fn add_vm(&self, vm: &str, fd: OwnedFd) -> CvResult<()> {
        self.vms
            .send(format!("vm:{vm}").as_bytes(), &fd)
            .await
            .map_err(|e| CvError::unavailable(format!("the egress proxy is gone: {e}")))
    }
}

/// The session's proxy, started now if it is not running.
///
/// Errors: `staleSession`; `unavailable` when it cannot be started.
pub fn ensure(st: &SessionState) -> CvResult<Rc<SessionProxy>> {
    st.check()?;
    if let Some(p) = st.proxy.borrow().as_ref() {
        if !p.conn.is_finished() {
            return Ok(p.clone());
        }
    }
    let p = Rc::new(SessionProxy::spawn(st)?);
    // The proxy asks this session's secrets through the worker (never the
    // broker directly); until this call lands, placeholders go out as is.
    let mut req = p.proxy.set_secret_source_request();
    req.get().set_source(capnp_rpc::new_client(crate::secrets::SecretSourceImpl::new(st)));
    tokio::task::spawn_local(async move {
        if let Err(e) = req.send().promise.await {
            tracing::error!("cannot give the egress proxy its secret source: {e}");
        }
    });
    *st.proxy.borrow_mut() = Some(p.clone());
    Ok(p)
}
