//! KVM tests with tiny guests assembled in the test (see
//! [`crate::testutil::Asm`] for the instruction bytes). Each test prints a
//! one-line reason and returns when `/dev/kvm` is absent.
//!
//! The guest is entered directly in 64-bit mode at [`ENTRY`] with the GDT
//! and identity page tables from [`crate::boot::x86_64::setup_long_mode`];
//! no irqchip, so `HLT` exits to the VMM.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::kvm::{is_nested_pvm, KvmHypervisor, KvmVcpu};
use super::{Hypervisor, Vcpu, Vm, VmConfig};
use crate::boot::x86_64::setup_long_mode;
use crate::bus::Buses;
use crate::devices::i8042::{self, I8042};
use crate::devices::serial::io::register_com1;
use crate::devices::serial::{CaptureWriter, SerialDevice};
use crate::devices::virtio::mmio::{reg, window_address, MmioTransport, MMIO_MAGIC_VALUE};
use crate::devices::virtio::queue::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::devices::virtio::{device_type, features, status, VirtioInterrupt, INT_USED_RING};
use crate::devices::IrqLine;
use crate::memory::{create_guest_memory, VIRTIO_MMIO_SIZE};
use crate::testutil::{skip, Asm, DriverQueue, Recorder, TestDevice};
use crate::vcpu::{spawn, VcpuRunner, VcpuStop};

const ENTRY: u64 = 0x10_0000;
const MEM_SIZE: u64 = 16 << 20;
/// Port the guests report 32-bit values on.
const DEBUG_PORT: u16 = 0x402;

struct Tiny {
    mem: GuestMemoryMmap,
    _vm: super::kvm::KvmVm,
    vcpu: KvmVcpu,
    buses: Buses,
    serial_out: CaptureWriter,
    debug: Arc<Mutex<Recorder>>,
}

/// A VM with `code` at [`ENTRY`], serial on COM1, i8042, a recorder on
/// [`DEBUG_PORT`], and the vCPU set up for 64-bit entry.
fn tiny(code: &[u8]) -> Tiny {
    let hv = KvmHypervisor::new().expect("open /dev/kvm");
    let vm = hv.create_vm(&VmConfig { irqchip: false }).expect("create VM");
    let mem = create_guest_memory(MEM_SIZE).unwrap();
    vm.add_guest_memory(&mem).expect("map memory");
    mem.write_slice(code, GuestAddress(ENTRY)).unwrap();
    let state = setup_long_mode(&mem, GuestAddress(ENTRY)).unwrap();
    let mut vcpu = vm.create_vcpu(0).expect("create vCPU");
    vcpu.set_boot_state(&state).expect("set boot state");

    let mut buses = Buses::default();
    let serial_out = CaptureWriter::default();
    let serial = SerialDevice::new(IrqLine::new().unwrap(), Box::new(serial_out.clone()));
    register_com1(&mut buses.pio, Arc::new(Mutex::new(serial))).unwrap();
    i8042::io::register(&mut buses.pio, Arc::new(Mutex::new(I8042::new()))).unwrap();
    let debug = Arc::new(Mutex::new(Recorder::default()));
    buses.pio.insert(u64::from(DEBUG_PORT), 4, debug.clone()).unwrap();
    Tiny { mem, _vm: vm, vcpu, buses, serial_out, debug }
}

impl Tiny {
    fn run(self) -> (VcpuStop, Tiny2) {
        let Tiny { mem, _vm, vcpu, buses, serial_out, debug } = self;
        let mut runner = VcpuRunner::new(vcpu, Arc::new(buses));
        let stop = runner.run().expect("vCPU loop");
        (stop, Tiny2 { _mem: mem, _vm, serial_out, debug })
    }
}

struct Tiny2 {
    _mem: GuestMemoryMmap,
    _vm: super::kvm::KvmVm,
    serial_out: CaptureWriter,
    debug: Arc<Mutex<Recorder>>,
}

impl Tiny2 {
    fn reported(&self) -> Vec<u64> {
        self.debug.lock().unwrap().writes.iter().map(|w| w.1).collect()
    }
}

