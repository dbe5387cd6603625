//! A narrowed `VmFactory` in-process (issue 10, item 1): the worker's real
//! caps with guest-init's real `Guest` server per VM (see `inproc`). It
//! creates only within its bounds, sees only its own VMs, hands out VMs
//! narrowed as it says, and, shared, dies with its grant.

mod common;

use capvisor_client::{ops, ClientError};
use capvisor_rpc::schema::capvisor_capnp::{shares, vm, vm_factory, Engine, FilesAccess};
use capvisor_rpc::schema::common_capnp::ErrorCode;
use common::{code, run, spec, Worker};

/// `f.narrow(...)`: up to `max` VMs of image base, each allowing `exec`.
fn narrow(f: &vm_factory::Client, max: u32, exec: &[&str], budget: u64) -> vm_factory::Client {
    let mut req = f.narrow_request();
    {
        let mut n = req.get().init_narrowing();
        n.set_max_vms(max);
        n.reborrow().init_images(1).set(0, "base");
        n.set_max_memory_mib(256);
        n.set_call_budget(budget);
        let mut v = n.init_vm_narrowing();
        let mut l = v.reborrow().init_exec_allow(exec.len() as u32);
        for (i, e) in exec.iter().enumerate() {
            l.set(i as u32, *e);
        }
        v.set_files(FilesAccess::ReadOnly);
    }
    req.send().pipeline.get_vms()
}

async fn echo(vm: &vm::Client, word: &str) -> Result<String, ClientError> {
    let out = ops::exec_collect(vm, &["echo", word], b"", 1 << 16).await?;
    Ok(String::from_utf8(out.stdout).unwrap())
}

#[test]
fn a_narrowed_factory_creates_within_its_bounds_and_sees_only_its_own_vms() {
    run(async {
        let env = Worker::with_guest_init("inproc", |b| b.caps.push("shares".into()));
        let s = env.attach().await;
        let own = ops::vms(&s);
        let mine = ops::create_vm(&own, &spec("mine"));
        assert_eq!(echo(&mine, "m").await.unwrap(), "m\n");

        let f = narrow(&own, 2, &["echo"], 0);
        let a = ops::create_vm(&f, &spec("a"));
        assert_eq!(echo(&a, "a").await.unwrap(), "a\n");
        assert_eq!(code(ops::exec_collect(&a, &["cat"], b"", 16).await), ErrorCode::Denied, "VMs come narrowed");
        assert_eq!(code(ops::remove_vm(&f, "mine").await), ErrorCode::NotFound, "the grantor's VM is invisible");
        assert_eq!(code(ops::vm_info(&ops::get_vm(&f, "mine")).await), ErrorCode::NotFound);
        let big = ops::VmSpec { memory_mib: 1024, ..spec("big") };
        assert_eq!(code(ops::vm_info(&ops::create_vm(&f, &big)).await), ErrorCode::Quota);
        let deb = ops::VmSpec { image: "debian".into(), ..spec("deb") };
        assert_eq!(code(ops::vm_info(&ops::create_vm(&f, &deb)).await), ErrorCode::Denied);
        ops::vm_info(&ops::create_vm(&f, &spec("b"))).await.unwrap();
        assert_eq!(code(ops::vm_info(&ops::create_vm(&f, &spec("c"))).await), ErrorCode::Quota, "max 2");
        let names: Vec<String> = ops::list_vms(&f).await.unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["a", "b"]);
        // A narrower factory from it counts against it too, and intersects.
        let g = narrow(&f, 5, &["echo", "cat"], 0);
        assert_eq!(code(ops::vm_info(&ops::create_vm(&g, &spec("d"))).await), ErrorCode::Quota, "the parent is full");
        ops::remove_vm(&f, "b").await.unwrap();
        let d = ops::create_vm(&g, &spec("d"));
        assert_eq!(code(ops::exec_collect(&d, &["cat"], b"", 16).await), ErrorCode::Denied, "cat never allowed");
        let names: Vec<String> = ops::list_vms(&f).await.unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["a", "d"], "the parent sees its child's VMs");
        let names: Vec<String> = ops::list_vms(&g).await.unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["d"], "the child sees only its own");
        // The session's own factory sees all, and they count against its quota.
        assert_eq!(ops::list_vms(&own).await.unwrap().len(), 3);

        // Shared: the holder's factory dies with the grant, and so do its VMs' caps.
        let my_shares: shares::Client = ops::get_cap(&ops::cap_set(&s), "shares");
        let mut req = my_shares.share_request();
        {
            let mut spec = req.get().init_spec();
            let mut c = spec.reborrow().init_caps(1).get(0);
            c.set_name("vms");
            c.init_cap().set_as_capability(narrow(&own, 1, &["echo"], 0).client.hook);
            spec.set_ttl_ms(60_000);
        }
        let resp = req.send().promise.await.unwrap();
        let id = resp.get().unwrap().get_grant().unwrap().get_id().unwrap().to_string().unwrap();
        let holder = common::attach_delegate(&env.st, &id).await.unwrap();
        let caps = ops::list_caps(&ops::cap_set(&holder)).await.unwrap();
        assert_eq!((caps[0].name.as_str(), caps[0].interface_name.as_str()), ("vms", "VmFactory"));
        let hf = ops::vms(&holder);
        let h = ops::create_vm(&hf, &spec("h"));
        assert_eq!(echo(&h, "h").await.unwrap(), "h\n");
        let names: Vec<String> = ops::list_vms(&hf).await.unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["h"]);
        let mut req = my_shares.revoke_request();
        req.get().set_grant_id(id.as_str());
        req.send().promise.await.unwrap();
        assert_eq!(code(echo(&h, "x").await), ErrorCode::StaleSession);
        assert_eq!(code(ops::list_vms(&hf).await), ErrorCode::StaleSession);
        // The VM it made is the session's: still there for the grantor.
        let h_own = ops::get_vm(&own, "h");
        assert_eq!(echo(&h_own, "still").await.unwrap(), "still\n");
        let seen = env.seen.borrow();
        assert!(seen.audit_chains.iter().any(|(a, o, c)| a == "vm.create" && o == "ok" && *c == [id.clone()]));
        assert!(seen.audit.iter().any(|(a, o)| a == "vms.narrowed.denied" && o == "quota"));
    });
}

