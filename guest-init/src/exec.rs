//! `Guest.exec` and the `Process` capability: starting a program with
//! pipes or a pseudo-terminal, streaming its output into the caller's
//! `ByteSink`s, feeding its stdin, waiting for and signalling it.
//!
//! # Start-up (fork/exec by hand)
//! Children are forked with fork(2) and started with execve(2) directly,
//! not with `std::process` / `tokio::process`, so the pid is registered
//! with [`crate::reaper`] under the reaper's lock across the fork and no
//! library ever calls `waitpid` behind the reaper's back. Between fork and
//! exec the child only makes async-signal-safe calls: it unblocks all
//! signals and resets every disposition to `SIG_DFL` (guest-init ignores
//! `SIGPIPE`, like every Rust program), becomes a process-group leader
//! (`setpgid(0, 0)`; with a pty: `setsid()` and `TIOCSCTTY`, so the pty is
//! its controlling terminal), installs stdin/stdout/stderr, `chdir`s and
//! `execve`s. With `ExecSpec.user` it first takes that user's groups,
//! gid and uid (setgroups, setgid, setuid; looked up in the guest's
//! `/etc/passwd` and `/etc/group` by [`crate::rootfs::lookup_user`], an
//! unknown name is `invalidArgument` "no user NAME in the guest") and
//! starts in the user's home unless `cwd` is given; `HOME`, `USER`,
//! `LOGNAME` and `SHELL` are the user's. A failure in the child is reported to the parent over a
//! close-on-exec pipe (stage + errno), so `exec` answers with a typed
//! error instead of a process that exits 127.
//!
//! # Environment
//! Children do not inherit guest-init's environment. They get
//! [`default_env`] (`PATH`, `HOME=/root`, `USER`/`LOGNAME=root`,
//! `SHELL=/bin/sh`, `LANG=C.UTF-8`, and `TERM=xterm-256color` with a pty or
//! `TERM=dumb` with pipes), then `ExecSpec.env` in order; a later entry
//! replaces an earlier one of the same name. `argv[0]` without a `/` is
//! looked up in the resulting `PATH` (execvp(3) rules, but done before the
//! fork); with a `/` it is taken relative to `cwd`.
//!
//! # Output
//! Each output descriptor is read in chunks of at most [`capvisor_rpc::CHUNK`]
//! bytes and streamed into its sink honouring the sink's flow control
//! (`ByteSink.write` is a `stream` method), then `done` is called. If a
//! sink fails (the caller went away), the rest of that output is read and
//! discarded, so the child never blocks on a full pipe. With a pty both
//! streams arrive on the `stdout` sink (the `stderr` sink only gets `done`);
//! the pty master reading `EIO` (every slave descriptor closed) is its end.
//!
//! # Stdin
//! `ExecSpec.stdin` is written first, then more `Process.write` data in
//! call order. Closing stdin (`keepStdinOpen = false` after the initial
//! bytes, `closeStdin`, or dropping the `Process` cap) closes the pipe;
//! with a pty, where the terminal itself stays open, it writes the
//! terminal's `VEOF` character (^D) once instead, which a program reading
//! a terminal in canonical mode sees as end of input at the start of a line.
//!
//! # Lifetime
//! If the caller drops the `Process` capability (or the connection ends)
//! while the program runs, the program keeps running to completion: its
//! stdin is closed, its output is drained into the sinks (or discarded if
//! they are gone) and it is reaped. Nothing is killed implicitly.
//! `Process.wait` resolves once the program exited *and* both sinks got
//! `done` (or failed); a background process that keeps the output open
//! delays it (kill the group to end it, see `kill`).

use crate::fdio::FdStream;
use crate::reaper::{self, Exit};
use capnp::capability::Rc;
use capvisor_rpc::{CvError, CvResult, CHUNK};
use capvisor_schema::common_capnp::{byte_sink, process};
use std::cell::{Cell, RefCell};
use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

/// The default `PATH` of every child.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The environment every child starts from, before `ExecSpec.env` is applied
/// (see the module docs).
pub fn default_env(pty: bool) -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), "/root".into()),
        ("USER".into(), "root".into()),
        ("LOGNAME".into(), "root".into()),
        ("SHELL".into(), "/bin/sh".into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("TERM".into(), if pty { "xterm-256color" } else { "dumb" }.into()),
    ];
    env.extend(crate::trust::env());
    env
}