#[test]
fn kvm_64_bit_entry_runs_to_hlt() {
    if skip() {
        return;
    }
    eprintln!("kvm_pvm nested: {}", is_nested_pvm());
    let mut a = Asm::default();
    // proves we executed in 64-bit mode: `mov rax, imm64` (REX.W B8) only exists there
    a.code.extend_from_slice(&[0x48, 0xb8]);
    a.code.extend_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
    // shr rax, 32 = 48 C1 E8 20 -> eax = 0x11223344 (in 32-bit mode this would decode differently)
    a.code.extend_from_slice(&[0x48, 0xc1, 0xe8, 0x20]);
    a.report_eax(DEBUG_PORT).hlt();
    let t = tiny(&a.code);
    let (stop, t) = t.run();
    assert_eq!(stop, VcpuStop::Halted);
    assert_eq!(t.reported(), vec![0x1122_3344]);
}

#[test]
fn kvm_guest_prints_ok_through_the_serial_device() {
    if skip() {
        return;
    }
    let mut a = Asm::default();
    a.print(0x3f8, b"OK\n").hlt();
    let t = tiny(&a.code);
    // exercise the threaded path
    let Tiny { mem: _m, _vm, vcpu, buses, serial_out, .. } = t;
    let h = spawn(VcpuRunner::new(vcpu, Arc::new(buses)), "vcpu0").unwrap();
    let stop = h.join_timeout(Duration::from_secs(10)).expect("guest finished").unwrap();
    assert_eq!(stop, VcpuStop::Halted);
    assert_eq!(serial_out.contents(), b"OK\n");
}

#[test]
fn kvm_unmapped_port_reads_all_ones() {
    if skip() {
        return;
    }
    let mut a = Asm::default();
    a.mov_eax(0).mov_edx(0x500).in_al_dx().report_eax(DEBUG_PORT).hlt();
    let (stop, t) = tiny(&a.code).run();
    assert_eq!(stop, VcpuStop::Halted);
    assert_eq!(t.reported(), vec![0xff]);
}

#[test]
fn kvm_i8042_reset_command_ends_the_vm_with_reset() {
    if skip() {
        return;
    }
    let mut a = Asm::default();
    a.print(0x3f8, b"R").mov_edx(0x64).mov_al(0xfe).out_dx_al();
    a.print(0x3f8, b"X").hlt(); // must not run
    let (stop, t) = tiny(&a.code).run();
    assert_eq!(stop, VcpuStop::Reset);
    assert_eq!(t.serial_out.contents(), b"R");
}

fn virtio_tiny(code: &[u8]) -> (Tiny, Arc<Mutex<crate::testutil::TestDeviceLog>>, Arc<VirtioInterrupt>) {
    let mut t = tiny(code);
    let (dev, log) = TestDevice::new(device_type::CONSOLE, features::VIRTIO_F_VERSION_1);
    let irq = Arc::new(VirtioInterrupt::new(IrqLine::new().unwrap()));
    let transport = MmioTransport::new(Box::new(dev), t.mem.clone(), irq.clone());
    t.buses.mmio.insert(window_address(0).0, VIRTIO_MMIO_SIZE, Arc::new(Mutex::new(transport))).unwrap();
    (t, log, irq)
}

#[test]
fn kvm_guest_reads_virtio_mmio_identification() {
    if skip() {
        return;
    }
    let base = window_address(0).0 as u32;
    let mut a = Asm::default();
    for off in [reg::MAGIC_VALUE, reg::VERSION, reg::DEVICE_ID] {
        a.mmio_read32(base + off as u32).report_eax(DEBUG_PORT);
    }
    a.hlt();
    let (t, _, _) = virtio_tiny(&a.code);
    let (stop, t) = t.run();
    assert_eq!(stop, VcpuStop::Halted);
    assert_eq!(t.reported(), vec![u64::from(MMIO_MAGIC_VALUE), 2, u64::from(device_type::CONSOLE)]);
    assert_eq!(t.reported()[0], 0x7472_6976);
}

