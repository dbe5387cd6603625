//! The broker's side of grants (issue 10; docs/decisions.md "Delegation"):
//! which grant a share token names, and which grant each delegate session's
//! resume token attaches to.
//!
//! The grant itself (its caps, narrowing, tree and revocation) lives in the
//! grantor session's worker (`capvisor_worker::grants`); here is only what
//! turns a token into that worker: per grant its session, expiry, recipient
//! and the SHA-256 of its token (never the token), and per redemption the
//! hash of the delegate resume token it minted. Everything is in memory,
//! like resume tokens: a grant cannot outlive the worker that serves it,
//! and the worker does not outlive the broker. Tokens follow the broker's
//! token rule (crate::service): 32 random bytes, compared in constant time,
//! one answer (`staleSession`) for every kind of bad token.

use crate::token::{self, TokenIndex};
use std::collections::HashMap;

/// Most live grants one session may register (the worker bounds its own
/// tree at the same number).
pub const MAX_GRANTS_PER_SESSION: usize = 256;
/// Most delegate sessions (redemptions) live at once on this broker.
pub const MAX_REDEMPTIONS: usize = 4096;
/// Most live redemptions of one grant, so a leaked token cannot take every
/// slot of [`MAX_REDEMPTIONS`] from other grants.
pub const MAX_REDEMPTIONS_PER_GRANT: usize = 256;

/// One registered grant.
#[derive(Clone, Debug)]
pub struct GrantRecord {
    /// The grantor session (whose worker serves the grant).
    pub session_id: String,
    /// The grantor's principal, as shown (`local:alice`).
    pub grantor: String,
    /// Its label.
    pub label: String,
    /// `""` for a token grant, else the recipient principal.
    pub to: String,
    /// Unix epoch ms.
    pub expires_at_ms: i64,
    /// Its chain, outermost first, ending in itself: (id, label).
    pub chain: Vec<(String, String)>,
}

/// What redeeming found: the grant and its record.
pub type Found = (String, GrantRecord);

/// Every live grant and redemption (see the module docs).
#[derive(Default)]
pub struct GrantRegistry {
    grants: HashMap<String, GrantRecord>,
    share_tokens: TokenIndex,
    delegate_tokens: TokenIndex,
    /// Redemption id -> grant id.
    redemptions: HashMap<String, String>,
}

