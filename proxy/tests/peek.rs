//! Rules on scheme, method and path: the proxy holds a connection's first
//! bytes, judges what they show (TLS ClientHello, HTTP/1.x request line,
//! anything else) and only then connects. In-process as in egress.rs: a
//! guest-init stand-in over a socketpair, real upstream listeners on
//! 127.0.0.1 started by each test; a TLS upstream with a certificate
//! rcgen makes for the test (the test client trusts only it). Loopback
//! only.

mod common;

use capvisor_proxy::peek::{PeekLimits, PEEK};
use capvisor_proxy::policy::{Action, NetPolicyServer, Rule};
use capvisor_proxy::{Config, ProxyState};
use capvisor_rpc::conn;
use capvisor_rpc::sink::{write_all, WriterSink};
use capvisor_schema::common_capnp::{byte_sink, ErrorCode};
use capvisor_schema::guest_capnp::egress;
use common::*;
use std::cell::Cell;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn config(rules: Vec<Rule>) -> Config {
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    Config {
        session_id: "test".into(),
        rules,
        resolve: vec![("api.test".into(), vec![lo])],
        log_capacity: 0,
        ..Config::default()
    }
}

fn proxy_with(rules: Vec<Rule>, peek: PeekLimits) -> (Rc<ProxyState>, egress::Client) {
    let state = ProxyState::with_bounds(config(rules), capvisor_proxy::LIMITS, peek).unwrap();
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    capvisor_proxy::serve_vm(&state, "vm1", a).unwrap();
    let (eg, _conn) = guest(b);
    (state, eg)
}

fn proxy(rules: Vec<Rule>) -> (Rc<ProxyState>, egress::Client) {
    proxy_with(rules, PEEK)
}

/// `host` rule with `scheme`, `method`, `pathPrefix`.
fn rule(host: &str, port: u16, scheme: &str, method: &str, path: &str, action: Action) -> Rule {
    Rule {
        scheme: scheme.into(),
        method: method.into(),
        path_prefix: path.into(),
        ..Rule::host(host, action).on_port(port)
    }
}

/// A connect whose first write is `first`, then `done`: returns the flow
/// and what `done` answered (`ByteSink.write` is a streaming call, so a
/// write's failure reaches the caller on its next call; `done` is the
/// first one that waits for its own answer).
async fn send_then_probe(eg: &egress::Client, port: u16, first: &[u8]) -> (Flow, Result<(), capnp::Error>) {
    let f = connect(eg, "api.test", port).await;
    let up = f.up.as_ref().expect("a peeked connect returns up at once").clone();
    write_all(&up, first).await.expect("the first bytes are held, not refused");
    let second = up.done_request().send().promise.await.map(|_| ());
    (f, second)
}

/// Accepts one connection and returns everything it sent until EOF,
/// answering `reply` first.
async fn accept_one(l: &TcpListener, reply: &[u8]) -> Vec<u8> {
    let (mut s, _) = l.accept().await.unwrap();
    s.write_all(reply).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    got
}

/// `scheme http, method GET, pathPrefix /ok` allows `GET /ok/x` and
/// denies `POST /ok`, `GET /no` and `GET /ok/../no`: each denial fails
/// the flow's next call with `denied` and releases `down` without `done`, is
/// logged with the method and path, and upstream never sees it (the
/// first connection it accepts carries the allowed request, sent with a
/// half-close before the decision).
#[test]
fn http_rules_judge_the_method_and_path_of_the_request_line() {
    conn::run_local(async {
        let (up, port) = listener().await;
        let (state, eg) = proxy(vec![rule("api.test", port, "http", "GET", "/ok", Action::Allow)]);
        for (req, method, path) in [
            (&b"POST /ok HTTP/1.1\r\nHost: api.test\r\n\r\n"[..], "POST", "/ok"),
            (b"GET /no HTTP/1.1\r\n\r\n", "GET", "/no"),
            (b"GET /ok/../no HTTP/1.1\r\n\r\n", "GET", "/no"),
        ] {
            let (f, second) = send_then_probe(&eg, port, req).await;
            let e = second.expect_err("the call after a denial must fail");
            assert_eq!(code(&e), ErrorCode::Denied, "{e}");
            assert!(e.to_string().contains(&format!("http {method} {path}")), "{e}");
            assert!(f.down.await.is_err(), "down must be released without done");
            let log = flows(&state).pop().unwrap();
            assert_eq!(
                (log.action, log.rule, log.method.as_str(), log.path.as_str(), log.address.as_str()),
                (Action::Deny, -1, method, path, "")
            );
        }
        let request = b"GET /ok/x HTTP/1.0\r\nHost: api.test\r\n\r\n";
        let f = connect(&eg, "api.test", port).await;
        let sink = f.up.unwrap();
        write_all(&sink, request).await.unwrap();
        sink.done_request().send().promise.await.unwrap();
        let got = accept_one(&up, b"HTTP/1.0 200 OK\r\n\r\nhi").await;
        assert_eq!(got, request, "the first connection upstream saw is the allowed one, whole");
        assert_eq!(f.down.await.unwrap(), b"HTTP/1.0 200 OK\r\n\r\nhi");
        drop(sink);
        assert!(eventually(|| state.open() == 0).await);
        let log = flows(&state).pop().unwrap();
        assert_eq!(
            (log.action, log.rule, log.method.as_str(), log.path.as_str(), log.address.as_str()),
            (Action::Allow, 0, "GET", "/ok/x", "127.0.0.1")
        );
        assert_eq!((log.bytes_up, log.bytes_down), (request.len() as u64, 21));
        assert_eq!(flows(&state).len(), 4);
    });
}

