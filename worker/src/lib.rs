//! capvisor's per-session worker (DESIGN.md, "Processes and the capability
//! graph"): one process per session, spawned by the broker at login with
//! the session's immutable [`capvisor_manifest::SessionContext`] (in a memfd). It serves
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
//! - [`caps`]: `Session`, `CapSet` (kept caps), `Worker`.
//! - [`grants`]: `Shares`: grants of narrowed caps, their tree and revocation.
//! - [`vms`]: `VmFactory`, `Vm`, VM lifecycle (spawning `capvisor-vmm`).
//! - [`wrap`]: the membrane: revocable wrappers around guest `Process`,
//!   `Files`, `ByteSink`s, and the broker's `Accounts`.
//! - [`volumes`], [`secrets`]: the principal's volumes and secrets, kept
//!   by the broker.
//! - [`audit`]: `Audit`, the install's audit log (kept by the broker).
//! - [`launch`]: [`launch::VmLauncher`], starting a VM's vmm.
//! - [`serve`]: the worker's main loop (broker connection, attached clients).

pub mod approvals;
pub mod audit;
pub mod caps;
pub mod grants;
pub mod launch;
pub mod narrow;
pub mod narrow_net;
pub mod narrow_vms;
pub mod proxy;
pub mod secrets;
pub mod serve;
pub mod state;
pub mod vms;
pub mod volumes;
pub mod wrap;
