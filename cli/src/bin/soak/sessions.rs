//! Phase A: many short sessions (log in, CapSet, a few cheap calls, a
//! typed error on purpose, log out) at bounded concurrency, plus an owner
//! probe that logs in every second while the hostile flood runs.

use crate::server::ACCOUNT_PASSWORD;
use crate::stats::Shared;
use capvisor_client::schema::capvisor_capnp::session;
use capvisor_client::{connect, ops, ClientError};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Longest wait for one call (a VM's create and first exec included,
/// which waits for the boot: 120 s at most server-side).
pub const CALL_LIMIT_SECS: u64 = 150;

/// Times `f` (bounded by [`CALL_LIMIT_SECS`]) and records it in `stats` under `what`.
pub async fn timed<T, F: std::future::Future<Output = Result<T, ClientError>>>(
    stats: &Shared,
    what: &str,
    expected: &[&str],
    f: F,
) -> Result<T, ClientError> {
    let t = Instant::now();
    let r = crate::stats::bounded(CALL_LIMIT_SECS, f).await;
    stats.borrow_mut().record(what, &r, t.elapsed(), expected);
    r
}

/// A logged-in client: its session (through the gateway or attached to
/// its worker), id and token.
pub struct Client {
    /// `Session` cap.
    pub session: session::Client,
    /// Session id (audit key).
    pub id: String,
    /// Resume token.
    pub token: String,
    /// The login connection while the session is used through it.
    conn: Option<tokio::task::JoinHandle<Result<(), capnp::Error>>>,
}

impl Drop for Client {
    /// Closes the login connection: it would otherwise stay open for the
    /// life of this process and hold one of our uid's login-connection
    /// slots at the gateway (`connect::LoginInfo::connection`).
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            c.abort();
        }
    }
}

/// Logs in (`password` account name, or local), reads the session id,
/// and, when `attach`, attaches to the session's worker by token. Records
/// every call and the audit events the answers imply.
pub async fn login(stats: &Shared, socket: &Path, password: Option<&str>, attach: bool) -> Result<Client, ClientError> {
    let info = match password {
        Some(user) => {
            timed(stats, "loginPassword", &[], connect::login_password(socket, user, ACCOUNT_PASSWORD)).await?
        }
        None => timed(stats, "loginLocal", &[], connect::login_local(socket)).await?,
    };
    let id = match timed(stats, "Session.info", &[], ops::session_info(&info.session)).await {
        Ok(i) => i.session_id,
        Err(e) => {
            info.connection.abort();
            return Err(e);
        }
    };
    stats.borrow_mut().expect("login", "ok", &id, "");
    let (session, conn) = if attach {
        let s = timed(stats, "attach", &[], connect::attach(socket, &info.token)).await;
        // Attached: the login connection is not needed any more.
        info.connection.abort();
        let s = s?;
        stats.borrow_mut().expect("attach", "ok", &id, "");
        (s, None)
    } else {
        (info.session, Some(info.connection))
    };
    Ok(Client { session, id, token: info.token, conn })
}

/// Logs `c` out; records the audit event on success.
pub async fn logout(stats: &Shared, c: &Client) -> Result<(), ClientError> {
    timed(stats, "Session.logout", &[], ops::logout(&c.session)).await?;
    stats.borrow_mut().expect("logout", "ok", &c.id, "");
    Ok(())
}

/// One logical client of the sessions phase.
async fn one(stats: Shared, socket: Rc<PathBuf>, i: usize, accounts: usize, locks: Rc<Vec<tokio::sync::Mutex<()>>>) {
    // Odd clients use a password account; one login per account at a time
    // (the broker denies a second concurrent attempt on one account by design).
    let c = if i % 2 == 1 && accounts > 0 {
        let k = (i / 2) % accounts;
        let _held = locks[k].lock().await;
        login(&stats, &socket, Some(&format!("soak{k}")), i % 4 == 1).await
    } else {
        login(&stats, &socket, None, i.is_multiple_of(4)).await
    };
    let Ok(c) = c else { return };
    let cs = ops::cap_set(&c.session);
    let _ = timed(&stats, "CapSet.list", &[], ops::list_caps(&cs)).await;
    let vms = ops::vms(&c.session);
    let _ = timed(&stats, "VmFactory.list", &[], ops::list_vms(&vms)).await;
    let missing = ops::get_vm(&vms, &format!("no-such-vm-{i}"));
    let r = timed(&stats, "Vm.info (missing VM)", &["notFound"], ops::vm_info(&missing)).await;
    if r.is_ok() {
        stats.borrow_mut().unexpected.push(format!("client {i}: Vm.info of a missing VM succeeded"));
    }
    let _ = timed(&stats, "Session.info", &[], ops::session_info(&c.session)).await;
    if logout(&stats, &c).await.is_ok() {
        stats.borrow_mut().sessions_served += 1;
    }
}

/// Runs `n` clients, `concurrency` at once; returns when all are done.
pub async fn run(stats: &Shared, socket: &Path, n: usize, concurrency: usize, accounts: usize) {
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let socket = Rc::new(socket.to_path_buf());
    let locks = Rc::new((0..accounts).map(|_| tokio::sync::Mutex::new(())).collect::<Vec<_>>());
    let mut tasks = vec![];
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        let (stats, socket, locks) = (stats.clone(), socket.clone(), locks.clone());
        tasks.push(tokio::task::spawn_local(async move {
            one(stats, socket, i, accounts, locks).await;
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// The owner probe's result: attempts, successes, slowest successful
/// login, failures (code and message).
#[derive(Default, Debug)]
pub struct Probe {
    /// Login attempts.
    pub tries: u64,
    /// Logins that worked (and whose CapSet listed `vms`).
    pub ok: u64,
    /// Slowest successful login.
    pub slowest: Duration,
    /// What failed.
    pub failures: Vec<String>,
}

/// Logs the owner in and out (local login, CapSet listed) every second
/// until `stop` resolves.
pub async fn owner_probe(stats: Shared, socket: PathBuf, stop: tokio::sync::oneshot::Receiver<()>) -> Probe {
    let mut p = Probe::default();
    tokio::pin!(stop);
    loop {
        p.tries += 1;
        let t = Instant::now();
        let r = async {
            let c = login(&stats, &socket, None, false).await?;
            let took = t.elapsed();
            let caps = ops::list_caps(&ops::cap_set(&c.session)).await?;
            logout(&stats, &c).await?;
            Ok::<_, ClientError>((took, caps.iter().any(|c| c.name == "vms")))
        }
        .await;
        match r {
            Ok((took, true)) => {
                p.ok += 1;
                p.slowest = p.slowest.max(took);
            }
            Ok((_, false)) => p.failures.push("CapSet without vms".into()),
            Err(e) => p.failures.push(format!("{}: {e}", crate::stats::code_name(&e))),
        }
        tokio::select! {
            _ = &mut stop => return p,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
