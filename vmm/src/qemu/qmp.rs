//! A small asynchronous QMP client (QEMU Machine Protocol, QEMU
//! `docs/interop/qmp-spec.rst`): JSON objects, one per line, over a stream
//! socket. The server greets with `{"QMP": {...}}`; the client must send
//! `qmp_capabilities` before anything else; each `{"execute": ...}` gets
//! exactly one `{"return": ...}` or `{"error": {"class", "desc"}}`, in
//! order; `{"event": ...}` objects may arrive at any time.
//!
//! Runs on the current thread's `LocalSet` (the reader is a local task).

use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

/// How long the greeting and each command may take by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest line accepted from QEMU (QMP replies here are small).
const MAX_LINE: usize = 1 << 20;

/// An asynchronous QMP event (`SHUTDOWN`, `STOP`, `RESUME`, ...).
#[derive(Clone, Debug, PartialEq)]
pub struct QmpEvent {
    /// Event name, e.g. `"SHUTDOWN"`.
    pub name: String,
    /// The event's `data` member (`Value::Null` if absent).
    pub data: Value,
}

type Reply = Result<Value, String>;

struct Inner {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: RefCell<VecDeque<oneshot::Sender<Reply>>>,
    closed: RefCell<bool>,
}

/// A connected, capability-negotiated QMP session. Cloning shares it.
#[derive(Clone)]
pub struct Qmp {
    inner: Rc<Inner>,
}

