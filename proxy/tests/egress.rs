//! The egress proxy in-process: a guest-init stand-in calls `Egress` over
//! a socketpair served by `capvisor_proxy::serve_vm`, against real
//! upstream `TcpListener`s on 127.0.0.1 that each test starts. Names are
//! answered by resolve overrides (`api.test` -> 127.0.0.1); nothing leaves
//! loopback (denied addresses are refused before any connect).

mod common;

use capvisor_proxy::log::Flow as NetFlow;
use capvisor_proxy::policy::{Action, NetPolicyServer, Rule};
use capvisor_proxy::{Config, Limits, ProxyState};
use capvisor_rpc::conn::{self, INTERNAL};
use capvisor_rpc::fdpass::{self, FdChannel};
use capvisor_rpc::spawn::into_tokio;
use capvisor_schema::capvisor_capnp::net_policy;
use capvisor_schema::common_capnp::ErrorCode;
use capvisor_schema::internal_capnp::proxy;
use common::*;
use std::net::IpAddr;
use std::rc::Rc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(rules: Vec<Rule>) -> Config {
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    Config {
        session_id: "test".into(),
        rules,
        resolve: vec![("api.test".into(), vec![lo]), ("other.test".into(), vec![lo])],
        log_capacity: 0,
        ..Config::default()
    }
}

/// A proxy with `rules` serving VM "vm1" to a fresh guest stand-in.
fn proxy(rules: Vec<Rule>, limits: Limits) -> (Rc<ProxyState>, capvisor_schema::guest_capnp::egress::Client) {
    let state = ProxyState::with_limits(config(rules), limits).unwrap();
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    capvisor_proxy::serve_vm(&state, "vm1", a).unwrap();
    let (eg, _conn) = guest(b);
    (state, eg)
}

async fn set_rules(policy: &net_policy::Client, rules: &[Rule]) -> Result<(), capnp::Error> {
    let mut req = policy.set_request();
    let mut list = req.get().init_rules(rules.len() as u32);
    for (i, r) in rules.iter().enumerate() {
        r.write(list.reborrow().get(i as u32));
    }
    req.send().promise.await.map(|_| ())
}

/// DNS answers follow the allow/ask rules' host globs; deny rules and
/// unmatched names get NXDOMAIN (false), and so does a name that is not one.
#[test]
fn resolve_is_allowed_only_for_names_an_allow_or_ask_rule_matches() {
    conn::run_local(async {
        let (_state, eg) = proxy(
            vec![
                Rule::host("blocked.test", Action::Deny),
                Rule::host("*.pypi.test", Action::Allow),
                Rule::host("api.test", Action::Allow),
                Rule::host("maybe.test", Action::Ask),
            ],
            capvisor_proxy::LIMITS,
        );
        assert!(resolve(&eg, "files.pypi.test").await);
        assert!(resolve(&eg, "API.test.").await, "case and a final dot do not matter");
        assert!(resolve(&eg, "maybe.test").await);
        assert!(!resolve(&eg, "pypi.test").await, "a subdomain glob does not cover the apex");
        assert!(!resolve(&eg, "blocked.test").await);
        assert!(!resolve(&eg, "unknown.test").await);
        assert!(!resolve(&eg, "bad name").await);
    });
}

