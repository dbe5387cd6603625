//! The audit log: JSON Lines (<https://jsonlines.org>), one [`AuditRecord`]
//! per line, appended to `state_dir/audit.jsonl` (mode 0600).
//!
//! Every login (ok or denied), resume, attach, logout, session end, account
//! change and every event a worker reports is a line. A record never holds
//! a password, a resume token or a token hash.
//!
//! Repeats are coalesced so a flood (wrong passwords, refused calls) cannot
//! grow the log one line per attempt: the first of a run of records equal
//! in every field but the time is written at once; equal records within
//! [`COALESCE_WINDOW`] after it are counted, not written, and when the
//! window closes one more line stands for those repeats, with `repeated` =
//! how many (so a line accounts for `max(repeated, 1)` events) and
//! `since_ms` = the first one's time (`ts_ms` = the last one's). The broker
//! closes due windows every second ([`AuditLog::flush_due`]) and all of
//! them at shutdown ([`AuditLog::flush_all`]). At most [`COALESCE_KEYS`]
//! distinct records are tracked; beyond that records are written as they
//! come.
//!
//! The JSONL is the append-only record; [`crate::audit_db`] keeps a
//! queryable SQLite index of the same lines ([`AuditLog::with_index`]).

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Longest value kept in one field (characters); longer values are cut.
pub const MAX_FIELD: usize = 512;
/// How long equal records are counted into one line (see the module docs).
pub const COALESCE_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);
/// Most distinct records tracked for coalescing at once.
pub const COALESCE_KEYS: usize = 1024;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

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
    /// On a coalesced line: how many more records equal to this one (but
    /// for the time) happened from `since_ms` to `ts_ms`, not written one
    /// by one. Absent (0) on ordinary lines.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub repeated: u64,
    /// On a coalesced line: the time of the first repeat, Unix epoch ms.
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub since_ms: i64,
    /// The VM the event concerns (its name in the session), or `""`.
    /// Absent on lines without one (and on lines older than the field).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vm: String,
    /// The delegation chain the call came through, outermost grant first
    /// (issue 10; empty until grants exist). Absent when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<GrantRef>,
}

/// One grant of a delegation chain, as the audit log names it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct GrantRef {
    /// The grant's id.
    pub id: String,
    /// What its creator called it.
    pub label: String,
}

fn is_zero_i64(n: &i64) -> bool {
    *n == 0
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
    /// Sets the delegation chain: `(id, label)`, outermost grant first.
    pub fn grants(mut self, chain: &[(String, String)]) -> Self {
        self.grants = chain.iter().map(|(id, label)| GrantRef { id: id.clone(), label: label.clone() }).collect();
        self
    }

    /// Sets the VM name.
    pub fn vm(mut self, v: &str) -> Self {
        self.vm = v.into();
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
            &mut self.vm,
        ] {
            if f.chars().count() > MAX_FIELD {
                *f = f.chars().take(MAX_FIELD).collect::<String>() + "...";
            }
        }
    }
}

/// A run of equal records being counted (see the module docs).
struct Run {
    opened: std::time::Instant,
    first_ms: i64,
    last_ms: i64,
    repeats: u64,
    rec: AuditRecord,
}

/// An append-only JSONL audit file. Each record is one `write` on an
/// `O_APPEND` descriptor, so lines never interleave.
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
    window: std::time::Duration,
    /// Open runs by record (time zeroed), serialised.
    runs: Mutex<std::collections::HashMap<Vec<u8>, Run>>,
    /// Records that could not be written, since start.
    lost: std::sync::atomic::AtomicU64,
    /// Whether the last write failed.
    failing: std::sync::atomic::AtomicBool,
    /// The SQLite index every written line is copied to, if any.
    index: Option<crate::audit_db::AuditIndex>,
}

