//! Host wiring of virtio-console (VIRTIO 1.2 section 5.3): the
//! [`VirtioDevice`] the transport drives, and the non-blocking host pump
//! between the ports and their backend file descriptors.
//!
//! [`VirtioConsole::new`] returns two halves sharing one [`ConsoleCore`]:
//!
//! * [`VirtioConsole`] goes into the
//!   [`MmioTransport`](crate::devices::virtio::mmio::MmioTransport). Queue
//!   notifications run on the vCPU thread and only touch guest memory
//!   (control messages, copying transmitted bytes into the bounded output
//!   buffer, filling receive buffers from staged bytes); they never do
//!   host I/O. After each one the device writes the pump's wake eventfd.
//! * [`ConsoleBackend`] owns the backend fds (set `O_NONBLOCK`) and does
//!   all host I/O in [`ConsoleBackend::process`]: write pending output,
//!   read input for ports that [`ConsoleCore::wants_input`], detect EOF.
//!   Either run it on its own thread with [`ConsoleBackend::spawn`] (a
//!   `poll(2)` loop), or drive it from the VMM's event loop: wait for any
//!   of [`ConsoleBackend::poll_fds`] (recomputed after every call, since
//!   interest changes with guest state) and call `process()`.
//!
//! Backpressure: a backend fd is polled for input only while the guest
//! has the port open, has receive buffers posted, and no earlier input is
//! still staged; it is polled for output only while output is pending.
//! Interrupts are raised through the transport's
//! [`VirtioInterrupt`](crate::devices::virtio::VirtioInterrupt) by whichever
//! thread returned buffers.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::snapshot::ConsoleSnapshot;
use super::{ConsoleCore, ConsoleError, PortConfig, VIRTIO_CONSOLE_F_MULTIPORT};
use crate::devices::virtio::queue::Queue;
use crate::devices::virtio::snapshot::VirtioDeviceState;
use crate::devices::virtio::{device_type, features, ActivateContext, ActivateError, VirtioDevice};

/// Bytes read from a backend per `read(2)`.
pub const READ_CHUNK: usize = 64 << 10;

/// One port as the VMM configures it.
#[derive(Debug)]
pub struct ConsolePort {
    /// PORT_NAME announced to the guest (e.g. `capvisor.agent`).
    pub name: Option<String>,
    /// Announce the port as a console (CONSOLE_PORT, 5.3.6.2).
    pub console: bool,
    /// Host end of the port's byte stream: a stream socket (e.g. the
    /// agent `UnixStream` socketpair end). It is switched to `O_NONBLOCK`.
    /// `None`: output is discarded and the port is never host-connected.
    pub backend: Option<OwnedFd>,
}

impl ConsolePort {
    /// A named, non-console port on `backend` (for `capvisor.agent`).
    pub fn named(name: &str, backend: impl Into<OwnedFd>) -> Self {
        ConsolePort { name: Some(name.to_owned()), console: false, backend: Some(backend.into()) }
    }
    /// A console port (guest hvc), with an optional backend.
    pub fn console(backend: Option<OwnedFd>) -> Self {
        ConsolePort { name: None, console: true, backend }
    }
}

/// Errors building a console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleIoError {
    /// Bad port list or snapshot.
    #[error(transparent)]
    Config(#[from] ConsoleError),
    /// eventfd / fcntl failure.
    #[error("console setup: {0}")]
    Io(#[from] std::io::Error),
}

struct Shared {
    core: Mutex<ConsoleCore>,
    wake: EventFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ConsoleCore> {
        // A panic elsewhere must not take the guest's console down with it.
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }
    fn kick(&self) {
        // A full counter already means "wake up".
        let _ = self.wake.write(1);
    }
}

/// The virtio-console device (id 3) the transport drives. Offers
/// VIRTIO_F_VERSION_1, VIRTIO_F_INDIRECT_DESC and
/// VIRTIO_CONSOLE_F_MULTIPORT (5.3.3).
pub struct VirtioConsole {
    shared: Arc<Shared>,
    max_sizes: Vec<u16>,
    config: [u8; 12],
}

impl std::fmt::Debug for VirtioConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioConsole").field("core", &*self.shared.lock()).finish()
    }
}

struct Backend {
    fd: OwnedFd,
    read_open: bool,
    write_open: bool,
}

/// The host half: backend fds and the I/O pump (see the module docs).
pub struct ConsoleBackend {
    shared: Arc<Shared>,
    backends: Vec<Option<Backend>>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for ConsoleBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleBackend").field("ports", &self.backends.len()).finish()
    }
}

fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn split(ports: Vec<ConsolePort>) -> std::io::Result<(Vec<PortConfig>, Vec<Option<Backend>>)> {
    let mut configs = Vec::new();
    let mut backends = Vec::new();
    for p in ports {
        configs.push(PortConfig { name: p.name, console: p.console, has_backend: p.backend.is_some() });
        backends.push(match p.backend {
            Some(fd) => {
                set_nonblocking(fd.as_raw_fd())?;
                Some(Backend { fd, read_open: true, write_open: true })
            }
            None => None,
        });
    }
    Ok((configs, backends))
}

impl VirtioConsole {
    /// A console with `ports` (port `i` is `/dev/vportNp<i>` in the guest)
    /// and its host half.
    ///
    /// Errors: [`ConsoleIoError`] (bad port list, eventfd or fcntl failure).
    pub fn new(ports: Vec<ConsolePort>) -> Result<(VirtioConsole, ConsoleBackend), ConsoleIoError> {
        let (configs, backends) = split(ports)?;
        Self::build(ConsoleCore::new(configs)?, backends)
    }

    /// Rebuild from `snap` with fresh backends (before
    /// [`MmioTransport::restore`](crate::devices::virtio::mmio::MmioTransport::restore)).
    ///
    /// Errors: as [`VirtioConsole::new`], plus a port count mismatch.
    pub fn restore(
        ports: Vec<ConsolePort>,
        snap: &ConsoleSnapshot,
    ) -> Result<(VirtioConsole, ConsoleBackend), ConsoleIoError> {
        let (configs, backends) = split(ports)?;
        Self::build(ConsoleCore::restore(configs, snap)?, backends)
    }

    fn build(
        core: ConsoleCore,
        backends: Vec<Option<Backend>>,
    ) -> Result<(VirtioConsole, ConsoleBackend), ConsoleIoError> {
        let max_sizes = core.queue_max_sizes();
        let config = core.config_space();
        let shared = Arc::new(Shared { core: Mutex::new(core), wake: EventFd::new(EFD_NONBLOCK)? });
        Ok((
            VirtioConsole { shared: shared.clone(), max_sizes, config },
            ConsoleBackend { shared, backends, buf: vec![0; READ_CHUNK] },
        ))
    }
}

