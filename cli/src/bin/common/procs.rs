//! /proc readings shared by `capvisor-bench` and `capvisor-soak`: the
//! process tree below a pid, start times (to tell a process from a later
//! one with the same pid) and peak resident set sizes. Source: proc(5)
//! (`/proc/PID/stat` fields 4 `ppid` and 22 `starttime`, `/proc/PID/status`
//! `VmHWM`, `/proc/PID/cmdline`).

#![allow(dead_code)]

/// One live, non-zombie process.
#[derive(Clone, Debug)]
pub struct Proc {
    /// Process id.
    pub pid: u32,
    /// Parent pid (stat field 4).
    pub ppid: u32,
    /// Start time, clock ticks after boot (stat field 22).
    pub start: u64,
    /// First word of the command line (may be empty for kernel threads).
    pub argv0: String,
    /// Whole command line, NULs as spaces.
    pub cmdline: String,
}

impl Proc {
    /// The program's file name (`argv0` after its last `/`).
    pub fn name(&self) -> &str {
        self.argv0.rsplit('/').next().unwrap_or("")
    }
}

/// (state, ppid, start time) from `/proc/PID/stat`; `None` for a zombie
/// or a process that is gone.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    if f.first() == Some(&"Z") {
        return None;
    }
    Some((f.get(1)?.parse().ok()?, f.get(19)?.parse().ok()?))
}

/// Every live process that is not a zombie.
pub fn table() -> Vec<Proc> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Some((ppid, start)) = stat(pid) else { continue };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let argv0 = String::from_utf8_lossy(cmd.split(|c| *c == 0).next().unwrap_or(b"")).into_owned();
        let cmdline = String::from_utf8_lossy(&cmd).replace('\0', " ");
        out.push(Proc { pid, ppid, start, argv0, cmdline });
    }
    out
}

/// Every process below `root` in `table` (children, their children, ...).
pub fn below(table: &[Proc], root: u32) -> Vec<Proc> {
    let mut out: Vec<Proc> = vec![];
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for row in table.iter().filter(|r| r.ppid == p) {
            out.push(row.clone());
            frontier.push(row.pid);
        }
    }
    out
}

/// (pid, argv0) of every process below `root` (children, their children, ...).
pub fn descendants(root: u32) -> Vec<(u32, String)> {
    below(&table(), root).into_iter().map(|p| (p.pid, p.argv0)).collect()
}

/// `pid`'s start time (stat field 22), `None` when it is gone or a zombie.
pub fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|(_, t)| t)
}

/// `pid`'s peak resident set size (`VmHWM`), KiB; 0 when unreadable.
pub fn hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
