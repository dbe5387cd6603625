//! capnp-rpc connections over Unix-domain byte streams.
//!
//! The RPC system is not `Send` (DESIGN.md, "capnp-rpc facts"): every
//! connection runs on a `current_thread` runtime inside a
//! [`tokio::task::LocalSet`]; use [`run_local`] as a process's main loop.

use capnp::capability::Client;
use capnp::message::ReaderOptions;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, RpcSystem};
use futures::AsyncReadExt;
use std::future::Future;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

/// Reader limits for connections a hostile peer may write to (the gateway
/// socket, client connections handed to workers): 16 MiB per message
/// (2 Mi words) and a nesting depth of 64. A larger message ends that
/// connection only.
pub const UNTRUSTED: ReaderOptions =
    ReaderOptions { traversal_limit_in_words: Some(2 * 1024 * 1024), nesting_limit: 64 };

/// Reader limits between capvisor's own processes and toward a guest:
/// 64 MiB per message (8 Mi words), capnp's default, nesting 64. Bulk data
/// still travels in [`crate::CHUNK`]-sized `ByteSink` writes.
pub const INTERNAL: ReaderOptions =
    ReaderOptions { traversal_limit_in_words: Some(8 * 1024 * 1024), nesting_limit: 64 };

/// Runs `fut` to completion on a fresh single-threaded tokio runtime with a
/// `LocalSet`, so it may `spawn_local` RPC systems.
///
/// Errors: panics only if the runtime cannot be built (no epoll, no fds).
pub fn run_local<F: Future>(fut: F) -> F::Output {
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("build tokio current_thread runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, fut)
}

/// Builds an RPC system on a connected Unix stream.
///
/// - `side`: `Side::Server` for the end that accepted / owns the bootstrap,
///   `Side::Client` for the end that dialled. Each end may still offer a
///   bootstrap cap.
/// - `bootstrap`: the capability the peer gets from its `bootstrap()` call.
/// - `opts`: [`UNTRUSTED`] or [`INTERNAL`].
///
/// The returned system must be polled (usually `tokio::task::spawn_local`);
/// it resolves when the connection ends, which is where holds are released.
pub fn rpc_system(
    stream: tokio::net::UnixStream,
    side: Side,
    bootstrap: Option<Client>,
    opts: ReaderOptions,
) -> RpcSystem<Side> {
    let (reader, writer) = stream.compat().split();
    let network =
        twoparty::VatNetwork::new(futures::io::BufReader::new(reader), futures::io::BufWriter::new(writer), side, opts);
    RpcSystem::new(Box::new(network), bootstrap)
}

/// Like [`rpc_system`] but on any split tokio reader / writer pair (for a
/// guest's virtio-serial port, or a file descriptor wrapped in `AsyncFd`).
pub fn rpc_system_rw<R, W>(
    reader: R,
    writer: W,
    side: Side,
    bootstrap: Option<Client>,
    opts: ReaderOptions,
) -> RpcSystem<Side>
where
    R: tokio::io::AsyncRead + Unpin + 'static,
    W: tokio::io::AsyncWrite + Unpin + 'static,
{
    let network = twoparty::VatNetwork::new(
        futures::io::BufReader::new(reader.compat()),
        futures::io::BufWriter::new(writer.compat_write()),
        side,
        opts,
    );
    RpcSystem::new(Box::new(network), bootstrap)
}

/// Dials `stream` as a client: spawns the RPC system on the current
/// `LocalSet` and returns the peer's bootstrap cap of type `C`, plus a
/// handle that resolves when the connection ends.
///
/// Must be called inside a `LocalSet` (see [`run_local`]).
pub fn connect<C: capnp::capability::FromClientHook>(
    stream: tokio::net::UnixStream,
    bootstrap: Option<Client>,
    opts: ReaderOptions,
) -> (C, tokio::task::JoinHandle<Result<(), capnp::Error>>) {
    let mut system = rpc_system(stream, Side::Client, bootstrap, opts);
    let cap: C = system.bootstrap(Side::Server);
    let handle = tokio::task::spawn_local(system);
    (cap, handle)
}

/// Serves `bootstrap` on `stream` (this end is `Side::Server`) and returns
/// the peer's own bootstrap cap of type `C` (a broken cap if it offers
/// none) and a handle that resolves when the connection ends.
///
/// Must be called inside a `LocalSet`.
pub fn serve<C: capnp::capability::FromClientHook>(
    stream: tokio::net::UnixStream,
    bootstrap: Client,
    opts: ReaderOptions,
) -> (C, tokio::task::JoinHandle<Result<(), capnp::Error>>) {
    let mut system = rpc_system(stream, Side::Server, Some(bootstrap), opts);
    let cap: C = system.bootstrap(Side::Client);
    let handle = tokio::task::spawn_local(system);
    (cap, handle)
}

/// Turns an inherited raw descriptor (a socketpair end the parent passed at
/// spawn, see [`crate::spawn`]) into a non-blocking tokio `UnixStream`.
///
/// # Safety
/// `fd` must be an open stream socket this process owns and uses nowhere else.
pub unsafe fn stream_from_fd(fd: std::os::fd::RawFd) -> std::io::Result<tokio::net::UnixStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: the caller guarantees `fd` is an open stream socket owned by
    // this process and used nowhere else, so the stream may take ownership.
    let std = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    std.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(std)
}
