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

use crate::grants::GrantNode;
use crate::narrow::Bounds;
use crate::state::SessionState;
use crate::wrap::Scope;
use capnp::capability::Rc as CapRc;
use capvisor_rpc::error::text;
use capvisor_rpc::schema::capvisor_capnp::{volume, volume_info, volumes};
use capvisor_rpc::{CvError, CvResult};
use std::collections::BTreeSet;
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
    /// The grant it was reached through (a shared view), if any.
    grant: Option<Rc<GrantNode>>,
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
        capnp_rpc::new_client(VolumeImpl { st: self.st.clone(), name, grant: None })
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

    async fn narrow(
        self: CapRc<Self>,
        params: volumes::NarrowParams,
        mut results: volumes::NarrowResults,
    ) -> capnp::Result<()> {
        self.st.check()?;
        let p = params.get()?;
        let names = read_names(p.get_volume_names())?;
        let bounds = Bounds::default().then(p.get_expires_at_ms(), p.get_call_budget());
        results.get().set_volumes(view(&Scope::session(&self.st), names, bounds));
        Ok(())
    }
}

fn read_names(list: capnp::Result<capnp::text_list::Reader<'_>>) -> CvResult<BTreeSet<String>> {
    Ok(crate::narrow::text_list(list, "volumeNames")?.into_iter().collect())
}

/// A view of the principal's volumes `names` (`Volumes.narrow`, issue 10
/// item 1): `list` and `get` see only them, `create` and `remove` are
/// denied (audited `volumes.narrowed.denied`); bound to `scope` (the
/// grant's end cuts it and the `Volume`s it hands out); shareable.
pub struct VolumesView {
    scope: Scope,
    names: Rc<BTreeSet<String>>,
    bounds: Bounds,
}

/// A view of `names` bound to `scope` and `bounds`. Audited (`volumes.narrow`).
pub fn view(scope: &Scope, names: BTreeSet<String>, bounds: Bounds) -> volumes::Client {
    let describe = describe(&names);
    scope.st.audit_chain("", &scope.chain(), "volumes.narrow", "Volumes", "narrow", Ok(()), &describe);
    make_view(scope, Rc::new(names), bounds)
}

fn make_view(scope: &Scope, names: Rc<BTreeSet<String>>, bounds: Bounds) -> volumes::Client {
    let mut set = scope.st.narrow_volumes.borrow_mut();
    set.gc();
    set.new_client(VolumesView { scope: scope.clone(), names, bounds })
}

fn describe(names: &BTreeSet<String>) -> String {
    format!("volumes {:?}: list and get only", names.iter().collect::<Vec<_>>())
}

impl VolumesView {
    /// The grant this view is bound to, if shared.
    pub fn grant(&self) -> Option<Rc<GrantNode>> {
        self.scope.grant.clone()
    }

    /// What it shows, for people.
    pub fn describe(&self) -> String {
        describe(&self.names)
    }

    /// The same view bound to `grant`.
    pub fn rebind(&self, grant: &Rc<GrantNode>) -> volumes::Client {
        make_view(&self.scope.clone().with_grant(Some(grant.clone())), self.names.clone(), self.bounds.clone())
    }

    fn call(&self, method: &str) -> CvResult<()> {
        self.bounds.admit(&self.scope, |e| self.deny(method, e))
    }

    fn deny(&self, method: &str, e: CvError) -> CvError {
        crate::narrow::view_denied(&self.scope, "volumes", "Volumes", method, e)
    }
}

/// The denial of a view's `create` / `remove`.
fn list_and_get_only() -> CvError {
    CvError::denied("this cap may only list and get its volumes")
}

impl volumes::Server for VolumesView {
    async fn create(self: CapRc<Self>, _: volumes::CreateParams, _: volumes::CreateResults) -> capnp::Result<()> {
        self.call("create")?;
        Err(self.deny("create", list_and_get_only()).into())
    }

    async fn list(self: CapRc<Self>, _: volumes::ListParams, mut results: volumes::ListResults) -> capnp::Result<()> {
        self.call("list")?;
        let req = self.scope.st.host.list_volumes_request();
        let resp = self.scope.forward(req.send().promise).await?;
        let list = resp.get()?.get_volumes()?;
        let seen: Vec<u32> = (0..list.len())
            .filter(|i| {
                list.get(*i).get_name().ok().and_then(|n| n.to_str().ok()).is_some_and(|n| self.names.contains(n))
            })
            .collect();
        let mut out = results.get().init_volumes(seen.len() as u32);
        for (o, i) in seen.iter().enumerate() {
            copy_info(list.get(*i), out.reborrow().get(o as u32))?;
        }
        Ok(())
    }

    async fn get(self: CapRc<Self>, params: volumes::GetParams, mut results: volumes::GetResults) -> capnp::Result<()> {
        self.call("get")?;
        let name = text(params.get()?.get_volume_name())?;
        if !self.names.contains(&name) {
            return Err(CvError::not_found(format!("no volume named {name:?}")).into());
        }
        find(&self.scope.st, &name).await?;
        let v = VolumeImpl { st: self.scope.st.clone(), name, grant: self.scope.grant.clone() };
        results.get().set_volume(capnp_rpc::new_client(v));
        Ok(())
    }

    async fn remove(self: CapRc<Self>, _: volumes::RemoveParams, _: volumes::RemoveResults) -> capnp::Result<()> {
        self.call("remove")?;
        Err(self.deny("remove", list_and_get_only()).into())
    }

    async fn narrow(
        self: CapRc<Self>,
        params: volumes::NarrowParams,
        mut results: volumes::NarrowResults,
    ) -> capnp::Result<()> {
        self.call("narrow")?;
        let p = params.get()?;
        let names = read_names(p.get_volume_names())?;
        let names = names.into_iter().filter(|n| self.names.contains(n)).collect();
        let bounds = self.bounds.then(p.get_expires_at_ms(), p.get_call_budget());
        results.get().set_volumes(view(&self.scope, names, bounds));
        Ok(())
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
        if let Some(g) = &self.grant {
            g.check()?;
        }
        let resp = find(&self.st, &self.name).await?;
        for v in resp.get()?.get_volumes()?.iter() {
            if v.get_name()?.to_str().ok() == Some(self.name.as_str()) {
                copy_info(v, results.get().init_info())?;
            }
        }
        Ok(())
    }
}
