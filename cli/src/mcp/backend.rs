//! The Cap'n Proto side of `capvisor mcp`: one task on the CLI's
//! single-threaded `LocalSet` holds the session and runs every tool call
//! (capnp-rpc clients are not `Send`). The MCP handlers, which rmcp runs as
//! `Send` tasks, hand it [`Job`]s over a channel and get a [`ToolOutput`]
//! (or "no such tool") back; progress flows back on a channel of its own.

use super::tools::{Catalogue, ToolDef, ToolKind};
use capvisor_client::dynamic::{self, Held};
use capvisor_client::ops::{self, ExecRequest, Exit, VmSpec};
use capvisor_client::schema::capvisor_capnp::{cap_set, session, vm, vm_factory};
use capvisor_client::schema::common_capnp::byte_sink;
use capvisor_client::{ClientError, ClientResult};
use capvisor_rpc::error::CvError;
use serde_json::{json, Map, Value};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Default `vm_exec` timeout when the call gives none, seconds.
pub const DEFAULT_EXEC_TIMEOUT_SECS: f64 = 300.0;

/// At most this much output text rides in one progress notification.
pub const PROGRESS_TEXT_MAX: usize = 4096;

/// One progress notification for the MCP client: a value that grows with
/// every notification of the call, and a message (output text, or what
/// the call is waiting for).
#[derive(Debug, Clone)]
pub struct Progress {
    /// Increases with every notification of the call.
    pub progress: f64,
    /// Output as it arrived (`stdout: ...`), or a status line.
    pub message: String,
}

/// What a tool call produced: MCP `CallToolResult` content, structured
/// content and the `isError` flag.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutput {
    /// The text content.
    pub text: String,
    /// Structured content (a JSON object), if any.
    pub structured: Option<Value>,
    /// A tool error (`isError: true`): the text starts with the typed
    /// code in brackets, e.g. `[denied] ...`.
    pub is_error: bool,
}

impl ToolOutput {
    fn ok(text: String, structured: Value) -> Self {
        Self { text, structured: Some(structured), is_error: false }
    }

    /// A tool error carrying the typed code of `e`.
    pub fn error(e: &ClientError) -> Self {
        Self { text: error_text(e), structured: None, is_error: true }
    }
}

/// `[code] message` for a client error: the capvisor error code of a
/// domain outcome (`denied`, `notFound`, ...), else `disconnected`,
/// `notLoggedIn`, `invalidArgument` (bad tool arguments), `io` or
/// `failed` (an RPC failure).
pub fn error_text(e: &ClientError) -> String {
    match e {
        ClientError::Domain(d) => format!("[{}] {}", d.code_name(), d.message),
        ClientError::Disconnected(m) => format!("[disconnected] {m}"),
        ClientError::NotLoggedIn => format!("[notLoggedIn] {e}"),
        ClientError::Usage(m) => format!("[invalidArgument] {m}"),
        ClientError::Io(e) => format!("[io] {e}"),
        ClientError::Rpc(e) => format!("[failed] {e}"),
    }
}

/// A request from an MCP handler to the backend.
pub enum Job {
    /// The current tool catalogue (re-reads `CapSet.list`).
    List {
        /// Where the catalogue's tools go.
        reply: oneshot::Sender<ClientResult<Vec<ToolDef>>>,
    },
    /// Call tool `name` with `args`.
    Call {
        /// Tool name.
        name: String,
        /// Its arguments (a JSON object).
        args: Map<String, Value>,
        /// Where progress goes, when the client asked for it.
        progress: Option<mpsc::UnboundedSender<Progress>>,
        /// The answer: `None` for a tool the catalogue does not have. When
        /// the handler drops its receiver (the client cancelled), a running
        /// command is killed.
        reply: oneshot::Sender<Option<ToolOutput>>,
    },
}

/// The backend's state: the session, its CapSet and the last catalogue.
pub struct Backend {
    caps: cap_set::Client,
    catalogue: RefCell<Rc<Catalogue>>,
    max_output: usize,
}

