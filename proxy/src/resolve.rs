//! Name resolution for upstream connections and the check of the
//! addresses it yields.
//!
//! The proxy resolves a name itself (the guest only says which name it
//! meant), then judges each address, and connects to exactly an address it
//! judged: a name cannot be re-resolved to something else between check
//! and connect (no DNS rebinding).
//!
//! Resolution ([`Resolver::resolve`]): a dotted IPv4 literal is used as is;
//! a name listed in `ProxyConfig.resolve` gets its listed addresses; any
//! other name goes to the system resolver (getaddrinfo(3) through
//! `tokio::net::lookup_host`), bounded by [`RESOLVE_TIMEOUT`].
//!
//! Addresses no rule may reach by wildcard ([`non_public`]): loopback,
//! private (RFC 1918, RFC 4193 fc00::/7), link-local (RFC 3927
//! 169.254.0.0/16, which holds the cloud metadata address
//! 169.254.169.254; RFC 4291 fe80::/10), unspecified, multicast,
//! broadcast and the rest of 240.0.0.0/4 (RFC 1112), shared address space
//! (RFC 6598 100.64.0.0/10), benchmarking (RFC 2544 198.18.0.0/15, also
//! the guest's own fake DNS answers), "this network" 0.0.0.0/8; IPv6
//! addresses that embed an IPv4 one (IPv4-mapped ::ffff:0:0/96, NAT64
//! 64:ff9b::/96, RFC 6052) are judged by it. Only a rule that names the
//! host exactly (`crate::policy::Decision::explicit`) reaches them.

use crate::policy::{ipv4_literal, valid_dns_name};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// How long one system-resolver lookup may take.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Addresses of one name kept (and tried at connect, in order).
pub const MAX_ADDRESSES: usize = 8;
/// Names in `ProxyConfig.resolve`.
pub const MAX_OVERRIDES: usize = 1024;

/// Why `ip` is not a public unicast address, or `None` when it is.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    Some(match (a, b) {
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_broadcast() => "broadcast",
        (0, _) => "\"this network\" (0.0.0.0/8)",
        (127, _) => "loopback",
        (10, _) => "private (10.0.0.0/8)",
        (172, 16..=31) => "private (172.16.0.0/12)",
        (192, 168) => "private (192.168.0.0/16)",
        (169, 254) => "link-local (169.254.0.0/16, cloud metadata)",
        (100, 64..=127) => "shared address space (100.64.0.0/10)",
        (198, 18..=19) => "benchmarking (198.18.0.0/15)",
        (224..=239, _) => "multicast",
        (240..=255, _) => "reserved (240.0.0.0/4)",
        _ => return None,
    })
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return non_public_v4(v4);
    }
    let s = ip.segments();
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        let o = ip.octets();
        return non_public_v4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    Some(match s[0] {
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_loopback() => "loopback",
        x if x & 0xfe00 == 0xfc00 => "private (fc00::/7)",
        x if x & 0xffc0 == 0xfe80 => "link-local (fe80::/10)",
        x if x & 0xff00 == 0xff00 => "multicast",
        _ => return None,
    })
}

/// The addresses of `addrs` a decision may connect to: all of them when
/// `explicit` (the deciding rule names the host), else the public ones.
///
/// Errors: none is allowed; the message names the first address and why
/// (`127.0.0.1 is loopback`).
pub fn allowed_addresses(addrs: &[IpAddr], explicit: bool) -> Result<Vec<IpAddr>, (IpAddr, String)> {
    if explicit {
        return Ok(addrs.to_vec());
    }
    let ok: Vec<IpAddr> = addrs.iter().copied().filter(|ip| non_public(*ip).is_none()).collect();
    match (ok.is_empty(), addrs.first()) {
        (false, _) => Ok(ok),
        (true, Some(first)) => {
            let why = non_public(*first).unwrap_or("not allowed");
            Err((*first, format!("{first} is {why}; only a rule naming the host exactly reaches it")))
        }
        (true, None) => Err((IpAddr::V4(Ipv4Addr::UNSPECIFIED), "no address".into())),
    }
}

/// Resolves upstream names (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct Resolver {
    overrides: HashMap<String, Vec<IpAddr>>,
}

