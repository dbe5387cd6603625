//! The audit index: `state_dir/audit.sqlite` (SQLite, WAL journal, mode
//! 0600), a queryable copy of `audit.jsonl` (docs/decisions.md, "Audit:
//! JSONL is the append-only record, SQLite the index").
//!
//! Every line the [`AuditLog`](crate::audit::AuditLog) writes to the JSONL
//! (coalesced lines included) is sent, after the line is written, to a
//! dedicated writer thread over a bounded channel ([`QUEUE`] records); the
//! thread inserts what is queued in one transaction per batch. The
//! broker's single-threaded event loop never waits on SQLite for a write:
//! when the queue is full the record is not indexed (logged as an error;
//! the JSONL keeps it and the next start rebuilds the index). Queries run
//! on the same thread, after the writes queued before them.
//!
//! Tables (schema [`SCHEMA_VERSION`]):
//! - `audit(id INTEGER PRIMARY KEY, ts_ms, since_ms, repeated, principal,
//!   session, action, cap, method, outcome, detail, peer, vm, grants)`:
//!   one row per JSONL line, in file order; `grants` is the delegation
//!   chain as a JSON array of `{"id","label"}`, outermost first (`"[]"`
//!   when none). Indexed on `ts_ms` and on `(vm, ts_ms)`.
//! - `audit_grant(audit_id, grant_id)`: one row per grant of a line,
//!   indexed on `grant_id` (queries by grant).
//! - `meta(key, value)`: `version` (the schema version) and `lines` (how
//!   many JSONL lines the index holds).
//!
//! At open ([`AuditIndex::open`]) the index is rebuilt from the JSONL when
//! it is missing, of another schema version, or holds another number of
//! lines than the file; a database SQLite cannot read is moved aside
//! (`audit.sqlite.corrupt-<ms>`) and rebuilt. Deleting the database is
//! therefore always safe.

use crate::audit::{AuditRecord, GrantRef};
use rusqlite::{params, Connection};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// Version of the index's tables; another version in `meta` means rebuild.
pub const SCHEMA_VERSION: i64 = 2;
/// Records the writer thread's queue holds; beyond that a record is not
/// indexed (the JSONL has it; the next start rebuilds).
pub const QUEUE: usize = 4096;
/// Most records inserted in one transaction.
pub const BATCH: usize = 512;
/// Entries a query returns when its `limit` is 0.
pub const QUERY_DEFAULT_LIMIT: u32 = 1000;
/// Most entries one query returns (a larger `limit` is cut to this).
pub const QUERY_MAX_LIMIT: u32 = 10_000;
/// Most bytes of entries one query returns (about, as capnp encodes them):
/// the newest entries that fit are returned. Half the 16 MiB a client
/// reads in one message (`capvisor_rpc::conn::UNTRUSTED`).
pub const QUERY_MAX_BYTES: usize = 8 << 20;
/// A rebuild logs its progress every this many lines.
const PROGRESS_EVERY: u64 = 100_000;

/// What a query selects: each filter set narrows the result (AND); 0 or
/// `""` means no filter. See `Audit.query` in capvisor.capnp.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only lines with `ts_ms >= since_ms` (Unix epoch ms).
    pub since_ms: i64,
    /// Only lines with `ts_ms <= until_ms` (Unix epoch ms).
    pub until_ms: i64,
    /// Only lines of this VM name.
    pub vm: String,
    /// Only lines whose delegation chain holds this grant id.
    pub grant: String,
    /// Only lines of this principal (`local:alice`, ...).
    pub principal: String,
    /// Only lines of this action (`vm.create`, ...).
    pub action: String,
    /// Most entries (the newest ones); 0 = [`QUERY_DEFAULT_LIMIT`], at most
    /// [`QUERY_MAX_LIMIT`], and no more than fit in [`QUERY_MAX_BYTES`].
    pub limit: u32,
}

impl AuditQuery {
    /// The number of entries this query returns at most.
    pub fn effective_limit(&self) -> u32 {
        match self.limit {
            0 => QUERY_DEFAULT_LIMIT,
            n => n.min(QUERY_MAX_LIMIT),
        }
    }
}

enum Msg {
    Insert(Box<AuditRecord>),
    Query(AuditQuery, tokio::sync::oneshot::Sender<rusqlite::Result<Vec<AuditRecord>>>),
    Sync(mpsc::SyncSender<()>),
}

