//! `capvisor schema` end to end: the embedded schema without a server, and
//! a real `capvisor serve`'s CapSet shown method by method after login
//! (no guest boots: only `CapSet.list` is called).

mod common;
use capvisor_schema::reflect::schema;
use common::*;
use std::process::{Command, Stdio};

/// The lines of `text` from the header line starting with `head` up to the
/// next line that is not indented (the next interface).
fn block<'a>(text: &'a str, head: &str) -> Vec<&'a str> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with(head));
    let Some(first) = lines.next() else { return Vec::new() };
    std::iter::once(first).chain(lines.take_while(|l| l.starts_with(' '))).collect()
}

#[test]
fn schema_all_needs_no_server_nor_login() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(bin_dir().join("capvisor"))
            .args(args)
            .env("CAPVISOR_SOCKET", dir.path().join("no-server.sock"))
            .env("CAPVISOR_CONFIG_DIR", dir.path().join("config"))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = run(&["schema", "--all"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let mut n = 0;
    for i in schema().interfaces() {
        let b = block(&out, &format!("{} ({})", i.name, i.file));
        let methods: Vec<_> = b[1..].iter().map(|l| l.trim_start().split('(').next().unwrap()).collect();
        let want: Vec<_> = i.methods.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(methods, want, "{}:\n{}", i.name, b.join("\n"));
        n += 1;
    }
    assert!(n >= 20, "{n} interfaces");
    // --json: the same interfaces, each method with a params JSON Schema.
    let o = run(&["schema", "--all", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let all = v["interfaces"].as_array().unwrap();
    assert_eq!(all.len(), n);
    for i in all {
        for m in i["methods"].as_array().unwrap() {
            assert_eq!(m["paramsSchema"]["type"], "object", "{}.{}", i["name"], m["name"]);
        }
    }
    // An interface by name needs no login either; a cap name does.
    let o = run(&["schema", "Vm"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("exec(spec: ExecSpec, stdout: ByteSink, stderr: ByteSink) -> (process: Process)"));
    assert_eq!(run(&["schema", "vms"]).status.code(), Some(21), "not logged in");
    assert_eq!(run(&["schema"]).status.code(), Some(21), "not logged in");
}

#[test]
fn schema_lists_every_method_of_every_capset_entry() {
    let s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    // The CapSet as `capvisor caps` shows it: name, interface, id.
    let caps_out = stdout(&s.cli_ok("owner", &["caps"], None, 0));
    let caps: Vec<(String, String, u64)> = caps_out
        .lines()
        .skip(1)
        .map(|l| {
            let w: Vec<_> = l.split_whitespace().collect();
            (w[0].to_string(), w[1].to_string(), u64::from_str_radix(w[2].trim_start_matches("0x"), 16).unwrap())
        })
        .collect();
    assert!(caps.iter().any(|c| c.0 == "vms"), "{caps_out}");

    let out = stdout(&s.cli_ok("owner", &["schema"], None, 0));
    let mut methods = 0;
    for (name, iface, id) in &caps {
        let i = schema().interface(*id).unwrap_or_else(|| panic!("{name}: interface {id:#x} not embedded"));
        assert_eq!(&i.name, iface);
        let b = block(&out, &format!("{name}: {iface} ("));
        assert!(!b.is_empty(), "{name} missing from:\n{out}");
        let shown: Vec<_> = b[1..].iter().map(|l| l.trim_start().split('(').next().unwrap()).collect();
        let want: Vec<_> = i.methods.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(shown, want, "{name}");
        methods += shown.len();
    }
    assert!(methods >= 20, "{methods} methods over {} caps", caps.len());
    // --json: the same caps, each with its interface's methods and their params schema.
    let v: serde_json::Value =
        serde_json::from_slice(&s.cli_ok("owner", &["schema", "--json"], None, 0).stdout).unwrap();
    let entries = v["caps"].as_array().unwrap();
    assert_eq!(entries.len(), caps.len());
    for (e, (name, _, id)) in entries.iter().zip(&caps) {
        assert_eq!(e["name"], name.as_str());
        assert_eq!(e["interfaceId"], format!("{id:#018x}"));
        let ms = e["interface"]["methods"].as_array().unwrap();
        assert_eq!(ms.len(), schema().interface(*id).unwrap().methods.len(), "{name}");
        assert!(ms.iter().all(|m| m["paramsSchema"]["type"] == "object"), "{name}");
    }

    // One cap in full, with the interfaces its results return.
    let vms = stdout(&s.cli_ok("owner", &["schema", "vms"], None, 0));
    assert!(vms.starts_with("vms: interface VmFactory (capvisor.capnp"), "{vms}");
    assert!(vms.contains("create(spec: VmSpec) -> (vm: Vm) @0"), "{vms}");
    assert!(vms.contains("param spec: VmSpec"));
    assert!(vms.contains("engine: Engine"));
    assert!(vms.contains("\ninterface Vm (capvisor.capnp"), "Vm shown: {vms}");
    assert!(vms.contains("exec(spec: ExecSpec, stdout: ByteSink, stderr: ByteSink) -> (process: Process) @1"));
    assert!(vms.contains("argv: List(Text)  # argv[0] is looked up in PATH; must not be empty"));
    assert_eq!(vms.matches("\ninterface Vm (").count(), 1, "Vm once");
    assert_eq!(vms.matches("\ninterface ByteSink (").count(), 1, "ByteSink once");

    let v: serde_json::Value =
        serde_json::from_slice(&s.cli_ok("owner", &["schema", "vms", "--json"], None, 0).stdout).unwrap();
    assert_eq!(v["cap"], "vms");
    let create = &v["interface"]["methods"][0];
    assert_eq!(create["name"], "create");
    assert_eq!(create["paramsSchema"]["properties"]["spec"]["properties"]["engine"]["enum"][1], "qemu");
    assert!(v["reachable"].as_array().unwrap().iter().any(|i| i["name"] == "Vm"));

    // A name that is neither a cap nor an interface: notFound (11).
    let o = s.cli_ok("owner", &["schema", "nosuch"], None, 11);
    assert!(stderr(&o).contains("no cap named \"nosuch\""), "{}", stderr(&o));
    s.stop();
}
