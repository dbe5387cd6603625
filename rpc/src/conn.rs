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
use std::rc::Rc;
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

/// Reader limits for the agent link as the host reads it (the worker's
/// end): the guest is untrusted. 1 MiB per message (128 Ki words), nesting
/// 64: a [`crate::CHUNK`] `ByteSink.write` (64 KiB) and every other guest
/// answer fit many times over. A larger message ends the link (the worker
/// then marks the VM crashed).
pub const GUEST: ReaderOptions = ReaderOptions { traversal_limit_in_words: Some(128 * 1024), nesting_limit: 64 };

/// How much a peer may have the local end working on at once: calls
/// received and not yet answered (`Return` not yet sent), and the size of
/// their messages. capnp-rpc (Rust) has no receiver-side flow limit (C++'s
/// `RpcSystem::setFlowLimit`; the Rust crate's flow controller only bounds
/// what a well-behaved *sender* puts in flight), so [`rpc_system_limited`]
/// counts in the transport: a `Call` over either bound is answered at once
/// with an `unavailable` exception ("too many calls in flight on this
/// connection") and its message dropped, without reaching the RPC system;
/// the connection stays usable. Refusing instead of not reading further
/// means answers to our own questions keep flowing, so a peer at the bound
/// cannot deadlock calls that wait on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallLimits {
    /// Calls in progress, at most.
    pub calls: usize,
    /// Bytes of the messages of the calls in progress, at most (a call
    /// that alone is larger than this is still admitted when none is in
    /// progress; the reader options bound single messages). Also the most
    /// bytes queued toward a peer that does not read them (its answers,
    /// refusals included): past that, the connection reads nothing more
    /// from the peer until it has read some.
    pub bytes: u64,
}

/// Room for the calls one well-behaved stream can have in progress:
/// capnp-rpc's 64 KiB window per stream (`-> stream` methods) over its
/// smallest message, a one-byte `ByteSink.write` / `Process.write` (about
/// 150 bytes as the window counts them: 433 in progress, measured by the
/// tests below), with room to spare.
const STREAM_CALLS: usize = 1024;

/// Calls a client may have in progress on one connection (the gateway's
/// login connections, sessions attached to a worker): 1024 calls (one
/// stdin stream of one-byte writes held up by a slow guest fits), 64 MiB.
pub const CLIENT_CALLS: CallLimits = CallLimits { calls: STREAM_CALLS, bytes: 64 << 20 };

/// Calls a guest may have in progress on its agent link (its
/// `ByteSink.write`s toward the client, mostly): 4096 calls, 16 MiB. A
/// well-behaved guest-init streams each sink within capnp-rpc's 64 KiB
/// window, so this leaves room for 4 streams of one-byte writes or 128 of
/// full chunks held up by slow clients at once; a guest writing without
/// waiting gets `unavailable` for the excess and cannot grow the worker
/// (or, behind it, the client).
pub const GUEST_CALLS: CallLimits = CallLimits { calls: 4 * STREAM_CALLS, bytes: 16 << 20 };

/// What a [`CallLimits`]-bounded connection has in progress, shared with
/// the transport that counts it (for tests and diagnostics).
#[derive(Debug, Default)]
pub struct CallGauge {
    calls: std::cell::Cell<usize>,
    bytes: std::cell::Cell<u64>,
    peak_bytes: std::cell::Cell<u64>,
    peak_calls: std::cell::Cell<usize>,
    refused: std::cell::Cell<u64>,
    out_bytes: std::cell::Cell<u64>,
    peak_out_bytes: std::cell::Cell<u64>,
    /// Sends not yet written; each yields its size once written.
    writes: std::cell::RefCell<futures::stream::FuturesUnordered<futures::future::LocalBoxFuture<'static, u64>>>,
    /// Answer id -> message bytes of each call in progress.
    answers: std::cell::RefCell<std::collections::HashMap<u32, u64>>,
}

