//! The hostile client: a separate process (this binary, `--hostile-child`)
//! that floods the gateway while the sessions phase runs: garbage
//! preambles, RPC preambles followed by garbage or oversized frames
//! (segment counts and sizes far above the gateway's guard), attaches with
//! made-up tokens, idle connections that only send the preamble (past the
//! per-uid bound), and wrong passwords for a real account. Every part is
//! bounded in count and time. It prints one JSON object on stdout with
//! what it saw.
//!
//! When the run is root, the child runs as uid/gid 65534 (nobody) with
//! only `CAP_DAC_OVERRIDE` (ambient, so it survives exec; capabilities(7))
//! to reach the owner's private socket: the gateway then sees another uid,
//! which is the attacker the per-uid bound is about. Otherwise it runs as
//! the run's uid and holds fewer idle connections than the bound, so the
//! well-behaved clients of the same uid are not locked out by design.

use capvisor_client::connect;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// What the flood did and saw.
#[derive(Default, Debug, Serialize, Deserialize)]
pub struct Report {
    /// uid the flood ran as.
    pub uid: u32,
    /// Connections with a garbage preamble.
    pub garbage: u64,
    /// RPC preamble + a frame announcing more segments or words than allowed.
    pub oversized: u64,
    /// RPC preamble + random bytes.
    pub garbage_frames: u64,
    /// Attaches with a made-up token.
    pub bogus_attach: u64,
    /// Of those, answered with a typed `staleSession` refusal.
    pub bogus_attach_refused: u64,
    /// Garbage / oversized connections the gateway closed without sending a byte.
    pub closed_silently: u64,
    /// Garbage-frame connections closed (an Abort message before may come from capnp-rpc).
    pub garbage_frames_closed: u64,
    /// Connections the gateway answered when it should not have, or kept open past the bound.
    pub misbehaved: Vec<String>,
    /// Idle (preamble-only) connections opened.
    pub idle: u64,
    /// Of those, closed within 1 s (past the per-uid bound).
    pub idle_closed_at_once: u64,
    /// Of those, closed by the login deadline.
    pub idle_closed_at_deadline: u64,
    /// Still open 15 s after opening.
    pub idle_never_closed: u64,
    /// Wrong-password attempts and their outcomes by code.
    pub wrong_passwords: BTreeMap<String, u64>,
    /// Longest time the gateway took to close a bad connection, ms.
    pub slowest_close_ms: u64,
}

/// Which part of the flood a child runs. Each runs as its own uid when we
/// are root, so the idle connections (which fill their uid's login
/// connection slots by design) do not turn the other part's RPC
/// connections away before they reach the frame guard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Idle preamble-only connections (uid 65534).
    Idle,
    /// Bad connections and wrong passwords (uid 65533).
    Bad,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Part::Idle => "idle",
            Part::Bad => "bad",
        }
    }
    fn uid(self) -> u32 {
        match self {
            Part::Idle => 65534,
            Part::Bad => 65533,
        }
    }
}

/// Flood parameters (the child's command line).
#[derive(Clone, Debug)]
pub struct Params {
    /// The part this child runs.
    pub part: Part,
    /// Gateway socket.
    pub socket: PathBuf,
    /// Bad connections of each kind.
    pub bad: usize,
    /// Idle connections.
    pub idle: usize,
    /// Wrong-password attempts.
    pub wrong: usize,
    /// Upper bound on the whole flood.
    pub limit: Duration,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64* (Vigna, "An experimental exploration of Marsaglia's xorshift generators").
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Reads until EOF, error or `limit`: (bytes received, closed in time, ms).
async fn drain(s: &mut UnixStream, limit: Duration) -> (usize, bool, u64) {
    let t0 = Instant::now();
    let mut got = 0usize;
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    })
    .await
    .is_ok();
    (got, closed, t0.elapsed().as_millis() as u64)
}

