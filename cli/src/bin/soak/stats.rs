//! What the soak run counts: calls, errors by code (expected or not),
//! latencies, and the audit events it expects the broker to have written.

use capvisor_client::ClientError;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Duration;

/// How a failed call is named in the report: the `[capvisor:<code>]` code
/// (`CvError::from_rpc`, through `ClientError::Domain`) or, for failures
/// that are not typed domain outcomes, `disconnected`, `rpc`, `io`, or
/// `timeout` for a call the run gave up waiting for ([`bounded`]).
pub fn code_name(e: &ClientError) -> String {
    match e {
        ClientError::Domain(d) => d.code_name().to_string(),
        ClientError::Disconnected(_) => "disconnected".into(),
        ClientError::Rpc(_) => "rpc".into(),
        ClientError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => "timeout".into(),
        ClientError::Io(_) => "io".into(),
        ClientError::NotLoggedIn => "notLoggedIn".into(),
        ClientError::Usage(_) => "usage".into(),
    }
}

/// Runs `f` for at most `secs` seconds; past that the call counts as
/// failed with code `timeout` (a hang is a finding, and the run must end).
pub async fn bounded<T>(
    secs: u64,
    f: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(Duration::from_secs(secs), f).await.unwrap_or_else(|_| {
        Err(ClientError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {secs} s"))))
    })
}

/// What the run is doing now (printed if the global deadline passes).
pub static STEP: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// Sets [`STEP`] and prints it on stderr.
pub fn step(what: &str) {
    eprintln!("capvisor-soak: {what}");
    if let Ok(mut s) = STEP.lock() {
        *s = what.to_string();
    }
}

/// One audit event the run expects to find in `audit.jsonl`: a call the
/// server answered, so its audit line must have been written.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Expect {
    /// Audit `action` (`login`, `attach`, `logout`, `vm.create`, `vm.remove`).
    pub action: String,
    /// Audit `outcome` (`ok`, `denied`, ...).
    pub outcome: String,
    /// Session id (hex); empty for events without one (failed logins).
    pub session: String,
    /// Principal, for events without a session (failed logins); else empty.
    pub principal: String,
}

/// Counters of the whole run (single-threaded: every client task runs on
/// one `LocalSet`).
#[derive(Default)]
pub struct Stats {
    /// Calls made by the well-behaved clients (logins included).
    pub calls: u64,
    /// Their failures by code; `true` in the key: the failure was the one
    /// the call was meant to provoke (e.g. `notFound` for a missing VM) or
    /// the typed outcome a kill -9 should produce.
    pub errors: BTreeMap<(String, bool), u64>,
    /// Failures that were not expected, with their message (first 20 kept).
    pub unexpected: Vec<String>,
    /// Latency of every call but logins.
    pub call_lat: Vec<Duration>,
    /// Latency of every login.
    pub login_lat: Vec<Duration>,
    /// Sessions logged in and out again by the session phase.
    pub sessions_served: u64,
    /// Audit events the run expects.
    pub expect: Vec<Expect>,
}

impl Stats {
    /// Counts a call's outcome; `expected` lists the codes it may fail
    /// with by design.
    pub fn record<T>(&mut self, what: &str, r: &Result<T, ClientError>, lat: Duration, expected: &[&str]) {
        self.calls += 1;
        if what.starts_with("login") {
            self.login_lat.push(lat);
        } else {
            self.call_lat.push(lat);
        }
        if let Err(e) = r {
            let code = code_name(e);
            let ok = expected.contains(&code.as_str());
            *self.errors.entry((code.clone(), ok)).or_default() += 1;
            if !ok && self.unexpected.len() < 20 {
                self.unexpected.push(format!("{what}: {code}: {e}"));
            }
        }
    }

    /// Expects an audit line for a call the server answered.
    pub fn expect(&mut self, action: &str, outcome: &str, session: &str, principal: &str) {
        let principal = if session.is_empty() { principal.to_string() } else { String::new() };
        self.expect.push(Expect { action: action.into(), outcome: outcome.into(), session: session.into(), principal });
    }

    /// Failures not meant by design, summed.
    pub fn unexpected_count(&self) -> u64 {
        self.errors.iter().filter(|((_, ok), _)| !ok).map(|(_, n)| n).sum()
    }
}

/// The shared counters.
pub type Shared = std::rc::Rc<RefCell<Stats>>;

/// `p`-th percentile (0..=100) of `v`, `None` when empty.
pub fn pct(v: &[Duration], p: usize) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort();
    Some(v[(v.len() * p / 100).min(v.len() - 1)])
}

/// A duration for the report: milliseconds with one decimal, or `-`.
pub fn ms(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0)).unwrap_or_else(|| "-".into())
}

/// Compares `expect` with the lines of an audit log (JSON Lines, fields
/// `action`, `outcome`, `session`, `principal`, and `repeated` on a line
/// that stands for that many coalesced events). Returns (expected,
/// found, lost): an event is lost when the log holds fewer matching
/// lines than the run expects.
pub fn audit_lost(expect: &[Expect], audit_text: &str) -> (usize, usize, Vec<Expect>) {
    let mut have: BTreeMap<Expect, usize> = BTreeMap::new();
    for line in audit_text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let f = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
        let session = f("session");
        let principal = if session.is_empty() { f("principal") } else { String::new() };
        // A coalesced line stands for `max(repeated, 1)` events
        // (capvisor_broker::audit).
        let n = v.get("repeated").and_then(|r| r.as_u64()).unwrap_or(0).max(1) as usize;
        *have.entry(Expect { action: f("action"), outcome: f("outcome"), session, principal }).or_default() += n;
    }
    let mut want: BTreeMap<&Expect, usize> = BTreeMap::new();
    for e in expect {
        *want.entry(e).or_default() += 1;
    }
    let mut lost = vec![];
    let mut found = 0;
    for (e, n) in want {
        let h = have.get(e).copied().unwrap_or(0);
        found += h.min(n);
        for _ in h..n {
            lost.push(e.clone());
        }
    }
    (expect.len(), found, lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_counts_missing_lines() {
        let e = |a: &str, s: &str| Expect {
            action: a.into(),
            outcome: "ok".into(),
            session: s.into(),
            principal: "".into(),
        };
        let log = r#"{"action":"login","outcome":"ok","session":"a1","principal":"local:root"}
{"action":"logout","outcome":"ok","session":"a1","principal":"local:root"}
not json
{"action":"login","outcome":"denied","session":"","principal":"password:t"}
{"action":"login","outcome":"denied","session":"","principal":"password:t","repeated":2}"#;
        let denied = Expect {
            action: "login".into(),
            outcome: "denied".into(),
            session: "".into(),
            principal: "password:t".into(),
        };
        let want = vec![
            e("login", "a1"),
            e("logout", "a1"),
            e("logout", "a1"),
            e("vm.create", "a1"),
            denied.clone(),
            denied.clone(),
            denied.clone(),
            denied,
        ];
        let (n, found, lost) = audit_lost(&want, log);
        assert_eq!((n, found), (8, 5));
        let lost_denied = lost.iter().filter(|l| l.outcome == "denied").count();
        assert_eq!(lost_denied, 1, "one line plus one standing for 2: 3 of 4 denials found");
        let lost: Vec<_> = lost.into_iter().filter(|l| l.outcome == "ok").collect();
        assert_eq!(lost, vec![e("logout", "a1"), e("vm.create", "a1")]);
    }
}
