//! Host globs as `NetRule.host` has them (`capvisor.capnp`): `*`, `*.<domain>`,
//! a DNS name or a dotted IPv4 literal. One home for the proxy's egress
//! rules and the broker's secret hosts (`Secrets.put`), so both accept and
//! match exactly the same globs.

use std::net::Ipv4Addr;

/// Longest DNS name (RFC 1035 2.3.4: 255 octets on the wire, 253 as text).
pub const MAX_HOST: usize = 253;

/// Whether `name` is a DNS name capvisor accepts: 1..=253 bytes of
/// dot-separated labels of 1..=63 `[A-Za-z0-9_-]`, no label starting or
/// ending with `-`, and a last label that is not all digits (so it can
/// never be read as an IPv4 literal; RFC 1123 2.1, RFC 3696 2).
pub fn valid_dns_name(name: &str) -> bool {
    if name.is_empty() || name.len() > MAX_HOST {
        return false;
    }
    let labels: Vec<&str> = name.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    labels.iter().all(label_ok) && !labels.last().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

/// A dotted-quad IPv4 literal (`a.b.c.d`, decimal, no leading zeros), as
/// `Ipv4Addr`'s parser reads it.
pub fn ipv4_literal(s: &str) -> Option<Ipv4Addr> {
    s.parse().ok()
}

/// Whether `glob` is a valid host glob: `"*"`, `"*.<DNS name>"`, a DNS name
/// ([`valid_dns_name`]) or a dotted IPv4 literal ([`ipv4_literal`]).
pub fn valid_glob(glob: &str) -> bool {
    glob == "*"
        || glob.strip_prefix("*.").is_some_and(valid_dns_name)
        || valid_dns_name(glob)
        || ipv4_literal(glob).is_some()
}

/// Whether host glob `glob` matches `host`, ignoring ASCII case: `*`
/// matches any host, `*.example.org` any name ending in `.example.org`
/// (not `example.org` itself), anything else only the equal host.
pub fn host_matches(glob: &str, host: &str) -> bool {
    if glob == "*" {
        return true;
    }
    if let Some(suffix) = glob.strip_prefix("*.") {
        let (h, s) = (host.as_bytes(), suffix.as_bytes());
        return h.len() > s.len() + 1
            && h[h.len() - s.len() - 1] == b'.'
            && h[h.len() - s.len()..].eq_ignore_ascii_case(s);
    }
    glob.eq_ignore_ascii_case(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_subdomains_not_the_apex_nor_lookalikes() {
        assert!(host_matches("*", "anything.example"));
        assert!(host_matches("*.example.org", "a.b.EXAMPLE.org"));
        assert!(!host_matches("*.example.org", "example.org"));
        assert!(!host_matches("*.example.org", "badexample.org"));
        assert!(!host_matches("api.test", "api.test.evil"));
        assert!(host_matches("Api.Test", "api.test"));
    }

    #[test]
    fn only_wellformed_globs_are_valid() {
        for ok in ["*", "*.example.org", "api.test", "10.1.2.3", "_x.test"] {
            assert!(valid_glob(ok), "{ok}");
        }
        for bad in ["", "*.", "**", "a*.test", "*.*.test", "a..b", "-a.test", "1.2.3", "api.test/x", "a b"] {
            assert!(!valid_glob(bad), "{bad}");
        }
    }
}
