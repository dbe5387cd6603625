//! NetLog: the session's recent egress flows (schema `NetFlow`, `NetLog`
//! in capvisor.capnp), a bounded ring in memory, newest last.
//!
//! One entry per connect decision, allowed or denied, written when the
//! outcome is known (denied, unreachable, or connected: then with the
//! address used); a connected flow's byte counts are filled in when it
//! ends. The oldest entry goes when the ring is full
//! ([`DEFAULT_CAPACITY`], `ProxyConfig.logCapacity`, at most
//! [`MAX_CAPACITY`]).

use crate::policy::Action;
use capvisor_schema::capvisor_capnp::{net_flow, net_log};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

/// Entries kept when `ProxyConfig.logCapacity` is 0.
pub const DEFAULT_CAPACITY: usize = 4096;
/// Most entries kept, whatever the configuration asks: with every text
/// field at its bound a full `recent` answer stays below 16 MiB.
pub const MAX_CAPACITY: usize = 16384;
/// Longest `host` / `method` / `path` / `detail` kept in an entry, bytes (longer ones are cut
/// at a character boundary).
pub const MAX_TEXT: usize = 256;

/// One flow (schema `NetFlow`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    /// Unix epoch ms, when the connection was asked for.
    pub time_ms: i64,
    /// The VM's name.
    pub vm: String,
    /// The host as the guest named it (at most [`MAX_TEXT`] bytes).
    pub host: String,
    /// The upstream address used ("" if none).
    pub address: String,
    /// Upstream TCP port.
    pub port: u16,
    /// HTTP method of a peeked HTTP request ("" otherwise; at most
    /// [`MAX_TEXT`] bytes).
    pub method: String,
    /// HTTP path of a peeked HTTP request as judged
    /// (`crate::peek::judged_path`; "" otherwise; at most [`MAX_TEXT`]
    /// bytes).
    pub path: String,
    /// HTTP status (0: none).
    pub status: u16,
    /// Bytes guest -> upstream.
    pub bytes_up: u64,
    /// Bytes upstream -> guest.
    pub bytes_down: u64,
    /// Index of the deciding rule; -1: none matched.
    pub rule: i32,
    /// The outcome: `allow` for a connection let through (even when the
    /// upstream then was unreachable: see `detail`), else `deny` or `ask`.
    pub action: Action,
    /// Why denied or failed (never a secret; at most [`MAX_TEXT`] bytes).
    pub detail: String,
}

impl Flow {
    /// A flow of VM `vm` to `host`:`port` asked for now, not yet decided
    /// (no rule, `deny`, nothing else filled in).
    pub fn asked(vm: &str, host: &str, port: u16) -> Self {
        Flow {
            time_ms: capvisor_rpc::now_ms(),
            vm: vm.to_string(),
            host: host.to_string(),
            address: String::new(),
            port,
            method: String::new(),
            path: String::new(),
            status: 0,
            bytes_up: 0,
            bytes_down: 0,
            rule: -1,
            action: Action::Deny,
            detail: String::new(),
        }
    }
}

/// `s` cut to at most [`MAX_TEXT`] bytes at a character boundary.
pub fn bounded(s: &str) -> String {
    let mut end = s.len().min(MAX_TEXT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

impl Flow {
    fn write(&self, mut b: net_flow::Builder<'_>) {
        b.set_time_ms(self.time_ms);
        b.set_vm(&self.vm);
        b.set_host(&self.host);
        b.set_address(&self.address);
        b.set_port(self.port);
        b.set_method(&self.method);
        b.set_path(&self.path);
        b.set_status(self.status);
        b.set_bytes_up(self.bytes_up);
        b.set_bytes_down(self.bytes_down);
        b.set_rule(self.rule);
        b.set_action(self.action.to_capnp());
        b.set_detail(&self.detail);
    }

    /// Reads a flow from the schema (clients, tests).
    ///
    /// Errors: a text field that is not UTF-8, an unknown action.
    pub fn read(r: net_flow::Reader<'_>) -> capnp::Result<Self> {
        let t = |x: capnp::Result<capnp::text::Reader<'_>>| -> capnp::Result<String> {
            Ok(x?.to_str().map_err(|e| capnp::Error::failed(e.to_string()))?.to_string())
        };
        Ok(Flow {
            time_ms: r.get_time_ms(),
            vm: t(r.get_vm())?,
            host: t(r.get_host())?,
            address: t(r.get_address())?,
            port: r.get_port(),
            method: t(r.get_method())?,
            path: t(r.get_path())?,
            status: r.get_status(),
            bytes_up: r.get_bytes_up(),
            bytes_down: r.get_bytes_down(),
            rule: r.get_rule(),
            action: Action::from_capnp(r.get_action()?),
            detail: t(r.get_detail())?,
        })
    }
}

/// The ring of recent flows.
#[derive(Debug)]
pub struct FlowLog {
    entries: VecDeque<Flow>,
    /// Sequence number of `entries[0]`.
    first_seq: u64,
    capacity: usize,
}

impl FlowLog {
    /// A ring of `capacity` entries (0: [`DEFAULT_CAPACITY`]; at most
    /// [`MAX_CAPACITY`]).
    pub fn new(capacity: u32) -> Self {
        let capacity = match capacity as usize {
            0 => DEFAULT_CAPACITY,
            n => n.min(MAX_CAPACITY),
        };
        Self { entries: VecDeque::new(), first_seq: 0, capacity }
    }

    /// Entries kept at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Appends `flow` (dropping the oldest when full); returns its
    /// sequence number for [`FlowLog::update`].
    pub fn push(&mut self, mut flow: Flow) -> u64 {
        flow.host = bounded(&flow.host);
        flow.method = bounded(&flow.method);
        flow.path = bounded(&flow.path);
        flow.detail = bounded(&flow.detail);
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
            self.first_seq += 1;
        }
        self.entries.push_back(flow);
        self.first_seq + self.entries.len() as u64 - 1
    }

    /// Changes entry `seq` if it is still kept.
    pub fn update(&mut self, seq: u64, f: impl FnOnce(&mut Flow)) {
        if let Some(i) = seq.checked_sub(self.first_seq) {
            if let Some(e) = self.entries.get_mut(i as usize) {
                f(e);
            }
        }
    }

    /// The newest `limit` entries (0: all) of VM `vm` ("" all VMs) asked
    /// for at or after `since_ms` (0: all), oldest first.
    pub fn recent(&self, vm: &str, since_ms: i64, limit: u32) -> Vec<Flow> {
        let limit = if limit == 0 { usize::MAX } else { limit as usize };
        let mut out: Vec<Flow> = self
            .entries
            .iter()
            .rev()
            .filter(|f| (vm.is_empty() || f.vm == vm) && f.time_ms >= since_ms)
            .take(limit)
            .cloned()
            .collect();
        out.reverse();
        out
    }
}