impl AuditLog {
    /// Opens (creating with mode 0600) `path` for appending.
    ///
    /// Errors: any I/O error opening the file.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Self::open_with_window(path, COALESCE_WINDOW)
    }

    /// [`Self::open`] with another coalescing window (tests; zero turns
    /// coalescing off).
    pub fn open_with_window(path: &Path, window: std::time::Duration) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            window,
            runs: Default::default(),
            lost: Default::default(),
            failing: Default::default(),
            index: None,
        })
    }

    /// Adds the SQLite index at `db` ([`crate::audit_db::AuditIndex::open`]:
    /// created or rebuilt from this log's file as needed): every line
    /// written from now on is indexed too. An index that cannot be opened
    /// is logged (error) and left out: the JSONL goes on alone and
    /// queries fail with `unavailable`.
    pub fn with_index(mut self, db: &Path) -> Self {
        match crate::audit_db::AuditIndex::open(db, &self.path) {
            Ok(ix) => self.index = Some(ix),
            Err(e) => tracing::error!("no audit index at {}: {e:#}", db.display()),
        }
        self
    }

    /// The SQLite index, if one is open.
    pub fn index(&self) -> Option<&crate::audit_db::AuditIndex> {
        self.index.as_ref()
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
    ///
    /// A record equal but for its time to one written less than the
    /// coalescing window ago is only counted (see the module docs).
    pub fn write(&self, mut rec: AuditRecord) {
        rec.clamp();
        if self.window.is_zero() {
            return self.append(&rec);
        }
        let key = serde_json::to_vec(&AuditRecord { ts_ms: 0, ..rec.clone() }).expect("audit record serialises");
        let now = std::time::Instant::now();
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(run) = runs.get_mut(&key) {
            if now.duration_since(run.opened) < self.window {
                run.repeats += 1;
                run.last_ms = rec.ts_ms;
                if run.repeats == 1 {
                    run.first_ms = rec.ts_ms;
                }
                return;
            }
            let done = runs.remove(&key).expect("present");
            self.close(done);
        }
        if runs.len() >= COALESCE_KEYS {
            self.close_due(&mut runs, now);
        }
        self.append(&rec);
        if runs.len() < COALESCE_KEYS {
            runs.insert(key, Run { opened: now, first_ms: 0, last_ms: 0, repeats: 0, rec });
        }
    }

    /// Writes the coalesced line of every run whose window has closed.
    pub fn flush_due(&self) {
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        self.close_due(&mut runs, std::time::Instant::now());
    }

    /// Writes the coalesced line of every open run (at shutdown).
    pub fn flush_all(&self) {
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        for (_, run) in runs.drain() {
            self.close(run);
        }
    }

    fn close_due(&self, runs: &mut std::collections::HashMap<Vec<u8>, Run>, now: std::time::Instant) {
        let due: Vec<Vec<u8>> =
            runs.iter().filter(|(_, r)| now.duration_since(r.opened) >= self.window).map(|(k, _)| k.clone()).collect();
        for k in due {
            if let Some(run) = runs.remove(&k) {
                self.close(run);
            }
        }
    }

    /// Writes a run's coalesced line, when it counted any repeat.
    fn close(&self, run: Run) {
        if run.repeats > 0 {
            self.append(&AuditRecord { ts_ms: run.last_ms, repeated: run.repeats, since_ms: run.first_ms, ..run.rec });
        }
    }

    fn append(&self, rec: &AuditRecord) {
        use std::sync::atomic::Ordering;
        let mut line = serde_json::to_vec(rec).expect("audit record serialises");
        line.push(b'\n');
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        match f.write_all(&line) {
            Ok(()) => {
                self.failing.store(false, Ordering::Relaxed);
                if let Some(ix) = &self.index {
                    ix.insert(rec);
                }
            }
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

    fn read(p: &Path) -> Vec<AuditRecord> {
        std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[test]
    fn repeats_are_coalesced_into_one_counted_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let log = AuditLog::open_with_window(&p, std::time::Duration::from_millis(1500)).unwrap();
        let wrong = |pid: u32| {
            AuditRecord::new("login", "Gateway", "loginPassword", "denied")
                .principal("password:bob")
                .peer(&format!("unix:uid=1000 pid={pid}"))
        };
        for _ in 0..50 {
            log.write(wrong(7));
        }
        log.write(wrong(8)); // another peer: its own line
        log.write(AuditRecord::new("login", "Gateway", "loginPassword", "ok").principal("password:bob"));
        let lines = read(&p);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[0].repeated, 0);
        // Nothing is lost: the counted repeats appear once the window closes.
        std::thread::sleep(std::time::Duration::from_millis(1600));
        log.flush_due();
        let lines = read(&p);
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(lines[3].repeated, 49);
        assert_eq!((lines[3].peer.as_str(), lines[3].outcome.as_str()), ("unix:uid=1000 pid=7", "denied"));
        assert!(lines[3].since_ms >= lines[0].ts_ms && lines[3].ts_ms >= lines[3].since_ms);
        // A new run starts after the window: written at once again.
        log.write(wrong(7));
        log.write(wrong(7));
        assert_eq!(read(&p).len(), 5);
        log.flush_all();
        let lines = read(&p);
        assert_eq!((lines.len(), lines[5].repeated), (6, 1));
        let total: u64 = lines.iter().filter(|l| l.peer.ends_with("pid=7")).map(|l| l.repeated.max(1)).sum();
        assert_eq!(total, 52, "every event is accounted for");
    }

    #[test]
    fn coalescing_tracks_a_bounded_number_of_records() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let log = AuditLog::open_with_window(&p, std::time::Duration::from_secs(3600)).unwrap();
        for i in 0..COALESCE_KEYS + 10 {
            log.write(AuditRecord::new("login", "Gateway", "loginPassword", "denied").detail(format!("{i}")));
        }
        assert_eq!(log.runs.lock().unwrap().len(), COALESCE_KEYS);
        // Untracked records are written one by one: none is lost.
        let last = format!("{}", COALESCE_KEYS + 5);
        log.write(AuditRecord::new("login", "Gateway", "loginPassword", "denied").detail(last));
        assert_eq!(read(&p).len(), COALESCE_KEYS + 11);
    }

    #[test]
    fn write_failures_are_counted_and_make_the_log_unhealthy() {
        // /dev/full fails every write with ENOSPC: a full disk.
        let log = AuditLog::open_with_window(Path::new("/dev/full"), std::time::Duration::ZERO).unwrap();
        assert!(log.healthy());
        log.write(AuditRecord::new("login", "Gateway", "loginLocal", "ok"));
        log.write(AuditRecord::new("login", "Gateway", "loginLocal", "ok"));
        assert!(!log.healthy());
        assert_eq!(log.lost(), 2);
    }
}