/// `f.narrow(...)` to engines `engines` (up to 4 VMs of base, `echo` only).
fn narrow_engines(f: &vm_factory::Client, engines: &[Engine]) -> vm_factory::Client {
    narrow_engines_req(f, engines).send().pipeline.get_vms()
}

fn narrow_engines_req(
    f: &vm_factory::Client,
    engines: &[Engine],
) -> capnp::capability::Request<vm_factory::narrow_params::Owned, vm_factory::narrow_results::Owned> {
    let mut req = f.narrow_request();
    {
        let mut n = req.get().init_narrowing();
        n.set_max_vms(4);
        n.reborrow().init_images(1).set(0, "base");
        let mut l = n.reborrow().init_engines(engines.len() as u32);
        for (i, e) in engines.iter().enumerate() {
            l.set(i as u32, *e);
        }
        n.init_vm_narrowing().init_exec_allow(1).set(0, "echo");
    }
    req
}

/// Engines: a narrowed factory boots only the engines it lists; `auto` is
/// checked as what it means here (kvm, by the manifest) and, when the list
/// is not both, runs on that engine only: no fallback to qemu when kvm
/// fails, which the session's own factory does. Narrowing again
/// intersects; `auto` in the list is refused.
#[test]
fn a_narrowed_factory_boots_only_its_engines_and_auto_never_falls_back_outside_them() {
    run(async {
        let env = Worker::with_guest_init_auto("inproc", |_| {}, Engine::Kvm);
        let s = env.attach().await;
        let own = ops::vms(&s);
        let auto = |name: &str| ops::VmSpec { engine: Engine::Auto, ..spec(name) };
        let on = |name: &str, engine| ops::VmSpec { engine, ..spec(name) };
        let launched = |env: &Worker| env.seen.borrow().launched.iter().map(|c| c.engine).collect::<Vec<_>>();

        let qemu_only = narrow_engines(&own, &[Engine::Qemu]);
        assert_eq!(code(ops::vm_info(&ops::create_vm(&qemu_only, &on("k", Engine::Kvm))).await), ErrorCode::Denied);
        assert_eq!(
            code(ops::vm_info(&ops::create_vm(&qemu_only, &auto("a"))).await),
            ErrorCode::Denied,
            "auto means kvm here"
        );
        assert!(launched(&env).is_empty(), "a denied create launches nothing");
        let q = ops::create_vm(&qemu_only, &on("q", Engine::Qemu));
        assert_eq!(echo(&q, "q").await.unwrap(), "q\n");
        assert_eq!(launched(&env), [Engine::Qemu]);

        // kvm fails to launch: the session's own auto falls back to qemu,
        // a kvm-only factory's auto does not.
        env.seen.borrow_mut().failing_engine = Some(Engine::Kvm);
        let kvm_only = narrow_engines(&own, &[Engine::Kvm]);
        assert_eq!(code(ops::vm_info(&ops::create_vm(&kvm_only, &auto("b"))).await), ErrorCode::Unavailable);
        assert_eq!(launched(&env), [Engine::Qemu, Engine::Kvm], "no qemu fallback");
        assert_eq!(ops::list_vms(&kvm_only).await.unwrap().len(), 0, "the failed VM is forgotten");
        let fallback = ops::create_vm(&own, &auto("c"));
        assert_eq!(ops::vm_info(&fallback).await.unwrap().engine, Engine::Qemu);
        assert_eq!(launched(&env), [Engine::Qemu, Engine::Kvm, Engine::Kvm, Engine::Qemu]);
        let both = narrow_engines(&own, &[]);
        let d = ops::create_vm(&both, &auto("d"));
        assert_eq!(ops::vm_info(&d).await.unwrap().engine, Engine::Qemu, "a factory allowing both keeps the fallback");

        // Narrowing again intersects: qemu then kvm leaves none.
        let none = narrow_engines(&qemu_only, &[Engine::Kvm]);
        assert_eq!(code(ops::vm_info(&ops::create_vm(&none, &on("n", Engine::Qemu))).await), ErrorCode::Denied);
        let still_qemu = narrow_engines(&qemu_only, &[]);
        assert_eq!(code(ops::vm_info(&ops::create_vm(&still_qemu, &on("k2", Engine::Kvm))).await), ErrorCode::Denied);
        let r = narrow_engines_req(&own, &[Engine::Auto]).send().promise.await;
        assert_eq!(
            code(r.map(drop).map_err(ClientError::from)),
            ErrorCode::InvalidArgument,
            "auto is no engine to list"
        );
        let denied =
            env.seen.borrow().audit.iter().filter(|(a, o)| a == "vms.narrowed.denied" && o == "denied").count();
        assert_eq!(denied, 4, "every engine denial is audited");
    });
}
