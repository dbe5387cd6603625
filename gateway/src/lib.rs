//! capvisor's gateway (DESIGN.md, "Processes and the capability graph";
//! docs/processes.md): the one public listener. Every connection starts
//! with the [`capvisor_rpc::attach`] preamble:
//! - `CVRPC001`: the gateway serves `Gateway` (authMethods, loginLocal,
//!   loginPassword, resume) with [`capvisor_rpc::conn::UNTRUSTED`] reader
//!   limits; logins are forwarded to the broker's `Broker` cap, which
//!   decides (a method the manifest disables gets a typed `denied` there,
//!   audited and delayed like any failed login); `authMethods` lists the
//!   `--auth` methods. The gateway does not tell the broker who the client
//!   is: before each forwarded call it passes a duplicate of the client's
//!   socket on the attach channel tagged `login:<conn>`
//!   ([`capvisor_rpc::principal::LOGIN_SOCKET_TAG`],
//!   `conn` a fresh random id named in the call), and the broker reads the
//!   peer's credentials from that descriptor itself (docs/authority.md).
//!   The gateway's own SO_PEERCRED (unix(7)) read serves only its per-uid
//!   connection bound and its logs.
//! - `CVATT001` + token: the connected socket goes to the broker over the
//!   fd channel, tagged with the token; the gateway keeps no copy.
//!
//! A bad preamble, an oversized message or a peer that hangs up ends only
//! that connection (logged at debug). An oversized message (above
//! `UNTRUSTED`'s limit) is caught by [`guard`] before capnp-rpc reads it,
//! and the gateway hangs up without answering. At most [`MAX_CONNECTIONS`]
//! connections are open at once; more are closed at accept with a warning.
//! The gateway never logs a password or a token.
//!
//! Process contract: `capvisor-gateway --listen-fd 3 --broker-fd 4
//! --attach-fd 5 --auth local,password`; it runs until the broker's
//! connection ends or SIGTERM/SIGINT, then exits 0.

pub mod guard;
pub mod sandbox;

use capnp::capability::Rc as CapRc;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capvisor_rpc::attach::{read_preamble, Preamble};
use capvisor_rpc::conn;
use capvisor_rpc::fdpass::FdChannel;
use capvisor_rpc::schema::capvisor_capnp::gateway;
use capvisor_rpc::schema::internal_capnp::broker;
use capvisor_rpc::CvError;
use std::cell::Cell;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{UnixListener, UnixStream};

/// Most connections served at once (preamble, RPC or attach hand-off).
pub const MAX_CONNECTIONS: usize = 512;
/// Most login (RPC) connections one uid may hold at once; one more is
/// closed right after its preamble. Attach connections do not count: they
/// leave the gateway at once.
pub const MAX_RPC_PER_UID: usize = 64;
/// How long a login (RPC) connection may stay without a successful login
/// after its preamble; then it is closed.
pub const LOGIN_DEADLINE: Duration = Duration::from_secs(10);

/// The gateway's connection bounds (docs/bounds.md).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections at once, every kind ([`MAX_CONNECTIONS`]).
    pub max_connections: usize,
    /// Login connections per uid ([`MAX_RPC_PER_UID`]).
    pub max_rpc_per_uid: usize,
    /// Time from preamble to a successful login ([`LOGIN_DEADLINE`]).
    pub login_deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_connections: MAX_CONNECTIONS, max_rpc_per_uid: MAX_RPC_PER_UID, login_deadline: LOGIN_DEADLINE }
    }
}
/// Auth methods the gateway knows.
pub const KNOWN_METHODS: &[&str] = &["local", "password"];

/// The gateway: shared state of every connection.
pub struct Gateway {
    broker: broker::Client,
    attach: Rc<FdChannel>,
    auth: Rc<Vec<String>>,
    permits: Arc<tokio::sync::Semaphore>,
    max: usize,
    limits: Limits,
    /// Login connections open per uid.
    rpc_per_uid: std::cell::RefCell<std::collections::HashMap<u32, usize>>,
    refused: Cell<u64>,
    last_refusal_log: Cell<Option<Instant>>,
}

