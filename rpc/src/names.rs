//! The schema names of capvisor's enums, for output, manifests and
//! command lines (`Engine`, `VmState`, `RevokeReason`; `ErrorCode` names live in
//! [`crate::error`], `AuthMethod` names in [`crate::principal`]).

use capvisor_schema::capvisor_capnp::{Engine, VmState};
use capvisor_schema::internal_capnp::RevokeReason;

/// The schema name of an engine (`"auto"`, `"qemu"`, `"kvm"`).
pub fn engine_name(e: Engine) -> &'static str {
    match e {
        Engine::Auto => "auto",
        Engine::Qemu => "qemu",
        Engine::Kvm => "kvm",
    }
}

/// Parses an engine name (the inverse of [`engine_name`]).
///
/// Errors: an unknown name, with the known ones.
pub fn parse_engine(name: &str) -> Result<Engine, String> {
    [Engine::Auto, Engine::Qemu, Engine::Kvm]
        .into_iter()
        .find(|e| engine_name(*e) == name)
        .ok_or_else(|| format!("unknown engine {name:?} (known: auto, qemu, kvm)"))
}

/// The schema name of a VM state (`"starting"`, `"running"`, `"paused"`,
/// `"stopped"`, `"crashed"`).
pub fn vm_state_name(s: VmState) -> &'static str {
    match s {
        VmState::Starting => "starting",
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::Stopped => "stopped",
        VmState::Crashed => "crashed",
    }
}

/// Whether `name` is a valid name for a VM or a volume: 1-32 bytes of
/// `[a-z0-9-]`, starting with a letter or digit (so it is a safe file name
/// component and a safe kernel command line word).
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// The name of a revoke reason, for logs and audit details (`"logout"`,
/// `"expired"`, `"shutdown"`, `"broker gone"`, `"revoked"`).
pub fn revoke_reason_name(r: RevokeReason) -> &'static str {
    match r {
        RevokeReason::Logout => "logout",
        RevokeReason::Expired => "expired",
        RevokeReason::Shutdown => "shutdown",
        RevokeReason::BrokerGone => "broker gone",
        RevokeReason::Revoked => "revoked",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_names() {
        for e in [Engine::Auto, Engine::Qemu, Engine::Kvm] {
            assert_eq!(parse_engine(engine_name(e)), Ok(e));
        }
        assert!(parse_engine("xen").unwrap_err().contains("xen"));
        assert_eq!(vm_state_name(VmState::Paused), "paused");
    }
}
