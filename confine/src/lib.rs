//! Process confinement for capvisor's children (docs/vmm-confinement.md):
//! the one home for the layers that are not the kvm engine's own seccomp
//! tables (`capvisor_kvm::sandbox`).
//!
//! - [`cgroup`]: a cgroup per session and per VM with memory and pids
//!   limits, on cgroup v2 where our subtree has the `memory` and `pids`
//!   controllers, else on the cgroup v1 `memory` and `pids` hierarchies
//!   (Documentation/admin-guide/cgroup-v2.rst, cgroup-v1/memory.rst,
//!   cgroup-v1/pids.rst);
//! - [`netns`]: a fresh, empty network namespace (network_namespaces(7),
//!   unshare(2) `CLONE_NEWNET`, with `CLONE_NEWUSER` when not privileged);
//! - [`landlock`]: the Landlock ruleset QEMU runs under (landlock(7)).
//!
//! Each layer is prepared in the parent (paths resolved, files opened,
//! rulesets built: everything that allocates or may fail with a useful
//! message) and applied in the child between fork and exec by one
//! `pre_exec` hook ([`ChildConfinement::install`]) that makes only
//! async-signal-safe system calls, so the child is confined from its first
//! instruction of the new program.

pub mod cgroup;
pub mod landlock;
pub mod netns;
pub mod service;

use std::fmt;
use std::os::unix::process::CommandExt;

/// One confinement layer (manifest `[confinement] required` names them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layer {
    /// A cgroup with memory and pids limits.
    Cgroup,
    /// A fresh network namespace.
    Netns,
    /// Landlock file-system and TCP rules.
    Landlock,
}

impl Layer {
    /// Every layer, in the order they are applied.
    pub const ALL: [Layer; 3] = [Layer::Cgroup, Layer::Netns, Layer::Landlock];

    /// The manifest name: `cgroup`, `netns`, `landlock`.
    pub fn name(self) -> &'static str {
        match self {
            Layer::Cgroup => "cgroup",
            Layer::Netns => "netns",
            Layer::Landlock => "landlock",
        }
    }

    /// The layer named `name` (see [`Layer::name`]).
    pub fn parse(name: &str) -> Option<Layer> {
        Layer::ALL.into_iter().find(|l| l.name() == name)
    }
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A layer that cannot be applied, with a one-line reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{layer}: {reason}")]
pub struct ConfineError {
    /// The layer.
    pub layer: Layer,
    /// Why, one line (for logs, audit and the caller's error).
    pub reason: String,
}

impl ConfineError {
    /// A failure of `layer` for `reason`.
    pub fn new(layer: Layer, reason: impl Into<String>) -> Self {
        Self { layer, reason: reason.into().replace('\n', " ") }
    }
}

/// What confinement a process got: each layer's one-line description, or
/// why it is missing (allowed by the manifest). Displays as e.g.
/// `cgroup v1 memory=448MiB pids=129; netns fresh; landlock ABI 7 partially enforced`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Applied layers and their description, in order.
    pub applied: Vec<(Layer, String)>,
    /// Layers not applied, with the reason.
    pub missing: Vec<ConfineError>,
}

impl Report {
    /// Records `layer` as applied, described by `what`.
    pub fn applied(&mut self, layer: Layer, what: impl Into<String>) {
        self.applied.push((layer, what.into()));
    }

    /// True when `layer` was applied.
    pub fn has(&self, layer: Layer) -> bool {
        self.applied.iter().any(|(l, _)| *l == layer)
    }

    /// Appends `other`'s entries.
    pub fn extend(&mut self, other: Report) {
        self.applied.extend(other.applied);
        self.missing.extend(other.missing);
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self.applied.iter().map(|(l, w)| format!("{l} {w}")).collect();
        parts.extend(self.missing.iter().map(|e| format!("NO {} ({})", e.layer, e.reason)));
        if parts.is_empty() {
            return f.write_str("no confinement layers");
        }
        f.write_str(&parts.join("; "))
    }
}

/// The layers prepared for one child, applied by [`ChildConfinement::install`]
/// in this order: cgroup (so every page and thread of the child is charged
/// from the start), network namespace, Landlock (last: it would refuse the
/// `/proc/self/uid_map` write of an unprivileged network namespace).
#[derive(Default)]
pub struct ChildConfinement {
    /// Move the child into this cgroup.
    pub cgroup: Option<cgroup::Placement>,
    /// Put the child in a fresh network namespace.
    pub netns: Option<netns::NetnsPlan>,
    /// Restrict the child with this ruleset.
    pub landlock: Option<landlock::PreparedRuleset>,
}

impl ChildConfinement {
    /// Registers a `pre_exec` hook on `cmd` that applies every prepared
    /// layer in the child. A layer failing there makes `spawn` fail with
    /// that system call's error (errno), and no program runs.
    ///
    /// Register it before other hooks that renumber descriptors (such as
    /// `capvisor_rpc::spawn::prepare`): the hook writes to descriptors it
    /// opened in the parent.
    pub fn install(self, cmd: &mut std::process::Command) {
        let ChildConfinement { cgroup, netns, mut landlock } = self;
        // SAFETY: the hook only makes async-signal-safe system calls
        // (write, unshare, open, close, prctl, landlock_restrict_self) on
        // memory prepared before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(c) = &cgroup {
                    c.enter_in_child()?;
                }
                if let Some(n) = &netns {
                    n.unshare_in_child()?;
                }
                if let Some(l) = landlock.as_mut() {
                    l.restrict_in_child()?;
                }
                Ok(())
            });
        }
    }
}