impl Gateway {
    /// A gateway forwarding logins to `broker` and attaches to `attach`,
    /// offering the auth methods `auth` (`"local"`, `"password"`), serving
    /// within `limits`.
    pub fn new(broker: broker::Client, attach: FdChannel, auth: Vec<String>, limits: Limits) -> Rc<Self> {
        Rc::new(Self {
            broker,
            attach: Rc::new(attach),
            auth: Rc::new(auth),
            permits: Arc::new(tokio::sync::Semaphore::new(limits.max_connections)),
            max: limits.max_connections,
            limits,
            rpc_per_uid: Default::default(),
            refused: Cell::new(0),
            last_refusal_log: Cell::new(None),
        })
    }

    /// Accepts connections on `listener` forever, each in its own local task.
    ///
    /// Errors: only a fatal accept error (transient ones — EMFILE, ENFILE,
    /// ECONNABORTED, ENOBUFS, ENOMEM — are logged and retried after 100 ms).
    pub async fn accept_loop(self: Rc<Self>, listener: UnixListener) -> std::io::Result<()> {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    let transient = matches!(
                        e.raw_os_error(),
                        Some(
                            libc::EMFILE
                                | libc::ENFILE
                                | libc::ECONNABORTED
                                | libc::ENOBUFS
                                | libc::ENOMEM
                                | libc::EINTR
                        )
                    );
                    if !transient {
                        return Err(e);
                    }
                    tracing::warn!("accept failed: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                self.note_refusal();
                drop(stream);
                continue;
            };
            let me = self.clone();
            tokio::task::spawn_local(async move {
                me.handle(stream).await;
                drop(permit);
            });
        }
    }

    fn note_refusal(&self) {
        self.refused.set(self.refused.get() + 1);
        let now = Instant::now();
        let due = self.last_refusal_log.get().is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10));
        if due {
            tracing::warn!(
                "refusing connection: {} connections already open (limit); {} refused so far",
                self.max,
                self.refused.get()
            );
            self.last_refusal_log.set(Some(now));
        }
    }

    /// Serves one connection to its end.
    async fn handle(self: Rc<Self>, mut stream: UnixStream) {
        let cred = match stream.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("no peer credentials: {e}");
                return;
            }
        };
        let peer = Peer { uid: cred.uid(), pid: cred.pid().unwrap_or(0).max(0) as u32 };
        match read_preamble(&mut stream).await {
            Err(e) => tracing::debug!(peer = %peer, "dropping connection: {e}"),
            Ok(Preamble::Rpc) => {
                let Some(_slot) = RpcSlot::take(&self, peer.uid) else {
                    tracing::debug!(peer = %peer, "closing login connection: this uid holds the most allowed");
                    return;
                };
                let logged_in = Rc::new(Cell::new(false));
                // The RPC system and the server share the one descriptor:
                // each login call hands the broker a duplicate of it.
                let sock = Rc::new(stream);
                let server = GatewayServer {
                    broker: self.broker.clone(),
                    attach: self.attach.clone(),
                    sock: sock.clone(),
                    auth: self.auth.clone(),
                    peer,
                    logged_in: logged_in.clone(),
                };
                let client: gateway::Client = capnp_rpc::new_client(server);
                let limit = conn::UNTRUSTED.traversal_limit_in_words.unwrap_or(usize::MAX) as u64;
                let (r, w) = guard::guard(Shared(sock.clone()), Shared(sock), limit);
                // At most CLIENT_CALLS login calls in progress; one more is
                // answered `unavailable` at once.
                let (system, _calls) = conn::rpc_system_rw_limited(
                    r,
                    w,
                    Side::Server,
                    Some(client.client),
                    conn::UNTRUSTED,
                    conn::CLIENT_CALLS,
                );
                tokio::pin!(system);
                // A connection that has not logged in by the deadline is
                // closed; one that did holds a session and stays.
                let deadline = tokio::time::sleep(self.limits.login_deadline);
                tokio::pin!(deadline);
                let ended = loop {
                    tokio::select! {
                        r = &mut system => break Some(r),
                        _ = &mut deadline, if !logged_in.get() => {
                            if !logged_in.get() {
                                break None;
                            }
                        }
                    }
                };
                match ended {
                    None => tracing::debug!(peer = %peer, "closing login connection: no login within the deadline"),
                    Some(Ok(())) => tracing::debug!(peer = %peer, "connection closed"),
                    Some(Err(e)) => tracing::debug!(peer = %peer, "connection ended: {e}"),
                }
            }
            Ok(Preamble::Attach(token)) => {
                // The token is a secret: never logged. A "token" in the
                // namespace of login sockets is no token: stale, and it
                // never reaches the broker's table of login sockets.
                if token.starts_with(capvisor_rpc::principal::LOGIN_SOCKET_TAG) {
                    let _ = capvisor_rpc::attach::write_err(&mut stream, &CvError::stale()).await;
                    return;
                }
                if let Err(e) = self.attach.send(token.as_bytes(), &stream).await {
                    tracing::warn!(peer = %peer, "cannot hand an attach connection to the broker: {e}");
                }
            }
        }
    }
}