/// The flood (runs inside `run_local` in the child).
pub async fn flood(p: Params) -> Report {
    let mut rep = Report { uid: nix::unistd::geteuid().as_raw(), ..Default::default() };
    if p.part == Part::Idle {
        let (opened, at_once, at_deadline, never) = idle_part(p.socket.clone(), p.idle).await;
        rep.idle = opened;
        rep.idle_closed_at_once = at_once;
        rep.idle_closed_at_deadline = at_deadline;
        rep.idle_never_closed = never;
        return rep;
    }
    let t0 = Instant::now();
    let wrong = tokio::task::spawn_local(wrong_part(p.socket.clone(), p.wrong, p.limit));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    // Closing a bad connection must take well under the preamble timeout
    // (10 s): every kind below sends enough to be judged at once.
    let bound = Duration::from_secs(12);
    for i in 0..p.bad {
        if t0.elapsed() > p.limit {
            break;
        }
        // 1. A garbage preamble (never "CV..."), then EOF on our side.
        if let Ok(mut s) = UnixStream::connect(&p.socket).await {
            let n = 8 + (rng.next() % 56) as usize;
            let mut g = rng.bytes(n);
            g[0] = b'X';
            let _ = s.write_all(&g).await;
            let _ = s.shutdown().await;
            let (got, closed, ms) = drain(&mut s, bound).await;
            rep.garbage += 1;
            rep.slowest_close_ms = rep.slowest_close_ms.max(ms);
            if got == 0 && closed {
                rep.closed_silently += 1;
            } else {
                rep.misbehaved.push(format!("garbage preamble: {got} bytes back, closed={closed}"));
            }
        }
        // 2. RPC preamble + a frame over the guard's bounds, rotating:
        // too many segments, one huge segment, many segments summing high.
        if let Ok(mut s) = UnixStream::connect(&p.socket).await {
            let mut f = capvisor_rpc::attach::MAGIC_RPC.to_vec();
            match i % 3 {
                0 => f.extend_from_slice(&(u32::MAX - (rng.next() % 1000) as u32).to_le_bytes()),
                1 => {
                    f.extend_from_slice(&0u32.to_le_bytes());
                    f.extend_from_slice(&((4 << 20) + (rng.next() % (1 << 28)) as u32).to_le_bytes());
                }
                _ => {
                    f.extend_from_slice(&511u32.to_le_bytes());
                    for _ in 0..512 {
                        f.extend_from_slice(&(1u32 << 14).to_le_bytes());
                    }
                }
            }
            f.extend(rng.bytes(4096));
            let _ = s.write_all(&f).await;
            let (got, closed, ms) = drain(&mut s, bound).await;
            rep.oversized += 1;
            rep.slowest_close_ms = rep.slowest_close_ms.max(ms);
            if got == 0 && closed {
                rep.closed_silently += 1;
            } else {
                rep.misbehaved.push(format!("oversized frame #{i}: {got} bytes back, closed={closed}"));
            }
        }
        // 3. RPC preamble + a small well-framed message of random words,
        // then EOF: capnp-rpc may answer with an Abort, then closes.
        if let Ok(mut s) = UnixStream::connect(&p.socket).await {
            let words = 1 + (rng.next() % 64) as u32;
            let mut f = capvisor_rpc::attach::MAGIC_RPC.to_vec();
            f.extend_from_slice(&0u32.to_le_bytes());
            f.extend_from_slice(&words.to_le_bytes());
            f.extend(rng.bytes(words as usize * 8));
            let _ = s.write_all(&f).await;
            let _ = s.shutdown().await;
            let (got, closed, ms) = drain(&mut s, bound).await;
            rep.garbage_frames += 1;
            rep.slowest_close_ms = rep.slowest_close_ms.max(ms);
            if closed {
                rep.garbage_frames_closed += 1;
            } else {
                rep.misbehaved.push(format!("garbage frame: {got} bytes back, still open after {bound:?}"));
            }
        }
        // 4. An attach with a made-up token.
        if let Ok(mut s) = UnixStream::connect(&p.socket).await {
            let tok: String = rng.bytes(32).iter().map(|b| format!("{b:02x}")).collect();
            rep.bogus_attach += 1;
            if capvisor_rpc::attach::write_attach(&mut s, &tok).await.is_ok() {
                match tokio::time::timeout(bound, capvisor_rpc::attach::read_reply(&mut s)).await {
                    Ok(Ok(Err(e))) if e.code_name() == "staleSession" => rep.bogus_attach_refused += 1,
                    other => rep.misbehaved.push(format!("bogus attach answered {other:?}")),
                }
            }
        }
    }
    rep.wrong_passwords = wrong.await.unwrap_or_default();
    rep
}

/// Opens `n` preamble-only connections at once and watches them close.
/// Returns (opened, closed within 1 s, closed later within 15 s, never).
async fn idle_part(socket: PathBuf, n: usize) -> (u64, u64, u64, u64) {
    let mut conns = vec![];
    for _ in 0..n {
        if let Ok(mut s) = UnixStream::connect(&socket).await {
            if s.write_all(capvisor_rpc::attach::MAGIC_RPC).await.is_ok() {
                conns.push(s);
            }
        }
    }
    let t0 = Instant::now();
    let waits = conns.into_iter().map(|mut s| async move {
        let (_, closed, _) = drain(&mut s, Duration::from_secs(15)).await;
        (closed, t0.elapsed())
    });
    let res = futures::future::join_all(waits).await;
    let mut out = (res.len() as u64, 0, 0, 0);
    for (closed, at) in res {
        match (closed, at < Duration::from_secs(1)) {
            (true, true) => out.1 += 1,
            (true, false) => out.2 += 1,
            (false, _) => out.3 += 1,
        }
    }
    out
}

