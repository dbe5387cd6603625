//! ACPI tables for a hardware-reduced x86_64 microVM (ACPI 6.5), built
//! with rust-vmm's `acpi_tables` crate and written into the BIOS area of
//! guest memory, where Linux finds them without firmware.
//!
//! | address | table | ACPI 6.5 section |
//! |---|---|---|
//! | [`RSDP_ADDR`] 0xE0000 | RSDP v2 (36 bytes; XSDT pointer, no RSDT) | 5.2.5 |
//! | following, 16-byte aligned | XSDT -> FADT, MADT | 5.2.8 |
//! | | FADT: `HW_REDUCED_ACPI`, reset register, sleep control/status registers, X_DSDT | 5.2.9 |
//! | | MADT: one Processor Local APIC per vCPU, the IOAPIC at 0xFEC00000, Local APIC NMI on LINT1 | 5.2.12 |
//! | | DSDT: `\_SB_.COM1` (PNP0501), one `\_SB_.Vnnn` (LNRO0005 virtio-mmio) per slot, `\_S5_` | 5.2.11.1, 19 |
//!
//! Linux finds the RSDP by scanning 0xE0000-0xFFFFF on a 16-byte boundary
//! (`acpi_find_root_pointer`), and also through `boot_params.acpi_rsdp_addr`
//! (zero-page offset 0x070, `Documentation/arch/x86/zero-page.rst`), which
//! the zero page we write carries. The range 0x9FC00-0xFFFFF is left out
//! of the e820 RAM map, so the kernel does not reuse the tables' memory.
//!
//! Power management (what the FADT points at, see [`power`]): one 8-bit
//! I/O register at [`power::ACPI_PM_PORT`] (0x3C0, the same port
//! cloud-hypervisor uses) serves as
//! * the FADT reset register (ACPI 6.5 4.8.4.6): writing
//!   [`power::RESET_VALUE`] resets the machine (`reboot` in the guest);
//! * the sleep control register (4.8.4.3.1, hardware-reduced sleep): writing
//!   `SLP_EN | SLP_TYP=5` (S5, as the DSDT's `\_S5_` package says) powers
//!   the machine off (`poweroff`);
//! * the sleep status register (4.8.4.3.2): reads 0.
//!
//! No interrupt source overrides are written: the in-kernel IOAPIC routes
//! GSI n to pin n (KVM's default routing for GSIs 0-23), which is what
//! Linux assumes for ISA IRQs without an override (`mp_config_acpi_legacy_irqs`),
//! and a hardware-reduced platform has no SCI to override. The serial port
//! uses ISA IRQ 4 (edge, active high, the ISA default); virtio-mmio slots
//! use the GSIs their `_CRS` names (edge, active high, exclusive).

pub mod aml;
pub mod madt;
pub mod power;
#[cfg(test)]
mod tests;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest physical address of the RSDP (start of the BIOS read-only area,
/// scanned by Linux; ACPI 6.5 5.2.5.1).
pub const RSDP_ADDR: u64 = 0x000e_0000;
/// End (exclusive) of the area the tables may use (1 MiB).
pub const ACPI_AREA_END: u64 = 0x0010_0000;
/// OEM id in every table header.
pub const OEM_ID: [u8; 6] = *b"CAPVSR";
/// OEM table id in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"CAPVKVM ";
/// OEM revision in every table header.
pub const OEM_REVISION: u32 = 1;

/// Local APIC base address (Intel SDM Vol. 3A 11.4.1, the architectural default).
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// IOAPIC base address (the PC default; KVM's in-kernel IOAPIC sits here).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Number of IOAPIC pins (KVM's in-kernel IOAPIC: 24), so GSIs 0..=23.
pub const IOAPIC_PINS: u32 = 24;

/// FADT IA-PC boot architecture flags (ACPI 6.5 5.2.9.3, Table 5.11).
pub mod iapc_boot_arch {
    /// VGA Not Present.
    pub const VGA_NOT_PRESENT: u16 = 1 << 2;
    /// MSI Not Supported.
    pub const MSI_NOT_SUPPORTED: u16 = 1 << 3;
    /// CMOS RTC Not Present.
    pub const CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
}

/// One virtio-mmio slot as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    /// Guest physical base of the register window (must be below 4 GiB:
    /// `Memory32Fixed`).
    pub base: u64,
    /// Window size in bytes.
    pub size: u64,
    /// Interrupt (GSI = IOAPIC pin).
    pub gsi: u32,
}

/// What the tables describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs (APIC ids 0..n), 1..=255.
    pub vcpus: u8,
    /// COM1 at 0x3F8 with IRQ 4 present.
    pub serial: bool,
    /// virtio-mmio devices, in slot order (`V000`, `V001`, ...).
    pub virtio: Vec<VirtioMmioSlot>,
}