/// A `down` sink that writes into a duplex stream (so the test's TLS
/// client reads it as a socket); released without `done`, the stream
/// reads EOF.
fn streaming_flow(
    eg: &egress::Client,
    host: &str,
    port: u16,
) -> tokio::io::Join<tokio::io::DuplexStream, tokio::io::DuplexStream> {
    let (down_read, down_write) = tokio::io::duplex(1 << 16);
    let (up_write, mut up_read) = tokio::io::duplex(1 << 16);
    let (down, _done) = WriterSink::client(down_write);
    let mut req = eg.connect_request();
    req.get().set_host(host);
    req.get().set_port(port);
    req.get().set_down(down);
    let call = req.send().promise;
    tokio::task::spawn_local(async move {
        let up: byte_sink::Client = match call.await {
            Ok(r) => r.get().unwrap().get_up().unwrap(),
            Err(_) => return,
        };
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match up_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if write_all(&up, &buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = up.done_request().send().promise.await;
    });
    tokio::io::join(down_read, up_write)
}

/// A loopback TLS upstream for `api.test` (rcgen, self-signed): each
/// connection answers `pong` to `ping`; counts connections accepted.
async fn tls_upstream() -> (u16, rustls::RootCertStore, Rc<Cell<usize>>) {
    let ck = rcgen::generate_simple_self_signed(vec!["api.test".to_string(), "other.test".to_string()]).unwrap();
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let (l, port) = listener().await;
    let accepted = Rc::new(Cell::new(0));
    let count = accepted.clone();
    tokio::task::spawn_local(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            count.set(count.get() + 1);
            let acceptor = acceptor.clone();
            tokio::task::spawn_local(async move {
                let Ok(mut tls) = acceptor.accept(s).await else { return };
                let mut ping = [0u8; 4];
                if tls.read_exact(&mut ping).await.is_ok() && &ping == b"ping" {
                    let _ = tls.write_all(b"pong").await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    (port, roots, accepted)
}

async fn tls_exchange(
    eg: &egress::Client,
    port: u16,
    roots: &rustls::RootCertStore,
    sni: &str,
) -> std::io::Result<Vec<u8>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut tls = connector.connect(name, streaming_flow(eg, "api.test", port)).await?;
    tls.write_all(b"ping").await?;
    let mut got = vec![0u8; 4];
    tls.read_exact(&mut got).await?;
    Ok(got)
}

/// A rule of scheme `https` lets a real TLS handshake through (the proxy
/// relays the bytes unmodified: the client verifies the test upstream's
/// certificate), logged with the SNI; with only a `tcp`-scheme rule the
/// same ClientHello is denied before any upstream connect, and an SNI
/// that differs from the host connected to is named in the log.
#[test]
fn https_rules_match_a_client_hello_and_tcp_rules_do_not() {
    conn::run_local(async {
        let (port, roots, accepted) = tls_upstream().await;
        let (state, eg) = proxy(vec![rule("api.test", port, "https", "", "", Action::Allow)]);
        let got = tls_exchange(&eg, port, &roots, "api.test").await.expect("TLS through the proxy");
        assert_eq!(got, b"pong");
        assert_eq!(accepted.get(), 1);
        let log = flows(&state).pop().unwrap();
        assert_eq!((log.action, log.rule, log.method.as_str()), (Action::Allow, 0, ""));
        assert_eq!(log.detail, "sni api.test");

        let policy = NetPolicyServer::client(state.policy.clone());
        let mut req = policy.set_request();
        rule("api.test", port, "tcp", "", "", Action::Allow).write(req.get().init_rules(1).get(0));
        req.send().promise.await.unwrap();
        let e = tls_exchange(&eg, port, &roots, "other.test").await.expect_err("a tcp rule must not match TLS");
        assert_ne!(e.kind(), std::io::ErrorKind::InvalidData, "no certificate was ever seen: {e}");
        assert_eq!(accepted.get(), 1, "upstream never saw the denied connection");
        let log = flows(&state).pop().unwrap();
        assert_eq!((log.action, log.rule, log.address.as_str()), (Action::Deny, -1, ""));
        assert!(log.detail.contains("sni other.test differs from the host connected to"), "{log:?}");
    });
}

/// Bytes that are neither TLS nor HTTP are scheme `tcp`: an `http` rule
/// does not match them, a `tcp` rule after it does, and upstream gets
/// them unchanged.
#[test]
fn garbage_first_bytes_are_scheme_tcp() {
    conn::run_local(async {
        let (up, port) = listener().await;
        let (state, eg) = proxy(vec![
            rule("api.test", port, "http", "", "", Action::Deny),
            rule("api.test", port, "tcp", "", "", Action::Allow),
        ]);
        let garbage = pattern(3000, 5);
        let f = connect(&eg, "api.test", port).await;
        let sink = f.up.unwrap();
        write_all(&sink, &garbage).await.unwrap();
        write_all(&sink, b"more").await.unwrap();
        sink.done_request().send().promise.await.unwrap();
        let got = accept_one(&up, b"").await;
        assert_eq!(got.len(), garbage.len() + 4);
        assert!(got[..garbage.len()] == garbage[..] && &got[garbage.len()..] == b"more");
        let log = flows(&state).pop().unwrap();
        assert_eq!((log.action, log.rule, log.method.as_str(), log.path.as_str()), (Action::Allow, 1, "", ""));
        drop(sink);
    });
}

/// A guest that sends nothing (a server-speaks-first protocol) is held
/// for the peek wait (here 1 s, a test bound), then judged as scheme
/// `tcp`: upstream is not dialled before that, then its greeting reaches
/// the guest and the guest's reply reaches it.
#[test]
fn a_silent_guest_is_judged_as_tcp_after_the_wait() {
    conn::run_local(async {
        let (up, port) = listener().await;
        let wait = Duration::from_secs(1);
        let (state, eg) = proxy_with(
            vec![
                rule("api.test", port, "http", "GET", "", Action::Deny),
                rule("api.test", port, "tcp", "", "", Action::Allow),
            ],
            PeekLimits { bytes: PEEK.bytes, wait },
        );
        let started = tokio::time::Instant::now();
        let f = connect(&eg, "api.test", port).await;
        let sink = f.up.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), up.accept()).await.is_err(),
            "upstream must not be dialled while the first bytes are awaited"
        );
        let (mut s, _) = up.accept().await.unwrap();
        assert!(started.elapsed() >= wait, "dialled after {:?}", started.elapsed());
        s.write_all(b"220 ready\r\n").await.unwrap();
        s.shutdown().await.unwrap();
        write_all(&sink, b"QUIT\r\n").await.unwrap();
        sink.done_request().send().promise.await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"QUIT\r\n");
        assert_eq!(f.down.await.unwrap(), b"220 ready\r\n");
        let log = flows(&state).pop().unwrap();
        assert_eq!((log.action, log.rule, log.method.as_str()), (Action::Allow, 1, ""));
    });
}

