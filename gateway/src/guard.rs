//! A hard limit on capnp frames from an untrusted peer, enforced before
//! capnp-rpc reads them.
//!
//! capnp-rpc already refuses a message above its `ReaderOptions` limit, but
//! it then sends the peer an `Abort` message explaining why before closing.
//! Toward a hostile peer the gateway prefers to just hang up: [`guard`]
//! splits a stream into a reader that parses the stream framing
//! (capnp encoding spec, "Serialization over a stream": a u32 segment count
//! minus one, u32 segment sizes in words, padding to 8 bytes, then the
//! segments) and fails on a frame of more than `max_words` words or more
//! than [`MAX_SEGMENTS`] segments, and a writer that refuses every write
//! from then on, so nothing more reaches the peer.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most segments per frame (capnp-rust's own limit).
pub const MAX_SEGMENTS: usize = 512;

enum State {
    /// Collecting the segment table (`hdr` so far).
    Header(Vec<u8>),
    /// Inside a frame's segments: bytes left.
    Body(u64),
}

/// Reading half: passes bytes through while checking the framing.
pub struct GuardedRead<R> {
    inner: R,
    state: State,
    max_words: u64,
    tripped: Rc<Cell<bool>>,
}

/// Writing half: refuses writes once the reading half saw a bad frame.
pub struct GuardedWrite<W> {
    inner: W,
    tripped: Rc<Cell<bool>>,
}

/// Wraps a split stream (see the module docs).
pub fn guard<R, W>(reader: R, writer: W, max_words: u64) -> (GuardedRead<R>, GuardedWrite<W>) {
    let tripped = Rc::new(Cell::new(false));
    (
        GuardedRead { inner: reader, state: State::Header(Vec::with_capacity(8)), max_words, tripped: tripped.clone() },
        GuardedWrite { inner: writer, tripped },
    )
}

fn segment_count(hdr: &[u8]) -> usize {
    u32::from_le_bytes(hdr[..4].try_into().unwrap()) as usize + 1
}

fn header_len(count: usize) -> usize {
    // 4 bytes of count + 4 per segment size, padded to a multiple of 8.
    (4 + 4 * count).div_ceil(8) * 8
}

impl<R> GuardedRead<R> {
    /// Feeds `data` through the framing state machine.
    fn observe(&mut self, mut data: &[u8]) -> Result<(), &'static str> {
        while !data.is_empty() {
            match &mut self.state {
                State::Body(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.state = State::Header(Vec::with_capacity(8));
                    }
                }
                State::Header(hdr) => {
                    if hdr.len() < 4 {
                        let take = (4 - hdr.len()).min(data.len());
                        hdr.extend_from_slice(&data[..take]);
                        data = &data[take..];
                        if hdr.len() == 4 && segment_count(hdr) > MAX_SEGMENTS {
                            return Err("too many segments");
                        }
                        continue;
                    }
                    let count = segment_count(hdr);
                    let need = header_len(count);
                    let take = (need - hdr.len()).min(data.len());
                    hdr.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if hdr.len() < need {
                        continue;
                    }
                    let words: u64 = (0..count)
                        .map(|i| u32::from_le_bytes(hdr[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as u64)
                        .sum();
                    if words > self.max_words {
                        return Err("message too large");
                    }
                    self.state = if words == 0 { State::Header(Vec::with_capacity(8)) } else { State::Body(words * 8) };
                }
            }
        }
        Ok(())
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for GuardedRead<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.tripped.get() {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, "frame limit exceeded")));
        }
        let before = buf.filled().len();
        let me = &mut *self;
        match Pin::new(&mut me.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if let Err(why) = me.observe(&buf.filled()[before..]) {
                    me.tripped.set(true);
                    buf.set_filled(before);
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, why)));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for GuardedWrite<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if self.tripped.get() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.tripped.get() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(sizes: &[u32]) -> Vec<u8> {
        let mut v = ((sizes.len() - 1) as u32).to_le_bytes().to_vec();
        for s in sizes {
            v.extend_from_slice(&s.to_le_bytes());
        }
        if v.len() % 8 == 4 {
            v.extend_from_slice(&[0; 4]);
        }
        for s in sizes {
            v.extend(std::iter::repeat_n(0xab, *s as usize * 8));
        }
        v
    }

    fn check(bytes: &[u8], max: u64, chunk: usize) -> Result<(), &'static str> {
        let (mut r, _w) = guard((), (), max);
        for c in bytes.chunks(chunk) {
            r.observe(c)?;
        }
        Ok(())
    }

    #[test]
    fn frames_within_limits_pass_in_any_chunking() {
        let mut s = frame(&[3]);
        s.extend(frame(&[1, 2]));
        s.extend(frame(&[0]));
        s.extend(frame(&[2, 0, 5]));
        for chunk in [1, 3, 7, 8, 64, 4096] {
            assert_eq!(check(&s, 8, chunk), Ok(()), "chunk {chunk}");
        }
        // Exactly at the limit passes; one word over fails.
        assert_eq!(check(&frame(&[4, 4]), 8, 5), Ok(()));
        assert_eq!(check(&frame(&[4, 5]), 8, 5), Err("message too large"));
    }

    #[test]
    fn real_capnp_streams_pass() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut stream = Vec::new();
        for i in 0..200 {
            // Small first segments force multi-segment messages.
            let alloc = capnp::message::HeapAllocator::new().first_segment_words(1 + (i % 5) as u32);
            let mut m = capnp::message::Builder::new(alloc);
            let mut list = m.initn_root::<capnp::text_list::Builder>(rng.gen_range(0..20));
            for j in 0..list.len() {
                let len = rng.gen_range(0..300);
                list.set(j, "x".repeat(len).as_str());
            }
            capnp::serialize::write_message(&mut stream, &m).unwrap();
        }
        for chunk in [1, 2, 3, 5, 8, 13, 100, 1 << 16] {
            assert_eq!(check(&stream, 1 << 20, chunk), Ok(()), "chunk {chunk}");
        }
        // Random chunking.
        let (mut r, _w) = guard((), (), 1 << 20);
        let mut rest = &stream[..];
        while !rest.is_empty() {
            let n = rng.gen_range(1..=rest.len().min(700));
            r.observe(&rest[..n]).unwrap();
            rest = &rest[n..];
        }
        assert!(matches!(r.state, State::Header(ref h) if h.is_empty()), "ends on a frame boundary");
    }

    #[test]
    fn oversized_or_too_many_segments_fail_on_the_header() {
        let mut s = frame(&[1]);
        s.extend_from_slice(&0u32.to_le_bytes());
        s.extend_from_slice(&(1u32 << 30).to_le_bytes());
        for chunk in [1, 5, 64] {
            assert_eq!(check(&s, 1 << 20, chunk), Err("message too large"));
        }
        assert_eq!(check(&(MAX_SEGMENTS as u32).to_le_bytes(), 1 << 20, 1), Err("too many segments"));
    }
}