/// The handle on the index's writer thread. Dropping it ends the thread
/// once the queued records are written.
pub struct AuditIndex {
    path: PathBuf,
    tx: Option<mpsc::SyncSender<Msg>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Errors of [`AuditIndex::query`].
#[derive(Debug)]
pub enum IndexError {
    /// The writer thread is gone (it failed to open the database).
    Gone,
    /// SQLite failed.
    Sql(rusqlite::Error),
}

impl std::fmt::Display for IndexError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IndexError::Gone => write!(f, "the audit index is not available"),
            IndexError::Sql(e) => write!(f, "the audit index failed: {e}"),
        }
    }
}

impl AuditIndex {
    /// Opens the index at `db` for the JSONL file `jsonl`, creating it
    /// (mode 0600) or rebuilding it from `jsonl` when it is missing, of
    /// another schema version, behind or ahead of the file, or unreadable
    /// (then first moved aside), and starts its writer thread. Runs the
    /// rebuild before returning, so no record written afterwards can be
    /// indexed twice.
    ///
    /// Errors: `jsonl` exists but is not a regular file (e.g. a device); the
    /// database cannot be created even after moving a bad one aside (e.g.
    /// the directory is not writable).
    pub fn open(db: &Path, jsonl: &Path) -> anyhow::Result<Self> {
        if std::fs::metadata(jsonl).is_ok_and(|m| !m.is_file()) {
            anyhow::bail!("{} is not a regular file: nothing to index", jsonl.display());
        }
        let conn = match open_checked(db, jsonl) {
            Ok(c) => c,
            Err(e) => {
                let aside = db.with_file_name(format!(
                    "{}.corrupt-{}",
                    db.file_name().and_then(|n| n.to_str()).unwrap_or("audit.sqlite"),
                    crate::now_ms()
                ));
                tracing::error!(
                    "the audit index {} is unusable ({e:#}); moving it to {} and rebuilding it",
                    db.display(),
                    aside.display()
                );
                std::fs::rename(db, &aside).ok();
                for ext in ["-wal", "-shm"] {
                    let side = PathBuf::from(format!("{}{ext}", db.display()));
                    std::fs::rename(&side, PathBuf::from(format!("{}{ext}", aside.display()))).ok();
                }
                open_checked(db, jsonl)?
            }
        };
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("audit-index".into())
            .spawn(move || writer(conn, rx))
            .map_err(|e| anyhow::anyhow!("cannot start the audit index thread: {e}"))?;
        Ok(Self { path: db.to_path_buf(), tx: Some(tx), thread: Some(thread) })
    }

    /// The database's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues `rec` (a line just written to the JSONL) for the index.
    /// Never blocks: a full queue or a gone thread is logged (error) and
    /// the record stays only in the JSONL until the next rebuild.
    pub fn insert(&self, rec: &AuditRecord) {
        let Some(tx) = &self.tx else { return };
        if let Err(e) = tx.try_send(Msg::Insert(Box::new(rec.clone()))) {
            let why = match e {
                mpsc::TrySendError::Full(_) => "its queue is full",
                mpsc::TrySendError::Disconnected(_) => "its thread is gone",
            };
            tracing::error!(path = %self.path.display(), "audit record not indexed ({why}); the next start rebuilds the index");
        }
    }

