//! Audit index figures (`cargo bench -p capvisor-broker --bench audit_index`):
//! how fast the broker's writes reach the SQLite index (records written
//! through `AuditLog::write` with the index attached, until the writer
//! thread has them all), how long the event loop's side of a write takes
//! (the JSONL append plus the queue hand-off, per record), how long a
//! rebuild from the JSONL takes, and the latency of typical queries (by
//! VM, by time window, by grant) over the resulting index. Temporary
//! directory on the machine's disk; coalescing off so every record is a
//! line. Prints one line per figure.

use capvisor_broker::audit::{AuditLog, AuditRecord, GrantRef};
use capvisor_broker::audit_db::AuditQuery;
use std::time::{Duration, Instant};

const RECORDS: usize = 200_000;
const QUERIES: usize = 50;

fn record(i: usize) -> AuditRecord {
    let mut r = AuditRecord::new(["vm.exec", "vm.create", "capset.get", "login"][i % 4], "vms", "exec", "ok")
        .principal(&format!("password:user{}", i % 20))
        .session(&format!("{:032x}", i / 100))
        .vm(&format!("vm-{}", i % 50))
        .detail("/usr/bin/python3");
    r.ts_ms = 1_700_000_000_000 + i as i64 * 10;
    if i.is_multiple_of(10) {
        r.grants = vec![GrantRef { id: format!("g{}", i % 1000), label: "ci".into() }];
    }
    r
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("audit.jsonl");
    let db = dir.path().join("audit.sqlite");
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();

    let log = AuditLog::open_with_window(&jsonl, Duration::ZERO).unwrap().with_index(&db);
    let t = Instant::now();
    let mut written = Duration::ZERO;
    for i in 0..RECORDS {
        let w = Instant::now();
        log.write(record(i));
        written += w.elapsed();
        // Keep under the queue bound, as a broker's real rate does.
        if (i + 1).is_multiple_of(2048) {
            log.index().unwrap().sync();
        }
    }
    log.index().unwrap().sync();
    let indexed = t.elapsed();
    println!(
        "write: {RECORDS} records, JSONL + index hand-off {:.1} µs/record on the caller; all indexed after {:.2} s ({:.0} records/s)",
        written.as_secs_f64() * 1e6 / RECORDS as f64,
        indexed.as_secs_f64(),
        RECORDS as f64 / indexed.as_secs_f64()
    );
    let q = |q: AuditQuery| {
        let ix = log.index().unwrap();
        let mut times = Vec::new();
        let mut n = 0;
        for _ in 0..QUERIES {
            let t = Instant::now();
            n = rt.block_on(ix.query(q.clone())).unwrap().len();
            times.push(t.elapsed());
        }
        (median(times), n)
    };
    for (name, query) in [
        ("--vm vm-7 (limit 1000)", AuditQuery { vm: "vm-7".into(), ..Default::default() }),
        (
            "--since/--until 1000 records' window",
            AuditQuery { since_ms: 1_700_000_500_000, until_ms: 1_700_000_509_990, ..Default::default() },
        ),
        ("--grant g70", AuditQuery { grant: "g70".into(), ..Default::default() }),
        ("--action login --limit 10000", AuditQuery { action: "login".into(), limit: 10_000, ..Default::default() }),
    ] {
        let (t, n) = q(query);
        println!("query {name}: {n} entries, median {:.2} ms", t.as_secs_f64() * 1e3);
    }
    drop(log);

    for f in ["audit.sqlite", "audit.sqlite-wal", "audit.sqlite-shm"] {
        let _ = std::fs::remove_file(dir.path().join(f));
    }
    let t = Instant::now();
    let log = AuditLog::open(&jsonl).unwrap().with_index(&db);
    let rebuilt = t.elapsed();
    let size = std::fs::metadata(&jsonl).unwrap().len();
    println!(
        "rebuild: {RECORDS} lines ({:.1} MiB JSONL) in {:.2} s ({:.0} lines/s); index {:.1} MiB",
        size as f64 / (1 << 20) as f64,
        rebuilt.as_secs_f64(),
        RECORDS as f64 / rebuilt.as_secs_f64(),
        std::fs::metadata(&db).unwrap().len() as f64 / (1 << 20) as f64
    );
    assert!(log.index().is_some());
}
