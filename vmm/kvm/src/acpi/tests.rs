use vm_memory::{Bytes, GuestAddress};

use super::aml::*;
use super::power::*;
use super::*;
use crate::devices::IoAction;
use crate::testutil::mem;

fn read(m: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    m.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
}

/// Read the SDT at `addr` from guest memory, check signature and checksum,
/// and return all of its bytes.
fn sdt(m: &GuestMemoryMmap, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
    let hdr = read(m, addr, 36);
    assert_eq!(&hdr[0..4], sig, "signature at {addr:#x}");
    let len = u32_at(&hdr, 4) as usize;
    assert!(len >= 36);
    let all = read(m, addr, len);
    assert_eq!(sum(&all), 0, "{} checksum", String::from_utf8_lossy(sig));
    assert_eq!(&all[10..16], &OEM_ID);
    all
}

fn slots(n: usize) -> Vec<VirtioMmioSlot> {
    (0..n).map(|i| VirtioMmioSlot { base: 0xd000_0000 + 0x1000 * i as u64, size: 0x1000, gsi: 5 + i as u32 }).collect()
}

fn find(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    hay.windows(needle.len()).enumerate().filter(|(_, w)| *w == needle).map(|(i, _)| i).collect()
}

#[test]
fn tables_parse_back_from_guest_memory() {
    let m = mem(2 << 20);
    let cfg = AcpiConfig { vcpus: 2, serial: true, virtio: slots(3) };
    let l = write_acpi_tables(&m, &cfg).unwrap();
    assert_eq!(l.rsdp, 0xe0000);
    assert!(l.end <= ACPI_AREA_END);

    // RSDP (ACPI 6.5 5.2.5.3): first 20 bytes and all 36 bytes sum to 0
    let rsdp = read(&m, RSDP_ADDR, 36);
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    assert_eq!(rsdp[15], 2, "revision 2");
    assert_eq!(sum(&rsdp[..20]), 0);
    assert_eq!(sum(&rsdp), 0);
    assert_eq!(u32_at(&rsdp, 20), 36, "length");
    let xsdt_addr = u64_at(&rsdp, 24);
    assert_eq!(xsdt_addr, l.xsdt);
    assert_eq!(RSDP_ADDR % 16, 0, "Linux scans on 16-byte boundaries");

    // XSDT -> FACP, APIC
    let xsdt = sdt(&m, xsdt_addr, b"XSDT");
    assert_eq!(xsdt.len(), 36 + 16);
    let entries: Vec<u64> = (0..2).map(|i| u64_at(&xsdt, 36 + 8 * i)).collect();
    let sigs: Vec<Vec<u8>> = entries.iter().map(|&a| read(&m, a, 4)).collect();
    assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);

    // FADT (5.2.9, Table 5.9 offsets)
    let fadt = sdt(&m, entries[0], b"FACP");
    assert_eq!(fadt.len(), 276, "ACPI 6.5 FADT length");
    assert_eq!((fadt[8], fadt[131]), (6, 5), "FADT 6.5");
    let flags = u32_at(&fadt, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    // reset register: GAS at 116 (SystemIO, 8 bits, port), value at 128
    assert_eq!(&fadt[116..120], &[1, 8, 0, 1]);
    assert_eq!(u64_at(&fadt, 120), u64::from(ACPI_PM_PORT));
    assert_eq!(fadt[128], RESET_VALUE);
    // sleep control (244) and status (256) registers
    for off in [244, 256] {
        assert_eq!(fadt[off], 1, "SystemIO");
        assert_eq!(u64_at(&fadt, off + 4), u64::from(ACPI_PM_PORT));
    }
    let iapc = u16::from_le_bytes([fadt[109], fadt[110]]);
    assert_ne!(iapc & iapc_boot_arch::CMOS_RTC_NOT_PRESENT, 0);
    // X_DSDT at 140 (DSDT 32-bit field at 40 is 0)
    assert_eq!(u32_at(&fadt, 40), 0);
    let dsdt_addr = u64_at(&fadt, 140);
    assert_eq!(dsdt_addr, l.dsdt);

    // MADT (5.2.12): LAPIC address, 2 local APICs, IOAPIC, LAPIC NMI
    let madt = sdt(&m, entries[1], b"APIC");
    assert_eq!(u32_at(&madt, 36), LAPIC_ADDR);
    let mut off = 44;
    let mut found = vec![];
    while off + 2 <= madt.len() {
        let (t, len) = (madt[off], madt[off + 1] as usize);
        assert!(len >= 2);
        found.push((t, madt[off..off + len].to_vec()));
        off += len;
    }
    assert_eq!(off, madt.len());
    let types: Vec<u8> = found.iter().map(|f| f.0).collect();
    assert_eq!(types, vec![0, 0, 1, 4]);
    assert_eq!(found[1].1, vec![0, 8, 1, 1, 1, 0, 0, 0], "CPU uid 1 apic 1 enabled");
    assert_eq!(u32_at(&found[2].1, 4), IOAPIC_ADDR);
    assert_eq!(found[3].1, vec![4, 6, 0xff, 0, 0, 1], "NMI on LINT1, all CPUs");

    // DSDT: one LNRO0005 per slot, each with its MMIO base; COM1; _S5_
    let dsdt = sdt(&m, dsdt_addr, b"DSDT");
    assert_eq!(find(&dsdt, b"LNRO0005").len(), 3);
    for (i, s) in cfg.virtio.iter().enumerate() {
        let name = virtio_device_name(i);
        assert_eq!(find(&dsdt, name.as_bytes()).len(), 1, "{name}");
        // Memory32Fixed descriptor: 86 09 00 01 <base> <size>
        let mut desc = vec![0x86, 0x09, 0x00, 0x01];
        desc.extend_from_slice(&(s.base as u32).to_le_bytes());
        desc.extend_from_slice(&(s.size as u32).to_le_bytes());
        assert_eq!(find(&dsdt, &desc).len(), 1, "window of {name}");
        // Extended interrupt descriptor with its GSI
        let mut irq = vec![0x89, 0x06, 0x00, 0x03, 0x01];
        irq.extend_from_slice(&s.gsi.to_le_bytes());
        assert_eq!(find(&dsdt, &irq).len(), 1, "interrupt of {name}");
    }
    assert_eq!(find(&dsdt, b"COM1").len(), 1);
    assert_eq!(find(&dsdt, b"_S5_").len(), 1);
    assert_eq!(&dsdt[36..37], &[0x10], "body starts with Scope (\\_SB_)");
}

