//! Shared RPC plumbing for capvisor's processes (DESIGN.md, "Layout": one
//! small crate, not copied per process).
//!
//! - [`attach`]: the gateway socket's connection preamble (RPC or attach-by-token).
//! - [`conn`]: capnp-rpc over Unix sockets / socketpairs with bounded
//!   [`capnp::message::ReaderOptions`], and a single-threaded runtime helper.
//! - [`exec`]: [`exec::ExecRequest`], the Rust form of `ExecSpec`.
//! - [`decisions`]: things waiting for a person's decision (`Approvals`).
//! - [`error`]: the typed domain error ([`CvError`]) and its one encoding
//!   in Cap'n Proto exceptions.
//! - [`sink`]: `ByteSink` servers and a pump from any `AsyncRead` into a sink.
//! - [`host`]: host facts (hardware KVM usable?) and engine resolution.
//! - [`hostglob`]: host globs (`NetRule.host`): validation and matching.
//! - [`secrets`]: the secret placeholder and the `Secrets` bounds.
//! - [`names`]: schema names of `Engine` and `VmState`.
//! - [`principal`]: [`principal::Principal`], who a session belongs to.
//! - [`vmconfig`]: [`vmconfig::VmConfig`], what a worker asks its vmm to run.
//! - [`fdpass`]: passing a file descriptor with a small tag over a
//!   `SOCK_SEQPACKET` Unix socket (`SCM_RIGHTS`, unix(7)).
//! - [`spawn`]: starting a child process with chosen inherited descriptors
//!   and `PR_SET_PDEATHSIG` so nothing outlives its parent.
//! - [`paths`]: where sockets, state and caches live.

pub mod attach;
pub mod conn;
pub mod decisions;
pub mod disk;
pub mod error;
pub mod exec;
pub mod fdpass;
pub mod host;
pub mod hostglob;
pub mod names;
pub mod paths;
pub mod principal;
pub mod secrets;
pub mod sink;
pub mod spawn;
pub mod vmconfig;

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

/// Now, milliseconds since the Unix epoch (0 before it; `i64::MAX` past
/// what an `i64` holds).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The last `max` bytes of the file at `path` (empty if it cannot be read);
/// reads only those bytes, however large the file is.
pub fn read_tail(path: &std::path::Path, max: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return Vec::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::with_capacity((len - start).min(max) as usize);
    let _ = f.take(max).read_to_end(&mut buf);
    buf
}
