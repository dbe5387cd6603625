//! End to end: a real `capvisor serve`, the real CLI, real Linux guests
//! booted under QEMU (TCG here), every call through capabilities.

mod common;
use capvisor_client::{connect, ops};
use common::*;

fn saved_token(s: &Server, who: &str) -> String {
    let saved = std::fs::read_to_string(s.config_dir(who).join("session.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&saved).unwrap()["token"].as_str().unwrap().to_string()
}

/// The embedded default manifest with the `user` bundle cut to one VM, so
/// the quota path is reached after a single boot.
fn manifest() -> String {
    capvisor_manifest_default().replace("max_vms = 2", "max_vms = 1")
}

fn capvisor_manifest_default() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifest/default.toml")).unwrap()
}

/// VM names from `capvisor vm list` output (first column, header skipped).
fn vm_names(list: &str) -> Vec<String> {
    list.lines().skip(1).filter_map(|l| l.split_whitespace().next().map(str::to_string)).collect()
}

#[test]
fn vm_lifecycle_isolation_quota_and_logout() {
    let m = manifest();
    assert!(m.contains("max_vms = 1"));
    let s = Server::start(Some(&m));

    // Owner logs in by peer credentials and sees its caps.
    let out = s.cli_ok("owner", &["login"], None, 0);
    assert!(stderr(&out).contains("profile owner"), "{}", stderr(&out));
    let caps = stdout(&s.cli_ok("owner", &["caps"], None, 0));
    assert!(caps.contains("vms") && caps.contains("VmFactory") && caps.contains("accounts"), "{caps}");

    // Boot a real guest.
    s.cli_ok("owner", &["vm", "create", "--name", "a"], None, 0);
    let list = stdout(&s.cli_ok("owner", &["vm", "list"], None, 0));
    assert_eq!(vm_names(&list), ["a"], "{list}");
    assert!(list.contains("running"), "{list}");

    // uname -r comes back: the guest's kernel, the same one guest-init reported at boot.
    let rel = stdout(&s.cli_ok("owner", &["vm", "exec", "a", "--", "uname", "-r"], None, 0)).trim().to_string();
    assert!(rel.starts_with("6.") && rel.len() > 4, "unexpected kernel release {rel:?}");
    assert!(list.contains(&rel), "vm list {list:?} lacks {rel}");

    // Exit codes, stdout/stderr separation.
    s.cli_ok("owner", &["vm", "exec", "a", "--", "sh", "-c", "exit 3"], None, 3);
    let o = s.cli_ok("owner", &["vm", "exec", "a", "--", "sh", "-c", "echo out; echo err >&2; exit 0"], None, 0);
    assert_eq!(stdout(&o), "out\n");
    assert!(stderr(&o).contains("err\n"), "{}", stderr(&o));

    // stdin round trip, small and large (crosses many 64 KiB chunks).
    let o = s.cli_ok("owner", &["vm", "exec", "a", "--", "cat"], Some(b"ping\n"), 0);
    assert_eq!(stdout(&o), "ping\n");
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let o = s.cli_ok("owner", &["vm", "exec", "a", "--", "cat"], Some(&big), 0);
    assert_eq!(o.stdout.len(), big.len());
    assert!(o.stdout == big, "stdin/stdout round trip corrupted data");

    // Files: write then read back, and the guest sees the same bytes.
    let local = s.dir.path().join("upload.bin");
    std::fs::write(&local, &big).unwrap();
    s.cli_ok("owner", &["vm", "cp", local.to_str().unwrap(), "a:/tmp/upload.bin"], None, 0);
    let o = s.cli_ok("owner", &["vm", "exec", "a", "--", "wc", "-c", "/tmp/upload.bin"], None, 0);
    assert!(stdout(&o).starts_with(&big.len().to_string()), "{}", stdout(&o));
    let back = s.dir.path().join("download.bin");
    s.cli_ok("owner", &["vm", "cp", "a:/tmp/upload.bin", back.to_str().unwrap()], None, 0);
    assert!(std::fs::read(&back).unwrap() == big, "file read back differs");
    let o = s.cli_ok("owner", &["vm", "cp", "a:/no/such/file", back.to_str().unwrap()], None, 11);
    assert!(stderr(&o).contains("notFound"), "{}", stderr(&o));

    // A second principal: a password account with the `user` profile.
    s.cli_ok("owner", &["account", "add", "bob", "--profile", "user", "--password-stdin"], Some(b"bob-secret-1\n"), 0);
    s.cli_ok("bob", &["login", "--user", "bob", "--password-stdin"], Some(b"bob-secret-1\n"), 0);
    let caps = stdout(&s.cli_ok("bob", &["caps"], None, 0));
    assert!(caps.contains("vms") && !caps.contains("accounts"), "{caps}");
    s.cli_ok("bob", &["account", "list"], None, 11);

    // Isolation: bob cannot see or reach the owner's VM.
    let list = stdout(&s.cli_ok("bob", &["vm", "list"], None, 0));
    assert!(vm_names(&list).is_empty(), "bob sees the owner's VM: {list}");
    s.cli_ok("bob", &["vm", "exec", "a", "--", "true"], None, 11);

    // Quotas: memory above the bundle's limit, then more VMs than allowed; nothing starts.
    let before = s.qemu_count();
    let o = s.cli_ok("bob", &["vm", "create", "--name", "big", "--memory-mib", "1024"], None, 13);
    assert!(stderr(&o).contains("quota"), "{}", stderr(&o));
    s.cli_ok("bob", &["vm", "create", "--name", "b"], None, 0);
    assert_eq!(s.qemu_count(), before + 1);
    s.cli_ok("bob", &["vm", "create", "--name", "c"], None, 13);
    assert_eq!(s.qemu_count(), before + 1, "a denied create started a VM");

    // Logout: bob's VM stops, his saved token is useless afterwards.
    let saved = std::fs::read(s.config_dir("bob").join("session.json")).unwrap();
    s.cli_ok("bob", &["logout"], None, 0);
    assert_eq!(s.qemu_count(), before, "bob's VM survived logout");
    s.cli_ok("bob", &["caps"], None, 21);
    std::fs::write(s.config_dir("bob").join("session.json"), &saved).unwrap();
    let o = s.cli_ok("bob", &["caps"], None, 14);
    assert!(stderr(&o).contains("staleSession"), "{}", stderr(&o));

    // An interactive pseudo-terminal through the library: input, resize, exit status.
    let token = saved_token(&s, "owner");
    capvisor_rpc::conn::run_local(async {
        let sess = connect::attach(&s.socket, &token).await.unwrap();
        let vm = ops::get_vm(&ops::vms(&sess), "a");
        // The pty has the size we asked for.
        let (out, out_rx) = capvisor_rpc::sink::CollectSink::client(1 << 20);
        let (err, _err_rx) = capvisor_rpc::sink::CollectSink::client(1 << 20);
        let req = ops::ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "stty size; tty".into()],
            pty: Some((24, 80)),
            ..Default::default()
        };
        let p = ops::exec(&vm, &req, out, err);
        assert_eq!(ops::wait(&p).await.unwrap(), ops::Exit::Code(0));
        let text = String::from_utf8_lossy(&out_rx.await.unwrap()).into_owned();
        assert!(text.contains("24 80") && text.contains("/dev/pts/"), "pty output: {text:?}");
        // Resize, then input, then the exit status.
        let (out, out_rx) = capvisor_rpc::sink::CollectSink::client(1 << 20);
        let (err, _err_rx) = capvisor_rpc::sink::CollectSink::client(1 << 20);
        let req = ops::ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "read line; stty size; echo got:$line; exit 5".into()],
            keep_stdin_open: true,
            pty: Some((24, 80)),
            ..Default::default()
        };
        let p = ops::exec(&vm, &req, out, err);
        ops::resize(&p, 30, 100).await.unwrap();
        ops::write_stdin(&p, b"hello\n").await.unwrap();
        assert_eq!(ops::wait(&p).await.unwrap(), ops::Exit::Code(5));
        let text = String::from_utf8_lossy(&out_rx.await.unwrap()).into_owned();
        assert!(text.contains("30 100") && text.contains("got:hello"), "pty output: {text:?}");
        // Killing a process reports the signal.
        let (out, _o) = capvisor_rpc::sink::CollectSink::client(1 << 20);
        let (err, _e) = capvisor_rpc::sink::CollectSink::client(1 << 20);
        let req = ops::ExecRequest { argv: vec!["sleep".into(), "100".into()], ..Default::default() };
        let p = ops::exec(&vm, &req, out, err);
        ops::kill(&p, 9).await.unwrap();
        assert_eq!(ops::wait(&p).await.unwrap(), ops::Exit::Signal(9));
    });

    // `vm shell` on a real terminal (util-linux `script` gives the CLI a pty).
    let o = s.cli_in_pty("owner", &["vm", "shell", "a"], b"echo shell-$((40+2)); exit 6\n");
    assert_eq!(o.status.code(), Some(6), "vm shell: {}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("shell-42"), "vm shell output: {}", stdout(&o));

    // Owner: stop, rm.
    s.cli_ok("owner", &["vm", "stop", "a"], None, 0);
    let list = stdout(&s.cli_ok("owner", &["vm", "list"], None, 0));
    assert!(list.contains("stopped"), "{list}");
    s.cli_ok("owner", &["vm", "exec", "a", "--", "true"], None, 19);
    s.cli_ok("owner", &["vm", "rm", "a"], None, 0);
    assert_eq!(s.qemu_count(), 0);
    s.cli_ok("owner", &["vm", "rm", "a"], None, 11);

    // One-shot run: create, exec, destroy.
    let o = s.cli_ok("owner", &["run", "--", "sh", "-c", "echo one-shot; exit 7"], None, 7);
    assert_eq!(stdout(&o), "one-shot\n");
    let list = stdout(&s.cli_ok("owner", &["vm", "list"], None, 0));
    assert!(vm_names(&list).is_empty(), "run left a VM behind: {list}");

    // Caps held across a logout: a running Process, the Vm, the factory all
    // answer staleSession, pending waits fail, and the VM is stopped.
    let token = saved_token(&s, "owner");
    capvisor_rpc::conn::run_local(async {
        let sess = connect::attach(&s.socket, &token).await.unwrap();
        let vms = ops::vms(&sess);
        let vm = ops::create_vm(&vms, &ops::VmSpec { name: "z".into(), ..Default::default() });
        ops::vm_info(&vm).await.unwrap();
        let (out, _o) = capvisor_rpc::sink::CollectSink::client(1 << 20);
        let (err, _e) = capvisor_rpc::sink::CollectSink::client(1 << 20);
        let req = ops::ExecRequest { argv: vec!["sleep".into(), "100".into()], ..Default::default() };
        let p = ops::exec(&vm, &req, out, err);
        let pending = {
            let p = p.clone();
            tokio::task::spawn_local(async move { ops::wait(&p).await })
        };
        let other = connect::attach(&s.socket, &token).await.unwrap();
        ops::logout(&other).await.unwrap();
        let stale = capvisor_rpc::schema::common_capnp::ErrorCode::StaleSession;
        assert_eq!(pending.await.unwrap().unwrap_err().code(), Some(stale), "a pending wait must fail");
        assert_eq!(ops::kill(&p, 9).await.unwrap_err().code(), Some(stale));
        assert_eq!(ops::vm_info(&vm).await.unwrap_err().code(), Some(stale));
        assert_eq!(ops::list_vms(&vms).await.unwrap_err().code(), Some(stale));
    });
    assert_eq!(s.qemu_count(), 0, "the VM survived logout");
    // The CLI notices the session is gone and forgets it.
    let o = s.cli_ok("owner", &["logout"], None, 0);
    assert!(stderr(&o).contains("already ended"), "{}", stderr(&o));
    s.stop();
}

