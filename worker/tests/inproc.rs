//! The worker in-process: its real `Session` / `CapSet` / `VmFactory` /
//! `Vm` and membrane, attached over a socketpair exactly like a client the
//! broker hands over, with each "VM" being guest-init's real `Guest` server
//! on a socketpair and a fake `Machine` (no VM, no vmm process). Covers
//! pipelining with typed errors, identity after remove, quotas, revocation
//! and the forwarding of sinks.

mod common;

use capnp::capability::{FromClientHook, Rc as CapRc};
use capvisor_client::{ops, ClientError};
use capvisor_rpc::schema::capvisor_capnp::{vm_factory, Engine, VmState};
use capvisor_rpc::schema::common_capnp::{byte_sink, ErrorCode};
use capvisor_rpc::sink::CollectSink;
use common::{code, run, spec, Worker};
use std::time::Duration;

async fn echo(vm: &capvisor_rpc::schema::capvisor_capnp::vm::Client, word: &str) -> Result<String, ClientError> {
    let out = ops::exec_collect(vm, &["echo", word], b"", 1 << 16).await?;
    assert_eq!(out.exit, ops::Exit::Code(0));
    Ok(String::from_utf8(out.stdout).unwrap())
}

#[test]
fn a_whole_chain_is_pipelined_and_execs_in_the_guest() {
    run(async {
        let env = Worker::with_guest_init("inproc", |_| {});
        let s = env.attach().await;
        // create -> exec -> wait as one pipelined chain from the session.
        let vm = ops::create_vm(&ops::vms(&s), &spec("a"));
        assert_eq!(echo(&vm, "hello").await.unwrap(), "hello\n");
        let info = ops::vm_info(&vm).await.unwrap();
        assert_eq!((info.name.as_str(), info.state, info.engine), ("a", VmState::Running, Engine::Qemu));
        // The same VM through a fresh chain ending in a pipelined get.
        let again = ops::get_vm(&ops::vms(&s), "a");
        let out = ops::exec_collect(&again, &["cat"], b"stdin bytes", 1 << 16).await.unwrap();
        assert_eq!(out.stdout, b"stdin bytes");
        let launched = env.seen.borrow().launched.clone();
        assert_eq!(launched.len(), 1);
        assert_eq!((launched[0].engine, launched[0].memory_mib), (Engine::Qemu, 256));
        assert!(env.seen.borrow().audit.contains(&("vm.create".into(), "ok".into())));
    });
}

#[test]
fn a_failed_pipelined_call_reports_the_first_failures_code() {
    run(async {
        let env = Worker::with_guest_init("inproc", |_| {});
        let s = env.attach().await;
        // VmFactory.get of an unknown name, then exec on its result, then wait.
        let vm = ops::get_vm(&ops::vms(&s), "nope");
        let (out, _) = CollectSink::client(16);
        let (err, _) = CollectSink::client(16);
        let p = ops::exec(&vm, &ops::ExecRequest { argv: vec!["true".into()], ..Default::default() }, out, err);
        assert_eq!(code(ops::wait(&p).await), ErrorCode::NotFound);
        // CapSet.get misses, typed at the end of the chain.
        let cs = ops::cap_set(&s);
        let missing = vm_factory::Client::new(ops::get_cap_raw(&cs, "nope", 1).hook);
        assert_eq!(code(ops::list_vms(&missing).await), ErrorCode::NotFound);
        let wrong = vm_factory::Client::new(ops::get_cap_raw(&cs, "vms", 1).hook);
        assert_eq!(code(ops::list_vms(&wrong).await), ErrorCode::WrongInterface);
        // A failed create: the Vm promise carries the code to any call on it.
        let bad = ops::create_vm(&ops::vms(&s), &spec("Bad Name"));
        assert_eq!(code(ops::vm_info(&bad).await), ErrorCode::InvalidArgument);
        assert!(env.seen.borrow().launched.is_empty());
    });
}

