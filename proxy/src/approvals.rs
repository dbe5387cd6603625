//! Approvals: connections an `ask` rule holds until someone holding the
//! session's `Approvals` cap decides (issue 9, item 6).
//!
//! [`Approvals::ask`] parks the deciding task (the guest's connection stays
//! open, neither failed nor relayed) until [`Approvals::decide`] or the
//! timeout, which denies. At most [`MAX_PENDING`] wait at once per proxy;
//! beyond that an `ask` is denied at once (a guest cannot queue unbounded
//! work for a human). `allowAlways` also puts an allow rule for exactly
//! that host and port first in the session's policy.

use crate::policy::{Action, Policy, Rule, SharedPolicy};
use capnp::capability::Rc as CapRc;
use capvisor_rpc::decisions::{DecisionQueue, NoDecision};
use capvisor_rpc::{CvError, CvResult};
use capvisor_schema::capvisor_capnp::{approval, approvals, ApprovalDecision};
use std::rc::Rc;
use std::time::Duration;

/// How long an `ask` waits by default (`ProxyConfig.askTimeoutSecs` 0).
pub const DEFAULT_ASK_TIMEOUT: Duration = Duration::from_secs(60);

/// Most connections waiting for a decision at once, per proxy.
pub const MAX_PENDING: usize = 64;

/// What a held connection asks for (schema `Approval`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ask {
    /// The VM.
    pub vm: String,
    /// The host as the guest named it.
    pub host: String,
    /// Upstream port.
    pub port: u16,
    /// `""` when not known, else `tcp`, `http`, `https`.
    pub scheme: String,
    /// HTTP method ("" when not seen).
    pub method: String,
    /// HTTP path ("" when not seen).
    pub path: String,
    /// The ask rule's index.
    pub rule: i32,
}

/// How an ask ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Allowed for this connection.
    AllowedOnce,
    /// Allowed, and an allow rule was added.
    AllowedAlways,
    /// An approver denied it.
    Denied,
    /// Nobody decided within the timeout.
    TimedOut,
    /// [`MAX_PENDING`] were already waiting.
    TooMany,
}

impl Outcome {
    /// Whether the connection may proceed.
    pub fn allowed(self) -> bool {
        matches!(self, Outcome::AllowedOnce | Outcome::AllowedAlways)
    }

    /// For NetLog's detail.
    pub fn describe(self, timeout: Duration) -> String {
        match self {
            Outcome::AllowedOnce => "approved once".into(),
            Outcome::AllowedAlways => "approved always (allow rule added)".into(),
            Outcome::Denied => "denied by an approver".into(),
            Outcome::TimedOut => format!("not decided within {} s", timeout.as_secs()),
            Outcome::TooMany => format!("{MAX_PENDING} connections already wait for a decision"),
        }
    }
}

/// The held connections, waiting in a [`DecisionQueue`] (shared with the
/// worker's held execs).
pub struct Approvals(DecisionQueue<Ask>);

impl Approvals {
    /// No connection held; each waits at most `timeout`.
    pub fn new(timeout: Duration) -> Rc<Self> {
        Rc::new(Self(DecisionQueue::new(timeout, 0, MAX_PENDING)))
    }

    /// How long a held connection waits.
    pub fn timeout(&self) -> Duration {
        self.0.timeout()
    }

    /// Sets how long later held connections wait (manifest
    /// `[net] ask_timeout_secs`).
    pub fn set_timeout(&self, timeout: Duration) {
        self.0.set_timeout(timeout);
    }

    /// Holds the connection `ask` describes until a decision, the timeout,
    /// or the caller going away (dropping this future withdraws it).
    pub async fn ask(&self, ask: Ask) -> Outcome {
        match self.0.wait(ask).await {
            Ok(ApprovalDecision::AllowOnce) => Outcome::AllowedOnce,
            Ok(ApprovalDecision::AllowAlways) => Outcome::AllowedAlways,
            Ok(ApprovalDecision::Deny) | Err(NoDecision::Dropped) => Outcome::Denied,
            Err(NoDecision::TimedOut) => Outcome::TimedOut,
            Err(NoDecision::TooMany) => Outcome::TooMany,
        }
    }

    /// Decides held connection `id`; `allowAlways` first puts an allow rule
    /// for exactly its host and port at the head of `policy`.
    ///
    /// Errors: `notFound` when `id` no longer waits; the rule set refused.
    pub fn decide(&self, id: u64, decision: ApprovalDecision, policy: &SharedPolicy) -> CvResult<Ask> {
        let ask = self.0.get(id).ok_or_else(|| {
            CvError::not_found(format!("no connection {id} waits for a decision (decided or timed out)"))
        })?;
        if decision == ApprovalDecision::AllowAlways {
            let mut rules = policy.borrow().rules().to_vec();
            rules.insert(0, Rule::host(&ask.host, Action::Allow).on_port(ask.port));
            let next = Policy::new(rules)?;
            *policy.borrow_mut() = next;
        }
        self.0.decide(id, decision);
        Ok(ask)
    }

    fn list(&self) -> Vec<(u64, Ask, i64, i64)> {
        self.0.list()
    }
}

/// The `Approvals` server over the session's held connections and policy.
pub struct ApprovalsServer {
    approvals: Rc<Approvals>,
    policy: SharedPolicy,
}