#[test]
fn ctrl_c_with_running_vms_leaves_nothing_behind() {
    let s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--name", "left-running"], None, 0);
    assert_eq!(s.qemu_count(), 1);
    let procs = s.our_processes();
    assert!(procs.iter().any(|(_, a)| a.contains("capvisor-vmm")), "{procs:?}");
    // Ctrl-C: serve shuts down; no worker, vmm or qemu may survive (checked in stop_with).
    s.stop_with(libc::SIGINT);
}

/// `auto` tries our kvm engine first where it may (forced here with the
/// manifest's `[vms] auto_engine = "kvm"`) and falls back to QEMU when the guest does not
/// reach guest-init — which is what happens on this nested /dev/kvm.
#[test]
fn auto_falls_back_to_qemu_when_the_kvm_engine_cannot_boot() {
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        println!("skipped: /dev/kvm is not usable here");
        return;
    }
    if !std::path::Path::new("/sys/module/kvm_pvm").exists() {
        println!("skipped: /dev/kvm is hardware-backed here, so the kvm engine is expected to boot (see the vmm kvm engine test)");
        return;
    }
    let manifest = format!("[vms]\nauto_engine = \"kvm\"\n{}", capvisor_manifest::DEFAULT_TOML);
    let s = Server::start(Some(&manifest));
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--name", "fb"], None, 0);
    let list = stdout(&s.cli_ok("owner", &["vm", "list"], None, 0));
    let line = list.lines().find(|l| l.starts_with("fb ")).unwrap_or_else(|| panic!("{list}"));
    assert!(line.contains("running") && line.contains("qemu"), "{list}");
    let o = s.cli_ok("owner", &["vm", "exec", "fb", "--", "echo", "fell-back"], None, 0);
    assert_eq!(stdout(&o), "fell-back\n");
    let audit = std::fs::read_to_string(s.state.join("audit.jsonl")).unwrap();
    assert!(audit.contains("engine-fallback"), "fallback not audited:\n{audit}");
    s.cli_ok("owner", &["logout"], None, 0);
    s.stop();
}

