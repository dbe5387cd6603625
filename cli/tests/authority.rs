//! Authority rules without booting a guest: typed denials for bad logins,
//! CapSet misses, stale sessions; hostile input on the gateway socket; and
//! nothing secret in the audit log.

mod common;
use capnp::capability::FromClientHook;
use capnp::traits::HasTypeId;
use capvisor_client::ops;
use capvisor_client::schema::capvisor_capnp::{accounts, vm_factory};
use capvisor_client::schema::common_capnp::ErrorCode;
use capvisor_client::{connect, ClientError};
use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

fn code<T>(r: Result<T, ClientError>) -> ErrorCode {
    match r {
        Ok(_) => panic!("expected a typed denial, the call succeeded"),
        Err(e) => e.code().unwrap_or_else(|| panic!("expected a typed domain error, got {e:?}")),
    }
}

#[test]
fn denials_bad_input_and_audit() {
    let s = Server::start(None);

    // Wrong password and unknown user: same typed denial, same message, exit 10.
    s.cli_ok("owner", &["login"], None, 0);
    s.cli_ok(
        "owner",
        &["account", "add", "carol", "--profile", "user", "--password-stdin"],
        Some(b"carol-right-pw\n"),
        0,
    );
    let unknown = s.cli_ok("x", &["login", "--user", "nosuchuser", "--password-stdin"], Some(b"whatever-pw-1\n"), 10);
    let wrong = s.cli_ok("x", &["login", "--user", "carol", "--password-stdin"], Some(b"carol-WRONG-pw\n"), 10);
    assert_eq!(stderr(&unknown), stderr(&wrong), "the error must not tell which part was wrong");
    assert!(stderr(&wrong).contains("denied"), "{}", stderr(&wrong));
    assert!(!s.config_dir("x").join("session.json").exists(), "a failed login saved a session");

    // Bad input on the gateway socket ends only that connection.
    let mut garbage = UnixStream::connect(&s.socket).unwrap();
    garbage.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(garbage.read(&mut buf).unwrap_or(0), 0, "garbage preamble must end the connection");

    // An RPC preamble followed by a frame that claims a 4 GiB segment.
    let mut huge = UnixStream::connect(&s.socket).unwrap();
    huge.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    huge.write_all(capvisor_rpc::attach::MAGIC_RPC).unwrap();
    huge.write_all(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0x1f]).unwrap();
    let _ = huge.write_all(&[0u8; 4096]);
    assert_eq!(huge.read(&mut buf).unwrap_or(0), 0, "an oversized message must end the connection");

    // An attach with a made-up token: typed refusal, then close.
    let mut bogus = UnixStream::connect(&s.socket).unwrap();
    bogus.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    bogus.write_all(b"CVATT001").unwrap();
    bogus.write_all(&5u32.to_le_bytes()).unwrap();
    bogus.write_all(b"bogus").unwrap();
    let mut reply = vec![];
    let _ = bogus.read_to_end(&mut reply);
    assert_eq!(reply.first(), Some(&1u8), "bogus token must get an error reply, got {reply:?}");

    capvisor_rpc::conn::run_local(async {
        // A client that disconnects mid-call.
        {
            let gw = connect::gateway(&s.socket).await.unwrap();
            let mut req = gw.login_password_request();
            req.get().set_user("carol");
            req.get().set_password("carol-WRONG-pw");
            let pending = req.send().promise;
            drop(pending);
            drop(gw);
        }

        // CapSet misses are typed.
        let owner = connect::login_local(&s.socket).await.unwrap();
        // (The misses show on the first call made on the pipelined cap.)
        let cs = ops::cap_set(&owner.session);
        let as_factory = |c: capnp::capability::Client| vm_factory::Client::new(c.hook);
        let nope = as_factory(ops::get_cap_raw(&cs, "nope", vm_factory::Client::TYPE_ID));
        assert_eq!(code(ops::list_vms(&nope).await), ErrorCode::NotFound);
        let wrong = as_factory(ops::get_cap_raw(&cs, "vms", accounts::Client::TYPE_ID));
        assert_eq!(code(ops::list_vms(&wrong).await), ErrorCode::WrongInterface);
        assert!(ops::list_vms(&ops::get_cap::<vm_factory::Client>(&cs, "vms")).await.is_ok());

        // A user-profile session has no accounts cap.
        let carol = connect::login_password(&s.socket, "carol", "carol-right-pw").await.unwrap();
        let ccs = ops::cap_set(&carol.session);
        assert_eq!(
            code(ops::list_accounts(&ops::get_cap::<accounts::Client>(&ccs, "accounts")).await),
            ErrorCode::NotFound
        );

        // Caps held across a logout fail with staleSession; the token dies too.
        let attached = connect::attach(&s.socket, &carol.token).await.unwrap();
        let vms = ops::vms(&attached);
        assert!(ops::list_vms(&vms).await.unwrap().is_empty());
        ops::logout(&carol.session).await.unwrap();
        assert_eq!(code(ops::list_vms(&vms).await), ErrorCode::StaleSession);
        assert_eq!(code(ops::session_info(&attached).await), ErrorCode::StaleSession);
        assert_eq!(code(ops::list_caps(&ccs).await), ErrorCode::StaleSession);
        assert_eq!(code(connect::attach(&s.socket, &carol.token).await), ErrorCode::StaleSession);
        assert_eq!(code(ops::logout(&attached).await), ErrorCode::StaleSession);

        // The gateway still serves after all of the above.
        let again = connect::login_local(&s.socket).await.unwrap();
        assert!(ops::session_info(&again.session).await.is_ok());
    });

    // Audit: denials are recorded, secrets are not.
    let audit = std::fs::read_to_string(s.state.join("audit.jsonl")).expect("audit.jsonl");
    assert!(audit.lines().any(|l| l.contains("denied") && l.contains("carol")), "no denial audited:\n{audit}");
    assert!(
        audit.lines().any(|l| l.contains("\"capset.get\"") && l.contains("\"notFound\"")),
        "no CapSet miss audited:\n{audit}"
    );
    for secret in ["carol-right-pw", "carol-WRONG-pw", "whatever-pw-1"] {
        assert!(!audit.contains(secret), "audit log leaks a password");
    }
    let saved = std::fs::read_to_string(s.config_dir("owner").join("session.json")).unwrap();
    let token: serde_json::Value = serde_json::from_str(&saved).unwrap();
    assert!(!audit.contains(token["token"].as_str().unwrap()), "audit log leaks a resume token");
    assert!(!s.log().contains(token["token"].as_str().unwrap()), "server log leaks a resume token");

    s.cli_ok("owner", &["logout"], None, 0);
    s.stop();
}

