//! `capvisor-worker --rpc-fd 3 --attach-fd 4`: one session's worker.
//! Spawned by the broker only (see docs/processes.md); not for people.

use capvisor_rpc::conn::{self, INTERNAL, UNTRUSTED};
use capvisor_rpc::fdpass::FdChannel;
use capvisor_rpc::schema::capvisor_capnp::session;
use capvisor_rpc::schema::internal_capnp::{session_host, worker};
use capvisor_worker::caps::{SessionImpl, WorkerImpl};
use capvisor_worker::state::SessionState;
use capvisor_worker::vms::revoke_session;
use clap::Parser;
use std::rc::Rc;
use std::time::Duration;

/// How long a revoked worker waits for its clients to notice and hang up.
const LINGER: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(about = "capvisor per-session worker (spawned by capvisor-broker; not run by hand)")]
struct Args {
    /// Inherited stream socket to the broker.
    #[arg(long)]
    rpc_fd: i32,
    /// Inherited SOCK_SEQPACKET fd channel on which attached client sockets arrive.
    #[arg(long)]
    attach_fd: i32,
}

fn main() -> anyhow::Result<()> {
    capvisor_rpc::init_logging("worker");
    let args = Args::parse();
    let ctx: capvisor_manifest::SessionContext = serde_json::from_str(
        &std::env::var("CAPVISOR_SESSION_CONTEXT")
            .map_err(|_| anyhow::anyhow!("CAPVISOR_SESSION_CONTEXT is not set"))?,
    )?;
    conn::run_local(run(args, ctx))
}

async fn run(args: Args, ctx: capvisor_manifest::SessionContext) -> anyhow::Result<()> {
    // SAFETY: the broker handed us these descriptors at these numbers.
    let broker = unsafe { conn::stream_from_fd(args.rpc_fd)? };
    let attach = unsafe { FdChannel::from_raw(args.attach_fd)? };

    // Our bootstrap (Worker) needs the session state, which needs the
    // broker's SessionHost: offer a queued cap and resolve it right after.
    let (tx, rx) = tokio::sync::oneshot::channel::<worker::Client>();
    let queued: worker::Client =
        capnp_rpc::new_future_client(
            async move { rx.await.map_err(|_| capnp::Error::failed("worker not ready".into())) },
        );
    let (host, broker_conn) = conn::serve::<session_host::Client>(broker, queued.client, INTERNAL);
    let st = SessionState::new(ctx, host);
    let _ = tx.send(capnp_rpc::new_client(WorkerImpl { st: st.clone() }));
    tracing::info!(session = %st.ctx.session_id, principal = %st.ctx.principal, "worker serving");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let expiry = Duration::from_millis((st.ctx.expires_at_ms - capvisor_worker::state::now_ms()).max(0) as u64);
    let expired = tokio::time::sleep(expiry);
    tokio::pin!(expired, broker_conn);
    loop {
        tokio::select! {
            r = attach.recv() => match r {
                Ok((_tag, fd)) => attach_client(st.clone(), fd),
                Err(e) => {
                    tracing::info!("attach channel closed ({e}); ending session");
                    revoke_session(&st, "broker gone").await;
                    break;
                }
            },
            _ = &mut broker_conn => {
                revoke_session(&st, "broker gone").await;
                break;
            }
            _ = &mut expired => revoke_session(&st, "expired").await,
            _ = term.recv() => revoke_session(&st, "shutdown").await,
            _ = int.recv() => revoke_session(&st, "shutdown").await,
            _ = st.revoked() => break,
        }
    }
    // Revoked: caps now answer staleSession. Give attached clients a moment
    // to hear it, then go (which drops every connection).
    let deadline = tokio::time::Instant::now() + LINGER;
    while st.clients.get() > 0 && tokio::time::Instant::now() < deadline {
        let _ = tokio::time::timeout_at(deadline, st.clients_changed.notified()).await;
    }
    tracing::info!(session = %st.ctx.session_id, "worker exiting");
    Ok(())
}

/// Serves `Session` on a client socket the broker handed us.
fn attach_client(st: Rc<SessionState>, fd: std::os::fd::OwnedFd) {
    tokio::task::spawn_local(async move {
        let mut stream = match capvisor_rpc::spawn::into_tokio(fd) {
            Ok(s) => s,
            Err(e) => return tracing::warn!("bad attached socket: {e}"),
        };
        if st.check().is_err() {
            let _ = capvisor_rpc::attach::write_err(&mut stream, &capvisor_rpc::CvError::stale()).await;
            return;
        }
        if capvisor_rpc::attach::write_ok(&mut stream).await.is_err() {
            return;
        }
        st.clients.set(st.clients.get() + 1);
        let sess: session::Client = capnp_rpc::new_client(SessionImpl { st: st.clone() });
        let (_peer, done) = conn::serve::<capnp::capability::Client>(stream, sess.client, UNTRUSTED);
        let _ = done.await;
        st.clients.set(st.clients.get() - 1);
        st.clients_changed.notify_waiters();
    });
}