/// Where each table landed (guest physical addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiLayout {
    /// RSDP.
    pub rsdp: u64,
    /// XSDT.
    pub xsdt: u64,
    /// FADT (signature "FACP").
    pub fadt: u64,
    /// MADT (signature "APIC").
    pub madt: u64,
    /// DSDT.
    pub dsdt: u64,
    /// First byte after the last table.
    pub end: u64,
}

/// Errors building or writing the tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    /// The configuration cannot be described (no vCPUs, window above 4 GiB,
    /// GSI beyond the IOAPIC, too many slots).
    #[error("ACPI configuration: {0}")]
    Config(String),
    /// The tables do not fit below 1 MiB, or that memory is not RAM.
    #[error("writing ACPI table {what} at {addr:#x} failed")]
    GuestWrite {
        /// Table name.
        what: &'static str,
        /// Guest physical address.
        addr: u64,
    },
}

fn align16(x: u64) -> u64 {
    (x + 15) & !15
}

/// Serialize anything implementing [`Aml`] (tables included) to bytes.
pub fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The FADT (ACPI 6.5 5.2.9, revision 6.5): hardware-reduced, pointing at
/// the DSDT at `dsdt_addr` through X_DSDT, with the reset register and the
/// sleep control/status registers at [`power::ACPI_PM_PORT`].
pub fn build_fadt(dsdt_addr: u64) -> Vec<u8> {
    let pm = GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, u64::from(power::ACPI_PM_PORT));
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    b.iapc_boot_arch =
        (iapc_boot_arch::VGA_NOT_PRESENT | iapc_boot_arch::MSI_NOT_SUPPORTED | iapc_boot_arch::CMOS_RTC_NOT_PRESENT)
            .into();
    b.reset_reg = pm;
    b.reset_value = power::RESET_VALUE;
    b.sleep_control_reg = pm;
    b.sleep_status_reg = pm;
    to_bytes(&b.finalize())
}

/// Check `cfg` against what the tables and the IOAPIC can express.
///
/// Errors: [`AcpiError::Config`].
pub fn validate(cfg: &AcpiConfig) -> Result<(), AcpiError> {
    if cfg.vcpus == 0 || cfg.vcpus == u8::MAX {
        return Err(AcpiError::Config(format!("{} vCPUs (1..=254)", cfg.vcpus)));
    }
    if cfg.virtio.len() > 0x1000 {
        return Err(AcpiError::Config(format!("{} virtio slots", cfg.virtio.len())));
    }
    for (i, s) in cfg.virtio.iter().enumerate() {
        let end = s.base.checked_add(s.size);
        if u32::try_from(s.base).is_err() || u32::try_from(s.size).is_err() || end.is_none_or(|e| e > 1 << 32) {
            return Err(AcpiError::Config(format!(
                "virtio slot {i}: window {:#x}+{:#x} not below 4 GiB",
                s.base, s.size
            )));
        }
        if s.gsi >= IOAPIC_PINS {
            return Err(AcpiError::Config(format!(
                "virtio slot {i}: GSI {} beyond the IOAPIC's {IOAPIC_PINS} pins",
                s.gsi
            )));
        }
    }
    Ok(())
}

/// Build every table for `cfg` and write them at [`RSDP_ADDR`].. in `mem`.
/// Returns where each one went.
///
/// Errors: [`AcpiError::Config`] (see [`validate`]); [`AcpiError::GuestWrite`]
/// when the tables would cross [`ACPI_AREA_END`] or the area is not RAM.
pub fn write_acpi_tables(mem: &GuestMemoryMmap, cfg: &AcpiConfig) -> Result<AcpiLayout, AcpiError> {
    validate(cfg)?;
    let xsdt_addr = align16(RSDP_ADDR + Rsdp::len() as u64);
    // XSDT with two entries: header (36) + 2 * 8.
    let fadt_addr = align16(xsdt_addr + 36 + 16);
    let fadt_len = acpi_tables::fadt::FADT::len() as u64;
    let madt_addr = align16(fadt_addr + fadt_len);
    let madt = to_bytes(&madt::build_madt(cfg.vcpus));
    let dsdt_addr = align16(madt_addr + madt.len() as u64);
    let dsdt = aml::build_dsdt(cfg);
    let end = dsdt_addr + dsdt.len() as u64;

    let fadt = build_fadt(dsdt_addr);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = to_bytes(&xsdt);
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    for (what, addr, bytes) in [
        ("RSDP", RSDP_ADDR, &rsdp),
        ("XSDT", xsdt_addr, &xsdt),
        ("FADT", fadt_addr, &fadt),
        ("MADT", madt_addr, &madt),
        ("DSDT", dsdt_addr, &dsdt),
    ] {
        let fits = addr.checked_add(bytes.len() as u64).is_some_and(|e| e <= ACPI_AREA_END);
        if !fits || mem.write_slice(bytes, GuestAddress(addr)).is_err() {
            return Err(AcpiError::GuestWrite { what, addr });
        }
    }
    Ok(AcpiLayout { rsdp: RSDP_ADDR, xsdt: xsdt_addr, fadt: fadt_addr, madt: madt_addr, dsdt: dsdt_addr, end })
}
