//! capvisor's per-session worker (DESIGN.md, "Processes and the capability
//! graph"): one process per session, spawned by the broker at login with
//! the session's immutable [`capvisor_manifest::SessionContext`]. It serves
//! `Session`, `CapSet`, `VmFactory`, `Vm`, `Process`, `Files` and `Accounts`
//! to clients that attached through the gateway, and talks to each VM's
//! guest-init directly over the VM's agent channel.
//!
//! Every capability it hands out checks the session's revocation state
//! ([`state::SessionState::check`]) before doing anything, so logout,
//! expiry and shutdown make every cap answer `staleSession` at once; calls
//! in flight are cut off too ([`state::SessionState::guard`]).
//!
//! - [`state`]: session state, revocation, audit.
//! - [`caps`]: `Session`, `CapSet`, `Worker`.
//! - [`vms`]: `VmFactory`, `Vm`, VM lifecycle (spawning `capvisor-vmm`).
//! - [`wrap`]: revocable wrappers around guest `Process`, `Files`,
//!   `ByteSink`, and the broker's `Accounts`.

pub mod caps;
pub mod state;
pub mod vms;
pub mod wrap;