pub use capvisor_rpc::exec::ExecRequest;

/// Resolves `prog` like execvp(3): with a `/` relative to `cwd`, else the
/// first executable regular file named `prog` in `path` (`:`-separated;
/// empty entries are skipped).
///
/// Errors: `notFound` when nothing matches or the match is not an
/// executable regular file.
pub fn resolve_program(prog: &str, path: &str, cwd: &Path) -> CvResult<PathBuf> {
    if prog.is_empty() {
        return Err(CvError::invalid("argv[0] is empty"));
    }
    let check = |p: &Path| -> Result<(), String> {
        match std::fs::metadata(p) {
            Err(e) => Err(e.to_string()),
            Ok(m) if m.is_dir() => Err("is a directory".into()),
            Ok(m) if !m.is_file() => Err("is not a regular file".into()),
            Ok(_) => match nix::unistd::access(p, nix::unistd::AccessFlags::X_OK) {
                Ok(()) => Ok(()),
                Err(e) => Err(format!("not executable ({})", e.desc())),
            },
        }
    };
    if prog.contains('/') {
        let p = cwd.join(prog);
        return match check(&p) {
            Ok(()) => Ok(p),
            Err(why) => Err(CvError::not_found(format!("cannot execute {prog}: {why}"))),
        };
    }
    let mut first_problem: Option<String> = None;
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let p = cwd.join(dir).join(prog);
        match check(&p) {
            Ok(()) => return Ok(p),
            Err(why) => {
                if p.exists() && first_problem.is_none() {
                    first_problem = Some(format!("{}: {why}", p.display()));
                }
            }
        }
    }
    Err(CvError::not_found(match first_problem {
        Some(p) => format!("program {prog:?} is not executable ({p})"),
        None => format!("program {prog:?} not found in PATH={path}"),
    }))
}

fn cstring(s: &str, what: &str) -> CvResult<CString> {
    CString::new(s).map_err(|_| CvError::invalid(format!("{what} contains a NUL byte")))
}

fn pipe_cloexec() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// What the child gets as fds 0, 1, 2.
enum ChildStdio {
    Pipes { stdin: OwnedFd, stdout: OwnedFd, stderr: OwnedFd },
    Pty { slave: OwnedFd },
}

/// Credentials a child takes before exec (from [`crate::rootfs::User`]).
struct Ids {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

const STAGE_SETUP: u8 = 1;
const STAGE_USER: u8 = 4;
const STAGE_CHDIR: u8 = 2;
const STAGE_EXEC: u8 = 3;

/// Forks and execs; returns the pid and its exit receiver, or the child's
/// set-up / exec failure.
fn fork_exec(
    prog: &CStr,
    argv: &[CString],
    envp: &[CString],
    cwd: &CStr,
    stdio: ChildStdio,
    ids: Option<&Ids>,
) -> CvResult<(libc::pid_t, oneshot::Receiver<Exit>)> {
    let argv_ptrs: Vec<*const libc::c_char> =
        argv.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let envp_ptrs: Vec<*const libc::c_char> =
        envp.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let (err_r, err_w) = pipe_cloexec().map_err(|e| CvError::internal(format!("pipe: {e}")))?;
    let (fds, is_pty) = match &stdio {
        ChildStdio::Pipes { stdin, stdout, stderr } => {
            ([stdin.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd()], false)
        }
        ChildStdio::Pty { slave } => ([slave.as_raw_fd(); 3], true),
    };
    let err_w_raw = err_w.as_raw_fd();
    // SAFETY: an empty signal set we own.
    let empty_set = unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        s
    };