#[test]
fn a_held_vm_never_reaches_a_newer_vm_of_the_same_name() {
    run(async {
        let env = Worker::with_guest_init("inproc", |_| {});
        let s = env.attach().await;
        let f = ops::vms(&s);
        let old = ops::create_vm(&f, &spec("same"));
        assert_eq!(echo(&old, "old").await.unwrap(), "old\n");
        let old_files = ops::files(&old);
        assert!(!ops::list_dir(&old_files, "/").await.unwrap().is_empty());
        let (o, _) = CollectSink::client(1 << 16);
        let (e, _) = CollectSink::client(1 << 16);
        let sleeper =
            ops::exec(&old, &ops::ExecRequest { argv: vec!["sleep".into(), "5".into()], ..Default::default() }, o, e);
        ops::write_stdin(&sleeper, b"").await.ok();

        ops::remove_vm(&f, "same").await.unwrap();
        let new = ops::create_vm(&f, &spec("same"));
        assert_eq!(echo(&new, "new").await.unwrap(), "new\n");

        // Everything reached through the old cap answers notFound.
        assert_eq!(code(ops::vm_info(&old).await), ErrorCode::NotFound);
        assert_eq!(code(echo(&old, "never").await), ErrorCode::NotFound);
        assert_eq!(code(ops::ping(&old).await), ErrorCode::NotFound);
        assert_eq!(code(ops::list_dir(&old_files, "/").await), ErrorCode::NotFound);
        assert_eq!(code(ops::kill(&sleeper, 9).await), ErrorCode::NotFound);
        assert_eq!(code(ops::stop_vm(&old).await), ErrorCode::NotFound);
        // The new VM is untouched by all of that.
        assert_eq!(ops::vm_info(&new).await.unwrap().state, VmState::Running);
        assert_eq!(env.seen.borrow().launched.len(), 2);
    });
}

#[test]
fn bundle_limits_are_typed_and_launch_nothing() {
    run(async {
        let env = Worker::with_guest_init("inproc", |b| {
            b.max_vms = 1;
            b.max_memory_mib = 512;
            b.max_vcpus = 2;
        });
        let s = env.attach().await;
        let f = ops::vms(&s);
        ops::vm_info(&ops::create_vm(&f, &spec("one"))).await.unwrap();
        assert_eq!(code(ops::vm_info(&ops::create_vm(&f, &spec("two"))).await), ErrorCode::Quota);
        ops::remove_vm(&f, "one").await.unwrap();
        let big = ops::VmSpec { name: "big".into(), memory_mib: 1024, ..Default::default() };
        assert_eq!(code(ops::vm_info(&ops::create_vm(&f, &big)).await), ErrorCode::Quota);
        let cpus = ops::VmSpec { name: "cpus".into(), vcpus: 3, ..Default::default() };
        assert_eq!(code(ops::vm_info(&ops::create_vm(&f, &cpus)).await), ErrorCode::Quota);
        let img = ops::VmSpec { name: "img".into(), image: "debian".into(), ..Default::default() };
        assert_eq!(code(ops::vm_info(&ops::create_vm(&f, &img)).await), ErrorCode::Denied);
        ops::vm_info(&ops::create_vm(&f, &spec("dup"))).await.unwrap();
        assert_eq!(code(ops::vm_info(&ops::create_vm(&f, &spec("dup"))).await), ErrorCode::AlreadyExists);
        assert_eq!(code(ops::remove_vm(&f, "ghost").await), ErrorCode::NotFound);
        assert_eq!(env.seen.borrow().launched.len(), 2, "no denied create may start a vmm");
        assert!(env.seen.borrow().audit.contains(&("vm.create".into(), "quota".into())));
    });
}

