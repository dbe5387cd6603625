//! Attenuation of `VmFactory` (issue 10, item 1; docs/decisions.md
//! "Delegation"): `VmFactory.narrow(VmFactoryNarrowing)` returns a new
//! `VmFactory` object that allows only what the narrowing allows, the
//! pattern of [`crate::narrow`] for `Vm`.
//!
//! - It sees, reaches and removes only the VMs created through it (or
//!   through factories narrowed from it): `list`, `get` and `remove` of any
//!   other VM of the session answer `notFound`, as if it did not exist.
//! - `create` checks the image (in `images`), memory and vCPUs (under
//!   `maxMemoryMib` / `maxVcpus`), volumes (only those in `volumes`, and
//!   read-only with `volumesReadOnly`), the engine (in `engines`; `auto`
//!   is resolved first and then runs on that engine only), and counts its VMs
//!   against `maxVms` at every level of the chain (`quota` past it). Its
//!   VMs belong to the session: they count against the session's and the
//!   principal's budgets and die with it.
//! - Every `Vm` it hands out is narrowed by `vmNarrowing`
//!   ([`crate::narrow::unaudited`]), bound to the same grant, and its calls
//!   count against the factory's call budget.
//! - Narrowing again intersects ([`FactoryNarrowing::then`]). Expiry and
//!   call budget as for `Vm`; every denial is typed and audited.

use crate::grants::GrantNode;
use crate::narrow::{Budget, Narrowing};
use crate::state::SessionState;
use crate::vms::VmFactoryImpl;
use capnp::capability::Rc as CapRc;
use capvisor_rpc::error::text;
use capvisor_rpc::names::engine_name;
use capvisor_rpc::schema::capvisor_capnp::{vm, vm_factory, vm_factory_narrowing, vm_spec, Engine};
use capvisor_rpc::{CvError, CvResult};
use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::rc::Rc;

/// A factory narrowing in Rust form (schema `VmFactoryNarrowing`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FactoryNarrowing {
    /// VMs it may hold at once.
    pub max_vms: u32,
    /// Images it may boot.
    pub images: Vec<String>,
    /// Most memory per VM, MiB (`u32::MAX`: the session's bound).
    pub max_memory_mib: u32,
    /// Most vCPUs per VM (`u32::MAX`: the session's bound).
    pub max_vcpus: u32,
    /// The narrowing of every `Vm` it hands out (no expiry of its own).
    pub vm: Narrowing,
    /// Unix epoch ms after which every call is denied (0: none).
    pub expires_at_ms: i64,
    /// Volumes its VMs may attach.
    pub volumes: Vec<String>,
    /// Only read-only attachments of them.
    pub volumes_read_only: bool,
    /// Engines its VMs may run on: `Qemu` and/or `Kvm`, never `Auto`
    /// (the schema's empty list reads as both).
    pub engines: Vec<Engine>,
}

impl FactoryNarrowing {
    /// Reads and checks a schema `VmFactoryNarrowing`.
    ///
    /// Errors: `invalidArgument` for a malformed list, name or narrowing.
    pub fn read(r: vm_factory_narrowing::Reader<'_>) -> CvResult<Self> {
        let images = crate::narrow::text_list(r.get_images(), "images")?;
        let volumes = crate::narrow::text_list(r.get_volumes(), "volumes")?;
        let vm = r.get_vm_narrowing().map_err(|e| CvError::invalid(format!("vmNarrowing: {e}")))?;
        let unbounded = |n: u32| if n == 0 { u32::MAX } else { n };
        let mut engines = Vec::new();
        for e in r.get_engines().map_err(|e| CvError::invalid(format!("engines: {e}")))?.iter() {
            match e {
                Ok(Engine::Auto) => return Err(CvError::invalid("engines: list qemu and/or kvm, not auto")),
                Ok(e) if !engines.contains(&e) => engines.push(e),
                Ok(_) => {}
                Err(capnp::NotInSchema(n)) => return Err(CvError::invalid(format!("engines: no engine {n}"))),
            }
        }
        if engines.is_empty() {
            engines = vec![Engine::Qemu, Engine::Kvm];
        }
        Ok(Self {
            max_vms: r.get_max_vms(),
            images,
            max_memory_mib: unbounded(r.get_max_memory_mib()),
            max_vcpus: unbounded(r.get_max_vcpus()),
            vm: Narrowing { expires_at_ms: 0, ..Narrowing::read(vm)? },
            expires_at_ms: r.get_expires_at_ms().max(0),
            volumes,
            volumes_read_only: r.get_volumes_read_only(),
            engines,
        })
    }

