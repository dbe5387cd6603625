//! [`Principal`]: who a session belongs to (schema `Principal`), and the
//! auth method names used in manifests and output.

use capvisor_schema::capvisor_capnp::{principal, AuthMethod};
use std::fmt;

/// Who a session belongs to: how they authenticated and their name within
/// that method. Displayed as `method:name` (`local:alice`, `password:bob`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// How the principal authenticated.
    pub method: AuthMethod,
    /// The name within that method: the Unix user name (or `uid<N>`) for
    /// `local`, the account name for `password`.
    pub name: String,
}

impl Principal {
    /// A principal authenticated by `method` as `name`.
    pub fn new(method: AuthMethod, name: impl Into<String>) -> Self {
        Self { method, name: name.into() }
    }

    /// Encodes into a schema `Principal`.
    pub fn write_to(&self, mut b: principal::Builder<'_>) {
        b.set_method(self.method);
        b.set_name(self.name.as_str());
    }

    /// Decodes a schema `Principal`.
    ///
    /// Errors: an unknown method (a newer peer), a malformed or non-UTF-8 name.
    pub fn read_from(r: principal::Reader<'_>) -> capnp::Result<Self> {
        Ok(Self { method: r.get_method()?, name: crate::error::text(r.get_name())? })
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", method_name(self.method), self.name)
    }
}

/// Every login method, in schema order (`grant` is not one: a delegate
/// session comes from `Gateway.redeem`, never from a manifest `auth` list).
pub const ALL_METHODS: [AuthMethod; 2] = [AuthMethod::Local, AuthMethod::Password];

/// The manifest and display name of an auth method (`"local"`, `"password"`).
pub fn method_name(m: AuthMethod) -> &'static str {
    match m {
        AuthMethod::Local => "local",
        AuthMethod::Password => "password",
        AuthMethod::Grant => "grant",
    }
}

/// Parses an auth method name (the inverse of [`method_name`]).
pub fn parse_method(name: &str) -> Option<AuthMethod> {
    ALL_METHODS.into_iter().find(|m| method_name(*m) == name)
}

/// The credentials of the process at the other end of a connected Unix
/// socket, as the kernel recorded them when it connected: SO_PEERCRED
/// (uid, gid, pid) and SO_PEERGROUPS (its supplementary groups), unix(7),
/// socket(7). Nothing here comes from the peer's own words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// Effective uid of the peer when it connected.
    pub uid: u32,
    /// Its effective (primary) gid.
    pub gid: u32,
    /// Its pid (0 if the kernel gave none, e.g. a peer in another pid namespace).
    pub pid: u32,
    /// Its supplementary groups when it connected (SO_PEERGROUPS, Linux 4.13+).
    pub groups: Vec<u32>,
}

/// The tag prefix under which the gateway passes the broker a client's
/// socket for one login call on its attach channel: `login:<conn>`, where
/// `conn` (32 hex digits, fresh per call) is what the call names (schema
/// `Broker`). Attach tokens never start with it (the gateway refuses them).
pub const LOGIN_SOCKET_TAG: &str = "login:";

/// Most supplementary groups [`PeerCred::of_socket`] reads (the kernel's
/// NGROUPS_MAX is 65536; more than this many are cut).
pub const MAX_PEER_GROUPS: usize = 4096;

impl PeerCred {
    /// Reads the credentials of `fd`'s peer (see the type's docs).
    ///
    /// Errors: `fd` is not a connected Unix socket (SO_PEERCRED fails). A
    /// kernel without SO_PEERGROUPS gives an empty `groups` (logged).
    pub fn of_socket(fd: &impl std::os::fd::AsFd) -> std::io::Result<Self> {
        use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
        use std::os::fd::AsRawFd;
        let c = getsockopt(fd, PeerCredentials).map_err(std::io::Error::from)?;
        let mut groups = vec![0 as libc::gid_t; 64];
        loop {
            let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
            // SAFETY: `groups` is a live buffer of `len` bytes; the kernel
            // writes at most `len` bytes and sets `len` to what it needs.
            let rc = unsafe {
                libc::getsockopt(
                    fd.as_fd().as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_PEERGROUPS,
                    groups.as_mut_ptr().cast(),
                    &mut len,
                )
            };
            let n = len as usize / std::mem::size_of::<libc::gid_t>();
            if rc == 0 {
                groups.truncate(n);
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) && n > groups.len() && n <= MAX_PEER_GROUPS {
                groups.resize(n, 0);
                continue;
            }
            tracing::warn!("SO_PEERGROUPS failed ({e}); using the peer's primary group only");
            groups.clear();
            break;
        }
        Ok(Self { uid: c.uid(), gid: c.gid(), pid: c.pid().max(0) as u32, groups })
    }

    /// Whether the peer had group `gid`, as its primary or a supplementary group.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

impl fmt::Display for PeerCred {
    /// `unix:uid=U pid=P`, how a client appears in audit lines and throttle
    /// keys (the throttle keys on the part before the space).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unix:uid={} pid={}", self.uid, self.pid)
    }
}

/// Resolves a group given by name or as a decimal gid (`"capvisor-users"`,
/// `"1001"`) from the group database (getgrnam(3)).
///
/// Errors: a name the group database does not know (or cannot be read).
pub fn resolve_group(group: &str) -> std::io::Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("no group named {group:?}"))),
        Err(e) => Err(std::io::Error::other(format!("looking up group {group:?}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_round_trip() {
        let p = Principal::new(AuthMethod::Password, "bob");
        assert_eq!(p.to_string(), "password:bob");
        let mut m = capnp::message::Builder::new_default();
        p.write_to(m.init_root());
        assert_eq!(Principal::read_from(m.get_root_as_reader().unwrap()).unwrap(), p);
        for m in ALL_METHODS {
            assert_eq!(parse_method(method_name(m)), Some(m));
        }
        assert_eq!(parse_method("kerberos"), None);
    }

    #[test]
    fn peer_credentials_come_from_the_kernel() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let c = PeerCred::of_socket(&a).unwrap();
        assert_eq!(c.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(c.gid, nix::unistd::getegid().as_raw());
        assert_eq!(c.pid, std::process::id());
        let mut mine: Vec<u32> = nix::unistd::getgroups().unwrap().iter().map(|g| g.as_raw()).collect();
        let mut got = c.groups.clone();
        mine.sort();
        got.sort();
        assert_eq!(got, mine, "SO_PEERGROUPS lists our supplementary groups");
        assert!(c.in_group(c.gid));
        assert_eq!(c.to_string(), format!("unix:uid={} pid={}", c.uid, c.pid));
        let f = tempfile::tempfile().unwrap();
        assert!(PeerCred::of_socket(&f).is_err(), "a file has no peer");
    }

    #[test]
    fn groups_by_name_or_number() {
        assert_eq!(resolve_group("0").unwrap(), 0);
        assert_eq!(resolve_group("root").unwrap(), 0);
        assert_eq!(resolve_group("no-such-group-xyz").unwrap_err().kind(), std::io::ErrorKind::NotFound);
    }
}
