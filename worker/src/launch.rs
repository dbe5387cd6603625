//! Starting a VM's vmm: [`VmLauncher`] is the worker's one door to new
//! VMs, a trait so the worker's logic can be tested in-process against a
//! fake `Machine` and guest-init's real `Guest` server (no VM, no vmm).
//!
//! [`ProcessVmLauncher`] spawns `capvisor-vmm --rpc-fd 3 --agent-fd 4
//! --config-fd 5 [--egress-fd 6]` with a socketpair for `Machine`, a
//! socketpair for the guest's egress port (with `VmConfig.egress`; the
//! worker passes its end to the session proxy), a socketpair for the
//! guest's agent channel (the vmm hands its end to the VM; the worker
//! keeps the other and talks to guest-init on it directly), and a memfd
//! holding the schema `VmConfig` (docs/processes.md), moved into the VM's
//! cgroup (`cfg.confine.cgroup`) between fork and exec, so the vmm and the
//! QEMU it starts are charged to it from their first instruction.
//!
//! [`confine_vm`] decides a VM's confinement from the manifest's
//! `[confinement]` (docs/vmm-confinement.md): it makes the VM's cgroup
//! below the session's, probes the network namespace and Landlock, and
//! fails closed on a required layer it cannot give.

use capvisor_confine::cgroup::{self, Cgroup};
use capvisor_confine::{ConfineError, Layer, Report};
use capvisor_rpc::conn::{self, INTERNAL};
use capvisor_rpc::schema::internal_capnp::machine;
use capvisor_rpc::spawn::{self, Inherit};
use capvisor_rpc::vmconfig::{Confinement, QemuConfinement, VmConfig};
use capvisor_rpc::{paths, CvError, CvResult};
use std::time::Duration;

/// How long a VM's cgroup is retried for removal after its vmm's
/// connection ended (the vmm and QEMU exit meanwhile).
pub const CGROUP_REMOVE_WAIT: Duration = Duration::from_secs(30);

/// A VM's confinement, decided before its vmm starts.
#[derive(Debug)]
pub struct VmConfinement {
    /// What the vmm must apply to QEMU, and the VM's cgroup directories:
    /// goes into `VmConfig.confine`.
    pub qemu: QemuConfinement,
    /// The decision, for the audit line and the log: applied layers and
    /// the missing ones the manifest allows.
    pub report: Report,
}