/// One half of a login connection's socket, shared by the RPC system's
/// reader and writer and the connection's `GatewayServer` (which passes it
/// to the broker for each login call), so a login connection holds one
/// descriptor. Reads and writes go through tokio's readiness
/// (`poll_read_ready` + `try_read`, `poll_write_ready` + `try_write`);
/// shutdown is shutdown(2) `SHUT_WR`.
struct Shared(Rc<UnixStream>);

impl tokio::io::AsyncRead for Shared {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        loop {
            std::task::ready!(self.0.poll_read_ready(cx))?;
            match self.0.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return std::task::Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return std::task::Poll::Ready(Err(e)),
            }
        }
    }
}

impl tokio::io::AsyncWrite for Shared {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        loop {
            std::task::ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Ok(n) => return std::task::Poll::Ready(Ok(n)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return std::task::Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::os::fd::AsRawFd;
        let r = nix::sys::socket::shutdown(self.0.as_raw_fd(), nix::sys::socket::Shutdown::Write);
        std::task::Poll::Ready(r.or_else(|e| if e == nix::errno::Errno::ENOTCONN { Ok(()) } else { Err(e.into()) }))
    }
}

/// Longest user name the gateway forwards, bytes (account names are at most
/// 32; the rest is cut before it reaches the broker).
pub const MAX_USER: usize = 64;
/// Longest password the gateway forwards, bytes (the credential store's
/// limit); a longer one reaches the broker as empty.
pub const MAX_PASSWORD: usize = 1024;

/// One uid's hold on a login-connection slot; released when dropped.
struct RpcSlot<'a> {
    gw: &'a Gateway,
    uid: u32,
}

impl<'a> RpcSlot<'a> {
    /// A slot for `uid`, unless it holds [`Limits::max_rpc_per_uid`] already.
    fn take(gw: &'a Gateway, uid: u32) -> Option<Self> {
        let mut m = gw.rpc_per_uid.borrow_mut();
        let n = m.entry(uid).or_insert(0);
        if *n >= gw.limits.max_rpc_per_uid {
            return None;
        }
        *n += 1;
        Some(Self { gw, uid })
    }
}

impl Drop for RpcSlot<'_> {
    fn drop(&mut self) {
        let mut m = self.gw.rpc_per_uid.borrow_mut();
        if let Some(n) = m.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.uid);
            }
        }
    }
}

/// What the gateway knows of a peer: its SO_PEERCRED uid and pid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Effective uid of the connecting process.
    pub uid: u32,
    /// Its pid (0 if the kernel gave none).
    pub pid: u32,
}

impl std::fmt::Display for Peer {
    /// `unix:uid=U pid=P` — the broker's throttle keys on the part before
    /// the space.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unix:uid={} pid={}", self.uid, self.pid)
    }
}