    /// This narrowing followed by `next`: never more than either allows.
    ///
    /// Errors: `denied` when `next`'s Vm narrowing would widen this one's
    /// (see [`Narrowing::then`]).
    pub fn then(&self, next: &FactoryNarrowing) -> CvResult<FactoryNarrowing> {
        Ok(FactoryNarrowing {
            max_vms: self.max_vms.min(next.max_vms),
            images: next.images.iter().filter(|i| self.images.contains(i)).cloned().collect(),
            max_memory_mib: self.max_memory_mib.min(next.max_memory_mib),
            max_vcpus: self.max_vcpus.min(next.max_vcpus),
            vm: self.vm.then(&next.vm)?,
            expires_at_ms: crate::narrow::earlier(self.expires_at_ms, next.expires_at_ms),
            volumes: next.volumes.iter().filter(|v| self.volumes.contains(v)).cloned().collect(),
            volumes_read_only: self.volumes_read_only || next.volumes_read_only,
            engines: next.engines.iter().filter(|e| self.engines.contains(e)).copied().collect(),
        })
    }

    /// In one line, for people (`shares`, the audit log).
    pub fn describe(&self) -> String {
        let bound = |n: u32| if n == u32::MAX { "any".to_string() } else { n.to_string() };
        let volumes = match (self.volumes.is_empty(), self.volumes_read_only) {
            (true, _) => String::new(),
            (false, ro) => format!(", volumes {:?}{}", self.volumes, if ro { " read-only" } else { "" }),
        };
        let engines = match self.engines.as_slice() {
            [Engine::Qemu, Engine::Kvm] | [Engine::Kvm, Engine::Qemu] => String::new(),
            [] => ", no engine".to_string(),
            es => format!(", engine {}", es.iter().map(|e| engine_name(*e)).collect::<Vec<_>>().join("/")),
        };
        format!(
            "vms: up to {} of {:?}, {} MiB, {} vCPUs{volumes}{engines}; each {}",
            self.max_vms,
            self.images,
            bound(self.max_memory_mib),
            bound(self.max_vcpus),
            crate::narrow::describe_narrowing(&self.vm)
        )
    }
}

struct FactoryLimits {
    st: Rc<SessionState>,
    n: FactoryNarrowing,
    budget: Option<Rc<Budget>>,
    grant: Option<Rc<GrantNode>>,
    /// Names of the VMs created through this factory (or one narrowed from it).
    owned: RefCell<BTreeSet<String>>,
    /// Creates in progress through this factory (or one narrowed from it).
    creating: Cell<u32>,
    parent: Option<Rc<FactoryLimits>>,
}

impl FactoryLimits {
    fn call(&self, method: &str) -> CvResult<()> {
        crate::narrow::admit(&self.grant, self.n.expires_at_ms, &self.budget, |e| self.deny(method, e))
    }

    fn chain(&self) -> Vec<(String, String)> {
        self.grant.as_ref().map(|g| g.chain()).unwrap_or_default()
    }

    fn deny(&self, method: &str, e: CvError) -> CvError {
        self.st.audit_chain("", &self.chain(), "vms.narrowed.denied", "VmFactory", method, Err(&e), &e.message);
        e
    }

