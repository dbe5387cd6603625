//! Slowing down failed password logins, per (user name, peer).
//!
//! Every failure waits at least [`BASE`]; each consecutive failure for the
//! same key doubles the wait, up to [`CAP`]. A success clears the key; keys
//! idle for [`FORGET_AFTER`] are forgotten. The table is bounded
//! ([`MAX_KEYS`]); when it is full of live keys, new keys get [`CAP`].
//! The caller sleeps with `tokio::time::sleep`, so other logins go on.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Delay after any failed login.
pub const BASE: Duration = Duration::from_millis(300);
/// Longest delay.
pub const CAP: Duration = Duration::from_secs(4);
/// A key with no failure for this long starts over.
pub const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// Most keys tracked.
pub const MAX_KEYS: usize = 10_000;

/// Failure counts by key.
#[derive(Default)]
pub struct Throttle {
    failures: HashMap<String, (u32, Instant)>,
}

/// The source of a login attempt: the peer description up to its first
/// space (`unix:uid=U`), so every connection of one uid is one source.
pub fn source(peer: &str) -> &str {
    peer.split(' ').next().unwrap_or("")
}

/// The throttle key of a login attempt: the user name and the peer's
/// identity. The gateway describes a Unix peer as `unix:uid=U pid=P`; only
/// the part before the first space counts, so a new connection (new pid)
/// does not reset the count.
pub fn key(user: &str, peer: &str) -> String {
    let ident = source(peer);
    let user: String = user.chars().take(64).collect();
    format!("{user}\u{0}{ident}")
}

/// The delay after the `n`th consecutive failure (n >= 1).
pub fn delay_for(n: u32) -> Duration {
    let shift = n.saturating_sub(1).min(16);
    BASE.saturating_mul(1u32 << shift).min(CAP)
}

impl Throttle {
    /// Records a failure for `key` and returns how long to wait before answering.
    pub fn on_failure(&mut self, key: &str) -> Duration {
        let now = Instant::now();
        self.failures.retain(|_, (_, t)| now.duration_since(*t) < FORGET_AFTER);
        if let Some((n, t)) = self.failures.get_mut(key) {
            *n = n.saturating_add(1);
            *t = now;
            return delay_for(*n);
        }
        if self.failures.len() >= MAX_KEYS {
            return CAP;
        }
        self.failures.insert(key.to_string(), (1, now));
        delay_for(1)
    }

    /// Clears `key` after a successful login.
    pub fn on_success(&mut self, key: &str) {
        self.failures.remove(key);
    }

    /// Number of keys tracked.
    pub fn len(&self) -> usize {
        self.failures.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.failures.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_per_key_and_resets_on_success() {
        let mut t = Throttle::default();
        let k = key("bob", "unix:uid=1000 pid=1");
        assert_eq!(k, key("bob", "unix:uid=1000 pid=2"), "pid does not matter");
        assert_ne!(k, key("bob", "unix:uid=1001 pid=1"));
        assert_eq!(t.on_failure(&k), Duration::from_millis(300));
        assert_eq!(t.on_failure(&k), Duration::from_millis(600));
        assert_eq!(t.on_failure(&k), Duration::from_millis(1200));
        assert_eq!(t.on_failure(&key("alice", "unix:uid=1000")), BASE, "other keys unaffected");
        for _ in 0..40 {
            assert!(t.on_failure(&k) <= CAP);
        }
        assert_eq!(t.on_failure(&k), CAP);
        t.on_success(&k);
        assert_eq!(t.on_failure(&k), BASE);
    }

    #[test]
    fn bounded() {
        let mut t = Throttle::default();
        for i in 0..MAX_KEYS {
            t.on_failure(&format!("u{i}"));
        }
        assert_eq!(t.on_failure("fresh"), CAP);
        assert_eq!(t.len(), MAX_KEYS);
    }
}
