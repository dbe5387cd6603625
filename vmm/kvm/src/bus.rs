//! Address buses: a port-I/O bus (16-bit port numbers) and an MMIO bus
//! (guest physical addresses), each a set of non-overlapping `[base, base +
//! len)` ranges that route accesses to a [`Device`] with the offset into its
//! range.
//!
//! Ranges are registered while the VM is built and the buses are then
//! shared read-only between vCPU threads (`Arc<Buses>`); each device sits
//! behind its own mutex.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::devices::{Device, IoAction};

/// Errors from bus registration and dispatch.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range `[base, base + len)` overlaps a registered one.
    #[error("range {base:#x}+{len:#x} overlaps {other_base:#x}+{other_len:#x} ({other})")]
    Overlap {
        /// Requested base.
        base: u64,
        /// Requested length.
        len: u64,
        /// Base of the existing range.
        other_base: u64,
        /// Length of the existing range.
        other_len: u64,
        /// Name of the device already there.
        other: String,
    },
    /// Zero length or `base + len` beyond the address space.
    #[error("invalid range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Requested base.
        base: u64,
        /// Requested length.
        len: u64,
    },
    /// No device covers the whole access `[addr, addr + len)`.
    #[error("no device at {addr:#x} (len {len})")]
    Unmapped {
        /// Accessed address.
        addr: u64,
        /// Access width in bytes.
        len: usize,
    },
    /// A device's lock is poisoned (it panicked earlier); the access is dropped.
    #[error("device {0} is poisoned")]
    Poisoned(String),
}

/// A device shared between the bus and its owner.
pub type SharedDevice = Arc<Mutex<dyn Device>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// One address space of device ranges.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut l = f.debug_list();
        for (base, e) in &self.ranges {
            l.entry(&format_args!("{:#x}+{:#x}", base, e.len));
        }
        l.finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Bus::default()
    }

    /// Register `device` at `[base, base + len)`.
    ///
    /// Errors: [`BusError::InvalidRange`] for `len == 0` or overflow past
    /// `u64::MAX`; [`BusError::Overlap`] when any byte is already taken.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::InvalidRange { base, len });
        }
        let last = base.checked_add(len - 1).ok_or(BusError::InvalidRange { base, len })?;
        // The only candidate for overlap is the range with the greatest base <= last.
        if let Some((&other_base, other)) = self.ranges.range(..=last).next_back() {
            let other_last = other_base + (other.len - 1);
            if other_last >= base {
                let other_name = other.device.lock().map(|d| d.name().to_string()).unwrap_or_default();
                return Err(BusError::Overlap { base, len, other_base, other_len: other.len, other: other_name });
            }
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device and its base covering the whole access `[addr, addr + len)`.
    pub fn resolve(&self, addr: u64, len: usize) -> Option<(u64, &SharedDevice)> {
        let (&base, e) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(len as u64)?;
        (end <= e.len).then_some((base, &e.device))
    }

    /// Number of registered ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// True when nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Route a read of `data.len()` bytes at `addr`.
    ///
    /// Errors: [`BusError::Unmapped`] (then `data` is filled with 0xff,
    /// like an open bus), [`BusError::Poisoned`].
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let Some((base, dev)) = self.resolve(addr, data.len()) else {
            data.fill(0xff);
            return Err(BusError::Unmapped { addr, len: data.len() });
        };
        let mut d = dev.lock().map_err(|_| BusError::Poisoned(format!("{addr:#x}")))?;
        d.read(addr - base, data);
        Ok(())
    }

    /// Route a write of `data` at `addr`; returns what the device asks the
    /// VMM to do (e.g. [`IoAction::Reset`]).
    ///
    /// Errors: [`BusError::Unmapped`], [`BusError::Poisoned`].
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<IoAction, BusError> {
        let (base, dev) = self.resolve(addr, data.len()).ok_or(BusError::Unmapped { addr, len: data.len() })?;
        let mut d = dev.lock().map_err(|_| BusError::Poisoned(format!("{addr:#x}")))?;
        Ok(d.write(addr - base, data))
    }
}

/// The two buses a vCPU dispatches to.
#[derive(Clone, Debug, Default)]
pub struct Buses {
    /// Port I/O (x86 `in`/`out`), addresses are port numbers.
    pub pio: Bus,
    /// Memory-mapped I/O, addresses are guest physical.
    pub mmio: Bus,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::DeviceState;

    struct Dummy(&'static str, Vec<(u64, Vec<u8>)>);
    impl Device for Dummy {
        fn name(&self) -> &str {
            self.0
        }
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> IoAction {
            self.1.push((offset, data.to_vec()));
            IoAction::None
        }
        fn snapshot(&self) -> DeviceState {
            DeviceState::Stateless
        }
    }

    fn dev(name: &'static str) -> SharedDevice {
        Arc::new(Mutex::new(Dummy(name, vec![])))
    }

    #[test]
    fn overlap_rejected_on_every_side() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, dev("a")).unwrap();
        // identical, inside, straddling start, straddling end, covering
        for (base, len) in [(0x100, 0x10), (0x104, 2), (0xf8, 0x9), (0x10f, 1), (0xf0, 0x40)] {
            match bus.insert(base, len, dev("b")) {
                Err(BusError::Overlap { other_base: 0x100, other_len: 0x10, other, .. }) => assert_eq!(other, "a"),
                r => panic!("{base:#x}+{len:#x}: expected overlap, got {r:?}"),
            }
        }
        // adjacent on both sides is fine
        bus.insert(0xf0, 0x10, dev("below")).unwrap();
        bus.insert(0x110, 0x10, dev("above")).unwrap();
        assert_eq!(bus.len(), 3);
    }

    #[test]
    fn invalid_ranges_rejected() {
        let mut bus = Bus::new();
        assert_eq!(bus.insert(0x10, 0, dev("z")), Err(BusError::InvalidRange { base: 0x10, len: 0 }));
        assert!(matches!(bus.insert(u64::MAX, 2, dev("z")), Err(BusError::InvalidRange { .. })));
        // ending exactly at the top of the space is fine
        bus.insert(u64::MAX - 0xf, 0x10, dev("top")).unwrap();
        assert!(bus.resolve(u64::MAX, 1).is_some());
        assert!(bus.resolve(u64::MAX, 2).is_none());
    }

    #[test]
    fn dispatch_passes_offsets_and_rejects_partial_accesses() {
        let mut bus = Bus::new();
        let d = Arc::new(Mutex::new(Dummy("d", vec![])));
        bus.insert(0x1000, 0x100, d.clone()).unwrap();
        let mut buf = [0u8; 4];
        bus.read(0x1010, &mut buf).unwrap();
        assert_eq!(buf, [0x10; 4]);
        bus.write(0x10fc, &[1, 2, 3, 4]).unwrap();
        assert_eq!(d.lock().unwrap().1, vec![(0xfc, vec![1, 2, 3, 4])]);
        // crosses the end of the range
        assert_eq!(bus.write(0x10fe, &[0; 4]), Err(BusError::Unmapped { addr: 0x10fe, len: 4 }));
        // below any range
        let mut buf = [0u8; 2];
        assert_eq!(bus.read(0x10, &mut buf), Err(BusError::Unmapped { addr: 0x10, len: 2 }));
        assert_eq!(buf, [0xff, 0xff]);
    }
}
