//! TLS interception fixtures shared by `tests/mitm.rs` and
//! `benches/mitm.rs`: hyper HTTPS upstreams on 127.0.0.1 with a CA of
//! their own, a proxy that intercepts with a fresh CA and trusts the
//! upstreams' (not the system roots), and a guest-side TLS client over an
//! `Egress` flow.

#![allow(dead_code)]

use super::*;
use bytes::Bytes;
use capvisor_proxy::ca::{self, CaPem};
use capvisor_proxy::policy::Rule;
use capvisor_proxy::{Config, ProxyState};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::cell::RefCell;
use std::convert::Infallible;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Spawns `!Send` futures on the current `LocalSet`.
#[derive(Clone, Copy)]
pub struct LocalExec;

impl<F: std::future::Future + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// What an upstream saw: (HTTP version, method, path, authorization).
pub type Seen = Rc<RefCell<Vec<(String, String, String, String)>>>;

/// A CA for upstreams and a leaf for `api.test`, `other.test` signed by it.
pub fn upstream_ca() -> (CaPem, Arc<rustls::ServerConfig>, Arc<rustls::ServerConfig>) {
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

/// Serves one upstream request: `/zeros?n=N` streams N zero bytes,
/// `/echo` answers what it saw, `/stream`
/// sends "first" then waits for `release` before "second", `/ws` upgrades
/// and echoes, `/big?n=N` sends N bytes.
pub async fn route(
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
    if path == "/zeros" {
        // Streamed in 64 KiB frames (nothing held whole), for the bench.
        let n: usize = req.uri().query().and_then(|q| q.strip_prefix("n=")).and_then(|n| n.parse().ok()).unwrap_or(0);
        let (mut tx, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(8);
        tokio::task::spawn_local(async move {
            let chunk = Bytes::from(vec![0u8; 64 * 1024]);
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len());
                if tx.send_data(chunk.slice(..k)).await.is_err() {
                    return;
                }
                left -= k;
            }
        });
        let mut resp = http::Response::new(body.boxed_unsync());
        resp.headers_mut().insert("content-length", n.into());
        return Ok(resp);
    }
    if path == "/big" {
        let n: usize = req.uri().query().and_then(|q| q.strip_prefix("n=")).and_then(|n| n.parse().ok()).unwrap_or(0);
        return Ok(http::Response::new(boxed(Full::new(Bytes::from(pattern(n, 7))))));
    }
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let text = format!("{version} {path} auth={auth} len={}", body.len());
    Ok(http::Response::new(boxed(Full::new(Bytes::from(text)))))
}

/// An HTTPS upstream on 127.0.0.1 with `tls`; HTTP/2 or HTTP/1.1 as ALPN
/// decides. Returns its port.
pub async fn upstream(tls: Arc<rustls::ServerConfig>, seen: Seen, release: Rc<tokio::sync::Notify>) -> u16 {
    let (l, port) = listener().await;
    tokio::task::spawn_local(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let _ = s.set_nodelay(true);
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
pub fn proxy(rules: Vec<Rule>, upstream_ca: &CaPem) -> (Rc<ProxyState>, capvisor_schema::guest_capnp::egress::Client) {
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
pub async fn guest_tls(
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
pub async fn h1<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>(
    tls: S,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (s, c) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::task::spawn_local(async move { drop(c.with_upgrades().await) });
    s
}

pub fn get(host: &str, path: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(path).header("host", host).body(Full::new(Bytes::new())).unwrap()
}

pub async fn text(resp: http::Response<Incoming>) -> (u16, String) {
    let status = resp.status().as_u16();
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&b).into_owned())
}

pub fn proxy_ca(state: &ProxyState) -> String {
    state.mitm.as_ref().unwrap().ca.cert_pem().to_string()
}
