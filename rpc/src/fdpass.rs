//! Passing a file descriptor plus a small tag between processes over a
//! `SOCK_SEQPACKET` Unix socketpair, with `SCM_RIGHTS` (unix(7),
//! cmsg(3)). One message = one tag (at most [`MAX_TAG`] bytes) and exactly
//! one descriptor. Used to hand a client's connected socket from the
//! gateway to its session's worker, so the client talks to the worker
//! directly (DESIGN.md: "introduce peers directly").

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Largest tag one message may carry (bytes).
pub const MAX_TAG: usize = 4096;

/// Creates a connected `SOCK_SEQPACKET` pair, both ends close-on-exec and
/// non-blocking.
pub fn pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK)
        .map_err(std::io::Error::from)
}

/// One end of an fd-passing channel.
pub struct FdChannel {
    fd: AsyncFd<OwnedFd>,
}

impl FdChannel {
    /// Wraps one end of a [`pair`] (or an inherited end; it is made non-blocking).
    ///
    /// Must be called inside a tokio runtime.
    pub fn new(fd: OwnedFd) -> std::io::Result<Self> {
        let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        #[allow(deprecated)] // AsyncFd::register is the unsafe twin; the fd is owned here
        Ok(Self { fd: AsyncFd::new(fd)? })
    }

    /// Wraps an inherited raw descriptor.
    ///
    /// # Safety
    /// `raw` must be an open `SOCK_SEQPACKET` socket owned by nobody else.
    pub unsafe fn from_raw(raw: RawFd) -> std::io::Result<Self> {
        // SAFETY: the caller guarantees `raw` is open and owned by nobody
        // else, so `OwnedFd` may take ownership (and close it on drop).
        Self::new(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    /// Sends `tag` and `fd` as one message. `fd` stays open here (the peer
    /// gets a duplicate); drop it afterwards to give it away.
    ///
    /// Errors: `tag` longer than [`MAX_TAG`] (`InvalidInput`), or the peer is gone.
    pub async fn send(&self, tag: &[u8], fd: &impl AsRawFd) -> std::io::Result<()> {
        if tag.len() > MAX_TAG || tag.is_empty() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "fd tag must be 1..=4096 bytes"));
        }
        let fds = [fd.as_raw_fd()];
        self.fd
            .async_io(Interest::WRITABLE, |s| {
                let iov = [IoSlice::new(tag)];
                let cmsg = [ControlMessage::ScmRights(&fds)];
                sendmsg::<()>(s.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None).map_err(std::io::Error::from)
            })
            .await
            .map(|_| ())
    }

    /// Receives one message: its tag and its descriptor.
    ///
    /// Errors: `UnexpectedEof` when the peer closed; `InvalidData` for a
    /// message without exactly one descriptor (any received descriptors are
    /// closed).
    pub async fn recv(&self) -> std::io::Result<(Vec<u8>, OwnedFd)> {
        let mut buf = vec![0u8; MAX_TAG];
        let res = self
            .fd
            .async_io(Interest::READABLE, |s| {
                let mut iov = [IoSliceMut::new(&mut buf)];
                let mut space = nix::cmsg_space!([RawFd; 4]);
                let msg = recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
                    .map_err(std::io::Error::from)?;
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(std::io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(r) = c {
                        fds.extend(r);
                    }
                }
                Ok((msg.bytes, fds))
            })
            .await?;
        let (n, fds) = res;
        // SAFETY: the kernel just installed these descriptors in our table.
        let mut owned: Vec<OwnedFd> = fds.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }).collect();
        if n == 0 && owned.is_empty() {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "fd channel closed"));
        }
        if owned.len() != 1 {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "fd message without exactly one fd"));
        }
        buf.truncate(n);
        Ok((buf, owned.pop().expect("exactly one fd")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn passes_fd_and_tag() {
        crate::conn::run_local(async {
            let (a, b) = pair().unwrap();
            let (a, b) = (FdChannel::new(a).unwrap(), FdChannel::new(b).unwrap());
            let (mut x, y) = std::os::unix::net::UnixStream::pair().unwrap();
            a.send(b"session-7", &y).await.unwrap();
            drop(y);
            let (tag, fd) = b.recv().await.unwrap();
            assert_eq!(tag, b"session-7");
            let mut y2 = std::os::unix::net::UnixStream::from(fd);
            x.write_all(b"hi").unwrap();
            let mut got = [0u8; 2];
            y2.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"hi");
            drop(a);
            assert_eq!(b.recv().await.unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
        });
    }

    #[test]
    fn rejects_empty_and_oversized_tags() {
        crate::conn::run_local(async {
            let (a, _b) = pair().unwrap();
            let a = FdChannel::new(a).unwrap();
            let (x, _y) = std::os::unix::net::UnixStream::pair().unwrap();
            assert!(a.send(b"", &x).await.is_err());
            assert!(a.send(&vec![1u8; MAX_TAG + 1], &x).await.is_err());
        });
    }
}
