//! Local identities end to end, with users made by the test (needs root;
//! skips with a note otherwise): `capvisor serve --user` started as root
//! runs everything as a service user; the socket is opened to a group
//! (`[gateway] socket_group`); a second local user in that group, mapped
//! to `user` by `[[local.map]]`, logs in with the `user` bundle's limits;
//! a user in the group but unmapped is denied; a user outside the group
//! cannot even connect (EACCES).

mod common;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A local account made by the test.
#[derive(Clone)]
struct Account {
    name: String,
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

/// Users and a group made for this test (useradd/groupadd --system);
/// removed when dropped, on failure too, after killing anything they run.
struct TestUsers {
    group: String,
    gid: u32,
    users: Vec<Account>,
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl TestUsers {
    fn new(tag: &str) -> TestUsers {
        let group = format!("capvisor-t{tag}");
        run("groupadd", &["--system", &group]);
        let gid = nix::unistd::Group::from_name(&group).unwrap().unwrap().gid.as_raw();
        TestUsers { group, gid, users: vec![] }
    }

    /// Adds user `capvisor-t<tag><suffix>`, in the test's group when `in_group`.
    fn add(&mut self, suffix: &str, in_group: bool) -> Account {
        let name = format!("{}{suffix}", self.group);
        let mut args = vec!["--system", "--no-create-home", "--shell", "/usr/sbin/nologin"];
        if in_group {
            args.extend(["-G", self.group.as_str()]);
        }
        args.push(&name);
        run("useradd", &args);
        let u = nix::unistd::User::from_name(&name).unwrap().unwrap();
        let cname = std::ffi::CString::new(name.clone()).unwrap();
        let groups = nix::unistd::getgrouplist(&cname, u.gid).unwrap().iter().map(|g| g.as_raw()).collect();
        let a = Account { name, uid: u.uid.as_raw(), gid: u.gid.as_raw(), groups };
        self.users.push(a.clone());
        a
    }
}

impl Drop for TestUsers {
    fn drop(&mut self) {
        for u in &self.users {
            for pid in pids_of_uid(u.uid) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        for u in &self.users {
            let _ = Command::new("userdel").arg(&u.name).output();
        }
        let _ = Command::new("groupdel").arg(&self.group).output();
    }
}

/// The four `Uid:` fields (real, effective, saved, filesystem) of `pid`.
fn uids_of(pid: u32) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    Some(line.split_whitespace().filter_map(|f| f.parse().ok()).collect())
}

/// Live processes whose real uid is `uid`.
fn pids_of_uid(uid: u32) -> Vec<u32> {
    proc_table().iter().map(|r| r.pid).filter(|p| uids_of(*p).is_some_and(|u| u.first() == Some(&uid))).collect()
}

/// Every live descendant of `root` (pid, argv[0]).
fn descendants(root: u32) -> Vec<(u32, String)> {
    let table = proc_table();
    let mut out = vec![];
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for r in table.iter().filter(|r| r.ppid == p) {
            out.push((r.pid, r.argv0.clone()));
            frontier.push(r.pid);
        }
    }
    out
}

/// A `capvisor` command run as `who` (groups, gid, uid set before exec).
fn capvisor_as(who: &Account, args: &[&str], config: &Path, socket: &Path) -> Command {
    let mut cmd = Command::new(bin_dir().join("capvisor"));
    cmd.args(args)
        .env("CAPVISOR_SOCKET", socket)
        .env("CAPVISOR_CONFIG_DIR", config)
        .env("HOME", config)
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let groups: Vec<nix::unistd::Gid> = who.groups.iter().map(|g| nix::unistd::Gid::from_raw(*g)).collect();
    let (uid, gid) = (nix::unistd::Uid::from_raw(who.uid), nix::unistd::Gid::from_raw(who.gid));
    // SAFETY: the closure only makes async-signal-safe system calls
    // (setgroups, setresgid, setresuid) on data prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setresgid(gid, gid, gid)?;
            nix::unistd::setresuid(uid, uid, uid)?;
            Ok(())
        });
    }
    cmd
}

/// Runs `capvisor args` as `who`, asserting exit `code`; returns (stdout, stderr).
fn cli_as(
    who: &Account,
    args: &[&str],
    config: &Path,
    socket: &Path,
    code: i32,
    log: &dyn Fn() -> String,
) -> (String, String) {
    let out = capvisor_as(who, args, config, socket).output().unwrap();
    let (o, e) = (stdout(&out), stderr(&out));
    assert_eq!(
        out.status.code(),
        Some(code),
        "{} capvisor {args:?}\nstdout: {o}\nstderr: {e}\nserve log:\n{}",
        who.name,
        log()
    );
    (o, e)
}

/// connect(2) to `socket` from a thread running as `who` (raw setresuid
/// and friends change only the calling thread's credentials).
fn connect_as(who: &Account, socket: &Path) -> std::io::Result<()> {
    let (socket, who) = (socket.to_path_buf(), who.clone());
    std::thread::spawn(move || {
        // SAFETY: plain syscalls with integer and slice arguments; they
        // change only this short-lived thread's credentials.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_setgroups, who.groups.len(), who.groups.as_ptr()), 0);
            assert_eq!(libc::syscall(libc::SYS_setresgid, who.gid, who.gid, who.gid), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, who.uid, who.uid, who.uid), 0);
        }
        std::os::unix::net::UnixStream::connect(&socket).map(drop)
    })
    .join()
    .unwrap()
}

