//! Tests of the x86_64 boot layout: descriptors, page tables, e820, zero
//! page, command line, kernel and initramfs loading.

use std::io::Cursor;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::kernel::{load_initrd, load_kernel, place_initrd, KernelFormat, LoadedKernel};
use super::layout::*;
use super::paging::*;
use super::regs::*;
use super::zeropage::*;
use super::*;
use crate::memory::{create_guest_memory, ram_ranges, ram_ranges_of, MMIO_GAP_END, MMIO_GAP_START};
use crate::testutil::mem;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[test]
fn gdt_descriptors_decode_to_flat_long_mode_segments() {
    let cs = X86Segment::from_gdt_entry(BOOT_CS, GDT[2]);
    assert_eq!(
        (cs.base, cs.limit, cs.type_, cs.l, cs.db, cs.s, cs.present, cs.g),
        (0, 0xffff_ffff, 0xb, 1, 0, 1, 1, 1)
    );
    let ds = X86Segment::from_gdt_entry(BOOT_DS, GDT[3]);
    assert_eq!((ds.limit, ds.type_, ds.l, ds.db, ds.s, ds.unusable), (0xffff_ffff, 0x3, 0, 1, 1, 0));
    let tr = X86Segment::from_gdt_entry(BOOT_TSS, GDT[4]);
    assert_eq!((tr.type_, tr.s, tr.present), (0xb, 0, 1));
    // SDM Figure 3-8 encoding of a known descriptor
    assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    assert_eq!(gdt_entry(0xc093, 0x1234_5678, 0x12345), 0x12c1_9334_5678_2345);
}

#[test]
fn long_mode_state_follows_the_64_bit_boot_protocol() {
    let st = X86BootState::long_mode(0x100_0000, BOOT_STACK, ZERO_PAGE_ADDR);
    assert_eq!(st.cs.selector, 0x10, "__BOOT_CS");
    assert_eq!(st.ds.selector, 0x18, "__BOOT_DS");
    assert_eq!(st.rflags & (1 << 9), 0, "interrupts disabled");
    assert_eq!(st.rsi, ZERO_PAGE_ADDR);
    assert_eq!(st.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
    assert_ne!(st.cr4 & CR4_PAE, 0);
    assert_eq!(st.efer, EFER_LME | EFER_LMA);
    assert_eq!(st.cr3, PML4_ADDR);
    assert_eq!(st.gdt.limit as usize, GDT.len() * 8 - 1);
}

fn translate(m: &GuestMemoryMmap, va: u64) -> Option<u64> {
    let rd = |a: u64| -> u64 { m.read_obj::<u64>(GuestAddress(a)).unwrap() };
    let pml4e = rd(PML4_ADDR + ((va >> 39) & 0x1ff) * 8);
    if pml4e & PTE_PRESENT == 0 {
        return None;
    }
    let pdpte = rd((pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8);
    if pdpte & PTE_PRESENT == 0 {
        return None;
    }
    let pde = rd((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8);
    if pde & PTE_PRESENT == 0 || pde & PDE_PAGE_SIZE == 0 {
        return None;
    }
    Some((pde & !0x1f_ffff) + (va & 0x1f_ffff))
}

#[test]
fn page_tables_identity_map_the_first_4_gib_including_the_mmio_gap() {
    let m = mem(MIB as usize);
    write_identity_page_tables(&m).unwrap();
    for va in [0, 0x7000, 0x10_0000, 0x20_1234, GIB - 1, GIB, 0xd000_0000, 0xd000_0050, 4 * GIB - 1] {
        assert_eq!(translate(&m, va), Some(va), "{va:#x}");
    }
    assert_eq!(translate(&m, 4 * GIB), None, "nothing above 4 GiB");
    assert_eq!(IDENTITY_MAPPED, 4 * GIB);
}

#[test]
fn boot_structures_need_the_low_memory() {
    // memory that starts at 1 MiB has no room for GDT/page tables
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(MIB), MIB as usize)]).unwrap();
    assert!(matches!(setup_long_mode(&m, GuestAddress(MIB)), Err(BootError::GuestWrite { what: "GDT", .. })));
}

