//! The gateway socket's connection preamble (capvisor's own framing, sent
//! before any capnp-rpc bytes).
//!
//! A client opens the gateway's Unix socket and first writes 8 bytes:
//! - [`MAGIC_RPC`] (`"CVRPC001"`): capnp-rpc follows; the gateway serves
//!   `Gateway` as the bootstrap cap (login calls).
//! - [`MAGIC_ATTACH`] (`"CVATT001"`), then a u32 little-endian length and
//!   that many bytes of resume token (1..=[`MAX_TOKEN`]): attach to an
//!   existing session. The gateway hands the connected socket to the broker
//!   (fd passing), which checks the token and hands it on to the session's
//!   worker; the client then talks to its worker directly, with `Session`
//!   as the bootstrap cap. Before any RPC byte the client reads a reply:
//!   one byte `0` (OK), or `1` followed by a u16 LE error code (schema
//!   `ErrorCode`), a u16 LE message length and the UTF-8 message, after
//!   which the socket is closed.
//!
//! Anything else ends the connection at once.

use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Preamble for a plain Gateway RPC connection.
pub const MAGIC_RPC: &[u8; 8] = b"CVRPC001";
/// Preamble for an attach (resume) connection.
pub const MAGIC_ATTACH: &[u8; 8] = b"CVATT001";
/// Longest resume token accepted, bytes.
pub const MAX_TOKEN: usize = 256;
/// How long a peer may take to send its preamble before it is dropped.
pub const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a connection asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Preamble {
    /// Plain Gateway RPC.
    Rpc,
    /// Attach with this resume token.
    Attach(String),
}

/// Reads the preamble, within [`PREAMBLE_TIMEOUT`].
///
/// Errors (`InvalidData` / `TimedOut` / I/O): unknown magic, a token length
/// of 0 or above [`MAX_TOKEN`], a token that is not UTF-8, a slow peer.
pub async fn read_preamble<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Preamble> {
    tokio::time::timeout(PREAMBLE_TIMEOUT, async {
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic).await?;
        if &magic == MAGIC_RPC {
            return Ok(Preamble::Rpc);
        }
        if &magic != MAGIC_ATTACH {
            return Err(invalid("unknown connection preamble"));
        }
        let len = r.read_u32_le().await? as usize;
        if len == 0 || len > MAX_TOKEN {
            return Err(invalid("bad token length"));
        }
        let mut tok = vec![0u8; len];
        r.read_exact(&mut tok).await?;
        String::from_utf8(tok).map(Preamble::Attach).map_err(|_| invalid("token is not UTF-8"))
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "preamble timeout"))?
}

/// Writes the attach preamble for `token`.
pub async fn write_attach<W: AsyncWrite + Unpin>(w: &mut W, token: &str) -> std::io::Result<()> {
    if token.is_empty() || token.len() > MAX_TOKEN {
        return Err(invalid("bad token length"));
    }
    let mut buf = Vec::with_capacity(12 + token.len());
    buf.extend_from_slice(MAGIC_ATTACH);
    buf.extend_from_slice(&(token.len() as u32).to_le_bytes());
    buf.extend_from_slice(token.as_bytes());
    w.write_all(&buf).await
}

/// Writes the OK reply (by the worker, before serving RPC).
pub async fn write_ok<W: AsyncWrite + Unpin>(w: &mut W) -> std::io::Result<()> {
    w.write_all(&[0u8]).await
}

/// Writes an error reply (by the broker, then it closes the socket).
pub async fn write_err<W: AsyncWrite + Unpin>(w: &mut W, e: &crate::CvError) -> std::io::Result<()> {
    let msg = e.message.as_bytes();
    let msg = &msg[..msg.len().min(1024)];
    let mut buf = vec![1u8];
    buf.extend_from_slice(&(e.code as u16).to_le_bytes());
    buf.extend_from_slice(&(msg.len() as u16).to_le_bytes());
    buf.extend_from_slice(msg);
    w.write_all(&buf).await
}

/// Reads the reply to an attach: `Ok(())` or the typed error.
///
/// Errors: `Err(Err(io))` when the connection ended or the reply is malformed.
pub async fn read_reply<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Result<(), crate::CvError>> {
    let status = r.read_u8().await?;
    if status == 0 {
        return Ok(Ok(()));
    }
    if status != 1 {
        return Err(invalid("bad attach reply"));
    }
    let code = r.read_u16_le().await?;
    let len = r.read_u16_le().await? as usize;
    let mut msg = vec![0u8; len];
    r.read_exact(&mut msg).await?;
    let code = capvisor_schema::common_capnp::ErrorCode::try_from(code)
        .unwrap_or(capvisor_schema::common_capnp::ErrorCode::Internal);
    Ok(Err(crate::CvError::new(code, String::from_utf8_lossy(&msg).into_owned())))
}

fn invalid(m: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        crate::conn::run_local(async {
            let (mut a, mut b) = tokio::io::duplex(1024);
            write_attach(&mut a, "tok123").await.unwrap();
            assert_eq!(read_preamble(&mut b).await.unwrap(), Preamble::Attach("tok123".into()));
            write_err(&mut b, &crate::CvError::stale()).await.unwrap();
            let e = read_reply(&mut a).await.unwrap().unwrap_err();
            assert_eq!(e.code, capvisor_schema::common_capnp::ErrorCode::StaleSession);
            write_ok(&mut b).await.unwrap();
            assert!(read_reply(&mut a).await.unwrap().is_ok());
        });
    }

    #[test]
    fn rejects_garbage() {
        crate::conn::run_local(async {
            let (mut a, mut b) = tokio::io::duplex(1024);
            a.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            assert!(read_preamble(&mut b).await.is_err());
            let (mut a, mut b) = tokio::io::duplex(1024);
            a.write_all(MAGIC_ATTACH).await.unwrap();
            a.write_all(&(100_000u32).to_le_bytes()).await.unwrap();
            assert!(read_preamble(&mut b).await.is_err());
        });
    }
}