/// At most 16 KiB are held: a request line longer than that is judged at
/// the bound on its method and the path seen so far (longer than any
/// rule's pathPrefix). Allowed, upstream gets every byte in order (the
/// write past the bound waited for the decision); denied, the flow's
/// next call fails with `denied`. The logged path is cut to 256 bytes.
#[test]
fn at_most_16_kib_are_held_before_the_decision() {
    conn::run_local(async {
        let (up, port) = listener().await;
        // A wait far longer than the test may take: only the byte bound
        // can bring the decision.
        let wait = Duration::from_secs(600);
        let (state, eg) = proxy_with(
            vec![rule("api.test", port, "http", "GET", "/ok/", Action::Allow)],
            PeekLimits { bytes: PEEK.bytes, wait },
        );
        let mut long = b"GET /no/".to_vec();
        long.extend(std::iter::repeat_n(b'a', 20_000));
        let f = connect(&eg, "api.test", port).await;
        let sink = f.up.unwrap();
        // The write past the bound waits for the decision and fails; a
        // streamed write's failure reaches the caller on its next call.
        let _ = write_all(&sink, &long).await;
        let done = tokio::time::timeout(Duration::from_secs(60), sink.done_request().send().promise);
        let e = done.await.expect("decided at the byte bound, not the wait").map(|_| ()).expect_err("denied");
        assert_eq!(code(&e), ErrorCode::Denied, "{e}");
        let log = flows(&state).pop().unwrap();
        assert_eq!((log.action, log.method.as_str(), log.path.len()), (Action::Deny, "GET", 256));
        assert!(log.path.starts_with("/no/aaa") && log.detail.contains("cut"), "{log:?}");

        long[5..7].copy_from_slice(b"ok");
        let f = connect(&eg, "api.test", port).await;
        let sink = f.up.unwrap();
        write_all(&sink, &long).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(60), accept_one(&up, b""));
        sink.done_request().send().promise.await.unwrap();
        let got = got.await.expect("decided at the byte bound, not the wait");
        assert_eq!(got.len(), long.len());
        assert!(got == long, "upstream must get the held bytes then the rest, in order");
        let log = flows(&state).pop().unwrap();
        assert_eq!((log.action, log.rule), (Action::Allow, 0));
        assert!(log.path.starts_with("/ok/aaa"));
        drop(sink);
    });
}

