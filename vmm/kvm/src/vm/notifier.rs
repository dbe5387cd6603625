//! Queue notifications without vCPU exits: each virtio queue's QueueNotify
//! register is bound with KVM_IOEVENTFD (datamatch = queue index) to an
//! eventfd, and one thread ("virtio-notify") waits on all of them with
//! epoll and calls the transport's QueueNotify handler. Where
//! KVM_IOEVENTFD fails, the MMIO-exit path of the vCPU handles the same
//! write.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::VmError;
use crate::devices::virtio::mmio::{reg, MmioTransport};
use crate::devices::Device;
use crate::hypervisor::kvm::KvmVm;
use crate::hypervisor::Vm as _;

/// One queue's KVM_IOEVENTFD eventfd and what it notifies.
pub(super) struct QueueEventFd {
    evt: EventFd,
    /// Index of the transport in [`super::Vm::virtio_transports`].
    slot: usize,
    /// Queue index written to QueueNotify.
    queue: u32,
}

/// Bind QueueNotify (at `base + QUEUE_NOTIFY`) of each of `nqueues` queues
/// of the virtio-mmio window of transport `slot` to an eventfd. A failed
/// registration is recorded in `errors` (that queue uses MMIO exits).
///
/// Errors: [`VmError::Io`] when an eventfd cannot be created.
pub(super) fn register_ioeventfds(
    kvm: &KvmVm,
    slot: usize,
    base: u64,
    nqueues: usize,
    fds: &mut Vec<QueueEventFd>,
    errors: &mut Vec<String>,
) -> Result<(), VmError> {
    for queue in 0..nqueues as u32 {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Io("eventfd for ioeventfd".into(), e))?;
        match kvm.register_ioeventfd(&evt, base + reg::QUEUE_NOTIFY, queue) {
            Ok(()) => fds.push(QueueEventFd { evt, slot, queue }),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Ok(())
}

/// The running notifier thread.
pub(super) struct Notifier {
    stop: EventFd,
    join: JoinHandle<()>,
}

const NOTIFY_STOP_TOKEN: u64 = u64::MAX;

impl Notifier {
    /// Start the "virtio-notify" thread over `fds`.
    ///
    /// Errors: epoll, eventfd or thread creation failure.
    pub(super) fn start(
        fds: Vec<QueueEventFd>,
        transports: Vec<Arc<Mutex<MmioTransport>>>,
    ) -> std::io::Result<Notifier> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(ControlOperation::Add, stop.as_raw_fd(), EpollEvent::new(EventSet::IN, NOTIFY_STOP_TOKEN))?;
        for (i, f) in fds.iter().enumerate() {
            epoll.ctl(ControlOperation::Add, f.evt.as_raw_fd(), EpollEvent::new(EventSet::IN, i as u64))?;
        }
        let join = std::thread::Builder::new()
            .name("virtio-notify".into())
            .spawn(move || notifier_loop(epoll, fds, transports))?;
        Ok(Notifier { stop, join })
    }

    /// Stop the thread and join it.
    pub(super) fn stop(self) {
        let _ = self.stop.write(1);
        let _ = self.join.join();
    }
}

fn notifier_loop(epoll: Epoll, fds: Vec<QueueEventFd>, transports: Vec<Arc<Mutex<MmioTransport>>>) {
    let mut events = vec![EpollEvent::default(); fds.len() + 1];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(_) => return,
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == NOTIFY_STOP_TOKEN {
                return;
            }
            let Some(f) = fds.get(token as usize) else { continue };
            if f.evt.read().is_err() {
                continue;
            }
            if let Some(t) = transports.get(f.slot) {
                if let Ok(mut t) = t.lock() {
                    t.write(reg::QUEUE_NOTIFY, &f.queue.to_le_bytes());
                }
            }
        }
    }
}