/// The log shared by the session's VMs and the `NetLog` cap.
pub type SharedLog = Rc<RefCell<FlowLog>>;

/// The `NetLog` server.
pub struct NetLogServer {
    log: SharedLog,
}

impl NetLogServer {
    /// A `NetLog` client over `log`.
    pub fn client(log: SharedLog) -> net_log::Client {
        capnp_rpc::new_client(Self { log })
    }
}

impl net_log::Server for NetLogServer {
    /// See [`FlowLog::recent`].
    async fn recent(
        self: capnp::capability::Rc<Self>,
        params: net_log::RecentParams,
        mut results: net_log::RecentResults,
    ) -> capnp::Result<()> {
        let p = params.get()?;
        let vm = p.get_vm()?.to_str().map_err(|_| capvisor_rpc::CvError::invalid("vm: not UTF-8"))?;
        let flows = self.log.borrow().recent(vm, p.get_since_ms(), p.get_limit());
        let mut list = results.get().init_flows(flows.len() as u32);
        for (i, f) in flows.iter().enumerate() {
            f.write(list.reborrow().get(i as u32));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(vm: &str, t: i64) -> Flow {
        Flow { time_ms: t, ..Flow::asked(vm, "h.test", 80) }
    }

    #[test]
    fn ring_drops_the_oldest_and_updates_only_kept_entries() {
        let mut log = FlowLog::new(3);
        let seqs: Vec<u64> = (0..5).map(|t| log.push(flow("a", t))).collect();
        assert_eq!(seqs, [0, 1, 2, 3, 4]);
        assert_eq!(log.recent("", 0, 0).iter().map(|f| f.time_ms).collect::<Vec<_>>(), [2, 3, 4]);
        log.update(0, |f| f.bytes_up = 9);
        log.update(3, |f| f.bytes_up = 7);
        let r = log.recent("", 0, 0);
        assert_eq!(r.iter().map(|f| f.bytes_up).collect::<Vec<_>>(), [0, 7, 0]);
    }

    #[test]
    fn recent_filters_by_vm_time_and_limit() {
        let mut log = FlowLog::new(0);
        assert_eq!(log.capacity(), DEFAULT_CAPACITY);
        assert_eq!(FlowLog::new(u32::MAX).capacity(), MAX_CAPACITY);
        for t in 0..10 {
            log.push(flow(if t % 2 == 0 { "a" } else { "b" }, t));
        }
        let times = |v: Vec<Flow>| v.iter().map(|f| f.time_ms).collect::<Vec<_>>();
        assert_eq!(times(log.recent("a", 0, 0)), [0, 2, 4, 6, 8]);
        assert_eq!(times(log.recent("b", 5, 0)), [5, 7, 9]);
        assert_eq!(times(log.recent("", 0, 3)), [7, 8, 9]);
        assert!(log.recent("c", 0, 0).is_empty());
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary() {
        let mut log = FlowLog::new(2);
        let mut f = flow("a", 0);
        f.host = "é".repeat(200);
        f.detail = "x".repeat(10_000);
        log.push(f);
        let got = &log.recent("", 0, 0)[0];
        assert!(got.host.len() <= MAX_TEXT && got.host.chars().all(|c| c == 'é'));
        assert_eq!(got.detail.len(), MAX_TEXT);
    }
}
