//! A small run of the reliability suite (`capvisor-soak`, docs/soak.md) in
//! `make test`: 20 sessions under the hostile flood, 3 VMs with exec
//! traffic, kill -9 of a worker; the figures that must hold are checked
//! from its JSON output.

mod common;
use common::*;
use std::process::Command;

#[test]
fn small_soak_run_keeps_every_must_hold_figure() {
    for b in ["capvisor-gateway", "capvisor-broker", "capvisor-worker", "capvisor-vmm", "capvisor-guest-init"] {
        assert!(bin_dir().join(b).exists(), "{b} is not built: run `cargo build --workspace` first");
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("soak.json");
    let out = Command::new(env!("CARGO_BIN_EXE_capvisor-soak"))
        .args(["--sessions", "20", "--concurrency", "8", "--vms", "3", "--exec-secs", "6", "--kill", "worker"])
        .args(["--deadline-secs", "480", "--json"])
        .arg(&json)
        .arg("--bin-dir")
        .arg(bin_dir())
        .env("CAPVISOR_GUEST_INIT", bin_dir().join("capvisor-guest-init"))
        .output()
        .unwrap();
    let report = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let fig: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap_or_default())
        .unwrap_or_else(|e| panic!("no JSON figures ({e}):\n{report}"));
    let n = |k: &str| fig[k].as_u64().unwrap_or_else(|| panic!("{k} missing:\n{report}"));

    assert_eq!(fig["processes_left"].as_array().map(|a| a.len()), Some(0), "processes left:\n{report}");
    assert!(n("audit_expected") > 40, "too few audit events expected:\n{report}");
    assert_eq!(n("audit_lost"), 0, "audit lines lost:\n{report}");
    assert_eq!(n("sessions_served"), 20, "{report}");

    // Every error seen is a typed outcome the run provoked on purpose.
    assert_eq!(n("unexpected_errors"), 0, "{report}");
    let allowed = ["notFound", "notRunning", "disconnected", "staleSession", "unavailable"];
    let errors = fig["errors"].as_array().unwrap();
    for e in errors {
        let code = e[0].as_str().unwrap();
        assert!(allowed.contains(&code) && e[1] == true, "unexpected error {e}:\n{report}");
    }
    // The missing-VM lookup of each session came back as notFound.
    assert!(errors.iter().any(|e| e[0] == "notFound" && e[2].as_u64() >= Some(20)), "{report}");

    // The owner kept logging in while the flood ran.
    assert!(n("owner_probe_tries") >= 1, "{report}");
    assert_eq!(n("owner_probe_ok"), n("owner_probe_tries"), "owner locked out during the flood:\n{report}");

    // The flood was met: bad connections closed without a byte, idle ones
    // bounded, wrong passwords denied.
    let h = &fig["hostile"];
    let hn = |k: &str| h[k].as_u64().unwrap_or_else(|| panic!("hostile.{k} missing:\n{report}"));
    assert_eq!(hn("closed_silently"), hn("garbage") + hn("oversized"), "{report}");
    assert!(hn("garbage") >= 5 && hn("oversized") >= 5, "{report}");
    assert_eq!(hn("bogus_attach_refused"), hn("bogus_attach"), "{report}");
    assert_eq!(hn("idle_never_closed"), 0, "{report}");
    if fig["hostile_other_uid"] == true {
        assert!(
            hn("idle_closed_at_once") >= 16,
            "the per-uid bound did not close the extra idle connections:\n{report}"
        );
    }
    assert!(h["wrong_passwords"]["denied"].as_u64() >= Some(1), "{report}");
    assert_eq!(h["misbehaved"].as_array().map(|a| a.len()), Some(0), "{report}");

    // 3 VMs ran at once; kill -9 of a worker ended only its session.
    assert_eq!(n("vms_running_at_once"), 3, "{report}");
    assert!(n("execs_ok") > 0, "{report}");
    assert_eq!(fig["exec_failures_unaffected"].as_array().map(|a| a.len()), Some(0), "{report}");
    let kills = fig["kills"].as_array().unwrap();
    assert_eq!(kills.len(), 1, "{report}");
    assert!(kills[0][0] == "worker" && kills[0][2] == true, "{report}");
    assert_eq!(fig["serve_stopped_by_sigterm"], true, "{report}");

    assert!(out.status.success(), "capvisor-soak failed:\n{report}");
}
