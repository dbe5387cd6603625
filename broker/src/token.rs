//! Session ids and resume tokens (DESIGN.md, "Authority rules": sturdy refs
//! are random, stored hashed with SHA-256 (FIPS 180-4), compared in constant
//! time, and expire).
//!
//! A resume token is 32 bytes from the OS RNG, base64url without padding
//! (RFC 4648 §5): 43 characters. Only its SHA-256 is kept.

use base64::Engine;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use subtle::ConstantTimeEq;

/// SHA-256 of a token.
pub type TokenHash = [u8; 32];

/// A freshly minted resume token and its hash.
pub struct Minted {
    /// The secret, for the client only (base64url, no padding).
    pub token: String,
    /// What the broker stores.
    pub hash: TokenHash,
}

/// Mints a resume token from 32 random bytes ([`rand::rngs::OsRng`]).
pub fn mint() -> Minted {
    use rand::RngCore;
    let mut raw = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let hash = hash(&token);
    Minted { token, hash }
}

/// SHA-256 of the token's text.
pub fn hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// A new session id: 16 random bytes, lower-case hex (32 characters). Not a
/// credential: it names the session in logs, audit lines and run dirs.
pub fn new_session_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

struct Entry {
    hash: TokenHash,
    expires_at_ms: i64,
}

/// Live resume tokens by session id: hash and expiry.
#[derive(Default)]
pub struct TokenIndex {
    entries: HashMap<String, Entry>,
}

impl TokenIndex {
    /// Registers session `id`'s token hash, valid until `expires_at_ms`
    /// (exclusive, Unix epoch milliseconds).
    pub fn insert(&mut self, id: &str, hash: TokenHash, expires_at_ms: i64) {
        self.entries.insert(id.to_string(), Entry { hash, expires_at_ms });
    }

    /// Forgets session `id`'s token (logout, revocation, worker exit).
    /// Returns whether it was there.
    pub fn remove(&mut self, id: &str) -> bool {
        self.entries.remove(id).is_some()
    }

    /// Number of live tokens.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no token is live.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The session whose token is `token`, if it has not expired at `now_ms`.
    ///
    /// Hashes `token` and compares it against every stored hash in
    /// constant time (`subtle`), without stopping at a match, so timing
    /// tells nothing about how much of a guess was right or where it sits.
    pub fn lookup(&self, token: &str, now_ms: i64) -> Option<String> {
        let h = hash(token);
        let mut found: Option<(&String, &Entry)> = None;
        for (id, e) in &self.entries {
            if bool::from(e.hash.ct_eq(&h)) {
                found = Some((id, e));
            }
        }
        found.filter(|(_, e)| now_ms < e.expires_at_ms).map(|(id, _)| id.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_base64url_and_hashed() {
        let a = mint();
        let b = mint();
        assert_ne!(a.token, b.token);
        assert_eq!(a.token.len(), 43);
        assert!(a.token.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_eq!(a.hash, hash(&a.token));
        // SHA-256 of "abc" (FIPS 180-4 example).
        assert_eq!(hex::encode(hash("abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let id = new_session_id();
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn lookup_expiry_and_removal() {
        let mut idx = TokenIndex::default();
        let a = mint();
        let b = mint();
        idx.insert("s1", a.hash, 1_000);
        idx.insert("s2", b.hash, 2_000);
        assert_eq!(idx.lookup(&a.token, 999).as_deref(), Some("s1"));
        assert_eq!(idx.lookup(&b.token, 999).as_deref(), Some("s2"));
        assert_eq!(idx.lookup(&a.token, 1_000), None, "expired at expires_at_ms");
        assert_eq!(idx.lookup("not-a-token", 0), None);
        assert_eq!(idx.lookup(&a.token[..42], 0), None, "a prefix is no token");
        assert!(idx.remove("s2"));
        assert_eq!(idx.lookup(&b.token, 0), None);
        assert!(!idx.remove("s2"));
        assert_eq!(idx.len(), 1);
    }
}
