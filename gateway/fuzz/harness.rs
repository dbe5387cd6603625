//! Fuzz harness for the gateway's connection preamble
//! (`capvisor_rpc::attach::read_preamble`) and frame guard
//! (`capvisor_gateway::guard`), through a real socket: a real
//! `capvisor_gateway::Gateway` accept loop runs in-process on a Unix
//! listener (as `gateway/src/tests.rs` does it, with a fake broker that
//! denies every login and an attach side that closes what it is handed),
//! the fuzz input is written to a fresh client connection, and then:
//!
//! - the gateway never panics (a panic hook raises a flag; under
//!   cargo-fuzz, libfuzzer-sys aborts on the panic itself);
//! - it answers and hangs up within [`BOUND`] once the client has sent its
//!   input and shut down its writing half (whatever bytes come back are
//!   read and dropped);
//! - a well-formed client is still served afterwards (`authMethods`
//!   lists both methods; `loginLocal` gets the typed `denied`).
//!
//! Shared by the cargo-fuzz target (`fuzz_targets/preamble_frames.rs`,
//! [`fuzz_one`]) and the stable replay test of the checked-in corpus
//! (`gateway/tests/fuzz_corpus.rs`), which `cargo test` runs.

#![allow(dead_code)]

use capnp::capability::Rc as CapRc;
use capvisor_gateway::{Gateway, Limits};
use capvisor_rpc::conn;
use capvisor_rpc::fdpass::{self, FdChannel};
use capvisor_rpc::schema::capvisor_capnp::gateway;
use capvisor_rpc::schema::internal_capnp::broker;
use capvisor_rpc::CvError;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// How long the gateway may take to answer and hang up after the client
/// sent its input and shut down its writing half.
pub const BOUND: Duration = Duration::from_secs(5);

/// Denies every login; its answers travel back through the gateway.
struct DenyAll;

impl broker::Server for DenyAll {
    async fn login_local(
        self: CapRc<Self>,
        _: broker::LoginLocalParams,
        _: broker::LoginLocalResults,
    ) -> capnp::Result<()> {
        Err(CvError::denied("fuzz: no logins").into())
    }
    async fn login_password(
        self: CapRc<Self>,
        _: broker::LoginPasswordParams,
        _: broker::LoginPasswordResults,
    ) -> capnp::Result<()> {
        Err(CvError::denied("fuzz: no logins").into())
    }
    async fn resume(self: CapRc<Self>, _: broker::ResumeParams, _: broker::ResumeResults) -> capnp::Result<()> {
        Err(CvError::stale().into())
    }
}

/// A gateway serving on a private socket. Must be created and used inside
/// one `LocalSet` (its tasks are local).
pub struct Gw {
    _dir: tempfile::TempDir,
    /// The gateway's socket.
    pub path: PathBuf,
}

static PANICKED: AtomicBool = AtomicBool::new(false);

/// Installs (once) a panic hook that records any panic, also one inside
/// a gateway task (tokio would otherwise only end that task), then runs
/// the previous hook.
pub fn install_panic_flag() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.store(true, Ordering::SeqCst);
            prev(info);
        }));
    });
}

/// Whether anything panicked since [`install_panic_flag`].
pub fn panicked() -> bool {
    PANICKED.load(Ordering::SeqCst)
}

impl Gw {
    /// Starts the gateway (default limits but a 2 s login deadline) with
    /// the fake broker, and a task that closes every attach connection it
    /// is handed (as the broker does for an unknown token).
    pub fn start() -> Gw {
        install_panic_flag();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gw.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let broker: broker::Client = capnp_rpc::new_client(DenyAll);
        let (a, b) = fdpass::pair().expect("fd channel pair");
        let limits = Limits { login_deadline: Duration::from_secs(2), ..Limits::default() };
        let gw = Gateway::new(
            broker,
            FdChannel::new(a).expect("fd channel"),
            vec!["local".into(), "password".into()],
            limits,
        );
        tokio::task::spawn_local(gw.accept_loop(listener));
        let attach_side = FdChannel::new(b).expect("fd channel");
        tokio::task::spawn_local(async move {
            while let Ok((_tag, fd)) = attach_side.recv().await {
                drop(fd);
            }
        });
        Gw { _dir: dir, path }
    }
}