impl GrantRegistry {
    /// Registers grant `id`; returns its token (`""` when `rec.to` names a
    /// principal: such a grant is reached by login, never by token).
    ///
    /// Errors: the session already has [`MAX_GRANTS_PER_SESSION`] live
    /// grants; the id is taken.
    pub fn add(&mut self, id: &str, rec: GrantRecord) -> Result<String, &'static str> {
        if self.grants.contains_key(id) {
            return Err("grant id already registered");
        }
        if self.grants.values().filter(|g| g.session_id == rec.session_id).count() >= MAX_GRANTS_PER_SESSION {
            return Err("too many live grants for this session");
        }
        let token = if rec.to.is_empty() {
            let m = token::mint();
            self.share_tokens.insert(id, m.hash, rec.expires_at_ms);
            m.token
        } else {
            String::new()
        };
        self.grants.insert(id.to_string(), rec);
        Ok(token)
    }

    /// Forgets grant `id`, its token and every redemption of it; returns
    /// its record if it was live.
    pub fn end(&mut self, id: &str) -> Option<GrantRecord> {
        self.share_tokens.remove(id);
        let gone: Vec<String> = self.redemptions.iter().filter(|(_, g)| *g == id).map(|(r, _)| r.clone()).collect();
        for r in gone {
            self.redemptions.remove(&r);
            self.delegate_tokens.remove(&r);
        }
        self.grants.remove(id)
    }

    /// Forgets every grant of session `sid` (it ended); returns their ids.
    pub fn end_session(&mut self, sid: &str) -> Vec<String> {
        let ids: Vec<String> =
            self.grants.iter().filter(|(_, g)| g.session_id == sid).map(|(i, _)| i.clone()).collect();
        for id in &ids {
            self.end(id);
        }
        ids
    }

    /// The live grant a share token names.
    pub fn by_share_token(&self, token: &str, now_ms: i64) -> Option<Found> {
        let id = self.share_tokens.lookup(token, now_ms)?;
        self.grants.get(&id).map(|g| (id, g.clone()))
    }

    /// The live grant a delegate resume token attaches to.
    pub fn by_delegate_token(&self, token: &str, now_ms: i64) -> Option<Found> {
        let rid = self.delegate_tokens.lookup(token, now_ms)?;
        let id = self.redemptions.get(&rid)?;
        self.grants.get(id).map(|g| (id.clone(), g.clone()))
    }

    /// Mints the resume token of one redemption of grant `id` (expiring with
    /// the grant).
    ///
    /// Errors: the grant is not live; [`MAX_REDEMPTIONS_PER_GRANT`] of it
    /// or [`MAX_REDEMPTIONS`] in all are live.
    pub fn redeem(&mut self, id: &str) -> Result<String, &'static str> {
        let exp = self.grants.get(id).ok_or("grant not live")?.expires_at_ms;
        if self.redemptions.values().filter(|g| *g == id).count() >= MAX_REDEMPTIONS_PER_GRANT {
            return Err("too many delegate sessions of this grant");
        }
        if self.redemptions.len() >= MAX_REDEMPTIONS {
            // Drop redemptions of grants past their expiry first.
            let now = crate::now_ms();
            let stale: Vec<String> = self
                .redemptions
                .iter()
                .filter(|(_, g)| self.grants.get(*g).is_none_or(|r| r.expires_at_ms <= now))
                .map(|(r, _)| r.clone())
                .collect();
            for r in stale {
                self.redemptions.remove(&r);
                self.delegate_tokens.remove(&r);
            }
            if self.redemptions.len() >= MAX_REDEMPTIONS {
                return Err("too many delegate sessions");
            }
        }
        let rid = token::new_session_id();
        let m = token::mint();
        self.delegate_tokens.insert(&rid, m.hash, exp);
        self.redemptions.insert(rid, id.to_string());
        Ok(m.token)
    }

    /// The live grants whose recipient is `principal` (`--to`).
    pub fn for_principal(&self, principal: &str, now_ms: i64) -> Vec<Found> {
        let mut v: Vec<Found> = self
            .grants
            .iter()
            .filter(|(_, g)| g.to == principal && g.expires_at_ms > now_ms)
            .map(|(i, g)| (i.clone(), g.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The record of live grant `id`.
    pub fn get(&self, id: &str) -> Option<&GrantRecord> {
        self.grants.get(id)
    }

    /// Live grants.
    pub fn len(&self) -> usize {
        self.grants.len()
    }

    /// Whether no grant is live.
    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(sid: &str, to: &str, exp: i64) -> GrantRecord {
        GrantRecord {
            session_id: sid.into(),
            grantor: "local:root".into(),
            label: "l".into(),
            to: to.into(),
            expires_at_ms: exp,
            chain: vec![],
        }
    }

    #[test]
    fn tokens_name_grants_until_they_end() {
        let mut r = GrantRegistry::default();
        let t = r.add("g1", rec("s1", "", i64::MAX)).unwrap();
        assert_eq!(t.len(), 43);
        assert!(r.add("g1", rec("s1", "", i64::MAX)).is_err(), "ids are unique");
        assert_eq!(r.by_share_token(&t, 0).unwrap().0, "g1");
        assert!(r.by_share_token("nope", 0).is_none());
        let d = r.redeem("g1").unwrap();
        assert_eq!(r.by_delegate_token(&d, 0).unwrap().0, "g1");
        assert!(r.by_share_token(&d, 0).is_none(), "a delegate token is no share token");
        assert!(r.by_delegate_token(&t, 0).is_none(), "a share token is no delegate token");
        r.end("g1");
        assert!(r.by_share_token(&t, 0).is_none());
        assert!(r.by_delegate_token(&d, 0).is_none(), "redemptions end with their grant");
        assert!(r.redeem("g1").is_err());
    }

    #[test]
    fn expiry_recipients_and_session_end() {
        let mut r = GrantRegistry::default();
        let t = r.add("g1", rec("s1", "", 1000)).unwrap();
        assert!(r.by_share_token(&t, 999).is_some());
        assert!(r.by_share_token(&t, 1000).is_none(), "expired at expires_at_ms");
        assert_eq!(r.add("g2", rec("s1", "local:alice", 5000)).unwrap(), "", "no token for a principal grant");
        r.add("g3", rec("s2", "local:alice", 5000)).unwrap();
        let ids: Vec<String> = r.for_principal("local:alice", 0).into_iter().map(|f| f.0).collect();
        assert_eq!(ids, ["g2", "g3"]);
        assert!(r.for_principal("local:alice", 5000).is_empty());
        let mut ended = r.end_session("s1");
        ended.sort();
        assert_eq!(ended, ["g1", "g2"]);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn one_grant_cannot_take_every_redemption() {
        let mut r = GrantRegistry::default();
        r.add("g1", rec("s1", "", i64::MAX)).unwrap();
        r.add("g2", rec("s1", "", i64::MAX)).unwrap();
        for _ in 0..MAX_REDEMPTIONS_PER_GRANT {
            r.redeem("g1").unwrap();
        }
        assert!(r.redeem("g1").unwrap_err().contains("too many"));
        assert!(r.redeem("g2").is_ok(), "another grant still redeems");
        r.end("g1");
        r.add("g3", rec("s1", "", i64::MAX)).unwrap();
        assert!(r.redeem("g3").is_ok());
    }

    #[test]
    fn a_session_has_a_bounded_number_of_grants() {
        let mut r = GrantRegistry::default();
        for i in 0..MAX_GRANTS_PER_SESSION {
            r.add(&format!("g{i}"), rec("s1", "", i64::MAX)).unwrap();
        }
        assert!(r.add("gx", rec("s1", "", i64::MAX)).is_err());
        assert!(r.add("gy", rec("s2", "", i64::MAX)).is_ok(), "other sessions unaffected");
    }
}