impl CallGauge {
    /// Calls received and not yet answered.
    pub fn calls(&self) -> usize {
        self.calls.get()
    }
    /// Message bytes of those calls.
    pub fn bytes(&self) -> u64 {
        self.bytes.get()
    }
    /// The most calls ever in progress at once.
    pub fn peak_calls(&self) -> usize {
        self.peak_calls.get()
    }
    /// The most message bytes ever in progress at once.
    pub fn peak_bytes(&self) -> u64 {
        self.peak_bytes.get()
    }
    /// Calls refused with `unavailable` so far.
    pub fn refused(&self) -> u64 {
        self.refused.get()
    }
    /// Bytes queued toward the peer and not yet written (as of the last
    /// send or read).
    pub fn out_bytes(&self) -> u64 {
        self.out_bytes.get()
    }
    /// The most bytes ever queued toward the peer at once.
    pub fn peak_out_bytes(&self) -> u64 {
        self.peak_out_bytes.get()
    }

    /// Notes `size` bytes queued to be written, done when `written` resolves.
    fn queued(&self, size: u64, written: futures::future::LocalBoxFuture<'static, u64>) {
        self.reap();
        self.out_bytes.set(self.out_bytes.get() + size);
        self.peak_out_bytes.set(self.peak_out_bytes.get().max(self.out_bytes.get()));
        self.writes.borrow_mut().push(written);
    }

    /// Counts the writes finished by now.
    fn reap(&self) {
        use futures::{FutureExt, StreamExt};
        while let Some(Some(size)) = self.writes.borrow_mut().next().now_or_never() {
            self.out_bytes.set(self.out_bytes.get() - size);
        }
    }

    /// Waits until at most `limit` bytes are queued toward the peer.
    async fn drained(&self, limit: u64) {
        use futures::StreamExt;
        self.reap();
        while self.out_bytes.get() > limit {
            let next = futures::future::poll_fn(|cx| self.writes.borrow_mut().poll_next_unpin(cx)).await;
            match next {
                Some(size) => self.out_bytes.set(self.out_bytes.get() - size),
                None => break,
            }
        }
    }

    fn admit(&self, limits: CallLimits, id: u32, size: u64) -> bool {
        let (calls, bytes) = (self.calls.get(), self.bytes.get());
        if calls >= limits.calls || (calls > 0 && bytes.saturating_add(size) > limits.bytes) {
            self.refused.set(self.refused.get() + 1);
            return false;
        }
        if let Some(old) = self.answers.borrow_mut().insert(id, size) {
            // A reused id still in progress is a protocol error the RPC
            // system reports; keep the counts consistent meanwhile.
            self.bytes.set(self.bytes.get() - old);
            self.calls.set(self.calls.get() - 1);
        }
        self.calls.set(self.calls.get() + 1);
        self.bytes.set(self.bytes.get() + size);
        self.peak_calls.set(self.peak_calls.get().max(self.calls.get()));
        self.peak_bytes.set(self.peak_bytes.get().max(self.bytes.get()));
        true
    }

    fn answered(&self, id: u32) {
        if let Some(size) = self.answers.borrow_mut().remove(&id) {
            self.calls.set(self.calls.get() - 1);
            self.bytes.set(self.bytes.get() - size);
        }
    }
}

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

/// [`rpc_system`] with at most `limits` calls of the peer in progress
/// ([`CallLimits`]); returns the system and the gauge counting them.
pub fn rpc_system_limited(
    stream: tokio::net::UnixStream,
    side: Side,
    bootstrap: Option<Client>,
    opts: ReaderOptions,
    limits: CallLimits,
) -> (RpcSystem<Side>, Rc<CallGauge>) {
    let (reader, writer) = stream.compat().split();
    let network =
        twoparty::VatNetwork::new(futures::io::BufReader::new(reader), futures::io::BufWriter::new(writer), side, opts);
    limited(network, bootstrap, limits)
}

/// [`rpc_system_rw`] with at most `limits` calls of the peer in progress
/// ([`CallLimits`]); returns the system and the gauge counting them.
pub fn rpc_system_rw_limited<R, W>(
    reader: R,
    writer: W,
    side: Side,
    bootstrap: Option<Client>,
    opts: ReaderOptions,
    limits: CallLimits,
) -> (RpcSystem<Side>, Rc<CallGauge>)
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
    limited(network, bootstrap, limits)
}