/// `n` wrong-password logins for the target account, three at a time
/// (one account: the broker runs one attempt at a time and denies the
/// others at once). Returns outcomes by code.
async fn wrong_part(socket: PathBuf, n: usize, limit: Duration) -> BTreeMap<String, u64> {
    let t0 = Instant::now();
    let mut out = BTreeMap::new();
    let mut i = 0;
    while i < n && t0.elapsed() < limit {
        let batch: Vec<_> = (i..(i + 3).min(n))
            .map(|k| {
                let socket = socket.clone();
                async move {
                    connect::login_password(&socket, crate::server::TARGET_ACCOUNT, &format!("wrong-guess-{k:04}"))
                        .await
                }
            })
            .collect();
        i += batch.len();
        for r in futures::future::join_all(batch).await {
            let code = match r {
                Ok(_) => "ok (a wrong password logged in!)".to_string(),
                Err(e) => crate::stats::code_name(&e),
            };
            *out.entry(code).or_default() += 1;
        }
    }
    out
}

impl Report {
    /// Adds `other`'s counts to ours (the two children's reports); `uid`
    /// becomes the idle part's.
    pub fn merge(&mut self, o: Report) {
        if o.idle > 0 {
            self.uid = o.uid;
        }
        self.garbage += o.garbage;
        self.oversized += o.oversized;
        self.garbage_frames += o.garbage_frames;
        self.bogus_attach += o.bogus_attach;
        self.bogus_attach_refused += o.bogus_attach_refused;
        self.closed_silently += o.closed_silently;
        self.garbage_frames_closed += o.garbage_frames_closed;
        self.misbehaved.extend(o.misbehaved);
        self.idle += o.idle;
        self.idle_closed_at_once += o.idle_closed_at_once;
        self.idle_closed_at_deadline += o.idle_closed_at_deadline;
        self.idle_never_closed += o.idle_never_closed;
        for (k, n) in o.wrong_passwords {
            *self.wrong_passwords.entry(k).or_default() += n;
        }
        self.slowest_close_ms = self.slowest_close_ms.max(o.slowest_close_ms);
    }
}

/// The child's `main`: parses its arguments, floods, prints the report.
pub fn child_main(args: &crate::Args) -> i32 {
    let p = Params {
        part: if args.hostile_part.as_deref() == Some("idle") { Part::Idle } else { Part::Bad },
        socket: args.socket.clone().unwrap_or_default(),
        bad: args.hostile_bad,
        idle: args.hostile_idle,
        wrong: args.hostile_wrong,
        limit: Duration::from_secs(args.hostile_secs),
    };
    let rep = capvisor_rpc::conn::run_local(flood(p));
    println!("{}", serde_json::to_string(&rep).expect("serialize"));
    0
}

/// Starts the flood child: as uid 65534 with only `CAP_DAC_OVERRIDE` when
/// we are root (module docs), else as ourselves. Its stdout is piped (the
/// JSON report).
pub fn spawn(me: &Path, p: &Params) -> std::io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(me);
    cmd.arg("--hostile-child")
        .args(["--hostile-part", p.part.name()])
        .arg("--socket")
        .arg(&p.socket)
        .args(["--hostile-bad", &p.bad.to_string()])
        .args(["--hostile-idle", &p.idle.to_string()])
        .args(["--hostile-wrong", &p.wrong.to_string()])
        .args(["--hostile-secs", &p.limit.as_secs().to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped());
    if nix::unistd::geteuid().is_root() {
        let uid = p.part.uid();
        // SAFETY: runs in the forked child before exec; it makes only raw
        // system calls (prctl, setgroups, setresgid, setresuid, capset),
        // which are async-signal-safe, and touches no memory but its stack.
        unsafe { cmd.pre_exec(move || drop_privileges(uid)) };
    }
    cmd.spawn()
}

/// capabilities(7): keep the permitted set across setresuid
/// (PR_SET_KEEPCAPS), become `uid` (and gid `uid`), keep only CAP_DAC_OVERRIDE in the
/// permitted, effective and inheritable sets, and raise it ambient so the
/// exec'd program keeps it.
fn drop_privileges(uid: u32) -> std::io::Result<()> {
    const CAP_DAC_OVERRIDE: u32 = 1;
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let err = |r: libc::c_long| if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
    // SAFETY: raw system calls with plain integer arguments or pointers to
    // live stack values of the layout the kernel expects (capget(2)).
    unsafe {
        err(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) as libc::c_long)?;
        err(libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()))?;
        err(libc::syscall(libc::SYS_setresgid, uid, uid, uid))?;
        err(libc::syscall(libc::SYS_setresuid, uid, uid, uid))?;
        let hdr = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
        let bit = 1u32 << CAP_DAC_OVERRIDE;
        let data = [
            Data { effective: bit, permitted: bit, inheritable: bit },
            Data { effective: 0, permitted: 0, inheritable: 0 },
        ];
        err(libc::syscall(libc::SYS_capset, &hdr as *const Header, data.as_ptr()))?;
        err(libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, CAP_DAC_OVERRIDE as libc::c_ulong, 0, 0)
            as libc::c_long)?;
    }
    Ok(())
}