    let spawned = reaper::Registry::spawn_locked(|| {
        // SAFETY: fork(2). The child only runs `child_after_fork`, which
        // makes async-signal-safe calls and never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: we are the freshly forked child.
            unsafe { child_after_fork(prog, &argv_ptrs, &envp_ptrs, cwd, fds, is_pty, err_w_raw, &empty_set, ids) }
        }
        Ok(pid)
    });
    drop(stdio);
    drop(err_w);
    let (pid, exit_rx) = spawned.map_err(|e| {
        if e.raw_os_error() == Some(libc::EAGAIN) {
            CvError::unavailable(format!("fork: {e}"))
        } else {
            CvError::internal(format!("fork: {e}"))
        }
    })?;

    // Wait for exec (the pipe closes) or a failure report (5 bytes).
    let mut report = [0u8; 5];
    let mut got = 0;
    while got < report.len() {
        // SAFETY: reading into our buffer.
        let n = unsafe { libc::read(err_r.as_raw_fd(), report[got..].as_mut_ptr().cast(), report.len() - got) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if n == 0 {
            break;
        }
        got += n as usize;
    }
    if got == 0 {
        return Ok((pid, exit_rx));
    }
    // The child failed and exits with 127; the reaper collects it.
    let errno = i32::from_ne_bytes([report[1], report[2], report[3], report[4]]);
    let e = std::io::Error::from_raw_os_error(errno);
    let prog_s = prog.to_string_lossy();
    Err(match (report[0], errno) {
        (STAGE_CHDIR, libc::ENOENT | libc::ENOTDIR) => {
            CvError::not_found(format!("cwd {}: {e}", cwd.to_string_lossy()))
        }
        (STAGE_CHDIR, libc::EACCES) => CvError::denied(format!("cwd {}: {e}", cwd.to_string_lossy())),
        (STAGE_EXEC, libc::ENOENT | libc::EACCES | libc::ENOEXEC | libc::ENOTDIR | libc::ELOOP) => {
            CvError::not_found(format!("cannot execute {prog_s}: {e}"))
        }
        (STAGE_USER, libc::EPERM) => CvError::denied(format!("cannot switch user: {e}")),
        (STAGE_EXEC, libc::E2BIG) => CvError::invalid(format!("argument list too long: {e}")),
        (stage, _) => CvError::internal(format!("starting {prog_s} failed (stage {stage}): {e}")),
    })
}

/// Runs in the forked child; never returns.
///
/// # Safety
/// Must only be called in the child right after fork(2). Only
/// async-signal-safe functions are called; nothing allocates.
#[allow(clippy::too_many_arguments)]
unsafe fn child_after_fork(
    prog: &CStr,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    cwd: &CStr,
    fds: [RawFd; 3],
    is_pty: bool,
    err_w: RawFd,
    empty_set: &libc::sigset_t,
    ids: Option<&Ids>,
) -> ! {
    /// Reports `stage` and errno on `err_w` (5 bytes) and exits with 127.
    ///
    /// # Safety
    /// Only in the forked child (it calls `_exit`).
    unsafe fn fail(err_w: RawFd, stage: u8) -> ! {
        // SAFETY: errno is thread-local and always readable; write(2) and
        // _exit(2) are async-signal-safe and `buf` outlives the call.
        unsafe {
            let errno = *libc::__errno_location();
            let mut buf = [0u8; 5];
            buf[0] = stage;
            buf[1..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(err_w, buf.as_ptr().cast(), buf.len());
            libc::_exit(127)
        }
    }
    // SAFETY: the caller guarantees we are the freshly forked child. Every
    // call below is async-signal-safe; `argv` / `envp` are NULL-terminated
    // arrays of pointers into CStrings the parent keeps alive, and `cwd` /
    // `prog` are NUL-terminated.
    unsafe {
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        libc::sigprocmask(libc::SIG_SETMASK, empty_set, std::ptr::null_mut());
        if is_pty {
            if libc::setsid() < 0 {
                fail(err_w, STAGE_SETUP);
            }
        } else if libc::setpgid(0, 0) < 0 {
            fail(err_w, STAGE_SETUP);
        }
        // Move the sources above 2 first so none is clobbered by a dup2.
        let mut high = [0 as RawFd; 3];
        for i in 0..3 {
            high[i] = libc::fcntl(fds[i], libc::F_DUPFD_CLOEXEC, 10);
            if high[i] < 0 {
                fail(err_w, STAGE_SETUP);
            }
        }
        for (i, fd) in high.iter().enumerate() {
            if libc::dup2(*fd, i as RawFd) < 0 {
                fail(err_w, STAGE_SETUP);
            }
        }
        if is_pty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            fail(err_w, STAGE_SETUP);
        }
        // setgroups(2), setgid(2), setuid(2): raw system calls, no allocation.
        if let Some(ids) = ids {
            if libc::setgroups(ids.groups.len(), ids.groups.as_ptr()) < 0
                || libc::setgid(ids.gid) < 0
                || libc::setuid(ids.uid) < 0
            {
                fail(err_w, STAGE_USER);
            }
        }
        if libc::chdir(cwd.as_ptr()) < 0 {
            fail(err_w, STAGE_CHDIR);
        }
        libc::execve(prog.as_ptr(), argv.as_ptr(), envp.as_ptr());
        fail(err_w, STAGE_EXEC)
    }
}