/// A `*` allow rule does not reach loopback (by name or literal),
/// 169.254.169.254 or 10.x; the denials are typed, logged with the rule
/// and the reason, and nothing reaches the upstream: the first connection
/// it accepts is the one a rule naming `api.test` allowed after a live
/// `NetPolicy.set`.
#[test]
fn non_public_addresses_need_a_rule_naming_the_host() {
    conn::run_local(async {
        let (up, port) = listener().await;
        let (state, eg) = proxy(vec![Rule::host("*", Action::Allow)], capvisor_proxy::LIMITS);
        for host in ["api.test", "127.0.0.1", "169.254.169.254", "10.1.2.3", "192.168.0.1"] {
            let f = connect(&eg, host, port).await;
            let e = f.up.err().unwrap_or_else(|| panic!("{host} must be denied"));
            assert_eq!(code(&e), ErrorCode::Denied, "{host}: {e}");
        }
        let log = flows(&state);
        assert_eq!(log.len(), 5);
        let expect = ["loopback", "loopback", "link-local", "private", "private"];
        for (f, why) in log.iter().zip(expect) {
            assert_eq!((f.rule, f.action, f.vm.as_str(), f.port), (0, Action::Deny, "vm1", port), "{f:?}");
            assert!(f.detail.contains(why), "{f:?}");
            assert_eq!((f.bytes_up, f.bytes_down), (0, 0));
        }
        assert_eq!(log[0].address, "127.0.0.1");
        assert_eq!(log[2].address, "169.254.169.254");

        // A wildcard that covers the name is still a wildcard.
        let policy = NetPolicyServer::client(state.policy.clone());
        set_rules(&policy, &[Rule::host("*.test", Action::Allow)]).await.unwrap();
        assert_eq!(code(&connect(&eg, "api.test", port).await.up.err().unwrap()), ErrorCode::Denied);

        // The next connect sees the new rules: an exact rule reaches it.
        set_rules(
            &policy,
            &[Rule::host("other.test", Action::Deny), Rule::host("api.test", Action::Allow).on_port(port)],
        )
        .await
        .unwrap();
        let f = connect(&eg, "api.test", port).await;
        let sink = f.up.expect("the explicit rule allows loopback");
        capvisor_rpc::sink::write_all(&sink, b"first").await.unwrap();
        sink.done_request().send().promise.await.unwrap();
        let (mut s, _) = up.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"first", "the first connection upstream saw is the allowed one");
        drop(s);
        assert_eq!(f.down.await.unwrap(), b"");
        let last = flows(&state).pop().unwrap();
        assert_eq!((last.rule, last.action, last.address.as_str()), (1, Action::Allow, "127.0.0.1"));
        // Rule 0 now denies other.test; another port is in no rule.
        let e = connect(&eg, "other.test", port).await.up.err().unwrap();
        assert_eq!(code(&e), ErrorCode::Denied);
        let e = connect(&eg, "api.test", port.wrapping_add(1)).await.up.err().unwrap();
        assert_eq!(code(&e), ErrorCode::Denied);
        let log = flows(&state);
        let (a, b) = (&log[log.len() - 2], &log[log.len() - 1]);
        assert_eq!((a.rule, a.detail.as_str()), (0, "denied by rule 0"));
        assert_eq!((b.rule, b.detail.as_str()), (-1, "no rule allows it"));
        // get returns what set stored.
        let got = policy.get_request().send().promise.await.unwrap();
        let rules = got.get().unwrap().get_rules().unwrap();
        assert_eq!(
            capvisor_proxy::policy::read_rules(rules).unwrap()[1],
            Rule::host("api.test", Action::Allow).on_port(port)
        );
    });
}

/// `NetPolicy.set` refuses a bad rule list with `invalidArgument` naming
/// the rule and field, and the old rules stay in force.
#[test]
fn a_bad_rule_set_is_refused_and_changes_nothing() {
    conn::run_local(async {
        let (state, _eg) = proxy(vec![Rule::host("api.test", Action::Allow)], capvisor_proxy::LIMITS);
        let policy = NetPolicyServer::client(state.policy.clone());
        let bad = Rule { scheme: "gopher".into(), ..Rule::host("x.test", Action::Allow) };
        let e = set_rules(&policy, &[Rule::host("ok.test", Action::Allow), bad]).await.unwrap_err();
        let cv = capvisor_rpc::CvError::from_rpc(&e).unwrap();
        assert_eq!(cv.code, ErrorCode::InvalidArgument);
        assert!(cv.message.starts_with("rule 1: scheme"), "{}", cv.message);
        assert_eq!(state.policy.borrow().rules(), &[Rule::host("api.test", Action::Allow)]);
    });
}

/// 8 MiB each way at once through one relayed connection, with the
/// guest's half-close reaching upstream while upstream still sends; both
/// sides get exactly the other's bytes, and the NetLog entry gets the
/// byte counts once the flow ends.
#[test]
fn eight_mib_each_way_arrive_intact_with_half_close() {
    const N: usize = 8 << 20;
    conn::run_local(async {
        let (up, port) = listener().await;
        let (state, eg) = proxy(vec![Rule::host("api.test", Action::Allow).on_port(port)], capvisor_proxy::LIMITS);
        let to_upstream = pattern(N, 7);
        let to_guest = pattern(N, 11);
        let upstream = {
            let to_guest = to_guest.clone();
            tokio::task::spawn_local(async move {
                let (s, _) = up.accept().await.unwrap();
                let (mut rd, mut wr) = s.into_split();
                let writer = tokio::task::spawn_local(async move {
                    wr.write_all(&to_guest).await.unwrap();
                    wr.shutdown().await.unwrap();
                });
                let mut got = Vec::new();
                rd.read_to_end(&mut got).await.unwrap();
                writer.await.unwrap();
                got
            })
        };
        let f = connect(&eg, "api.test", port).await;
        let sink = f.up.unwrap();
        let send = async {
            capvisor_rpc::sink::write_all(&sink, &to_upstream).await.unwrap();
            sink.done_request().send().promise.await.unwrap();
        };
        let (_, down, got_up) = tokio::join!(send, f.down, upstream);
        let down = down.unwrap();
        assert_eq!(down.len(), N);
        assert!(down == to_guest, "upstream -> guest bytes differ");
        let got_up = got_up.unwrap();
        assert_eq!(got_up.len(), N);
        assert!(got_up == to_upstream, "guest -> upstream bytes differ");
        drop(sink);
        assert!(eventually(|| state.open() == 0).await, "the flow never ended");
        let f = flows(&state).pop().unwrap();
        assert_eq!((f.bytes_up, f.bytes_down), (N as u64, N as u64));
        assert_eq!(
            (f.rule, f.action, f.host.as_str(), f.address.as_str()),
            (0, Action::Allow, "api.test", "127.0.0.1")
        );
    });
}