#[test]
fn ram_is_split_around_the_mmio_gap() {
    assert_eq!(ram_ranges(512 * MIB), vec![(GuestAddress(0), 512 * MIB)]);
    assert_eq!(ram_ranges(3 * GIB), vec![(GuestAddress(0), 3 * GIB)]);
    assert_eq!(ram_ranges(5 * GIB), vec![(GuestAddress(0), MMIO_GAP_START), (GuestAddress(MMIO_GAP_END), 2 * GIB)]);
    assert!(create_guest_memory(0).is_err());
    assert!(create_guest_memory(4097).is_err());
}

#[test]
fn e820_below_the_gap() {
    let m = create_guest_memory(512 * MIB).unwrap();
    let e = e820_map(&ram_ranges_of(&m));
    assert_eq!(
        e,
        vec![
            E820Entry { addr: 0, size: EBDA_START, type_: E820_RAM },
            E820Entry { addr: HIMEM_START, size: 512 * MIB - HIMEM_START, type_: E820_RAM },
        ]
    );
}

#[test]
fn e820_above_the_gap() {
    // 4 GiB of RAM: 3 GiB below the gap, 1 GiB from 4 GiB (ranges only; no mapping needed)
    let ranges: Vec<(u64, u64)> = ram_ranges(4 * GIB).into_iter().map(|(a, l)| (a.0, l)).collect();
    let e = e820_map(&ranges);
    assert_eq!(
        e,
        vec![
            E820Entry { addr: 0, size: EBDA_START, type_: E820_RAM },
            E820Entry { addr: HIMEM_START, size: MMIO_GAP_START - HIMEM_START, type_: E820_RAM },
            E820Entry { addr: 4 * GIB, size: GIB, type_: E820_RAM },
        ]
    );
    // no RAM entry touches the gap
    assert!(e.iter().all(|x| x.addr + x.size <= MMIO_GAP_START || x.addr >= MMIO_GAP_END));
    // tiny memory below the EBDA gets only the low entry
    assert_eq!(e820_map(&[(0, 0x8000)]), vec![E820Entry { addr: 0, size: 0x8000, type_: E820_RAM }]);
}

#[test]
fn cmdline_is_written_nul_terminated_and_bounded() {
    let m = mem(MIB as usize);
    let mut c = Cmdline::new(CMDLINE_MAX).unwrap();
    c.insert_str("console=ttyS0 reboot=k panic=1").unwrap();
    let n = write_cmdline(&m, &c).unwrap();
    assert_eq!(n, 30);
    let mut buf = [0u8; 31];
    m.read_slice(&mut buf, GuestAddress(CMDLINE_ADDR)).unwrap();
    assert_eq!(&buf[..30], b"console=ttyS0 reboot=k panic=1");
    assert_eq!(buf[30], 0);

    let mut long = Cmdline::new(8192).unwrap();
    long.insert_str("x".repeat(CMDLINE_MAX)).unwrap();
    assert!(matches!(write_cmdline(&m, &long), Err(BootError::Cmdline(_))));
    let mut fits = Cmdline::new(8192).unwrap();
    fits.insert_str("y".repeat(CMDLINE_MAX - 1)).unwrap();
    assert_eq!(write_cmdline(&m, &fits).unwrap() as usize, CMDLINE_MAX - 1);
}

