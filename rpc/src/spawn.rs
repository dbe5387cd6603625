//! Starting capvisor's child processes with exactly the descriptors they
//! need. Each child gets its socketpair ends at fixed descriptor numbers
//! (documented by the child's `--*-fd` flags), everything else is
//! close-on-exec, and `PR_SET_PDEATHSIG(SIGKILL)` (prctl(2)) kills the
//! child if its parent dies, so no worker, vmm or qemu outlives a crash.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;

/// A descriptor to hand to a child at a fixed number.
pub struct Inherit {
    /// The descriptor in this process (closed here once the child is spawned).
    pub fd: OwnedFd,
    /// The number it gets in the child (3 and up).
    pub target: RawFd,
}

/// Prepares `cmd` so the child receives each of `fds` at its target number
/// and dies with its parent. Call `spawn` on the returned command, then
/// drop the `OwnedFd`s.
///
/// Safety of the `pre_exec` hook: it only calls async-signal-safe
/// functions (`dup`, `dup2`, `fcntl`, `prctl`, `getppid`).
pub fn prepare(cmd: &mut tokio::process::Command, fds: &[Inherit]) {
    let pairs: Vec<(RawFd, RawFd)> = fds.iter().map(|i| (i.fd.as_raw_fd(), i.target)).collect();
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: see the function docs; no allocation happens in the hook.
    unsafe {
        cmd.as_std_mut().pre_exec(move || {
            // First move every source above all targets, so a source that
            // equals another's target is not clobbered.
            let mut moved = [0 as RawFd; 16];
            if pairs.len() > moved.len() {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            for (i, (src, _)) in pairs.iter().enumerate() {
                let fd = libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, 64);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                moved[i] = fd;
            }
            for (i, (_, dst)) in pairs.iter().enumerate() {
                if libc::dup2(moved[i], *dst) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // dup2 clears FD_CLOEXEC on the new descriptor.
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    cmd.kill_on_drop(true);
}

/// A connected `SOCK_STREAM` Unix socketpair, both ends close-on-exec.
pub fn stream_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC).map_err(std::io::Error::from)
}

/// Turns an owned stream-socket end into a tokio `UnixStream`.
pub fn into_tokio(fd: OwnedFd) -> std::io::Result<tokio::net::UnixStream> {
    let s = std::os::unix::net::UnixStream::from(fd);
    s.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(s)
}