impl Resolver {
    /// A resolver answering each `(name, addresses)` of `overrides` itself.
    ///
    /// Errors: more than [`MAX_OVERRIDES`] names, a name that is not a DNS
    /// name, a name without addresses or with more than [`MAX_ADDRESSES`].
    pub fn new(overrides: Vec<(String, Vec<IpAddr>)>) -> anyhow::Result<Self> {
        anyhow::ensure!(overrides.len() <= MAX_OVERRIDES, "more than {MAX_OVERRIDES} resolve overrides");
        let mut map = HashMap::new();
        for (name, addrs) in overrides {
            let name = name.to_ascii_lowercase();
            anyhow::ensure!(valid_dns_name(&name), "resolve override {name:?} is not a DNS name");
            anyhow::ensure!(
                !addrs.is_empty() && addrs.len() <= MAX_ADDRESSES,
                "resolve override {name:?} needs 1..={MAX_ADDRESSES} addresses"
            );
            map.insert(name, addrs);
        }
        Ok(Self { overrides: map })
    }

    /// The addresses `host` stands for, in the resolver's order, at most
    /// [`MAX_ADDRESSES`]. `host` is a lower-case DNS name or a dotted IPv4
    /// literal; `port` is passed to getaddrinfo only.
    ///
    /// Errors (a message for NetLog): not a name or literal, no address,
    /// resolver failure or timeout.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<IpAddr>, String> {
        if let Some(ip) = ipv4_literal(host) {
            return Ok(vec![IpAddr::V4(ip)]);
        }
        if !valid_dns_name(host) {
            return Err(format!("{host:?} is not a DNS name or a dotted IPv4 address"));
        }
        if let Some(addrs) = self.overrides.get(host) {
            return Ok(addrs.clone());
        }
        let found = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| format!("{host} did not resolve within {} s", RESOLVE_TIMEOUT.as_secs()))?
            .map_err(|e| format!("{host} does not resolve: {e}"))?;
        let mut out: Vec<IpAddr> = Vec::new();
        for a in found {
            if !out.contains(&a.ip()) && out.len() < MAX_ADDRESSES {
                out.push(a.ip());
            }
        }
        if out.is_empty() {
            return Err(format!("{host} has no address"));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn non_public_ranges() {
        for (a, want) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("10.2.3.4", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "shared"),
            ("100.127.255.254", "shared"),
            ("198.18.0.1", "benchmarking"),
            ("198.19.255.1", "benchmarking"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "this network"),
            ("255.255.255.255", "broadcast"),
            ("224.0.0.1", "multicast"),
            ("240.0.0.1", "reserved"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fd00::1", "private"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "link-local"),
            ("64:ff9b::a00:1", "private"),
        ] {
            let why = non_public(ip(a)).unwrap_or_else(|| panic!("{a} must not be public"));
            assert!(why.contains(want), "{a}: {why}");
        }
        for a in
            ["1.1.1.1", "172.32.0.1", "100.128.0.1", "198.20.0.1", "2001:db8::1", "2606:4700::1111", "64:ff9b::101:101"]
        {
            assert_eq!(non_public(ip(a)), None, "{a}");
        }
    }

    #[test]
    fn wildcard_decisions_keep_only_public_addresses() {
        let mixed = [ip("10.0.0.1"), ip("93.184.216.34")];
        assert_eq!(allowed_addresses(&mixed, false).unwrap(), vec![ip("93.184.216.34")]);
        assert_eq!(allowed_addresses(&mixed, true).unwrap(), mixed.to_vec());
        let (first, why) = allowed_addresses(&[ip("127.0.0.1")], false).unwrap_err();
        assert_eq!(first, ip("127.0.0.1"));
        assert!(why.contains("loopback"), "{why}");
    }

    #[test]
    fn overrides_literals_and_bad_names() {
        crate::test_runtime(async {
            let r = Resolver::new(vec![("API.test".into(), vec![ip("127.0.0.1")])]).unwrap();
            assert_eq!(r.resolve("api.test", 80).await.unwrap(), vec![ip("127.0.0.1")]);
            assert_eq!(r.resolve("10.9.8.7", 80).await.unwrap(), vec![ip("10.9.8.7")]);
            assert!(r.resolve("bad name", 80).await.is_err());
        });
        assert!(Resolver::new(vec![("a b".into(), vec![ip("127.0.0.1")])]).is_err());
        assert!(Resolver::new(vec![("a.test".into(), vec![])]).is_err());
    }
}
