//! The Landlock ruleset (landlock(7), Documentation/userspace-api/landlock.rst).
//!
//! Handled (i.e. denied unless a rule grants them): every file-system
//! access right the `landlock` crate knows (up to ABI 10), TCP bind and
//! connect (ABI 4), and the abstract-Unix-socket and signal scopes (ABI 6).
//! Granted: [`SandboxPolicy::read_only`] paths read (+ list for
//! directories); [`SandboxPolicy::read_write`] paths read, write, truncate
//! (+ list, create and remove regular files and directories beneath, for
//! directories). No rule grants execute, device/socket/fifo/symlink
//! creation, cross-directory rename/link (`REFER`), device ioctls or
//! connecting to pathname Unix sockets; no port rule exists, so TCP bind
//! and connect are denied outright (defence in depth under seccomp, which
//! already refuses `socket`).
//!
//! Landlock checks file rights when a file is *opened*: descriptors opened
//! before enforcement (`/dev/kvm`, the VM and vCPU fds, images already
//! open, the console log, inherited sockets) keep working.
//!
//! Best effort: on a kernel without Landlock, or with an older ABI, the
//! rights the kernel knows are enforced and [`LandlockStatus`] says how much.

use std::fmt;
use std::path::Path;

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, RestrictSelfAttr, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use super::{SandboxError, SandboxPolicy};

/// The newest ABI whose rights this module was written and reviewed for.
const TARGET_ABI: ABI = ABI::V10;

/// Outcome of [`apply_landlock`]. `abi` is the kernel's Landlock ABI
/// version (0 = none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LandlockStatus {
    /// Every handled right is enforced by this kernel.
    FullyEnforced {
        /// Kernel Landlock ABI version.
        abi: i32,
    },
    /// The kernel's ABI is older than the newest this module handles (10): the rights it knows
    /// are enforced, newer ones (e.g. pathname Unix socket connect, ABI 9)
    /// are not.
    PartiallyEnforced {
        /// Kernel Landlock ABI version.
        abi: i32,
    },
    /// Nothing is enforced: Landlock is not built in or not enabled
    /// (`lsm=` boot parameter).
    NotEnforced {
        /// Kernel Landlock ABI version (0 when unavailable).
        abi: i32,
        /// Why, for the log.
        reason: String,
    },
}

impl LandlockStatus {
    /// True unless [`LandlockStatus::NotEnforced`].
    pub fn is_enforced(&self) -> bool {
        !matches!(self, LandlockStatus::NotEnforced { .. })
    }
}

impl fmt::Display for LandlockStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LandlockStatus::FullyEnforced { abi } => write!(f, "fully enforced (ABI {abi})"),
            LandlockStatus::PartiallyEnforced { abi } => write!(f, "partially enforced (kernel ABI {abi})"),
            LandlockStatus::NotEnforced { abi, reason } => write!(f, "NOT enforced (ABI {abi}): {reason}"),
        }
    }
}

/// The kernel's Landlock ABI version; 0 when Landlock is unavailable (one
/// home: [`capvisor_confine::landlock::abi`]).
pub fn landlock_abi() -> i32 {
    capvisor_confine::landlock::abi()
}

fn read_only_rights() -> BitFlags<AccessFs> {
    AccessFs::ReadFile | AccessFs::ReadDir
}

fn read_write_rights() -> BitFlags<AccessFs> {
    AccessFs::ReadFile
        | AccessFs::ReadDir
        | AccessFs::WriteFile
        | AccessFs::Truncate
        | AccessFs::MakeReg
        | AccessFs::RemoveFile
        | AccessFs::MakeDir
        | AccessFs::RemoveDir
}

/// Rights that apply to non-directories (landlock(7): a rule on a file may
/// only carry these).
fn file_rights() -> BitFlags<AccessFs> {
    AccessFs::from_file(TARGET_ABI)
}

fn rule(path: &Path, rights: BitFlags<AccessFs>) -> Result<PathBeneath<PathFd>, SandboxError> {
    let meta = std::fs::metadata(path).map_err(|error| SandboxError::Path { path: path.to_path_buf(), error })?;
    let fd = PathFd::new(path)
        .map_err(|e| SandboxError::Path { path: path.to_path_buf(), error: std::io::Error::other(e.to_string()) })?;
    let rights = if meta.is_dir() { rights } else { rights & file_rights() };
    Ok(PathBeneath::new(fd, rights))
}

/// Restrict the calling thread (and the threads it creates later; all
/// threads when the kernel has ABI >= 8) to `policy`'s paths, with no TCP
/// bind/connect, and scoped abstract Unix sockets and signals. Sets
/// `no_new_privs`. Irreversible.
///
/// Best effort: returns [`LandlockStatus::NotEnforced`] (not an error) on a
/// kernel without Landlock; the caller logs it.
///
/// Errors: [`SandboxError::Path`] when a policy path does not exist or
/// cannot be opened; [`SandboxError::Landlock`] when the kernel refuses the
/// ruleset.
pub fn apply_landlock(policy: &SandboxPolicy) -> Result<LandlockStatus, SandboxError> {
    let abi = landlock_abi();
    let ll = |e: landlock::RulesetError| SandboxError::Landlock(e.to_string());
    // Open every rule path first, so a bad path fails before anything is enforced.
    let mut rules = Vec::new();
    for p in &policy.read_only {
        rules.push(rule(p, read_only_rights())?);
    }
    for p in &policy.read_write {
        rules.push(rule(p, read_write_rights())?);
    }
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(TARGET_ABI))
        .map_err(ll)?
        .handle_access(AccessNet::from_all(TARGET_ABI))
        .map_err(ll)?
        .scope(Scope::from_all(TARGET_ABI))
        .map_err(ll)?
        .create()
        .map_err(ll)?
        .add_rules(rules.into_iter().map(Ok::<_, landlock::RulesetError>))
        .map_err(ll)?
        .all_threads(true)
        .map_err(ll)?
        .restrict_self()
        .map_err(ll)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockStatus::FullyEnforced { abi },
        RulesetStatus::PartiallyEnforced => LandlockStatus::PartiallyEnforced { abi },
        RulesetStatus::NotEnforced => LandlockStatus::NotEnforced {
            abi,
            reason: match status.landlock {
                landlock::LandlockStatus::NotEnabled => {
                    "Landlock is built in but not enabled (add it to lsm= on the kernel command line)".into()
                }
                landlock::LandlockStatus::NotImplemented => {
                    "the kernel has no Landlock (CONFIG_SECURITY_LANDLOCK)".into()
                }
                other => format!("ruleset not enforced ({other:?})"),
            },
        },
    })
}
