//! A tokio `AsyncRead + AsyncWrite` over any pollable descriptor (pipe
//! ends, a pty master, a virtio-serial port), built on [`tokio::io::unix::AsyncFd`].
//!
//! [`FdStream`] is cheap to clone (clones share one registration), so a
//! reader half and a writer half can live in different tasks; tokio tracks
//! read and write readiness separately.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A non-blocking descriptor registered with the tokio reactor.
#[derive(Clone)]
pub struct FdStream {
    fd: Rc<AsyncFd<OwnedFd>>,
    eio_is_eof: bool,
}

impl FdStream {
    /// Sets `fd` non-blocking and registers it.
    ///
    /// Errors: the descriptor cannot be polled with epoll (a regular file),
    /// or fcntl fails. Must be called inside a tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(fd.as_raw_fd())?;
        // SAFETY: the OwnedFd stays open and unreplaced while the AsyncFd owns it.
        let afd = unsafe { AsyncFd::register(fd)? };
        Ok(Self { fd: Rc::new(afd), eio_is_eof: false })
    }

    /// Like [`FdStream::new`], but a read failing with `EIO` counts as end
    /// of stream: a pty master reads `EIO` once every slave descriptor is
    /// closed (pty(7)).
    pub fn new_pty_master(fd: OwnedFd) -> io::Result<Self> {
        let mut s = Self::new(fd)?;
        s.eio_is_eof = true;
        Ok(s)
    }

    /// The raw descriptor (for ioctls such as `TIOCSWINSZ`).
    pub fn raw(&self) -> std::os::fd::RawFd {
        self.fd.get_ref().as_raw_fd()
    }
}

/// Sets `O_NONBLOCK` on `fd`.
pub fn set_nonblocking(fd: std::os::fd::RawFd) -> io::Result<()> {
    // SAFETY: plain fcntl on a descriptor the caller owns.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 {
            return Err(io::Error::last_os_error());
        }
        if fl & libc::O_NONBLOCK == 0 && libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl AsyncRead for FdStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let res = guard.try_io(|inner| {
                // SAFETY: reading into an initialised buffer of that length.
                let n =
                    unsafe { libc::read(inner.get_ref().as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) if self.eio_is_eof && e.raw_os_error() == Some(libc::EIO) => {
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let res = guard.try_io(|inner| {
                // SAFETY: writing from a valid slice.
                let n = unsafe { libc::write(inner.get_ref().as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(Ok(n)) => return Poll::Ready(Ok(n)),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