#[test]
fn logout_breaks_every_cap_and_pending_call_and_stops_the_vms() {
    run(async {
        let env = Worker::with_guest_init("inproc", |_| {});
        let s = env.attach().await;
        let other = env.attach().await;
        let f = ops::vms(&s);
        let vm = ops::create_vm(&f, &spec("r"));
        let files = ops::files(&vm);
        ops::list_dir(&files, "/").await.unwrap();
        let (o, _) = CollectSink::client(1 << 16);
        let (e, _) = CollectSink::client(1 << 16);
        let p =
            ops::exec(&vm, &ops::ExecRequest { argv: vec!["sleep".into(), "5".into()], ..Default::default() }, o, e);
        let pending = {
            let p = p.clone();
            tokio::task::spawn_local(async move { ops::wait(&p).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        ops::logout(&other).await.unwrap();
        assert_eq!(code(pending.await.unwrap()), ErrorCode::StaleSession);
        assert_eq!(code(ops::vm_info(&vm).await), ErrorCode::StaleSession);
        assert_eq!(code(ops::kill(&p, 9).await), ErrorCode::StaleSession);
        assert_eq!(code(ops::list_dir(&files, "/").await), ErrorCode::StaleSession);
        assert_eq!(code(ops::list_vms(&f).await), ErrorCode::StaleSession);
        assert_eq!(code(ops::session_info(&s).await), ErrorCode::StaleSession);
        assert_eq!(code(ops::list_caps(&ops::cap_set(&s)).await), ErrorCode::StaleSession);
        let seen = env.seen.borrow();
        assert_eq!(seen.logouts, 1, "the broker is told, so the resume token dies");
        assert_eq!(seen.machines_stopped, 1, "the VM is stopped");
        assert!(env.st.vms.borrow()["r"].running.borrow().is_none());
    });
}

/// A sink that reports each write as it arrives.
struct Tap(tokio::sync::mpsc::UnboundedSender<Vec<u8>>);

impl byte_sink::Server for Tap {
    async fn write(self: CapRc<Self>, p: byte_sink::WriteParams) -> capnp::Result<()> {
        let _ = self.0.send(p.get()?.get_data()?.to_vec());
        Ok(())
    }
    async fn done(self: CapRc<Self>, _: byte_sink::DoneParams, _: byte_sink::DoneResults) -> capnp::Result<()> {
        Ok(())
    }
}

#[test]
fn sinks_are_forwarded_through_the_membrane_and_cut_when_the_scope_ends() {
    run(async {
        use capvisor_worker::wrap::{Scope, SinkWrapper};
        let env = Worker::with_guest_init("inproc", |_| {});
        let s = env.attach().await;
        // Through a real exec: the client's sink receives the guest's output.
        let vm = ops::create_vm(&ops::vms(&s), &spec("sink"));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (e, _) = CollectSink::client(1 << 16);
        let sh = "echo first; read x; echo second";
        let req = ops::ExecRequest {
            argv: vec!["sh".into(), "-c".into(), sh.into()],
            keep_stdin_open: true,
            ..Default::default()
        };
        let p = ops::exec(&vm, &req, capnp_rpc::new_client(Tap(tx)), e);
        assert_eq!(rx.recv().await.unwrap(), b"first\n");
        ops::write_stdin(&p, b"go\n").await.unwrap();
        assert_eq!(rx.recv().await.unwrap(), b"second\n");
        assert_eq!(ops::wait(&p).await.unwrap(), ops::Exit::Code(0));

        // The wrapper itself: writes pass while the scope holds, then fail
        // typed and reach nothing.
        let entry = env.st.vms.borrow()["sink"].clone();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let wrapped = SinkWrapper::wrap(&Scope::vm(&env.st, &entry), capnp_rpc::new_client(Tap(tx)));
        capvisor_rpc::sink::write_all(&wrapped, b"in scope").await.unwrap();
        assert_eq!(rx.recv().await.unwrap(), b"in scope");
        entry.removed.set(true);
        let e = capvisor_rpc::sink::write_all(&wrapped, b"after remove").await.unwrap_err();
        assert_eq!(capvisor_rpc::CvError::from_rpc(&e).unwrap().code, ErrorCode::NotFound);
        // (A failed stream call fails every later one on that client, so a
        // fresh wrapper shows the revocation.)
        entry.removed.set(false);
        let wrapped = SinkWrapper::wrap(&Scope::session(&env.st), wrapped);
        env.st.mark_revoked(capvisor_rpc::schema::internal_capnp::RevokeReason::Revoked);
        let e = capvisor_rpc::sink::write_all(&wrapped, b"after revoke").await.unwrap_err();
        assert_eq!(capvisor_rpc::CvError::from_rpc(&e).unwrap().code, ErrorCode::StaleSession);
        assert!(rx.try_recv().is_err(), "nothing passed the membrane after its scope ended");
    });
}

#[test]
fn a_create_cancelled_mid_boot_leaves_no_vm_behind() {
    run(async {
        let env = Worker::with_guest_init("inproc", |b| b.max_vms = 1);
        env.seen.borrow_mut().hang = true;
        let (s, conn) = env.attach_with_conn().await;
        let vm = ops::create_vm(&ops::vms(&s), &spec("slow"));
        let pending = tokio::task::spawn_local(async move { ops::vm_info(&vm).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(env.st.vms.borrow()["slow"].state.get(), VmState::Starting);
        let held = env.st.vms.borrow()["slow"].clone();
        // The client goes away mid-boot.
        conn.abort();
        pending.abort();
        drop(s);
        let t0 = std::time::Instant::now();
        while !env.st.vms.borrow().is_empty() {
            assert!(t0.elapsed() < Duration::from_secs(5), "the half-made VM was never forgotten");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(held.removed.get());
        assert!(env.seen.borrow().audit.contains(&("vm.create.cancelled".into(), "ok".into())));
        // Its name and its max_vms slot are free again.
        env.seen.borrow_mut().hang = false;
        let s = env.attach().await;
        let again = ops::create_vm(&ops::vms(&s), &spec("slow"));
        assert_eq!(echo(&again, "back").await.unwrap(), "back\n");
        assert_eq!(env.seen.borrow().launched.len(), 2);
    });
}

#[test]
fn a_vm_whose_vmm_dies_is_crashed_with_the_reason() {
    run(async {
        let env = Worker::with_guest_init("inproc", |_| {});
        let s = env.attach().await;
        let f = ops::vms(&s);
        let vm = ops::create_vm(&f, &spec("k"));
        assert_eq!(ops::vm_info(&vm).await.unwrap().detail, "");
        // A command still running when the vmm dies: its call must end
        // (notRunning), not wait for a guest that is gone.
        let v2 = vm.clone();
        let in_flight =
            tokio::task::spawn_local(async move { ops::exec_collect(&v2, &["sleep", "30"], b"", 1 << 16).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        env.seen.borrow().kill_switches[0].send_replace(true);
        let r = tokio::time::timeout(Duration::from_secs(10), in_flight)
            .await
            .expect("an exec in flight when the vmm died never answered")
            .unwrap();
        assert_eq!(code(r), ErrorCode::NotRunning);
        let t0 = std::time::Instant::now();
        let info = loop {
            let i = ops::vm_info(&vm).await.unwrap();
            if i.state != VmState::Running {
                break i;
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "the VM never left running");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(info.state, VmState::Crashed);
        assert!(info.detail.contains("vmm process ended"), "{}", info.detail);
        assert_eq!(code(echo(&vm, "x").await), ErrorCode::NotRunning);
        ops::remove_vm(&f, "k").await.unwrap();
        // A VM stopped on request says so.
        let vm = ops::create_vm(&f, &spec("s"));
        ops::stop_vm(&vm).await.unwrap();
        let info = ops::vm_info(&vm).await.unwrap();
        assert_eq!((info.state, info.detail.as_str()), (VmState::Stopped, "stopped on request"));
    });
}

#[test]
fn the_client_librarys_composed_operations_work_end_to_end() {
    use capvisor_client::stream;
    use tokio::io::AsyncReadExt;
    run(async {
        let env = Worker::with_guest_init("inproc", |_| {});
        let s = env.attach().await;
        let vm = ops::create_vm(&ops::vms(&s), &spec("lib"));
        // exec with stdin from a reader and output into writers.
        let (out_w, mut out_r) = tokio::io::duplex(1 << 16);
        let (err_w, mut err_r) = tokio::io::duplex(1 << 16);
        let req = ops::ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "cat; echo done >&2; exit 5".into()],
            keep_stdin_open: true,
            ..Default::default()
        };
        let exit = stream::exec_streaming(&vm, &req, out_w, err_w, Some(&b"piped in"[..])).await.unwrap();
        assert_eq!(exit, ops::Exit::Code(5));
        let (mut out, mut err) = (vec![], vec![]);
        out_r.read_to_end(&mut out).await.unwrap();
        err_r.read_to_end(&mut err).await.unwrap();
        assert_eq!((out.as_slice(), err.as_slice()), (&b"piped in"[..], &b"done\n"[..]));

        // A pty session: size, a resize, input, exit code.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (pty_w, mut pty_r) = tokio::io::duplex(1 << 16);
        tx.send((40, 120)).unwrap();
        let script = "sleep 0.3; stty size; read x; exit 4";
        let argv = vec!["sh".into(), "-c".into(), script.into()];
        let exit = stream::pty_session(&vm, argv, "/", (30, 100), pty_w, &b"go\n"[..], rx).await.unwrap();
        assert_eq!(exit, ops::Exit::Code(4));
        let mut shown = String::new();
        pty_r.read_to_string(&mut shown).await.unwrap();
        assert!(shown.contains("40 120"), "{shown:?}");

        // Copies both ways, through the guest's Files (here the host's).
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.bin");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let files = ops::files(&vm);
        let guest_path = dir.path().join("in-guest.bin");
        let n = stream::copy_to_guest(&files, &src, guest_path.to_str().unwrap()).await.unwrap();
        assert_eq!(n, data.len() as u64);
        let back = dir.path().join("back.bin");
        stream::copy_from_guest(&files, guest_path.to_str().unwrap(), &back).await.unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), data);
        let missing = dir.path().join("nope");
        assert_eq!(code(stream::copy_from_guest(&files, missing.to_str().unwrap(), &back).await), ErrorCode::NotFound);
        assert_eq!(std::fs::read(&back).unwrap(), data, "a failed copy leaves the destination as it was");
    });
}

#[test]
fn running_vms_hold_a_broker_reservation_and_a_refusal_starts_nothing() {
    run(async {
        let env = Worker::with_guest_init("inproc", |_| {});
        env.seen.borrow_mut().max_holds = Some(1);
        let s = env.attach().await;
        let f = ops::vms(&s);
        let one = ops::create_vm(&f, &spec("one"));
        ops::vm_info(&one).await.unwrap();
        assert_eq!(env.seen.borrow().holds, 1);
        // The broker refuses a second: typed quota, no vmm launched.
        assert_eq!(code(ops::vm_info(&ops::create_vm(&f, &spec("two"))).await), ErrorCode::Quota);
        assert_eq!(env.seen.borrow().launched.len(), 1);
        // Stopping gives the room back (the cap is still held by the client).
        ops::stop_vm(&one).await.unwrap();
        let t0 = std::time::Instant::now();
        while env.seen.borrow().holds != 0 {
            assert!(t0.elapsed() < Duration::from_secs(5), "the reservation was never released");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let two = ops::create_vm(&f, &spec("two"));
        assert_eq!(echo(&two, "room").await.unwrap(), "room\n");
    });
}

/// `Vm.narrow` with the given settings (tests build the request by hand;
/// the CLI's share command is a later slice).
fn narrow(
    vm: &capvisor_rpc::schema::capvisor_capnp::vm::Client,
    exec: &[&str],
    files: capvisor_rpc::schema::capvisor_capnp::FilesAccess,
    prefixes: &[&str],
    budget: u64,
    expires_at_ms: i64,
) -> capvisor_rpc::schema::capvisor_capnp::vm::Client {
    let mut req = vm.narrow_request();
    {
        let mut n = req.get().init_narrowing();
        let mut l = n.reborrow().init_exec_allow(exec.len() as u32);
        for (i, e) in exec.iter().enumerate() {
            l.set(i as u32, *e);
        }
        n.set_files(files);
        let mut l = n.reborrow().init_write_prefixes(prefixes.len() as u32);
        for (i, p) in prefixes.iter().enumerate() {
            l.set(i as u32, *p);
        }
        n.set_call_budget(budget);
        n.set_expires_at_ms(expires_at_ms);
    }
    req.send().pipeline.get_vm()
}

/// A narrowed `Vm` through the real worker and guest-init: only the
/// allowed program runs, files are read-only, stop and connect are
/// denied, narrowing it again cannot widen it, its budget and expiry end
/// it, each denial is typed and audited, and the session's own cap is
/// untouched; logout kills the narrowed cap too.
#[test]
fn a_narrowed_vm_allows_only_what_it_says() {
    use capvisor_rpc::schema::capvisor_capnp::FilesAccess;
    run(async {
        let env = Worker::with_guest_init("inproc", |_| {});
        let s = env.attach().await;
        let vm = ops::create_vm(&ops::vms(&s), &spec("n"));
        let agent = narrow(&vm, &["echo"], FilesAccess::ReadOnly, &[], 0, 0);
        assert_eq!(echo(&agent, "allowed").await.unwrap(), "allowed\n");
        assert_eq!(code(ops::exec_collect(&agent, &["cat"], b"", 1 << 10).await), ErrorCode::Denied);
        assert_eq!(code(ops::exec_collect(&agent, &["/bin/echo", "x"], b"", 1 << 10).await), ErrorCode::Denied);
        assert_eq!(code(ops::stop_vm(&agent).await), ErrorCode::Denied);
        let files = ops::files(&agent);
        ops::list_dir(&files, "/").await.unwrap();
        let w = ops::write_file(&files, "/tmp/capvisor-narrow-test", 0o644, &b"no"[..]).await;
        assert_eq!(code(w), ErrorCode::Denied);
        assert!(!std::path::Path::new("/tmp/capvisor-narrow-test").exists(), "nothing was written");
        let (down, _) = CollectSink::client(1 << 10);
        assert_eq!(code(ops::connect_port(&agent, 22, down).await.map(drop)), ErrorCode::Denied);
        // Narrowing again with more programs and file access: still only echo, read-only.
        let wider = narrow(&agent, &["echo", "cat"], FilesAccess::ReadWrite, &["/"], 0, 0);
        assert_eq!(code(ops::exec_collect(&wider, &["cat"], b"", 1 << 10).await), ErrorCode::Denied);
        let w = ops::write_file(&ops::files(&wider), "/tmp/capvisor-narrow-test", 0o644, &b"no"[..]).await;
        assert_eq!(code(w), ErrorCode::Denied);
        assert_eq!(echo(&wider, "still").await.unwrap(), "still\n");
        // A budget of 2 calls, then denied; an expiry in the past denies at once.
        let two = narrow(&vm, &["echo"], FilesAccess::None, &[], 2, 0);
        ops::ping(&two).await.unwrap();
        ops::ping(&two).await.unwrap();
        assert_eq!(code(ops::ping(&two).await), ErrorCode::Denied);
        let old = narrow(&vm, &["echo"], FilesAccess::None, &[], 0, 1);
        assert_eq!(code(ops::ping(&old).await), ErrorCode::Denied);
        // The session's own cap is untouched.
        let out = ops::exec_collect(&vm, &["cat"], b"own", 1 << 10).await.unwrap();
        assert_eq!(out.stdout, b"own");
        {
            let seen = env.seen.borrow();
            assert!(seen.audit.contains(&("vm.narrow".into(), "ok".into())));
            assert!(seen.audit.iter().any(|(a, o)| a == "vm.narrowed.denied" && o == "denied"));
        }
        // Logout cuts the narrowed caps with the session.
        ops::logout(&s).await.unwrap();
        assert_eq!(code(ops::ping(&agent).await), ErrorCode::StaleSession);
    });
}

/// Shares `cap` as `name` through `shares` (ttl 60 s); returns (grant id, token).
async fn share(
    shares: &capvisor_rpc::schema::capvisor_capnp::shares::Client,
    name: &str,
    cap: &capvisor_rpc::schema::capvisor_capnp::vm::Client,
    label: &str,
    reshare: bool,
) -> Result<(String, String), ClientError> {
    let mut req = shares.share_request();
    {
        let mut spec = req.get().init_spec();
        let mut c = spec.reborrow().init_caps(1).get(0);
        c.set_name(name);
        c.init_cap().set_as_capability(cap.client.hook.add_ref());
        spec.set_label(label);
        spec.set_ttl_ms(60_000);
        spec.set_reshare(reshare);
    }
    let resp = req.send().promise.await?;
    let r = resp.get()?;
    Ok((r.get_grant()?.get_id()?.to_string().unwrap(), r.get_token()?.to_string().unwrap()))
}

#[test]
fn a_grant_holds_its_narrowing_and_dies_with_everything_made_through_it() {
    use capvisor_rpc::schema::capvisor_capnp::{shares, vm, FilesAccess};
    run(async {
        let env = Worker::with_guest_init("inproc", |b| b.caps.push("shares".into()));
        let s = env.attach().await;
        let own = ops::create_vm(&ops::vms(&s), &spec("n"));
        let my_shares: shares::Client = ops::get_cap(&ops::cap_set(&s), "shares");
        // Only a narrowed cap of this session can be shared.
        assert_eq!(code(share(&my_shares, "box", &own, "wide", false).await), ErrorCode::InvalidArgument);
        let narrowed = narrow(&own, &["echo", "cat"], FilesAccess::ReadOnly, &[], 0, 0);
        let (outer, token) = share(&my_shares, "box", &narrowed, "agent", true).await.unwrap();
        assert_eq!(token, format!("token-{outer}"), "the broker's token is handed back once");

        // The holder's session: exactly the shared VM (and shares, since it may reshare).
        let holder = common::attach_delegate(&env.st, &outer).await.unwrap();
        let info = ops::session_info(&holder).await.unwrap();
        assert_eq!((info.principal.to_string(), info.profile.as_str()), (format!("grant:{outer}"), "delegate"));
        let names: Vec<String> =
            ops::list_caps(&ops::cap_set(&holder)).await.unwrap().into_iter().map(|c| c.name).collect();
        assert_eq!(names, ["box", "shares"]);
        assert_eq!(
            code(ops::list_vms(&ops::vms(&holder)).await),
            ErrorCode::NotFound,
            "no factory in a delegate session"
        );
        let boxed: vm::Client = ops::get_cap(&ops::cap_set(&holder), "box");
        assert_eq!(echo(&boxed, "held").await.unwrap(), "held\n");
        assert_eq!(code(ops::exec_collect(&boxed, &["sh", "-c", "id"], b"", 1 << 10).await), ErrorCode::Denied);
        assert_eq!(code(ops::stop_vm(&boxed).await), ErrorCode::Denied);

        // The holder shares onward, narrower: only echo.
        let their_shares: shares::Client = ops::get_cap(&ops::cap_set(&holder), "shares");
        let narrower = narrow(&boxed, &["echo"], FilesAccess::None, &[], 0, 0);
        let (inner, _) = share(&their_shares, "box", &narrower, "sub-agent", false).await.unwrap();
        // The holder cannot share the grantor's own VM, which it never held.
        let sub = common::attach_delegate(&env.st, &inner).await.unwrap();
        let sub_names: Vec<String> =
            ops::list_caps(&ops::cap_set(&sub)).await.unwrap().into_iter().map(|c| c.name).collect();
        assert_eq!(sub_names, ["box"], "no resharing unless allowed");
        let sub_box: vm::Client = ops::get_cap(&ops::cap_set(&sub), "box");
        assert_eq!(echo(&sub_box, "sub").await.unwrap(), "sub\n");
        assert_eq!(code(ops::exec_collect(&sub_box, &["cat"], b"", 1 << 10).await), ErrorCode::Denied);
        // The holder sees only what was made through its grant.
        let listed = their_shares.list_request().send().promise.await.unwrap();
        let ids: Vec<String> = listed
            .get()
            .unwrap()
            .get_grants()
            .unwrap()
            .iter()
            .map(|g| g.get_id().unwrap().to_string().unwrap())
            .collect();
        assert_eq!(ids, std::slice::from_ref(&inner));
        let mut req = their_shares.revoke_request();
        req.get().set_grant_id(outer.as_str());
        assert_eq!(code(req.send().promise.await.map(drop).map_err(ClientError::from)), ErrorCode::NotFound);

        // A long exec in flight through the grant: `cat` with stdin open.
        let (o, _) = CollectSink::client(1 << 10);
        let (e, _) = CollectSink::client(1 << 10);
        let req = ops::ExecRequest { argv: vec!["cat".into()], keep_stdin_open: true, ..Default::default() };
        let running = ops::exec(&boxed, &req, o, e);
        ops::write_stdin(&running, b"x").await.unwrap();
        let waiting = tokio::task::spawn_local({
            let running = running.clone();
            async move { ops::wait(&running).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;

        // Revoke the outer grant: the call in flight, the holder, and the sub-share all end.
        let t0 = std::time::Instant::now();
        let mut req = my_shares.revoke_request();
        req.get().set_grant_id(outer.as_str());
        req.send().promise.await.unwrap();
        assert_eq!(code(waiting.await.unwrap()), ErrorCode::StaleSession);
        let took = t0.elapsed();
        assert_eq!(code(echo(&boxed, "x").await), ErrorCode::StaleSession);
        assert_eq!(code(echo(&sub_box, "x").await), ErrorCode::StaleSession);
        assert_eq!(code(ops::session_info(&holder).await), ErrorCode::StaleSession);
        assert!(common::attach_delegate(&env.st, &inner).await.is_err(), "an ended grant does not attach");
        eprintln!("revoke to the failed call in flight: {took:?}");
        // The grantor keeps working, narrowed caps of its own included.
        assert_eq!(echo(&own, "mine").await.unwrap(), "mine\n");
        assert_eq!(echo(&narrowed, "still").await.unwrap(), "still\n");
        {
            let seen = env.seen.borrow();
            let mut ended: Vec<&str> = seen.grants_ended.iter().map(|(id, _)| id.as_str()).collect();
            ended.sort();
            let mut want = vec![outer.as_str(), inner.as_str()];
            want.sort();
            assert_eq!(ended, want, "the broker is told of both");
            assert_eq!(seen.grants_added[1].2, [outer.clone(), inner.clone()], "the sub-share's chain");
            // Calls through the grants are audited with their chains.
            assert!(seen.audit_chains.iter().any(|(a, o, c)| a == "vm.exec" && o == "ok" && *c == [outer.clone()]));
            assert!(seen
                .audit_chains
                .iter()
                .any(|(a, o, c)| a == "vm.narrowed.denied" && o == "denied" && *c == [outer.clone(), inner.clone()]));
        }
        // The grantor's list shows both, ended.
        let listed = my_shares.list_request().send().promise.await.unwrap();
        let grants = listed.get().unwrap().get_grants().unwrap();
        assert_eq!(grants.len(), 2);
        assert!(grants.iter().all(|g| g.get_revoked()));
    });
}

/// A narrowed `Vm` allowed to exec `ln` and write under `<tmp>/work`
/// makes `<tmp>/work/out` a symlink to `<tmp>/secret`: the worker's string
/// check passes `<tmp>/work/out/x`, and guest-init, resolving it beneath
/// the prefix (openat2 RESOLVE_BENEATH), refuses it with `denied`; nothing
/// reaches `<tmp>/secret`. Plain writes under the prefix still work, and
/// the session's own (unnarrowed) `Files` is not confined.
#[test]
fn a_narrowed_write_cannot_follow_a_symlink_out_of_its_prefix() {
    use capvisor_rpc::schema::capvisor_capnp::FilesAccess;
    run(async {
        let env = Worker::with_guest_init("inproc", |_| {});
        let s = env.attach().await;
        let vm = ops::create_vm(&ops::vms(&s), &spec("b"));
        let tmp = tempfile::tempdir().unwrap();
        let (work, secret) = (tmp.path().join("work"), tmp.path().join("secret"));
        std::fs::create_dir(&work).unwrap();
        std::fs::create_dir(&secret).unwrap();
        let (work_s, secret_s) = (work.to_str().unwrap(), secret.to_str().unwrap());
        let agent = narrow(&vm, &["ln"], FilesAccess::ReadWrite, &[tmp.path().to_str().unwrap(), work_s], 0, 0);
        let files = ops::files(&agent);
        let ok = format!("{work_s}/ok");
        assert_eq!(ops::write_file(&files, &ok, 0o644, &b"fine"[..]).await.unwrap(), 4);
        assert_eq!(std::fs::read(&ok).unwrap(), b"fine");
        let out = format!("{work_s}/out");
        let made = ops::exec_collect(&agent, &["ln", "-s", secret_s, &out], b"", 1 << 10).await.unwrap();
        assert_eq!(made.exit, ops::Exit::Code(0), "{}", String::from_utf8_lossy(&made.stderr));
        assert!(std::fs::symlink_metadata(&out).unwrap().file_type().is_symlink());
        let escaped = format!("{out}/x");
        let w = ops::write_file(&files, &escaped, 0o644, &b"owned"[..]).await;
        match w {
            Err(ClientError::Domain(e)) => {
                assert_eq!(e.code, ErrorCode::Denied, "{e:?}");
                assert!(e.message.contains(&format!("resolves outside {work_s}")), "the longest prefix: {e:?}");
            }
            other => panic!("expected denied, got {other:?}"),
        }
        assert_eq!(std::fs::read_dir(&secret).unwrap().count(), 0, "nothing written outside the prefix");
        // The session's own Files passes no `beneath`: the same path goes through.
        ops::write_file(&ops::files(&vm), &escaped, 0o644, &b"own"[..]).await.unwrap();
        assert_eq!(std::fs::read(secret.join("x")).unwrap(), b"own");
    });
}

#[test]
fn a_missing_cap_is_a_typed_not_found_through_a_pipelined_call() {
    run(async {
        let env = Worker::with_guest_init("inproc", |b| b.caps.retain(|c| c != "audit"));
        let s = env.attach().await;
        let a: capvisor_rpc::schema::capvisor_capnp::audit::Client = ops::get_cap(&ops::cap_set(&s), "audit");
        let r = a.query_request().send().promise.await.map(drop).map_err(ClientError::from);
        assert_eq!(code(r), ErrorCode::NotFound);
    });
}

#[test]
fn keep_refuses_bad_and_taken_names_and_drop_forgets() {
    use capnp::traits::HasTypeId;
    use capvisor_rpc::schema::capvisor_capnp::vm;
    run(async {
        let env = Worker::with_guest_init("inproc", |b| b.caps.retain(|c| c != "netlog"));
        let s = env.attach().await;
        let cs = ops::cap_set(&s);
        let own = ops::create_vm(&ops::vms(&s), &spec("k"));
        let keep = |name: &str| {
            let mut req = cs.keep_request();
            req.get().set_cap_name(name);
            req.get().set_interface_id(vm::Client::TYPE_ID);
            req.get().init_cap().set_as_capability(own.client.hook.add_ref());
            async move { req.send().promise.await.map(drop).map_err(ClientError::from) }
        };
        assert_eq!(code(keep("vms").await), ErrorCode::AlreadyExists, "a bundle cap's name");
        assert_eq!(code(keep("Bad Name").await), ErrorCode::InvalidArgument);
        keep("mine").await.unwrap();
        let kept: vm::Client = ops::get_cap(&cs, "mine");
        assert_eq!(echo(&kept, "kept").await.unwrap(), "kept\n");
        let drop_ = |name: &str| {
            let mut req = cs.drop_request();
            req.get().set_cap_name(name);
            async move { req.send().promise.await.map(drop).map_err(ClientError::from) }
        };
        drop_("mine").await.unwrap();
        assert_eq!(code(drop_("mine").await), ErrorCode::NotFound, "dropped once");
        let gone: vm::Client = ops::get_cap(&cs, "mine");
        assert_eq!(code(ops::vm_info(&gone).await), ErrorCode::NotFound);
        // The session's factory has no NetLog view without the netlog cap.
        let log = ops::vms(&s).net_log_request().send().pipeline.get_log();
        let r = log.recent_request().send().promise.await.map(drop).map_err(ClientError::from);
        assert_eq!(code(r), ErrorCode::NotFound);
    });
}