/// Validates `req`, starts the program and returns its `Process` cap.
/// Output streams into `stdout` / `stderr` (see the module docs).
///
/// Errors (domain): empty argv / NUL bytes / bad env names ->
/// `invalidArgument`; program or cwd missing or not executable ->
/// `notFound`; cwd not searchable -> `denied`; pty or fork failure ->
/// `unavailable` / `internal`.
///
/// Must be called inside a `LocalSet`.
pub fn start(req: ExecRequest, stdout: byte_sink::Client, stderr: byte_sink::Client) -> CvResult<process::Client> {
    let server = start_server(req, stdout, stderr)?;
    Ok(capnp_rpc::new_client(server))
}

fn start_server(req: ExecRequest, stdout: byte_sink::Client, stderr: byte_sink::Client) -> CvResult<ProcessServer> {
    if req.argv.is_empty() {
        return Err(CvError::invalid("argv is empty"));
    }
    if let Some((rows, cols)) = req.pty {
        if rows == 0 || cols == 0 {
            return Err(CvError::invalid("pty size must be at least 1x1"));
        }
    }
    // User (guest /etc/passwd, /etc/group); empty: root as before.
    let user = if req.user.is_empty() {
        None
    } else {
        Some(crate::rootfs::lookup_user_here(&req.user).map_err(CvError::invalid)?)
    };
    // Environment.
    let mut env = default_env(req.pty.is_some());
    if let Some(u) = &user {
        for (k, v) in [("HOME", &u.home), ("USER", &u.name), ("LOGNAME", &u.name), ("SHELL", &u.shell)] {
            if let Some(slot) = env.iter_mut().find(|(n, _)| n == k) {
                slot.1 = v.clone();
            }
        }
    }
    for (n, v) in &req.env {
        if n.is_empty() || n.contains('=') || n.contains('\0') {
            return Err(CvError::invalid(format!("bad environment variable name {n:?}")));
        }
        match env.iter_mut().find(|(k, _)| k == n) {
            Some(slot) => slot.1 = v.clone(),
            None => env.push((n.clone(), v.clone())),
        }
    }
    let envp = env
        .iter()
        .map(|(n, v)| cstring(&format!("{n}={v}"), "an environment variable"))
        .collect::<CvResult<Vec<_>>>()?;
    let argv = req.argv.iter().map(|a| cstring(a, "argv")).collect::<CvResult<Vec<_>>>()?;

    // Working directory.
    let default_cwd = user.as_ref().map(|u| u.home.as_str()).unwrap_or("/");
    let cwd = Path::new("/").join(if req.cwd.is_empty() { default_cwd } else { &req.cwd });
    match std::fs::metadata(&cwd) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(CvError::invalid(format!("cwd {} is not a directory", cwd.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(CvError::denied(format!("cwd {}: {e}", cwd.display())))
        }
        Err(e) => return Err(CvError::not_found(format!("cwd {}: {e}", cwd.display()))),
    }
    let cwd_c = cstring(&cwd.to_string_lossy(), "cwd")?;

    // Program.
    let path_var = env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str()).unwrap_or("");
    let prog = resolve_program(&req.argv[0], path_var, &cwd)?;
    let prog_c = cstring(&prog.to_string_lossy(), "program path")?;

    // Descriptors.
    let io_err = |what: &str, e: std::io::Error| CvError::internal(format!("{what}: {e}"));
    let (stdio, stdin_fd, stdout_fd, stderr_fd, master) = match req.pty {
        Some((rows, cols)) => {
            let p = crate::pty::open(rows, cols)
                .map_err(|e| CvError::unavailable(format!("cannot allocate a pseudo-terminal: {e}")))?;
            let master = FdStream::new_pty_master(p.master).map_err(|e| io_err("pty master", e))?;
            (ChildStdio::Pty { slave: p.slave }, None, None, None, Some(master))
        }
        None => {
            let (in_r, in_w) = pipe_cloexec().map_err(|e| io_err("pipe", e))?;
            let (out_r, out_w) = pipe_cloexec().map_err(|e| io_err("pipe", e))?;
            let (err_r, err_w) = pipe_cloexec().map_err(|e| io_err("pipe", e))?;
            (
                ChildStdio::Pipes { stdin: in_r, stdout: out_w, stderr: err_w },
                Some(in_w),
                Some(out_r),
                Some(err_r),
                None,
            )
        }
    };
    let ids = user.map(|u| Ids { uid: u.uid, gid: u.gid, groups: u.groups });
    let (pid, exit_rx) = fork_exec(&prog_c, &argv, &envp, &cwd_c, stdio, ids.as_ref())?;

    // Readers and the stdin writer.
    let (out_reader, err_reader, stdin_writer, pty_eof) = match &master {
        Some(m) => (m.clone(), None, m.clone(), Some(crate::pty::eof_char(m.raw()))),
        None => {
            let mk = |fd: Option<OwnedFd>| FdStream::new(fd.expect("pipe end")).map_err(|e| io_err("register pipe", e));
            (mk(stdout_fd)?, Some(mk(stderr_fd)?), mk(stdin_fd)?, None)
        }
    };

    let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
    if !req.stdin.is_empty() {
        let _ = stdin_tx.send(StdinMsg { data: req.stdin, ack: None });
    }
    tokio::task::spawn_local(stdin_task(stdin_writer, stdin_rx, pty_eof));

    let leader_exited = std::rc::Rc::new(Cell::new(false));
    let (finished_tx, finished_rx) = watch::channel(None);
    let le = leader_exited.clone();
    tokio::task::spawn_local(async move {
        let exit = async {
            let e = exit_rx.await.unwrap_or(Exit::Signal(libc::SIGKILL));
            le.set(true);
            e
        };
        let out = pump_or_drain(Some(out_reader), stdout);
        let err = pump_or_drain(err_reader, stderr);
        let (exit, _, _) = futures::join!(exit, out, err);
        let _ = finished_tx.send(Some(exit));
    });

    Ok(ProcessServer {
        pid,
        master,
        stdin: RefCell::new(if req.keep_stdin_open { Some(stdin_tx) } else { None }),
        finished: finished_rx,
        leader_exited,
    })
}