impl ApprovalsServer {
    /// An `Approvals` client.
    pub fn client(approvals: Rc<Approvals>, policy: SharedPolicy) -> approvals::Client {
        capnp_rpc::new_client(Self { approvals, policy })
    }
}

fn write_approval(id: u64, a: &Ask, time_ms: i64, expires_ms: i64, mut b: approval::Builder<'_>) {
    b.set_id(id);
    b.set_time_ms(time_ms);
    b.set_vm(a.vm.as_str());
    b.set_host(crate::log::bounded(&a.host).as_str());
    b.set_port(a.port);
    b.set_scheme(a.scheme.as_str());
    b.set_method(crate::log::bounded(&a.method).as_str());
    b.set_path(crate::log::bounded(&a.path).as_str());
    b.set_rule(a.rule);
    b.set_expires_at_ms(expires_ms);
}

impl approvals::Server for ApprovalsServer {
    async fn pending(
        self: CapRc<Self>,
        _: approvals::PendingParams,
        mut results: approvals::PendingResults,
    ) -> capnp::Result<()> {
        let list = self.approvals.list();
        let mut out = results.get().init_approvals(list.len() as u32);
        for (i, (id, a, t, e)) in list.iter().enumerate() {
            write_approval(*id, a, *t, *e, out.reborrow().get(i as u32));
        }
        Ok(())
    }

    async fn decide(
        self: CapRc<Self>,
        params: approvals::DecideParams,
        _: approvals::DecideResults,
    ) -> capnp::Result<()> {
        let p = params.get()?;
        let decision =
            p.get_decision().map_err(|e| CvError::invalid(format!("unknown decision (enumerant {})", e.0)))?;
        let ask = self.approvals.decide(p.get_id(), decision, &self.policy)?;
        tracing::info!(vm = %ask.vm, host = %crate::log::bounded(&ask.host), port = ask.port, ?decision, "approval decided");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn ask(host: &str) -> Ask {
        Ask {
            vm: "v".into(),
            host: host.into(),
            port: 443,
            scheme: String::new(),
            method: String::new(),
            path: String::new(),
            rule: 0,
        }
    }

    fn policy() -> SharedPolicy {
        Rc::new(RefCell::new(Policy::new(vec![Rule::host("*", Action::Ask)]).unwrap()))
    }

    #[test]
    fn a_decision_releases_the_held_connection_and_always_adds_a_rule() {
        capvisor_rpc::conn::run_local(async {
            let a = Approvals::new(Duration::from_secs(30));
            let pol = policy();
            let a2 = a.clone();
            let held = tokio::task::spawn_local(async move { a2.ask(ask("api.test")).await });
            tokio::task::yield_now().await;
            let list = a.list();
            assert_eq!(list.len(), 1);
            let id = list[0].0;
            assert_eq!(
                a.decide(id + 100, ApprovalDecision::Deny, &pol).unwrap_err().code,
                capvisor_schema::common_capnp::ErrorCode::NotFound
            );
            a.decide(id, ApprovalDecision::AllowAlways, &pol).unwrap();
            assert_eq!(held.await.unwrap(), Outcome::AllowedAlways);
            assert!(a.list().is_empty());
            let rules = pol.borrow().rules().to_vec();
            assert_eq!((rules[0].host.as_str(), rules[0].port, rules[0].action), ("api.test", 443, Action::Allow));
            assert_eq!(rules.len(), 2);
            // Decided once: a second decision is notFound.
            assert!(a.decide(id, ApprovalDecision::Deny, &pol).is_err());
        });
    }

    #[test]
    fn deny_timeout_withdrawal_and_the_bound() {
        capvisor_rpc::conn::run_local(async {
            let pol = policy();
            let a = Approvals::new(Duration::from_millis(200));
            let a2 = a.clone();
            let held = tokio::task::spawn_local(async move { a2.ask(ask("x.test")).await });
            tokio::task::yield_now().await;
            let id = a.list()[0].0;
            a.decide(id, ApprovalDecision::Deny, &pol).unwrap();
            assert_eq!(held.await.unwrap(), Outcome::Denied);
            assert_eq!(a.ask(ask("y.test")).await, Outcome::TimedOut);
            assert!(a.list().is_empty(), "a timed-out ask is withdrawn");
            // A guest that goes away withdraws its ask.
            let a3 = a.clone();
            let gone = tokio::task::spawn_local(async move { a3.ask(ask("z.test")).await });
            tokio::task::yield_now().await;
            gone.abort();
            let _ = gone.await;
            assert!(a.list().is_empty());
            // At most MAX_PENDING wait; one more is refused at once.
            let big = Approvals::new(Duration::from_secs(30));
            let mut tasks = Vec::new();
            for i in 0..MAX_PENDING {
                let b = big.clone();
                tasks.push(tokio::task::spawn_local(async move { b.ask(ask(&format!("h{i}.test"))).await }));
            }
            for _ in 0..10_000 {
                if big.list().len() == MAX_PENDING {
                    break;
                }
                tokio::task::yield_now().await;
            }
            assert_eq!(big.list().len(), MAX_PENDING);
            assert_eq!(big.ask(ask("one-more.test")).await, Outcome::TooMany);
            for t in tasks {
                t.abort();
            }
        });
    }
}