/// A cache for the service user seeded with the host's built minimal
/// kernel and busybox package (so the image is built, as that user, in
/// seconds instead of compiling a kernel); empty when the host has none.
fn seed_cache(cache: &Path) {
    let src = capvisor_rpc::paths::cache_dir();
    std::fs::create_dir_all(cache.join("kernels")).unwrap();
    std::fs::create_dir_all(cache.join("debs")).unwrap();
    let _ = std::fs::copy(src.join("apt-resolution.json"), cache.join("apt-resolution.json"));
    for e in std::fs::read_dir(src.join("debs")).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with("busybox") {
            std::fs::copy(e.path(), cache.join("debs").join(e.file_name())).unwrap();
        }
    }
    let Ok(memo) = std::fs::read_to_string(src.join("kernels/minimal.json")) else {
        eprintln!("no built minimal kernel in {}: the service user builds one (slow)", src.display());
        return;
    };
    let v: serde_json::Value = serde_json::from_str(&memo).unwrap();
    let dir = PathBuf::from(v["kernel"]["dir"].as_str().unwrap());
    let to = cache.join("kernels").join(dir.file_name().unwrap());
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    let memo = memo.replace(dir.to_str().unwrap(), to.to_str().unwrap());
    std::fs::write(cache.join("kernels/minimal.json"), memo).unwrap();
}

/// The default manifest without its `debian` image: the service user's
/// cache is its own and seeded only with the kernel, and the debian root
/// image (minutes, mmdebstrap) is not what this test is about.
fn without_debian(toml: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in toml.lines() {
        if line.starts_with('[') {
            skipping = line.trim() == "[images.debian]";
        }
        if !skipping {
            out.push_str(&line.replace("images = [\"base\", \"debian\"]", "images = [\"base\"]"));
            out.push('\n');
        }
    }
    out
}

/// The manifest: the default (without `debian`) with the `user` bundle cut
/// to one VM, the socket opened to `group`, uid `mapped` mapped to `user`.
/// Every confinement layer stays required: `serve --user` delegates a
/// cgroup to the service user, and netns and Landlock need no privilege.
fn manifest(group: &str, mapped: u32) -> String {
    let base = without_debian(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifest/default.toml")).unwrap(),
    )
    .replace("max_vms = 2", "max_vms = 1")
    .replace("[gateway]", &format!("[gateway]\nsocket_group = \"{group}\""))
    .replace("owner_uids = []", &format!("owner_uids = []\n[[local.map]]\nuid = {mapped}\nprofile = \"user\""));
    base
}