    /// Whether VM `name` was created through this factory and still exists.
    fn owns(&self, name: &str) -> bool {
        self.owned.borrow().contains(name) && self.st.vms.borrow().contains_key(name)
    }

    /// Its VMs that still exist, and creates in progress.
    fn held(&self) -> usize {
        let vms = self.st.vms.borrow();
        self.owned.borrow().iter().filter(|n| vms.contains_key(*n)).count() + self.creating.get() as usize
    }

    /// Every level of the chain, this one first.
    fn levels(self: &Rc<Self>) -> Vec<Rc<FactoryLimits>> {
        let mut out = vec![self.clone()];
        while let Some(p) = out.last().unwrap().parent.clone() {
            out.push(p);
        }
        out
    }
}

/// A narrowed `VmFactory`.
pub struct NarrowFactory {
    limits: Rc<FactoryLimits>,
}

/// Makes a narrowed `VmFactory` of session `st` with `n`; `budget` 0: none
/// of its own, else chained under `parent_budget`; `parent`: the factory
/// it was narrowed from (its VM count includes this one's); `grant`: the
/// grant it is bound to. Audited (`vms.narrow`).
fn make(
    st: &Rc<SessionState>,
    n: FactoryNarrowing,
    budget: u64,
    parent_budget: Option<Rc<Budget>>,
    parent: Option<Rc<FactoryLimits>>,
    grant: Option<Rc<GrantNode>>,
) -> vm_factory::Client {
    let budget = Budget::chain(budget, parent_budget);
    let chain = grant.as_ref().map(|g| g.chain()).unwrap_or_default();
    st.audit_chain("", &chain, "vms.narrow", "VmFactory", "narrow", Ok(()), &n.describe());
    let limits = Rc::new(FactoryLimits {
        st: st.clone(),
        n,
        budget,
        grant,
        owned: RefCell::new(BTreeSet::new()),
        creating: Cell::new(0),
        parent,
    });
    let mut set = st.narrow_factories.borrow_mut();
    set.gc();
    set.new_client(NarrowFactory { limits })
}

/// `VmFactory.narrow` on the session's own factory.
///
/// Errors: `invalidArgument` for a malformed narrowing.
pub fn narrowed(st: &Rc<SessionState>, r: vm_factory_narrowing::Reader<'_>) -> CvResult<vm_factory::Client> {
    Ok(make(st, FactoryNarrowing::read(r)?, r.get_call_budget(), None, None, None))
}

impl NarrowFactory {
    /// The grant this cap is bound to, if it was shared.
    pub fn grant(&self) -> Option<Rc<GrantNode>> {
        self.limits.grant.clone()
    }

    /// Its narrowing, for people.
    pub fn describe(&self) -> String {
        self.limits.n.describe()
    }

    /// The same narrowing bound to `grant` (for a share): a factory
    /// narrowed from this one (its VMs count here too) that dies with the
    /// grant, as does every `Vm` it hands out.
    pub fn rebind(&self, grant: &Rc<GrantNode>) -> vm_factory::Client {
        let l = &self.limits;
        make(&l.st, l.n.clone(), 0, l.budget.clone(), Some(l.clone()), Some(grant.clone()))
    }

    fn vm_cap(&self, entry: &Rc<crate::vms::VmEntry>) -> vm::Client {
        let l = &self.limits;
        crate::narrow::unaudited(&l.st, entry, l.n.vm.clone(), l.budget.clone(), l.grant.clone())
    }

    fn own_entry(&self, name: &str) -> CvResult<Rc<crate::vms::VmEntry>> {
        if !self.limits.owns(name) {
            return Err(CvError::not_found(format!("this cap has no VM named {name:?}")));
        }
        VmFactoryImpl { st: self.limits.st.clone() }.entry(name)
    }

