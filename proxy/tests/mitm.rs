//! TLS interception in-process: a guest stand-in opens `Egress` flows and
//! speaks TLS through them trusting only the proxy's CA (as a guest does
//! after guest-init installed it), against real hyper HTTPS upstreams on
//! 127.0.0.1 whose certificates come from another CA the proxy is told to
//! trust (`extra_roots_pem`, as the manifest's `[net] ca_certs`). Names
//! resolve through overrides; nothing leaves loopback.

mod common;

use bytes::Bytes;
use capvisor_proxy::ca::{self, CaPem};
use capvisor_proxy::policy::{Action, Rule};
use capvisor_proxy::{Config, ProxyState};
use capvisor_rpc::conn;
use capvisor_schema::internal_capnp::secret_source;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::cell::RefCell;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Copy)]
struct LocalExec;

impl<F: std::future::Future + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// What an upstream saw: (HTTP version, method, path, authorization).
type Seen = Rc<RefCell<Vec<(String, String, String, String)>>>;

/// A CA for upstreams and a leaf for `api.test`, `other.test` signed by it.
fn upstream_ca() -> (CaPem, Arc<rustls::ServerConfig>, Arc<rustls::ServerConfig>) {
    let pem = ca::generate().unwrap();
    let key = rcgen::KeyPair::from_pem(&pem.key).unwrap();
    let issuer = rcgen::CertificateParams::from_ca_cert_pem(&pem.cert).unwrap().self_signed(&key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["api.test".into(), "other.test".into()])
        .unwrap()
        .signed_by(&leaf_key, &issuer, &key)
        .unwrap();
    let make = |alpn: &[&[u8]]| {
        let mut c = rustls::ServerConfig::builder_with_provider(ca::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
            )
            .unwrap();
        c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(c)
    };
    (pem, make(&[b"h2", b"http/1.1"]), make(&[b"http/1.1"]))
}

/// Serves one upstream request: `/echo` answers what it saw, `/stream`
/// sends "first" then waits for `release` before "second", `/ws` upgrades
/// and echoes, `/big?n=N` sends N bytes.
async fn route(
    mut req: http::Request<Incoming>,
    seen: Seen,
    release: Rc<tokio::sync::Notify>,
) -> Result<http::Response<http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>>, Infallible> {
    let version = format!("{:?}", req.version());
    let auth = req
        .headers()
        .get("authorization")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let path = req.uri().path().to_string();
    seen.borrow_mut().push((version.clone(), req.method().to_string(), path.clone(), auth.clone()));
    let boxed = |b: Full<Bytes>| b.map_err(|never| match never {}).boxed_unsync();
    if path == "/ws" {
        let on = hyper::upgrade::on(&mut req);
        tokio::task::spawn_local(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Ok(http::Response::builder()
            .status(101)
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .body(boxed(Full::new(Bytes::new())))
            .unwrap());
    }
    if path == "/stream" {
        let (mut tx, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(4);
        tokio::task::spawn_local(async move {
            let _ = tx.send_data(Bytes::from_static(b"first\n")).await;
            release.notified().await;
            let _ = tx.send_data(Bytes::from_static(b"second\n")).await;
        });
        return Ok(http::Response::new(body.boxed_unsync()));
    }
    if path == "/big" {
        let n: usize = req.uri().query().and_then(|q| q.strip_prefix("n=")).and_then(|n| n.parse().ok()).unwrap_or(0);
        return Ok(http::Response::new(boxed(Full::new(Bytes::from(pattern(n, 7))))));
    }
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let text = format!("{version} {path} auth={auth} len={}", body.len());
    Ok(http::Response::new(boxed(Full::new(Bytes::from(text)))))
}

use std::convert::Infallible;

/// An HTTPS upstream on 127.0.0.1 with `tls`; HTTP/2 or HTTP/1.1 as ALPN
/// decides. Returns its port.
async fn upstream(tls: Arc<rustls::ServerConfig>, seen: Seen, release: Rc<tokio::sync::Notify>) -> u16 {
    let (l, port) = listener().await;
    tokio::task::spawn_local(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
            let (seen, release) = (seen.clone(), release.clone());
            tokio::task::spawn_local(async move {
                let Ok(t) = acceptor.accept(s).await else { return };
                let h2 = t.get_ref().1.alpn_protocol() == Some(b"h2");
                let svc = hyper::service::service_fn(move |req| route(req, seen.clone(), release.clone()));
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(LocalExec)
                        .serve_connection(TokioIo::new(t), svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(t), svc)
                        .with_upgrades()
                        .await;
                }
            });
        }
    });
    port
}

/// A proxy intercepting with a fresh CA, trusting `upstream_ca` for
/// upstreams (and not the system roots).
fn proxy(rules: Vec<Rule>, upstream_ca: &CaPem) -> (Rc<ProxyState>, capvisor_schema::guest_capnp::egress::Client) {
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    let cfg = Config {
        session_id: "test".into(),
        rules,
        resolve: vec![("api.test".into(), vec![lo]), ("other.test".into(), vec![lo])],
        ca: Some(ca::generate().unwrap()),
        extra_roots_pem: upstream_ca.cert.clone(),
        system_roots: false,
        ..Config::default()
    };
    let state = ProxyState::new(cfg).unwrap();
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    capvisor_proxy::serve_vm(&state, "vm1", a).unwrap();
    let (eg, _conn) = guest(b);
    (state, eg)
}

/// A TLS client over an `Egress` flow trusting only `trust` (PEM), with
/// `alpn`.
async fn guest_tls(
    eg: &capvisor_schema::guest_capnp::egress::Client,
    host: &str,
    port: u16,
    trust: &str,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::io::DuplexStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(trust.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(ca::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let io = stream(eg, host, port).await.map_err(|e| std::io::Error::other(e.to_string()))?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, io).await
}

/// An HTTP/1.1 client over a guest TLS stream.
async fn h1(
    tls: tokio_rustls::client::TlsStream<tokio::io::DuplexStream>,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (s, c) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::task::spawn_local(async move { drop(c.with_upgrades().await) });
    s
}

fn get(host: &str, path: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(path).header("host", host).body(Full::new(Bytes::new())).unwrap()
}

async fn text(resp: http::Response<Incoming>) -> (u16, String) {
    let status = resp.status().as_u16();
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&b).into_owned())
}

fn proxy_ca(state: &ProxyState) -> String {
    state.mitm.as_ref().unwrap().ca.cert_pem().to_string()
}

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