    /// The entries matching `q`, oldest first (the newest
    /// [`AuditQuery::effective_limit`] ones), after every record queued
    /// before this call is written. Waits on the writer thread without
    /// blocking the caller's event loop.
    ///
    /// Errors: [`IndexError::Gone`] when the thread ended,
    /// [`IndexError::Sql`] when SQLite fails.
    pub async fn query(&self, q: AuditQuery) -> Result<Vec<AuditRecord>, IndexError> {
        let Some(tx) = &self.tx else { return Err(IndexError::Gone) };
        let (otx, orx) = tokio::sync::oneshot::channel();
        // A query waits for room in the queue on a blocking-tolerant path:
        // try first, then hand the send to a helper thread.
        match tx.try_send(Msg::Query(q, otx)) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(m)) => {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let _ = tx.send(m);
                });
            }
            Err(mpsc::TrySendError::Disconnected(_)) => return Err(IndexError::Gone),
        }
        orx.await.map_err(|_| IndexError::Gone)?.map_err(IndexError::Sql)
    }

    /// Blocks until every record queued so far is written (tests, shutdown).
    pub fn sync(&self) {
        self.sync_timeout(std::time::Duration::MAX);
    }

    /// [`Self::sync`] for at most about `wait`; returns whether the queue
    /// drained in time (at shutdown: a stuck disk must not hold the
    /// broker; what is left is rebuilt from the JSONL at the next start).
    pub fn sync_timeout(&self, wait: std::time::Duration) -> bool {
        let Some(tx) = &self.tx else { return false };
        let (stx, srx) = mpsc::sync_channel(1);
        let deadline = std::time::Instant::now().checked_add(wait);
        let mut msg = Msg::Sync(stx);
        loop {
            match tx.try_send(msg) {
                Ok(()) => break,
                Err(mpsc::TrySendError::Full(m)) => msg = m,
                Err(mpsc::TrySendError::Disconnected(_)) => return false,
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        match deadline {
            None => srx.recv().is_ok(),
            Some(d) => srx.recv_timeout(d.saturating_duration_since(std::time::Instant::now())).is_ok(),
        }
    }
}

impl Drop for AuditIndex {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Opens `db` (creating it 0600 first so SQLite's `-wal` and `-shm` files,
/// which copy the database's mode, are 0600 too), sets WAL, and rebuilds
/// from `jsonl` unless the index is current.
fn open_checked(db: &Path, jsonl: &Path) -> anyhow::Result<Connection> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::metadata(jsonl) {
        Ok(m) if !m.is_file() => anyhow::bail!("{} is not a regular file: nothing to index", jsonl.display()),
        _ => {}
    }
    let f = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(db)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    drop(f);
    let mut conn = Connection::open(db)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let version: Option<i64> = meta(&conn, "version")?;
    let indexed: Option<i64> = meta(&conn, "lines")?;
    let lines = count_lines(jsonl)?;
    if version != Some(SCHEMA_VERSION) || indexed != Some(lines as i64) {
        tracing::info!(
            "rebuilding the audit index {} from {} ({lines} lines; index version {version:?}, {indexed:?} lines)",
            db.display(),
            jsonl.display()
        );
        rebuild(&mut conn, jsonl)?;
    }
    Ok(conn)
}

/// A `meta` value, or `None` when the table or key is missing.
fn meta(conn: &Connection, key: &str) -> rusqlite::Result<Option<i64>> {
    let exists: i64 =
        conn.query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'", [], |r| r.get(0))?;
    if exists == 0 {
        return Ok(None);
    }
    match conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)) {
        Ok(v) => Ok(Some(v)),
        Err(rusqlite::Error::QueryReturnedNoRows) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Lines (newline-terminated or final partial) of `jsonl`; 0 if it is missing.
fn count_lines(jsonl: &Path) -> std::io::Result<u64> {
    let f = match std::fs::File::open(jsonl) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut n = 0;
    for l in std::io::BufReader::new(f).split(b'\n') {
        l?;
        n += 1;
    }
    Ok(n)
}

const CREATE: &str = "
DROP TABLE IF EXISTS audit_grant;
DROP TABLE IF EXISTS audit;
DROP TABLE IF EXISTS meta;
CREATE TABLE audit (
  id INTEGER PRIMARY KEY,
  ts_ms INTEGER NOT NULL,
  since_ms INTEGER NOT NULL,
  repeated INTEGER NOT NULL,
  principal TEXT NOT NULL,
  session TEXT NOT NULL,
  action TEXT NOT NULL,
  cap TEXT NOT NULL,
  method TEXT NOT NULL,
  outcome TEXT NOT NULL,
  detail TEXT NOT NULL,
  peer TEXT NOT NULL,
  vm TEXT NOT NULL,
  grants TEXT NOT NULL
);
CREATE INDEX audit_ts ON audit(ts_ms);
CREATE INDEX audit_vm ON audit(vm, ts_ms);
CREATE TABLE audit_grant (audit_id INTEGER NOT NULL, grant_id TEXT NOT NULL);
CREATE INDEX audit_grant_id ON audit_grant(grant_id);
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
";

/// Drops and refills every table from `jsonl`, in one transaction. A line
/// that is not a record is counted (so the index is current) but has no row.
fn rebuild(conn: &mut Connection, jsonl: &Path) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let t = conn.transaction()?;
    t.execute_batch(CREATE)?;
    let mut lines = 0u64;
    let mut bad = 0u64;
    let mut next_progress = PROGRESS_EVERY;
    match std::fs::File::open(jsonl) {
        Ok(f) => {
            for l in std::io::BufReader::new(f).split(b'\n') {
                let l = l?;
                lines += 1;
                match serde_json::from_slice::<AuditRecord>(&l) {
                    Ok(rec) => insert_row(&t, &rec)?,
                    Err(_) => bad += 1,
                }
                if lines == next_progress {
                    next_progress += PROGRESS_EVERY;
                    tracing::info!("audit index rebuild: {lines} lines ({:.1} s)", start.elapsed().as_secs_f64());
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    t.execute("INSERT INTO meta(key, value) VALUES ('version', ?1)", [SCHEMA_VERSION])?;
    t.execute("INSERT INTO meta(key, value) VALUES ('lines', ?1)", [lines as i64])?;
    t.commit()?;
    tracing::info!("audit index rebuilt: {lines} lines ({bad} not records) in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

fn insert_row(conn: &Connection, rec: &AuditRecord) -> rusqlite::Result<()> {
    let grants = serde_json::to_string(&rec.grants).expect("grants serialise");
    conn.prepare_cached(
        "INSERT INTO audit(ts_ms, since_ms, repeated, principal, session, action, cap, method, outcome, detail, peer, vm, grants)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?
    .execute(params![
        rec.ts_ms,
        rec.since_ms,
        rec.repeated as i64,
        rec.principal,
        rec.session,
        rec.action,
        rec.cap,
        rec.method,
        rec.outcome,
        rec.detail,
        rec.peer,
        rec.vm,
        grants
    ])?;
    let id = conn.last_insert_rowid();
    for g in &rec.grants {
        conn.prepare_cached("INSERT INTO audit_grant(audit_id, grant_id) VALUES (?1, ?2)")?
            .execute(params![id, g.id])?;
    }
    Ok(())
}

/// Inserts `batch` and counts its lines in `meta`, in one transaction.
fn insert_batch(conn: &mut Connection, batch: &[Box<AuditRecord>]) -> rusqlite::Result<()> {
    let t = conn.transaction()?;
    for rec in batch {
        insert_row(&t, rec)?;
    }
    t.execute("UPDATE meta SET value = value + ?1 WHERE key = 'lines'", [batch.len() as i64])?;
    t.commit()
}

/// About how many bytes `rec` takes in a capnp `AuditEntry`: its text
/// (each padded to a word, with its NUL) and 16 words of struct, pointers
/// and list headers.
fn entry_bytes(rec: &AuditRecord) -> usize {
    let text = |s: &str| (s.len() + 8) & !7;
    let fields = [&rec.principal, &rec.session, &rec.action, &rec.cap, &rec.method, &rec.outcome, &rec.detail];
    let grants: usize = rec.grants.iter().map(|g| text(&g.id) + text(&g.label) + 16).sum();
    fields.iter().map(|f| text(f)).sum::<usize>() + text(&rec.peer) + text(&rec.vm) + grants + 128
}

fn run_query(conn: &Connection, q: &AuditQuery) -> rusqlite::Result<Vec<AuditRecord>> {
    let mut sql = String::from(
        "SELECT ts_ms, since_ms, repeated, principal, session, action, cap, method, outcome, detail, peer, vm, grants
         FROM audit WHERE 1",
    );
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    let mut add = |cond: &str, v: rusqlite::types::Value| {
        args.push(v);
        sql.push_str(&format!(" AND {cond} ?{}", args.len()));
    };
    if q.since_ms != 0 {
        add("ts_ms >=", q.since_ms.into());
    }
    if q.until_ms != 0 {
        add("ts_ms <=", q.until_ms.into());
    }
    if !q.vm.is_empty() {
        add("vm =", q.vm.clone().into());
    }
    if !q.principal.is_empty() {
        add("principal =", q.principal.clone().into());
    }
    if !q.action.is_empty() {
        add("action =", q.action.clone().into());
    }
    if !q.grant.is_empty() {
        args.push(q.grant.clone().into());
        sql.push_str(&format!(" AND id IN (SELECT audit_id FROM audit_grant WHERE grant_id = ?{})", args.len()));
    }
    sql.push_str(&format!(" ORDER BY ts_ms DESC, id DESC LIMIT {}", q.effective_limit()));
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(rusqlite::params_from_iter(args), |r| {
        let grants: String = r.get(12)?;
        Ok(AuditRecord {
            ts_ms: r.get(0)?,
            since_ms: r.get(1)?,
            repeated: r.get::<_, i64>(2)? as u64,
            principal: r.get(3)?,
            session: r.get(4)?,
            action: r.get(5)?,
            cap: r.get(6)?,
            method: r.get(7)?,
            outcome: r.get(8)?,
            detail: r.get(9)?,
            peer: r.get(10)?,
            vm: r.get(11)?,
            grants: serde_json::from_str::<Vec<GrantRef>>(&grants).unwrap_or_default(),
        })
    })?;
    // Newest first: stop before the answer outgrows what a client reads.
    let mut out = Vec::new();
    let mut bytes = 0;
    for r in rows {
        let r = r?;
        bytes += entry_bytes(&r);
        if bytes > QUERY_MAX_BYTES {
            break;
        }
        out.push(r);
    }
    out.reverse();
    Ok(out)
}

/// The writer thread: batches queued inserts into transactions, answers
/// queries in order. A failed batch is logged and its lines are left to
/// the next rebuild (the `lines` count then disagrees with the file).
fn writer(mut conn: Connection, rx: mpsc::Receiver<Msg>) {
    let mut batch: Vec<Box<AuditRecord>> = Vec::new();
    let flush = |conn: &mut Connection, batch: &mut Vec<Box<AuditRecord>>| {
        if batch.is_empty() {
            return;
        }
        if let Err(e) = insert_batch(conn, batch) {
            tracing::error!(records = batch.len(), "cannot write the audit index (the JSONL keeps them): {e}");
        }
        batch.clear();
    };
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Insert(rec) => {
                    batch.push(rec);
                    if batch.len() >= BATCH {
                        flush(&mut conn, &mut batch);
                    }
                }
                Msg::Query(q, reply) => {
                    flush(&mut conn, &mut batch);
                    let _ = reply.send(run_query(&conn, &q));
                }
                Msg::Sync(done) => {
                    flush(&mut conn, &mut batch);
                    let _ = done.send(());
                }
            }
            next = rx.try_recv().ok();
        }
        flush(&mut conn, &mut batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditLog;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    fn query(log: &AuditLog, q: AuditQuery) -> Vec<AuditRecord> {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(log.index().expect("index open").query(q)).unwrap()
    }

    fn jsonl(p: &Path) -> Vec<AuditRecord> {
        std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn rec(ts: i64, action: &str, principal: &str, vm: &str) -> AuditRecord {
        AuditRecord { ts_ms: ts, ..AuditRecord::new(action, "vms", "create", "ok").principal(principal).vm(vm) }
    }

    /// A log with its index in `dir`, coalescing off.
    fn open(dir: &Path) -> AuditLog {
        AuditLog::open_with_window(&dir.join("audit.jsonl"), Duration::ZERO)
            .unwrap()
            .with_index(&dir.join("audit.sqlite"))
    }

    /// Writes a varied set of records: two principals, VMs x and y, a
    /// delegation chain on some.
    fn fill(log: &AuditLog) {
        let g = |id: &str| GrantRef { id: id.into(), label: format!("label of {id}") };
        log.write(rec(1_000, "login", "local:alice", ""));
        log.write(rec(2_000, "vm.create", "local:alice", "x"));
        log.write(rec(3_000, "vm.create", "local:alice", "y"));
        log.write(AuditRecord { grants: vec![g("g1"), g("g2")], ..rec(4_000, "vm.exec", "password:bob", "x") });
        log.write(AuditRecord { grants: vec![g("g2")], ..rec(5_000, "vm.exec", "password:bob", "y") });
        log.write(rec(6_000, "vm.stop", "local:alice", "x"));
    }

    fn all() -> AuditQuery {
        AuditQuery { limit: QUERY_MAX_LIMIT, ..Default::default() }
    }

    #[test]
    fn every_written_line_is_indexed_coalesced_ones_included() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let log = AuditLog::open_with_window(&p, Duration::from_secs(3600))
            .unwrap()
            .with_index(&dir.path().join("audit.sqlite"));
        for _ in 0..20 {
            log.write(AuditRecord::new("login", "Gateway", "loginPassword", "denied").principal("password:eve"));
        }
        log.write(AuditRecord::new("vm.create", "vms", "create", "ok").vm("x"));
        log.flush_all();
        let lines = jsonl(&p);
        assert_eq!(lines.len(), 3, "first, other, coalesced: {lines:?}");
        let mut got = query(&log, all());
        let mut want = lines.clone();
        // Same lines; the index orders by time (the coalesced line's time
        // is its last repeat's).
        got.sort_by_key(|r| (r.ts_ms, r.repeated));
        want.sort_by_key(|r| (r.ts_ms, r.repeated));
        assert_eq!(got, want);
        assert_eq!(got.iter().map(|r| r.repeated.max(1)).sum::<u64>(), 21);
        assert!(got.iter().any(|r| r.repeated == 19 && r.since_ms > 0));
    }

    #[test]
    fn queries_filter_by_time_vm_grant_principal_action_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        fill(&log);
        let actions = |q: AuditQuery| query(&log, q).into_iter().map(|r| r.ts_ms).collect::<Vec<_>>();
        assert_eq!(actions(all()), [1_000, 2_000, 3_000, 4_000, 5_000, 6_000], "oldest first");
        assert_eq!(actions(AuditQuery { since_ms: 2_000, until_ms: 4_000, ..all() }), [2_000, 3_000, 4_000]);
        assert_eq!(actions(AuditQuery { since_ms: 7_000, ..all() }), Vec::<i64>::new());
        assert_eq!(actions(AuditQuery { vm: "x".into(), ..all() }), [2_000, 4_000, 6_000]);
        assert_eq!(actions(AuditQuery { grant: "g2".into(), ..all() }), [4_000, 5_000]);
        assert_eq!(actions(AuditQuery { grant: "g1".into(), ..all() }), [4_000]);
        assert_eq!(actions(AuditQuery { grant: "nope".into(), ..all() }), Vec::<i64>::new());
        assert_eq!(actions(AuditQuery { principal: "password:bob".into(), ..all() }), [4_000, 5_000]);
        assert_eq!(actions(AuditQuery { action: "vm.create".into(), ..all() }), [2_000, 3_000]);
        assert_eq!(actions(AuditQuery { action: "vm.exec".into(), vm: "y".into(), ..all() }), [5_000]);
        // The limit keeps the newest, still oldest first.
        assert_eq!(actions(AuditQuery { limit: 2, ..all() }), [5_000, 6_000]);
        let chain = query(&log, AuditQuery { grant: "g1".into(), ..all() });
        assert_eq!(chain[0].grants.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(), ["g1", "g2"]);
        assert_eq!(chain[0].grants[1].label, "label of g2");
    }

    #[test]
    fn the_limit_defaults_and_is_capped() {
        assert_eq!(AuditQuery::default().effective_limit(), QUERY_DEFAULT_LIMIT);
        assert_eq!(AuditQuery { limit: 5, ..Default::default() }.effective_limit(), 5);
        assert_eq!(AuditQuery { limit: u32::MAX, ..Default::default() }.effective_limit(), QUERY_MAX_LIMIT);
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        for i in 0..QUERY_DEFAULT_LIMIT as i64 + 5 {
            log.write(rec(1 + i, "vm.exec", "local:alice", "x"));
        }
        let got = query(&log, AuditQuery::default());
        assert_eq!(got.len(), QUERY_DEFAULT_LIMIT as usize);
        assert_eq!(got.last().unwrap().ts_ms, QUERY_DEFAULT_LIMIT as i64 + 5);
    }

    #[test]
    fn a_large_answer_is_cut_to_the_newest_entries_that_fit() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let big = "d".repeat(crate::audit::MAX_FIELD);
        let n = QUERY_MAX_BYTES / 1024 + 100; // each entry > 1 KiB
        for i in 0..n as i64 {
            log.write(AuditRecord {
                principal: big.clone(),
                session: big.clone(),
                detail: big.clone(),
                ..rec(1 + i, "vm.exec", "", "x")
            });
        }
        let got = query(&log, AuditQuery { limit: QUERY_MAX_LIMIT, ..Default::default() });
        assert!(got.len() < n && !got.is_empty(), "{} of {n}", got.len());
        assert!(got.iter().map(entry_bytes).sum::<usize>() <= QUERY_MAX_BYTES);
        assert_eq!(got.last().unwrap().ts_ms, n as i64, "the newest are kept");
    }

    #[test]
    fn a_failed_index_write_loses_no_jsonl_line_and_the_next_start_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open(dir.path());
            fill(&log);
            log.index().unwrap().sync();
            // The index's table vanishes under it: the next inserts fail.
            let c = Connection::open(dir.path().join("audit.sqlite")).unwrap();
            c.execute_batch("DROP TABLE audit_grant; DROP TABLE audit;").unwrap();
            log.write(rec(7_000, "vm.remove", "local:alice", "x"));
            log.index().unwrap().sync();
            assert!(log.healthy(), "an index failure does not fail the log");
        }
        let lines = jsonl(&dir.path().join("audit.jsonl"));
        assert_eq!(lines.len(), 7);
        let got = query(&open(dir.path()), all());
        assert_eq!(got, lines);
    }

    #[test]
    fn a_deleted_truncated_or_behind_index_is_rebuilt_from_the_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("audit.sqlite");
        let before = {
            let log = open(dir.path());
            fill(&log);
            query(&log, all())
        };
        assert_eq!(before.len(), 6);
        // Deleted (with its WAL files).
        for f in ["audit.sqlite", "audit.sqlite-wal", "audit.sqlite-shm"] {
            let _ = std::fs::remove_file(dir.path().join(f));
        }
        assert_eq!(query(&open(dir.path()), all()), before);
        // Truncated to nothing: no tables, so no version.
        for f in ["audit.sqlite-wal", "audit.sqlite-shm"] {
            let _ = std::fs::remove_file(dir.path().join(f));
        }
        std::fs::File::create(&db).unwrap().set_len(0).unwrap();
        assert_eq!(query(&open(dir.path()), all()), before);
        // Behind: a line the index never saw (written while it was not
        // open) is found after the next open.
        let extra = rec(9_000, "vm.remove", "local:alice", "x");
        let mut line = serde_json::to_vec(&extra).unwrap();
        line.push(b'\n');
        std::io::Write::write_all(
            &mut std::fs::OpenOptions::new().append(true).open(dir.path().join("audit.jsonl")).unwrap(),
            &line,
        )
        .unwrap();
        let got = query(&open(dir.path()), all());
        assert_eq!(got.len(), 7);
        assert_eq!(got.last().unwrap(), &extra);
        // Another schema version.
        {
            let c = Connection::open(&db).unwrap();
            c.execute("UPDATE meta SET value = 999 WHERE key = 'version'", []).unwrap();
        }
        assert_eq!(query(&open(dir.path()), all()).len(), 7);
        let c = Connection::open(&db).unwrap();
        assert_eq!(meta(&c, "version").unwrap(), Some(SCHEMA_VERSION));
    }

    #[test]
    fn a_corrupt_index_is_moved_aside_and_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let before = {
            let log = open(dir.path());
            fill(&log);
            query(&log, all())
        };
        for f in ["audit.sqlite-wal", "audit.sqlite-shm"] {
            let _ = std::fs::remove_file(dir.path().join(f));
        }
        let db = dir.path().join("audit.sqlite");
        std::fs::write(&db, b"this is not an SQLite database, but it is long enough to look like one ".repeat(100))
            .unwrap();
        let log = open(dir.path());
        assert_eq!(query(&log, all()), before);
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("audit.sqlite.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert!(std::fs::read(dir.path().join(&aside[0])).unwrap().starts_with(b"this is not"));
    }

    #[test]
    fn the_index_and_its_wal_files_are_0600() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        fill(&log);
        assert_eq!(query(&log, all()).len(), 6);
        for f in ["audit.sqlite", "audit.sqlite-wal", "audit.sqlite-shm"] {
            let m = std::fs::metadata(dir.path().join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "{f}");
        }
        let c = Connection::open(dir.path().join("audit.sqlite")).unwrap();
        let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn old_lines_without_vm_or_grants_still_parse_and_new_ones_omit_empty_fields() {
        let old = r#"{"ts_ms":5,"principal":"local:a","session":"","action":"login","cap":"Gateway","method":"loginLocal","outcome":"ok","detail":"","peer":""}"#;
        let r: AuditRecord = serde_json::from_str(old).unwrap();
        assert_eq!((r.vm.as_str(), r.grants.len()), ("", 0));
        let text = serde_json::to_string(&r).unwrap();
        assert!(!text.contains("\"vm\"") && !text.contains("grants"), "{text}");
        let text = serde_json::to_string(&r.vm("x")).unwrap();
        assert!(text.contains(r#""vm":"x""#), "{text}");
    }
}
