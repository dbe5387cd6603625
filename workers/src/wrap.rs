//! Revocable wrappers: each forwards to the real capability (in the guest
//! or the broker) only while the session is live, so a client's hold on a
//! `Process`, `Files`, `ByteSink` or `Accounts` dies with the session.

use crate::state::SessionState;
use capnp::capability::Rc as CapRc;
use capvisor_rpc::schema::capvisor_capnp::accounts;
use capvisor_rpc::schema::common_capnp::{byte_sink, files, process};
use capvisor_rpc::{write_result, CvError, CvResult};
use std::rc::Rc;

fn rpc_err(e: capnp::Error) -> CvError {
    if e.kind == capnp::ErrorKind::Disconnected {
        CvError::new(capvisor_rpc::schema::common_capnp::ErrorCode::NotRunning, "the VM is gone")
    } else {
        CvError::unavailable(format!("guest call failed: {e}"))
    }
}

/// Copies a forwarded call's result union (a struct with `ok`/`err`-style
/// members) into ours, or writes the staleSession / transport error.
macro_rules! forward_union {
    ($st:expr, $req:expr, $results:expr) => {{
        let res: CvResult<_> = $st.guard(async { $req.send().promise.await.map_err(rpc_err) }).await;
        match res {
            Ok(resp) => {
                let r = resp.get()?.get_result()?;
                $results.get().set_result(r)?;
            }
            Err(e) => e.write_to($results.get().init_result().init_err()),
        }
    }};
}

/// A guest `Process`, revocable.
pub struct ProcessWrapper {
    /// The session.
    pub st: Rc<SessionState>,
    /// guest-init's process cap.
    pub inner: process::Client,
}

impl process::Server for ProcessWrapper {
    async fn write(self: CapRc<Self>, params: process::WriteParams) -> capnp::Result<()> {
        let mut req = self.inner.write_request();
        req.get().set_data(params.get()?.get_data()?);
        self.st.guard_rpc(req.send()).await
    }

    async fn close_stdin(
        self: CapRc<Self>,
        _: process::CloseStdinParams,
        mut results: process::CloseStdinResults,
    ) -> capnp::Result<()> {
        let req = self.inner.close_stdin_request();
        forward_union!(self.st, req, results);
        Ok(())
    }

    async fn wait(self: CapRc<Self>, _: process::WaitParams, mut results: process::WaitResults) -> capnp::Result<()> {
        let req = self.inner.wait_request();
        forward_union!(self.st, req, results);
        Ok(())
    }

    async fn kill(
        self: CapRc<Self>,
        params: process::KillParams,
        mut results: process::KillResults,
    ) -> capnp::Result<()> {
        let mut req = self.inner.kill_request();
        req.get().set_signal(params.get()?.get_signal());
        forward_union!(self.st, req, results);
        Ok(())
    }

    async fn resize(
        self: CapRc<Self>,
        params: process::ResizeParams,
        mut results: process::ResizeResults,
    ) -> capnp::Result<()> {
        let mut req = self.inner.resize_request();
        req.get().set_size(params.get()?.get_size()?)?;
        forward_union!(self.st, req, results);
        Ok(())
    }
}

/// A guest `Files`, revocable.
pub struct FilesWrapper {
    /// The session.
    pub st: Rc<SessionState>,
    /// guest-init's files cap.
    pub inner: files::Client,
}

impl files::Server for FilesWrapper {
    async fn read(self: CapRc<Self>, params: files::ReadParams, mut results: files::ReadResults) -> capnp::Result<()> {
        let p = params.get()?;
        let mut req = self.inner.read_request();
        req.get().set_path(p.get_path()?);
        req.get().set_sink(p.get_sink()?);
        forward_union!(self.st, req, results);
        Ok(())
    }

    async fn write(
        self: CapRc<Self>,
        params: files::WriteParams,
        mut results: files::WriteResults,
    ) -> capnp::Result<()> {
        let p = params.get()?;
        let mut req = self.inner.write_request();
        req.get().set_path(p.get_path()?);
        req.get().set_mode(p.get_mode());
        let res: CvResult<_> = self.st.guard(async { req.send().promise.await.map_err(rpc_err) }).await;
        let res = res.and_then(|resp| {
            use capvisor_rpc::schema::common_capnp::sink_result::Which;
            let r = resp.get().and_then(|r| r.get_result()).map_err(rpc_err)?;
            match r.which().map_err(|e| CvError::internal(e.to_string()))? {
                Which::Sink(s) => Ok(s.map_err(rpc_err)?),
                Which::Err(e) => Err(CvError::read_from(e.map_err(rpc_err)?).map_err(rpc_err)?),
            }
        });
        let st = self.st.clone();
        write_result!(results.get().init_result(), res, |b, inner| b
            .set_sink(capnp_rpc::new_client(SinkWrapper { st, inner })));
        Ok(())
    }

    async fn list(self: CapRc<Self>, params: files::ListParams, mut results: files::ListResults) -> capnp::Result<()> {
        let mut req = self.inner.list_request();
        req.get().set_path(params.get()?.get_path()?);
        forward_union!(self.st, req, results);
        Ok(())
    }
}

/// A `ByteSink` into the guest (a file body), revocable.
pub struct SinkWrapper {
    /// The session.
    pub st: Rc<SessionState>,
    /// The guest's sink.
    pub inner: byte_sink::Client,
}

impl byte_sink::Server for SinkWrapper {
    async fn write(self: CapRc<Self>, params: byte_sink::WriteParams) -> capnp::Result<()> {
        let mut req = self.inner.write_request();
        req.get().set_data(params.get()?.get_data()?);
        self.st.guard_rpc(req.send()).await
    }

    async fn done(self: CapRc<Self>, _: byte_sink::DoneParams, _: byte_sink::DoneResults) -> capnp::Result<()> {
        let req = self.inner.done_request();
        self.st.guard_rpc(async { req.send().promise.await.map(|_| ()) }).await
    }
}

/// The broker's `Accounts`, revocable (only in bundles that list "accounts").
pub struct AccountsWrapper {
    /// The session.
    pub st: Rc<SessionState>,
    /// The broker's accounts cap.
    pub inner: accounts::Client,
}

impl accounts::Server for AccountsWrapper {
    async fn add(
        self: CapRc<Self>,
        params: accounts::AddParams,
        mut results: accounts::AddResults,
    ) -> capnp::Result<()> {
        let p = params.get()?;
        let mut req = self.inner.add_request();
        req.get().set_name(p.get_name()?);
        req.get().set_profile(p.get_profile()?);
        req.get().set_password(p.get_password()?);
        forward_union!(self.st, req, results);
        Ok(())
    }

    async fn list(self: CapRc<Self>, _: accounts::ListParams, mut results: accounts::ListResults) -> capnp::Result<()> {
        let req = self.inner.list_request();
        forward_union!(self.st, req, results);
        Ok(())
    }

    async fn remove(
        self: CapRc<Self>,
        params: accounts::RemoveParams,
        mut results: accounts::RemoveResults,
    ) -> capnp::Result<()> {
        let mut req = self.inner.remove_request();
        req.get().set_name(params.get()?.get_name()?);
        forward_union!(self.st, req, results);
        Ok(())
    }
}
