//! Session state shared by every capability the worker serves: the
//! context, the VMs, the revocation flag, audit.

use crate::launch::VmLauncher;
use crate::vms::VmEntry;
use capvisor_manifest::SessionContext;
use capvisor_rpc::schema::capvisor_capnp::{net_log, net_policy, vm, vm_factory, volumes};
use capvisor_rpc::schema::internal_capnp::{session_host, RevokeReason};
use capvisor_rpc::{CvError, CvResult};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::rc::Rc;

/// One session: its context, its VMs, its revocation flag, and the broker's
/// `SessionHost` (logout, audit, accounts).
pub struct SessionState {
    /// Immutable context from the broker.
    pub ctx: SessionContext,
    /// The broker's face to this session.
    pub host: session_host::Client,
    /// How this session's VMs are started.
    pub launcher: Box<dyn VmLauncher>,
    /// This session's VMs by name. A removed VM leaves the map and is
    /// marked removed, so caps that designate it never reach a newer VM of
    /// the same name.
    pub vms: RefCell<BTreeMap<String, Rc<VmEntry>>>,
    revoked_tx: tokio::sync::watch::Sender<Option<RevokeReason>>,
    /// Set once revocation has finished its work (VMs stopped, broker told).
    revocation_done: tokio::sync::watch::Sender<bool>,
    /// Client connections currently attached.
    pub clients: Cell<usize>,
    /// Fires when the last client leaves (checked by the linger loop).
    pub clients_changed: tokio::sync::Notify,
    next_vm: Cell<u32>,
    /// The session's egress proxy once started (`crate::proxy::ensure`);
    /// dropped (the process ends) when the session is revoked.
    pub proxy: RefCell<Option<Rc<crate::proxy::SessionProxy>>>,
    /// This session's grants by id, the ones made through them included
    /// (`crate::grants`).
    pub grants: RefCell<BTreeMap<String, Rc<crate::grants::GrantNode>>>,
    /// Every narrowed `Vm` this session serves, so `Shares.share` can
    /// recognise one passed back to it (weak: dropping the cap frees it).
    pub narrow_vms: RefCell<capnp_rpc::CapabilityServerSet<crate::narrow::NarrowVm, vm::Client>>,
    /// Every `NetLog` view this session serves (same purpose).
    pub narrow_logs: RefCell<capnp_rpc::CapabilityServerSet<crate::narrow_net::NarrowNetLog, net_log::Client>>,
    /// Every read-only `NetPolicy` this session serves (same purpose).
    pub narrow_policies:
        RefCell<capnp_rpc::CapabilityServerSet<crate::narrow_net::ReadOnlyNetPolicy, net_policy::Client>>,
    /// Every `Volumes` view this session serves (same purpose).
    pub narrow_volumes: RefCell<capnp_rpc::CapabilityServerSet<crate::volumes::VolumesView, volumes::Client>>,
    /// Every narrowed `VmFactory` this session serves (same purpose).
    pub narrow_factories: RefCell<capnp_rpc::CapabilityServerSet<crate::narrow_vms::NarrowFactory, vm_factory::Client>>,
    /// Caps kept by name (`CapSet.keep`) for the session's own CapSet.
    pub kept: crate::caps::Kept,
    /// Execs waiting for a decision (`askExec`; `crate::approvals`).
    pub exec_approvals: crate::approvals::ExecApprovals,
}

impl SessionState {
    /// A live (not revoked) session whose VMs `launcher` starts.
    pub fn new(ctx: SessionContext, host: session_host::Client, launcher: Box<dyn VmLauncher>) -> Rc<Self> {
        let (revoked_tx, _) = tokio::sync::watch::channel(None);
        let (revocation_done, _) = tokio::sync::watch::channel(false);
        let ask_timeout = ctx
            .net
            .ask_timeout_secs
            .map(|s| std::time::Duration::from_secs(s.into()))
            .unwrap_or(crate::approvals::DEFAULT_TIMEOUT);
        Rc::new(Self {
            ctx,
            host,
            launcher,
            vms: RefCell::new(BTreeMap::new()),
            revoked_tx,
            revocation_done,
            clients: Cell::new(0),
            clients_changed: tokio::sync::Notify::new(),
            next_vm: Cell::new(1),
            proxy: RefCell::new(None),
            grants: RefCell::new(BTreeMap::new()),
            narrow_vms: RefCell::new(capnp_rpc::CapabilityServerSet::new()),
            narrow_factories: RefCell::new(capnp_rpc::CapabilityServerSet::new()),
            narrow_logs: RefCell::new(capnp_rpc::CapabilityServerSet::new()),
            narrow_volumes: RefCell::new(capnp_rpc::CapabilityServerSet::new()),
            narrow_policies: RefCell::new(capnp_rpc::CapabilityServerSet::new()),
            exec_approvals: crate::approvals::ExecApprovals::new(ask_timeout),
            kept: Default::default(),
        })
    }

