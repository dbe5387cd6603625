//! Reaching capvisor: log in at the gateway, or attach to a session by its
//! resume token so the client talks to its session's worker directly.

use crate::error::{ClientError, ClientResult};
use capvisor_rpc::conn::{self, UNTRUSTED};
use capvisor_rpc::error::text;
use capvisor_rpc::principal::Principal;
use capvisor_rpc::schema::capvisor_capnp::{gateway, login_info, session};
use std::path::Path;
use tokio::io::AsyncWriteExt;

/// A successful login.
pub struct LoginInfo {
    /// The session's root capability (through the gateway).
    pub session: session::Client,
    /// Resume token: a secret sturdy ref to the session.
    pub token: String,
    /// Who logged in.
    pub principal: Principal,
    /// Profile name.
    pub profile: String,
    /// Expiry, Unix epoch ms.
    pub expires_at_ms: i64,
    /// The login (Gateway RPC) connection; resolves when it ends. It stays
    /// open while this process lives (dropping the handle does not close
    /// it) and counts against the gateway's login connections per uid
    /// (`capvisor_gateway::MAX_RPC_PER_UID`): a long-lived client that logs
    /// in repeatedly calls `abort()` on it once done with `session` (after
    /// attaching by token, or after logout); the session itself lives on.
    pub connection: tokio::task::JoinHandle<Result<(), capnp::Error>>,
}

/// Connects to the gateway socket after checking that it belongs to us, to
/// root, or to a server root set up for a group of ours
/// (`capvisor_rpc::paths::check_gateway_socket`), so no credential goes to
/// a server another user put in our path. A server run by another uid is
/// named with `--socket PATH` / `CAPVISOR_SOCKET`, or found at
/// `capvisor_rpc::paths::SYSTEM_SOCKET`.
async fn dial(socket: &Path) -> ClientResult<tokio::net::UnixStream> {
    match capvisor_rpc::paths::check_gateway_socket(socket) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(ClientError::Io(std::io::Error::new(
                e.kind(),
                format!(
                    "cannot use capvisor at {}: {e} (a shared server admits its socket group only)",
                    socket.display()
                ),
            )))
        }
        // A missing socket is reported by connect below, with its hint.
        _ => {}
    }
    tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        ClientError::Io(std::io::Error::new(
            e.kind(),
            format!("cannot reach capvisor at {}: {e} (is `capvisor serve` running?)", socket.display()),
        ))
    })
}

/// Opens a Gateway RPC connection on `socket`.
pub async fn gateway(socket: &Path) -> ClientResult<gateway::Client> {
    Ok(gateway_conn(socket).await?.0)
}

type ConnHandle = tokio::task::JoinHandle<Result<(), capnp::Error>>;

async fn gateway_conn(socket: &Path) -> ClientResult<(gateway::Client, ConnHandle)> {
    let mut s = dial(socket).await?;
    s.write_all(capvisor_rpc::attach::MAGIC_RPC).await?;
    Ok(conn::connect::<gateway::Client>(s, None, UNTRUSTED))
}

fn read_login(
    session: session::Client,
    info: login_info::Reader<'_>,
    connection: ConnHandle,
) -> ClientResult<LoginInfo> {
    Ok(LoginInfo {
        connection,
        session,
        token: text(info.get_resume_token())?,
        principal: Principal::read_from(info.get_principal()?)?,
        profile: text(info.get_profile())?,
        expires_at_ms: info.get_expires_at_ms(),
    })
}

/// Logs in with this process's Unix credentials (SO_PEERCRED at the gateway).
///
/// Errors: `Domain(denied)` if this uid gets no profile or local login is
/// disabled; `Io` if the socket is unreachable.
pub async fn login_local(socket: &Path) -> ClientResult<LoginInfo> {
    let (gw, c) = gateway_conn(socket).await?;
    let resp = gw.login_local_request().send().promise.await?;
    let r = resp.get()?;
    read_login(r.get_session()?, r.get_info()?, c)
}

/// Logs in with a password account.
///
/// Errors: `Domain(denied)` for an unknown user or a wrong password (the
/// same error for both).
pub async fn login_password(socket: &Path, user: &str, password: &str) -> ClientResult<LoginInfo> {
    let (gw, c) = gateway_conn(socket).await?;
    let mut req = gw.login_password_request();
    req.get().set_user(user);
    req.get().set_password(password);
    let resp = req.send().promise.await?;
    let r = resp.get()?;
    read_login(r.get_session()?, r.get_info()?, c)
}

/// Redeems a share token (`Gateway.redeem`) into a delegate session: its
/// principal is `grant:<id>`, its profile `delegate`, and its CapSet holds
/// exactly the shared caps. Save `resume_token` and [`attach`] with it,
/// like any login.
///
/// Errors: `Domain(staleSession)` for a token that is unknown, expired,
/// revoked, or whose grantor session ended (one answer for all);
/// `Disconnected` if the server closed the connection.
pub async fn redeem(socket: &Path, token: &str) -> ClientResult<LoginInfo> {
    let (gw, c) = gateway_conn(socket).await?;
    let mut req = gw.redeem_request();
    req.get().set_token(token);
    let resp = req.send().promise.await?;
    let r = resp.get()?;
    read_login(r.get_session()?, r.get_info()?, c)
}

/// Attaches to the session of `token`: the gateway hands this connection
/// to the session's worker, whose `Session` becomes our bootstrap cap.
///
/// Errors: `Domain(staleSession)` for a logged-out, expired or unknown
/// token; `Disconnected` if the server closed the connection.
pub async fn attach(socket: &Path, token: &str) -> ClientResult<session::Client> {
    let mut s = dial(socket).await?;
    capvisor_rpc::attach::write_attach(&mut s, token).await?;
    match capvisor_rpc::attach::read_reply(&mut s).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.into()),
        Err(e) => return Err(ClientError::Disconnected(format!("attach refused: {e}"))),
    }
    let (sess, _conn) = conn::connect::<session::Client>(s, None, UNTRUSTED);
    Ok(sess)
}

/// Attaches to the session saved by a login (`crate::config`, in
/// `CAPVISOR_CONFIG_DIR`): on `socket` when a socket exists there, else on
/// the socket the login used. Returns the session and what was saved.
///
/// Errors: `NotLoggedIn` without a saved login; otherwise as [`attach`]
/// (`staleSession` once that session ended).
pub async fn attach_saved(socket: &Path) -> ClientResult<(session::Client, crate::config::SavedSession)> {
    let saved = crate::config::load(&crate::config::session_file())?.ok_or(ClientError::NotLoggedIn)?;
    let sock = if socket.exists() { socket } else { saved.socket.as_path() };
    let s = attach(sock, &saved.token).await?;
    Ok((s, saved))
}
