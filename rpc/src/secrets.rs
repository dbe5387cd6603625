//! Shared facts of the `Secrets` capability (`capvisor.capnp`, issue 9):
//! the placeholder a guest sees instead of a secret's value, and the
//! bounds every process checks the same way.

/// Prefix of the placeholder that stands for a secret in a guest: an
/// `ExecSpec.secretEnv` entry sets its variable to
/// `capvisor-secret:<secret name>`, and the session's proxy replaces that
/// text in the headers of an intercepted request whose host matches one of
/// the secret's host globs.
pub const PLACEHOLDER_PREFIX: &str = "capvisor-secret:";

/// Longest secret name, bytes (names are `[A-Za-z0-9_-]{1,64}`).
pub const MAX_NAME: usize = 64;
/// Largest secret value, bytes (8 KiB); the smallest is 1.
pub const MAX_VALUE: usize = 8192;
/// Most host globs of one secret; the fewest is 1.
pub const MAX_HOSTS: usize = 16;
/// Most secrets one principal keeps (quota).
pub const MAX_SECRETS: usize = 64;

/// Whether `name` is a secret name: 1..=[`MAX_NAME`] of `[A-Za-z0-9_-]`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The placeholder for secret `name`: `capvisor-secret:<name>`.
pub fn placeholder(name: &str) -> String {
    format!("{PLACEHOLDER_PREFIX}{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_and_plain() {
        assert!(valid_name("API_token-2"));
        assert!(valid_name(&"a".repeat(MAX_NAME)));
        for bad in ["", "a b", "a/b", "../x", "a.b", "é", "a:b"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(!valid_name(&"a".repeat(MAX_NAME + 1)));
        assert_eq!(placeholder("api"), "capvisor-secret:api");
    }
}