/// A guest that resets (releases `up`) while its first bytes are awaited
/// frees its slot and leaves no NetLog entry; a rule list whose first
/// matching rule ignores content keeps the fast path (`connect` itself
/// is denied).
#[test]
fn a_reset_while_peeking_frees_the_slot_and_content_blind_rules_decide_at_connect() {
    conn::run_local(async {
        let (up, port) = listener().await;
        let (state, eg) = proxy(vec![
            Rule::host("api.test", Action::Deny).on_port(port.wrapping_add(1)),
            rule("api.test", 0, "http", "", "", Action::Allow),
        ]);
        let f = connect(&eg, "api.test", port).await;
        write_all(f.up.as_ref().unwrap(), b"GET").await.unwrap();
        assert_eq!(state.open(), 1);
        drop(f.up);
        assert!(eventually(|| state.open() == 0).await);
        assert!(flows(&state).is_empty());
        let e = connect(&eg, "api.test", port.wrapping_add(1)).await.up.err().expect("denied at connect");
        assert_eq!(code(&e), ErrorCode::Denied);
        assert_eq!(flows(&state).len(), 1);
        drop(up);
    });
}

/// When the VM's egress port closes while a flow waits for its first
/// bytes, the wait ends: the slot is freed, nothing is dialled, and
/// nothing is logged.
#[test]
fn a_closed_vm_port_ends_a_peek() {
    conn::run_local(async {
        let (up, port) = listener().await;
        // A wait longer than the test: only the port closing can end it.
        let peek = PeekLimits { bytes: PEEK.bytes, wait: Duration::from_secs(600) };
        let rules = vec![rule("api.test", port, "http", "", "", Action::Allow)];
        let state = ProxyState::with_bounds(config(rules), capvisor_proxy::LIMITS, peek).unwrap();
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let vm_task = capvisor_proxy::serve_vm(&state, "vm1", a).unwrap();
        let (eg, guest_conn) = guest(b);
        let f = connect(&eg, "api.test", port).await;
        let _keep = f.up.unwrap();
        assert_eq!(state.open(), 1);
        guest_conn.abort();
        drop(eg);
        vm_task.await.unwrap();
        assert!(eventually(|| state.open() == 0).await, "the peeking flow kept its slot");
        assert!(tokio::time::timeout(Duration::from_millis(200), up.accept()).await.is_err());
        assert!(flows(&state).is_empty());
    });
}
