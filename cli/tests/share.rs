//! Delegation end to end (issue 10): `capvisor share` / `login
//! --token-stdin` / `shares` / `revoke` through a real `capvisor serve`
//! and a real `debian` guest under QEMU. A share narrowed to python3 with
//! read-only files runs python3 and nothing else, in another config dir;
//! a sub-share dies with its parent; revoking cuts a holder streaming
//! output, while the grantor and another holder keep working; the token
//! stops redeeming; expiry and a call budget end shares on their own; the
//! audit log carries the chain.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Exit codes of the CLI (cli/src/main.rs).
const DENIED: i32 = 10;
const NOT_FOUND: i32 = 11;
const STALE: i32 = 14;

/// `who` shares with `args` and returns (grant id, token).
fn share(s: &Server, who: &str, args: &[&str]) -> (String, String) {
    let mut all = vec!["share"];
    all.extend_from_slice(args);
    let o = s.cli_ok(who, &all, None, 0);
    let token = stdout(&o).trim().to_string();
    let err = stderr(&o);
    let id = err.split_whitespace().skip_while(|w| *w != "grant").nth(1).unwrap_or_else(|| panic!("{err}"));
    (id.to_string(), token)
}

/// `who`'s grants as `shares --json` prints them.
fn grants(s: &Server, who: &str) -> Vec<serde_json::Value> {
    let o = s.cli_ok(who, &["shares", "--json"], None, 0);
    stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn code(s: &Server, who: &str, args: &[&str]) -> i32 {
    s.cli(who, args, None).status.code().unwrap()
}

#[test]
fn a_share_allows_exactly_its_narrowing_until_revoked_and_is_audited_by_chain() {
    let s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--image", "debian", "--name", "box"], None, 0);
    s.cli_ok("owner", &["vm", "exec", "box", "--", "sh", "-c", "mkdir -p /work && echo hello > /work/x"], None, 0);

    // Narrowed to python3 with read-only files, shareable onward.
    let (outer, token) = share(
        &s,
        "owner",
        &["box", "--exec", "python3", "--files", "ro", "--ttl", "10m", "--label", "agent", "--reshare"],
    );
    assert!(outer.starts_with('g') && token.len() == 43, "{outer} {token}");
    s.cli_ok("agent", &["login", "--token-stdin"], Some(format!("{token}\n").as_bytes()), 0);
    let who = stdout(&s.cli_ok("agent", &["whoami"], None, 0));
    assert!(who.contains(&format!("grant:{outer}")) && who.contains("delegate"), "{who}");
    let caps = stdout(&s.cli_ok("agent", &["caps"], None, 0));
    let names: Vec<&str> = caps.lines().skip(1).filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(names, ["box", "shares"], "{caps}");

    let o = s.cli_ok("agent", &["vm", "exec", "box", "--", "python3", "-c", "print(6*7)"], None, 0);
    assert_eq!(stdout(&o), "42\n");
    let o = s.cli_ok("agent", &["vm", "exec", "box", "--", "sh", "-c", "id"], None, DENIED);
    assert!(stderr(&o).contains("may not run \"sh\""), "{}", stderr(&o));
    let local = s.dir.path().join("evil");
    std::fs::write(&local, b"overwritten").unwrap();
    s.cli_ok("agent", &["vm", "cp", local.to_str().unwrap(), "box:/work/x"], None, DENIED);
    let back = s.dir.path().join("x.copy");
    s.cli_ok("agent", &["vm", "cp", "box:/work/x", back.to_str().unwrap()], None, 0);
    assert_eq!(std::fs::read(&back).unwrap(), b"hello\n", "reading works, and the write never happened");
    s.cli_ok("agent", &["vm", "stop", "box"], None, DENIED);
    s.cli_ok("agent", &["vm", "rm", "box"], None, NOT_FOUND);
    s.cli_ok("agent", &["vm", "list"], None, NOT_FOUND);
    let listed = stdout(&s.cli_ok("owner", &["vm", "list"], None, 0));
    assert!(listed.lines().any(|l| l.starts_with("box") && l.contains("running")), "{listed}");

    // The holder shares onward: it cannot widen (sh stays denied, the ttl
    // is cut to the parent's).
    let (inner, sub_token) = share(
        &s,
        "agent",
        &["box", "--exec", "python3", "--exec", "sh", "--files", "rw", "--ttl", "30d", "--label", "sub"],
    );
    s.cli_ok("sub", &["login", "--token-stdin"], Some(sub_token.as_bytes()), 0);
    s.cli_ok("sub", &["vm", "exec", "box", "--", "python3", "-c", "print(1)"], None, 0);
    s.cli_ok("sub", &["vm", "exec", "box", "--", "sh", "-c", "true"], None, DENIED);
    s.cli_ok("sub", &["vm", "cp", local.to_str().unwrap(), "box:/work/x"], None, DENIED);
    s.cli_ok("sub", &["shares"], None, NOT_FOUND);
    let theirs = grants(&s, "agent");
    assert_eq!(theirs.len(), 1, "the holder sees only its own: {theirs:?}");
    let mine = grants(&s, "owner");
    let exp = |id: &str| mine.iter().find(|g| g["id"] == id).unwrap()["expiresAtMs"].as_i64().unwrap();
    assert!(exp(&inner) <= exp(&outer), "a sub-share never outlives its parent: {mine:?}");
    assert_eq!(mine.iter().find(|g| g["id"] == inner.as_str()).unwrap()["parent"], outer.as_str());

    // Another holder of the same VM, through another grant.
    let (_other, other_token) = share(&s, "owner", &["box", "--exec", "python3", "--ttl", "10m", "--label", "other"]);
    s.cli_ok("other", &["login", "--token-stdin"], Some(other_token.as_bytes()), 0);

    // A grant to a named principal: no token; it appears in bob's CapSet.
    s.cli_ok(
        "owner",
        &["account", "add", "bob", "--profile", "user", "--password-stdin"],
        Some(b"correct horse battery\n"),
        0,
    );
    let (for_bob, none) = share(&s, "owner", &["box", "--exec", "python3", "--ttl", "10m", "--to", "password:bob"]);
    assert_eq!(none, "", "no token for a principal grant");
    s.cli_ok("bob", &["login", "--user", "bob", "--password-stdin"], Some(b"correct horse battery\n"), 0);
    let caps = stdout(&s.cli_ok("bob", &["caps"], None, 0));
    assert!(caps.lines().any(|l| l.starts_with("box ") && l.contains(&for_bob)), "{caps}");
    let o = s.cli_ok("bob", &["vm", "exec", "cap:box", "--", "python3", "-c", "print(5)"], None, 0);
    assert_eq!(stdout(&o), "5\n");
    s.cli_ok("bob", &["vm", "exec", "cap:box", "--", "sh", "-c", "true"], None, DENIED);
    s.cli_ok("owner", &["revoke", &for_bob], None, 0);
    s.cli_ok("bob", &["vm", "exec", "cap:box", "--", "python3", "-c", "print(5)"], None, NOT_FOUND);

    // The holder streams output from a long exec; revoke while it runs.
    let mut holder = Command::new(bin_dir().join("capvisor"))
        .args(["vm", "exec", "box", "--", "python3", "-u", "-c"])
        .arg("import time\nwhile True:\n    print('tick')\n    time.sleep(0.05)")
        .env("CAPVISOR_SOCKET", &s.socket)
        .env("CAPVISOR_CONFIG_DIR", s.config_dir("agent"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "tick", "the holder streams");
    let t0 = Instant::now();
    s.cli_ok("owner", &["revoke", &outer], None, 0);
    let revoked_at = t0.elapsed();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = holder.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the holder never saw the revocation");
        std::thread::sleep(Duration::from_millis(5));
    };
    eprintln!("revoke returned after {revoked_at:?}; the holder exited {:?} after", t0.elapsed());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut holder.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(STALE), "{err}");
    s.cli_ok("agent", &["vm", "exec", "box", "--", "python3", "-c", "print(1)"], None, STALE);
    s.cli_ok("sub", &["vm", "exec", "box", "--", "python3", "-c", "print(1)"], None, STALE);
    // The grantor and the other holder keep working.
    s.cli_ok("other", &["vm", "exec", "box", "--", "python3", "-c", "print(2)"], None, 0);
    let o = s.cli_ok("owner", &["vm", "exec", "box", "--", "sh", "-c", "pgrep -c -f 'while [T]rue' || true"], None, 0);
    assert_eq!(stdout(&o).trim(), "0", "the holder's process was killed with its grant");
    // The token no longer redeems.
    s.cli_ok("again", &["login", "--token-stdin"], Some(token.as_bytes()), STALE);
    s.cli_ok("again", &["login", "--token-stdin"], Some(b"not-a-token\n"), STALE);
    let mine = grants(&s, "owner");
    let state = |id: &str| mine.iter().find(|g| g["id"] == id).unwrap()["state"].as_str().unwrap().to_string();
    assert_eq!((state(&outer), state(&inner)), ("ended".into(), "ended".into()));

    // Expiry ends a share on its own; so does a call budget.
    let (_, short) = share(&s, "owner", &["box", "--exec", "python3", "--ttl", "3s", "--label", "short"]);
    s.cli_ok("short", &["login", "--token-stdin"], Some(short.as_bytes()), 0);
    s.cli_ok("short", &["vm", "exec", "box", "--", "python3", "-c", "pass"], None, 0);
    std::thread::sleep(Duration::from_millis(3500));
    s.cli_ok("short", &["vm", "exec", "box", "--", "python3", "-c", "pass"], None, STALE);
    let (_, counted) = share(&s, "owner", &["box", "--exec", "python3", "--ttl", "10m", "--budget", "3"]);
    s.cli_ok("counted", &["login", "--token-stdin"], Some(counted.as_bytes()), 0);
    let codes: Vec<i32> =
        (0..5).map(|_| code(&s, "counted", &["vm", "exec", "box", "--", "python3", "-c", "pass"])).collect();
    assert_eq!(codes, [0, 0, 0, DENIED, DENIED], "three calls, then the budget is spent");

    // Audit by chain: the holder's exec names its grant, the sub-holder's both.
    let o = s.cli_ok("owner", &["audit", "--json", "--grant", &outer, "--action", "vm.exec"], None, 0);
    let rows: Vec<serde_json::Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let chain = |r: &serde_json::Value| -> Vec<String> {
        r["grants"]
            .as_array()
            .map(|a| a.iter().map(|g| g["id"].as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    assert!(rows.iter().any(|r| chain(r) == [outer.clone()] && r["principal"] == format!("grant:{outer}")), "{rows:?}");
    assert!(rows.iter().any(|r| chain(r) == [outer.clone(), inner.clone()] && r["outcome"] == "ok"), "{rows:?}");
    assert!(rows.iter().all(|r| chain(r).contains(&outer)), "{rows:?}");
    let o = s.cli_ok("owner", &["audit", "--json", "--action", "grant.revoke"], None, 0);
    assert!(stdout(&o).contains(&inner), "the sub-share's end is recorded: {}", stdout(&o));
    s.cli_ok("owner", &["logout"], None, 0);
    s.cli_ok("other", &["vm", "exec", "box", "--", "python3", "-c", "pass"], None, STALE);
    // Tokens are sturdy refs: in no log and nowhere in the state directory.
    for t in [&token, &sub_token, &other_token] {
        assert!(!s.log().contains(t.as_str()), "a token in serve.log");
        let grep = Command::new("grep").args(["-rqF", t.as_str()]).arg(&s.state).status().unwrap();
        assert_eq!(grep.code(), Some(1), "a token under {}", s.state.display());
    }
}

#[test]
fn a_shared_factory_creates_bounded_vms_that_only_its_holder_sees() {
    let s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--name", "mine"], None, 0);
    s.cli_ok("owner", &["volume", "create", "data", "--size", "16"], None, 0);
    s.cli_ok("owner", &["volume", "create", "private", "--size", "16"], None, 0);
    let (id, token) = share(
        &s,
        "owner",
        &[
            "--factory",
            "--max-vms",
            "1",
            "--image",
            "base",
            "--exec-any",
            "--files",
            "rw",
            "--stop",
            "--ttl",
            "10m",
            "--attach-volume",
            "data",
            "--volumes-ro",
            "--with-volumes",
            "--engine",
            "qemu",
        ],
    );
    s.cli_ok("fac", &["login", "--token-stdin"], Some(token.as_bytes()), 0);
    let caps = stdout(&s.cli_ok("fac", &["caps"], None, 0));
    assert!(caps.lines().any(|l| l.starts_with("vms") && l.contains("VmFactory")), "{caps}");
    // Volumes: only data, only read-only, list and get only.
    let vols = stdout(&s.cli_ok("fac", &["volume", "list"], None, 0));
    assert!(vols.contains("data") && !vols.contains("private"), "{vols}");
    s.cli_ok("fac", &["volume", "create", "mine", "--size", "16"], None, DENIED);
    s.cli_ok("fac", &["volume", "rm", "data"], None, DENIED);
    s.cli_ok("fac", &["vm", "create", "--name", "hv", "--volume", "data:/data"], None, DENIED);
    s.cli_ok("fac", &["vm", "create", "--name", "hv", "--volume", "private:/data:ro"], None, DENIED);
    s.cli_ok("fac", &["vm", "create", "--name", "h1", "--volume", "data:/data:ro"], None, 0);
    s.cli_ok("fac", &["vm", "exec", "h1", "--", "ls", "/data"], None, 0);
    s.cli_ok("fac", &["vm", "create", "--name", "h2"], None, 13);
    s.cli_ok("fac", &["vm", "create", "--name", "big", "--image", "debian"], None, DENIED);
    s.cli_ok("fac", &["vm", "create", "--name", "hk", "--engine", "kvm"], None, DENIED);
    let o = s.cli_ok("fac", &["vm", "exec", "h1", "--", "sh", "-c", "echo any program"], None, 0);
    assert_eq!(stdout(&o), "any program\n");
    let listed = stdout(&s.cli_ok("fac", &["vm", "list"], None, 0));
    assert!(listed.contains("h1") && !listed.contains("mine"), "{listed}");
    s.cli_ok("fac", &["vm", "exec", "mine", "--", "true"], None, NOT_FOUND);
    s.cli_ok("fac", &["vm", "rm", "mine"], None, NOT_FOUND);
    // Its VMs are the grantor's: they count against the grantor's quota and it sees them.
    let listed = stdout(&s.cli_ok("owner", &["vm", "list"], None, 0));
    assert!(listed.contains("h1") && listed.contains("mine"), "{listed}");
    s.cli_ok("fac", &["vm", "rm", "h1"], None, 0);
    s.cli_ok("fac", &["vm", "create", "--name", "h3"], None, 0);
    s.cli_ok("owner", &["revoke", &id], None, 0);
    s.cli_ok("fac", &["vm", "list"], None, STALE);
    s.cli_ok("owner", &["vm", "exec", "h3", "--", "true"], None, 0);
    // Every view carries its own expiry and call budget (here through `call`).
    let narrow = ["call", "volumes.narrow", "volumeNames=[\"data\"]", "callBudget=2", "--as", "two"];
    s.cli_ok("owner", &narrow, None, 0);
    let codes: Vec<i32> = (0..3).map(|_| code(&s, "owner", &["call", "two.list"])).collect();
    assert_eq!(codes, [0, 0, DENIED], "two calls, then the budget is spent");
    s.cli_ok("owner", &["call", "volumes.narrow", "volumeNames=[\"data\"]", "expiresAtMs=1", "--as", "old"], None, 0);
    s.cli_ok("owner", &["call", "old.list"], None, DENIED);
}

/// Starts `capvisor ARGS` as `who` in the background (stdout piped).
fn spawn(s: &Server, who: &str, args: &[&str]) -> std::process::Child {
    Command::new(bin_dir().join("capvisor"))
        .args(args)
        .env("CAPVISOR_SOCKET", &s.socket)
        .env("CAPVISOR_CONFIG_DIR", s.config_dir(who))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `owner`'s `approvals` shows an exec whose command is `cmd`; its id.
fn exec_waiting(s: &Server, cmd: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = stdout(&s.cli_ok("owner", &["approvals"], None, 0));
        let execs = out.split("EXEC ID").nth(1).unwrap_or("");
        if let Some(l) = execs.lines().find(|l| l.trim_end().ends_with(cmd)) {
            return l.split_whitespace().next().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no exec of {cmd:?} waits: {out}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_ask_share_runs_each_exec_only_once_the_grantor_decides() {
    let s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--name", "box"], None, 0);
    let (id, token) = share(&s, "owner", &["box", "--exec", "echo", "--ask", "--ttl", "10m", "--label", "asked"]);
    s.cli_ok("agent", &["login", "--token-stdin"], Some(token.as_bytes()), 0);

    let held = spawn(&s, "agent", &["vm", "exec", "box", "--", "echo", "once"]);
    let exec = exec_waiting(&s, "echo once");
    let listed = stdout(&s.cli_ok("owner", &["approvals"], None, 0));
    assert!(listed.contains(&format!("asked ({id})")), "the grant is named: {listed}");
    s.cli_ok("owner", &["approve", &exec], None, 0);
    let out = held.wait_with_output().unwrap();
    assert_eq!((out.status.code(), stdout(&out)), (Some(0), "once\n".to_string()));

    let held = spawn(&s, "agent", &["vm", "exec", "box", "--", "echo", "no"]);
    let exec = exec_waiting(&s, "echo no");
    s.cli_ok("owner", &["approve", &exec, "--deny"], None, 0);
    let out = held.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(DENIED), "{}", stderr(&out));
    assert!(stderr(&out).contains("denied"), "{}", stderr(&out));
    // A decided id is gone.
    s.cli_ok("owner", &["approve", &exec], None, NOT_FOUND);

    let held = spawn(&s, "agent", &["vm", "exec", "box", "--", "echo", "always"]);
    let exec = exec_waiting(&s, "echo always");
    s.cli_ok("owner", &["approve", &exec, "--always"], None, 0);
    assert_eq!(held.wait_with_output().unwrap().status.code(), Some(0));
    // From now on echo runs through that cap without asking.
    let o = s.cli_ok("agent", &["vm", "exec", "box", "--", "echo", "again"], None, 0);
    assert_eq!(stdout(&o), "again\n");
    let o = s.cli_ok("owner", &["audit", "--json", "--action", "exec.approve"], None, 0);
    let outcomes: Vec<String> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["outcome"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(outcomes, ["ok", "ok", "notFound", "ok"], "every decision is audited");
}

#[test]
fn netlog_and_netpolicy_views_show_only_what_was_shared() {
    let s = Server::start(Some(&capvisor_manifest::DEFAULT_TOML.replace("egress = false", "egress = true")));
    s.cli_ok("owner", &["login"], None, 0);
    for vm in ["a", "b"] {
        s.cli_ok("owner", &["vm", "create", "--name", vm], None, 0);
        // A name no rule allows: refused at DNS, recorded in the NetLog under this VM.
        s.cli("owner", &["vm", "exec", vm, "--", "wget", "-q", "-O", "-", &format!("http://from-{vm}.test/")], None);
    }
    let all = stdout(&s.cli_ok("owner", &["net", "log"], None, 0));
    assert!(all.contains("from-a.test") && all.contains("from-b.test"), "{all}");
    let (_, token) = share(&s, "owner", &["a", "--exec", "wget", "--with-netlog", "--with-netpolicy", "--ttl", "10m"]);
    s.cli_ok("agent", &["login", "--token-stdin"], Some(token.as_bytes()), 0);
    let caps = stdout(&s.cli_ok("agent", &["caps"], None, 0));
    let names: Vec<&str> = caps.lines().skip(1).filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(names, ["a", "netlog", "netpolicy"], "{caps}");
    let seen = stdout(&s.cli_ok("agent", &["net", "log"], None, 0));
    assert!(seen.contains("from-a.test") && !seen.contains("from-b.test"), "only a's flows: {seen}");
    let seen = stdout(&s.cli_ok("agent", &["net", "log", "--vm", "b"], None, 0));
    assert!(!seen.contains("from-b.test"), "asking for b shows nothing: {seen}");
    // New flows of a show up; the rules can be read, not changed.
    s.cli("agent", &["vm", "exec", "a", "--", "wget", "-q", "-O", "-", "http://later.test/"], None);
    assert!(stdout(&s.cli_ok("agent", &["net", "log"], None, 0)).contains("later.test"));
    s.cli_ok("agent", &["net", "rules"], None, 0);
    s.cli_ok("agent", &["net", "rules", "--allow", "evil.test"], None, DENIED);
    let rules = stdout(&s.cli_ok("owner", &["net", "rules"], None, 0));
    assert!(!rules.contains("evil.test"), "{rules}");
}
