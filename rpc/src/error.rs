//! The typed domain error of every capvisor interface (DESIGN.md, "Errors").
//!
//! Transport loss is `capnp::ErrorKind::Disconnected`; infrastructure
//! failures are capnp exceptions; domain outcomes (denied, not found, quota,
//! stale session, wrong interface, ...) are a result union carrying the
//! schema's `Error { code, message }`, represented here by [`CvError`].

use capvisor_schema::common_capnp::{error, ErrorCode};
use std::fmt;

/// A domain outcome: a stable [`ErrorCode`] clients match on, and a message
/// for people. The message never carries a secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CvError {
    /// Stable code (schema `ErrorCode`).
    pub code: ErrorCode,
    /// Human-readable; not an API.
    pub message: String,
}

/// Result alias for domain operations.
pub type CvResult<T> = Result<T, CvError>;

impl CvError {
    /// A new error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
    /// `denied`: authentication failed or the bundle does not allow it.
    pub fn denied(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Denied, message)
    }
    /// `notFound`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    /// `quota`: a bundle limit would be exceeded.
    pub fn quota(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Quota, message)
    }
    /// `staleSession`: logged out, expired or revoked.
    pub fn stale() -> Self {
        Self::new(ErrorCode::StaleSession, "the session has ended (logged out, expired or revoked)")
    }
    /// `invalidArgument`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }
    /// `unavailable`: a backend failed.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }
    /// `internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    /// Writes this error into a schema `Error` builder (usually a result
    /// union's `init_err()`).
    pub fn write_to(&self, mut b: error::Builder<'_>) {
        b.set_code(self.code);
        b.set_message(self.message.as_str());
    }

    /// Reads a schema `Error`. An unknown code (a newer peer) becomes
    /// `internal` with the message kept.
    pub fn read_from(r: error::Reader<'_>) -> capnp::Result<Self> {
        let code = r.get_code().unwrap_or(ErrorCode::Internal);
        let message = r.get_message()?.to_string().unwrap_or_default();
        Ok(Self { code, message })
    }

    /// The stable lower-camel name of the code, as in the schema
    /// (e.g. `"staleSession"`); used in audit events and CLI output.
    pub fn code_name(&self) -> &'static str {
        code_name(self.code)
    }
}

/// The schema name of `code` (e.g. `ErrorCode::Quota` -> `"quota"`).
pub fn code_name(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Denied => "denied",
        ErrorCode::NotFound => "notFound",
        ErrorCode::WrongInterface => "wrongInterface",
        ErrorCode::Quota => "quota",
        ErrorCode::StaleSession => "staleSession",
        ErrorCode::InvalidArgument => "invalidArgument",
        ErrorCode::AlreadyExists => "alreadyExists",
        ErrorCode::Unavailable => "unavailable",
        ErrorCode::Internal => "internal",
        ErrorCode::NotRunning => "notRunning",
    }
}

impl fmt::Display for CvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code_name(), self.message)
    }
}

impl std::error::Error for CvError {}

/// Maps an infrastructure error into a capnp exception (`failed`), for the
/// paths that are not domain outcomes.
pub fn failed(e: impl fmt::Display) -> capnp::Error {
    capnp::Error::failed(e.to_string())
}

/// Writes `res` into a result union: `Ok` via `ok`, `Err` into the builder
/// `init_err()` returns. Use as
/// `write_result!(results.get().init_result(), res, |b, v| b.set_vm(v))`.
#[macro_export]
macro_rules! write_result {
    ($builder:expr, $res:expr, |$b:ident, $v:ident| $ok:expr) => {{
        let mut $b = $builder;
        match $res {
            Ok($v) => {
                $ok;
            }
            Err(e) => {
                let e: $crate::CvError = e;
                e.write_to($b.init_err());
            }
        }
    }};
}
