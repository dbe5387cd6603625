//! A queue of things waiting for a person's decision (schema
//! `Approvals`): the egress proxy's held connections and the worker's held
//! execs (`askExec`) both wait here. Each waiter gets an id, is listed
//! until it is decided, times out or goes away (dropping its wait
//! withdraws it), and at most `max` wait at once.

use crate::schema::capvisor_capnp::ApprovalDecision;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::time::Duration;

/// Why a wait ended without a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoDecision {
    /// Nobody decided within the timeout.
    TimedOut,
    /// `max` already waited: refused at once.
    TooMany,
    /// The queue went away (its owner ended).
    Dropped,
}

struct Waiting<T> {
    item: T,
    time_ms: i64,
    expires_ms: i64,
    tx: tokio::sync::oneshot::Sender<ApprovalDecision>,
}

/// The queue (single-threaded: lives in a `LocalSet`).
pub struct DecisionQueue<T> {
    timeout: Cell<Duration>,
    id_bits: u64,
    max: usize,
    next: Cell<u64>,
    pending: RefCell<BTreeMap<u64, Waiting<T>>>,
}

impl<T: Clone> DecisionQueue<T> {
    /// Empty; each wait lasts at most `timeout`; ids are `id_bits | n` for
    /// n = 1, 2, ... (so two queues answering one `Approvals` cap can tell
    /// their ids apart); at most `max` wait at once.
    pub fn new(timeout: Duration, id_bits: u64, max: usize) -> Self {
        Self { timeout: Cell::new(timeout), id_bits, max, next: Cell::new(1), pending: RefCell::new(BTreeMap::new()) }
    }

    /// How long a wait lasts.
    pub fn timeout(&self) -> Duration {
        self.timeout.get()
    }

    /// Sets how long later waits last.
    pub fn set_timeout(&self, timeout: Duration) {
        self.timeout.set(timeout);
    }

    /// Lists `item` and waits for its decision.
    ///
    /// Errors: [`NoDecision`]: timed out, refused because `max` wait, or
    /// the queue's decider went away.
    pub async fn wait(&self, item: T) -> Result<ApprovalDecision, NoDecision> {
        if self.pending.borrow().len() >= self.max {
            return Err(NoDecision::TooMany);
        }
        let id = self.id_bits | self.next.get();
        self.next.set(self.next.get() + 1);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let time_ms = crate::now_ms();
        let timeout = self.timeout.get();
        let expires_ms = time_ms.saturating_add(timeout.as_millis() as i64);
        self.pending.borrow_mut().insert(id, Waiting { item, time_ms, expires_ms, tx });
        // Withdrawn however the wait ends: decided, timed out, or dropped.
        struct Withdraw<'a, T>(&'a DecisionQueue<T>, u64);
        impl<T> Drop for Withdraw<'_, T> {
            fn drop(&mut self) {
                self.0.pending.borrow_mut().remove(&self.1);
            }
        }
        let _withdraw = Withdraw(self, id);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(d)) => Ok(d),
            Ok(Err(_)) => Err(NoDecision::Dropped),
            Err(_) => Err(NoDecision::TimedOut),
        }
    }

    /// The item waiting under `id`, if any.
    pub fn get(&self, id: u64) -> Option<T> {
        self.pending.borrow().get(&id).map(|w| w.item.clone())
    }

    /// Decides `id`: its wait returns `decision`. Returns its item, or
    /// `None` when nothing waits under `id` (decided, timed out, gone).
    pub fn decide(&self, id: u64, decision: ApprovalDecision) -> Option<T> {
        let w = self.pending.borrow_mut().remove(&id)?;
        let _ = w.tx.send(decision);
        Some(w.item)
    }

    /// What waits, oldest first: (id, item, listed at, expires at), Unix
    /// epoch ms.
    pub fn list(&self) -> Vec<(u64, T, i64, i64)> {
        self.pending.borrow().iter().map(|(id, w)| (*id, w.item.clone(), w.time_ms, w.expires_ms)).collect()
    }

    /// How many wait.
    pub fn len(&self) -> usize {
        self.pending.borrow().len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.pending.borrow().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn a_wait_ends_by_decision_timeout_withdrawal_or_the_bound() {
        crate::conn::run_local(async {
            let q = Rc::new(DecisionQueue::new(Duration::from_secs(30), 1 << 63, 2));
            let q2 = q.clone();
            let held = tokio::task::spawn_local(async move { q2.wait("a").await });
            tokio::task::yield_now().await;
            let (id, item, _, _) = q.list()[0];
            assert_eq!((id, item), ((1 << 63) | 1, "a"));
            assert_eq!(q.get(id), Some("a"));
            assert_eq!(q.decide(id ^ (1 << 63), ApprovalDecision::Deny), None, "another id");
            assert_eq!(q.decide(id, ApprovalDecision::AllowAlways), Some("a"));
            assert_eq!(held.await.unwrap(), Ok(ApprovalDecision::AllowAlways));
            assert!(q.is_empty() && q.decide(id, ApprovalDecision::Deny).is_none(), "decided once");
            // Dropping a wait withdraws it; past `max` a wait is refused at once.
            let q3 = q.clone();
            let gone = tokio::task::spawn_local(async move { q3.wait("b").await });
            tokio::task::yield_now().await;
            gone.abort();
            let _ = gone.await;
            assert!(q.is_empty());
            let (qa, qb) = (q.clone(), q.clone());
            let _x = tokio::task::spawn_local(async move { qa.wait("x").await });
            let _y = tokio::task::spawn_local(async move { qb.wait("y").await });
            tokio::task::yield_now().await;
            assert_eq!(q.len(), 2);
            assert_eq!(q.wait("z").await, Err(NoDecision::TooMany));
            let short = DecisionQueue::new(Duration::from_millis(20), 0, 4);
            assert_eq!(short.wait("t").await, Err(NoDecision::TimedOut));
            assert!(short.is_empty(), "a timed-out wait is withdrawn");
        });
    }
}