impl Backend {
    /// A backend over `session`; tool outputs (each exec stream, each
    /// file_read) are cut at `max_output` bytes.
    pub fn new(session: &session::Client, max_output: usize) -> Rc<Self> {
        Rc::new(Self { caps: ops::cap_set(session), catalogue: Default::default(), max_output })
    }

    /// Re-reads the CapSet and rebuilds the catalogue.
    pub async fn refresh(&self) -> ClientResult<Rc<Catalogue>> {
        let entries = ops::list_caps(&self.caps).await?;
        let c = Rc::new(Catalogue::build(&entries));
        // Said once per change, not at every tools/list.
        if !c.unknown.is_empty() && c.unknown != self.catalogue.borrow().unknown {
            eprintln!(
                "capvisor mcp: no tools for caps whose interface this binary's schema lacks: {}",
                c.unknown.join(", ")
            );
        }
        *self.catalogue.borrow_mut() = c.clone();
        Ok(c)
    }

    /// Serves jobs until every sender is gone; each call runs as its own
    /// local task, so calls overlap.
    pub async fn serve(self: Rc<Self>, mut jobs: mpsc::UnboundedReceiver<Job>) {
        while let Some(job) = jobs.recv().await {
            let me = self.clone();
            tokio::task::spawn_local(async move {
                match job {
                    Job::List { reply } => {
                        let r = me.refresh().await.map(|c| c.tools.clone());
                        let _ = reply.send(r);
                    }
                    Job::Call { name, args, progress, mut reply } => {
                        let out = me.call(&name, &args, progress.as_ref(), &mut reply).await;
                        let _ = reply.send(out);
                    }
                }
            });
        }
    }

    /// Runs tool `name`; `None` when no such tool exists (after re-reading
    /// the CapSet once, in case it changed since the last listing).
    async fn call(
        &self,
        name: &str,
        args: &Map<String, Value>,
        progress: Option<&mpsc::UnboundedSender<Progress>>,
        reply: &mut oneshot::Sender<Option<ToolOutput>>,
    ) -> Option<ToolOutput> {
        let mut cat = self.catalogue.borrow().clone();
        if cat.get(name).is_none() {
            cat = match self.refresh().await {
                Ok(c) => c,
                Err(e) => return Some(ToolOutput::error(&e)),
            };
        }
        let tool = cat.get(name)?.clone();
        let r = match &tool.kind {
            ToolKind::VmCreate { factory } => self.vm_create(factory, args, progress).await,
            ToolKind::VmExec => self.vm_exec(&cat, args, progress, reply).await,
            ToolKind::FileRead => self.file_read(&cat, args).await,
            ToolKind::FileWrite => self.file_write(&cat, args).await,
            ToolKind::Cap { cap, interface_id, method } => self.cap_call(&cat, cap, *interface_id, method, args).await,
        };
        Some(r.unwrap_or_else(|e| ToolOutput::error(&e)))
    }

    /// The VM called `name`: a `Vm` entry of the CapSet by that name, else
    /// the factory's VM of that name.
    fn vm(&self, cat: &Catalogue, name: &str) -> ClientResult<vm::Client> {
        if cat.vm_caps.iter().any(|c| c == name) {
            return Ok(ops::get_cap(&self.caps, name));
        }
        match &cat.factory {
            Some(f) => Ok(ops::get_vm(&ops::get_cap::<vm_factory::Client>(&self.caps, f), name)),
            None => {
                Err(CvError::not_found(format!("no VM named {name:?}: this session's Vm caps are {:?}", cat.vm_caps))
                    .into())
            }
        }
    }

