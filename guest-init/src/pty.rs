//! Pseudo-terminal allocation and window size (pty(7), posix_openpt(3),
//! ioctl_tty(2) `TIOCSWINSZ`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

/// A freshly allocated pseudo-terminal pair, both ends close-on-exec.
pub struct Pty {
    /// The master (multiplexer) side, kept by guest-init.
    pub master: OwnedFd,
    /// The slave side, handed to the child as stdin/stdout/stderr and
    /// controlling terminal; close it in the parent after the fork.
    pub slave: OwnedFd,
    /// The slave's path, e.g. `/dev/pts/3`.
    pub name: String,
}

/// Opens `/dev/ptmx` (`posix_openpt(O_RDWR|O_NOCTTY|O_CLOEXEC)`), unlocks it,
/// opens the slave `O_RDWR|O_NOCTTY|O_CLOEXEC` and sets its window size to
/// `rows` x `cols` (characters).
///
/// Errors: no devpts mounted / no `/dev/ptmx` (ENOENT), out of ptys, any
/// ioctl failure.
pub fn open(rows: u16, cols: u16) -> io::Result<Pty> {
    use nix::fcntl::OFlag;
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let name = nix::pty::ptsname_r(&master)?;
    // SAFETY: PtyMaster owns a valid descriptor; we take it over.
    let master = unsafe { OwnedFd::from_raw_fd(master.into_raw_fd()) };
    let cname = std::ffi::CString::new(name.clone()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: plain open(2) with a valid C string.
    let fd = unsafe { libc::open(cname.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is ours.
    let slave = unsafe { OwnedFd::from_raw_fd(fd) };
    set_size(master.as_raw_fd(), rows, cols)?;
    Ok(Pty { master, slave, name })
}

/// Sets the terminal window size on `fd` (a pty master or slave) with
/// `TIOCSWINSZ`; the kernel sends `SIGWINCH` to the terminal's foreground
/// process group when it changes.
pub fn set_size(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads a winsize struct we own.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The terminal's `VEOF` character (usually ^D, 0x04), read with
/// tcgetattr(3) on `fd`; ^D if that fails.
pub fn eof_char(fd: RawFd) -> u8 {
    // SAFETY: tcgetattr fills a termios struct we own.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) == 0 && t.c_cc[libc::VEOF] != 0 {
            return t.c_cc[libc::VEOF];
        }
    }
    0x04
}