    /// Checks a create against the narrowing; reserves a slot at every
    /// level (released by the returned guard). With it comes the engine to
    /// pin the VM to when the spec asks `auto` but the narrowing does not
    /// allow both engines (so `auto`'s fallback cannot leave the list).
    fn admit(&self, spec: vm_spec::Reader<'_>) -> CvResult<(Slot, Option<Engine>)> {
        let n = &self.limits.n;
        let asked = spec.get_engine().map_err(|_| CvError::invalid("engine: not one of auto, qemu, kvm"))?;
        let engine = capvisor_rpc::host::resolve_engine(asked, self.limits.st.ctx.auto_engine);
        if !n.engines.contains(&engine) {
            let what = match asked {
                Engine::Auto => format!("auto (here {})", engine_name(engine)),
                e => engine_name(e).to_string(),
            };
            let allowed: Vec<_> = n.engines.iter().map(|e| engine_name(*e)).collect();
            return Err(CvError::denied(format!("this cap may not boot engine {what} (allowed: {allowed:?})")));
        }
        let pin = (asked == Engine::Auto && n.engines.len() < 2).then_some(engine);
        let image = text(spec.get_image()).map_err(|_| CvError::invalid("image: not UTF-8 text"))?;
        let image = if image.is_empty() { "base".to_string() } else { image };
        if !n.images.contains(&image) {
            return Err(CvError::denied(format!("this cap may not boot image {image:?} (allowed: {:?})", n.images)));
        }
        let memory = match spec.get_memory_mib() {
            0 => self.limits.st.ctx.bundle.default_memory_mib,
            m => m,
        };
        if memory > n.max_memory_mib {
            return Err(CvError::quota(format!("{memory} MiB exceeds this cap's {} MiB per VM", n.max_memory_mib)));
        }
        if spec.get_vcpus().max(1) > n.max_vcpus {
            return Err(CvError::quota(format!("this cap allows {} vCPUs per VM", n.max_vcpus)));
        }
        for m in spec.get_volumes().map_err(|e| CvError::invalid(format!("volumes: {e}")))?.iter() {
            let v = text(m.get_volume()).map_err(|_| CvError::invalid("volume: not UTF-8 text"))?;
            if !n.volumes.contains(&v) {
                return Err(CvError::denied(format!("this cap may not attach volume {v:?}")));
            }
            if n.volumes_read_only && !m.get_read_only() {
                return Err(CvError::denied(format!("this cap attaches volume {v:?} read-only only")));
            }
        }
        let levels = self.limits.levels();
        for l in &levels {
            if l.held() >= l.n.max_vms as usize {
                return Err(CvError::quota(format!("this cap may hold {} VMs at once", l.n.max_vms)));
            }
        }
        for l in &levels {
            l.creating.set(l.creating.get() + 1);
        }
        Ok((Slot(levels), pin))
    }
}

/// Creates in progress counted at every level until dropped.
struct Slot(Vec<Rc<FactoryLimits>>);

impl Slot {
    /// The create succeeded: VM `name` is owned at every level.
    fn owned(&self, name: &str) {
        for l in &self.0 {
            l.owned.borrow_mut().insert(name.to_string());
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        for l in &self.0 {
            l.creating.set(l.creating.get() - 1);
        }
    }
}

impl vm_factory::Server for NarrowFactory {
    async fn create(
        self: CapRc<Self>,
        params: vm_factory::CreateParams,
        mut results: vm_factory::CreateResults,
    ) -> capnp::Result<()> {
        self.limits.call("create")?;
        let spec = params.get()?.get_spec()?;
        let (slot, pin) = self.admit(spec).map_err(|e| self.limits.deny("create", e))?;
        let mut pinned = capnp::message::Builder::new_default();
        let spec = match pin {
            None => spec,
            Some(engine) => {
                pinned.set_root(spec)?;
                pinned.get_root::<vm_spec::Builder<'_>>()?.set_engine(engine);
                pinned.get_root_as_reader::<vm_spec::Reader<'_>>()?
            }
        };
        let res = VmFactoryImpl { st: self.limits.st.clone() }.do_create(spec).await;
        let name = match &res {
            Ok(e) => e.name.clone(),
            Err(_) => text(spec.get_name()).unwrap_or_default(),
        };
        let detail = res.as_ref().err().map(|e| e.message.clone()).unwrap_or_default();
        let outcome = res.as_ref().map(|_| ());
        self.limits.st.audit_chain(&name, &self.limits.chain(), "vm.create", "vms", "create", outcome, &detail);
        let entry = res?;
        slot.owned(&entry.name);
        results.get().set_vm(self.vm_cap(&entry));
        Ok(())
    }