/// A fresh connection id for one forwarded login call: 32 lowercase hex
/// digits from getrandom(2), so no gateway generation reuses one.
///
/// Errors: getrandom fails.
pub fn new_conn_id() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    let mut filled = 0;
    while filled < b.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `b`.
        let n = unsafe { libc::getrandom(b[filled..].as_mut_ptr().cast(), b.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// `Gateway` bound to one peer.
struct GatewayServer {
    broker: broker::Client,
    /// The attach channel: client sockets for login calls go there too.
    attach: Rc<FdChannel>,
    /// The client's socket (shared with the RPC system reading it).
    sock: Rc<UnixStream>,
    auth: Rc<Vec<String>>,
    peer: Peer,
    /// Set by the first successful login on this connection.
    logged_in: Rc<Cell<bool>>,
}

/// Copies a broker's login results (session cap and `LoginInfo`) into ours,
/// field by field.
macro_rules! copy_login {
    ($from:expr, $to:expr) => {{
        let from = $from;
        let mut to = $to;
        let info = from.get_info()?;
        {
            let mut b = to.reborrow().init_info();
            b.set_resume_token(info.get_resume_token()?);
            let p = info.get_principal()?;
            let mut bp = b.reborrow().init_principal();
            bp.set_method(p.get_method()?);
            bp.set_name(p.get_name()?);
            b.set_profile(info.get_profile()?);
            b.set_expires_at_ms(info.get_expires_at_ms());
        }
        to.set_session(from.get_session()?);
        capnp::Result::Ok(())
    }};
}

/// `resume` and `redeem`: a token (oversized: `staleSession` without
/// asking), the client's socket handed over, the broker's `$request` with
/// the token, its login results copied into ours.
macro_rules! login_by_token {
    ($self:ident, $params:ident, $results:ident, $request:ident) => {{
        let token = $params.get()?.get_token()?;
        if token.as_bytes().len() > capvisor_rpc::attach::MAX_TOKEN {
            return Err(CvError::stale().into());
        }
        let conn = $self.hand_over().await?;
        let mut req = $self.broker.$request();
        req.get().set_token(token);
        req.get().set_conn(conn.as_str());
        let resp = req.send().promise.await?;
        copy_login!(resp.get()?, $results.get())?;
        $self.logged_in.set(true);
        Ok(())
    }};
}

impl GatewayServer {
    /// Hands the broker a duplicate of this client's socket for one login
    /// call; returns the `conn` id the call must name.
    ///
    /// Errors: `unavailable` when the attach channel is gone.
    async fn hand_over(&self) -> capnp::Result<String> {
        let fail = |e: std::io::Error| {
            tracing::warn!(peer = %self.peer, "cannot hand a login connection to the broker: {e}");
            capnp::Error::from(CvError::unavailable("the broker cannot be reached"))
        };
        let id = new_conn_id().map_err(fail)?;
        self.attach
            .send(format!("{}{id}", capvisor_rpc::principal::LOGIN_SOCKET_TAG).as_bytes(), &*self.sock)
            .await
            .map_err(fail)?;
        Ok(id)
    }
}

impl gateway::Server for GatewayServer {
    async fn auth_methods(
        self: CapRc<Self>,
        _: gateway::AuthMethodsParams,
        mut results: gateway::AuthMethodsResults,
    ) -> capnp::Result<()> {
        let methods: Vec<_> = self.auth.iter().filter_map(|m| capvisor_rpc::principal::parse_method(m)).collect();
        let mut l = results.get().init_methods(methods.len() as u32);
        for (i, m) in methods.into_iter().enumerate() {
            l.set(i as u32, m);
        }
        Ok(())
    }

    async fn login_local(
        self: CapRc<Self>,
        _: gateway::LoginLocalParams,
        mut results: gateway::LoginLocalResults,
    ) -> capnp::Result<()> {
        // A disabled method is still forwarded: the broker denies it too,
        // and audits the attempt (every denial is an audit event).
        let conn = self.hand_over().await?;
        let mut req = self.broker.login_local_request();
        req.get().set_conn(conn.as_str());
        let resp = req.send().promise.await?;
        copy_login!(resp.get()?, results.get())?;
        self.logged_in.set(true);
        Ok(())
    }

    async fn login_password(
        self: CapRc<Self>,
        params: gateway::LoginPasswordParams,
        mut results: gateway::LoginPasswordResults,
    ) -> capnp::Result<()> {
        let p = params.get()?;
        let (user, password) = (p.get_user()?, p.get_password()?);
        let conn = self.hand_over().await?;
        let mut req = self.broker.login_password_request();
        {
            let mut b = req.get();
            // Over-long fields are not copied to the broker: the user name
            // is cut to MAX_USER bytes and an over-long password is sent as
            // empty, so the attempt still fails (and is audited and
            // throttled) like any wrong password.
            let user = user.as_bytes();
            b.set_user(capnp::text::Reader::from(&user[..user.len().min(MAX_USER)]));
            if password.as_bytes().len() <= MAX_PASSWORD {
                b.set_password(password);
            }
            b.set_conn(conn.as_str());
        }
        let resp = req.send().promise.await?;
        copy_login!(resp.get()?, results.get())?;
        self.logged_in.set(true);
        Ok(())
    }

    async fn resume(
        self: CapRc<Self>,
        params: gateway::ResumeParams,
        mut results: gateway::ResumeResults,
    ) -> capnp::Result<()> {
        login_by_token!(self, params, results, resume_request)
    }

    /// A share token into a delegate session (the broker decides; every bad
    /// token is `staleSession`). Not an auth method the manifest lists: a
    /// token is a capability, valid whatever `--auth` offers.
    async fn redeem(
        self: CapRc<Self>,
        params: gateway::RedeemParams,
        mut results: gateway::RedeemResults,
    ) -> capnp::Result<()> {
        login_by_token!(self, params, results, redeem_request)
    }
}

/// Parses `--auth` values: each must be in [`KNOWN_METHODS`].
///
/// Errors: an unknown method name.
/// Empty values are skipped, so `--auth=` offers no method.
pub fn parse_auth(methods: &[String]) -> anyhow::Result<Vec<String>> {
    let methods: Vec<String> = methods.iter().filter(|m| !m.is_empty()).cloned().collect();
    for m in &methods {
        anyhow::ensure!(KNOWN_METHODS.contains(&m.as_str()), "unknown auth method {m:?} (known: local, password)");
    }
    Ok(methods)
}

/// The gateway process's main loop (see the crate docs). Must run inside
/// [`conn::run_local`].
///
/// Errors: descriptors that are not the expected sockets, or a fatal
/// accept error.
pub async fn run(listen_fd: RawFd, broker_fd: RawFd, attach_fd: RawFd, auth: Vec<String>) -> anyhow::Result<()> {
    use std::os::fd::FromRawFd;
    use tokio::signal::unix::{signal, SignalKind};
    // SAFETY: the supervisor hands us these descriptors at these numbers
    // (docs/processes.md) and nothing else in this process uses them.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(listen_fd) };
    listener.set_nonblocking(true)?;
    let listener = UnixListener::from_std(listener)?;
    // SAFETY: as above: the broker stream socket, ours alone.
    let broker_stream = unsafe { conn::stream_from_fd(broker_fd)? };
    // SAFETY: as above: the attach SOCK_SEQPACKET socket, ours alone.
    let attach = unsafe { FdChannel::from_raw(attach_fd)? };
    let (broker, broker_done) = conn::connect::<broker::Client>(broker_stream, None, conn::INTERNAL);
    let gw = Gateway::new(broker, attach, auth, Limits::default());
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let confined = sandbox::confine()?;
    tracing::info!(methods = ?gw.auth, "gateway serving; confined: {confined}");
    tokio::select! {
        r = gw.clone().accept_loop(listener) => { r?; }
        r = broker_done => tracing::info!("broker connection ended ({r:?}); exiting"),
        _ = term.recv() => tracing::info!("SIGTERM; exiting"),
        _ = int.recv() => tracing::info!("SIGINT; exiting"),
    }
    Ok(())
}

#[cfg(test)]
mod tests;
