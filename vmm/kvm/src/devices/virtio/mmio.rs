//! virtio-mmio transport, version 2 (VIRTIO 1.2 section 4.2.2, table 4.1).
//!
//! Register file (offsets from the window base; all 32-bit, 32-bit aligned
//! accesses, 4.2.2.2 - other widths on registers are ignored / read 0):
//!
//! | off | name | dir |
//! |---|---|---|
//! | 0x000 | MagicValue 0x74726976 ("virt") | R |
//! | 0x004 | Version (2) | R |
//! | 0x008 | DeviceID | R |
//! | 0x00c | VendorID | R |
//! | 0x010 / 0x014 | DeviceFeatures / DeviceFeaturesSel | R / W |
//! | 0x020 / 0x024 | DriverFeatures / DriverFeaturesSel | W / W |
//! | 0x030 | QueueSel | W |
//! | 0x034 / 0x038 | QueueNumMax / QueueNum | R / W |
//! | 0x044 | QueueReady | RW |
//! | 0x050 | QueueNotify | W |
//! | 0x060 / 0x064 | InterruptStatus / InterruptACK | R / W |
//! | 0x070 | Status | RW |
//! | 0x080..0x0a4 | QueueDesc/Driver/Device Low/High | W |
//! | 0x0ac..0x0bc | SHMSel / SHMLen / SHMBase (no regions: reads -1) | W / R |
//! | 0x0fc | ConfigGeneration | R |
//! | 0x100.. | device-specific configuration | RW |
//!
//! Writes to read-only registers and to queue registers of a ready queue
//! are ignored. Status follows 3.1.1: bits are only added in order
//! ACKNOWLEDGE -> DRIVER -> FEATURES_OK -> DRIVER_OK (out-of-order writes are
//! ignored), FEATURES_OK is refused (not set) unless the accepted features
//! are a subset of the offered ones and include VIRTIO_F_VERSION_1, and
//! writing 0 resets the device (4.2.2.1: InterruptStatus and QueueReady
//! cleared).

use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::queue::Queue;
use super::snapshot::{MmioTransportSnapshot, QueueSnapshot};
use super::{features, status, ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt};
use crate::devices::{Device, DeviceState, IoAction};

/// MagicValue: "virt" little-endian (4.2.2; ours: `virtio-bindings` only
/// has the register offset).
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Transport version (non-legacy, 4.2.2; ours, as above).
pub const MMIO_VERSION: u32 = 2;
/// Our VendorID ("CPVZ").
pub const VENDOR_ID: u32 = 0x5a56_5043;
/// Offset of the device-specific configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = reg::CONFIG;

/// Register offsets (table 4.1), from `virtio-bindings`
/// (`virtio_mmio::VIRTIO_MMIO_*`; Linux names QueueDriver / QueueDevice
/// `QUEUE_AVAIL` / `QUEUE_USED`), except [`reg::QUEUE_RESET`].
#[allow(missing_docs)]
pub mod reg {
    use virtio_bindings::virtio_mmio as m;
    pub const MAGIC_VALUE: u64 = m::VIRTIO_MMIO_MAGIC_VALUE as u64;
    pub const VERSION: u64 = m::VIRTIO_MMIO_VERSION as u64;
    pub const DEVICE_ID: u64 = m::VIRTIO_MMIO_DEVICE_ID as u64;
    pub const VENDOR_ID: u64 = m::VIRTIO_MMIO_VENDOR_ID as u64;
    pub const DEVICE_FEATURES: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES as u64;
    pub const DEVICE_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
    pub const DRIVER_FEATURES: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES as u64;
    pub const DRIVER_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
    pub const QUEUE_SEL: u64 = m::VIRTIO_MMIO_QUEUE_SEL as u64;
    pub const QUEUE_NUM_MAX: u64 = m::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
    pub const QUEUE_NUM: u64 = m::VIRTIO_MMIO_QUEUE_NUM as u64;
    pub const QUEUE_READY: u64 = m::VIRTIO_MMIO_QUEUE_READY as u64;
    pub const QUEUE_NOTIFY: u64 = m::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
    pub const INTERRUPT_STATUS: u64 = m::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
    pub const INTERRUPT_ACK: u64 = m::VIRTIO_MMIO_INTERRUPT_ACK as u64;
    pub const STATUS: u64 = m::VIRTIO_MMIO_STATUS as u64;
    pub const QUEUE_DESC_LOW: u64 = m::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
    pub const QUEUE_DESC_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
    pub const QUEUE_DRIVER_LOW: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
    pub const QUEUE_DRIVER_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
    pub const QUEUE_DEVICE_LOW: u64 = m::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
    pub const QUEUE_DEVICE_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
    pub const SHM_SEL: u64 = m::VIRTIO_MMIO_SHM_SEL as u64;
    pub const SHM_LEN_LOW: u64 = m::VIRTIO_MMIO_SHM_LEN_LOW as u64;
    pub const SHM_LEN_HIGH: u64 = m::VIRTIO_MMIO_SHM_LEN_HIGH as u64;
    pub const SHM_BASE_LOW: u64 = m::VIRTIO_MMIO_SHM_BASE_LOW as u64;
    pub const SHM_BASE_HIGH: u64 = m::VIRTIO_MMIO_SHM_BASE_HIGH as u64;
    /// QueueReset (4.2.2, table 4.1). Ours: `virtio-bindings` 0.2 has no
    /// `VIRTIO_MMIO_QUEUE_RESET`.
    pub const QUEUE_RESET: u64 = 0x0c0;
    pub const CONFIG_GENERATION: u64 = m::VIRTIO_MMIO_CONFIG_GENERATION as u64;
    pub const CONFIG: u64 = m::VIRTIO_MMIO_CONFIG as u64;
}