/// What one input got back.
#[derive(Debug)]
pub struct Outcome {
    /// Bytes the gateway sent back.
    pub bytes_back: usize,
    /// Time from our shutdown to the gateway's hang-up.
    pub closed_after: Duration,
}

/// Writes `input` on a fresh connection, shuts down our writing half and
/// reads until the gateway hangs up.
///
/// Errors: the gateway did not hang up within [`BOUND`] (the message says
/// how many bytes it sent meanwhile).
pub async fn feed(gw: &Gw, input: &[u8]) -> Result<Outcome, String> {
    let mut s = UnixStream::connect(&gw.path).await.map_err(|e| format!("connect: {e}"))?;
    // The gateway may hang up before it read everything (a bad preamble,
    // an oversized frame): a failed write is a normal outcome.
    let _ = s.write_all(input).await;
    let _ = s.shutdown().await;
    let t0 = Instant::now();
    let mut got = 0usize;
    let mut buf = [0u8; 8192];
    let r = tokio::time::timeout(BOUND, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    match r {
        Ok(()) => Ok(Outcome { bytes_back: got, closed_after: t0.elapsed() }),
        Err(_) => Err(format!("the gateway neither hung up nor finished within {BOUND:?} ({got} bytes back)")),
    }
}

/// A well-formed client: `authMethods` lists local and password, and
/// `loginLocal` gets the fake broker's typed `denied`.
///
/// Errors: what went wrong.
pub async fn well_formed(gw: &Gw) -> Result<(), String> {
    let mut s = UnixStream::connect(&gw.path).await.map_err(|e| format!("connect: {e}"))?;
    s.write_all(capvisor_rpc::attach::MAGIC_RPC).await.map_err(|e| format!("preamble: {e}"))?;
    let (client, conn) = conn::connect::<gateway::Client>(s, None, conn::INTERNAL);
    let r = tokio::time::timeout(BOUND, async {
        let resp = client.auth_methods_request().send().promise.await.map_err(|e| format!("authMethods: {e}"))?;
        let n = resp.get().and_then(|r| r.get_methods()).map(|m| m.len()).map_err(|e| e.to_string())?;
        if n != 2 {
            return Err(format!("authMethods listed {n} methods"));
        }
        match client.login_local_request().send().promise.await {
            Err(e) if CvError::from_rpc(&e).is_some_and(|c| c.code_name() == "denied") => Ok(()),
            Err(e) => Err(format!("loginLocal: untyped {e}")),
            Ok(_) => Err("loginLocal succeeded against a broker that denies all".into()),
        }
    })
    .await
    .unwrap_or_else(|_| Err(format!("no answer within {BOUND:?}")));
    drop(client);
    conn.abort();
    r
}

/// One input, all checks; panics (which the fuzzer reports as a crash) on
/// a violated property.
pub async fn check(gw: &Gw, input: &[u8]) {
    let fed = feed(gw, input).await;
    assert!(!panicked(), "the gateway panicked on input {:02x?}", &input[..input.len().min(64)]);
    if let Err(e) = fed {
        panic!("{e}; input {:02x?}", &input[..input.len().min(64)]);
    }
    if let Err(e) = well_formed(gw).await {
        panic!("a well-formed client is no longer served after input {:02x?}: {e}", &input[..input.len().min(64)]);
    }
}

type Fixture = (tokio::runtime::Runtime, tokio::task::LocalSet, std::cell::OnceCell<Gw>);

thread_local! {
    // Leaked on purpose: dropping the runtime and the LocalSet in thread
    // exit order (runtime first) wakes local tasks after the LocalSet's
    // thread-local is gone, which panics at process exit.
    static RT: &'static Fixture = Box::leak(Box::new((
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"),
        tokio::task::LocalSet::new(),
        std::cell::OnceCell::new(),
    )));
}

/// The cargo-fuzz entry point: one gateway per process (kept across
/// inputs, so state left by one input can break a later one), [`check`]
/// for every input.
pub fn fuzz_one(input: &[u8]) {
    RT.with(|(rt, local, gw)| {
        local.block_on(rt, async {
            let gw = gw.get_or_init(Gw::start);
            check(gw, input).await;
        })
    });
}