/// Polls `vm info NAME` until the VM leaves `running`; returns the output.
fn info_once_ended(s: &Server, name: &str) -> String {
    let t0 = std::time::Instant::now();
    loop {
        let info = stdout(&s.cli_ok("owner", &["vm", "info", name], None, 0));
        if !info.lines().any(|l| l.starts_with("state") && l.ends_with("running")) {
            return info;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(30), "{name} never left running:\n{info}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// kill -9 of a VM's vmm, and of its QEMU: the VM is `crashed` with the
/// reason, its caps answer notRunning, it can be removed, and the session
/// and its other VMs carry on.
#[test]
fn a_killed_vmm_or_qemu_crashes_only_its_vm() {
    let s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--name", "kv"], None, 0);
    let vmm = s.our_processes().into_iter().find(|(_, a)| a.ends_with("capvisor-vmm")).expect("a vmm runs").0;
    kill9(vmm);
    let info = info_once_ended(&s, "kv");
    assert!(info.contains("state    crashed") && info.contains("vmm process ended"), "{info}");
    // notRunning is exit code 19.
    s.cli_ok("owner", &["vm", "exec", "kv", "--", "true"], None, 19);
    s.cli_ok("owner", &["vm", "rm", "kv"], None, 0);

    s.cli_ok("owner", &["vm", "create", "--name", "kq"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--name", "other"], None, 0);
    let qemu = s
        .our_processes()
        .into_iter()
        .find(|(p, a)| {
            a.contains("qemu")
                && std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap_or_default().contains("\0guest=kq\0")
        })
        .expect("kq's qemu runs")
        .0;
    kill9(qemu);
    let info = info_once_ended(&s, "kq");
    assert!(info.contains("state    crashed") && info.contains("qemu exited unexpectedly"), "{info}");
    // The session and its other VM carry on.
    let o = s.cli_ok("owner", &["vm", "exec", "other", "--", "echo", "still-here"], None, 0);
    assert_eq!(stdout(&o), "still-here\n");
    s.cli_ok("owner", &["logout"], None, 0);
    s.stop();
}

/// SIGKILL, as a crash would.
fn kill9(pid: u32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
}

/// kill -9 of one session's worker revokes only that session: its VM goes
/// with it (the vmm dies with its parent), its saved login is stale, and
/// another principal's session and VM carry on; the end is audited.
#[test]
fn a_killed_worker_ends_only_its_session() {
    let s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok(
        "owner",
        &["account", "add", "dora", "--profile", "user", "--password-stdin"],
        Some(b"dora-secret-1\n"),
        0,
    );
    s.cli_ok("dora", &["login", "--user", "dora", "--password-stdin"], Some(b"dora-secret-1\n"), 0);
    s.cli_ok("owner", &["vm", "create", "--name", "mine"], None, 0);
    s.cli_ok("dora", &["vm", "create", "--name", "hers"], None, 0);
    assert_eq!(s.qemu_count(), 2);
    // The owner's worker is the one whose vmm runs the VM "mine".
    let table = proc_table();
    let vmm_of = |vm: &str| {
        table
            .iter()
            .find(|r| {
                r.argv0.contains("qemu")
                    && std::fs::read_to_string(format!("/proc/{}/cmdline", r.pid))
                        .unwrap_or_default()
                        .contains(&format!("\0guest={vm}\0"))
            })
            .map(|q| q.ppid)
            .expect("a qemu per VM")
    };
    let worker = table.iter().find(|r| r.pid == vmm_of("mine")).map(|r| r.ppid).expect("the vmm's parent");
    assert!(table.iter().any(|r| r.pid == worker && r.argv0.ends_with("capvisor-worker")));
    kill9(worker);
    // The owner's session is gone (typed), its VM with it ...
    let t0 = std::time::Instant::now();
    while s.qemu_count() != 1 {
        assert!(t0.elapsed() < std::time::Duration::from_secs(20), "the dead session's VM outlived it");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let o = s.cli("owner", &["caps"], None);
    assert_eq!(o.status.code(), Some(14), "staleSession: {}", stderr(&o));
    // ... while dora's session and VM carry on.
    let o = s.cli_ok("dora", &["vm", "exec", "hers", "--", "echo", "unharmed"], None, 0);
    assert_eq!(stdout(&o), "unharmed\n");
    let audit = std::fs::read_to_string(s.state.join("audit.jsonl")).unwrap();
    assert!(audit.lines().any(|l| l.contains("\"session.end\"") && l.contains("worker connection ended")), "{audit}");
    // The owner logs in again and works.
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["vm", "list"], None, 0);
    s.cli_ok("dora", &["logout"], None, 0);
    s.cli_ok("owner", &["logout"], None, 0);
    s.stop();
}

/// kill -9 of the broker ends everything cleanly: serve exits naming the
/// broker, and no worker, vmm or QEMU outlives it (no live cap remains).
#[test]
fn a_killed_broker_ends_everything_without_orphans() {
    let s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--name", "b"], None, 0);
    let broker = s.our_processes().into_iter().find(|(_, a)| a.ends_with("capvisor-broker")).expect("a broker").0;
    kill9(broker);
    let (status, left, log) = s.wait_for_exit();
    assert!(!status.success(), "serve must report the crash");
    assert!(log.contains("capvisor-broker exited unexpectedly"), "{log}");
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// kill -9 of the gateway: the supervisor starts a new one on the same
/// socket, and the session and its running VM carry on (the CLI attaches
/// with its saved token through the new gateway); the restart is audited.
#[test]
fn a_killed_gateway_is_restarted_and_vms_carry_on() {
    let s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok("owner", &["vm", "create", "--name", "g"], None, 0);
    let gateway = || s.our_processes().into_iter().find(|(_, a)| a.ends_with("capvisor-gateway")).map(|p| p.0);
    let first = gateway().expect("a gateway");
    kill9(first);
    let t0 = std::time::Instant::now();
    while gateway().is_none_or(|p| p == first) {
        assert!(t0.elapsed() < std::time::Duration::from_secs(20), "the gateway was not restarted");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let o = s.cli_ok("owner", &["vm", "exec", "g", "--", "echo", "still", "here"], None, 0);
    assert_eq!(stdout(&o), "still here\n");
    assert_eq!(s.qemu_count(), 1);
    let audit = std::fs::read_to_string(s.state.join("audit.jsonl")).unwrap();
    assert_eq!(audit.matches("\"action\":\"gateway.connect\"").count(), 2, "{audit}");
    s.cli_ok("owner", &["logout"], None, 0);
    s.stop();
}
