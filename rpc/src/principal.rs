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

/// Every auth method, in schema order.
pub const ALL_METHODS: [AuthMethod; 2] = [AuthMethod::Local, AuthMethod::Password];

/// The manifest and display name of an auth method (`"local"`, `"password"`).
pub fn method_name(m: AuthMethod) -> &'static str {
    match m {
        AuthMethod::Local => "local",
        AuthMethod::Password => "password",
    }
}

/// Parses an auth method name (the inverse of [`method_name`]).
pub fn parse_method(name: &str) -> Option<AuthMethod> {
    ALL_METHODS.into_iter().find(|m| method_name(*m) == name)
}

/// How a connecting client appears in audit lines and throttle keys:
/// `unix:uid=U pid=P` (the throttle keys on the part before the space), or
/// `""` when the gateway saw nothing (schema `Peer`, internal.capnp).
///
/// Errors: a malformed message.
pub fn peer_text(p: capvisor_schema::internal_capnp::peer::Reader<'_>) -> capnp::Result<String> {
    use capvisor_schema::internal_capnp::peer;
    Ok(match p.which()? {
        peer::Unknown(()) => String::new(),
        peer::Unix(c) => {
            let c = c?;
            format!("unix:uid={} pid={}", c.get_uid(), c.get_pid())
        }
    })
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
}