/// One virtio-mmio window: register file state plus the device behind it.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    config_generation: u32,
    activated: bool,
    /// Last activation failure, for diagnostics.
    last_error: Option<String>,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish()
    }
}

impl MmioTransport {
    /// A transport in reset state for `device`, whose queues live in `mem`,
    /// signalling through `interrupt`.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, interrupt: Arc<VirtioInterrupt>) -> Self {
        let queues = device.queue_max_sizes().iter().map(|&m| Queue::new(m)).collect();
        MmioTransport {
            device,
            mem,
            interrupt,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            queues,
            config_generation: 0,
            activated: false,
            last_error: None,
        }
    }

    /// Device status register.
    pub fn status(&self) -> u32 {
        self.status
    }
    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }
    /// True after a successful DRIVER_OK.
    pub fn is_activated(&self) -> bool {
        self.activated
    }
    /// The interrupt state.
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }
    /// The transport-side queue configuration.
    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }
    /// Why the last DRIVER_OK failed, if it did.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }
    /// Bump ConfigGeneration and raise a config-change interrupt (to be
    /// called by the owner after it changed the device configuration).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal_config_change();
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let i = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(i)
    }

    fn reset(&mut self) {
        self.device.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.clear();
        self.activated = false;
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let features_page = |f: u64, sel: u32| match sel {
            0 => f as u32,
            1 => (f >> 32) as u32,
            _ => 0,
        };
        let selected = usize::try_from(self.queue_sel).ok().and_then(|i| self.queues.get(i));
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => features_page(self.device.device_features(), self.device_features_sel),
            reg::QUEUE_NUM_MAX => selected.map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => selected.map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            // Write-only registers, QueueReset (VIRTIO_F_RING_RESET not offered), unknown.
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            // Only between DRIVER and FEATURES_OK (3.1.1 steps 3-5).
            reg::DRIVER_FEATURES if self.status & (status::DRIVER | status::FEATURES_OK) == status::DRIVER => {
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
                    1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32),
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected_queue().filter(|q| !q.ready) {
                    q.size = u16::try_from(value).unwrap_or(0);
                }
            }
            reg::QUEUE_READY => {
                let activated = self.activated;
                if let Some(q) = self.selected_queue() {
                    // Un-readying a live queue needs VIRTIO_F_RING_RESET, which we do not offer.
                    if value == 1 || !activated {
                        q.ready = value == 1;
                    }
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.selected_queue().filter(|q| !q.ready) {
                    let field = match offset {
                        reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => &mut q.desc_table,
                        reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => &mut q.avail_ring,
                        _ => &mut q.used_ring,
                    };
                    let high = offset % 8 == 4;
                    let old = field.0;
                    field.0 = if high {
                        (old & 0xffff_ffff) | (u64::from(value) << 32)
                    } else {
                        (old & !0xffff_ffff) | u64::from(value)
                    };
                }
            }
            reg::QUEUE_NOTIFY if self.activated => {
                if let Some(i) = u16::try_from(value).ok().filter(|&i| usize::from(i) < self.queues.len()) {
                    self.device.queue_notify(i);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            // SHMSel has no effect without regions; read-only and unknown registers ignored.
            _ => {}
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let valid = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK | status::FAILED;
        // DEVICE_NEEDS_RESET belongs to the device; the driver echoing it back is fine.
        let mut v = value & !status::DEVICE_NEEDS_RESET;
        let current = self.status & !status::DEVICE_NEEDS_RESET;
        if v & !valid != 0 || v & current != current {
            return; // unknown bits, or clearing bits without a reset
        }
        let prereq_ok = (v & status::DRIVER == 0 || v & status::ACKNOWLEDGE != 0)
            && (v & status::FEATURES_OK == 0 || v & status::DRIVER != 0)
            && (v & status::DRIVER_OK == 0 || current & status::FEATURES_OK != 0);
        if !prereq_ok {
            return;
        }
        let added = v & !current;
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.device_features();
            let ok = self.acked_features & !offered == 0 && self.acked_features & features::VIRTIO_F_VERSION_1 != 0;
            if !ok {
                v &= !status::FEATURES_OK; // driver re-reads and sees it refused (3.1.1 step 6)
            }
        }
        self.status = v | (self.status & status::DEVICE_NEEDS_RESET);
        if added & status::DRIVER_OK != 0 && !self.activated {
            if let Err(e) = self.activate() {
                self.last_error = Some(e.to_string());
                self.status |= status::DEVICE_NEEDS_RESET;
                self.interrupt.signal_config_change();
            }
        }
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        let indirect = self.acked_features & features::VIRTIO_F_INDIRECT_DESC != 0;
        let mut queues = self.queues.clone();
        for (index, q) in queues.iter_mut().enumerate() {
            q.indirect = indirect;
            if q.ready {
                q.validate(&self.mem).map_err(|error| ActivateError::BadQueue { index, error })?;
            }
        }
        self.device.activate(ActivateContext {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        })?;
        self.activated = true;
        self.last_error = None;
        Ok(())
    }

    /// Capture the transport state and the device's.
    pub fn save(&self) -> MmioTransportSnapshot {
        MmioTransportSnapshot {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            activated: self.activated,
            queues: self
                .queues
                .iter()
                .enumerate()
                .map(|(i, q)| {
                    // After activation the device holds the live ring positions.
                    let live = self.device.active_queues().get(i).filter(|_| self.activated);
                    QueueSnapshot::from_queue(live.unwrap_or(q))
                })
                .collect(),
            device: self.device.snapshot(),
        }
    }

    /// Rebuild a transport for `device` from `snap`. Queue settings are
    /// restored for queues the device has; when the snapshot was activated
    /// the device is activated again (a failure sets DEVICE_NEEDS_RESET).
    /// The device-specific part of `snap` is restored by the device's own
    /// constructor before this call.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        snap: &MmioTransportSnapshot,
    ) -> Self {
        let mut t = MmioTransport::new(device, mem, interrupt);
        t.status = snap.status;
        t.device_features_sel = snap.device_features_sel;
        t.driver_features_sel = snap.driver_features_sel;
        t.acked_features = snap.acked_features;
        t.queue_sel = snap.queue_sel;
        t.config_generation = snap.config_generation;
        for (q, s) in t.queues.iter_mut().zip(&snap.queues) {
            s.apply(q);
        }
        if snap.interrupt_status != 0 {
            // re-raise what was pending
            if snap.interrupt_status & super::INT_USED_RING != 0 {
                t.interrupt.signal_used_queue();
            }
            if snap.interrupt_status & super::INT_CONFIG != 0 {
                t.interrupt.signal_config_change();
            }
        }
        if snap.activated {
            if let Err(e) = t.activate() {
                t.last_error = Some(e.to_string());
                t.status |= status::DEVICE_NEEDS_RESET;
            }
        }
        t
    }
}

impl Device for MmioTransport {
    fn name(&self) -> &str {
        "virtio-mmio"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            data.fill(0);
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> IoAction {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return IoAction::None;
        }
        if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset % 4 == 0) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
        IoAction::None
    }

    fn snapshot(&self) -> DeviceState {
        DeviceState::VirtioMmio(self.save())
    }
}

/// Guest physical address of MMIO window `index` (see
/// [`crate::memory::VIRTIO_MMIO_BASE`]).
pub fn window_address(index: u32) -> GuestAddress {
    GuestAddress(crate::memory::VIRTIO_MMIO_BASE + u64::from(index) * crate::memory::VIRTIO_MMIO_SIZE)
}
