//! The real `capvisor-proxy` binary, spawned as a worker spawns it
//! (`capvisor_rpc::spawn::prepare` with the RPC socket at 3, the fd
//! channel at 4 and the `ProxyConfig` memfd at 5): it confines itself,
//! relays one connection to a loopback upstream the test started, refuses
//! the metadata address, and exits when the worker's connection ends.

mod common;

use capvisor_proxy::policy::{Action, Rule};
use capvisor_proxy::Config;
use capvisor_rpc::conn::{self, INTERNAL};
use capvisor_rpc::fdpass::{self, FdChannel};
use capvisor_rpc::spawn::{self, into_tokio, Inherit};
use capvisor_schema::common_capnp::ErrorCode;
use capvisor_schema::internal_capnp::{proxy, proxy_config};
use common::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn the_binary_relays_a_connection_and_exits_with_its_worker() {
    conn::run_local(async {
        let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = up.local_addr().unwrap().port();
        let cfg = Config {
            session_id: "s-test".into(),
            rules: vec![
                Rule::host("api.test", Action::Allow).on_port(port),
                Rule::host("*", Action::Allow),
                Rule::host("localhost", Action::Allow),
            ],
            resolve: vec![("api.test".into(), vec!["127.0.0.1".parse().unwrap()])],
            log_capacity: 16,
            ..Config::default()
        };
        let mut msg = capnp::message::Builder::new_default();
        cfg.write(msg.init_root::<proxy_config::Builder>());
        let config = spawn::config_fd(&msg).unwrap();
        let (rpc_here, rpc_there) = spawn::stream_pair().unwrap();
        let (ch_here, ch_there) = fdpass::pair().unwrap();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_capvisor-proxy"));
        cmd.args(["--rpc-fd", "3", "--vm-fd", "4", "--config-fd", "5"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let fds = [
            Inherit { fd: rpc_there, target: 3 },
            Inherit { fd: ch_there, target: 4 },
            Inherit { fd: config, target: 5 },
        ];
        spawn::prepare(&mut cmd, &fds);
        // Decisions are logged at debug level (NetLog is their record).
        cmd.env("CAPVISOR_LOG", "debug");
        let child = cmd.spawn().unwrap();
        drop(fds);

        let (proxy, worker_conn) = conn::connect::<proxy::Client>(into_tokio(rpc_here).unwrap(), None, INTERNAL);
        let ch = FdChannel::new(ch_here).unwrap();
        let (guest_here, guest_there) = spawn::stream_pair().unwrap();
        ch.send(b"vm:t1", &guest_there).await.unwrap();
        drop(guest_there);
        let (eg, _g) = guest(into_tokio(guest_here).unwrap());

        let f = connect(&eg, "api.test", port).await;
        let sink = f.up.unwrap_or_else(|e| panic!("connect: {e}"));
        let (mut s, _) = up.accept().await.unwrap();
        capvisor_rpc::sink::write_all(&sink, b"hello upstream").await.unwrap();
        sink.done_request().send().promise.await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello upstream");
        s.write_all(b"hello guest").await.unwrap();
        drop(s);
        assert_eq!(f.down.await.unwrap(), b"hello guest");

        let e = connect(&eg, "169.254.169.254", 80).await.up.err().expect("metadata must be denied");
        assert_eq!(code(&e), ErrorCode::Denied);

        // No override: the system resolver reads /etc/hosts inside the
        // proxy's Landlock domain (localhost may come first as ::1, which
        // refuses; the proxy then tries 127.0.0.1). Rule 1 (`*`) decides it
        // and does not reach loopback; a rule naming localhost does.
        let e = connect(&eg, "localhost", port).await.up.err().expect("`*` does not reach loopback");
        assert_eq!(code(&e), ErrorCode::Denied);
        let policy = proxy.policy_request().send().pipeline.get_policy();
        let mut req = policy.set_request();
        Rule::host("localhost", Action::Allow).write(req.get().init_rules(1).get(0));
        req.send().promise.await.unwrap();
        let f = connect(&eg, "localhost", port).await;
        let sink = f.up.unwrap_or_else(|e| panic!("connect localhost: {e}"));
        let (mut s, _) = up.accept().await.unwrap();
        s.write_all(b"via the system resolver").await.unwrap();
        drop(s);
        assert_eq!(f.down.await.unwrap(), b"via the system resolver");
        drop(sink);

        let log = proxy.log_request().send().pipeline.get_log();
        let r = log.recent_request().send().promise.await.unwrap();
        let flows = r.get().unwrap().get_flows().unwrap();
        assert_eq!(flows.len(), 4);
        let denied = capvisor_proxy::log::Flow::read(flows.get(1)).unwrap();
        assert_eq!((denied.rule, denied.action, denied.address.as_str()), (1, Action::Deny, "169.254.169.254"));

        // The worker goes away: the proxy exits, successfully.
        worker_conn.abort();
        drop((proxy, log, policy, eg));
        let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
            .await
            .expect("the proxy did not exit after its worker's connection ended")
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains("confined: landlock"), "{stderr}");
        if capvisor_confine::landlock::abi() > 0 {
            assert!(stderr.contains("enforced") && !stderr.contains("NOT enforced"), "{stderr}");
        }
        assert!(stderr.contains("169.254.169.254"), "decisions are logged at debug level: {stderr}");
    });
}
