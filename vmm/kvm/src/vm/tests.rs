//! Whole-machine tests with tiny guests (no Linux): lifecycle, typed exits,
//! boot timer, ACPI PM register, virtio notifications through ioeventfd.
//! Each KVM test prints one `skipped:` line and returns without /dev/kvm.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::boot::x86_64::layout;
use crate::devices::boot_timer;
use crate::devices::serial::CaptureWriter;
use crate::devices::virtio::mmio::reg;
use crate::devices::virtio::mmio::window_address;
use crate::devices::virtio::{device_type, features, status};
use crate::testutil::{skip, Asm, Recorder, TestDevice};

const ENTRY: u64 = 0x10_0000;
const DEBUG_PORT: u16 = 0x402;

struct T {
    vm: Vm,
    out: CaptureWriter,
    debug: Arc<Mutex<Recorder>>,
}

impl T {
    fn reported(&self) -> Vec<u64> {
        self.debug.lock().unwrap().writes.iter().map(|w| w.1).collect()
    }
}

fn builder(code: &[u8]) -> (VmBuilder, CaptureWriter, Arc<Mutex<Recorder>>) {
    let out = CaptureWriter::default();
    let debug = Arc::new(Mutex::new(Recorder::default()));
    let b = VmBuilder::new(BootSource::Raw { code: code.to_vec(), entry: ENTRY })
        .memory_mib(32)
        .serial_output(Box::new(out.clone()))
        .pio_device(DEBUG_PORT, 4, debug.clone());
    (b, out, debug)
}