/// Decides the confinement of VM `name` (`memory_mib` of guest RAM,
/// `vcpus`) as `req` (manifest `[confinement]`) asks:
/// - cgroup: `vm-<name>` below this worker's session cgroup
///   ([`Cgroup::session_of_worker`]) with [`cgroup::vm_limits`];
/// - netns: a probe child in a fresh network namespace (the vmm gets one,
///   and QEMU another inside it);
/// - landlock: the kernel's Landlock ABI is not 0.
///
/// A layer that cannot be given is missing from the report when `req`
/// allows it, else the decision fails.
///
/// Errors: `unavailable` naming the first required layer that cannot be
/// given and why (e.g. `confinement of VM "a" failed: cgroup: not in a
/// session cgroup ...`).
///
/// With `qemu_engine` false (the `kvm` engine, whose vmm confines itself
/// with Landlock and seccomp, `capvisor_kvm::sandbox`) only the cgroup and
/// the vmm's network namespace are decided here.
pub fn confine_vm(
    req: &Confinement,
    name: &str,
    memory_mib: u32,
    vcpus: u32,
    qemu_engine: bool,
) -> CvResult<VmConfinement> {
    let mut report = Report::default();
    let mut qemu = QemuConfinement { netns: false, landlock: false, cgroup: Vec::new() };
    let vm_cgroup = (|| {
        let session = Cgroup::session_of_worker(&req.cgroup_root)?;
        let leaf = format!("{}{name}", cgroup::VM_PREFIX);
        // A VM of the same name that just ended may still be having its
        // cgroup removed; let that finish first.
        session.at(&leaf).wait_removal(Duration::from_secs(5));
        let vm = session.child(&leaf)?;
        vm.set_limits(&cgroup::vm_limits(memory_mib, vcpus))?;
        Ok::<_, ConfineError>(vm)
    })();
    match vm_cgroup {
        Ok(vm) => {
            report.applied(Layer::Cgroup, vm.describe());
            qemu.cgroup = vm.dirs().into_iter().map(|d| d.to_path_buf()).collect();
        }
        Err(e) if req.cgroup => return Err(CvError::unavailable(format!("confinement of VM {name:?} failed: {e}"))),
        Err(e) => report.missing.push(e),
    }
    // A fresh network namespace for the vmm (either engine) and, inside
    // it, another for QEMU (applied by the vmm).
    let plan = capvisor_confine::netns::NetnsPlan::new();
    match probe_netns(&plan) {
        Ok(()) => {
            report.applied(Layer::Netns, plan.describe());
            qemu.netns = true;
        }
        Err(e) if req.netns => {
            remove_now(&qemu);
            return Err(CvError::unavailable(format!("confinement of VM {name:?} failed: {e}")));
        }
        Err(e) => report.missing.push(e),
    }
    if !qemu_engine {
        report.applied(Layer::Landlock, "and seccomp applied by the kvm engine's vmm to itself");
        return Ok(VmConfinement { qemu, report });
    }
    // Landlock (QEMU's ruleset is built and enforced by the vmm)
    match capvisor_confine::landlock::abi() {
        0 => {
            let e = ConfineError::new(Layer::Landlock, "the kernel has no Landlock (not built in, or not in lsm=)");
            if req.landlock {
                remove_now(&qemu);
                return Err(CvError::unavailable(format!("confinement of VM {name:?} failed: {e}")));
            }
            report.missing.push(e);
        }
        abi => {
            report.applied(Layer::Landlock, format!("ABI {abi} (QEMU's ruleset)"));
            qemu.landlock = true;
        }
    }
    Ok(VmConfinement { qemu, report })
}

/// The network-namespace probe, once per worker (the answer does not
/// change while it runs).
fn probe_netns(plan: &capvisor_confine::netns::NetnsPlan) -> Result<(), ConfineError> {
    static PROBE: std::sync::OnceLock<Result<(), ConfineError>> = std::sync::OnceLock::new();
    PROBE.get_or_init(|| plan.probe()).clone()
}

/// Removes a VM cgroup made by a decision that then failed.
fn remove_now(q: &QemuConfinement) {
    for d in &q.cgroup {
        let _ = std::fs::remove_dir(d);
    }
}

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
    /// With `cfg.egress`: the host end of the guest's `capvisor.egress`
    /// port, for the session's egress proxy.
    pub egress: Option<std::os::fd::OwnedFd>,
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
        let egress = if cfg.egress { Some(spawn::stream_pair().map_err(internal)?) } else { None };
        let log = std::fs::File::create(cfg.run_dir.join("vmm.log")).map_err(internal)?;
        let mut cmd = tokio::process::Command::new(paths::binary("capvisor-vmm"));
        cmd.args(["--rpc-fd", "3", "--agent-fd", "4", "--config-fd", "5"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        // Into the VM's cgroup between fork and exec; registered before
        // `prepare`'s hook, which renumbers descriptors.
        // With `cfg.confine.netns`, the vmm starts in a fresh network
        // namespace too: it opens no socket (its RPC and agent channels
        // are inherited socketpairs).
        let placement = if cfg.confine.cgroup.is_empty() {
            None
        } else {
            Some(
                Cgroup::placement_of(&cfg.confine.cgroup)
                    .map_err(|e| CvError::unavailable(format!("confinement of VM {:?} failed: {e}", cfg.name)))?,
            )
        };
        let netns = cfg.confine.netns.then(capvisor_confine::netns::NetnsPlan::new);
        capvisor_confine::ChildConfinement { cgroup: placement, netns, landlock: None }.install(cmd.as_std_mut());
        let mut fds = vec![
            Inherit { fd: rpc_there, target: 3 },
            Inherit { fd: agent_there, target: 4 },
            Inherit { fd: config, target: 5 },
        ];
        let egress_here = match egress {
            Some((here, there)) => {
                cmd.args(["--egress-fd", "6"]);
                fds.push(Inherit { fd: there, target: 6 });
                Some(here)
            }
            None => None,
        };
        spawn::prepare(&mut cmd, &fds);
        let child = cmd.spawn().map_err(internal).inspect_err(|_| remove_now(&cfg.confine))?;
        drop(fds);
        let (machine, conn) =
            conn::connect::<machine::Client>(spawn::into_tokio(rpc_here).map_err(internal)?, None, INTERNAL);
        let conn = remove_cgroup_after(conn, &cfg.confine.cgroup);
        Ok(LaunchedVm {
            machine,
            machine_conn: Some(conn),
            agent: spawn::into_tokio(agent_here).map_err(internal)?,
            child: Some(child),
            egress: egress_here,
        })
    }
}

