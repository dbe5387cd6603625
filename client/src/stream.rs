//! Composed operations a GUI, an agent runner or the CLI use as they are:
//! a command streaming its output into any writers (with stdin from any
//! reader), an interactive pseudo-terminal session, and file copies between
//! host and guest. Each sends its capability calls pipelined (see
//! [`crate::ops`]) and ends with the command's [`Exit`] or a typed error.

use crate::error::{ClientError, ClientResult};
use crate::ops::{self, ExecRequest, Exit};
use capvisor_rpc::schema::capvisor_capnp::vm;
use capvisor_rpc::schema::common_capnp::{files, process};
use capvisor_rpc::sink::WriterSink;
use std::path::Path;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

/// Copies `input` into the process's stdin in chunks of at most
/// `capvisor_rpc::CHUNK` bytes (flow-controlled), then closes stdin.
///
/// Errors: reading `input`, or the process refusing input (it ended).
pub async fn forward_stdin<R: AsyncRead + Unpin>(p: &process::Client, mut input: R) -> ClientResult<()> {
    let mut buf = vec![0u8; capvisor_rpc::CHUNK];
    loop {
        let n = input.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        ops::write_stdin(p, &buf[..n]).await?;
    }
    ops::close_stdin(p).await
}

/// Runs `req` in `vm` with its stdout and stderr streamed into `stdout` and
/// `stderr` (flushed as they arrive), and, when `stdin` is given (set
/// `req.keep_stdin_open`), that reader copied to the command's stdin. Exec
/// and wait travel pipelined; returns once the command exited and both
/// outputs were delivered.
///
/// Errors: typed domain errors of the exec (e.g. `notFound` for a missing
/// program or VM, `notRunning`), transport loss, local I/O.
pub async fn exec_streaming<O, E, I>(
    vm: &vm::Client,
    req: &ExecRequest,
    stdout: O,
    stderr: E,
    stdin: Option<I>,
) -> ClientResult<Exit>
where
    O: AsyncWrite + Unpin + 'static,
    E: AsyncWrite + Unpin + 'static,
    I: AsyncRead + Unpin + 'static,
{
    let (out, out_done) = WriterSink::client(stdout);
    let (err, err_done) = WriterSink::client(stderr);
    let p = ops::exec(vm, req, out, err);
    if let Some(input) = stdin {
        let p2 = p.clone();
        tokio::task::spawn_local(async move {
            let _ = forward_stdin(&p2, input).await;
        });
    }
    let exit = ops::wait(&p).await?;
    let _ = out_done.await;
    let _ = err_done.await;
    Ok(exit)
}

/// An interactive program on a pseudo-terminal of `size` (rows, cols) in
/// `vm`: `input` is forwarded as typed, output (both streams: a pty merges
/// them) goes to `output`, and every (rows, cols) arriving on `resizes`
/// resizes the pty. Returns once the program exited and its output was
/// delivered.
///
/// Errors: as [`exec_streaming`].
pub async fn pty_session<O, I>(
    vm: &vm::Client,
    argv: Vec<String>,
    cwd: &str,
    size: (u16, u16),
    output: O,
    input: I,
    resizes: tokio::sync::mpsc::UnboundedReceiver<(u16, u16)>,
) -> ClientResult<Exit>
where
    O: AsyncWrite + Unpin + 'static,
    I: AsyncRead + Unpin + 'static,
{
    pty_session_as(vm, "", argv, cwd, size, output, input, resizes).await
}

/// [`pty_session`] as guest user `user` (a login name or numeric uid, see
/// `ExecSpec.user`; empty: root). An empty `cwd` starts in that user's home.
///
/// Errors: as [`exec_streaming`]; an unknown user is `notFound`.
#[allow(clippy::too_many_arguments)]
pub async fn pty_session_as<O, I>(
    vm: &vm::Client,
    user: &str,
    argv: Vec<String>,
    cwd: &str,
    size: (u16, u16),
    output: O,
    input: I,
    mut resizes: tokio::sync::mpsc::UnboundedReceiver<(u16, u16)>,
) -> ClientResult<Exit>
where
    O: AsyncWrite + Unpin + 'static,
    I: AsyncRead + Unpin + 'static,
{
    let req = ExecRequest {
        argv,
        cwd: cwd.into(),
        keep_stdin_open: true,
        pty: Some(size),
        user: user.into(),
        ..Default::default()
    };
    let (out, out_done) = WriterSink::client(output);
    // A pty sends nothing to stderr; keep what might come, bounded.
    let (err, _err_done) = capvisor_rpc::sink::CollectSink::client(1 << 20);
    let p = ops::exec(vm, &req, out, err);
    let p2 = p.clone();
    tokio::task::spawn_local(async move {
        let _ = forward_stdin(&p2, input).await;
    });
    let p3 = p.clone();
    tokio::task::spawn_local(async move {
        while let Some((rows, cols)) = resizes.recv().await {
            let _ = ops::resize(&p3, rows, cols).await;
        }
    });
    let exit = ops::wait(&p).await?;
    let _ = out_done.await;
    Ok(exit)
}

/// Copies the local file `src` to `dst` in the guest (created or replaced
/// atomically, with the local file's permission bits); returns the bytes
/// written.
///
/// Errors: `ClientError::Usage` when `src` cannot be opened; typed domain
/// errors from the guest (`notFound` for a missing directory, `denied`).
pub async fn copy_to_guest(f: &files::Client, src: &Path, dst: &str) -> ClientResult<u64> {
    use std::os::unix::fs::PermissionsExt;
    let file = tokio::fs::File::open(src).await.map_err(|e| ClientError::Usage(format!("{}: {e}", src.display())))?;
    let mode = file.metadata().await?.permissions().mode() & 0o7777;
    ops::write_file(f, dst, mode, file).await
}

/// Copies the guest file `src` to the local path `dst`, through a
/// temporary file beside it that is renamed into place only when the whole
/// file arrived; returns the bytes copied.
///
/// Errors: `ClientError::Usage` when `dst` cannot be created; typed domain
/// errors from the guest (`notFound`, `invalidArgument` for a directory).
pub async fn copy_from_guest(f: &files::Client, src: &str, dst: &Path) -> ClientResult<u64> {
    let mut tmp = dst.as_os_str().to_owned();
    tmp.push(".capvisor-part");
    let tmp = std::path::PathBuf::from(tmp);
    let out = tokio::fs::File::create(&tmp).await.map_err(|e| ClientError::Usage(format!("{}: {e}", dst.display())))?;
    let (sink, done) = WriterSink::client(out);
    let r = ops::read_file(f, src, sink).await;
    let _ = done.await;
    match r {
        Ok(n) => {
            tokio::fs::rename(&tmp, dst).await?;
            Ok(n)
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(e)
        }
    }
}
