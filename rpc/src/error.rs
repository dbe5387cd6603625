//! The typed domain error of every capvisor interface and the one place it
//! is encoded into, and parsed out of, Cap'n Proto exceptions (DESIGN.md,
//! "Errors"; the rule is written in `schema/capnp/common.capnp` and
//! docs/decisions.md, "Errors ride exceptions").
//!
//! Transport loss is `capnp::ErrorKind::Disconnected`; infrastructure
//! failures are other capnp exceptions; domain outcomes (denied, not found,
//! quota, stale session, wrong interface, ...) are exceptions of kind
//! `failed` whose reason starts with `[capvisor:<code>] `. Because they are
//! exceptions, a method can return a capability directly and a client can
//! pipeline on it; a pipelined call whose target failed fails with the
//! first failure's exception, code included.

use capvisor_schema::common_capnp::ErrorCode;
use std::fmt;

/// The text that opens an encoded domain error inside an exception reason:
/// `[capvisor:` + code name + `] ` + message.
pub const MARKER: &str = "[capvisor:";

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
    /// `notRunning`: the VM is stopped.
    pub fn not_running(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotRunning, message)
    }
    /// `inUse`: held by someone else (a volume attached read-write).
    pub fn in_use(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InUse, message)
    }

    /// The stable lower-camel name of the code, as in the schema
    /// (e.g. `"staleSession"`); used on the wire, in audit events and CLI output.
    pub fn code_name(&self) -> &'static str {
        code_name(self.code)
    }

    /// Encodes this error as the exception a server method returns:
    /// kind `failed`, reason `[capvisor:<code>] <message>`.
    pub fn to_rpc(&self) -> capnp::Error {
        capnp::Error::failed(format!("{MARKER}{}] {}", self.code_name(), self.message))
    }

    /// Decodes a domain error from an exception, wherever the marker stands
    /// in its reason (capnp-rpc prefixes forwarded reasons with
    /// `remote exception: `). `None` for transport loss and for exceptions
    /// without the marker (infrastructure failures). An unknown code name
    /// (a newer peer) decodes as `internal` with the whole reason kept.
    pub fn from_rpc(e: &capnp::Error) -> Option<Self> {
        if e.kind == capnp::ErrorKind::Disconnected {
            return None;
        }
        let at = e.extra.find(MARKER)?;
        let rest = &e.extra[at + MARKER.len()..];
        let Some((name, message)) = rest.split_once(']') else {
            return Some(Self::internal(e.extra.clone()));
        };
        let message = message.strip_prefix(' ').unwrap_or(message).to_string();
        Some(match code_from_name(name) {
            Some(code) => Self { code, message },
            None => Self::internal(format!("unknown error code {name:?}: {message}")),
        })
    }

    /// Relays an exception from another capvisor process: a domain error
    /// keeps its code (re-encoded once, without transport prefixes);
    /// anything else becomes the domain error `otherwise` makes of it.
    pub fn relay(e: capnp::Error, otherwise: impl FnOnce(capnp::Error) -> CvError) -> CvError {
        match Self::from_rpc(&e) {
            Some(d) => d,
            None => otherwise(e),
        }
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
        ErrorCode::InUse => "inUse",
    }
}

/// Every code, in schema order (for tests and tables).
pub const ALL_CODES: [ErrorCode; 11] = [
    ErrorCode::Denied,
    ErrorCode::NotFound,
    ErrorCode::WrongInterface,
    ErrorCode::Quota,
    ErrorCode::StaleSession,
    ErrorCode::InvalidArgument,
    ErrorCode::AlreadyExists,
    ErrorCode::Unavailable,
    ErrorCode::Internal,
    ErrorCode::NotRunning,
    ErrorCode::InUse,
];

/// The code named `name` (the inverse of [`code_name`]).
pub fn code_from_name(name: &str) -> Option<ErrorCode> {
    ALL_CODES.into_iter().find(|c| code_name(*c) == name)
}

impl fmt::Display for CvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code_name(), self.message)
    }
}

