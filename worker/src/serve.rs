//! The worker's main loop, as a library function so tests can run a worker
//! in-process: serve `Worker` to the broker, `Session` to every attached
//! client, and revoke on logout, expiry, a signal or the broker's loss.

use crate::caps::{SessionImpl, WorkerImpl};
use crate::state::{now_ms, SessionState};
use crate::vms::revoke_session;
use capvisor_manifest::SessionContext;
use capvisor_rpc::conn::{self, CLIENT_CALLS, INTERNAL, UNTRUSTED};
use capvisor_rpc::fdpass::FdChannel;
use capvisor_rpc::schema::capvisor_capnp::session;
use capvisor_rpc::schema::internal_capnp::{session_host, worker, RevokeReason};
use std::rc::Rc;
use std::time::Duration;

/// How long a revoked worker waits for its clients to notice and hang up.
pub const LINGER: Duration = Duration::from_secs(10);

/// How long a revoked worker keeps its connections after its last answer
/// was queued, so that answer (e.g. to the `Session.logout` that revoked
/// it, relayed by the broker) is written before the process exits.
pub const REPLY_FLUSH: Duration = Duration::from_millis(100);

/// Runs one session's worker until it is revoked and its clients left (or
/// [`LINGER`] passed): `broker` is the stream to the broker (we serve
/// `Worker`, it serves `SessionHost`), `attach` the channel on which client
/// sockets arrive. Must run inside a `LocalSet`.
///
/// Errors: signal handlers cannot be installed.
pub async fn run(broker: tokio::net::UnixStream, attach: FdChannel, ctx: SessionContext) -> anyhow::Result<()> {
    // Our bootstrap (Worker) needs the session state, which needs the
    // broker's SessionHost: offer a queued cap and resolve it right after.
    let (tx, rx) = tokio::sync::oneshot::channel::<worker::Client>();
    let queued: worker::Client =
        capnp_rpc::new_future_client(
            async move { rx.await.map_err(|_| capnp::Error::failed("worker not ready".into())) },
        );
    let (host, broker_conn) = conn::serve::<session_host::Client>(broker, queued.client, INTERNAL);
    let st = SessionState::new(ctx, host, Box::new(crate::launch::ProcessVmLauncher));
    let _ = tx.send(capnp_rpc::new_client(WorkerImpl { st: st.clone() }));
    tracing::info!(session = %st.ctx.session_id, principal = %st.ctx.principal, "worker serving");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let expiry = Duration::from_millis((st.ctx.expires_at_ms - now_ms()).max(0) as u64);
    let expired = tokio::time::sleep(expiry);
    tokio::pin!(expired, broker_conn);
    loop {
        tokio::select! {
            r = attach.recv() => match r {
                Ok((tag, fd)) => match tag.strip_prefix(GRANT_TAG.as_bytes()) {
                    None => attach_client(st.clone(), None, fd),
                    Some(id) => {
                        let g = crate::caps::delegate_grant(&st, &String::from_utf8_lossy(id));
                        attach_client(st.clone(), Some(g), fd)
                    }
                },
                Err(e) => {
                    tracing::info!("attach channel closed ({e}); ending session");
                    revoke_session(&st, RevokeReason::BrokerGone).await;
                    break;
                }
            },
            _ = &mut broker_conn => {
                revoke_session(&st, RevokeReason::BrokerGone).await;
                break;
            }
            _ = &mut expired => revoke_session(&st, RevokeReason::Expired).await,
            _ = term.recv() => revoke_session(&st, RevokeReason::Shutdown).await,
            _ = int.recv() => revoke_session(&st, RevokeReason::Shutdown).await,
            _ = st.revoked() => break,
        }
    }
    // Revoked: caps now answer staleSession. Let revocation finish (VMs
    // stopped, broker told: the revoking call answers after that), give
    // attached clients a moment to hear it, then go (which drops every
    // connection).
    let deadline = tokio::time::Instant::now() + LINGER;
    let _ = tokio::time::timeout_at(deadline, st.revocation_finished()).await;
    while st.clients.get() > 0 && tokio::time::Instant::now() < deadline {
        let _ = tokio::time::timeout_at(deadline, st.clients_changed.notified()).await;
    }
    tokio::time::sleep(REPLY_FLUSH).await;
    tracing::info!(session = %st.ctx.session_id, "worker exiting");
    Ok(())
}

/// The attach-channel tag prefix of a client attaching to a delegate
/// session: `grant:<grant id>` (the broker checked its token).
pub const GRANT_TAG: &str = "grant:";

/// Serves `Session` on a client socket the broker handed us: the session's
/// own (`grant` `None`), or the delegate session of a grant (`Some`; an
/// ended grant gets the `staleSession` reply).
pub fn attach_client(
    st: Rc<SessionState>,
    grant: Option<capvisor_rpc::CvResult<Rc<crate::grants::GrantNode>>>,
    fd: std::os::fd::OwnedFd,
) {
    tokio::task::spawn_local(async move {
        let mut stream = match capvisor_rpc::spawn::into_tokio(fd) {
            Ok(s) => s,
            Err(e) => return tracing::warn!("bad attached socket: {e}"),
        };
        let grant = match grant.transpose() {
            Ok(g) if st.check().is_ok() => g,
            _ => {
                let _ = capvisor_rpc::attach::write_err(&mut stream, &capvisor_rpc::CvError::stale()).await;
                return;
            }
        };
        if capvisor_rpc::attach::write_ok(&mut stream).await.is_err() {
            return;
        }
        st.clients.set(st.clients.get() + 1);
        let sess: session::Client = capnp_rpc::new_client(SessionImpl { st: st.clone(), grant });
        // The client is untrusted: bounded messages, and at most
        // CLIENT_CALLS calls in progress (one more gets `unavailable`).
        let (_peer, done, _calls) =
            conn::serve_limited::<capnp::capability::Client>(stream, sess.client, UNTRUSTED, CLIENT_CALLS);
        let _ = done.await;
        st.clients.set(st.clients.get() - 1);
        st.clients_changed.notify_waiters();
    });
}
