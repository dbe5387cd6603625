//! Serde snapshot of the i8042. The controller keeps no guest-visible state
//! (no keyboard, no output buffer); only the reset counter is saved.

use super::I8042;

/// Saved i8042 state.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042Snapshot {
    /// Resets requested so far (diagnostics).
    pub resets: u64,
}

impl I8042 {
    /// Capture the state.
    pub fn save(&self) -> I8042Snapshot {
        I8042Snapshot { resets: self.resets }
    }

    /// Rebuild from `snap`.
    pub fn restore(snap: &I8042Snapshot) -> Self {
        let mut d = I8042::new();
        d.resets = snap.resets;
        d
    }
}
