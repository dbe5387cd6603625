//! capvisor's host-client library: what the `capvisor` CLI, a GUI or an
//! agent runner use to log in at the gateway, attach to a session, and
//! drive its capabilities with typed errors.
//!
//! All functions are `async` and not `Send` (capnp-rpc): run them inside a
//! `tokio::task::LocalSet` on a current-thread runtime, e.g.
//! [`capvisor_rpc::conn::run_local`].
//!
//! - [`error`]: [`ClientError`] and the CLI exit code of each error code.
//! - [`connect`]: gateway login and attach-by-token (see
//!   `capvisor_rpc::attach` for the wire preamble).
//! - [`config`]: the saved login (resume token) in `CAPVISOR_CONFIG_DIR`.
//! - [`stream`]: composed operations: exec with streamed output and stdin,
//!   an interactive pty session, copies between host and guest files.
//! - [`ops`]: typed helpers over `CapSet`, `VmFactory`, `Vm`, `Process`,
//!   `Files`, `Accounts`.
//! - [`dynamic`]: any method of any cap by name, params and results as
//!   JSON, through the embedded schema (`capvisor call`, the MCP server).

pub mod config;
pub mod connect;
pub mod dynamic;
pub mod error;
pub mod ops;
pub mod stream;

pub use capvisor_rpc::schema;
pub use error::{ClientError, ClientResult};