struct StdinMsg {
    data: Vec<u8>,
    ack: Option<oneshot::Sender<Result<(), String>>>,
}

/// Writes queued stdin data in order; when every sender is gone, closes
/// stdin (drops the pipe end, or sends `VEOF` on a pty).
async fn stdin_task(mut w: FdStream, mut rx: mpsc::UnboundedReceiver<StdinMsg>, pty_eof: Option<u8>) {
    let mut broken: Option<String> = None;
    while let Some(msg) = rx.recv().await {
        let r = match &broken {
            Some(e) => Err(e.clone()),
            None => w.write_all(&msg.data).await.map_err(|e| format!("writing stdin: {e}")),
        };
        if let Err(e) = &r {
            broken = Some(e.clone());
        }
        if let Some(ack) = msg.ack {
            let _ = ack.send(r);
        }
    }
    if let (Some(eof), None) = (pty_eof, &broken) {
        let _ = w.write_all(&[eof]).await;
    }
}

/// Streams `reader` into `sink` (chunks <= CHUNK), then `done`. After a sink
/// failure, reads and discards the rest. With no reader just sends `done`.
async fn pump_or_drain(reader: Option<FdStream>, sink: byte_sink::Client) {
    let mut sink_ok = true;
    if let Some(mut reader) = reader {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match reader.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    eprintln!("guest-init: reading child output: {e}");
                    break;
                }
            };
            if sink_ok {
                let mut req = sink.write_request();
                req.get().set_data(&buf[..n]);
                if req.send().await.is_err() {
                    sink_ok = false;
                }
            }
        }
    }
    if sink_ok {
        let _ = sink.done_request().send().promise.await;
    }
}

