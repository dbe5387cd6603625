//! End to end: the confinement of sessions and VMs (docs/vmm-confinement.md).
//! A real `capvisor serve` and real guests under QEMU; the checks read
//! /proc and the cgroup file systems from outside.

mod common;
use capvisor_confine::cgroup::{self, Cgroup};
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// The pid of the first process of ours whose argv[0] ends with `name`.
fn pid_of(s: &Server, name: &str) -> u32 {
    s.our_processes().into_iter().find(|(_, a)| a.ends_with(name)).unwrap_or_else(|| panic!("no {name} runs")).0
}

/// The path of `pid`'s cgroup in the memory hierarchy (v1) or the unified one.
fn memory_cgroup(pid: u32, v: cgroup::Version) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let want = if v == cgroup::Version::V1 { "memory" } else { "" };
    s.lines()
        .find(|l| l.split(':').nth(1).is_some_and(|c| c.split(',').any(|x| x == want)))
        .and_then(|l| l.splitn(3, ':').nth(2))
        .unwrap_or_else(|| panic!("no {want} line in {s}"))
        .to_string()
}

fn wait_gone(c: &Cgroup, what: &str) {
    let t0 = Instant::now();
    while c.dirs().iter().any(|d| d.exists()) {
        assert!(t0.elapsed() < Duration::from_secs(10), "{what} cgroup {:?} was not removed", c.dirs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The first audit line with all of `needles`, waiting up to 10 s for it
/// (workers send audit events without waiting).
fn audit_line(s: &Server, needles: &[&str]) -> String {
    let t0 = Instant::now();
    loop {
        let a = std::fs::read_to_string(s.state.join("audit.jsonl")).unwrap_or_default();
        if let Some(l) = a.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return l.to_string();
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no audit line with {needles:?} in:\n{a}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The worker runs in `capvisor-<broker pid>/session-<id>/worker`, the VM's
/// vmm and QEMU in `.../session-<id>/vm-<name>` with the VM's limits, the
/// session cgroup carries the bundle's budget; the vmm is in a fresh
/// network namespace and QEMU in another of its own; the decision is audited; the VM's cgroup goes with
/// the VM, the session's with the session, the broker's subtree with serve.
#[test]
fn sessions_and_vms_run_in_their_cgroups_and_the_vmm_and_qemu_in_fresh_netns() {
    let own = Cgroup::own(Path::new(cgroup::DEFAULT_ROOT)).expect("a usable cgroup on this host");
    let s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--name", "c1"], None, 0);
    let (broker, worker, vmm) =
        (pid_of(&s, "capvisor-broker"), pid_of(&s, "capvisor-worker"), pid_of(&s, "capvisor-vmm"));
    let qemu = s.our_processes().into_iter().find(|(_, a)| a.contains("qemu")).expect("qemu runs").0;

    let subtree = own.at(&format!("capvisor-{broker}"));
    let worker_at = memory_cgroup(worker, own.version());
    let session_name = worker_at
        .strip_suffix("/worker")
        .and_then(|p| p.rsplit('/').next())
        .filter(|n| n.starts_with("session-"))
        .unwrap_or_else(|| panic!("the worker is in {worker_at}"));
    assert!(worker_at.contains(&format!("/capvisor-{broker}/{session_name}/worker")), "{worker_at}");
    let session = subtree.at(session_name);
    let vm = session.at("vm-c1");
    for pid in [vmm, qemu] {
        let at = memory_cgroup(pid, own.version());
        assert!(at.ends_with(&format!("/capvisor-{broker}/{session_name}/vm-c1")), "pid {pid}: {at}");
    }
    let m = capvisor_manifest::Manifest::default_manifest();
    let b = m.bundle_for("owner").unwrap();
    assert_eq!(vm.limits(), cgroup::vm_limits(b.default_memory_mib, 1));
    assert_eq!(session.limits(), cgroup::session_limits(b.max_vms, b.max_memory_mib, b.max_vcpus));
    let mut in_vm = vm.procs();
    in_vm.sort();
    let mut want = vec![vmm, qemu];
    want.sort();
    assert_eq!(in_vm, want, "only the vmm and QEMU are in the VM cgroup");

    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_ne!(ns(&qemu.to_string()), ns("self"), "qemu is in the host's network namespace");
    assert_ne!(ns(&vmm.to_string()), ns("self"), "the vmm is in the host's network namespace");
    assert_ne!(ns(&qemu.to_string()), ns(&vmm.to_string()), "qemu has a namespace of its own");
    assert_eq!(ns(&worker.to_string()), ns("self"));
    let status = std::fs::read_to_string(format!("/proc/{qemu}/status")).unwrap();
    assert!(status.lines().any(|l| l.starts_with("NoNewPrivs:") && l.ends_with('1')));

    let line = audit_line(&s, &["\"vm.confine\"", "\"ok\""]);
    assert!(line.contains("c1: cgroup ") && line.contains("netns fresh") && line.contains("landlock ABI"), "{line}");
    assert!(!line.contains("NO "), "nothing is missing here: {line}");

    s.cli_ok("owner", &["vm", "rm", "c1"], None, 0);
    wait_gone(&vm, "the removed VM's");
    assert!(session.dirs().iter().all(|d| d.exists()), "the session's cgroup stays while it lives");
    s.cli_ok("owner", &["logout"], None, 0);
    wait_gone(&session, "the ended session's");
    s.stop();
    wait_gone(&subtree, "the stopped broker's");
}

/// A required layer the host cannot give (cgroups looked for under a
/// directory with none) stops the VM: `unavailable` naming the layer,
/// audited, nothing started. With the layer optional the VM starts and
/// the audit line says what is missing.
#[test]
fn a_required_layer_that_cannot_be_applied_stops_the_vm_and_is_audited() {
    let nowhere = tempfile::tempdir().unwrap();
    let root = nowhere.path().display();
    let strict = format!("[confinement]\ncgroup_root = \"{root}\"\n{}", capvisor_manifest::DEFAULT_TOML);
    let s = Server::start(Some(&strict));
    s.cli_ok("owner", &["login"], None, 0);
    let o = s.cli_ok("owner", &["vm", "create", "--name", "x"], None, 17);
    let err = stderr(&o);
    assert!(err.contains("confinement of VM \"x\" failed: cgroup:"), "{err}");
    assert_eq!(s.qemu_count(), 0, "no QEMU started");
    assert!(!s.our_processes().iter().any(|(_, a)| a.ends_with("capvisor-vmm")), "no vmm started");
    assert!(!stdout(&s.cli_ok("owner", &["vm", "list"], None, 0)).contains("x "), "the VM is not left behind");
    let line = audit_line(&s, &["\"vm.confine\"", "\"unavailable\""]);
    assert!(line.contains("cgroup:"), "the refusal names the layer: {line}");
    s.cli_ok("owner", &["logout"], None, 0);
    s.stop();

    let relaxed = format!(
        "[confinement]\nrequired = [\"netns\", \"landlock\"]\ncgroup_root = \"{root}\"\n{}",
        capvisor_manifest::DEFAULT_TOML
    );
    let s = Server::start(Some(&relaxed));
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--name", "y"], None, 0);
    let o = s.cli_ok("owner", &["vm", "exec", "y", "--", "echo", "confined-enough"], None, 0);
    assert_eq!(stdout(&o), "confined-enough\n");
    let line = audit_line(&s, &["\"vm.confine\"", "\"ok\""]);
    assert!(line.contains("NO cgroup (") && line.contains("netns fresh") && line.contains("landlock ABI"), "{line}");
    s.cli_ok("owner", &["logout"], None, 0);
    s.stop();
}

/// A broker killed with SIGKILL cannot remove its cgroups; the next
/// broker removes the dead one's subtree at its first session.
#[test]
fn a_crashed_brokers_cgroups_are_removed_by_the_next_one() {
    let own = Cgroup::own(Path::new(cgroup::DEFAULT_ROOT)).expect("a usable cgroup on this host");
    let s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--name", "k"], None, 0);
    let broker = pid_of(&s, "capvisor-broker");
    let stale = own.at(&format!("capvisor-{broker}"));
    // SAFETY: kill(2) on a pid of ours.
    assert_eq!(unsafe { libc::kill(broker as i32, libc::SIGKILL) }, 0);
    let (status, left, log) = s.wait_for_exit();
    assert!(!status.success() && left.is_empty(), "{left:?}\n{log}");
    assert!(stale.dirs().iter().all(|d| d.exists()), "a killed broker leaves its subtree");

    let s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    wait_gone(&stale, "the dead broker's");
    s.cli_ok("owner", &["logout"], None, 0);
    s.stop();
}
