//! Client-side errors and their CLI exit codes.

use capvisor_rpc::schema::common_capnp::ErrorCode;
use capvisor_rpc::CvError;

/// What can go wrong for a client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A typed domain outcome from the server (denied, quota, ...).
    #[error("{}", .0.message)]
    Domain(CvError),
    /// The connection to capvisor ended.
    #[error("disconnected from capvisor: {0}")]
    Disconnected(String),
    /// An infrastructure failure reported by capnp-rpc.
    #[error("RPC failure: {0}")]
    Rpc(capnp::Error),
    /// Local I/O (socket, files, terminal).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// No saved login.
    #[error("not logged in: run `capvisor login` first")]
    NotLoggedIn,
    /// A bad command line or input (before anything was sent).
    #[error("{0}")]
    Usage(String),
}

/// Result alias.
pub type ClientResult<T> = Result<T, ClientError>;

impl From<capnp::Error> for ClientError {
    /// Classifies an exception by the rule in `capvisor_rpc::error`: a
    /// `[capvisor:<code>]` reason is a typed domain outcome, kind
    /// `disconnected` is transport loss, anything else an infrastructure
    /// failure.
    fn from(e: capnp::Error) -> Self {
        if let Some(d) = CvError::from_rpc(&e) {
            return ClientError::Domain(d);
        }
        if e.kind == capnp::ErrorKind::Disconnected {
            ClientError::Disconnected(e.extra)
        } else {
            ClientError::Rpc(e)
        }
    }
}

impl From<capnp::NotInSchema> for ClientError {
    fn from(e: capnp::NotInSchema) -> Self {
        ClientError::Rpc(e.into())
    }
}

impl From<CvError> for ClientError {
    fn from(e: CvError) -> Self {
        ClientError::Domain(e)
    }
}

impl ClientError {
    /// The domain code, if this is a domain outcome.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Domain(e) => Some(e.code),
            _ => None,
        }
    }

    /// The CLI's exit code for this error (README, "Exit codes"):
    /// 1 other failure, 2 usage, 10 denied, 11 notFound, 12 wrongInterface,
    /// 13 quota, 14 staleSession, 15 invalidArgument, 16 alreadyExists,
    /// 17 unavailable, 18 internal, 19 notRunning, 20 disconnected,
    /// 21 not logged in.
    pub fn exit_code(&self) -> i32 {
        match self {
            // inUse came after the transport codes 20 and 21.
            ClientError::Domain(e) if e.code == ErrorCode::InUse => 22,
            ClientError::Domain(e) => 10 + e.code as i32,
            ClientError::Disconnected(_) => 20,
            ClientError::NotLoggedIn => 21,
            ClientError::Usage(_) => 2,
            ClientError::Rpc(_) | ClientError::Io(_) => 1,
        }
    }
}