fn limited<T: futures::AsyncRead + Unpin + 'static>(
    network: twoparty::VatNetwork<T>,
    bootstrap: Option<Client>,
    limits: CallLimits,
) -> (RpcSystem<Side>, Rc<CallGauge>) {
    let gauge = Rc::new(CallGauge::default());
    let net = limit::Network { inner: Box::new(network), limits, gauge: gauge.clone() };
    (RpcSystem::new(Box::new(net), bootstrap), gauge)
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

/// [`connect`] with at most `limits` calls of the peer in progress
/// ([`CallLimits`]; for the agent link, where the guest calls the sinks it
/// was given); also returns the gauge.
///
/// Must be called inside a `LocalSet`.
pub fn connect_limited<C: capnp::capability::FromClientHook>(
    stream: tokio::net::UnixStream,
    bootstrap: Option<Client>,
    opts: ReaderOptions,
    limits: CallLimits,
) -> (C, tokio::task::JoinHandle<Result<(), capnp::Error>>, Rc<CallGauge>) {
    let (mut system, gauge) = rpc_system_limited(stream, Side::Client, bootstrap, opts, limits);
    let cap: C = system.bootstrap(Side::Server);
    let handle = tokio::task::spawn_local(system);
    (cap, handle, gauge)
}

/// [`serve`] with at most `limits` calls of the peer in progress
/// ([`CallLimits`]); also returns the gauge.
///
/// Must be called inside a `LocalSet`.
pub fn serve_limited<C: capnp::capability::FromClientHook>(
    stream: tokio::net::UnixStream,
    bootstrap: Client,
    opts: ReaderOptions,
    limits: CallLimits,
) -> (C, tokio::task::JoinHandle<Result<(), capnp::Error>>, Rc<CallGauge>) {
    let (mut system, gauge) = rpc_system_limited(stream, Side::Server, Some(bootstrap), opts, limits);
    let cap: C = system.bootstrap(Side::Client);
    let handle = tokio::task::spawn_local(system);
    (cap, handle, gauge)
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

/// The transport of [`rpc_system_limited`]: a twoparty network whose
/// connection screens incoming `Call`s against [`CallLimits`] and notes
/// outgoing `Return`s (capnp rpc.capnp, `Message.call` / `Message.return`).
mod limit {
    use super::{CallGauge, CallLimits};
    use capnp::capability::Promise;
    use capnp_rpc::rpc_capnp::{cap_descriptor, exception, message};
    use capnp_rpc::rpc_twoparty_capnp::Side;
    use capnp_rpc::{IncomingMessage, OutgoingMessage};
    use futures::TryFutureExt;
    use std::cell::RefCell;
    use std::rc::Rc;

    type Conn = Rc<RefCell<Box<dyn capnp_rpc::Connection<Side>>>>;

    pub(super) struct Network {
        pub(super) inner: Box<dyn capnp_rpc::VatNetwork<Side>>,
        pub(super) limits: CallLimits,
        pub(super) gauge: Rc<CallGauge>,
    }

    fn wrap(
        inner: Box<dyn capnp_rpc::Connection<Side>>,
        limits: CallLimits,
        gauge: Rc<CallGauge>,
    ) -> Box<dyn capnp_rpc::Connection<Side>> {
        Box::new(Connection { inner: Rc::new(RefCell::new(inner)), limits, gauge })
    }

    impl capnp_rpc::VatNetwork<Side> for Network {
        fn connect(&mut self, host_id: Side) -> Option<Box<dyn capnp_rpc::Connection<Side>>> {
            self.inner.connect(host_id).map(|c| wrap(c, self.limits, self.gauge.clone()))
        }

        fn accept(&mut self) -> Promise<Box<dyn capnp_rpc::Connection<Side>>, capnp::Error> {
            let (limits, gauge) = (self.limits, self.gauge.clone());
            Promise::from_future(self.inner.accept().map_ok(move |c| wrap(c, limits, gauge)))
        }

        fn drive_until_shutdown(&mut self) -> Promise<(), capnp::Error> {
            self.inner.drive_until_shutdown()
        }
    }

    struct Connection {
        inner: Conn,
        limits: CallLimits,
        gauge: Rc<CallGauge>,
    }

    /// A call to refuse: its question id, and the peer's capabilities its
    /// parameters carried (export id, references), which are released.
    struct Refusal {
        question_id: u32,
        releases: Vec<(u32, u32)>,
    }

    /// `Some` when `msg` is a `Call` over the limits (which are not charged
    /// then); a call within them is charged to the gauge. Anything that
    /// does not parse passes, for the RPC system to reject.
    fn screen(msg: &dyn IncomingMessage, limits: CallLimits, gauge: &CallGauge) -> Option<Refusal> {
        let body = msg.get_body().ok()?;
        let m: message::Reader<'_> = body.get_as().ok()?;
        let Ok(message::Call(Ok(call))) = m.which() else { return None };
        let size = body.target_size().ok()?.word_count * 8;
        let question_id = call.get_question_id();
        if gauge.admit(limits, question_id, size) {
            return None;
        }
        let mut releases: Vec<(u32, u32)> = Vec::new();
        if let Ok(table) = call.get_params().and_then(|p| p.get_cap_table()) {
            for d in table.iter() {
                if let Ok(cap_descriptor::SenderHosted(id) | cap_descriptor::SenderPromise(id)) = d.which() {
                    match releases.iter_mut().find(|(e, _)| *e == id) {
                        Some((_, n)) => *n += 1,
                        None => releases.push((id, 1)),
                    }
                }
            }
        }
        Some(Refusal { question_id, releases })
    }

    /// Answers a refused call with an `unavailable` exception and releases
    /// the capabilities its parameters carried (`releaseParamCaps` false:
    /// the explicit `Release`s do it, which C++ and Rust peers both expect).
    fn refuse(conn: &Conn, r: &Refusal, limits: CallLimits, gauge: &Rc<CallGauge>) -> capnp::Result<()> {
        let reason = crate::CvError::unavailable(format!(
            "too many calls in flight on this connection (at most {} calls, {} bytes); retry when some have finished",
            limits.calls, limits.bytes
        ))
        .to_rpc()
        .extra;
        let mut conn = conn.borrow_mut();
        // Counted toward what is queued for the peer, like every send.
        let mut new = |words| Box::new(Outgoing { inner: conn.new_outgoing_message(words), gauge: gauge.clone() });
        let mut out = new(64);
        {
            let mut ret = out.get_body()?.init_as::<message::Builder<'_>>().init_return();
            ret.set_answer_id(r.question_id);
            ret.set_release_param_caps(false);
            let mut ex = ret.init_exception();
            ex.set_type(exception::Type::Overloaded);
            ex.set_reason(reason.as_str());
        }
        let _ = out.send();
        for &(id, count) in &r.releases {
            let mut out = new(8);
            let mut rel = out.get_body()?.init_as::<message::Builder<'_>>().init_release();
            rel.set_id(id);
            rel.set_reference_count(count);
            let _ = out.send();
        }
        Ok(())
    }

    impl capnp_rpc::Connection<Side> for Connection {
        fn get_peer_vat_id(&self) -> Side {
            self.inner.borrow().get_peer_vat_id()
        }

        fn new_outgoing_message(&mut self, first_segment_word_size: u32) -> Box<dyn OutgoingMessage> {
            let inner = self.inner.borrow_mut().new_outgoing_message(first_segment_word_size);
            Box::new(Outgoing { inner, gauge: self.gauge.clone() })
        }

        fn receive_incoming_message(&mut self) -> Promise<Option<Box<dyn IncomingMessage>>, capnp::Error> {
            let (conn, limits, gauge) = (self.inner.clone(), self.limits, self.gauge.clone());
            Promise::from_future(async move {
                loop {
                    // A peer that does not read what we send gets nothing
                    // more read from it (its answers would pile up here).
                    gauge.drained(limits.bytes).await;
                    let next = conn.borrow_mut().receive_incoming_message();
                    let Some(msg) = next.await? else { return Ok(None) };
                    match screen(msg.as_ref(), limits, &gauge) {
                        None => return Ok(Some(msg)),
                        Some(r) => {
                            tracing::debug!(question = r.question_id, "call refused: too many in flight");
                            refuse(&conn, &r, limits, &gauge)?;
                        }
                    }
                }
            })
        }

        fn new_stream(&mut self) -> (Box<dyn capnp_rpc::FlowController>, Promise<(), capnp::Error>) {
            self.inner.borrow_mut().new_stream()
        }

        fn shutdown(&mut self, result: capnp::Result<()>) -> Promise<(), capnp::Error> {
            self.inner.borrow_mut().shutdown(result)
        }
    }

    /// An outgoing message; a `Return` sent ends its call's charge.
    struct Outgoing {
        inner: Box<dyn OutgoingMessage>,
        gauge: Rc<CallGauge>,
    }

    impl OutgoingMessage for Outgoing {
        fn get_body(&mut self) -> capnp::Result<capnp::any_pointer::Builder<'_>> {
            self.inner.get_body()
        }

        fn get_body_as_reader(&self) -> capnp::Result<capnp::any_pointer::Reader<'_>> {
            self.inner.get_body_as_reader()
        }

        fn send(
            self: Box<Self>,
        ) -> (Promise<(), capnp::Error>, Rc<capnp::message::Builder<capnp::message::HeapAllocator>>) {
            let answered =
                self.inner.get_body_as_reader().and_then(|b| b.get_as::<message::Reader<'_>>()).ok().and_then(|m| {
                    match m.which() {
                        Ok(message::Return(Ok(r))) => Some(r.get_answer_id()),
                        _ => None,
                    }
                });
            if let Some(id) = answered {
                self.gauge.answered(id);
            }
            let size = self.inner.size_in_words() as u64 * 8;
            let (written, message) = self.inner.send();
            let (tx, rx) = futures::channel::oneshot::channel();
            self.gauge.queued(
                size,
                Box::pin(async move {
                    let _ = tx.send(written.await);
                    size
                }),
            );
            let done =
                async move { rx.await.unwrap_or_else(|_| Err(capnp::Error::disconnected("not written".into()))) };
            (Promise::from_future(done), message)
        }

        /// Taken, not sent (capnp-rpc takes the results message of a
        /// call cancelled meanwhile and sends a separate `Return`): no
        /// charge ends here.
        fn take(self: Box<Self>) -> capnp::message::Builder<capnp::message::HeapAllocator> {
            self.inner.take()
        }

        fn size_in_words(&self) -> usize {
            self.inner.size_in_words()
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::common_capnp::{byte_sink, files};
    use crate::CvError;
    use capvisor_schema::common_capnp::ErrorCode;
    use std::cell::Cell;

    /// A sink whose calls wait until `open` is notified; counts the calls
    /// it entered and the bytes written to it.
    #[derive(Default)]
    struct Gate {
        open: tokio::sync::Notify,
        entered: Cell<usize>,
        opened: Cell<bool>,
    }

    impl Gate {
        async fn pass(&self) {
            self.entered.set(self.entered.get() + 1);
            while !self.opened.get() {
                self.open.notified().await;
            }
        }
        fn release(&self) {
            self.opened.set(true);
            self.open.notify_waiters();
        }
    }

    struct GatedSink(Rc<Gate>);

    impl byte_sink::Server for GatedSink {
        async fn write(self: Rc<Self>, _: byte_sink::WriteParams) -> capnp::Result<()> {
            self.0.pass().await;
            Ok(())
        }
        async fn done(self: Rc<Self>, _: byte_sink::DoneParams, _: byte_sink::DoneResults) -> capnp::Result<()> {
            self.0.pass().await;
            Ok(())
        }
    }

    impl files::Server for GatedSink {
        async fn read(self: Rc<Self>, _: files::ReadParams, _: files::ReadResults) -> capnp::Result<()> {
            self.0.pass().await;
            Ok(())
        }
    }

    /// A sink that says when the last reference to it is gone.
    struct Watched(Rc<Cell<bool>>);
    impl Drop for Watched {
        fn drop(&mut self) {
            self.0.set(true);
        }
    }
    impl byte_sink::Server for Watched {}

    /// Serves `bootstrap` under `limits`; returns the client's view of it.
    fn pair<C: capnp::capability::FromClientHook>(bootstrap: Client, limits: CallLimits) -> (C, Rc<CallGauge>) {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (system, gauge) = rpc_system_limited(a, Side::Server, Some(bootstrap), UNTRUSTED, limits);
        tokio::task::spawn_local(system);
        (connect::<C>(b, None, INTERNAL).0, gauge)
    }

    async fn until(mut cond: impl FnMut() -> bool) {
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while !cond() {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("condition within 10 s");
    }

    /// `ByteSink.write` sent as a plain call: no stream window, as a
    /// hostile writer would.
    fn unpaced_write(
        sink: &byte_sink::Client,
        data: &[u8],
    ) -> capnp::capability::RemotePromise<capnp::any_pointer::Owned> {
        let mut req = sink.client.new_call::<byte_sink::write_params::Owned, capnp::any_pointer::Owned>(
            byte_sink::Client::TYPE_ID,
            0,
            None,
        );
        req.get().set_data(data);
        req.send()
    }

    fn code(e: &capnp::Error) -> Option<ErrorCode> {
        CvError::from_rpc(e).map(|c| c.code)
    }

    use capnp::traits::HasTypeId;

    #[test]
    fn a_call_over_the_limit_is_refused_at_once_and_the_connection_keeps_working() {
        run_local(async {
            let gate = Rc::new(Gate::default());
            let limits = CallLimits { calls: 4, bytes: 1 << 20 };
            let (sink, gauge) = pair::<byte_sink::Client>(
                capnp_rpc::new_client::<byte_sink::Client, _>(GatedSink(gate.clone())).client,
                limits,
            );
            let held: Vec<_> = (0..4).map(|_| sink.done_request().send().promise).collect();
            until(|| gate.entered.get() == 4).await;
            assert_eq!(gauge.calls(), 4);
            let e = sink.done_request().send().promise.await.err().expect("the fifth call is refused");
            assert_eq!(code(&e), Some(ErrorCode::Unavailable), "{e}");
            assert!(e.to_string().contains("too many calls in flight on this connection"), "{e}");
            assert_eq!((gate.entered.get(), gauge.refused()), (4, 1), "the refused call never reached the server");
            gate.release();
            for p in held {
                p.await.expect("admitted calls complete");
            }
            assert_eq!((gauge.calls(), gauge.bytes()), (0, 0));
            sink.done_request().send().promise.await.expect("the connection still works");
            assert_eq!(gauge.peak_calls(), 4);
        });
    }

    #[test]
    fn a_writer_that_never_waits_is_held_to_the_byte_bound() {
        run_local(async {
            let gate = Rc::new(Gate::default());
            let limits = CallLimits { calls: 256, bytes: 256 * 1024 };
            let (sink, gauge) = pair::<byte_sink::Client>(
                capnp_rpc::new_client::<byte_sink::Client, _>(GatedSink(gate.clone())).client,
                limits,
            );
            let chunk = vec![7u8; crate::CHUNK];
            let sent: Vec<_> = (0..100).map(|_| unpaced_write(&sink, &chunk).promise).collect();
            let results = futures::future::join_all(sent.into_iter().map(|p| async {
                let r = p.await.map(drop);
                r
            }));
            let results = tokio::task::spawn_local(results);
            until(|| gauge.refused() + gauge.calls() as u64 == 100).await;
            // Never more than the bound in progress: 64 KiB chunks plus
            // framing, so 3 of them.
            assert!(gauge.peak_bytes() <= limits.bytes, "{}", gauge.peak_bytes());
            assert_eq!(gauge.calls(), 3);
            gate.release();
            let results = results.await.unwrap();
            let refused = results.iter().filter(|r| r.as_ref().is_err_and(|e| code(e) == Some(ErrorCode::Unavailable)));
            assert_eq!(refused.count(), 97);
            assert_eq!(gauge.calls(), 0);
            unpaced_write(&sink, b"after").promise.await.expect("the connection still works");
        });
    }

    #[test]
    fn a_well_behaved_stream_of_tiny_writes_fits_the_client_bound() {
        run_local(async {
            let gate = Rc::new(Gate::default());
            let (sink, gauge) = pair::<byte_sink::Client>(
                capnp_rpc::new_client::<byte_sink::Client, _>(GatedSink(gate.clone())).client,
                CLIENT_CALLS,
            );
            // One-byte writes, paced by the stream window the way every
            // capvisor writer sends them, against a receiver that is stuck.
            let sent = Rc::new(Cell::new(0usize));
            let counter = sent.clone();
            let writer = tokio::task::spawn_local(async move {
                for _ in 0..3000 {
                    let mut req = sink.write_request();
                    req.get().set_data(b"x");
                    req.send().await?;
                    counter.set(counter.get() + 1);
                }
                sink.done_request().send().promise.await.map(drop)
            });
            // More than 256 in progress (a smaller bound would refuse this
            // well-behaved writer) ...
            until(|| gauge.calls() > 256).await;
            // ... until the window holds the writer back.
            let mut last = (sent.get(), 0);
            until(|| {
                last = if sent.get() == last.0 { (last.0, last.1 + 1) } else { (sent.get(), 0) };
                last.1 >= 20
            })
            .await;
            assert!(sent.get() < 3000, "the window held the writer");
            assert_eq!(gauge.refused(), 0);
            assert!(gauge.calls() < STREAM_CALLS, "{} calls in progress", gauge.calls());
            gate.release();
            writer.await.unwrap().expect("nothing refused");
            assert_eq!(gauge.refused(), 0);
        });
    }

    /// A raw rpc.capnp message from a peer: `Bootstrap` (question 0) when
    /// `question` is 0, else `ByteSink.done` on the bootstrap's promised
    /// answer.
    fn raw_message(question: u32) -> Vec<u8> {
        use capnp::traits::HasTypeId;
        use capnp_rpc::rpc_capnp::message;
        let mut m = capnp::message::Builder::new_default();
        let root = m.init_root::<message::Builder<'_>>();
        if question == 0 {
            root.init_bootstrap().set_question_id(0);
        } else {
            let mut call = root.init_call();
            call.set_question_id(question);
            call.set_interface_id(byte_sink::Client::TYPE_ID);
            call.set_method_id(1);
            call.reborrow().init_target().init_promised_answer().set_question_id(0);
            call.init_params().init_content().init_as::<byte_sink::done_params::Builder<'_>>();
        }
        capnp::serialize::write_message_to_words(&m)
    }

    #[test]
    fn a_peer_that_never_reads_its_answers_is_no_longer_read() {
        run_local(async {
            let gate = Rc::new(Gate::default());
            let limits = CallLimits { calls: 1, bytes: 64 * 1024 };
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            let sink: byte_sink::Client = capnp_rpc::new_client(GatedSink(gate.clone()));
            let (system, gauge) = rpc_system_limited(
                tokio::net::UnixStream::from_std(ours).unwrap(),
                Side::Server,
                Some(sink.client),
                UNTRUSTED,
                limits,
            );
            let system = tokio::task::spawn_local(system);
            // The peer: one call held at the gate, then a flood of calls
            // over the limit, each answered with a refusal it never reads.
            let flood = std::thread::spawn(move || {
                use std::io::Write;
                let mut theirs = theirs;
                // A write blocked this long means we stopped reading.
                theirs.set_write_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
                for q in 0..100_000u32 {
                    if theirs.write_all(&raw_message(q)).is_err() {
                        return q;
                    }
                }
                100_000
            });
            until(|| gate.entered.get() == 1 && gauge.out_bytes() >= limits.bytes).await;
            assert!(gauge.peak_out_bytes() <= limits.bytes + 1024, "{} bytes queued", gauge.peak_out_bytes());
            let refused = gauge.refused();
            assert!(refused < 100_000, "reading stopped: {refused} refused");
            // The peer is stuck writing: its write times out.
            let flood = tokio::task::spawn_blocking(move || flood.join().unwrap());
            assert!(flood.await.unwrap() < 100_000, "the peer could not send everything");
            assert!(gauge.peak_out_bytes() <= limits.bytes + 1024, "{} bytes queued", gauge.peak_out_bytes());
            system.abort();
        });
    }

    #[test]
    fn capabilities_in_a_refused_call_are_released_to_their_owner() {
        run_local(async {
            let gate = Rc::new(Gate::default());
            let (f, _gauge) = pair::<files::Client>(
                capnp_rpc::new_client::<files::Client, _>(GatedSink(gate.clone())).client,
                CallLimits { calls: 1, bytes: 1 << 20 },
            );
            let held = f.read_request().send().promise;
            until(|| gate.entered.get() == 1).await;
            let gone = Rc::new(Cell::new(false));
            let mut req = f.read_request();
            req.get().set_sink(capnp_rpc::new_client(Watched(gone.clone())));
            let e = req.send().promise.await.err().expect("refused");
            assert_eq!(code(&e), Some(ErrorCode::Unavailable));
            // Only the export the refused call made held the sink: once the
            // refusal released it, the sink is dropped.
            until(|| gone.get()).await;
            gate.release();
            held.await.unwrap();
        });
    }
}