    /// `Err(staleSession)` once the session is revoked or past its expiry.
    pub fn check(&self) -> CvResult<()> {
        if self.revoked_tx.borrow().is_some() || now_ms() >= self.ctx.expires_at_ms {
            return Err(CvError::stale());
        }
        Ok(())
    }

    /// Why the session was revoked, if it was (logout, expiry, shutdown, ...).
    pub fn revoked_reason(&self) -> Option<RevokeReason> {
        *self.revoked_tx.borrow()
    }

    /// Marks the session revoked for `reason`. Idempotent; returns whether
    /// this call did it.
    pub fn mark_revoked(&self, reason: RevokeReason) -> bool {
        let mut did = false;
        self.revoked_tx.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                did = true;
                true
            } else {
                false
            }
        });
        did
    }

    /// Records that revocation finished its work (see [`Self::revocation_finished`]).
    pub fn mark_revocation_done(&self) {
        self.revocation_done.send_replace(true);
    }

    /// Resolves once revocation has finished its work: the VMs are stopped
    /// and, for a logout, the broker was told. The worker stays until then,
    /// so the call that revoked (e.g. `Session.logout` through the broker)
    /// still gets its answer.
    pub async fn revocation_finished(&self) {
        let mut rx = self.revocation_done.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Resolves once the session is revoked.
    pub async fn revoked(&self) {
        let mut rx = self.revoked_tx.subscribe();
        let _ = rx.wait_for(|r| r.is_some()).await;
    }

    /// Runs `fut` unless or until the session is revoked, in which case the
    /// call ends with `staleSession` (pending calls fail: DESIGN.md,
    /// "Authority rules").
    pub async fn guard<T>(&self, fut: impl Future<Output = CvResult<T>>) -> CvResult<T> {
        self.check()?;
        tokio::select! {
            r = fut => r,
            _ = self.revoked() => Err(CvError::stale()),
        }
    }

    /// A fresh default VM name (`vm-1`, `vm-2`, ...), not yet in use.
    pub fn next_vm_name(&self) -> String {
        loop {
            let n = self.next_vm.get();
            self.next_vm.set(n + 1);
            let name = format!("vm-{n}");
            if !self.vms.borrow().contains_key(&name) {
                return name;
            }
        }
    }

    /// Sends an audit event to the broker (which adds principal, session
    /// and time). Fire-and-forget: a failed audit write is logged there.
    /// For an event about one VM use [`Self::audit_vm`].
    pub fn audit(&self, action: &str, cap: &str, method: &str, outcome: Result<(), &CvError>, detail: &str) {
        self.audit_vm("", action, cap, method, outcome, detail)
    }

    /// [`Self::audit`] for an event about VM `vm` (its name in this
    /// session; `""` for none): the record's `vm` field, which
    /// `Audit.query` filters on.
    pub fn audit_vm(
        &self,
        vm: &str,
        action: &str,
        cap: &str,
        method: &str,
        outcome: Result<(), &CvError>,
        detail: &str,
    ) {
        self.audit_chain(vm, &[], action, cap, method, outcome, detail)
    }

    /// [`Self::audit_vm`] for a call that came through grants: `chain` is
    /// their `(id, label)`, outermost first (`crate::grants::GrantNode::chain`);
    /// the broker then records the principal as `grant:<innermost id>`.
    #[allow(clippy::too_many_arguments)]
    pub fn audit_chain(
        &self,
        vm: &str,
        chain: &[(String, String)],
        action: &str,
        cap: &str,
        method: &str,
        outcome: Result<(), &CvError>,
        detail: &str,
    ) {
        let mut req = self.host.audit_request();
        {
            let mut ev = req.get().init_event();
            let mut list = ev.reborrow().init_grants(chain.len() as u32);
            for (i, (id, label)) in chain.iter().enumerate() {
                let mut g = list.reborrow().get(i as u32);
                g.set_id(id.as_str());
                g.set_label(label.as_str());
            }
            ev.set_vm(vm);
            ev.set_action(action);
            ev.set_cap(cap);
            ev.set_method(method);
            match outcome {
                Ok(()) => ev.reborrow().init_outcome().set_ok(()),
                Err(e) => ev.reborrow().init_outcome().set_error(e.code),
            }
            ev.set_detail(detail);
        }
        tokio::task::spawn_local(async move {
            if let Err(e) = req.send().promise.await {
                tracing::warn!("audit event not delivered: {e}");
            }
        });
    }
}

pub use capvisor_rpc::now_ms;