#[test]
fn virtio_device_aml_matches_a_hand_assembled_encoding() {
    // Device (V000) { Name (_HID, "LNRO0005") Name (_UID, Zero) Name (_CCA, One)
    //   Name (_CRS, ResourceTemplate () { Memory32Fixed (ReadWrite, 0xD0000000, 0x1000)
    //     Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { 5 } }) }
    // encoded by hand from ACPI 6.5 20.2 (DefDevice, PkgLength, DefName, DefBuffer)
    // and 6.4.3.4 / 6.4.3.6 (resource descriptors), as iasl emits it.
    let mut want: Vec<u8> = vec![0x5b, 0x82, 0x41, 0x04]; // DeviceOp, PkgLength 65 (2-byte form)
    want.extend_from_slice(b"V000");
    want.extend_from_slice(b"\x08_HID\x0dLNRO0005\x00"); // NameOp, String
    want.extend_from_slice(b"\x08_UID\x00"); // ZeroOp
    want.extend_from_slice(b"\x08_CCA\x01"); // OneOp
    want.extend_from_slice(b"\x08_CRS\x11\x1a\x0a\x17"); // BufferOp, PkgLength 26, BufferSize ByteConst 23
    want.extend_from_slice(&[0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x10, 0x00, 0x00]);
    want.extend_from_slice(&[0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0x00, 0x00, 0x00]);
    want.extend_from_slice(&[0x79, 0x00]); // EndTag
    let got = virtio_device_aml(0, &VirtioMmioSlot { base: 0xd000_0000, size: 0x1000, gsi: 5 });
    assert_eq!(got, want);
    assert_eq!(got.len(), 2 + 65);
}

#[test]
fn s5_package_encoding() {
    // Name (_S5_, Package () { 5, Zero, Zero, Zero }): PackageOp, PkgLength 7, NumElements 4
    assert_eq!(s5_aml(), b"\x08_S5_\x12\x07\x04\x0a\x05\x00\x00\x00".to_vec());
}

#[test]
fn bad_configs_are_rejected() {
    let m = mem(2 << 20);
    let bad = |c: AcpiConfig| assert!(matches!(write_acpi_tables(&m, &c), Err(AcpiError::Config(_))), "{c:?}");
    bad(AcpiConfig { vcpus: 0, serial: false, virtio: vec![] });
    bad(AcpiConfig { vcpus: 1, serial: false, virtio: vec![VirtioMmioSlot { base: 1 << 32, size: 0x1000, gsi: 5 }] });
    bad(AcpiConfig {
        vcpus: 1,
        serial: false,
        virtio: vec![VirtioMmioSlot { base: 0xffff_f800, size: 0x1000, gsi: 5 }],
    });
    bad(AcpiConfig {
        vcpus: 1,
        serial: false,
        virtio: vec![VirtioMmioSlot { base: 0xd000_0000, size: 0x1000, gsi: 24 }],
    });
    // memory without the BIOS area
    let small = mem(0x8_0000);
    assert!(matches!(
        write_acpi_tables(&small, &AcpiConfig { vcpus: 1, serial: true, virtio: vec![] }),
        Err(AcpiError::GuestWrite { what: "RSDP", .. })
    ));
    // the largest configuration still fits below 1 MiB
    let big = AcpiConfig { vcpus: 254, serial: true, virtio: slots(19) };
    let l = write_acpi_tables(&m, &big).unwrap();
    assert!(l.end < ACPI_AREA_END);
}

#[test]
fn pm_register_decodes_reset_and_s5() {
    let mut d = AcpiPmDevice::default();
    assert_eq!(d.write_value(RESET_VALUE), IoAction::Reset);
    assert_eq!(d.write_value(SLP_EN | (S5_SLP_TYP << 2)), IoAction::PowerOff);
    assert_eq!(d.write_value(S5_SLP_TYP << 2), IoAction::None, "no SLP_EN");
    assert_eq!(d.write_value(SLP_EN | (3 << 2)), IoAction::None, "S3 is not supported");
    assert_eq!(crate::devices::Device::write(&mut d, 1, &[RESET_VALUE]), IoAction::None);
    assert_eq!(crate::devices::Device::write(&mut d, 0, &[]), IoAction::None);
    assert_eq!((d.resets, d.power_offs), (1, 1));
}