#[test]
fn boot_params_carry_header_cmdline_initrd_and_e820() {
    let e820 = e820_map(&[(0, 256 * MIB)]);
    let rd = InitrdPlacement { addr: GuestAddress(0x0f00_0000), size: 0x1234 };
    let p = build_boot_params(None, 42, Some(rd), &e820).unwrap();
    let h = p.hdr;
    assert_eq!({ h.boot_flag }, BOOT_FLAG_MAGIC);
    assert_eq!({ h.header }, HDR_MAGIC);
    assert_eq!({ h.type_of_loader }, LOADER_TYPE_UNDEFINED);
    assert_eq!({ h.cmd_line_ptr }, CMDLINE_ADDR as u32);
    assert_eq!({ h.cmdline_size }, 42);
    assert_eq!({ h.ramdisk_image }, 0x0f00_0000);
    assert_eq!({ h.ramdisk_size }, 0x1234);
    assert_eq!(p.e820_entries, 2);
    let e1 = p.e820_table[1];
    assert_eq!(({ e1.addr }, { e1.size }, { e1.r#type }), (HIMEM_START, 256 * MIB - HIMEM_START, E820_RAM));

    // a bzImage header is kept, loader fields overridden
    let hdr = setup_header { version: 0x020f, setup_sects: 27, type_of_loader: 0, ..Default::default() };
    let p = build_boot_params(Some(hdr), 0, None, &e820).unwrap();
    assert_eq!(({ p.hdr.version }, p.hdr.setup_sects, p.hdr.type_of_loader), (0x020f, 27, 0xff));
    assert_eq!({ p.hdr.ramdisk_image }, 0);

    let too_many = vec![E820Entry { addr: 0, size: 1, type_: E820_RAM }; 129];
    assert!(matches!(build_boot_params(None, 0, None, &too_many), Err(BootError::Layout(_))));
    let high = InitrdPlacement { addr: GuestAddress(5 * GIB), size: 1 };
    assert!(matches!(build_boot_params(None, 0, Some(high), &e820), Err(BootError::Layout(_))));
}

/// A minimal x86_64 ELF executable: header + one PT_LOAD of `payload` at `paddr`.
fn tiny_elf(entry: u64, paddr: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; 64 + 56];
    v[0..4].copy_from_slice(b"\x7fELF");
    v[4] = 2; // ELFCLASS64
    v[5] = 1; // little-endian
    v[6] = 1; // EV_CURRENT
    v[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    v[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    v[20..24].copy_from_slice(&1u32.to_le_bytes());
    v[24..32].copy_from_slice(&entry.to_le_bytes());
    v[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    v[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    v[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    v[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = &mut v[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
    ph[16..24].copy_from_slice(&paddr.to_le_bytes()); // p_vaddr
    ph[24..32].copy_from_slice(&paddr.to_le_bytes()); // p_paddr
    ph[32..40].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(payload.len() as u64 + 0x1000).to_le_bytes()); // memsz (bss)
    v.extend_from_slice(payload);
    v
}

/// A minimal bzImage: boot sector + one setup sector with the header
/// ("HdrS", protocol 2.15, LOADED_HIGH, code32_start 1 MiB), then `payload`.
fn tiny_bzimage(payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; 2 * 512];
    v[0x1f1] = 1; // setup_sects
    v[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    v[0x202..0x206].copy_from_slice(&HDR_MAGIC.to_le_bytes());
    v[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    v[0x211] = 1; // loadflags: LOADED_HIGH
    v[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    v[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    v.extend_from_slice(payload);
    v
}

#[test]
fn elf_vmlinux_is_loaded_at_its_physical_address() {
    let m = mem(4 * MIB as usize);
    let img = tiny_elf(0x20_0010, 0x20_0000, b"\x90\x90\xf4KERNEL");
    let k = load_kernel(&m, &mut Cursor::new(img)).unwrap();
    assert_eq!(k.format, KernelFormat::Elf);
    assert_eq!(k.entry, GuestAddress(0x20_0010));
    assert_eq!(k.end, 0x20_0000 + 9 + 0x1000);
    assert!(k.setup_header.is_none());
    let mut b = [0u8; 9];
    m.read_slice(&mut b, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(&b, b"\x90\x90\xf4KERNEL");
}

#[test]
fn bzimage_is_loaded_at_1_mib_with_the_64_bit_entry() {
    let m = mem(4 * MIB as usize);
    let k = load_kernel(&m, &mut Cursor::new(tiny_bzimage(b"PAYLOAD"))).unwrap();
    assert_eq!(k.format, KernelFormat::BzImage);
    assert_eq!(k.entry, GuestAddress(HIMEM_START + 0x200));
    assert_eq!(k.end, HIMEM_START + 7);
    assert_eq!({ k.setup_header.unwrap().version }, 0x020f);
    let mut b = [0u8; 7];
    m.read_slice(&mut b, GuestAddress(HIMEM_START)).unwrap();
    assert_eq!(&b, b"PAYLOAD");
}

#[test]
fn garbage_and_oversized_kernels_are_errors() {
    let m = mem(4 * MIB as usize);
    assert!(matches!(load_kernel(&m, &mut Cursor::new(vec![0u8; 4096])), Err(BootError::KernelLoad { .. })));
    assert!(matches!(load_kernel(&m, &mut Cursor::new(Vec::new())), Err(BootError::KernelLoad { .. })));
    // segment beyond guest memory
    let img = tiny_elf(0x100_0000, 0x100_0000, b"x");
    assert!(matches!(load_kernel(&m, &mut Cursor::new(img)), Err(BootError::KernelLoad { .. })));
}

#[test]
fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
    // no header: limited by RAM only
    let p = place_initrd(64 * MIB, None, 2 * MIB, 0x1801).unwrap();
    assert_eq!(p.addr.0, (64 * MIB - 0x1801) & !0xfff);
    assert!(p.addr.0 + p.size <= 64 * MIB);
    assert_eq!(p.addr.0 % 4096, 0);
    // header's initrd_addr_max wins when lower than RAM
    let h = setup_header { version: 0x020f, initrd_addr_max: 0x00ff_ffff, ..Default::default() };
    let p = place_initrd(64 * MIB, Some(&h), 2 * MIB, 4096).unwrap();
    assert_eq!(p.addr.0, 16 * MIB - 4096);
    // protocol <= 2.02: 0x37ffffff
    let old = setup_header { version: 0x0202, ..Default::default() };
    let p = place_initrd(2 * GIB, Some(&old), 2 * MIB, 4096).unwrap();
    assert_eq!(p.addr.0, 0x3800_0000 - 4096);
    // does not fit above the kernel
    assert!(matches!(place_initrd(8 * MIB, None, 7 * MIB, 2 * MIB), Err(BootError::InitrdTooLarge { .. })));
    assert!(matches!(place_initrd(8 * MIB, None, 0, 9 * MIB), Err(BootError::InitrdTooLarge { .. })));
}

#[test]
fn linux_boot_writes_zero_page_cmdline_and_initrd() {
    let m = create_guest_memory(64 * MIB).unwrap();
    let k = load_kernel(&m, &mut Cursor::new(tiny_bzimage(b"K"))).unwrap();
    let rd = load_initrd(&m, &k, &mut Cursor::new(b"INITRAMFS".to_vec())).unwrap();
    assert_eq!(rd.addr.0, (64 * MIB - 9) & !0xfff);
    let mut c = Cmdline::new(CMDLINE_MAX).unwrap();
    c.insert_str("console=ttyS0").unwrap();
    let st = configure_linux_boot(&m, &k, &c, Some(rd)).unwrap();
    assert_eq!(st.rip, HIMEM_START + 0x200);
    assert_eq!(st.rsi, ZERO_PAGE_ADDR);

    let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
    assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
    assert_eq!({ p.hdr.cmdline_size }, 13);
    assert_eq!({ p.hdr.ramdisk_image } as u64, rd.addr.0);
    assert_eq!({ p.hdr.ramdisk_size }, 9);
    assert_eq!(p.e820_entries, 2);
    let mut b = [0u8; 9];
    m.read_slice(&mut b, rd.addr).unwrap();
    assert_eq!(&b, b"INITRAMFS");
    let gdt2: u64 = m.read_obj(GuestAddress(GDT_ADDR + 16)).unwrap();
    assert_eq!(gdt2, GDT[2]);
    let _unused: Option<LoadedKernel> = None;
}

#[test]
fn zero_page_carries_the_rsdp_address() {
    let m = create_guest_memory(64 * MIB).unwrap();
    let k = load_kernel(&m, &mut Cursor::new(tiny_bzimage(b"K"))).unwrap();
    let c = Cmdline::new(CMDLINE_MAX).unwrap();
    configure_linux_boot_with_acpi(&m, &k, &c, None, Some(0xe0000)).unwrap();
    // boot_params.acpi_rsdp_addr is at offset 0x070 (zero-page.rst)
    let v: u64 = m.read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x70)).unwrap();
    assert_eq!(v, 0xe0000);
    configure_linux_boot(&m, &k, &c, None).unwrap();
    let v: u64 = m.read_obj(GuestAddress(ZERO_PAGE_ADDR + 0x70)).unwrap();
    assert_eq!(v, 0);
}
