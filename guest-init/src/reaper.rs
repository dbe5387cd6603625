//! Child reaping: one registry of the processes guest-init started and one
//! reaper task per runtime that collects exit statuses on `SIGCHLD`.
//!
//! We do not use `tokio::process`: its own `SIGCHLD` handling calls
//! `waitpid` on the pids it spawned, which would race a PID 1's global
//! `waitpid(-1)`. Instead [`crate::exec`] forks children itself and
//! registers each pid here *while holding the registry lock across the
//! fork* (see [`Registry::spawn_locked`]). The reaper also holds the lock
//! while it calls `waitpid`, so
//! - a child that exits before it is registered is not lost (the reaper
//!   cannot reap it until the registration is in place), and
//! - [`signal_group`] never signals a pid that was already reaped (and so
//!   might have been reused).
//!
//! Two modes (see [`set_reap_all`]):
//! - **all** (PID 1): `waitpid(-1, WNOHANG)` until nothing is left. Statuses
//!   of pids nobody registered (orphans re-parented to init) are dropped.
//! - **registered** (the default; tests and any host process that links
//!   this library): `waitpid(pid, WNOHANG)` for each registered pid only,
//!   so children that other code in the same process spawned (for example
//!   with `tokio::process`) are never stolen.
//!
//! `SIGCHLD` notifications are backed by a slow periodic sweep
//! ([`SWEEP`]) in case a notification is ever missed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;

/// How a process ended (wait(2): `WIFEXITED` / `WIFSIGNALED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Exited normally with this code (0..=255).
    Code(i32),
    /// Killed by this signal number.
    Signal(i32),
}

impl Exit {
    /// Decodes a raw wait(2) status. `None` for stop / continue reports.
    pub fn from_raw(status: libc::c_int) -> Option<Self> {
        if libc::WIFEXITED(status) {
            Some(Exit::Code(libc::WEXITSTATUS(status)))
        } else if libc::WIFSIGNALED(status) {
            Some(Exit::Signal(libc::WTERMSIG(status)))
        } else {
            None
        }
    }
}

/// Interval of the fallback sweep that runs even without `SIGCHLD`.
pub const SWEEP: Duration = Duration::from_millis(250);

static REAP_ALL: AtomicBool = AtomicBool::new(false);

/// Switches the reaper to `waitpid(-1)` mode (call once, early, in PID 1).
pub fn set_reap_all(on: bool) {
    REAP_ALL.store(on, Ordering::SeqCst);
}

/// The registry of live children: pid -> the sender their exit status goes to.
pub struct Registry {
    waiters: HashMap<libc::pid_t, oneshot::Sender<Exit>>,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

fn lock() -> MutexGuard<'static, Option<Registry>> {
    // A poisoned lock only means a panic elsewhere while it was held; the
    // map itself stays consistent (single inserts / removes).
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// Runs `fork_fn` (which forks and returns the child's pid, or an error)
    /// with the registry locked, and registers the pid before unlocking.
    /// Returns the pid and a receiver for its exit status.
    ///
    /// `fork_fn` must not call back into this module.
    pub fn spawn_locked<E>(
        fork_fn: impl FnOnce() -> Result<libc::pid_t, E>,
    ) -> Result<(libc::pid_t, oneshot::Receiver<Exit>), E> {
        let mut guard = lock();
        let reg = guard.get_or_insert_with(|| Registry { waiters: HashMap::new() });
        let pid = fork_fn()?;
        let (tx, rx) = oneshot::channel();
        reg.waiters.insert(pid, tx);
        Ok((pid, rx))
    }
}

/// Sends `sig` to the process group led by `pid` if `pid` is still a
/// registered, unreaped child (kill(2) with a negative pid). Returns
/// `Ok(false)` when the child was already reaped.
///
/// Errors: kill(2)'s errno (EINVAL for a bad signal number).
pub fn signal_group(pid: libc::pid_t, sig: libc::c_int) -> std::io::Result<bool> {
    let guard = lock();
    let alive = guard.as_ref().is_some_and(|r| r.waiters.contains_key(&pid));
    if !alive {
        return Ok(false);
    }
    // SAFETY: plain syscall; pid > 0 is our unreaped child, so -pid is its group.
    let rc = unsafe { libc::kill(-pid, sig) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            // The group is gone but the leader is an unreaped zombie:
            // try the leader itself (it may have left its group).
            // SAFETY: as above.
            if unsafe { libc::kill(pid, sig) } == 0 {
                return Ok(true);
            }
        }
        return Err(e);
    }
    Ok(true)
}

/// Sends `sig` to the whole process group `pgid` (no liveness check; used
/// after the leader was reaped while other members may still hold its
/// output open). ESRCH (no such group) is `Ok(false)`.
pub fn signal_orphaned_group(pgid: libc::pid_t, sig: libc::c_int) -> std::io::Result<bool> {
    // Hold the lock so no fork of ours can race the pgid's reuse.
    let _guard = lock();
    // SAFETY: plain syscall.
    if unsafe { libc::kill(-pgid, sig) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Collects every exited child now (non-blocking) and delivers statuses.
/// Returns how many statuses were collected.
pub fn reap_now() -> usize {
    let mut guard = lock();
    let reg = guard.get_or_insert_with(|| Registry { waiters: HashMap::new() });
    let mut n = 0;
    if REAP_ALL.load(Ordering::SeqCst) {
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: plain syscall with a valid out pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break; // 0: children left but none exited; -1: ECHILD / EINTR
            }
            n += 1;
            if let Some(exit) = Exit::from_raw(status) {
                if let Some(tx) = reg.waiters.remove(&pid) {
                    let _ = tx.send(exit);
                }
            }
        }
    } else {
        let pids: Vec<libc::pid_t> = reg.waiters.keys().copied().collect();
        for pid in pids {
            let mut status: libc::c_int = 0;
            // SAFETY: as above.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            let exit = if r == pid {
                Exit::from_raw(status)
            } else if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
                // Someone else reaped it (should not happen); report it as
                // killed so waiters do not hang.
                Some(Exit::Signal(libc::SIGKILL))
            } else {
                None
            };
            if let Some(exit) = exit {
                n += 1;
                if let Some(tx) = reg.waiters.remove(&pid) {
                    let _ = tx.send(exit);
                }
            }
        }
    }
    n
}

thread_local! {
    static STARTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

struct ResetOnDrop;
impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        STARTED.with(|s| s.set(false));
    }
}

/// Starts the reaper task on the current `LocalSet` unless one already
/// runs there (idempotent; a new runtime on the same thread gets a new one
/// once the old runtime dropped its task).
///
/// Must be called inside a `LocalSet` with a tokio runtime that has
/// signal and time drivers enabled.
pub fn ensure_started() {
    if STARTED.with(|s| s.replace(true)) {
        return;
    }
    tokio::task::spawn_local(async move {
        let _reset = ResetOnDrop;
        let mut sig = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("guest-init: cannot watch SIGCHLD ({e}); reaping by polling only");
                None
            }
        };
        let mut tick = tokio::time::interval(SWEEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            reap_now();
            match sig.as_mut() {
                Some(s) => {
                    tokio::select! {
                        _ = s.recv() => {}
                        _ = tick.tick() => {}
                    }
                }
                None => {
                    tick.tick().await;
                }
            }
        }
    });
}