    async fn vm_create(
        &self,
        factory: &str,
        args: &Map<String, Value>,
        progress: Option<&mpsc::UnboundedSender<Progress>>,
    ) -> ClientResult<ToolOutput> {
        let a = Args::new(args, &["name", "image", "memory_mib"])?;
        let spec = VmSpec {
            name: a.string("name")?.unwrap_or_default(),
            image: a.string("image")?.unwrap_or_default(),
            memory_mib: u32::try_from(a.uint("memory_mib")?.unwrap_or(0))
                .map_err(|_| invalid("memory_mib: too large"))?,
            ..Default::default()
        };
        let f: vm_factory::Client = ops::get_cap(&self.caps, factory);
        let v = ops::create_vm(&f, &spec);
        let info = with_heartbeat(progress, "booting", ops::vm_info(&v)).await?;
        let j = json!({
            "name": info.name,
            "image": info.image,
            "memoryMib": info.memory_mib,
            "vcpus": info.vcpus,
            "state": ops::state_name(info.state),
            "engine": ops::engine_name(info.engine),
            "kernelRelease": info.kernel_release,
            "bootMs": info.boot_ms,
        });
        let text = format!(
            "VM {:?} is {} ({} MiB, image {}, kernel {}, booted in {} ms); run commands with vm_exec vm={:?}",
            info.name,
            ops::state_name(info.state),
            info.memory_mib,
            info.image,
            info.kernel_release,
            info.boot_ms,
            info.name
        );
        Ok(ToolOutput::ok(text, j))
    }