/// A local client holding hundreds of idle login connections (each sent
/// only the preamble) no longer locks anyone out: past the per-uid bound
/// the gateway closes them right after the preamble, and attaches go on.
#[test]
fn idle_login_connections_do_not_lock_others_out() {
    let s = Server::start(None);
    s.cli_ok("owner", &["login"], None, 0);
    let mut idle = vec![];
    for _ in 0..520 {
        let mut c = UnixStream::connect(&s.socket).unwrap();
        c.write_all(capvisor_rpc::attach::MAGIC_RPC).unwrap();
        idle.push(c);
    }
    let t = std::time::Instant::now();
    let caps = stdout(&s.cli_ok("owner", &["caps"], None, 0));
    assert!(caps.contains("VmFactory"), "{caps}");
    assert!(t.elapsed() < Duration::from_secs(5), "caps took {:?}", t.elapsed());
    // Most of the idle connections were closed by the gateway already.
    std::thread::sleep(Duration::from_millis(200));
    let mut closed = 0;
    for c in idle.iter_mut() {
        c.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        if matches!(c.read(&mut b), Ok(0)) {
            closed += 1;
        }
    }
    assert!(closed >= 520 - capvisor_gateway::MAX_RPC_PER_UID, "only {closed} of 520 closed");
    drop(idle);
    s.cli_ok("owner", &["logout"], None, 0);
    s.stop();
}
