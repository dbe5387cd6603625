use std::sync::{Arc, Mutex};

use super::io::{register_com1, COM1_BASE};
use super::snapshot::SerialSnapshot;
use super::*;
use crate::bus::Bus;
use crate::devices::{Device, DeviceState};

fn uart() -> (SerialDevice, CaptureWriter) {
    let out = CaptureWriter::default();
    (SerialDevice::new(IrqLine::new().unwrap(), Box::new(out.clone())), out)
}

#[test]
fn transmit_goes_to_the_sink_through_the_bus() {
    let (dev, out) = uart();
    let mut pio = Bus::new();
    register_com1(&mut pio, Arc::new(Mutex::new(dev))).unwrap();
    for b in b"OK\n" {
        pio.write(COM1_BASE, &[*b]).unwrap();
    }
    assert_eq!(out.contents(), b"OK\n");
    // LSR (offset 5): THR empty + transmitter empty after a write
    let mut lsr = [0u8];
    pio.read(COM1_BASE + 5, &mut lsr).unwrap();
    assert_eq!(lsr[0] & 0x60, 0x60);
}

#[test]
fn input_is_readable_and_raises_the_interrupt_when_enabled() {
    let (mut dev, _out) = uart();
    dev.write_reg(1, 0x01); // IER: received data available
    let _ = dev.irq().take_count();
    assert_eq!(dev.enqueue_input(b"hi"), 2);
    assert!(dev.irq().take_count() >= 1);
    assert_eq!(dev.read_reg(5) & 0x01, 0x01, "LSR data ready");
    assert_eq!(dev.read_reg(0), b'h');
    assert_eq!(dev.read_reg(0), b'i');
    assert_eq!(dev.read_reg(5) & 0x01, 0);
}

#[test]
fn wide_and_out_of_range_accesses_do_not_panic() {
    let (mut dev, out) = uart();
    let mut buf = [0xaau8; 4];
    Device::read(&mut dev, 0, &mut buf);
    assert_eq!(&buf[1..], &[0, 0, 0]);
    Device::read(&mut dev, u64::MAX, &mut buf);
    Device::write(&mut dev, 1 << 40, b"x");
    Device::write(&mut dev, 0, &[]);
    assert!(out.contents().is_empty());
}

#[test]
fn snapshot_round_trips_registers_and_fifo() {
    let (mut dev, _out) = uart();
    dev.write_reg(7, 0x5a); // scratch
    dev.write_reg(3, 0x03); // LCR 8N1
    dev.enqueue_input(b"abc");
    let DeviceState::Serial(snap) = Device::snapshot(&dev) else { panic!("wrong state kind") };
    assert_eq!(snap.scratch, 0x5a);
    assert_eq!(snap.in_buffer, b"abc");
    let json = serde_json::to_string(&snap).unwrap();
    let back: SerialSnapshot = serde_json::from_str(&json).unwrap();
    let mut restored = SerialDevice::restore(&back, IrqLine::new().unwrap(), Box::new(std::io::sink()));
    assert_eq!(restored.read_reg(7), 0x5a);
    assert_eq!(restored.read_reg(0), b'a');
    assert_eq!(restored.save().in_buffer, b"bc");
}

#[test]
fn oversized_snapshot_fifo_is_truncated_not_fatal() {
    let snap = SerialSnapshot { in_buffer: vec![1; 1000], ..Default::default() };
    let dev = SerialDevice::restore(&snap, IrqLine::new().unwrap(), Box::new(std::io::sink()));
    assert_eq!(dev.save().in_buffer.len(), 64);
}