#[test]
fn kvm_guest_driver_init_and_queue_notify_reach_the_device() {
    if skip() {
        return;
    }
    let base = window_address(0).0 as u32;
    let q = DriverQueue::new(8, 0x20_0000);
    let st = |bits| bits;
    let mut a = Asm::default();
    // VIRTIO 1.2 3.1.1 driver initialization, from the guest
    a.mmio_write32(base + reg::STATUS as u32, st(status::ACKNOWLEDGE));
    a.mmio_write32(base + reg::STATUS as u32, st(status::ACKNOWLEDGE | status::DRIVER));
    a.mmio_write32(base + reg::DRIVER_FEATURES_SEL as u32, 1);
    a.mmio_write32(base + reg::DRIVER_FEATURES as u32, 1); // VIRTIO_F_VERSION_1 = bit 32
    a.mmio_write32(base + reg::STATUS as u32, st(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK));
    a.mmio_read32(base + reg::STATUS as u32).report_eax(DEBUG_PORT);
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
    a.mmio_read32(base + reg::INTERRUPT_STATUS as u32).report_eax(DEBUG_PORT);
    // used.idx as the guest sees it
    a.mov_ebx(q.used as u32 + 2).load_eax_from_rbx().report_eax(DEBUG_PORT);
    a.hlt();

    let (t, log, irq) = virtio_tiny(&a.code);
    // the driver's buffers, prepared in guest memory before the run
    let mut dq = q;
    t.mem.write_slice(b"ping", GuestAddress(0x30_0000)).unwrap();
    dq.set_desc(&t.mem, 0, 0x30_0000, 4, VIRTQ_DESC_F_NEXT, 1);
    dq.set_desc(&t.mem, 1, 0x30_1000, 16, VIRTQ_DESC_F_WRITE, 0);
    dq.offer(&t.mem, 0);
    let mem = t.mem.clone();
    let (stop, t) = t.run();
    assert_eq!(stop, VcpuStop::Halted);
    let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    let rep = t.reported();
    assert_eq!(rep.len(), 3, "{rep:x?}");
    assert_eq!(rep[0], u64::from(ok), "FEATURES_OK accepted");
    assert_eq!(rep[1], u64::from(INT_USED_RING), "InterruptStatus after the device used the buffer");
    assert_eq!(rep[2] & 0xffff, 1, "used.idx");
    let l = log.lock().unwrap();
    assert_eq!(l.notifications, vec![0]);
    assert_eq!(l.activations, 1);
    assert_eq!(l.requests, vec![b"ping".to_vec()]);
    assert_eq!(dq.used_elem(&mem, 0), (0, 3));
    let mut reply = [0u8; 3];
    mem.read_slice(&mut reply, GuestAddress(0x30_1000)).unwrap();
    assert_eq!(&reply, b"ack");
    assert!(irq.line().take_count() >= 1, "interrupt line raised");
}

#[test]
fn kvm_spinning_guest_is_stopped_by_the_kick() {
    if skip() {
        return;
    }
    let mut a = Asm::default();
    a.print(0x3f8, b"S").spin();
    let t = tiny(&a.code);
    let Tiny { mem: _m, _vm, vcpu, buses, serial_out, .. } = t;
    let h = spawn(VcpuRunner::new(vcpu, Arc::new(buses)), "vcpu-spin").unwrap();
    // wait until the guest is running its loop
    for _ in 0..1000 {
        if !serial_out.contents().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(serial_out.contents(), b"S");
    let h = match h.join_timeout(Duration::from_millis(50)) {
        Ok(r) => panic!("spinning guest ended on its own: {r:?}"),
        Err(h) => h,
    };
    assert_eq!(h.stop().unwrap(), VcpuStop::Stopped);
}

#[test]
fn kvm_irqchip_vm_can_be_created() {
    if skip() {
        return;
    }
    let hv = KvmHypervisor::new().unwrap();
    match hv.create_vm(&VmConfig { irqchip: true }) {
        Ok(_) => {}
        Err(e) => panic!("irqchip VM (needed for Linux): {e}"),
    }
}
