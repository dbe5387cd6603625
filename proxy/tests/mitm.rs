//! TLS interception in-process: a guest stand-in opens `Egress` flows and
//! speaks TLS through them trusting only the proxy's CA (as a guest does
//! after guest-init installed it), against real hyper HTTPS upstreams on
//! 127.0.0.1 whose certificates come from another CA the proxy is told to
//! trust (`extra_roots_pem`, as the manifest's `[net] ca_certs`). Names
//! resolve through overrides; nothing leaves loopback.

mod common;

use bytes::Bytes;
use capvisor_proxy::policy::{Action, Rule};
use capvisor_rpc::conn;
use capvisor_schema::internal_capnp::secret_source;
use common::tls::*;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::rc::Rc;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET and POST through the interception (the guest trusts only the
/// proxy's CA, so these succeed only if the proxy terminated TLS), a
/// request a path rule denies answered 403 without reaching upstream, and
/// one NetLog entry per request with method, path, status and bytes.
#[test]
fn https_requests_are_intercepted_judged_per_request_and_logged() {
    conn::run_local(async {
        let (up_ca, h2cfg, _) = upstream_ca();
        let seen: Seen = Default::default();
        let port = upstream(h2cfg, seen.clone(), Default::default()).await;
        let deny_admin =
            Rule { scheme: "https".into(), path_prefix: "/admin".into(), ..Rule::host("api.test", Action::Deny) };
        let (state, eg) = proxy(vec![deny_admin, Rule::host("api.test", Action::Allow).on_port(port)], &up_ca);
        let tls = guest_tls(&eg, "api.test", port, &proxy_ca(&state), &[b"http/1.1"]).await.unwrap();
        let mut s = h1(tls).await;
        let (st, body) = text(s.send_request(get("api.test", "/echo?q=1")).await.unwrap()).await;
        assert_eq!(st, 200);
        assert!(body.starts_with("HTTP/1.1 /echo auth= len=0"), "{body}");
        let post = http::Request::post("/echo")
            .header("host", "api.test")
            .body(Full::new(Bytes::from(vec![b'x'; 1000])))
            .unwrap();
        let (st, body) = text(s.send_request(post).await.unwrap()).await;
        assert_eq!(st, 200);
        assert!(body.ends_with("len=1000"), "{body}");
        let denied = s.send_request(get("api.test", "/admin/users")).await.unwrap();
        assert_eq!(denied.headers()["x-capvisor-egress"], "refused");
        let (st, body) = text(denied).await;
        assert_eq!(st, 403);
        assert!(body.contains("denied by rule 0"), "{body}");
        assert!(seen.borrow().iter().all(|(_, _, p, _)| !p.starts_with("/admin")), "upstream never saw it");
        assert_eq!(seen.borrow().len(), 2);
        drop(s);
        assert!(eventually(|| flows(&state).iter().filter(|f| f.bytes_down > 0).count() == 2).await);
        let f = flows(&state);
        let get_e = f.iter().find(|f| f.method == "GET" && f.path == "/echo?q=1").expect("GET logged");
        assert_eq!((get_e.status, get_e.rule, get_e.action), (200, 1, Action::Allow));
        assert_eq!(get_e.address, "127.0.0.1");
        let post_e = f.iter().find(|f| f.method == "POST").expect("POST logged");
        assert_eq!(post_e.bytes_up, 1000);
        let admin = f.iter().find(|f| f.path == "/admin/users").expect("denial logged");
        assert_eq!((admin.action, admin.rule, admin.status), (Action::Deny, 0, 0));
    });
}

/// An HTTP/2 guest reaches an HTTP/2 upstream and an HTTP/1.1-only one
/// (hyper translates), each with its own request.
#[test]
fn an_http2_guest_reaches_http2_and_http11_upstreams() {
    conn::run_local(async {
        let (up_ca, h2cfg, h1cfg) = upstream_ca();
        let seen: Seen = Default::default();
        let p2 = upstream(h2cfg, seen.clone(), Default::default()).await;
        let p1 = upstream(h1cfg, seen.clone(), Default::default()).await;
        let (state, eg) = proxy(vec![Rule::host("api.test", Action::Allow)], &up_ca);
        for (port, want) in [(p2, "HTTP/2.0"), (p1, "HTTP/1.1")] {
            let tls = guest_tls(&eg, "api.test", port, &proxy_ca(&state), &[b"h2"]).await.unwrap();
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            let (mut s, c) = hyper::client::conn::http2::handshake(LocalExec, TokioIo::new(tls)).await.unwrap();
            tokio::task::spawn_local(async move { drop(c.await) });
            let req =
                http::Request::get(format!("https://api.test:{port}/echo")).body(Full::new(Bytes::new())).unwrap();
            let (st, body) = text(s.send_request(req).await.unwrap()).await;
            assert_eq!(st, 200);
            assert!(body.starts_with(&format!("{want} /echo")), "{body}");
        }
    });
}

/// The `SecretSource` the worker would give: secret `api` is for
/// `api.test` only; anything else is unknown.
struct Secrets;

const VALUE: &str = "s3cr3t-VALUE-42";

impl secret_source::Server for Secrets {
    async fn reveal(
        self: capnp::capability::Rc<Self>,
        params: secret_source::RevealParams,
        mut results: secret_source::RevealResults,
    ) -> capnp::Result<()> {
        let p = params.get()?;
        let (name, host) = (p.get_name()?.to_str()?, p.get_host()?.to_str()?);
        let mut r = results.get();
        r.set_found(name == "api");
        if name == "api" && host == "api.test" {
            r.set_matched(true);
            r.set_value(VALUE.as_bytes());
        }
        Ok(())
    }
}

/// A placeholder is replaced for the secret's host only; for another host
/// it goes out as is and the NetLog says so; an unknown secret is flagged;
/// the value is in no NetLog field.
#[test]
fn secrets_are_inserted_for_their_hosts_only() {
    conn::run_local(async {
        let (up_ca, h2cfg, _) = upstream_ca();
        let seen: Seen = Default::default();
        let port = upstream(h2cfg, seen.clone(), Default::default()).await;
        // Loopback is reached only through rules naming each host.
        let (state, eg) =
            proxy(vec![Rule::host("api.test", Action::Allow), Rule::host("other.test", Action::Allow)], &up_ca);
        *state.secrets.borrow_mut() = Some(capnp_rpc::new_client(Secrets));
        for (host, header) in [
            ("api.test", "Bearer capvisor-secret:api"),
            ("other.test", "Bearer capvisor-secret:api"),
            ("api.test", "Bearer capvisor-secret:nope"),
        ] {
            let tls = guest_tls(&eg, host, port, &proxy_ca(&state), &[b"http/1.1"]).await.unwrap();
            let mut s = h1(tls).await;
            let req = http::Request::get("/echo")
                .header("host", host)
                .header("authorization", header)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let (st, _) = text(s.send_request(req).await.unwrap()).await;
            assert_eq!(st, 200);
        }
        let auths: Vec<String> = seen.borrow().iter().map(|s| s.3.clone()).collect();
        assert_eq!(
            auths,
            vec![format!("Bearer {VALUE}"), "Bearer capvisor-secret:api".into(), "Bearer capvisor-secret:nope".into()]
        );
        let f = flows(&state);
        assert_eq!(f.len(), 3);
        assert!(f[0].detail.contains("secret api inserted"), "{}", f[0].detail);
        assert!(f[1].detail.contains("secret api: placeholder sent to a host it is not for"), "{}", f[1].detail);
        assert!(f[2].detail.contains("secret nope: no such secret"), "{}", f[2].detail);
        for e in &f {
            let all = format!("{e:?}");
            assert!(!all.contains(VALUE), "the value leaked into the NetLog: {all}");
        }
    });
}

/// An upstream whose certificate the proxy cannot verify gets the guest a
/// 502 naming the TLS failure (and a NetLog entry); nothing is relayed.
#[test]
fn an_unverifiable_upstream_is_a_bad_gateway() {
    conn::run_local(async {
        let (_their_ca, h2cfg, _) = upstream_ca();
        let (other_ca, _, _) = upstream_ca();
        let seen: Seen = Default::default();
        let port = upstream(h2cfg, seen.clone(), Default::default()).await;
        let (state, eg) = proxy(vec![Rule::host("api.test", Action::Allow)], &other_ca);
        let tls = guest_tls(&eg, "api.test", port, &proxy_ca(&state), &[b"http/1.1"]).await.unwrap();
        let mut s = h1(tls).await;
        let (st, body) = text(s.send_request(get("api.test", "/echo")).await.unwrap()).await;
        assert_eq!(st, 502);
        assert!(body.contains("upstream TLS"), "{body}");
        assert!(seen.borrow().is_empty());
        assert!(flows(&state).iter().any(|f| f.detail.contains("upstream TLS")));
    });
}

/// A response body streams: the guest reads the first chunk while the
/// upstream still holds the second.
#[test]
fn bodies_stream_through_the_interception() {
    conn::run_local(async {
        let (up_ca, h2cfg, _) = upstream_ca();
        let release = Rc::new(tokio::sync::Notify::new());
        let port = upstream(h2cfg, Default::default(), release.clone()).await;
        let (state, eg) = proxy(vec![Rule::host("api.test", Action::Allow)], &up_ca);
        let tls = guest_tls(&eg, "api.test", port, &proxy_ca(&state), &[b"http/1.1"]).await.unwrap();
        let mut s = h1(tls).await;
        let resp = s.send_request(get("api.test", "/stream")).await.unwrap();
        let mut body = resp.into_body();
        let first =
            tokio::time::timeout(std::time::Duration::from_secs(10), body.frame()).await.expect("first chunk in time");
        assert_eq!(first.unwrap().unwrap().into_data().unwrap(), "first\n");
        release.notify_one();
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(rest, "second\n");
        // A large body arrives whole.
        let (st, big) = text(s.send_request(get("api.test", "/big?n=3000000")).await.unwrap()).await;
        assert_eq!(st, 200);
        assert_eq!(big.len(), String::from_utf8_lossy(&pattern(3_000_000, 7)).len());
    });
}

/// An HTTP/1.1 upgrade answered 101 joins the two streams.
#[test]
fn an_upgrade_passes_through() {
    conn::run_local(async {
        let (up_ca, _, h1cfg) = upstream_ca();
        let port = upstream(h1cfg, Default::default(), Default::default()).await;
        let (state, eg) = proxy(vec![Rule::host("api.test", Action::Allow)], &up_ca);
        let tls = guest_tls(&eg, "api.test", port, &proxy_ca(&state), &[b"http/1.1"]).await.unwrap();
        let mut s = h1(tls).await;
        let req = http::Request::get("/ws")
            .header("host", "api.test")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let mut resp = s.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 101);
        let up = hyper::upgrade::on(&mut resp).await.unwrap();
        let mut io = TokioIo::new(up);
        io.write_all(b"ping over the upgrade").await.unwrap();
        let mut buf = [0u8; 21];
        tokio::time::timeout(std::time::Duration::from_secs(10), io.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf, b"ping over the upgrade");
    });
}