    async fn list(
        self: CapRc<Self>,
        _: vm_factory::ListParams,
        mut results: vm_factory::ListResults,
    ) -> capnp::Result<()> {
        self.limits.call("list")?;
        crate::vms::write_vms(&self.limits.st, &|name| self.limits.owns(name), results.get());
        Ok(())
    }

    async fn get(
        self: CapRc<Self>,
        params: vm_factory::GetParams,
        mut results: vm_factory::GetResults,
    ) -> capnp::Result<()> {
        self.limits.call("get")?;
        let name = text(params.get()?.get_vm_name())?;
        let entry = self.own_entry(&name)?;
        results.get().set_vm(self.vm_cap(&entry));
        Ok(())
    }

    async fn remove(
        self: CapRc<Self>,
        params: vm_factory::RemoveParams,
        _: vm_factory::RemoveResults,
    ) -> capnp::Result<()> {
        self.limits.call("remove")?;
        let name = text(params.get()?.get_vm_name())?;
        let res = match self.own_entry(&name) {
            Ok(_) => VmFactoryImpl { st: self.limits.st.clone() }.remove_entry(&name).await,
            Err(e) => Err(e),
        };
        let outcome = res.as_ref().map(|_| ());
        self.limits.st.audit_chain(&name, &self.limits.chain(), "vm.remove", "vms", "remove", outcome, &name);
        Ok(res?)
    }

    async fn images(
        self: CapRc<Self>,
        _: vm_factory::ImagesParams,
        results: vm_factory::ImagesResults,
    ) -> capnp::Result<()> {
        self.limits.call("images")?;
        let mut results = results;
        crate::vms::write_images(&self.limits.st, &|n| self.limits.n.images.iter().any(|i| i == n), results.get());
        Ok(())
    }

    /// A view of the flows of the VMs made through this factory (now and
    /// later), bound to its grant.
    async fn net_log(
        self: CapRc<Self>,
        _: vm_factory::NetLogParams,
        mut results: vm_factory::NetLogResults,
    ) -> capnp::Result<()> {
        self.limits.call("netLog")?;
        let l = &self.limits;
        let own = crate::vms::session_net_log(&l.st)?;
        let scope = crate::wrap::Scope::session(&l.st).with_grant(l.grant.clone());
        let limits = Rc::downgrade(l);
        let owns = move |vm: &str| limits.upgrade().is_some_and(|l| l.owns(vm));
        let view = crate::narrow_net::Visible::Factory(Rc::new(owns));
        let bounds = crate::narrow::Bounds { expires_at_ms: l.n.expires_at_ms, budget: l.budget.clone() };
        results.get().set_log(crate::narrow_net::log_view(&scope, own, view, bounds));
        Ok(())
    }

