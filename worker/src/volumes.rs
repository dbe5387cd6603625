//! `Volumes` and `Volume`: the session's face of its principal's
//! persistent volumes. The broker keeps them (files, bundle limits,
//! leases across sessions; `broker::volumes`); the worker serves the caps
//! behind the session's revocation check and forwards each call to its
//! `SessionHost`, so every volume operation is checked and audited by the
//! broker under the session's principal. Attaching a volume to a VM is
//! `VmSpec.volumes` (see `crate::vms`).
//!
//! Who can call: the holder of this session's CapSet entry "volumes"
//! (bundle-controlled). What it reaches: only the principal's own volumes
//! (the broker resolves names inside the principal's directory). Revoked:
//! with the session (`staleSession`).

use crate::state::SessionState;
use capnp::capability::Rc as CapRc;
use capvisor_rpc::error::text;
use capvisor_rpc::schema::capvisor_capnp::{volume, volume_info, volumes};
use capvisor_rpc::{CvError, CvResult};
use std::rc::Rc;

/// `Volumes` of one session.
pub struct VolumesImpl {
    /// The session this cap belongs to (every call checks it first).
    pub st: Rc<SessionState>,
}

/// `Volume`: one volume of the principal, by name.
pub struct VolumeImpl {
    st: Rc<SessionState>,
    name: String,
}

fn relay(e: capnp::Error) -> CvError {
    crate::wrap::relay(e, false)
}

fn copy_info(from: volume_info::Reader<'_>, to: volume_info::Builder<'_>) -> capnp::Result<()> {
    let mut to = to;
    to.set_name(from.get_name()?);
    to.set_size_mib(from.get_size_mib());
    to.set_used_bytes(from.get_used_bytes());
    to.set_created_at_ms(from.get_created_at_ms());
    let src = from.get_attached_to()?;
    let mut dst = to.init_attached_to(src.len());
    for (i, a) in src.iter().enumerate() {
        let mut d = dst.reborrow().get(i as u32);
        d.set_vm(a.get_vm()?);
        d.set_this_session(a.get_this_session());
        d.set_read_only(a.get_read_only());
    }
    Ok(())
}

impl VolumesImpl {
    fn volume(&self, name: String) -> volume::Client {
        capnp_rpc::new_client(VolumeImpl { st: self.st.clone(), name })
    }
}

impl volumes::Server for VolumesImpl {
    async fn create(
        self: CapRc<Self>,
        params: volumes::CreateParams,
        mut results: volumes::CreateResults,
    ) -> capnp::Result<()> {
        let p = params.get()?;
        let name = text(p.get_name())?;
        let mut req = self.st.host.create_volume_request();
        req.get().set_name(name.as_str());
        req.get().set_size_mib(p.get_size_mib());
        self.st.guard(async { req.send().promise.await.map(drop).map_err(relay) }).await?;
        results.get().set_volume(self.volume(name));
        Ok(())
    }

    async fn list(self: CapRc<Self>, _: volumes::ListParams, mut results: volumes::ListResults) -> capnp::Result<()> {
        let req = self.st.host.list_volumes_request();
        let resp = self.st.guard(async { req.send().promise.await.map_err(relay) }).await?;
        let list = resp.get()?.get_volumes()?;
        let mut out = results.get().init_volumes(list.len());
        for (i, v) in list.iter().enumerate() {
            copy_info(v, out.reborrow().get(i as u32))?;
        }
        Ok(())
    }

    async fn get(self: CapRc<Self>, params: volumes::GetParams, mut results: volumes::GetResults) -> capnp::Result<()> {
        let name = text(params.get()?.get_volume_name())?;
        // Resolved now, so a missing volume fails here (and a pipelined
        // call on the result with it).
        find(&self.st, &name).await?;
        results.get().set_volume(self.volume(name));
        Ok(())
    }

    async fn remove(self: CapRc<Self>, params: volumes::RemoveParams, _: volumes::RemoveResults) -> capnp::Result<()> {
        let name = text(params.get()?.get_volume_name())?;
        let mut req = self.st.host.remove_volume_request();
        req.get().set_name(name.as_str());
        Ok(self.st.guard(async { req.send().promise.await.map(drop).map_err(relay) }).await?)
    }
}

/// The broker's `VolumeInfo` of volume `name`, as a message.
///
/// Errors: `staleSession`, `notFound`.
async fn find(
    st: &SessionState,
    name: &str,
) -> CvResult<
    capnp::capability::Response<capvisor_rpc::schema::internal_capnp::session_host::list_volumes_results::Owned>,
> {
    let req = st.host.list_volumes_request();
    let resp = st.guard(async { req.send().promise.await.map_err(relay) }).await?;
    let found = {
        let list = resp.get().and_then(|r| r.get_volumes()).map_err(|e| CvError::internal(e.to_string()))?;
        list.iter().any(|v| v.get_name().ok().and_then(|n| n.to_str().ok()) == Some(name))
    };
    if !found {
        return Err(CvError::not_found(format!("no volume named {name:?}")));
    }
    Ok(resp)
}

impl volume::Server for VolumeImpl {
    async fn info(self: CapRc<Self>, _: volume::InfoParams, mut results: volume::InfoResults) -> capnp::Result<()> {
        let resp = find(&self.st, &self.name).await?;
        for v in resp.get()?.get_volumes()?.iter() {
            if v.get_name()?.to_str().ok() == Some(self.name.as_str()) {
                copy_info(v, results.get().init_info())?;
            }
        }
        Ok(())
    }
}
