//! The DSDT (ACPI 6.5 5.2.11.1) in AML (ACPI 6.5 chapter 20), built with
//! `acpi_tables::aml`:
//!
//! ```text
//! Scope (\_SB_) {
//!     Device (COM1) {                      // when serial is present
//!         Name (_HID, EisaId ("PNP0501"))  // 16550A-compatible COM port
//!         Name (_UID, Zero)
//!         Name (_CRS, ResourceTemplate () {
//!             IO (Decode16, 0x03F8, 0x03F8, 0x00, 0x08)
//!             Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { 4 }
//!         })
//!     }
//!     Device (V000) {                      // one per virtio-mmio slot
//!         Name (_HID, "LNRO0005")          // virtio-mmio (Linux drivers/virtio/virtio_mmio.c)
//!         Name (_UID, 0)
//!         Name (_CCA, One)                 // cache-coherent DMA (6.2.17)
//!         Name (_CRS, ResourceTemplate () {
//!             Memory32Fixed (ReadWrite, base, size)                      // 6.4.3.4
//!             Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }  // 6.4.3.6
//!         })
//!     }
//! }
//! Name (_S5_, Package () { 5, 0, 0, 0 })  // 7.4.2: SLP_TYPa = 5 for soft-off
//! ```
//!
//! Linux's `virtio_mmio` driver binds `LNRO0005` through its ACPI match
//! table, so a stock distribution kernel finds the devices with no
//! `virtio_mmio.device=` command-line entries (Firecracker does the same).

use acpi_tables::aml::{Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, Scope, IO};
use acpi_tables::sdt::Sdt;

use super::{AcpiConfig, VirtioMmioSlot, OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::devices::serial::io::{COM1_BASE, COM1_LEN};

/// `_HID` of a virtio-mmio device.
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";
/// ISA IRQ of COM1.
pub const COM1_IRQ: u32 = 4;
/// DSDT revision (2: 64-bit integers).
pub const DSDT_REVISION: u8 = 2;

/// ACPI name of virtio slot `index`: `V` + three hex digits (`V000`, `V01F`).
pub fn virtio_device_name(index: usize) -> String {
    format!("V{:03X}", index & 0xfff)
}

/// AML of one virtio-mmio device (see the module docs) for slot `index`.
pub fn virtio_device_aml(index: usize, slot: &VirtioMmioSlot) -> Vec<u8> {
    // `validate` keeps base/size below 4 GiB; clamp anyway so no cast truncates silently.
    let base = u32::try_from(slot.base).unwrap_or(u32::MAX);
    let size = u32::try_from(slot.size).unwrap_or(0);
    let uid = index as u64;
    let cca = 1u8;
    let mem = Memory32Fixed::new(true, base, size);
    let irq = Interrupt::new(true, true, false, false, slot.gsi);
    let crs = ResourceTemplate::new(vec![&mem, &irq]);
    let hid: String = VIRTIO_MMIO_HID.to_string();
    super::to_bytes(&Device::new(
        Path::new(&virtio_device_name(index)),
        vec![
            &Name::new("_HID".into(), &hid),
            &Name::new("_UID".into(), &uid),
            &Name::new("_CCA".into(), &cca),
            &Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// AML of the COM1 device (PNP0501, ports 0x3F8-0x3FF, IRQ 4).
pub fn com1_aml() -> Vec<u8> {
    let base = COM1_BASE as u16;
    let io = IO::new(base, base, 1, COM1_LEN as u8);
    let irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let crs = ResourceTemplate::new(vec![&io, &irq]);
    let zero = 0u8;
    super::to_bytes(&Device::new(
        Path::new("COM1"),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &zero),
            &Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// AML of `Name (_S5_, Package () { 5, 0, 0, 0 })`.
pub fn s5_aml() -> Vec<u8> {
    let typ = super::power::S5_SLP_TYP;
    let zero = 0u8;
    super::to_bytes(&Name::new("_S5_".into(), &Package::new(vec![&typ, &zero, &zero, &zero])))
}

/// The whole DSDT (header + AML) for `cfg`, checksummed.
pub fn build_dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut devices: Vec<u8> = Vec::new();
    if cfg.serial {
        devices.extend(com1_aml());
    }
    for (i, slot) in cfg.virtio.iter().enumerate() {
        devices.extend(virtio_device_aml(i, slot));
    }
    let mut body = Scope::raw(Path::new("\\_SB_"), devices);
    body.extend(s5_aml());
    let mut sdt = Sdt::new(*b"DSDT", 36, DSDT_REVISION, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}
