//! Guest protocol tests on the host: guest-init's servers run in-process
//! behind a real capnp-rpc connection over a Unix socketpair (the client
//! dials as `Side::Client`, exactly like the worker does toward a VM).

use capvisor_guest_init::exec::ExecRequest;
use capvisor_guest_init::{boottime_ms, serve_stream, GuestServer, ShutdownMode};
use capvisor_rpc::conn::{self, INTERNAL};
use capvisor_rpc::sink::CollectSink;
use capvisor_rpc::CvError;
use capvisor_schema::common_capnp::{exit_status, process, ErrorCode, FileKind};
use capvisor_schema::guest_capnp::guest;
use std::future::Future;
use std::time::Duration;

const LIMIT: usize = 64 << 20;

/// Runs `f` against a fresh Guest server, with a 30 s guard.
fn with_guest<F, Fut>(f: F)
where
    F: FnOnce(guest::Client) -> Fut,
    Fut: Future<Output = ()>,
{
    conn::run_local(async move {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let guest = GuestServer::new(boottime_ms(), ShutdownMode::EndServing).into_client();
        tokio::task::spawn_local(serve_stream(a, guest));
        let (client, _h): (guest::Client, _) = conn::connect(b, None, INTERNAL);
        tokio::time::timeout(Duration::from_secs(30), f(client)).await.expect("test timed out");
    })
}

fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest { argv: argv.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

struct Started {
    process: process::Client,
    out: tokio::sync::oneshot::Receiver<Vec<u8>>,
    err: tokio::sync::oneshot::Receiver<Vec<u8>>,
}

async fn exec(g: &guest::Client, r: &ExecRequest) -> Result<Started, CvError> {
    let (out_sink, out) = CollectSink::client(LIMIT);
    let (err_sink, err) = CollectSink::client(LIMIT);
    let mut q = g.exec_request();
    {
        let mut p = q.get();
        p.set_stdout(out_sink);
        p.set_stderr(err_sink);
        r.write_to(p.init_spec());
    }
    match q.send().promise.await {
        Ok(resp) => Ok(Started { process: resp.get().unwrap().get_process().unwrap(), out, err }),
        Err(e) => Err(domain(e)),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Status {
    Code(i32),
    Signal(i32),
}

async fn wait(p: &process::Client) -> Status {
    let resp = p.wait_request().send().promise.await.unwrap_or_else(|e| panic!("wait failed: {e}"));
    match resp.get().unwrap().get_status().unwrap().which().unwrap() {
        exit_status::Code(c) => Status::Code(c),
        exit_status::Signal(s) => Status::Signal(s),
    }
}

/// Exec, wait, and collect both outputs (as UTF-8).
async fn run(g: &guest::Client, r: &ExecRequest) -> (Status, String, String) {
    let s = exec(g, r).await.unwrap_or_else(|e| panic!("exec {:?}: {e}", r.argv));
    let st = wait(&s.process).await;
    // wait resolves only after both sinks got done: outputs are complete now.
    let out = s.out.await.expect("stdout done before wait returned");
    let err = s.err.await.expect("stderr done before wait returned");
    (st, String::from_utf8_lossy(&out).into_owned(), String::from_utf8_lossy(&err).into_owned())
}

/// The typed domain error an exception carries (panics on any other failure).
fn domain(e: capnp::Error) -> CvError {
    CvError::from_rpc(&e).unwrap_or_else(|| panic!("not a domain error: {e}"))
}

fn unit_err<T>(r: capnp::Result<T>) -> Option<CvError> {
    r.err().map(domain)
}

async fn kill(p: &process::Client, sig: i32) -> Option<CvError> {
    let mut q = p.kill_request();
    q.get().set_signal(sig);
    unit_err(q.send().promise.await)
}

async fn resize(p: &process::Client, rows: u16, cols: u16) -> Option<CvError> {
    let mut q = p.resize_request();
    let mut s = q.get().init_size();
    s.set_rows(rows);
    s.set_cols(cols);
    unit_err(q.send().promise.await)
}

async fn write_stdin(p: &process::Client, data: &[u8]) -> capnp::Result<()> {
    let mut q = p.write_request();
    q.get().set_data(data);
    q.send().await
}

async fn close_stdin(p: &process::Client) {
    assert!(unit_err(p.close_stdin_request().send().promise.await).is_none());
}

#[test]
fn hello_and_ping() {
    with_guest(|g| async move {
        g.ping_request().send().promise.await.unwrap();
        let r = g.hello_request().send().promise.await.unwrap();
        let info = r.get().unwrap().get_info().unwrap();
        let release = info.get_kernel_release().unwrap().to_str().unwrap().to_string();
        let expected =
            String::from_utf8(std::process::Command::new("uname").arg("-r").output().unwrap().stdout).unwrap();
        assert_eq!(release, expected.trim());
        assert!(info.get_uptime_ms() >= info.get_init_ready_ms());
        assert!(info.get_init_ready_ms() > 0);
    });
}

#[test]
fn exit_code_stdout_stderr() {
    with_guest(|g| async move {
        let (st, out, err) = run(&g, &req(&["sh", "-c", "echo out; echo err >&2; exit 3"])).await;
        assert_eq!(st, Status::Code(3));
        assert_eq!(out, "out\n");
        assert_eq!(err, "err\n");
    });
}

#[test]
fn env_cwd_and_defaults() {
    with_guest(|g| async move {
        let mut r = req(&["sh", "-c", "echo $FOO:$TERM:$HOME:$PATH; pwd"]);
        r.env = vec![("FOO".into(), "bar".into())];
        r.cwd = "/tmp".into();
        let (st, out, _) = run(&g, &r).await;
        assert_eq!(st, Status::Code(0));
        assert_eq!(out, format!("bar:dumb:/root:{}\n/tmp\n", capvisor_guest_init::exec::DEFAULT_PATH));
        // spec.env overrides a default.
        let mut r = req(&["sh", "-c", "echo $HOME"]);
        r.env = vec![("HOME".into(), "/elsewhere".into())];
        assert_eq!(run(&g, &r).await.1, "/elsewhere\n");
        // Empty cwd is "/".
        assert_eq!(run(&g, &req(&["pwd"])).await.1, "/\n");
    });
}

#[test]
fn stdin_bytes_then_closed() {
    with_guest(|g| async move {
        let mut r = req(&["cat"]);
        r.stdin = b"hello\nworld\n".to_vec();
        let (st, out, _) = run(&g, &r).await;
        assert_eq!(st, Status::Code(0));
        assert_eq!(out, "hello\nworld\n");
        // No stdin at all: cat sees EOF at once.
        let (st, out, _) = run(&g, &req(&["cat"])).await;
        assert_eq!((st, out.as_str()), (Status::Code(0), ""));
    });
}

#[test]
fn stdin_kept_open_write_close() {
    with_guest(|g| async move {
        let mut r = req(&["cat"]);
        r.stdin = b"first ".to_vec();
        r.keep_stdin_open = true;
        let s = exec(&g, &r).await.unwrap();
        write_stdin(&s.process, b"second ").await.unwrap();
        let big = vec![b'x'; 300_000]; // larger than a pipe buffer
        write_stdin(&s.process, &big).await.unwrap();
        write_stdin(&s.process, b" third").await.unwrap();
        close_stdin(&s.process).await;
        assert_eq!(wait(&s.process).await, Status::Code(0));
        let out = s.out.await.unwrap();
        let mut expect = b"first second ".to_vec();
        expect.extend_from_slice(&big);
        expect.extend_from_slice(b" third");
        assert_eq!(out.len(), expect.len());
        assert!(out == expect);
        // Writing after close fails. (A streaming call's failure reaches the
        // caller on a later call on that cap, so try a few times.)
        let mut failed = false;
        for _ in 0..5 {
            if write_stdin(&s.process, b"late").await.is_err() {
                failed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(failed, "write after closeStdin must fail");
    });
}

#[test]
fn kill_sleep_with_sigkill() {
    with_guest(|g| async move {
        let s = exec(&g, &req(&["sleep", "100"])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(kill(&s.process, 9).await.is_none());
        assert_eq!(wait(&s.process).await, Status::Signal(9));
        // Several waits all get the status.
        assert_eq!(wait(&s.process).await, Status::Signal(9));
        // After it ended: notRunning; bad signal: invalidArgument.
        assert_eq!(kill(&s.process, 15).await.unwrap().code, ErrorCode::NotRunning);
        assert_eq!(kill(&s.process, 0).await.unwrap().code, ErrorCode::InvalidArgument);
    });
}

#[test]
fn kill_reaches_the_process_group() {
    // The shell's child `sleep` holds stdout open; killing only the shell
    // would leave wait hanging. Group delivery ends both.
    with_guest(|g| async move {
        let s = exec(&g, &req(&["sh", "-c", "sleep 100; echo never"])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(kill(&s.process, 15).await.is_none());
        assert_eq!(wait(&s.process).await, Status::Signal(15));
        assert_eq!(s.out.await.unwrap(), b"");
    });
}

#[test]
fn bad_requests_are_typed_errors() {
    with_guest(|g| async move {
        let e = exec(&g, &req(&[])).await.err().expect("empty argv must fail");
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        let e = exec(&g, &req(&["/nonexistent"])).await.err().expect("/nonexistent must fail");
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(e.message.contains("/nonexistent"), "{}", e.message);
        let e = exec(&g, &req(&["no-such-program-cv"])).await.err().expect("unknown program must fail");
        assert_eq!(e.code, ErrorCode::NotFound);
        let e = exec(&g, &req(&["/etc/hostname"])).await.err().expect("non-executable must fail");
        assert_eq!(e.code, ErrorCode::NotFound);
        let mut r = req(&["true"]);
        r.cwd = "/no/such/dir".into();
        assert_eq!(exec(&g, &r).await.err().unwrap().code, ErrorCode::NotFound);
        let mut r = req(&["true"]);
        r.env = vec![("A=B".into(), "x".into())];
        assert_eq!(exec(&g, &r).await.err().unwrap().code, ErrorCode::InvalidArgument);
        // A file that exists and is executable but cannot be exec'd (no #!, not ELF) -> notFound, not an exception.
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"\x00\x01\x02 not a program").unwrap();
        std::os::unix::fs::PermissionsExt::set_mode(&mut std::fs::metadata(&junk).unwrap().permissions(), 0o755);
        std::fs::set_permissions(&junk, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let e = exec(&g, &req(&[junk.to_str().unwrap()])).await.err().expect("junk must fail");
        assert_eq!(e.code, ErrorCode::NotFound, "{e}");
        // Resize without a pty.
        let s = exec(&g, &req(&["true"])).await.unwrap();
        assert_eq!(resize(&s.process, 10, 10).await.unwrap().code, ErrorCode::InvalidArgument);
        assert_eq!(wait(&s.process).await, Status::Code(0));
    });
}

#[test]
fn four_mib_of_output_arrives_complete() {
    with_guest(|g| async move {
        let (st, out, _) = run(&g, &req(&["head", "-c", "4194304", "/dev/zero"])).await;
        assert_eq!(st, Status::Code(0));
        assert_eq!(out.len(), 4 * 1024 * 1024);
        assert!(out.bytes().all(|b| b == 0));
    });
}

#[test]
fn pty_tty_and_resize() {
    with_guest(|g| async move {
        let mut r = req(&["tty"]);
        r.pty = Some((24, 80));
        let (st, out, err) = run(&g, &r).await;
        assert_eq!(st, Status::Code(0));
        assert!(out.starts_with("/dev/pts/"), "tty printed {out:?}");
        assert_eq!(err, "", "with a pty everything goes to stdout");

        let mut r = req(&["sh", "-c", "stty size; echo TERM=$TERM"]);
        r.pty = Some((24, 80));
        let (st, out, _) = run(&g, &r).await;
        assert_eq!(st, Status::Code(0));
        assert!(out.contains("24 80"), "{out:?}");

        // Resize while it waits for a line, then let it print the size.
        let mut r = req(&["sh", "-c", "read x; stty size"]);
        r.pty = Some((24, 80));
        r.keep_stdin_open = true;
        let s = exec(&g, &r).await.unwrap();
        assert!(resize(&s.process, 30, 100).await.is_none());
        assert_eq!(resize(&s.process, 0, 100).await.unwrap().code, ErrorCode::InvalidArgument);
        write_stdin(&s.process, b"go\n").await.unwrap();
        assert_eq!(wait(&s.process).await, Status::Code(0));
        let resized = String::from_utf8(s.out.await.unwrap()).unwrap();
        assert!(resized.contains("30 100"), "{resized:?}");
        assert!(!resized.contains("24 80"), "{resized:?}");
        assert!(out.contains("TERM=xterm-256color"), "{out:?}");
    });
}

#[test]
fn pty_close_stdin_sends_eof() {
    with_guest(|g| async move {
        let mut r = req(&["cat"]);
        r.pty = Some((24, 80));
        r.stdin = b"abc\n".to_vec();
        r.keep_stdin_open = false; // -> ^D after the bytes
        let (st, out, _) = run(&g, &r).await;
        assert_eq!(st, Status::Code(0));
        // The terminal echoes the input and cat prints it again.
        assert_eq!(out.matches("abc").count(), 2, "{out:?}");
    });
}

#[test]
fn dropped_process_cap_keeps_running() {
    with_guest(|g| async move {
        let mut r = req(&["sh", "-c", "cat; sleep 0.2; echo late"]);
        r.keep_stdin_open = true; // dropping the cap must close stdin so cat ends
        let s = exec(&g, &r).await.unwrap();
        drop(s.process);
        let out = s.out.await.expect("output still arrives");
        assert_eq!(out, b"late\n");
    });
}

#[test]
fn concurrent_execs() {
    with_guest(|g| async move {
        let futs = (0..8).map(|i| {
            let g = g.clone();
            async move {
                let n = i.to_string();
                let (st, out, _) = run(&g, &req(&["sh", "-c", "sleep 0.5; echo $0; exit $0", &n])).await;
                assert_eq!(st, Status::Code(i));
                assert_eq!(out, format!("{i}\n"));
            }
        });
        let t = std::time::Instant::now();
        futures::future::join_all(futs).await;
        assert!(t.elapsed() < Duration::from_millis(3000), "execs did not run concurrently: {:?}", t.elapsed());
    });
}

async fn files_cap(g: &guest::Client) -> capvisor_schema::common_capnp::files::Client {
    g.files_request().send().promise.await.unwrap().get().unwrap().get_files().unwrap()
}

async fn read_file(f: &capvisor_schema::common_capnp::files::Client, path: &str) -> Result<Vec<u8>, CvError> {
    let (sink, rx) = CollectSink::client(LIMIT);
    let mut q = f.read_request();
    q.get().set_path(path);
    q.get().set_sink(sink);
    let r = q.send().promise.await.map_err(domain)?;
    let n = r.get().unwrap().get_size();
    let data = rx.await.unwrap();
    assert_eq!(n, data.len() as u64);
    Ok(data)
}

async fn write_file(
    f: &capvisor_schema::common_capnp::files::Client,
    path: &str,
    mode: u32,
    data: &[u8],
) -> Result<(), CvError> {
    let mut q = f.write_request();
    q.get().set_path(path);
    q.get().set_mode(mode);
    let r = q.send().promise.await.map_err(domain)?;
    let sink = r.get().unwrap().get_sink().unwrap();
    capvisor_rpc::sink::write_all(&sink, data).await.unwrap();
    sink.done_request().send().promise.await.unwrap();
    Ok(())
}

async fn list(
    f: &capvisor_schema::common_capnp::files::Client,
    path: &str,
) -> Result<Vec<(String, FileKind, u64, u32)>, CvError> {
    let mut q = f.list_request();
    q.get().set_path(path);
    let r = q.send().promise.await.map_err(domain)?;
    Ok(r.get()
        .unwrap()
        .get_entries()
        .unwrap()
        .iter()
        .map(|e| (e.get_name().unwrap().to_string().unwrap(), e.get_kind().unwrap(), e.get_size(), e.get_mode()))
        .collect())
}

#[test]
fn files_write_read_list() {
    with_guest(|g| async move {
        let f = files_cap(&g).await;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap().to_string();
        let data: Vec<u8> = (0..1024 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        let path = format!("{d}/big.bin");
        write_file(&f, &path, 0o640, &data).await.unwrap();
        assert!(read_file(&f, &path).await.unwrap() == data);
        // Overwrite is atomic and leaves no temporary files behind.
        write_file(&f, &path, 0o600, b"small").await.unwrap();
        assert_eq!(read_file(&f, &path).await.unwrap(), b"small");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        write_file(&f, &format!("{d}/a.txt"), 0, b"abc").await.unwrap();
        let l = list(&f, &d).await.unwrap();
        assert_eq!(l.len(), 3, "{l:?}");
        assert_eq!(l[0], ("a.txt".to_string(), FileKind::File, 3, 0o644)); // mode 0 -> 0644
        assert_eq!(l[1], ("big.bin".to_string(), FileKind::File, 5, 0o600));
        assert_eq!((l[2].0.as_str(), l[2].1), ("sub", FileKind::Dir));
        // Error mapping.
        assert_eq!(read_file(&f, &format!("{d}/missing")).await.unwrap_err().code, ErrorCode::NotFound);
        assert_eq!(read_file(&f, &d).await.unwrap_err().code, ErrorCode::InvalidArgument);
        assert_eq!(read_file(&f, "relative/path").await.unwrap_err().code, ErrorCode::InvalidArgument);
        assert_eq!(list(&f, &format!("{d}/missing")).await.unwrap_err().code, ErrorCode::NotFound);
        assert_eq!(list(&f, &path).await.unwrap_err().code, ErrorCode::InvalidArgument);
        assert_eq!(write_file(&f, &format!("{d}/nodir/x"), 0o644, b"x").await.unwrap_err().code, ErrorCode::NotFound);
        assert_eq!(
            write_file(&f, &format!("{d}/sub"), 0o644, b"x").await.unwrap_err().code,
            ErrorCode::InvalidArgument
        );
    });
}

#[test]
fn files_write_abandoned_leaves_target_untouched() {
    with_guest(|g| async move {
        let f = files_cap(&g).await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keep.txt");
        std::fs::write(&path, b"original").unwrap();
        let mut q = f.write_request();
        q.get().set_path(path.to_str().unwrap());
        q.get().set_mode(0o644);
        let r = q.send().promise.await.unwrap();
        let sink = r.get().unwrap().get_sink().unwrap();
        capvisor_rpc::sink::write_all(&sink, b"partial").await.unwrap();
        drop(sink);
        drop(r);
        // Let the release reach the server.
        g.ping_request().send().promise.await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(std::fs::read(&path).unwrap(), b"original");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("keep.txt")], "temp file left behind");
    });
}

#[test]
fn binary_serve_fd_and_shutdown() {
    // The real binary in host test mode: serve on an inherited socket,
    // answer hello, and exit 0 after shutdown.
    use std::os::fd::{AsRawFd, IntoRawFd};
    use std::os::unix::process::CommandExt;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = theirs.into_raw_fd();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_capvisor-guest-init"));
    cmd.arg("--serve-fd").arg("3");
    // SAFETY: dup2 in the child is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    // SAFETY: `fd` came from `into_raw_fd` above and nothing else owns it;
    // the child has its own copy at descriptor 3.
    unsafe { libc::close(fd) };
    let _ = ours.as_raw_fd();
    conn::run_local(async move {
        ours.set_nonblocking(true).unwrap();
        let stream = tokio::net::UnixStream::from_std(ours).unwrap();
        let (g, _h): (guest::Client, _) = conn::connect(stream, None, INTERNAL);
        let r = g.hello_request().send().promise.await.unwrap();
        assert!(!r.get().unwrap().get_info().unwrap().get_kernel_release().unwrap().is_empty());
        let (st, out, _) = run(&g, &req(&["echo", "from-binary"])).await;
        assert_eq!((st, out.as_str()), (Status::Code(0), "from-binary\n"));
        let mut q = g.shutdown_request();
        q.get().set_reboot(false);
        q.send().promise.await.unwrap();
    });
    let t = std::time::Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "{st:?}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "guest-init did not exit after shutdown");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn binary_socket_mode_serves_each_connection() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("guest.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_capvisor-guest-init"))
        .arg("--socket")
        .arg(&sock)
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(5), "socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    conn::run_local(async {
        // Two independent connections, both served.
        for i in 0..2 {
            let s = tokio::net::UnixStream::connect(&sock).await.unwrap();
            let (g, _h): (guest::Client, _) = conn::connect(s, None, INTERNAL);
            let (st, out, _) = run(&g, &req(&["sh", "-c", "echo conn$0", &i.to_string()])).await;
            assert_eq!((st, out), (Status::Code(0), format!("conn{i}\n")));
            if i == 1 {
                g.shutdown_request().send().promise.await.unwrap();
            }
        }
    });
    let t = std::time::Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "{st:?}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "guest-init did not exit after shutdown");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!sock.exists(), "socket file left behind");
}