    async fn narrow(
        self: CapRc<Self>,
        params: vm_factory::NarrowParams,
        mut results: vm_factory::NarrowResults,
    ) -> capnp::Result<()> {
        self.limits.call("narrow")?;
        let r = params.get()?.get_narrowing()?;
        let next = FactoryNarrowing::read(r)?;
        let l = &self.limits;
        let n = l.n.then(&next).map_err(|e| l.deny("narrow", e))?;
        let f = make(&l.st, n, r.get_call_budget(), l.budget.clone(), Some(l.clone()), l.grant.clone());
        results.get().set_vms(f);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::narrow::Access;

    fn vm_n(exec: &[&str]) -> Narrowing {
        Narrowing {
            exec_allow: exec.iter().map(|s| s.to_string()).collect(),
            exec_any: false,
            ask_exec: false,
            exec_user: None,
            exec_cwd: None,
            allow_pty: false,
            files: Access::ReadOnly,
            write_prefixes: vec![],
            allow_stop: true,
            ports: vec![],
            expires_at_ms: 0,
        }
    }

    fn f() -> FactoryNarrowing {
        FactoryNarrowing {
            max_vms: 2,
            images: vec!["base".into(), "debian".into()],
            max_memory_mib: 512,
            max_vcpus: u32::MAX,
            vm: vm_n(&["python3", "sh"]),
            expires_at_ms: 9000,
            volumes: vec!["data".into(), "logs".into()],
            volumes_read_only: false,
            engines: vec![Engine::Qemu, Engine::Kvm],
        }
    }

    #[test]
    fn narrowing_a_factory_again_never_widens_it() {
        let wider = FactoryNarrowing {
            max_vms: 10,
            images: vec!["base".into(), "other".into()],
            max_memory_mib: 4096,
            max_vcpus: 4,
            vm: Narrowing { files: Access::ReadWrite, ..vm_n(&["python3", "curl"]) },
            expires_at_ms: 0,
            volumes: vec!["data".into(), "secret".into()],
            volumes_read_only: true,
            engines: vec![Engine::Qemu],
        };
        let n = f().then(&wider).unwrap();
        assert_eq!(n.max_vms, 2);
        assert_eq!(n.images, ["base"]);
        assert_eq!((n.max_memory_mib, n.max_vcpus), (512, 4));
        assert_eq!(n.vm.exec_allow, ["python3"]);
        assert_eq!(n.vm.files, Access::ReadOnly);
        assert_eq!(n.expires_at_ms, 9000);
        assert_eq!((n.volumes.as_slice(), n.volumes_read_only), (&["data".to_string()][..], true));
        assert_eq!(n.engines, [Engine::Qemu]);
        assert!(n.describe().contains("engine qemu"), "{}", n.describe());
        let kvm_only = FactoryNarrowing { engines: vec![Engine::Kvm], ..f() };
        let none = n.then(&kvm_only).unwrap();
        assert!(none.engines.is_empty(), "qemu then kvm leaves no engine, not both");
        assert!(none.describe().contains("no engine"), "{}", none.describe());
        assert!(n.then(&f()).unwrap().engines == [Engine::Qemu], "both again does not widen");
        let earlier = f().then(&FactoryNarrowing { expires_at_ms: 5000, ..f() }).unwrap();
        assert_eq!(earlier.expires_at_ms, 5000);
        assert!(f().describe().contains("up to 2"), "{}", f().describe());
    }

    fn read(engines: &[Engine]) -> CvResult<FactoryNarrowing> {
        let mut m = capnp::message::Builder::new_default();
        let mut b = m.init_root::<vm_factory_narrowing::Builder<'_>>();
        let mut l = b.reborrow().init_engines(engines.len() as u32);
        for (i, e) in engines.iter().enumerate() {
            l.set(i as u32, *e);
        }
        FactoryNarrowing::read(m.get_root_as_reader().unwrap())
    }

    #[test]
    fn engines_read_as_listed_both_when_empty_and_never_auto() {
        assert_eq!(read(&[]).unwrap().engines, [Engine::Qemu, Engine::Kvm]);
        assert_eq!(read(&[Engine::Kvm, Engine::Kvm]).unwrap().engines, [Engine::Kvm]);
        let e = read(&[Engine::Qemu, Engine::Auto]).unwrap_err();
        assert_eq!(e.code, capvisor_rpc::schema::common_capnp::ErrorCode::InvalidArgument, "{e:?}");
    }
}