    async fn vm_exec(
        &self,
        cat: &Catalogue,
        args: &Map<String, Value>,
        progress: Option<&mpsc::UnboundedSender<Progress>>,
        reply: &mut oneshot::Sender<Option<ToolOutput>>,
    ) -> ClientResult<ToolOutput> {
        let a = Args::new(args, &["vm", "argv", "stdin", "timeout_secs", "cwd", "user", "env"])?;
        let vm_name = a.required_string("vm")?;
        let argv = a.strings("argv")?.unwrap_or_default();
        if argv.is_empty() {
            return Err(invalid("argv: give the program and its arguments, e.g. [\"ls\", \"/\"]"));
        }
        let timeout = a.number("timeout_secs")?.unwrap_or(DEFAULT_EXEC_TIMEOUT_SECS);
        if !(timeout > 0.0 && timeout.is_finite()) {
            return Err(invalid("timeout_secs: a positive number of seconds"));
        }
        let env = match args.get("env") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) if capvisor_rpc::exec::valid_env_name(k) => Ok((k.clone(), s.clone())),
                    _ => Err(invalid(format!("env.{k}: a string value for a name without '=' or NUL"))),
                })
                .collect::<ClientResult<_>>()?,
            Some(_) => return Err(invalid("env: an object of NAME: value strings")),
        };
        let req = ExecRequest {
            argv,
            env,
            cwd: a.string("cwd")?.unwrap_or_default(),
            stdin: a.string("stdin")?.unwrap_or_default().into_bytes(),
            user: a.string("user")?.unwrap_or_default(),
            ..Default::default()
        };
        let vm = self.vm(cat, &vm_name)?;
        let ticks = Rc::new(RefCell::new(0u64));
        let (out, out_rx) = Window::client(0, self.max_output, progress.cloned(), "stdout", ticks.clone());
        let (err, err_rx) = Window::client(0, self.max_output, progress.cloned(), "stderr", ticks.clone());
        let p = ops::exec(&vm, &req, out, err);
        let limit = Duration::from_secs_f64(timeout);
        let mut killed_for = None;
        let exit = tokio::select! {
            r = tokio::time::timeout(limit, ops::wait(&p)) => match r {
                Ok(r) => r?,
                Err(_) => {
                    killed_for = Some(format!("it ran past timeout_secs={timeout} and was killed (SIGKILL)"));
                    let _ = ops::kill(&p, libc::SIGKILL).await;
                    ops::wait(&p).await?
                }
            },
            () = reply.closed() => {
                // The client cancelled the call (or went away): no one waits for it.
                let _ = ops::kill(&p, libc::SIGKILL).await;
                return Err(ClientError::Disconnected("the MCP client cancelled the call".into()));
            }
        };
        let gone = || ClientError::Disconnected("the output stream ended early".into());
        let grace = Duration::from_secs(5);
        let stdout = tokio::time::timeout(grace, out_rx).await.map_err(|_| gone())?.map_err(|_| gone())?;
        let stderr = tokio::time::timeout(grace, err_rx).await.map_err(|_| gone())?.map_err(|_| gone())?;
        let (code, signal) = match exit {
            Exit::Code(c) => (Some(c), None),
            Exit::Signal(s) => (None, Some(s)),
        };
        let head = match exit {
            Exit::Code(c) => format!("exit code {c}"),
            Exit::Signal(s) => format!("killed by signal {s}"),
        };
        let mut text = match &killed_for {
            Some(why) => format!("[timeout] {why}; {head}\n"),
            None => format!("{head}\n"),
        };
        for (label, w) in [("stdout", &stdout), ("stderr", &stderr)] {
            if w.total == 0 {
                continue;
            }
            text.push_str(&format!("--- {label} ---\n"));
            text.push_str(&String::from_utf8_lossy(&w.bytes));
            if !text.ends_with('\n') {
                text.push('\n');
            }
            if w.truncated() {
                text.push_str(&format!(
                    "[capvisor: {label} truncated: the first {} of {} bytes are shown (--max-output); to read \
                     all of it, run the command again with {label} redirected to a guest file (e.g. \
                     `sh -c 'CMD {}> /tmp/out.txt'`) and read that with file_read, offset={} onwards]\n",
                    w.bytes.len(),
                    w.total,
                    if label == "stderr" { "2" } else { "" },
                    w.bytes.len()
                ));
            }
        }
        let j = json!({
            "exitCode": code,
            "signal": signal,
            "timedOut": killed_for.is_some(),
            "stdout": String::from_utf8_lossy(&stdout.bytes),
            "stderr": String::from_utf8_lossy(&stderr.bytes),
            "stdoutBytes": stdout.total,
            "stderrBytes": stderr.total,
            "stdoutTruncated": stdout.truncated(),
            "stderrTruncated": stderr.truncated(),
        });
        let mut out = ToolOutput::ok(text, j);
        out.is_error = killed_for.is_some();
        Ok(out)
    }

    async fn file_read(&self, cat: &Catalogue, args: &Map<String, Value>) -> ClientResult<ToolOutput> {
        let a = Args::new(args, &["vm", "path", "offset", "max_bytes"])?;
        let vm_name = a.required_string("vm")?;
        let path = a.required_string("path")?;
        let offset = a.uint("offset")?.unwrap_or(0);
        let max = a.uint("max_bytes")?.map_or(self.max_output, |m| (m as usize).min(self.max_output));
        if max == 0 {
            return Err(invalid("max_bytes: at least 1"));
        }
        let vm = self.vm(cat, &vm_name)?;
        let (sink, rx) = Window::client(offset, max, None, "", Rc::default());
        let size = ops::read_file(&ops::files(&vm), &path, sink).await?;
        let w = rx.await.map_err(|_| ClientError::Disconnected("the file stream ended early".into()))?;
        let mut bytes = w.bytes;
        // A window cut inside a UTF-8 sequence: end before it, so text stays text.
        let encoding = match std::str::from_utf8(&bytes) {
            Ok(_) => "utf-8",
            Err(e) if e.error_len().is_none() && e.valid_up_to() > 0 => {
                bytes.truncate(e.valid_up_to());
                "utf-8"
            }
            Err(_) => "base64",
        };
        let content = if encoding == "utf-8" {
            String::from_utf8(bytes.clone()).expect("checked above")
        } else {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(&bytes)
        };
        let end = offset.min(size) + bytes.len() as u64;
        let eof = end >= size;
        let mut text = content.clone();
        if !eof {
            if !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&format!(
                "[capvisor: bytes {}..{end} of {size} shown; call file_read with offset={end} for the rest]",
                offset.min(size)
            ));
        } else if encoding == "base64" {
            text = format!("(base64: the file is not UTF-8 text)\n{text}");
        }
        let j = json!({
            "path": path,
            "offset": offset.min(size),
            "bytes": bytes.len(),
            "size": size,
            "eof": eof,
            "encoding": encoding,
            "content": content,
        });
        Ok(ToolOutput::ok(text, j))
    }

    async fn file_write(&self, cat: &Catalogue, args: &Map<String, Value>) -> ClientResult<ToolOutput> {
        let a = Args::new(args, &["vm", "path", "content", "base64", "mode"])?;
        let vm_name = a.required_string("vm")?;
        let path = a.required_string("path")?;
        let content = a.required_string("content")?;
        let body = if a.bool("base64")?.unwrap_or(false) {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(content.as_bytes())
                .map_err(|e| invalid(format!("content: not base64: {e}")))?
        } else {
            content.into_bytes()
        };
        let mode = a.uint("mode")?.unwrap_or(0o644);
        if mode > 0o7777 {
            return Err(invalid("mode: permission bits, at most 0o7777 (4095)"));
        }
        let vm = self.vm(cat, &vm_name)?;
        let n = ops::write_file(&ops::files(&vm), &path, mode as u32, &body[..]).await?;
        Ok(ToolOutput::ok(
            format!("wrote {n} bytes to {path} (mode {mode:o})"),
            json!({"path": path, "bytes": n, "mode": mode}),
        ))
    }

    /// `<cap>_<method>`: the method called by name through schema
    /// reflection (`capvisor_client::dynamic`), its results as JSON.
    /// Capability parameters name CapSet entries; `ByteSink` parameters left
    /// out are collected and shown under `$streams`.
    async fn cap_call(
        &self,
        cat: &Catalogue,
        cap: &str,
        interface_id: u64,
        method: &str,
        args: &Map<String, Value>,
    ) -> ClientResult<ToolOutput> {
        let held = Held::new(interface_id, ops::get_cap_raw(&self.caps, cap, interface_id));
        let entries = cat.entries.clone();
        let caps = self.caps.clone();
        let resolve = move |name: &str| {
            let name = name.strip_prefix('@').unwrap_or(name);
            entries.iter().find(|(n, _)| n == name).map(|(n, id)| Held::new(*id, ops::get_cap_raw(&caps, n, *id)))
        };
        let r = dynamic::call(&held, method, &Value::Object(args.clone()), &resolve).await?;
        let mut text = serde_json::to_string_pretty(&r.json).unwrap_or_default();
        let mut structured = Some(r.json);
        if !r.caps.is_empty() {
            text.push_str(
                "\n[capvisor: capabilities in results are not kept by this server; reach a VM by name with \
                 vm_exec, file_read and file_write]",
            );
        }
        if text.len() > self.max_output {
            let total = text.len();
            let mut cut = self.max_output;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str(&format!(
                "\n[capvisor: result cut at {cut} of {total} bytes (--max-output); ask for less, e.g. with a \
                 limit parameter]"
            ));
            structured = None;
        }
        Ok(ToolOutput { text, structured, is_error: false })
    }
}

