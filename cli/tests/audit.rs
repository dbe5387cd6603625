//! The audit log, queried end to end (issue 10): `capvisor audit` through
//! a real `capvisor serve` and real guests under QEMU. Records carry the
//! VM they concern; the query filters on it and on time; a `user`
//! principal holds no `audit` cap; the SQLite index is rebuilt from the
//! JSONL after it is deleted, giving the same rows.

mod common;
use common::*;

/// `capvisor audit ARGS --json` as `who`: one JSON object per record.
fn query(s: &Server, who: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["audit", "--json"];
    all.extend_from_slice(args);
    let o = s.cli_ok(who, &all, None, 0);
    stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

fn actions(rows: &[serde_json::Value]) -> Vec<&str> {
    rows.iter().map(|r| r["action"].as_str().unwrap()).collect()
}

#[test]
fn audit_queries_by_vm_and_time_owner_only_and_survive_a_deleted_index() {
    let mut s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    let caps = stdout(&s.cli_ok("owner", &["caps"], None, 0));
    assert!(caps.lines().any(|l| l.starts_with("audit") && l.contains("Audit")), "{caps}");
    s.cli_ok("owner", &["volume", "create", "data", "--size", "16"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--name", "x", "--volume", "data:/data"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--name", "y"], None, 0);
    s.cli_ok("owner", &["vm", "exec", "x", "--", "true"], None, 0);
    s.cli_ok("owner", &["vm", "exec", "y", "--", "true"], None, 0);

    let x = query(&s, "owner", &["--vm", "x"]);
    let xa = actions(&x);
    assert!(xa.contains(&"vm.create") && xa.contains(&"vm.exec"), "{x:?}");
    // The broker's own record of the volume lease names the VM too.
    assert!(xa.contains(&"volume.attach"), "{x:?}");
    assert!(x.iter().all(|r| r["vm"] == "x"), "only x's records: {x:?}");
    let exec = x.iter().find(|r| r["action"] == "vm.exec").unwrap();
    assert_eq!((exec["outcome"].as_str(), exec["detail"].as_str()), (Some("ok"), Some("true")));
    assert!(exec["principal"].as_str().unwrap().starts_with("local:"), "{exec}");
    assert!(exec["time"].as_str().unwrap().ends_with('Z'), "{exec}");
    // Oldest first.
    let ts: Vec<i64> = x.iter().map(|r| r["ts_ms"].as_i64().unwrap()).collect();
    assert!(ts.windows(2).all(|w| w[0] <= w[1]), "{ts:?}");
    // y's records are y's.
    let y = query(&s, "owner", &["--vm", "y"]);
    assert!(actions(&y).contains(&"vm.exec") && y.iter().all(|r| r["vm"] == "y"), "{y:?}");
    // A window in the future holds nothing; --action narrows.
    assert!(query(&s, "owner", &["--since", "2100-01-01T00:00:00Z"]).is_empty());
    let creates = query(&s, "owner", &["--action", "vm.create", "--limit", "1"]);
    assert_eq!((creates.len(), creates[0]["vm"].as_str()), (1, Some("y")), "the newest: {creates:?}");
    // The table names the columns and the VM.
    let table = stdout(&s.cli_ok("owner", &["audit", "--vm", "x", "--action", "vm.exec"], None, 0));
    assert!(table.starts_with("TIME") && table.contains("vms.exec") && table.contains(" x "), "{table}");
    // The queries themselves are in the log.
    assert!(!query(&s, "owner", &["--action", "audit.query"]).is_empty());

    // A user-profile principal holds no audit cap: notFound (11), no rows.
    s.cli_ok("owner", &["account", "add", "bob", "--profile", "user", "--password-stdin"], Some(b"bob-pass-1\n"), 0);
    s.cli_ok("bob", &["login", "--user", "bob", "--password-stdin"], Some(b"bob-pass-1\n"), 0);
    let o = s.cli_ok("bob", &["audit", "--vm", "x"], None, 11);
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));
    assert!(stderr(&o).contains("no capability named \"audit\""), "{}", stderr(&o));
    // The refused lookup is audited under bob.
    let denied = query(&s, "owner", &["--principal", "password:bob", "--action", "capset.get"]);
    assert!(denied.iter().any(|r| r["cap"] == "audit" && r["outcome"] == "notFound"), "{denied:?}");

    // Delete the index; after a restart it is rebuilt from the JSONL and
    // answers the same (records up to now: the restart adds its own).
    let until =
        (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64).to_string();
    let before = query(&s, "owner", &["--vm", "x", "--until", &until]);
    let rebuilds = |s: &Server| s.log().matches("rebuilding the audit index").count();
    assert_eq!(rebuilds(&s), 1, "built once, at the first start");
    // A clean restart keeps the index current: no rebuild.
    s.restart();
    s.cli_ok("owner", &["login"], None, 0);
    assert_eq!(rebuilds(&s), 1, "{}", s.log());
    assert_eq!(query(&s, "owner", &["--vm", "x", "--until", &until]), before);
    for f in ["audit.sqlite", "audit.sqlite-wal", "audit.sqlite-shm"] {
        let _ = std::fs::remove_file(s.state.join(f));
    }
    s.restart();
    s.cli_ok("owner", &["login"], None, 0);
    let after = query(&s, "owner", &["--vm", "x", "--until", &until]);
    assert_eq!(after, before);
    assert_eq!(rebuilds(&s), 2, "rebuilt after the deletion: {}", s.log());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(s.state.join("audit.sqlite")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    s.stop();
}
