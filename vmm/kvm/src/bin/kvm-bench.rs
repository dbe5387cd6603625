//! kvm-bench: start-up and exit-latency figures for the KVM engine with a
//! tiny 64-bit guest.
//!
//! Usage: `kvm-bench [ROUNDS] [GUEST_MIB]` (defaults 20, 128).
//!
//! Per round (all in one process): open /dev/kvm (+ KVM_GET_SUPPORTED_CPUID),
//! create the VM, allocate and map guest RAM, write GDT / page tables /
//! code, create the vCPU and load its 64-bit state, then `KVM_RUN` until the
//! guest's first instruction that exits (`out dx, eax`, the 2nd instruction)
//! reaches the VMM. Then the guest runs a loop of port writes to measure
//! the PIO exit round trip through the bus. Prints p50/min/max per phase in
//! microseconds and the process RSS (VmRSS / VmHWM from /proc/self/status).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use capvisor_kvm::boot::x86_64::setup_long_mode;
use capvisor_kvm::bus::Buses;
use capvisor_kvm::devices::{Device, DeviceState, IoAction};
use capvisor_kvm::hypervisor::kvm::{is_nested_pvm, KvmHypervisor};
use capvisor_kvm::hypervisor::{Hypervisor, Vcpu, VcpuExit, Vm, VmConfig};
use capvisor_kvm::memory::create_guest_memory;
use capvisor_kvm::vcpu::{VcpuRunner, VcpuStop};
use vm_memory::{Bytes, GuestAddress};

const ENTRY: u64 = 0x10_0000;
const PORT: u16 = 0x402;
const LOOP_EXITS: u32 = 20_000;

/// The guest:
///   BA 02 04 00 00    mov edx, 0x402
///   EF                out dx, eax          ; first exit
///   B9 xx xx xx xx    mov ecx, LOOP_EXITS
/// L: EE               out dx, al           ; one exit per iteration
///   FF C9             dec ecx
///   75 FB             jnz L (-5)
///   F4                hlt
fn guest_code() -> Vec<u8> {
    let mut c = vec![0xba, 0x02, 0x04, 0x00, 0x00, 0xef, 0xb9];
    c.extend_from_slice(&LOOP_EXITS.to_le_bytes());
    c.extend_from_slice(&[0xee, 0xff, 0xc9, 0x75, 0xfb, 0xf4]);
    c
}

struct Sink;
impl Device for Sink {
    fn name(&self) -> &str {
        "sink"
    }
    fn read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _: u64, _: &[u8]) -> IoAction {
        IoAction::None
    }
    fn snapshot(&self) -> DeviceState {
        DeviceState::Stateless
    }
}

#[derive(Default)]
struct Phases {
    open: Vec<f64>,
    create_vm: Vec<f64>,
    memory: Vec<f64>,
    boot_setup: Vec<f64>,
    vcpu: Vec<f64>,
    first_exit: Vec<f64>,
    total: Vec<f64>,
    exit_rtt_ns: Vec<f64>,
}

fn us(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn round(guest_bytes: u64, p: &mut Phases) -> Result<(), String> {
    let t0 = Instant::now();
    let hv = KvmHypervisor::new().map_err(|e| e.to_string())?;
    let t1 = Instant::now();
    let vm = hv.create_vm(&VmConfig { irqchip: false }).map_err(|e| e.to_string())?;
    let t2 = Instant::now();
    let mem = create_guest_memory(guest_bytes).map_err(|e| e.to_string())?;
    vm.add_guest_memory(&mem).map_err(|e| e.to_string())?;
    let t3 = Instant::now();
    mem.write_slice(&guest_code(), GuestAddress(ENTRY)).map_err(|e| e.to_string())?;
    let state = setup_long_mode(&mem, GuestAddress(ENTRY)).map_err(|e| e.to_string())?;
    let t4 = Instant::now();
    let mut vcpu = vm.create_vcpu(0).map_err(|e| e.to_string())?;
    vcpu.set_boot_state(&state).map_err(|e| e.to_string())?;
    let t5 = Instant::now();
    match vcpu.run().map_err(|e| e.to_string())? {
        VcpuExit::IoOut { port: PORT, .. } => {}
        other => return Err(format!("unexpected first exit {other:?}")),
    }
    let t6 = Instant::now();
    p.open.push(us(t1 - t0));
    p.create_vm.push(us(t2 - t1));
    p.memory.push(us(t3 - t2));
    p.boot_setup.push(us(t4 - t3));
    p.vcpu.push(us(t5 - t4));
    p.first_exit.push(us(t6 - t5));
    p.total.push(us(t6 - t0));

    let mut buses = Buses::default();
    buses.pio.insert(u64::from(PORT), 4, Arc::new(Mutex::new(Sink))).map_err(|e| e.to_string())?;
    let mut runner = VcpuRunner::new(vcpu, Arc::new(buses));
    let t7 = Instant::now();
    let stop = runner.run().map_err(|e| e.to_string())?;
    let t8 = Instant::now();
    if stop != VcpuStop::Halted {
        return Err(format!("loop ended with {stop:?}"));
    }
    p.exit_rtt_ns.push((t8 - t7).as_secs_f64() * 1e9 / f64::from(LOOP_EXITS));
    drop(mem);
    Ok(())
}

fn stats(name: &str, unit: &str, v: &[f64]) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let p50 = s.get(s.len() / 2).copied().unwrap_or(0.0);
    println!(
        "{name:<34} p50 {p50:>9.1} {unit}  min {:>9.1}  max {:>9.1}  (first round {:>9.1})",
        s.first().copied().unwrap_or(0.0),
        s.last().copied().unwrap_or(0.0),
        v.first().copied().unwrap_or(0.0)
    );
}

fn proc_status(key: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(key)).map(|l| l[key.len()..].trim().to_string()))
        .unwrap_or_else(|| "?".into())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(128);
    println!("kvm-bench: {rounds} rounds, {mib} MiB guest RAM, kvm_pvm nested: {}", is_nested_pvm());
    let rss_start = proc_status("VmRSS:");
    let mut p = Phases::default();
    for i in 0..rounds {
        if let Err(e) = round(mib << 20, &mut p) {
            eprintln!("round {i}: {e}");
            std::process::exit(1);
        }
    }
    stats("open /dev/kvm + supported CPUID", "us", &p.open);
    stats("KVM_CREATE_VM", "us", &p.create_vm);
    stats("guest RAM mmap + memslots", "us", &p.memory);
    stats("GDT + page tables + code", "us", &p.boot_setup);
    stats("vCPU create + 64-bit state", "us", &p.vcpu);
    stats("KVM_RUN -> first guest exit", "us", &p.first_exit);
    stats("VMM start -> first guest exit", "us", &p.total);
    stats("PIO exit round trip (bus)", "ns", &p.exit_rtt_ns);
    println!(
        "RSS at start {rss_start}; after {rounds} rounds VmRSS {}, VmHWM {}",
        proc_status("VmRSS:"),
        proc_status("VmHWM:")
    );
}
