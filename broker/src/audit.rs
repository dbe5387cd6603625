//! The audit log: JSON Lines (<https://jsonlines.org>), one [`AuditRecord`]
//! per line, appended to `state_dir/audit.jsonl` (mode 0600).
//!
//! Every login (ok or denied), resume, attach, logout, session end, account
//! change and every event a worker reports is a line. A record never holds
//! a password, a resume token or a token hash.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Longest value kept in one field (characters); longer values are cut.
pub const MAX_FIELD: usize = 512;

/// One audit line.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditRecord {
    /// Unix epoch milliseconds.
    pub ts_ms: i64,
    /// Who acted: `local:<user>`, `password:<user>`, or `""` when unknown
    /// (e.g. an attach with an unknown token).
    pub principal: String,
    /// Session id (hex) or `""`.
    pub session: String,
    /// What happened: `login`, `resume`, `attach`, `logout`, `session.end`,
    /// `session.expire`, `session.revoke`, `account.add`, `account.remove`,
    /// `account.list`, `shutdown`, or a worker's action (`vm.create`, ...).
    pub action: String,
    /// Capability (interface) involved, e.g. `Gateway`, `Accounts`, `VmFactory`.
    pub cap: String,
    /// Method, e.g. `loginPassword`.
    pub method: String,
    /// `ok` or a schema `ErrorCode` name (`denied`, `staleSession`, ...).
    pub outcome: String,
    /// Free text for people; never a secret.
    pub detail: String,
    /// What the gateway saw of the peer, e.g. `unix:uid=1000 pid=4242`, or `""`.
    pub peer: String,
}

impl AuditRecord {
    /// A record stamped now with `action`, `cap`, `method`, `outcome`.
    pub fn new(action: &str, cap: &str, method: &str, outcome: &str) -> Self {
        Self {
            ts_ms: crate::now_ms(),
            action: action.into(),
            cap: cap.into(),
            method: method.into(),
            outcome: outcome.into(),
            ..Default::default()
        }
    }
    /// Sets the principal.
    pub fn principal(mut self, p: &str) -> Self {
        self.principal = p.into();
        self
    }
    /// Sets the session id.
    pub fn session(mut self, s: &str) -> Self {
        self.session = s.into();
        self
    }
    /// Sets the detail text.
    pub fn detail(mut self, d: impl Into<String>) -> Self {
        self.detail = d.into();
        self
    }
    /// Sets the peer description.
    pub fn peer(mut self, p: &str) -> Self {
        self.peer = p.into();
        self
    }

    fn clamp(&mut self) {
        for f in [
            &mut self.principal,
            &mut self.session,
            &mut self.action,
            &mut self.cap,
            &mut self.method,
            &mut self.outcome,
            &mut self.detail,
            &mut self.peer,
        ] {
            if f.chars().count() > MAX_FIELD {
                *f = f.chars().take(MAX_FIELD).collect::<String>() + "...";
            }
        }
    }
}

/// An append-only JSONL audit file. Each record is one `write` on an
/// `O_APPEND` descriptor, so lines never interleave.
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
    /// Records that could not be written, since start.
    lost: std::sync::atomic::AtomicU64,
    /// Whether the last write failed.
    failing: std::sync::atomic::AtomicBool,
}

impl AuditLog {
    /// Opens (creating with mode 0600) `path` for appending.
    ///
    /// Errors: any I/O error opening the file.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            lost: Default::default(),
            failing: Default::default(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `rec` (fields longer than [`MAX_FIELD`] are cut). A write
    /// failure is logged and counted ([`Self::lost`]) and makes the log
    /// [unhealthy](Self::healthy) until a later write succeeds: the broker
    /// then refuses new sessions and account changes (fail closed) rather
    /// than act without a record.
    pub fn write(&self, mut rec: AuditRecord) {
        use std::sync::atomic::Ordering;
        rec.clamp();
        let mut line = serde_json::to_vec(&rec).expect("audit record serialises");
        line.push(b'\n');
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        match f.write_all(&line) {
            Ok(()) => self.failing.store(false, Ordering::Relaxed),
            Err(e) => {
                let lost = self.lost.fetch_add(1, Ordering::Relaxed) + 1;
                self.failing.store(true, Ordering::Relaxed);
                tracing::error!(path = %self.path.display(), lost, "cannot write the audit log: {e}");
            }
        }
    }

    /// Whether the last write succeeded (or none was made yet).
    pub fn healthy(&self) -> bool {
        !self.failing.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records lost to write failures since the log was opened.
    pub fn lost(&self) -> u64 {
        self.lost.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn appends_json_lines_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&p).unwrap();
        log.write(AuditRecord::new("login", "Gateway", "loginLocal", "ok").principal("local:root").peer("unix:uid=0"));
        log.write(AuditRecord::new("logout", "Session", "logout", "ok").detail("x".repeat(2000)));
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<AuditRecord> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].principal, "local:root");
        assert_eq!(lines[0].outcome, "ok");
        assert!(lines[0].ts_ms > 1_600_000_000_000);
        assert!(lines[1].detail.len() <= MAX_FIELD + 3);
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(log.healthy());
        assert_eq!(log.lost(), 0);
    }

    #[test]
    fn write_failures_are_counted_and_make_the_log_unhealthy() {
        // /dev/full fails every write with ENOSPC: a full disk.
        let log = AuditLog::open(Path::new("/dev/full")).unwrap();
        assert!(log.healthy());
        log.write(AuditRecord::new("login", "Gateway", "loginLocal", "ok"));
        log.write(AuditRecord::new("login", "Gateway", "loginLocal", "ok"));
        assert!(!log.healthy());
        assert_eq!(log.lost(), 2);
    }
}