/// The `Process` capability of one started program.
pub struct ProcessServer {
    pid: libc::pid_t,
    master: Option<FdStream>,
    stdin: RefCell<Option<mpsc::UnboundedSender<StdinMsg>>>,
    finished: watch::Receiver<Option<Exit>>,
    leader_exited: std::rc::Rc<Cell<bool>>,
}

impl ProcessServer {
    /// The child's pid (also its process-group id).
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }
}

impl process::Server for ProcessServer {
    /// Queues `data` for stdin (synchronously, so writes keep call order)
    /// and resolves once it was written. Fails once stdin is closed.
    fn write(
        self: Rc<Self>,
        params: process::WriteParams,
    ) -> impl std::future::Future<Output = capnp::Result<()>> + 'static {
        let queued = (|| -> capnp::Result<oneshot::Receiver<Result<(), String>>> {
            let data = params.get()?.get_data()?.to_vec();
            let guard = self.stdin.borrow();
            let tx = guard.as_ref().ok_or_else(|| capnp::Error::failed("stdin is closed".into()))?;
            let (ack, rx) = oneshot::channel();
            tx.send(StdinMsg { data, ack: Some(ack) }).map_err(|_| capnp::Error::failed("stdin is closed".into()))?;
            Ok(rx)
        })();
        async move {
            match queued?.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(capnp::Error::failed(e)),
                Err(_) => Err(capnp::Error::failed("stdin is closed".into())),
            }
        }
    }

    /// Closes stdin (idempotent). Always succeeds.
    async fn close_stdin(
        self: Rc<Self>,
        _: process::CloseStdinParams,
        _: process::CloseStdinResults,
    ) -> capnp::Result<()> {
        self.stdin.borrow_mut().take();
        Ok(())
    }

    /// Resolves after the process exited and both sinks got `done`.
    async fn wait(self: Rc<Self>, _: process::WaitParams, mut results: process::WaitResults) -> capnp::Result<()> {
        let mut rx = self.finished.clone();
        let exit = match rx.wait_for(|s| s.is_some()).await {
            Ok(v) => (*v).expect("checked"),
            Err(_) => return Err(CvError::internal("the process supervisor ended without a status").into()),
        };
        match exit {
            Exit::Code(c) => results.get().init_status().set_code(c),
            Exit::Signal(s) => results.get().init_status().set_signal(s),
        }
        Ok(())
    }

    /// Sends `signal` to the process's group (the program and anything it
    /// started that did not leave the group). After `wait` would resolve:
    /// `notRunning`. A bad signal number: `invalidArgument`.
    async fn kill(self: Rc<Self>, params: process::KillParams, _: process::KillResults) -> capnp::Result<()> {
        let sig = params.get()?.get_signal();
        let r = (|| {
            if !(1..=64).contains(&sig) {
                return Err(CvError::invalid(format!("bad signal number {sig}")));
            }
            if self.finished.borrow().is_some() {
                return Err(CvError::not_running("the process has exited"));
            }
            let map = |e: std::io::Error| {
                if e.raw_os_error() == Some(libc::EINVAL) {
                    CvError::invalid(format!("bad signal number {sig}"))
                } else {
                    CvError::internal(format!("kill: {e}"))
                }
            };
            if !self.leader_exited.get() && reaper::signal_group(self.pid, sig).map_err(map)? {
                return Ok(());
            }
            // The leader is gone but its output is still open: signal what
            // is left of its group.
            reaper::signal_orphaned_group(self.pid, sig).map_err(map)?;
            Ok(())
        })();
        Ok(r?)
    }

    /// Sets the pty's window size (`TIOCSWINSZ`). Without a pty, or with a
    /// zero dimension: `invalidArgument`.
    async fn resize(self: Rc<Self>, params: process::ResizeParams, _: process::ResizeResults) -> capnp::Result<()> {
        let size = params.get()?.get_size()?;
        let (rows, cols) = (size.get_rows(), size.get_cols());
        let r = match &self.master {
            None => Err(CvError::invalid("the process has no pseudo-terminal")),
            Some(_) if rows == 0 || cols == 0 => Err(CvError::invalid("pty size must be at least 1x1")),
            Some(m) => {
                crate::pty::set_size(m.raw(), rows, cols).map_err(|e| CvError::internal(format!("TIOCSWINSZ: {e}")))
            }
        };
        Ok(r?)
    }
}