fn invalid(msg: impl Into<String>) -> ClientError {
    ClientError::Domain(CvError::invalid(msg))
}

/// Sends a status progress notification every 2 s while `fut` runs.
async fn with_heartbeat<T>(
    progress: Option<&mpsc::UnboundedSender<Progress>>,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> T {
    let Some(tx) = progress else { return fut.await };
    let t0 = std::time::Instant::now();
    let beat = async {
        let mut n = 0u32;
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            n += 1;
            let _ =
                tx.send(Progress { progress: f64::from(n), message: format!("{what}: {} s", t0.elapsed().as_secs()) });
        }
    };
    tokio::select! {
        r = fut => r,
        () = beat => unreachable!("the heartbeat never ends"),
    }
}

/// A tool's arguments, checked against the names it takes.
struct Args<'a>(&'a Map<String, Value>);

impl<'a> Args<'a> {
    /// Refuses names outside `known` (a typo would otherwise be ignored).
    fn new(m: &'a Map<String, Value>, known: &[&str]) -> ClientResult<Self> {
        if let Some(k) = m.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(invalid(format!("unknown argument {k:?}; this tool takes {}", known.join(", "))));
        }
        Ok(Self(m))
    }

    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn string(&self, k: &str) -> ClientResult<Option<String>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(invalid(format!("{k}: expected a string, got {v}"))),
        }
    }

    fn required_string(&self, k: &str) -> ClientResult<String> {
        self.string(k)?.filter(|s| !s.is_empty()).ok_or_else(|| invalid(format!("{k}: required")))
    }

    fn strings(&self, k: &str) -> ClientResult<Option<Vec<String>>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(|| invalid(format!("{k}: a list of strings"))))
                .collect::<ClientResult<_>>()
                .map(Some),
            Some(_) => Err(invalid(format!("{k}: a list of strings"))),
        }
    }

    fn uint(&self, k: &str) -> ClientResult<Option<u64>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| invalid(format!("{k}: expected a non-negative integer"))),
        }
    }

    fn number(&self, k: &str) -> ClientResult<Option<f64>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| invalid(format!("{k}: expected a number"))),
        }
    }

    fn bool(&self, k: &str) -> ClientResult<Option<bool>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(invalid(format!("{k}: expected true or false"))),
        }
    }
}

