//! Shared by the proxy's integration tests: a guest-init stand-in (an
//! `Egress` client over a socketpair) and loopback upstreams.

#![allow(dead_code)]

use capvisor_rpc::conn::{self, INTERNAL};
use capvisor_rpc::sink::CollectSink;
use capvisor_rpc::CvError;
use capvisor_schema::common_capnp::{byte_sink, ErrorCode};
use capvisor_schema::guest_capnp::egress;
use std::time::Duration;

/// The most one test's `down` sink collects.
pub const COLLECT_LIMIT: usize = 32 << 20;

/// Dials `stream` as guest-init does (`Side::Client`) and returns `Egress`.
pub fn guest(stream: tokio::net::UnixStream) -> (egress::Client, tokio::task::JoinHandle<Result<(), capnp::Error>>) {
    conn::connect::<egress::Client>(stream, None, INTERNAL)
}

/// A connect whose upstream bytes collect in memory.
pub struct Flow {
    /// The `up` sink, or the error.
    pub up: Result<byte_sink::Client, capnp::Error>,
    /// Everything `down` received, once `done` was called.
    pub down: tokio::sync::oneshot::Receiver<Vec<u8>>,
}

/// `Egress.connect(host, port)` with a collecting `down` sink.
pub async fn connect(eg: &egress::Client, host: &str, port: u16) -> Flow {
    let (down, rx) = CollectSink::client(COLLECT_LIMIT);
    let mut req = eg.connect_request();
    req.get().set_host(host);
    req.get().set_port(port);
    req.get().set_down(down);
    let up = match req.send().promise.await {
        Ok(r) => r.get().and_then(|r| r.get_up()),
        Err(e) => Err(e),
    };
    Flow { up, down: rx }
}

/// The domain error code of a failed call.
pub fn code(e: &capnp::Error) -> ErrorCode {
    CvError::from_rpc(e).unwrap_or_else(|| panic!("not a domain error: {e}")).code
}

/// `Egress.resolve(name)`.
pub async fn resolve(eg: &egress::Client, name: &str) -> bool {
    let mut req = eg.resolve_request();
    req.get().set_name(name);
    req.send().promise.await.unwrap().get().unwrap().get_allowed()
}

/// Deterministic pseudo-random bytes (xorshift64), so a lost, duplicated
/// or reordered chunk shows.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Polls `cond` every 10 ms for up to 10 s (releases and socket closes
/// travel through the RPC system and the kernel); false if it never held.
pub async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..1000 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// Every NetLog entry of `state`, oldest first.
pub fn flows(state: &capvisor_proxy::ProxyState) -> Vec<capvisor_proxy::log::Flow> {
    state.log.borrow().recent("", 0, 0)
}

/// A loopback upstream listener on an ephemeral port, and the port.
pub async fn listener() -> (tokio::net::TcpListener, u16) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

/// A `ByteSink` writing into one half of an in-memory pipe (`done`:
/// shutdown).
struct PipeSink(std::rc::Rc<tokio::sync::Mutex<tokio::io::WriteHalf<tokio::io::DuplexStream>>>);

impl byte_sink::Server for PipeSink {
    async fn write(self: capnp::capability::Rc<Self>, params: byte_sink::WriteParams) -> capnp::Result<()> {
        use tokio::io::AsyncWriteExt;
        let data = params.get()?.get_data()?;
        self.0.lock().await.write_all(data).await.map_err(|e| capnp::Error::failed(e.to_string()))
    }

    async fn done(
        self: capnp::capability::Rc<Self>,
        _: byte_sink::DoneParams,
        _: byte_sink::DoneResults,
    ) -> capnp::Result<()> {
        use tokio::io::AsyncWriteExt;
        let _ = self.0.lock().await.shutdown().await;
        Ok(())
    }
}

/// `Egress.connect(host, port)` as a byte stream, the way a guest program
/// sees its socket through guest-init: writes go to `up` (shutdown:
/// `done`), `down`'s bytes are read. Errors: the connect failed.
pub async fn stream(eg: &egress::Client, host: &str, port: u16) -> Result<tokio::io::DuplexStream, capnp::Error> {
    use tokio::io::AsyncReadExt;
    let (app, bridge) = tokio::io::duplex(256 * 1024);
    let (mut br, bw) = tokio::io::split(bridge);
    let down: byte_sink::Client = capnp_rpc::new_client(PipeSink(std::rc::Rc::new(tokio::sync::Mutex::new(bw))));
    let mut req = eg.connect_request();
    req.get().set_host(host);
    req.get().set_port(port);
    req.get().set_down(down);
    let up = req.send().promise.await?.get()?.get_up()?;
    tokio::task::spawn_local(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match br.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut w = up.write_request();
                    w.get().set_data(&buf[..n]);
                    if w.send().await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = up.done_request().send().promise.await;
    });
    Ok(app)
}
pub mod tls;