/// A `noMitm` rule relays TLS untouched: the guest must trust the
/// upstream's own CA, and trusting only the proxy's fails.
#[test]
fn no_mitm_relays_tls_untouched() {
    conn::run_local(async {
        let (up_ca, h2cfg, _) = upstream_ca();
        let port = upstream(h2cfg, Default::default(), Default::default()).await;
        let rule = Rule { no_mitm: true, ..Rule::host("api.test", Action::Allow) };
        let (state, eg) = proxy(vec![rule], &up_ca);
        assert!(guest_tls(&eg, "api.test", port, &proxy_ca(&state), &[b"http/1.1"]).await.is_err());
        let tls = guest_tls(&eg, "api.test", port, &up_ca.cert, &[b"http/1.1"]).await.unwrap();
        let mut s = h1(tls).await;
        let (st, _) = text(s.send_request(get("api.test", "/echo")).await.unwrap()).await;
        assert_eq!(st, 200);
    });
}

/// TLS that carries no HTTP is judged by SNI and port and relayed over a
/// verified upstream TLS connection.
#[test]
fn tls_without_http_is_relayed() {
    conn::run_local(async {
        let (up_ca, _, h1cfg) = upstream_ca();
        let mut plain = (*h1cfg).clone();
        plain.alpn_protocols.clear();
        let (l, port) = listener().await;
        tokio::task::spawn_local(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut t = tokio_rustls::TlsAcceptor::from(Arc::new(plain)).accept(s).await.unwrap();
            let mut buf = [0u8; 64];
            let n = t.read(&mut buf).await.unwrap();
            t.write_all(&buf[..n]).await.unwrap();
            t.shutdown().await.unwrap();
        });
        let (state, eg) = proxy(vec![Rule::host("api.test", Action::Allow)], &up_ca);
        let mut tls = guest_tls(&eg, "api.test", port, &proxy_ca(&state), &[]).await.unwrap();
        tls.write_all(b"\x00\x01 not http").await.unwrap();
        let mut buf = [0u8; 11];
        tokio::time::timeout(std::time::Duration::from_secs(15), tls.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf, b"\x00\x01 not http");
        assert!(eventually(|| flows(&state).iter().any(|f| f.detail.contains("TLS without HTTP"))).await);
    });
}