/// Releasing `up` without `done` resets the flow: upstream's read ends;
/// and when the VM's Egress connection ends, its other flows close too.
#[test]
fn a_released_up_sink_or_a_closed_vm_port_closes_upstream() {
    conn::run_local(async {
        let (up, port) = listener().await;
        let state =
            ProxyState::with_limits(config(vec![Rule::host("api.test", Action::Allow)]), capvisor_proxy::LIMITS)
                .unwrap();
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let vm_task = capvisor_proxy::serve_vm(&state, "vm1", a).unwrap();
        let (eg, guest_conn) = guest(b);
        let first = connect(&eg, "api.test", port).await;
        let (mut s1, _) = up.accept().await.unwrap();
        let second = connect(&eg, "api.test", port).await;
        let (mut s2, _) = up.accept().await.unwrap();
        assert_eq!(state.open(), 2);
        drop(first.up.unwrap());
        let mut buf = [0u8; 16];
        assert!(matches!(s1.read(&mut buf).await, Ok(0) | Err(_)), "upstream 1 must see its end");
        assert!(eventually(|| state.open() == 1).await);
        // The guest goes away with flow 2 open (and its `up` still held).
        let _keep = second.up.unwrap();
        guest_conn.abort();
        drop(eg);
        vm_task.await.unwrap();
        assert!(matches!(s2.read(&mut buf).await, Ok(0) | Err(_)), "upstream 2 must see its end");
        assert!(eventually(|| state.open() == 0).await);
    });
}

/// At most `per_vm` connections per VM and `total` per proxy: the next
/// gets `quota` (logged), and a closed one frees its slot.
#[test]
fn open_connections_are_bounded_per_vm_and_per_proxy() {
    conn::run_local(async {
        let (up, port) = listener().await;
        let state = ProxyState::with_limits(
            config(vec![Rule::host("api.test", Action::Allow)]),
            Limits { per_vm: 2, total: 3 },
        )
        .unwrap();
        let mut guests = Vec::new();
        for vm in ["vm1", "vm2"] {
            let (a, b) = tokio::net::UnixStream::pair().unwrap();
            capvisor_proxy::serve_vm(&state, vm, a).unwrap();
            guests.push(guest(b).0);
        }
        let a1 = connect(&guests[0], "api.test", port).await.up.unwrap();
        let _a2 = connect(&guests[0], "api.test", port).await.up.unwrap();
        let e = connect(&guests[0], "api.test", port).await.up.err().expect("must fail");
        assert_eq!(code(&e), ErrorCode::Quota);
        assert!(e.to_string().contains("VM vm1"), "{e}");
        let _b1 = connect(&guests[1], "api.test", port).await.up.unwrap();
        let e = connect(&guests[1], "api.test", port).await.up.err().expect("must fail");
        assert_eq!(code(&e), ErrorCode::Quota);
        assert!(e.to_string().contains("this session"), "{e}");
        let last = flows(&state).pop().unwrap();
        assert_eq!((last.vm.as_str(), last.action), ("vm2", Action::Deny));
        assert_eq!(state.open(), 3);
        drop(a1);
        assert!(eventually(|| state.open() == 2).await);
        connect(&guests[1], "api.test", port).await.up.expect("a freed slot is usable");
        drop(up);
    });
}