impl VirtioDevice for VirtioConsole {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }
    fn device_features(&self) -> u64 {
        features::VIRTIO_F_VERSION_1 | features::VIRTIO_F_INDIRECT_DESC | VIRTIO_CONSOLE_F_MULTIPORT
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::read_config_bytes(&self.config, offset, data)
    }
    /// Nothing is writable: `emerg_wr` needs VIRTIO_CONSOLE_F_EMERG_WRITE,
    /// which is not offered.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let r = self.shared.lock().activate(ctx);
        self.shared.kick();
        r
    }
    fn queue_notify(&mut self, index: u16) {
        self.shared.lock().queue_notify(index);
        self.shared.kick();
    }
    fn reset(&mut self) {
        self.shared.lock().reset();
        self.shared.kick();
    }
    fn snapshot(&self) -> VirtioDeviceState {
        VirtioDeviceState::Console(self.shared.lock().save())
    }
    /// Empty: the live queues are shared with the pump behind a lock; the
    /// ring positions travel in the device snapshot instead
    /// ([`ConsoleSnapshot::queue_positions`]).
    fn active_queues(&self) -> &[Queue] {
        &[]
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `send(MSG_NOSIGNAL)` (no SIGPIPE on a closed peer), `write` for non-sockets.
fn write_fd(fd: RawFd, data: &[u8]) -> std::io::Result<usize> {
    // SAFETY: `data` is a valid readable buffer of `data.len()` bytes.
    let n = unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if n >= 0 {
        return Ok(n as usize);
    }
    if errno() != libc::ENOTSOCK {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    if n >= 0 {
        Ok(n as usize)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn read_fd(fd: RawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n >= 0 {
        Ok(n as usize)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Input reads per port per [`ConsoleBackend::process`] call (fairness
/// between ports; poll comes straight back while more is wanted).
const READS_PER_ROUND: usize = 16;

impl ConsoleBackend {
    /// The shared device state (diagnostics, tests).
    pub fn core(&self) -> MutexGuard<'_, ConsoleCore> {
        self.shared.lock()
    }

    /// The eventfd the device writes after queue notifications.
    pub fn wake_fd(&self) -> RawFd {
        self.shared.wake.as_raw_fd()
    }

    /// What to wait for before the next [`ConsoleBackend::process`]: the
    /// wake eventfd (POLLIN) and each backend fd with POLLIN while its port
    /// wants input and POLLOUT while output is pending. A backend with no
    /// interest is left out (so a hung-up peer does not spin the loop).
    pub fn poll_fds(&self) -> Vec<libc::pollfd> {
        let core = self.shared.lock();
        let mut fds = vec![libc::pollfd { fd: self.wake_fd(), events: libc::POLLIN, revents: 0 }];
        for (port, b) in self.backends.iter().enumerate() {
            let Some(b) = b else { continue };
            let mut events = 0;
            if b.read_open && core.wants_input(port) {
                events |= libc::POLLIN;
            }
            if b.write_open && !core.pending_output(port).is_empty() {
                events |= libc::POLLOUT;
            }
            if events != 0 {
                fds.push(libc::pollfd { fd: b.fd.as_raw_fd(), events, revents: 0 });
            }
        }
        fds
    }

    /// One non-blocking round of host I/O for every port: write pending
    /// output until the backend would block, then read input while the
    /// port wants it. EOF or a read error disconnects the host side
    /// (PORT_OPEN(0) to the guest); a write error discards output from
    /// then on. Safe to call at any time, from any one thread.
    pub fn process(&mut self) {
        // Drain the wake counter first: a notification that lands during
        // this round makes the next poll return at once.
        let _ = self.shared.wake.read();
        let mut core = self.shared.lock();
        for (port, slot) in self.backends.iter_mut().enumerate() {
            let Some(b) = slot else { continue };
            let fd = b.fd.as_raw_fd();
            while b.write_open {
                let out = core.pending_output(port);
                if out.is_empty() {
                    break;
                }
                match write_fd(fd, out) {
                    Ok(0) => break,
                    Ok(n) => core.consume_output(port, n),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        b.write_open = false;
                        core.close_output(port);
                    }
                }
            }
            let mut reads = 0;
            while b.read_open && reads < READS_PER_ROUND && core.wants_input(port) {
                reads += 1;
                match read_fd(fd, &mut self.buf) {
                    Ok(0) => {
                        b.read_open = false;
                        core.host_disconnected(port);
                    }
                    Ok(n) => core.push_input(port, &self.buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        b.read_open = false;
                        core.host_disconnected(port);
                    }
                }
            }
        }
    }

    /// Attach a new backend to `port` (e.g. the agent reconnected): the
    /// guest gets PORT_OPEN(1) and data flows again.
    ///
    /// Errors: `port` out of range (`InvalidInput`), fcntl failure.
    pub fn attach(&mut self, port: usize, backend: impl Into<OwnedFd>) -> std::io::Result<()> {
        let fd: OwnedFd = backend.into();
        let slot = self.backends.get_mut(port).ok_or(std::io::ErrorKind::InvalidInput)?;
        set_nonblocking(fd.as_raw_fd())?;
        *slot = Some(Backend { fd, read_open: true, write_open: true });
        self.shared.lock().host_reconnected(port);
        Ok(())
    }

    /// Run [`ConsoleBackend::process`] on a thread named `virtio-console`
    /// that `poll(2)`s [`ConsoleBackend::poll_fds`]. Stopped (and joined)
    /// by [`ConsolePump::stop`] or drop.
    ///
    /// Errors: thread creation failure.
    pub fn spawn(mut self) -> std::io::Result<ConsolePump> {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = self.shared.clone();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new().name("virtio-console".into()).spawn(move || {
            while !stop2.load(Ordering::Acquire) {
                let mut fds = self.poll_fds();
                // SAFETY: `fds` is a valid array of `fds.len()` pollfds.
                let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
                if r < 0 && errno() != libc::EINTR {
                    // Nothing sensible to do but retry after a pause.
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                if stop2.load(Ordering::Acquire) {
                    break;
                }
                self.process();
            }
            self
        })?;
        Ok(ConsolePump { stop, shared, thread: Some(thread) })
    }
}

/// A running pump thread (see [`ConsoleBackend::spawn`]).
pub struct ConsolePump {
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<ConsoleBackend>>,
}

impl std::fmt::Debug for ConsolePump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsolePump").field("running", &self.thread.is_some()).finish()
    }
}

impl ConsolePump {
    /// Stop and join the thread; returns the backend half (`None` if the
    /// thread panicked).
    pub fn stop(mut self) -> Option<ConsoleBackend> {
        self.halt()
    }

    fn halt(&mut self) -> Option<ConsoleBackend> {
        self.stop.store(true, Ordering::Release);
        self.shared.kick();
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Drop for ConsolePump {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}
