//! Shared RPC plumbing for capvisor's processes (DESIGN.md, "Layout": one
//! small crate, not copied per process).
//!
//! - [`attach`]: the gateway socket's connection preamble (RPC or attach-by-token).
//! - [`conn`]: capnp-rpc over Unix sockets / socketpairs with bounded
//!   [`capnp::message::ReaderOptions`], and a single-threaded runtime helper.
//! - [`exec`]: [`exec::ExecRequest`], the Rust form of `ExecSpec`.
//! - [`error`]: the typed domain error ([`CvError`], schema `Error`) and
//!   conversions to and from capnp messages.
//! - [`sink`]: `ByteSink` servers and a pump from any `AsyncRead` into a sink.
//! - [`fdpass`]: passing a file descriptor with a small tag over a
//!   `SOCK_SEQPACKET` Unix socket (`SCM_RIGHTS`, unix(7)).
//! - [`spawn`]: starting a child process with chosen inherited descriptors
//!   and `PR_SET_PDEATHSIG` so nothing outlives its parent.
//! - [`paths`]: where sockets, state and caches live.

pub mod attach;
pub mod conn;
pub mod error;
pub mod exec;
pub mod fdpass;
pub mod paths;
pub mod sink;
pub mod spawn;

pub use capvisor_schema as schema;
pub use error::{CvError, CvResult};

/// The largest chunk any capvisor writer puts in one `ByteSink.write`
/// (64 KiB): far below the receive limit, large enough to amortise a call.
pub const CHUNK: usize = 64 * 1024;

/// Installs a `tracing` subscriber writing to stderr, filtered by
/// `CAPVISOR_LOG` (default `info`), with `name` as a prefix so interleaved
/// process logs stay attributable.
pub fn init_logging(name: &'static str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAPVISOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .fmt_fields(tracing_subscriber::fmt::format::DefaultFields::new())
        .event_format(tracing_subscriber::fmt::format().with_target(false).without_time().compact())
        .try_init();
    tracing::debug!(process = name, "logging initialised");
}