/// An allowed connection to a port nothing listens on fails with
/// `unavailable`, logged as allowed by its rule with the reason.
#[test]
fn an_unreachable_upstream_is_unavailable() {
    conn::run_local(async {
        let (l, port) = listener().await;
        drop(l);
        let (state, eg) = proxy(vec![Rule::host("api.test", Action::Allow)], capvisor_proxy::LIMITS);
        let e = connect(&eg, "api.test", port).await.up.err().expect("must fail");
        assert_eq!(code(&e), ErrorCode::Unavailable, "{e}");
        let f = flows(&state).pop().unwrap();
        assert_eq!((f.rule, f.action, f.address.as_str()), (0, Action::Allow, "127.0.0.1"));
        assert!(f.detail.contains("unreachable"), "{f:?}");
        assert_eq!(state.open(), 0);
    });
}

/// `run` in-process, as the worker sees it: `Proxy` on the RPC socket,
/// VM sockets on the fd channel (a bad tag is ignored), one relayed
/// connect, `Proxy.log` shows it, `Proxy.policy` is the live rule set, and
/// `run` returns when the worker's connection ends.
#[test]
fn run_serves_proxy_and_the_vms_it_is_handed() {
    conn::run_local(async {
        let (up, port) = listener().await;
        let state = ProxyState::new(config(vec![Rule::host("api.test", Action::Allow).on_port(port)])).unwrap();
        let (rpc_here, rpc_there) = tokio::net::UnixStream::pair().unwrap();
        let (ch_here, ch_there) = fdpass::pair().unwrap();
        let proxy_task =
            tokio::task::spawn_local(capvisor_proxy::run(rpc_there, FdChannel::new(ch_there).unwrap(), state));
        let (proxy, worker_conn) = conn::connect::<proxy::Client>(rpc_here, None, INTERNAL);
        let ch = FdChannel::new(ch_here).unwrap();
        let (junk, _junk_peer) = capvisor_rpc::spawn::stream_pair().unwrap();
        ch.send(b"vm:Bad Name", &junk).await.unwrap();
        let (guest_here, guest_there) = capvisor_rpc::spawn::stream_pair().unwrap();
        ch.send(b"vm:t1", &guest_there).await.unwrap();
        drop(guest_there);
        let (eg, _g) = guest(into_tokio(guest_here).unwrap());
        let f = connect(&eg, "api.test", port).await;
        let sink = f.up.unwrap();
        let (mut s, _) = up.accept().await.unwrap();
        s.write_all(b"pong").await.unwrap();
        s.shutdown().await.unwrap();
        capvisor_rpc::sink::write_all(&sink, b"ping").await.unwrap();
        sink.done_request().send().promise.await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        assert_eq!(f.down.await.unwrap(), b"pong");
        drop(sink);
        let log = proxy.log_request().send().pipeline.get_log();
        let recent = |vm: &str| {
            let mut req = log.recent_request();
            req.get().set_vm(vm);
            req.send().promise
        };
        let mut entry = None;
        for _ in 0..1000 {
            let r = recent("t1").await.unwrap();
            let list = r.get().unwrap().get_flows().unwrap();
            assert_eq!(list.len(), 1);
            let f = NetFlow::read(list.get(0)).unwrap();
            if f.bytes_down == 4 {
                entry = Some(f);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let f = entry.expect("the flow's byte counts never reached NetLog");
        assert_eq!((f.bytes_up, f.vm.as_str(), f.rule, f.action), (4, "t1", 0, Action::Allow));
        let r = recent("other").await.unwrap();
        assert_eq!(r.get().unwrap().get_flows().unwrap().len(), 0);
        let policy = proxy.policy_request().send().pipeline.get_policy();
        set_rules(&policy, &[]).await.unwrap();
        assert_eq!(code(&connect(&eg, "api.test", port).await.up.err().expect("must fail")), ErrorCode::Denied);
        worker_conn.abort();
        drop((proxy, log, policy));
        proxy_task.await.unwrap().unwrap();
    });
}

/// An `ask` rule holds the connection until a decision through
/// `Approvals`: allow once relays it (logged as `ask`, "approved once"),
/// deny and the timeout refuse it (nothing reaches upstream), and allow
/// always adds an allow rule so the next connection is not held. The host
/// is judged lower-case without a final dot.
#[test]
fn ask_holds_the_connection_until_an_approver_decides() {
    use capvisor_schema::capvisor_capnp::{approvals, ApprovalDecision};
    conn::run_local(async {
        let (up, port) = listener().await;
        let (state, eg) = proxy(vec![Rule::host("api.test", Action::Ask)], capvisor_proxy::LIMITS);
        let ap: approvals::Client =
            capvisor_proxy::approvals::ApprovalsServer::client(state.approvals.clone(), state.policy.clone());
        let pending = |ap: approvals::Client| async move {
            let r = ap.pending_request().send().promise.await.unwrap();
            r.get()
                .unwrap()
                .get_approvals()
                .unwrap()
                .iter()
                .map(|a| (a.get_id(), a.get_host().unwrap().to_string().unwrap(), a.get_port()))
                .collect::<Vec<_>>()
        };
        // What waits, once something does (up to 2 s).
        let held_list = |ap: approvals::Client| async move {
            for _ in 0..200 {
                let list = pending(ap.clone()).await;
                if !list.is_empty() {
                    return list;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Vec::new()
        };
        let decide = |ap: approvals::Client, id: u64, d: ApprovalDecision| async move {
            let mut req = ap.decide_request();
            req.get().set_id(id);
            req.get().set_decision(d);
            req.send().promise.await.map(drop)
        };
        // Held, then allowed once.
        let eg2 = eg.clone();
        let held = tokio::task::spawn_local(async move { connect(&eg2, "API.Test.", port).await });
        let list = held_list(ap.clone()).await;
        assert_eq!(list.len(), 1);
        assert_eq!((list[0].1.as_str(), list[0].2), ("api.test", port));
        assert!(!held.is_finished(), "the guest's connection waits");
        decide(ap.clone(), list[0].0, ApprovalDecision::AllowOnce).await.unwrap();
        let flow = held.await.unwrap();
        let _up = flow.up.expect("approved once: relayed");
        let (_s, _) = up.accept().await.unwrap();
        let f = flows(&state).pop().unwrap();
        assert_eq!((f.host.as_str(), f.rule, f.action), ("api.test", 0, Action::Ask));
        assert!(f.detail.contains("approved once"), "{f:?}");
        // A decided id is gone.
        assert!(decide(ap.clone(), list[0].0, ApprovalDecision::Deny).await.is_err());

        // Denied.
        let eg2 = eg.clone();
        let held = tokio::task::spawn_local(async move { connect(&eg2, "api.test", port).await });
        let list = held_list(ap.clone()).await;
        decide(ap.clone(), list[0].0, ApprovalDecision::Deny).await.unwrap();
        assert_eq!(code(&held.await.unwrap().up.err().expect("denied")), ErrorCode::Denied);
        assert!(flows(&state).pop().unwrap().detail.contains("denied by an approver"));

        // Timed out.
        state.approvals.set_timeout(std::time::Duration::from_millis(300));
        let e = connect(&eg, "api.test", port).await.up.err().expect("timeout denies");
        assert_eq!(code(&e), ErrorCode::Denied);
        assert!(flows(&state).pop().unwrap().detail.contains("not decided within"));
        assert!(pending(ap.clone()).await.is_empty());

        // Allowed always: a rule is added and the next connection is not held.
        state.approvals.set_timeout(std::time::Duration::from_secs(30));
        let eg2 = eg.clone();
        let held = tokio::task::spawn_local(async move { connect(&eg2, "api.test", port).await });
        let list = held_list(ap.clone()).await;
        decide(ap.clone(), list[0].0, ApprovalDecision::AllowAlways).await.unwrap();
        let _up2 = held.await.unwrap().up.expect("approved always");
        let (_s2, _) = up.accept().await.unwrap();
        assert_eq!(state.policy.borrow().rules()[0].action, Action::Allow);
        let _up3 = connect(&eg, "api.test", port).await.up.expect("allowed by the added rule, not held");
        assert_eq!(flows(&state).pop().unwrap().action, Action::Allow);
    });
}

/// A guest message over the guest reader limit (1 MiB: here a 2 MiB host
/// name) ends that VM's egress port, and its open flow with it; nothing
/// is logged for the oversized call.
#[test]
fn an_oversized_guest_message_closes_the_vm_port_and_its_flows() {
    conn::run_local(async {
        let (up, port) = listener().await;
        let state = ProxyState::new(config(vec![Rule::host("api.test", Action::Allow)])).unwrap();
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let vm_task = capvisor_proxy::serve_vm(&state, "vm1", a).unwrap();
        let (eg, _conn) = guest(b);
        let open = connect(&eg, "api.test", port).await;
        let _up = open.up.unwrap();
        let (mut s, _) = up.accept().await.unwrap();
        let big = "a".repeat(2 << 20);
        let e = connect(&eg, &big, port).await.up.err().expect("an oversized call must fail");
        assert!(capvisor_rpc::CvError::from_rpc(&e).is_none(), "a transport failure, not a decision: {e}");
        vm_task.await.unwrap();
        let mut buf = [0u8; 16];
        assert!(matches!(s.read(&mut buf).await, Ok(0) | Err(_)), "the VM's flow must be closed");
        assert!(eventually(|| state.open() == 0).await);
        assert_eq!(flows(&state).len(), 1, "only the first connect was decided");
    });
}