/// Wraps the vmm's connection task so that when it ends, or the wrapper is
/// aborted or dropped (the worker lets the VM go), the connection is
/// aborted too and the VM's cgroup `dirs` is removed once the vmm and
/// QEMU have left it ([`Cgroup::remove_when_empty`], on a thread).
fn remove_cgroup_after(
    conn: tokio::task::JoinHandle<Result<(), capnp::Error>>,
    dirs: &[std::path::PathBuf],
) -> tokio::task::JoinHandle<Result<(), capnp::Error>> {
    struct Guard {
        conn: tokio::task::AbortHandle,
        dirs: Vec<std::path::PathBuf>,
    }
    impl Drop for Guard {
        fn drop(&mut self) {
            self.conn.abort();
            if let Some(first) = self.dirs.first() {
                let version = if self.dirs.len() > 1 { cgroup::Version::V1 } else { cgroup::Version::V2 };
                let last = self.dirs.last().unwrap_or(first).clone();
                Cgroup::from_dirs(version, first.clone(), last).remove_when_empty(CGROUP_REMOVE_WAIT, false);
            }
        }
    }
    let guard = Guard { conn: conn.abort_handle(), dirs: dirs.to_vec() };
    tokio::task::spawn_local(async move {
        let _guard = guard;
        match conn.await {
            Ok(r) => r,
            Err(e) => Err(capnp::Error::failed(format!("vmm connection task: {e}"))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test process is in no session cgroup: a required cgroup layer
    /// refuses with `unavailable` naming it; an optional one is reported
    /// missing while the other layers are still given.
    #[test]
    fn a_missing_session_cgroup_fails_closed_unless_optional() {
        let strict = Confinement::default();
        let e = confine_vm(&strict, "a", 256, 1, true).unwrap_err();
        assert_eq!(e.code, capvisor_rpc::schema::common_capnp::ErrorCode::Unavailable);
        assert!(
            e.message.starts_with("confinement of VM \"a\" failed: cgroup: not in a session cgroup"),
            "{}",
            e.message
        );

        let relaxed = Confinement { cgroup: false, ..Default::default() };
        let d = confine_vm(&relaxed, "a", 256, 1, true).unwrap();
        assert!(d.qemu.cgroup.is_empty());
        assert!(d.qemu.netns && d.qemu.landlock, "{}", d.report);
        assert_eq!(d.report.missing.len(), 1);
        assert_eq!(d.report.missing[0].layer, Layer::Cgroup);
        let text = d.report.to_string();
        assert!(
            text.starts_with("netns fresh; landlock ABI ") && text.contains("; NO cgroup (not in a session cgroup"),
            "{text}"
        );

        let kvm = confine_vm(&relaxed, "a", 256, 1, false).unwrap();
        assert!(kvm.qemu.netns && !kvm.qemu.landlock, "the kvm engine's vmm applies its own Landlock");
    }
}
