//! capvisor's Cap'n Proto schema, generated at build time from
//! `schema/capnp/*.capnp` (see those files for the contract).
//!
//! - [`common_capnp`]: `Error`/`ErrorCode`, `ByteSink`, `Process`, `Files`, `ExecSpec`.
//! - [`guest_capnp`]: `Guest`, served by guest-init inside the VM.
//! - [`capvisor_capnp`]: the client-facing `Gateway`, `Session`, `CapSet`,
//!   `VmFactory`, `Vm`, `Accounts`.
//! - [`internal_capnp`]: `Broker`, `SessionHost`, `Worker`, `Machine`.
//! - [`reflect`]: run-time reflection over [`SCHEMA_BIN`] (interfaces,
//!   methods, fields, doc comments; JSON Schema of a struct).
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

pub mod reflect;

/// The `capnp` compiler's raw `CodeGeneratorRequest` (capnp's
/// `schema.capnp`, serialized unpacked with its segment table) for
/// `common.capnp`, `guest.capnp`, `capvisor.capnp` and `internal.capnp`
/// and their imports, written by build.rs at compile time: every node with
/// its doc comments (`sourceInfo`). [`reflect`] reads it.
pub const SCHEMA_BIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/schema.bin"));