impl std::error::Error for CvError {}

impl From<CvError> for capnp::Error {
    fn from(e: CvError) -> Self {
        e.to_rpc()
    }
}

/// Maps an infrastructure error into a capnp exception (`failed`), for the
/// paths that are not domain outcomes.
pub fn failed(e: impl fmt::Display) -> capnp::Error {
    capnp::Error::failed(e.to_string())
}

/// Reads a text field as an owned `String`.
///
/// Errors: the field is missing or malformed (capnp error), or it is not
/// UTF-8 (`invalidArgument`).
pub fn text(t: capnp::Result<capnp::text::Reader<'_>>) -> capnp::Result<String> {
    t?.to_string().map_err(|_| CvError::invalid("text fields must be UTF-8").to_rpc())
}

/// A host path as schema `Text` (our schemas carry paths as UTF-8 text).
///
/// Errors: the path is not UTF-8 (`failed`, naming it).
pub fn path_text(p: &std::path::Path) -> capnp::Result<&str> {
    p.to_str().ok_or_else(|| capnp::Error::failed(format!("path {} is not UTF-8", p.display())))
}

/// `text` made safe to show on a terminal: every control character (C0
/// except `\n` and `\t` when `multiline`, DEL, and the C1 range
/// U+0080-U+009F, which terminals also obey) is replaced by its `\u{..}`
/// escape, so guest-controlled text (a kernel release, a console tail)
/// cannot move the cursor, change colours or send terminal queries
/// (ECMA-48 escape and control sequences start with such characters).
pub fn printable(text: &str, multiline: bool) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| c.is_control() && !(multiline && (c == '\n' || c == '\t'));
    if !text.chars().any(bad) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if bad(c) {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_terminal_controls() {
        assert_eq!(printable("6.1.0-cloud", false), "6.1.0-cloud");
        assert_eq!(printable("a\x1b[2Jb", false), "a\\u{1b}[2Jb");
        assert_eq!(printable("x\u{9b}31m", false), "x\\u{9b}31m");
        assert_eq!(printable("l1\nl2\r", true), "l1\nl2\\u{d}");
        assert_eq!(printable("l1\nl2", false), "l1\\u{a}l2");
        assert_eq!(printable("\x07\x7f", true), "\\u{7}\\u{7f}");
    }

    #[test]
    fn every_code_round_trips() {
        for code in ALL_CODES {
            let e = CvError::new(code, "x y] z");
            let back = CvError::from_rpc(&e.to_rpc()).unwrap();
            assert_eq!(back, e);
            assert_eq!(code_from_name(code_name(code)), Some(code));
        }
    }

    #[test]
    fn decodes_through_transport_prefixes() {
        let wire = capnp::Error::failed(format!(
            "remote exception: remote exception: {}",
            CvError::not_found("no VM \"a\"").to_rpc().extra
        ));
        let e = CvError::from_rpc(&wire).unwrap();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert_eq!(e.message, "no VM \"a\"");
    }

    #[test]
    fn first_marker_wins() {
        let inner = CvError::denied("the guest printed [capvisor:quota] x");
        let e = CvError::from_rpc(&inner.to_rpc()).unwrap();
        assert_eq!(e.code, ErrorCode::Denied);
    }

    #[test]
    fn non_domain_errors() {
        assert!(CvError::from_rpc(&capnp::Error::failed("boom".into())).is_none());
        let gone = capnp::Error::disconnected(CvError::stale().to_rpc().extra);
        assert!(CvError::from_rpc(&gone).is_none(), "transport loss is never a domain outcome");
        let newer = capnp::Error::failed("[capvisor:fromTheFuture] hi".into());
        assert_eq!(CvError::from_rpc(&newer).unwrap().code, ErrorCode::Internal);
        let relayed = CvError::relay(capnp::Error::failed("boom".into()), |e| CvError::unavailable(e.extra));
        assert_eq!(relayed.code, ErrorCode::Unavailable);
    }
}