impl Qmp {
    /// Reads the greeting from `stream`, starts the reader task, and
    /// negotiates capabilities. Events go to the returned receiver (which
    /// closes when the connection does).
    ///
    /// Errors: no greeting within [`DEFAULT_TIMEOUT`], malformed JSON, a
    /// refused `qmp_capabilities`, the connection ends.
    /// Must be called inside a `LocalSet`.
    pub async fn handshake(stream: UnixStream) -> anyhow::Result<(Qmp, mpsc::UnboundedReceiver<QmpEvent>)> {
        let (r, w) = stream.into_split();
        let mut reader = BufReader::new(r);
        let mut line = String::new();
        let n = tokio::time::timeout(DEFAULT_TIMEOUT, reader.read_line(&mut line))
            .await
            .context("no QMP greeting from qemu")??;
        if n == 0 {
            bail!("qemu closed QMP before its greeting");
        }
        let greeting: Value = serde_json::from_str(&line).context("QMP greeting is not JSON")?;
        if greeting.get("QMP").is_none() {
            bail!("unexpected QMP greeting: {line}");
        }
        let inner = Rc::new(Inner {
            writer: tokio::sync::Mutex::new(w),
            pending: RefCell::new(VecDeque::new()),
            closed: RefCell::new(false),
        });
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let weak = Rc::downgrade(&inner);
        tokio::task::spawn_local(async move {
            let mut line = String::new();
            loop {
                line.clear();
                let n = match (&mut reader).take(MAX_LINE as u64).read_line(&mut line).await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::debug!("QMP read error: {e}");
                        0
                    }
                };
                let Some(inner) = weak.upgrade() else { break };
                if n == 0 || !line.ends_with('\n') {
                    *inner.closed.borrow_mut() = true;
                    for tx in inner.pending.borrow_mut().drain(..) {
                        let _ = tx.send(Err("QMP connection closed".into()));
                    }
                    break;
                }
                let v: Value = match serde_json::from_str(&line) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!("ignoring malformed QMP line ({e}): {}", line.trim());
                        continue;
                    }
                };
                if let Some(name) = v.get("event").and_then(Value::as_str) {
                    let _ = ev_tx
                        .send(QmpEvent { name: name.to_string(), data: v.get("data").cloned().unwrap_or(Value::Null) });
                } else if let Some(ret) = v.get("return") {
                    if let Some(tx) = inner.pending.borrow_mut().pop_front() {
                        let _ = tx.send(Ok(ret.clone()));
                    }
                } else if let Some(err) = v.get("error") {
                    let desc = err.get("desc").and_then(Value::as_str).unwrap_or("unknown error").to_string();
                    if let Some(tx) = inner.pending.borrow_mut().pop_front() {
                        let _ = tx.send(Err(desc));
                    }
                }
            }
        });
        let qmp = Qmp { inner };
        qmp.execute("qmp_capabilities", None).await?;
        Ok((qmp, ev_rx))
    }

    /// Runs `command` with optional `arguments`, waiting up to
    /// [`DEFAULT_TIMEOUT`], and returns its `return` value.
    ///
    /// Errors: QEMU answered with an error (its `desc`), the connection
    /// closed, or the timeout passed.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> anyhow::Result<Value> {
        self.execute_timeout(command, arguments, DEFAULT_TIMEOUT).await
    }

    /// [`Qmp::execute`] with a chosen timeout.
    pub async fn execute_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        if *self.inner.closed.borrow() {
            bail!("QMP connection closed");
        }
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg)?;
        bytes.push(b'\n');
        let (tx, rx) = oneshot::channel();
        {
            // Holding the writer lock while queueing keeps replies in order.
            let mut w = self.inner.writer.lock().await;
            self.inner.pending.borrow_mut().push_back(tx);
            w.write_all(&bytes).await.with_context(|| format!("sending QMP {command}"))?;
        }
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => bail!("QMP {command}: no reply within {timeout:?}"),
            Ok(Err(_)) => bail!("QMP {command}: connection closed"),
            Ok(Ok(Err(desc))) => bail!("QMP {command}: {desc}"),
            Ok(Ok(Ok(v))) => Ok(v),
        }
    }

    /// `query-status`: the run state (`"running"`, `"paused"`,
    /// `"shutdown"`, `"internal-error"`, `"guest-panicked"`, ...).
    pub async fn query_status(&self) -> anyhow::Result<String> {
        let v = self.execute("query-status", None).await?;
        Ok(v.get("status").and_then(Value::as_str).unwrap_or("unknown").to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted fake QMP server on the other end of a socketpair.
    #[test]
    fn handshake_commands_errors_and_events() {
        capvisor_rpc::conn::run_local(async {
            let (a, b) = UnixStream::pair().unwrap();
            let server = tokio::task::spawn_local(async move {
                let (r, mut w) = b.into_split();
                let mut r = BufReader::new(r);
                w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n").await.unwrap();
                let mut line = String::new();
                let mut seen = Vec::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.unwrap() == 0 {
                        break;
                    }
                    let v: Value = serde_json::from_str(&line).unwrap();
                    let cmd = v["execute"].as_str().unwrap().to_string();
                    seen.push(cmd.clone());
                    match cmd.as_str() {
                        "qmp_capabilities" => w.write_all(b"{\"return\": {}}\n").await.unwrap(),
                        "query-status" => {
                            // An event may come between a command and its reply.
                            w.write_all(b"{\"event\": \"STOP\", \"data\": {}, \"timestamp\": {}}\n").await.unwrap();
                            w.write_all(b"{\"return\": {\"status\": \"paused\", \"running\": false}}\n").await.unwrap();
                        }
                        _ => w
                            .write_all(b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}\n")
                            .await
                            .unwrap(),
                    }
                }
                seen
            });
            let (qmp, mut events) = Qmp::handshake(a).await.unwrap();
            assert_eq!(qmp.query_status().await.unwrap(), "paused");
            let ev = events.recv().await.unwrap();
            assert_eq!(ev.name, "STOP");
            let err = qmp.execute("nope", Some(json!({"x": 1}))).await.unwrap_err().to_string();
            assert!(err.contains("has not been found"), "{err}");
            drop(qmp);
            assert_eq!(server.await.unwrap(), ["qmp_capabilities", "query-status", "nope"]);
            assert!(events.recv().await.is_none(), "events close with the connection");
        });
    }

    #[test]
    fn pending_commands_fail_when_qemu_goes_away() {
        capvisor_rpc::conn::run_local(async {
            let (a, b) = UnixStream::pair().unwrap();
            tokio::task::spawn_local(async move {
                let (mut r, mut w) = b.into_split();
                w.write_all(b"{\"QMP\": {}}\n").await.unwrap();
                let mut buf = [0u8; 4096];
                let _ = r.read(&mut buf).await; // qmp_capabilities
                w.write_all(b"{\"return\": {}}\n").await.unwrap();
                let _ = r.read(&mut buf).await; // the next command: hang up instead of answering
                drop(w);
            });
            let (qmp, _events) = Qmp::handshake(a).await.unwrap();
            let err = qmp.execute("quit", None).await.unwrap_err().to_string();
            assert!(err.contains("closed"), "{err}");
        });
    }
}
