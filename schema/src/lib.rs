//! capvisor's Cap'n Proto schema, generated at build time from
//! `schema/capnp/*.capnp` (see those files for the contract).
//!
//! - [`common_capnp`]: `Error`/`ErrorCode`, `ByteSink`, `Process`, `Files`, `ExecSpec`.
//! - [`guest_capnp`]: `Guest`, served by guest-init inside the VM.
//! - [`capvisor_capnp`]: the client-facing `Gateway`, `Session`, `CapSet`,
//!   `VmFactory`, `Vm`, `Accounts`.
//! - [`internal_capnp`]: `Broker`, `SessionHost`, `Worker`, `Machine`.
#![allow(clippy::all)]
#![allow(missing_docs)]

pub mod common_capnp {
    include!(concat!(env!("OUT_DIR"), "/common_capnp.rs"));
}
pub mod guest_capnp {
    include!(concat!(env!("OUT_DIR"), "/guest_capnp.rs"));
}
pub mod capvisor_capnp {
    include!(concat!(env!("OUT_DIR"), "/capvisor_capnp.rs"));
}
pub mod internal_capnp {
    include!(concat!(env!("OUT_DIR"), "/internal_capnp.rs"));
}