fn start(b: VmBuilder, out: CaptureWriter, debug: Arc<Mutex<Recorder>>) -> T {
    let mut vm = b.build().expect("build VM");
    vm.run().expect("run VM");
    T { vm, out, debug }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `mov ebx, addr; loop: inc dword [rbx]; jmp loop` (FF 03, EB FC).
fn counting_loop(a: &mut Asm, addr: u32) {
    a.mov_ebx(addr);
    a.code.extend_from_slice(&[0xff, 0x03, 0xeb, 0xfc]);
}

#[test]
fn builder_rejects_bad_configs() {
    let raw = || BootSource::Raw { code: vec![0xf4], entry: ENTRY };
    let bad = |b: VmBuilder| match b.build() {
        Err(VmError::Config(_)) => {}
        other => panic!("expected a config error, got {other:?}"),
    };
    bad(VmBuilder::new(raw()).vcpus(0));
    bad(VmBuilder::new(raw()).vcpus(2).irqchip(false));
    bad(VmBuilder::new(raw()).memory_mib(1));
    let mut b = VmBuilder::new(raw());
    for _ in 0..=MAX_VIRTIO_SLOTS {
        b = b.virtio_device(Box::new(TestDevice::new(device_type::CONSOLE, features::VIRTIO_F_VERSION_1).0));
    }
    bad(b);
}

#[test]
fn virtio_slots_and_cmdline_entries() {
    let s = VmBuilder::slots(2);
    assert_eq!(s[1], acpi::VirtioMmioSlot { base: 0xd000_1000, size: 0x1000, gsi: 6 });
    assert_eq!(
        VmBuilder::virtio_cmdline_entries(&s),
        vec!["virtio_mmio.device=4K@0xd0000000:5".to_string(), "virtio_mmio.device=4K@0xd0001000:6".to_string()]
    );
    assert_eq!(MAX_VIRTIO_SLOTS, 19);
}

#[test]
fn exit_mapping_is_typed() {
    assert_eq!(exit_of(0, &Ok(VcpuStop::Stopped)), None);
    assert_eq!(exit_of(0, &Ok(VcpuStop::PoweredOff)), Some(VmExit::PoweredOff));
    assert_eq!(exit_of(0, &Ok(VcpuStop::Shutdown)), Some(VmExit::Shutdown));
    assert!(matches!(exit_of(1, &Ok(VcpuStop::SystemEvent(3))), Some(VmExit::Panicked(_))));
    let e = VcpuError::InternalError { rip: 0x1234, suberror: 1, detail: "rip=0x1234".into() };
    match exit_of(2, &Err(e)) {
        Some(VmExit::InternalError(s)) => assert!(s.contains("vCPU 2") && s.contains("suberror 1"), "{s}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(exit_of(0, &Err(VcpuError::Thread("boom".into()))), Some(VmExit::Panicked(_))));
}

#[test]
fn kvm_hlt_without_irqchip_is_halted() {
    if skip() {
        return;
    }
    let mut a = Asm::default();
    a.print(0x3f8, b"hi").hlt();
    let (b, out, debug) = builder(&a.code);
    let mut t = start(b.irqchip(false), out, debug);
    assert_eq!(t.vm.wait_timeout(Duration::from_secs(10)), Some(VmExit::Halted));
    assert_eq!(t.out.contents(), b"hi");
}

#[test]
fn kvm_pause_resume_stop_with_a_spinning_guest() {
    if skip() {
        return;
    }
    let mut a = Asm::default();
    a.print(0x3f8, b"S");
    counting_loop(&mut a, 0x5000);
    let (b, out, debug) = builder(&a.code);
    let mut t = start(b, out, debug); // irqchip on
    let count = |t: &T| t.vm.memory().read_obj::<u32>(GuestAddress(0x5000)).unwrap();
    wait_for("the guest loop", Duration::from_secs(10), || count(&t) > 1000);
    t.vm.pause().expect("pause");
    assert!(t.vm.is_paused());
    let c1 = count(&t);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(count(&t), c1, "guest ran while paused");
    assert_eq!(t.vm.exit(), None);
    t.vm.resume();
    wait_for("progress after resume", Duration::from_secs(10), || count(&t) > c1 + 1000);
    // pause twice in a row is fine, and stop works while paused
    t.vm.pause().unwrap();
    t.vm.pause().unwrap();
    assert_eq!(t.vm.stop(), VmExit::Stopped);
    assert_eq!(t.vm.stop(), VmExit::Stopped, "idempotent");
    assert!(t.vm.pause().is_err());
    assert_eq!(t.out.contents(), b"S");
}

#[test]
fn kvm_stop_reaches_application_processors_waiting_for_sipi() {
    if skip() {
        return;
    }
    let mut a = Asm::default();
    counting_loop(&mut a, 0x5000);
    let (b, out, debug) = builder(&a.code);
    let mut t = start(b.vcpus(2), out, debug);
    wait_for("the BSP loop", Duration::from_secs(10), || {
        t.vm.memory().read_obj::<u32>(GuestAddress(0x5000)).unwrap() > 100
    });
    t.vm.pause().expect("pause parks the AP too");
    t.vm.resume();
    assert_eq!(t.vm.stop(), VmExit::Stopped);
}

#[test]
fn kvm_i8042_reset_ends_the_vm_as_reset() {
    if skip() {
        return;
    }
    let mut a = Asm::default();
    a.print(0x3f8, b"R").mov_edx(0x64).mov_al(0xfe).out_dx_al();
    a.print(0x3f8, b"X").spin();
    let (b, out, debug) = builder(&a.code);
    let mut t = start(b, out, debug);
    assert_eq!(t.vm.wait_timeout(Duration::from_secs(10)), Some(VmExit::Reset));
    assert_eq!(t.out.contents(), b"R");
}

#[test]
fn kvm_acpi_pm_register_powers_off_and_resets() {
    if skip() {
        return;
    }
    for (value, want) in [(0x34u8, VmExit::PoweredOff), (0x01, VmExit::Reset)] {
        let mut a = Asm::default();
        a.mov_edx(u32::from(acpi::power::ACPI_PM_PORT)).mov_al(value).out_dx_al().spin();
        let (b, out, debug) = builder(&a.code);
        let mut t = start(b, out, debug);
        assert_eq!(t.vm.wait_timeout(Duration::from_secs(10)), Some(want));
    }
}

#[test]
fn kvm_triple_fault_is_a_typed_exit() {
    if skip() {
        return;
    }
    // lidt [rbx] with a zero-limit IDT at 0x6000 (0F 01 1B), then ud2 (0F 0B) / int3 (CC):
    // the exception cannot be delivered -> #DF cannot either -> triple fault.
    for fault in [&[0x0f, 0x0b][..], &[0xcc][..]] {
        let mut a = Asm::default();
        a.print(0x3f8, b"T").mov_ebx(0x6000);
        a.code.extend_from_slice(&[0x0f, 0x01, 0x1b]);
        a.code.extend_from_slice(fault);
        a.print(0x3f8, b"X").spin();
        let (b, out, debug) = builder(&a.code);
        let mut t = start(b, out, debug);
        let exit = t.vm.wait_timeout(Duration::from_secs(10));
        match exit {
            Some(VmExit::Shutdown) => {}
            // kvm_pvm (nested, our build machines) fails to emulate the
            // delivery of int3 through a null IDT and reports an emulation
            // failure instead of the triple fault; still typed, still no hang.
            Some(VmExit::InternalError(ref s)) if fault == [0xcc] && crate::hypervisor::kvm::is_nested_pvm() => {
                assert!(s.contains("suberror 1") && s.contains("insn=cc"), "{s}");
                eprintln!("kvm_pvm: int3 with a null IDT -> {s}");
            }
            other => panic!("fault {fault:x?}: {other:?}"),
        }
        assert_eq!(t.out.contents(), b"T");
    }
}

#[test]
fn kvm_boot_timer_records_every_milestone_in_order() {
    if skip() {
        return;
    }
    let mut a = Asm::default();
    a.print(0x3f8, b"K");
    a.mov_edx(u32::from(boot_timer::BOOT_TIMER_PORT)).mov_al(boot_timer::MAGIC).out_dx_al();
    a.mov_edx(u32::from(acpi::power::ACPI_PM_PORT)).mov_al(0x34).out_dx_al();
    let (b, out, debug) = builder(&a.code);
    let mut t = start(b, out, debug);
    assert_eq!(t.vm.wait_timeout(Duration::from_secs(10)), Some(VmExit::PoweredOff));
    let bt = t.vm.boot_times();
    let all = [bt.vm_built_us, bt.first_run_us, bt.first_exit_us, bt.first_serial_us, bt.init_ready_us];
    assert!(all.iter().all(Option::is_some), "{bt:?}");
    let v: Vec<u64> = all.iter().map(|x| x.unwrap()).collect();
    assert!(v.windows(2).all(|w| w[0] <= w[1]), "milestones out of order: {bt:?}");
    eprintln!("boot times (us since process start): {bt:?}");
}

#[test]
fn kvm_virtio_queue_notify_reaches_the_device_through_ioeventfd() {
    if skip() {
        return;
    }
    let base = window_address(0).0 as u32;
    let q = crate::testutil::DriverQueue::new(8, 0x20_0000);
    let mut a = Asm::default();
    let st = |bits| bits;
    a.mmio_write32(base + reg::STATUS as u32, st(status::ACKNOWLEDGE));
    a.mmio_write32(base + reg::STATUS as u32, st(status::ACKNOWLEDGE | status::DRIVER));
    a.mmio_write32(base + reg::DRIVER_FEATURES_SEL as u32, 1);
    a.mmio_write32(base + reg::DRIVER_FEATURES as u32, 1);
    a.mmio_write32(base + reg::STATUS as u32, st(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK));
    a.mmio_write32(base + reg::QUEUE_SEL as u32, 0);
    a.mmio_write32(base + reg::QUEUE_NUM as u32, u32::from(q.size));
    a.mmio_write32(base + reg::QUEUE_DESC_LOW as u32, q.desc as u32);
    a.mmio_write32(base + reg::QUEUE_DRIVER_LOW as u32, q.avail as u32);
    a.mmio_write32(base + reg::QUEUE_DEVICE_LOW as u32, q.used as u32);
    a.mmio_write32(base + reg::QUEUE_READY as u32, 1);
    a.mmio_write32(
        base + reg::STATUS as u32,
        st(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK),
    );
    a.mmio_write32(base + reg::QUEUE_NOTIFY as u32, 0);
    a.print(0x3f8, b"N");
    a.spin();
    let (dev, log) = TestDevice::new(device_type::CONSOLE, features::VIRTIO_F_VERSION_1);
    let (b, out, debug) = builder(&a.code);
    let b = b.virtio_device(Box::new(dev));
    let vm = b.build().expect("build");
    let mut dq = q;
    vm.memory().write_slice(b"ping", GuestAddress(0x30_0000)).unwrap();
    dq.set_desc(vm.memory(), 0, 0x30_0000, 4, crate::devices::virtio::queue::VIRTQ_DESC_F_NEXT, 1);
    dq.set_desc(vm.memory(), 1, 0x30_1000, 16, crate::devices::virtio::queue::VIRTQ_DESC_F_WRITE, 0);
    dq.offer(vm.memory(), 0);
    let ioeventfd_ok = vm.ioeventfd_errors().is_empty();
    eprintln!("ioeventfd: {}", if ioeventfd_ok { "registered".to_string() } else { vm.ioeventfd_errors().join("; ") });
    let mut t = T { vm, out, debug };
    t.vm.run().unwrap();
    wait_for("the notification", Duration::from_secs(10), || !log.lock().unwrap().notifications.is_empty());
    wait_for("the guest to go on", Duration::from_secs(10), || t.out.contents() == b"N");
    assert_eq!(log.lock().unwrap().requests, vec![b"ping".to_vec()]);
    assert_eq!(dq.used_idx(t.vm.memory()), 1);
    assert_eq!(t.vm.stop(), VmExit::Stopped);
    assert!(t.reported().is_empty());
}

/// A minimal x86_64 ELF: one PT_LOAD of `payload` at `paddr`, entry = paddr.
fn tiny_elf(paddr: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; 64 + 56];
    v[0..4].copy_from_slice(b"\x7fELF");
    (v[4], v[5], v[6]) = (2, 1, 1);
    v[16..18].copy_from_slice(&2u16.to_le_bytes());
    v[18..20].copy_from_slice(&0x3eu16.to_le_bytes());
    v[20..24].copy_from_slice(&1u32.to_le_bytes());
    v[24..32].copy_from_slice(&paddr.to_le_bytes());
    v[32..40].copy_from_slice(&64u64.to_le_bytes());
    v[52..54].copy_from_slice(&64u16.to_le_bytes());
    v[54..56].copy_from_slice(&56u16.to_le_bytes());
    v[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = &mut v[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes());
    ph[4..8].copy_from_slice(&5u32.to_le_bytes());
    ph[8..16].copy_from_slice(&120u64.to_le_bytes());
    ph[16..24].copy_from_slice(&paddr.to_le_bytes());
    ph[24..32].copy_from_slice(&paddr.to_le_bytes());
    ph[32..40].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

#[test]
fn kvm_linux_boot_path_enters_the_kernel_with_the_zero_page() {
    if skip() {
        return;
    }
    // A fake "kernel": reports boot_params.acpi_rsdp_addr ([rsi+0x70], 8B 46 70),
    // the byte at the command line pointer ([rsi+0x228] -> cmd_line_ptr), and
    // the RSDP signature's first dword, then powers off through ACPI.
    let mut a = Asm::default();
    a.code.extend_from_slice(&[0x8b, 0x46, 0x70]); // mov eax, [rsi+0x70]
    a.report_eax(DEBUG_PORT);
    a.code.extend_from_slice(&[0x8b, 0x9e, 0x28, 0x02, 0x00, 0x00]); // mov ebx, [rsi+0x228]
    a.load_eax_from_rbx().report_eax(DEBUG_PORT);
    a.mmio_read32(0xe0000).report_eax(DEBUG_PORT);
    a.mov_edx(u32::from(acpi::power::ACPI_PM_PORT)).mov_al(0x34).out_dx_al();
    let dir = std::env::temp_dir().join(format!("capvisor-kvm-vmtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, tiny_elf(0x20_0000, &a.code)).unwrap();
    let initrd = dir.join("initrd");
    std::fs::write(&initrd, b"07070100").unwrap();
    let out = CaptureWriter::default();
    let debug = Arc::new(Mutex::new(Recorder::default()));
    let b = VmBuilder::new(BootSource::Linux {
        kernel: kernel.clone(),
        initramfs: Some(initrd),
        cmdline: "console=ttyS0".into(),
    })
    .memory_mib(64)
    .virtio_cmdline(true)
    .virtio_device(Box::new(TestDevice::new(device_type::CONSOLE, features::VIRTIO_F_VERSION_1).0))
    .serial_output(Box::new(out.clone()))
    .pio_device(DEBUG_PORT, 4, debug.clone());
    let mut t = start(b, out, debug);
    assert_eq!(t.vm.wait_timeout(Duration::from_secs(10)), Some(VmExit::PoweredOff));
    let r = t.reported();
    assert_eq!(
        r,
        vec![acpi::RSDP_ADDR, u64::from(u32::from_le_bytes(*b"cons")), u64::from(u32::from_le_bytes(*b"RSD "))]
    );
    let mut cmdline = [0u8; 80];
    t.vm.memory().read_slice(&mut cmdline, GuestAddress(layout::CMDLINE_ADDR)).unwrap();
    let s = String::from_utf8_lossy(&cmdline);
    assert!(s.starts_with("console=ttyS0 virtio_mmio.device=4K@0xd0000000:5\0"), "{s}");
    let _ = std::fs::remove_dir_all(&dir);
}
