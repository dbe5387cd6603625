use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::io::register;
use super::snapshot::BootTimerSnapshot;
use super::*;
use crate::bus::Bus;
use crate::devices::{Device, DeviceState, IoAction};

fn timer() -> Arc<BootTimer> {
    Arc::new(BootTimer::new(Instant::now()))
}

#[test]
fn magic_write_on_the_port_records_init_ready_once() {
    let t = timer();
    let dev = Arc::new(Mutex::new(BootTimerDevice::new(t.clone())));
    let mut pio = Bus::new();
    register(&mut pio, dev.clone()).unwrap();
    assert_eq!(t.times().init_ready_us, None);
    assert_eq!(pio.write(u64::from(BOOT_TIMER_PORT), &[0x12]).unwrap(), IoAction::None);
    assert_eq!(t.times().init_ready_us, None, "other values are ignored");
    std::thread::sleep(Duration::from_millis(2));
    pio.write(u64::from(BOOT_TIMER_PORT), &[MAGIC]).unwrap();
    let first = t.times().init_ready_us.expect("recorded");
    assert!(first >= 2000, "{first} us");
    std::thread::sleep(Duration::from_millis(2));
    pio.write(u64::from(BOOT_TIMER_PORT), &[MAGIC]).unwrap();
    assert_eq!(t.times().init_ready_us, Some(first), "first mark wins");
    let d = dev.lock().unwrap();
    assert_eq!((d.marks(), d.ignored), (2, 1));
    // neighbouring ports are not ours
    assert!(pio.write(u64::from(BOOT_TIMER_PORT) + 1, &[MAGIC]).is_err());
}

#[test]
fn odd_accesses_do_not_panic_or_mark() {
    let t = timer();
    let mut d = BootTimerDevice::new(t.clone());
    assert_eq!(d.write(0, &[]), IoAction::None);
    assert_eq!(d.write(7, &[MAGIC]), IoAction::None);
    let mut buf = [0xaau8; 4];
    d.read(0, &mut buf);
    assert_eq!(buf, [0; 4]);
    // a 4-byte write whose low byte is the magic counts (byte 0)
    d.write(0, &[MAGIC, 1, 2, 3]);
    assert!(t.reached(Milestone::InitReady));
}

#[test]
fn milestones_keep_their_first_time_and_order() {
    let t = timer();
    assert!(t.mark(Milestone::VmBuilt));
    assert!(!t.mark(Milestone::VmBuilt));
    std::thread::sleep(Duration::from_millis(1));
    t.mark(Milestone::FirstRun);
    let s = t.times();
    assert!(s.vm_built_us.unwrap() < s.first_run_us.unwrap());
    assert_eq!(s.first_exit_us, None);
}

#[test]
fn timed_writer_marks_the_first_serial_byte() {
    let t = timer();
    let mut w = TimedWriter::new(Vec::new(), t.clone());
    w.write_all(b"").unwrap();
    assert!(!t.reached(Milestone::FirstSerial));
    w.write_all(b"Linux").unwrap();
    assert!(t.reached(Milestone::FirstSerial));
    assert_eq!(w.inner, b"Linux");
}

#[test]
fn process_start_is_in_the_past() {
    let start = process_start();
    assert!(start <= Instant::now());
    // the test binary has not been running for an hour
    assert!(start.elapsed() < Duration::from_secs(3600));
    assert!(process_age().is_some());
}

#[test]
fn snapshot_round_trip() {
    let t = timer();
    let mut d = BootTimerDevice::new(t.clone());
    t.mark(Milestone::FirstRun);
    d.write_value(MAGIC);
    d.write_value(1);
    let snap = match Device::snapshot(&d) {
        DeviceState::BootTimer(s) => s,
        other => panic!("{other:?}"),
    };
    let json = serde_json::to_string(&snap).unwrap();
    let back: BootTimerSnapshot = serde_json::from_str(&json).unwrap();
    let t2 = timer();
    let d2 = BootTimerDevice::restore(&back, t2.clone());
    assert_eq!(t2.times(), t.times());
    assert_eq!(d2.save(), snap);
}
