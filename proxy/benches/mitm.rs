//! TLS interception figures (`cargo bench -p capvisor-proxy --bench mitm`):
//! an HTTPS download and small HTTPS requests (a new connection and TLS
//! handshake each) through `Egress.connect` and the proxy's interception
//! (the guest-side TLS ends in the proxy, which makes its own verified TLS
//! connection upstream), against the same requests from a client straight
//! to the upstream. This isolates the proxy's own cost: in a real VM under
//! TCG the guest's emulated TLS dominates (`make bench`, egress section).
//!
//! Layout as `benches/relay.rs`: the upstream (hyper, HTTP/1.1, streaming
//! 64 KiB frames) on one thread, the proxy on another (its own
//! `current_thread` runtime), the client on the main thread. Loopback
//! only. Prints one line per figure.

#[path = "../tests/common/mod.rs"]
mod common;

use bytes::Bytes;
use capvisor_proxy::policy::{Action, Rule};
use capvisor_proxy::{Config, ProxyState};
use capvisor_rpc::conn;
use common::tls::*;
use common::*;
use http_body_util::{BodyExt, Full};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BULK: usize = 256 << 20;
const ROUNDS: usize = 200;

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

/// Reads a response body to its end; returns its length.
async fn drain(resp: http::Response<hyper::body::Incoming>) -> usize {
    let mut body = resp.into_body();
    let mut n = 0;
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            n += d.len();
        }
    }
    n
}

/// A TLS client straight to the upstream, trusting `ca_pem`.
async fn direct(port: u16, ca_pem: &str) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(capvisor_proxy::ca::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = rustls::pki_types::ServerName::try_from("api.test").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.unwrap();
    h1(tls).await
}

fn main() {
    // Upstream thread.
    let (up_ca, _, h1cfg) = upstream_ca();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        conn::run_local(async move {
            let port = upstream(h1cfg, Default::default(), Default::default()).await;
            tx.send(port).unwrap();
            std::future::pending::<()>().await;
        })
    });
    let port = rx.recv().unwrap();
    // Proxy thread: intercepting, trusting the upstream's CA.
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let (ptx, prx) = std::sync::mpsc::channel();
    let up_pem = up_ca.cert.clone();
    std::thread::spawn(move || {
        conn::run_local(async move {
            let lo: IpAddr = "127.0.0.1".parse().unwrap();
            let cfg = Config {
                session_id: "bench".into(),
                rules: vec![Rule::host("api.test", Action::Allow).on_port(port)],
                resolve: vec![("api.test".into(), vec![lo])],
                ca: Some(capvisor_proxy::ca::generate().unwrap()),
                extra_roots_pem: up_pem,
                system_roots: false,
                ..Config::default()
            };
            let state = ProxyState::new(cfg).unwrap();
            ptx.send(state.mitm.as_ref().unwrap().ca.cert_pem().to_string()).unwrap();
            a.set_nonblocking(true).unwrap();
            let task = capvisor_proxy::serve_vm(&state, "bench", tokio::net::UnixStream::from_std(a).unwrap()).unwrap();
            let _ = task.await;
        })
    });
    let proxy_pem = prx.recv().unwrap();
    conn::run_local(async move {
        b.set_nonblocking(true).unwrap();
        let (eg, _conn) = guest(tokio::net::UnixStream::from_std(b).unwrap());
        let big = format!("/zeros?n={BULK}");
        let mbs = |d: Duration| BULK as f64 / 1e6 / d.as_secs_f64();

        let mut s = direct(port, &up_ca.cert).await;
        let t = Instant::now();
        assert_eq!(drain(s.send_request(get("api.test", &big)).await.unwrap()).await, BULK);
        let d_direct = t.elapsed();

        let tls = guest_tls(&eg, "api.test", port, &proxy_pem, &[b"http/1.1"]).await.unwrap();
        let mut s = h1(tls).await;
        let t = Instant::now();
        assert_eq!(drain(s.send_request(get("api.test", &big)).await.unwrap()).await, BULK);
        let d_proxy = t.elapsed();
        println!("{:<64} {:>8.1} MB/s", "mitm: 256 MiB HTTPS download, intercepted (Egress + proxy)", mbs(d_proxy));
        println!("{:<64} {:>8.1} MB/s", "mitm: 256 MiB HTTPS download, direct", mbs(d_direct));
        println!("{:<64} {:>10.2}x", "mitm: download ratio intercepted / direct", mbs(d_proxy) / mbs(d_direct));

        let mut via = Vec::new();
        let mut straight = Vec::new();
        for _ in 0..ROUNDS {
            let t = Instant::now();
            let mut s = direct(port, &up_ca.cert).await;
            drain(s.send_request(get("api.test", "/echo")).await.unwrap()).await;
            straight.push(t.elapsed());
            let t = Instant::now();
            let tls = guest_tls(&eg, "api.test", port, &proxy_pem, &[b"http/1.1"]).await.unwrap();
            let mut s = h1(tls).await;
            drain(s.send_request(get("api.test", "/echo")).await.unwrap()).await;
            via.push(t.elapsed());
        }
        for (what, v) in [("intercepted", &mut via), ("direct", &mut straight)] {
            println!(
                "{:<64} {:>9.0} us",
                format!("mitm: small HTTPS request, new connection, {what} p50 ({ROUNDS})"),
                percentile(v, 0.50).as_secs_f64() * 1e6
            );
            println!(
                "{:<64} {:>9.0} us",
                format!("mitm: small HTTPS request, new connection, {what} p99"),
                percentile(v, 0.99).as_secs_f64() * 1e6
            );
        }
    });
}
