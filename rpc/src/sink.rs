//! `ByteSink` helpers (schema `common.capnp`: `write @0 (data) -> stream;
//! done @1 ()`): pumping a reader into a sink, and sink servers that write
//! to an `AsyncWrite` or collect into memory.

use crate::CHUNK;
use capnp::capability::Rc;
use capvisor_schema::common_capnp::byte_sink;
use std::cell::RefCell;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Reads `reader` to its end and streams it into `sink` in chunks of at most
/// [`CHUNK`] bytes, honouring the sink's flow control, then calls `done`.
/// Returns the number of bytes sent.
///
/// Errors: a read error becomes `failed`; a sink error (the receiver went
/// away: `disconnected`) is returned as is. `done` is not called on error.
pub async fn pump<R: AsyncRead + Unpin>(mut reader: R, sink: &byte_sink::Client) -> capnp::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).await.map_err(crate::error::failed)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        let mut req = sink.write_request();
        req.get().set_data(&buf[..n]);
        req.send().await?;
    }
    sink.done_request().send().promise.await?;
    Ok(total)
}

/// Sends `data` into `sink` in [`CHUNK`]-sized writes (no `done`).
pub async fn write_all(sink: &byte_sink::Client, data: &[u8]) -> capnp::Result<()> {
    for chunk in data.chunks(CHUNK) {
        let mut req = sink.write_request();
        req.get().set_data(chunk);
        req.send().await?;
    }
    Ok(())
}

/// A `ByteSink` server that writes every chunk to `W` (a file, the CLI's
/// stdout) and flushes on `done`. After `done`, further writes fail.
pub struct WriterSink<W> {
    out: tokio::sync::Mutex<Option<W>>,
    done_tx: RefCell<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl<W: AsyncWrite + Unpin + 'static> WriterSink<W> {
    /// A sink over `out`, and a receiver that fires once `done` was called
    /// and `out` flushed (dropped without firing if the sink is dropped first).
    pub fn new(out: W) -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Self { out: tokio::sync::Mutex::new(Some(out)), done_tx: RefCell::new(Some(tx)) }, rx)
    }

    /// Convenience: the sink as a client cap, and its done receiver.
    pub fn client(out: W) -> (byte_sink::Client, tokio::sync::oneshot::Receiver<()>) {
        let (s, rx) = Self::new(out);
        (capnp_rpc::new_client(s), rx)
    }
}

impl<W: AsyncWrite + Unpin + 'static> byte_sink::Server for WriterSink<W> {
    async fn write(self: Rc<Self>, params: byte_sink::WriteParams) -> capnp::Result<()> {
        let data = params.get()?.get_data()?;
        let mut guard = self.out.lock().await;
        let out = guard.as_mut().ok_or_else(|| capnp::Error::failed("write after done".into()))?;
        out.write_all(data).await.map_err(crate::error::failed)?;
        Ok(())
    }

    async fn done(self: Rc<Self>, _: byte_sink::DoneParams, _: byte_sink::DoneResults) -> capnp::Result<()> {
        let mut guard = self.out.lock().await;
        if let Some(mut out) = guard.take() {
            out.flush().await.map_err(crate::error::failed)?;
        }
        if let Some(tx) = self.done_tx.borrow_mut().take() {
            let _ = tx.send(());
        }
        Ok(())
    }
}

/// A `ByteSink` server that collects bytes in memory, up to `limit` bytes
/// (a write past the limit fails with `failed`, so a runaway writer cannot
/// exhaust memory).
pub struct CollectSink {
    buf: RefCell<Vec<u8>>,
    limit: usize,
    done_tx: RefCell<Option<tokio::sync::oneshot::Sender<Vec<u8>>>>,
}

impl CollectSink {
    /// A collecting sink as a client cap, and a receiver yielding all bytes
    /// once `done` is called.
    pub fn client(limit: usize) -> (byte_sink::Client, tokio::sync::oneshot::Receiver<Vec<u8>>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let s = Self { buf: RefCell::new(Vec::new()), limit, done_tx: RefCell::new(Some(tx)) };
        (capnp_rpc::new_client(s), rx)
    }
}

impl byte_sink::Server for CollectSink {
    async fn write(self: Rc<Self>, params: byte_sink::WriteParams) -> capnp::Result<()> {
        let data = params.get()?.get_data()?;
        let mut buf = self.buf.borrow_mut();
        if buf.len() + data.len() > self.limit {
            return Err(capnp::Error::failed(format!("output exceeds the {} byte limit", self.limit)));
        }
        buf.extend_from_slice(data);
        Ok(())
    }

    async fn done(self: Rc<Self>, _: byte_sink::DoneParams, _: byte_sink::DoneResults) -> capnp::Result<()> {
        if let Some(tx) = self.done_tx.borrow_mut().take() {
            let _ = tx.send(std::mem::take(&mut *self.buf.borrow_mut()));
        }
        Ok(())
    }
}