/// What a [`Window`] sink kept.
#[derive(Debug, Default)]
pub struct Kept {
    /// The bytes of the window.
    pub bytes: Vec<u8>,
    /// Every byte written, kept or not.
    pub total: u64,
}

impl Kept {
    /// Whether bytes past the window were written (for a window from 0).
    pub fn truncated(&self) -> bool {
        self.total > self.bytes.len() as u64
    }
}

/// Where a [`Window`] reports what is written into it: the channel, the
/// stream's label (`stdout`), and the call's notification counter (shared
/// by its streams, so progress grows across both).
type ProgressTap = (mpsc::UnboundedSender<Progress>, &'static str, Rc<RefCell<u64>>);

/// A `ByteSink` that keeps the bytes from offset `skip` up to `keep` of
/// them and counts the rest (never failing a write, so the writer is not
/// cut off), optionally reporting what is written as progress: the text
/// of the first `keep` bytes, then a byte count at most once a second.
struct Window {
    skip: u64,
    keep: usize,
    kept: RefCell<Kept>,
    progress: Option<ProgressTap>,
    /// Output bytes sent as progress text so far.
    streamed: std::cell::Cell<usize>,
    /// When the last byte count went out (once the text budget is spent).
    last_count: std::cell::Cell<Option<std::time::Instant>>,
    done: RefCell<Option<oneshot::Sender<Kept>>>,
}

impl Window {
    fn client(
        skip: u64,
        keep: usize,
        progress: Option<mpsc::UnboundedSender<Progress>>,
        label: &'static str,
        ticks: Rc<RefCell<u64>>,
    ) -> (byte_sink::Client, oneshot::Receiver<Kept>) {
        let (tx, rx) = oneshot::channel();
        let w = Window {
            skip,
            keep,
            kept: RefCell::default(),
            progress: progress.map(|p| (p, label, ticks)),
            streamed: Default::default(),
            last_count: Default::default(),
            done: RefCell::new(Some(tx)),
        };
        (capnp_rpc::new_client(w), rx)
    }
}

impl byte_sink::Server for Window {
    async fn write(self: Rc<Self>, params: byte_sink::WriteParams) -> capnp::Result<()> {
        let data = params.get()?.get_data()?;
        let mut k = self.kept.borrow_mut();
        let start = k.total;
        k.total += data.len() as u64;
        // The part of [start, start+len) inside [skip, skip+keep).
        let from = self.skip.max(start);
        let room = self.keep - k.bytes.len();
        if from < k.total && room > 0 {
            let a = (from - start) as usize;
            let b = (a + room).min(data.len());
            k.bytes.extend_from_slice(&data[a..b]);
        }
        if let Some((tx, label, ticks)) = &self.progress {
            // Output text rides along up to `keep` bytes per stream (what the
            // result shows too); past that, a byte count at most once a second.
            let streamed = self.streamed.get();
            let now = std::time::Instant::now();
            let message = if streamed < self.keep {
                let cut = &data[..data.len().min(PROGRESS_TEXT_MAX).min(self.keep - streamed)];
                self.streamed.set(streamed + cut.len());
                let mut m = format!("{label}: {}", String::from_utf8_lossy(cut));
                if cut.len() < data.len() {
                    m.push_str(&format!(" [... {} more bytes]", data.len() - cut.len()));
                }
                Some(m)
            } else if self.last_count.get().is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
                self.last_count.set(Some(now));
                Some(format!("{label}: {} bytes so far", k.total))
            } else {
                None
            };
            if let Some(message) = message {
                let mut t = ticks.borrow_mut();
                *t += 1;
                let _ = tx.send(Progress { progress: *t as f64, message });
            }
        }
        Ok(())
    }

    async fn done(self: Rc<Self>, _: byte_sink::DoneParams, _: byte_sink::DoneResults) -> capnp::Result<()> {
        if let Some(tx) = self.done.borrow_mut().take() {
            let _ = tx.send(std::mem::take(&mut *self.kept.borrow_mut()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `chunks` into a window sink through a real capnp client and
    /// returns what it kept.
    fn window(skip: u64, keep: usize, chunks: &[&[u8]]) -> Kept {
        capvisor_rpc::conn::run_local(async {
            let (c, rx) = Window::client(skip, keep, None, "", Rc::default());
            for ch in chunks {
                let mut r = c.write_request();
                r.get().set_data(ch);
                r.send().await.unwrap();
            }
            c.done_request().send().promise.await.unwrap();
            rx.await.unwrap()
        })
    }

    #[test]
    fn window_keeps_its_range_and_counts_everything() {
        let k = window(0, 4, &[b"abc", b"defg"]);
        assert_eq!((k.bytes.as_slice(), k.total, k.truncated()), (&b"abcd"[..], 7, true));
        let k = window(2, 3, &[b"abc", b"defg"]);
        assert_eq!((k.bytes.as_slice(), k.total), (&b"cde"[..], 7));
        let k = window(5, 10, &[b"abc", b"defg"]);
        assert_eq!(k.bytes, b"fg");
        let k = window(9, 10, &[b"abc", b"defg"]);
        assert!(k.bytes.is_empty());
        let k = window(0, 10, &[b"abc"]);
        assert!(!k.truncated());
    }

    #[test]
    fn progress_carries_output_up_to_the_bound_then_counts() {
        let (msgs, kept) = capvisor_rpc::conn::run_local(async {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let (c, done) = Window::client(0, 4, Some(tx), "stdout", Rc::default());
            for ch in [&b"abcdef"[..], b"gh", b"ij"] {
                let mut r = c.write_request();
                r.get().set_data(ch);
                r.send().await.unwrap();
            }
            c.done_request().send().promise.await.unwrap();
            let kept = done.await.unwrap();
            drop(c);
            let mut msgs = Vec::new();
            while let Ok(p) = rx.try_recv() {
                msgs.push((p.progress, p.message));
            }
            (msgs, kept)
        });
        assert_eq!(kept.total, 10);
        // The text of the first 4 bytes, then one count (the next is within a second).
        assert_eq!(
            msgs,
            [(1.0, "stdout: abcd [... 2 more bytes]".to_string()), (2.0, "stdout: 8 bytes so far".to_string())]
        );
    }

    #[test]
    fn errors_carry_the_typed_code() {
        let e = ClientError::Domain(CvError::denied("this cap may not run \"sh\""));
        assert_eq!(error_text(&e), "[denied] this cap may not run \"sh\"");
        assert!(ToolOutput::error(&e).is_error);
        assert!(error_text(&ClientError::Disconnected("x".into())).starts_with("[disconnected]"));
    }

    #[test]
    fn arguments_are_checked_by_name_and_type() {
        let m = json!({"vm": "box", "argv": ["ls"], "typo": 1});
        let e = Args::new(m.as_object().unwrap(), &["vm", "argv"]).err().unwrap();
        assert!(error_text(&e).starts_with("[invalidArgument] unknown argument \"typo\""), "{e}");
        let m = json!({"vm": 3, "argv": "ls", "offset": -1});
        let a = Args::new(m.as_object().unwrap(), &["vm", "argv", "offset"]).unwrap();
        assert!(a.string("vm").is_err() && a.strings("argv").is_err() && a.uint("offset").is_err());
        assert!(a.required_string("path").is_err());
    }
}
