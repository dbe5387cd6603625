//! Exec approvals (issue 10, item 6; the "ask" pattern): an exec through a
//! narrowed `Vm` whose narrowing has `askExec` waits here until the session
//! decides through its `Approvals` cap (the same cap that decides the
//! egress proxy's held connections; exec approvals have kind "exec" and
//! ids with [`EXEC_ID_BIT`] set), or until the ask timeout denies it.
//!
//! Who decides: whoever holds the session's `Approvals` (its bundle names
//! "approvals"; a delegate session never holds it). What they see: the VM,
//! the argv and the grants the exec came through, never its environment.
//! A waiting exec ends with its caller: dropping the call (or the grant's
//! revocation, which cuts the call) removes it from the pending list.

use capvisor_rpc::decisions::{DecisionQueue, NoDecision};
use capvisor_rpc::schema::capvisor_capnp::{approval, ApprovalDecision};
use capvisor_rpc::{CvError, CvResult};
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::time::Duration;

/// Set in the id of every exec approval, so `Approvals.decide` can route
/// an id to the worker (set) or to the egress proxy (clear).
pub const EXEC_ID_BIT: u64 = 1 << 63;
/// How long an exec waits when the manifest names no ask timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Most execs waiting at once in one session; one more is denied at once.
pub const MAX_PENDING: usize = 64;

/// Programs a narrowed cap may run without asking again (`allowAlways`).
pub type Always = Rc<RefCell<BTreeSet<String>>>;

/// One held exec, as `Approvals.pending` shows it.
#[derive(Clone)]
struct HeldExec {
    vm: String,
    argv: Vec<String>,
    grants: String,
}

/// The session's waiting execs, in a [`DecisionQueue`] (shared with the
/// egress proxy's held connections; ids carry [`EXEC_ID_BIT`]).
pub struct ExecApprovals(DecisionQueue<HeldExec>);

impl ExecApprovals {
    /// No exec waiting; each will wait at most `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self(DecisionQueue::new(timeout, EXEC_ID_BIT, MAX_PENDING))
    }

    /// Waits for a decision on running `argv` in VM `vm` (`grants`: the
    /// chain it came through, for people). Returns at once when `always`
    /// holds `argv[0]`; an `allowAlways` decision adds it.
    ///
    /// Errors: `denied` on a deny, on the timeout, or with
    /// [`MAX_PENDING`] execs already waiting.
    pub async fn ask(&self, vm: &str, argv: &[String], grants: &str, always: &Always) -> CvResult<()> {
        let prog = argv.first().cloned().unwrap_or_default();
        if always.borrow().contains(&prog) {
            return Ok(());
        }
        let held = HeldExec { vm: vm.to_string(), argv: argv.to_vec(), grants: grants.to_string() };
        match self.0.wait(held).await {
            Ok(ApprovalDecision::AllowOnce) => Ok(()),
            Ok(ApprovalDecision::AllowAlways) => {
                always.borrow_mut().insert(prog);
                Ok(())
            }
            Ok(ApprovalDecision::Deny) => Err(CvError::denied(format!("running {prog:?} was denied"))),
            Err(NoDecision::Dropped) => Err(CvError::denied("the session ended before a decision")),
            Err(NoDecision::TimedOut) => Err(CvError::denied(format!("running {prog:?} was not approved in time"))),
            Err(NoDecision::TooMany) => {
                Err(CvError::denied(format!("{MAX_PENDING} execs already wait for a decision")))
            }
        }
    }

    /// Decides exec approval `id`.
    ///
    /// Errors: `notFound` when it no longer waits.
    pub fn decide(&self, id: u64, decision: ApprovalDecision) -> CvResult<()> {
        self.0
            .decide(id, decision)
            .map(drop)
            .ok_or_else(|| CvError::not_found(format!("no exec {id} waits for a decision")))
    }

    /// How many wait.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Writes the waiting execs, oldest first, into `out` from index `at`
    /// (it must have room for [`Self::len`] more).
    pub fn write(&self, out: &mut capnp::struct_list::Builder<'_, approval::Owned>, at: u32) {
        for (i, (id, e, time_ms, expires_ms)) in self.0.list().into_iter().enumerate() {
            let mut o = out.reborrow().get(at + i as u32);
            o.set_id(id);
            o.set_time_ms(time_ms);
            o.set_vm(e.vm.as_str());
            o.set_expires_at_ms(expires_ms);
            o.set_kind("exec");
            o.set_grants(e.grants.as_str());
            o.set_rule(-1);
            let mut l = o.init_argv(e.argv.len() as u32);
            for (j, a) in e.argv.iter().enumerate() {
                l.set(j as u32, a.as_str());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn an_exec_waits_for_its_decision_and_always_sticks() {
        let a = Rc::new(ExecApprovals::new(Duration::from_secs(5)));
        let always: Always = Default::default();
        let argv = vec!["python3".to_string(), "-c".into(), "1".into()];
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let (a2, al2, av2) = (a.clone(), always.clone(), argv.clone());
                let waiting = tokio::task::spawn_local(async move { a2.ask("box", &av2, "agent (g1)", &al2).await });
                tokio::task::yield_now().await;
                assert_eq!(a.len(), 1);
                let id = a.0.list()[0].0;
                assert!(id & EXEC_ID_BIT != 0);
                assert_eq!(
                    a.decide(id ^ EXEC_ID_BIT, ApprovalDecision::Deny).unwrap_err().code,
                    capvisor_rpc::schema::common_capnp::ErrorCode::NotFound
                );
                a.decide(id, ApprovalDecision::AllowAlways).unwrap();
                waiting.await.unwrap().unwrap();
                assert!(a.is_empty());
                // Now python3 runs without asking; sh still asks, and a deny is typed.
                a.ask("box", &argv, "", &always).await.unwrap();
                let a3 = a.clone();
                let al3 = always.clone();
                let sh = tokio::task::spawn_local(async move { a3.ask("box", &["sh".to_string()], "", &al3).await });
                tokio::task::yield_now().await;
                let id = a.0.list()[0].0;
                a.decide(id, ApprovalDecision::Deny).unwrap();
                assert_eq!(sh.await.unwrap().unwrap_err().code, capvisor_rpc::schema::common_capnp::ErrorCode::Denied);
            })
            .await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn no_decision_in_time_denies_and_forgets() {
        let a = ExecApprovals::new(Duration::from_millis(50));
        let e = a.ask("box", &["ls".to_string()], "", &Default::default()).await.unwrap_err();
        assert!(e.message.contains("not approved in time"), "{}", e.message);
        assert!(a.is_empty());
    }
}
