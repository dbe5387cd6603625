use std::sync::{Arc, Mutex};

use super::io::{register, COMMAND_OFFSET, I8042_BASE};
use super::*;
use crate::bus::Bus;

#[test]
fn reset_command_on_command_port_returns_reset() {
    let dev = Arc::new(Mutex::new(I8042::new()));
    let mut pio = Bus::new();
    register(&mut pio, dev.clone()).unwrap();
    assert_eq!(pio.write(I8042_BASE + COMMAND_OFFSET, &[CMD_RESET_CPU]).unwrap(), IoAction::Reset);
    assert_eq!(dev.lock().unwrap().resets(), 1);
    // latch cleared: the next unrelated write does not reset again
    assert_eq!(pio.write(I8042_BASE + COMMAND_OFFSET, &[0xad]).unwrap(), IoAction::None);
}

#[test]
fn other_writes_do_not_reset() {
    let mut d = I8042::new();
    assert_eq!(d.write_reg(0, CMD_RESET_CPU), IoAction::None, "0xFE on the data port");
    assert_eq!(d.write_reg(4, 0xfd), IoAction::None);
    assert_eq!(crate::devices::Device::write(&mut d, 4, &[]), IoAction::None);
    assert_eq!(crate::devices::Device::write(&mut d, 1 << 33, &[CMD_RESET_CPU]), IoAction::None);
    assert_eq!(d.read_reg(4), 0);
    assert_eq!(d.resets(), 0);
}

#[test]
fn snapshot_round_trip() {
    let mut d = I8042::new();
    d.write_reg(4, CMD_RESET_CPU);
    let s = d.save();
    let json = serde_json::to_string(&s).unwrap();
    let back: snapshot::I8042Snapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(I8042::restore(&back).resets(), 1);
}