#[test]
fn a_service_user_serves_a_group_and_maps_local_users_to_profiles() {
    if !nix::unistd::geteuid().is_root() {
        println!("skipped: needs root (creates users and groups, runs serve --user)");
        return;
    }
    let tag = format!("{:06x}", rand_u32() & 0xff_ffff);
    let mut users = TestUsers::new(&tag);
    let svc = users.add("s", true);
    let alice = users.add("a", true); // in the group, mapped to `user`
    let bert = users.add("b", true); // in the group, not mapped
    let carl = users.add("c", false); // not in the group

    let dir = tempfile::Builder::new().prefix("capvisor-identity.").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("run/gateway.sock");
    let state = dir.path().join("state");
    let cache = dir.path().join("cache");
    seed_cache(&cache);
    run("chown", &["-R", &format!("{}:{}", svc.uid, svc.gid), cache.to_str().unwrap()]);
    let config = |who: &Account| {
        let c = dir.path().join("config").join(&who.name);
        std::fs::create_dir_all(&c).unwrap();
        nix::unistd::chown(&c, Some(nix::unistd::Uid::from_raw(who.uid)), Some(nix::unistd::Gid::from_raw(who.gid)))
            .unwrap();
        std::fs::set_permissions(dir.path().join("config"), std::fs::Permissions::from_mode(0o755)).unwrap();
        c
    };
    let manifest_path = dir.path().join("manifest.toml");
    std::fs::write(&manifest_path, manifest(&users.group, alice.uid)).unwrap();
    std::fs::set_permissions(&manifest_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let serve = |as_user: Option<&Account>| {
        let args = ["serve", "--user", svc.name.as_str(), "--manifest", manifest_path.to_str().unwrap()];
        let mut cmd = match as_user {
            Some(u) => capvisor_as(u, &args, &config(u), &socket),
            None => {
                let mut c = Command::new(bin_dir().join("capvisor"));
                c.args(args).env("CAPVISOR_SOCKET", &socket);
                c
            }
        };
        cmd.env("CAPVISOR_STATE_DIR", &state)
            .env("CAPVISOR_CACHE_DIR", &cache)
            .env("CAPVISOR_BIN_DIR", bin_dir())
            .env("CAPVISOR_GUEST_INIT", bin_dir().join("capvisor-guest-init"));
        cmd
    };

    // --user needs root: a plain user is refused before anything happens.
    let out = serve(Some(&alice)).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("needs root"), "{}", stderr(&out));
    assert!(!socket.exists() && !state.exists(), "nothing made for a refused --user");

    // Root starts serve --user: everything below runs as the service user.
    let log_path = dir.path().join("serve.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let mut server =
        serve(None).stdin(Stdio::null()).stdout(log_file.try_clone().unwrap()).stderr(log_file).spawn().unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let serve_pid = server.id();
    let guard = Kill(&mut server);
    let t0 = Instant::now();
    while !log().contains("capvisor: serving on") {
        if let Ok(Some(st)) = guard.0.try_wait() {
            panic!("serve --user exited ({st}):\n{}", log());
        }
        assert!(t0.elapsed() < Duration::from_secs(900), "serve --user did not come up:\n{}", log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(log().contains(&format!("serving as {} (uid {}", svc.name, svc.uid)), "{}", log());

    // The socket and its directory: the service user's, open to the group.
    let d = std::fs::metadata(socket.parent().unwrap()).unwrap();
    assert_eq!((d.uid(), d.gid(), d.mode() & 0o7777), (svc.uid, users.gid, 0o2750));
    let s = std::fs::symlink_metadata(&socket).unwrap();
    assert_eq!((s.uid(), s.gid(), s.mode() & 0o777), (svc.uid, users.gid, 0o660));
    let st = std::fs::metadata(&state).unwrap();
    assert_eq!((st.uid(), st.mode() & 0o777), (svc.uid, 0o700));

    // Outside the group: connect(2) itself fails with EACCES, and the CLI says so.
    let e = connect_as(&carl, &socket).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    let (_, err) = cli_as(&carl, &["login"], &config(&carl), &socket, 1, &log);
    assert!(err.contains("refusing to send credentials"), "{err}");
    connect_as(&alice, &socket).unwrap();

    // In the group but matching no rule: denied.
    let (_, err) = cli_as(&bert, &["login"], &config(&bert), &socket, 10, &log);
    assert!(err.contains("may not log in locally") && err.contains("[denied]"), "{err}");

    // Mapped to `user`: its bundle, its limits.
    let ca = config(&alice);
    let (_, err) = cli_as(&alice, &["login"], &ca, &socket, 0, &log);
    assert!(err.contains("profile user"), "{err}");
    let (who, _) = cli_as(&alice, &["whoami"], &ca, &socket, 0, &log);
    assert!(who.contains(&format!("local:{}", alice.name)) && who.contains("profile   user"), "{who}");
    let (caps, _) = cli_as(&alice, &["caps"], &ca, &socket, 0, &log);
    assert!(caps.contains("vms") && !caps.contains("accounts"), "{caps}");
    cli_as(&alice, &["account", "list"], &ca, &socket, 11, &log);
    cli_as(&alice, &["vm", "create", "--name", "one"], &ca, &socket, 0, &log);
    let (_, err) = cli_as(&alice, &["vm", "create", "--name", "two"], &ca, &socket, 13, &log);
    assert!(err.contains("quota"), "{err}");

    // Every process of the server, QEMU included, runs as the service user.
    let procs = descendants(serve_pid);
    let names: Vec<&str> = procs.iter().map(|(_, a)| a.as_str()).collect();
    for want in ["capvisor-broker", "capvisor-gateway", "capvisor-worker", "qemu-system"] {
        assert!(names.iter().any(|n| n.contains(want)), "no {want} below serve: {names:?}");
    }
    assert_eq!(uids_of(serve_pid).unwrap(), vec![svc.uid; 4], "serve itself");
    for (pid, name) in &procs {
        if let Some(u) = uids_of(*pid) {
            assert_eq!(u, vec![svc.uid; 4], "{name} (pid {pid}) runs as {u:?}");
        }
    }

    // The audit log names who was let in with which profile and who was not.
    let audit = std::fs::read_to_string(state.join("audit.jsonl")).unwrap();
    assert!(
        audit.lines().any(|l| l.contains("loginLocal")
            && l.contains("\"denied\"")
            && l.contains(&format!("uid {} ", bert.uid))
            && l.contains("no [[local.map]] rule")),
        "{audit}"
    );
    assert!(
        audit.lines().any(|l| l.contains("loginLocal") && l.contains("\"ok\"") && l.contains("profile=user")),
        "{audit}"
    );

    // SIGTERM: a clean end, nothing of the service user's left, socket gone.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(serve_pid as i32), nix::sys::signal::SIGTERM).unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = guard.0.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "serve did not stop:\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "serve exited {status}:\n{}", log());
    let t0 = Instant::now();
    while !pids_of_uid(svc.uid).is_empty() && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(pids_of_uid(svc.uid).is_empty(), "left running as {}: {:?}", svc.name, pids_of_uid(svc.uid));
    assert!(!socket.exists(), "socket left behind");
    drop(guard);
    drop(users);
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: a 4-byte buffer we own.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 4, 0) };
    assert_eq!(n, 4);
    u32::from_le_bytes(b)
}
