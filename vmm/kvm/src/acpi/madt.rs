//! The MADT (ACPI 6.5 5.2.12): one Processor Local APIC structure per vCPU
//! (5.2.12.2; processor UID = APIC id = vCPU index), the IOAPIC (5.2.12.3;
//! id 0, GSI base 0, at [`super::IOAPIC_ADDR`]) and one Local APIC NMI
//! structure (5.2.12.7) saying LINT1 of every processor is the NMI input,
//! matching the LVT programming in [`crate::boot::x86_64::cpu`].
//!
//! `acpi_tables` 0.2 has no Local APIC NMI structure; it is defined here
//! with the same zerocopy layout the crate uses for its own structures.

use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::{Aml, AmlSink};
use zerocopy::{Immutable, IntoBytes};

use super::{IOAPIC_ADDR, LAPIC_ADDR, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// MADT structure type of a Local APIC NMI entry (Table 5.21).
pub const LOCAL_APIC_NMI_TYPE: u8 = 4;

/// Local APIC NMI structure (ACPI 6.5 5.2.12.7, Table 5.30), 6 bytes.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, Immutable)]
pub struct LocalApicNmi {
    r#type: u8,
    length: u8,
    /// ACPI processor UID; 0xFF = all processors.
    pub processor_uid: u8,
    /// MPS INTI flags (polarity/trigger; 0 = conforming to the bus).
    pub flags: u16,
    /// Local APIC interrupt input LINTn the NMI is connected to.
    pub lint: u8,
}

impl LocalApicNmi {
    /// NMI on `lint` of processor `uid` (0xFF: all).
    pub fn new(uid: u8, lint: u8) -> Self {
        LocalApicNmi { r#type: LOCAL_APIC_NMI_TYPE, length: 6, processor_uid: uid, flags: 0, lint }
    }
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// The MADT for `vcpus` processors.
pub fn build_madt(vcpus: u8) -> MADT {
    let mut madt = MADT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION, LocalInterruptController::Address(LAPIC_ADDR));
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    madt.add_structure(LocalApicNmi::new(0xff, 1));
    madt
}
