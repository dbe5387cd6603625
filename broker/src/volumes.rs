//! Persistent volumes: the broker's registry of each principal's volume
//! files and of which running VMs hold them (leases).
//!
//! Layout: `state_dir/volumes/` (0700), one directory per principal named
//! `p-<first 24 hex digits of SHA-256(principal)>` (so no principal name
//! ever becomes a path component), holding one sparse raw image
//! `<volume>.ext4` per volume, formatted ext4 on the host at create
//! ([`capvisor_rpc::disk::create_ext4`]). The files are the registry:
//! nothing else is stored, so volumes survive VM removal, logout and
//! restarts, and an operator sees them with `ls`. A principal's session
//! only ever learns paths inside its own directory (its worker's Landlock
//! domain holds that directory and nothing of other principals').
//!
//! Leases live in memory only: a read-write lease is exclusive, read-only
//! leases are shared; a conflicting attach is `inUse`. A lease ends when
//! its `VmHold` is dropped: the VM stopped or was removed, or the worker's
//! connection ended (worker crash, broker restart: nothing survives that
//! could hold the file).

use capvisor_manifest::Bundle;
use capvisor_rpc::schema::capvisor_capnp::volume_info;
use capvisor_rpc::{CvError, CvResult};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Smallest volume, MiB (ext4 with its journal needs room).
pub const MIN_VOLUME_MIB: u64 = 16;

/// File name suffix of a volume image.
pub const SUFFIX: &str = ".ext4";

/// One running VM holding a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Unique per broker run.
    pub id: u64,
    /// The session of the VM.
    pub session: String,
    /// The VM's name in that session.
    pub vm: String,
    /// Attached read-only.
    pub read_only: bool,
}

/// What `list` reports of one volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeFacts {
    /// Volume name.
    pub name: String,
    /// File system size, MiB (the file's length).
    pub size_mib: u64,
    /// Host disk allocated to the file, bytes.
    pub used_bytes: u64,
    /// Creation time (the file's birth time, else its change time), Unix epoch ms.
    pub created_at_ms: i64,
    /// Running VMs holding it.
    pub leases: Vec<Lease>,
}

impl VolumeFacts {
    /// Writes schema `VolumeInfo`; `session` decides `thisSession`.
    pub fn write_to(&self, session: &str, mut b: volume_info::Builder<'_>) {
        b.set_name(self.name.as_str());
        b.set_size_mib(self.size_mib);
        b.set_used_bytes(self.used_bytes);
        b.set_created_at_ms(self.created_at_ms);
        let mut l = b.init_attached_to(self.leases.len() as u32);
        for (i, lease) in self.leases.iter().enumerate() {
            let mut a = l.reborrow().get(i as u32);
            a.set_vm(lease.vm.as_str());
            a.set_this_session(lease.session == session);
            a.set_read_only(lease.read_only);
        }
    }
}

/// The registry over `state_dir/volumes`.
pub struct VolumeStore {
    root: PathBuf,
    /// Leases by volume file.
    leases: RefCell<HashMap<PathBuf, Vec<Lease>>>,
    /// Volumes being formatted (name reserved, size counted), by file.
    creating: RefCell<HashMap<PathBuf, u64>>,
    next_lease: Cell<u64>,
}

/// The principal's directory name below the volume root.
pub fn principal_key(principal: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(principal.as_bytes());
    let hex: String = h.iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("p-{hex}")
}

impl VolumeStore {
    /// The registry under `state_dir/volumes` (made 0700 if missing).
    ///
    /// Errors: the directory cannot be made.
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        let root = state_dir.join("volumes");
        make_private_dir(&root)?;
        Ok(Self {
            root,
            leases: RefCell::new(HashMap::new()),
            creating: RefCell::new(HashMap::new()),
            next_lease: Cell::new(1),
        })
    }

    /// `principal`'s volume directory, made (0700) if missing. It also
    /// holds a `principal` file naming whose it is, for operators.
    ///
    /// Errors: the directory cannot be made.
    pub fn principal_dir(&self, principal: &str) -> std::io::Result<PathBuf> {
        let dir = self.root.join(principal_key(principal));
        if !dir.exists() {
            make_private_dir(&dir)?;
            std::fs::write(dir.join("principal"), format!("{principal}\n"))?;
        }
        Ok(dir)
    }

    fn file(&self, principal: &str, name: &str) -> CvResult<PathBuf> {
        if !capvisor_rpc::names::valid_name(name) {
            return Err(CvError::invalid(format!(
                "bad volume name {name:?}: use 1-32 of [a-z0-9-], starting with a letter or digit"
            )));
        }
        let dir = self.principal_dir(principal).map_err(|e| CvError::internal(format!("volume directory: {e}")))?;
        Ok(dir.join(format!("{name}{SUFFIX}")))
    }

    /// Reserves room for volume `name` of `size_mib` MiB of `principal`
    /// within `bundle`'s `max_volumes` and `max_volume_total_mib`; returns
    /// the file to format, then [`VolumeStore::finish_create`].
    ///
    /// Errors: `invalidArgument` (bad name, size below [`MIN_VOLUME_MIB`]),
    /// `alreadyExists`, `quota` (count or total size).
    pub fn begin_create(&self, principal: &str, bundle: &Bundle, name: &str, size_mib: u64) -> CvResult<PathBuf> {
        let file = self.file(principal, name)?;
        if size_mib < MIN_VOLUME_MIB {
            return Err(CvError::invalid(format!("a volume needs at least {MIN_VOLUME_MIB} MiB (asked {size_mib})")));
        }
        if file.exists() || self.creating.borrow().contains_key(&file) {
            return Err(CvError::new(
                capvisor_rpc::schema::common_capnp::ErrorCode::AlreadyExists,
                format!("a volume named {name:?} exists"),
            ));
        }
        let existing = self.list(principal);
        let dir = file.parent().unwrap_or(&self.root);
        let pending: Vec<u64> =
            self.creating.borrow().iter().filter(|(f, _)| f.parent() == Some(dir)).map(|(_, s)| *s).collect();
        let count = existing.len() + pending.len();
        if count as u64 >= bundle.max_volumes as u64 {
            return Err(CvError::quota(format!(
                "this principal may keep at most {} volumes (it has {count}); remove one first",
                bundle.max_volumes
            )));
        }
        let total: u64 = existing.iter().map(|v| v.size_mib).sum::<u64>() + pending.iter().sum::<u64>();
        if total.saturating_add(size_mib) > bundle.max_volume_total_mib {
            return Err(CvError::quota(format!(
                "{size_mib} MiB more would exceed this principal's {} MiB of volumes ({total} MiB used)",
                bundle.max_volume_total_mib
            )));
        }
        self.creating.borrow_mut().insert(file.clone(), size_mib);
        Ok(file)
    }

    /// Ends a create begun with [`VolumeStore::begin_create`] (formatted or not).
    pub fn finish_create(&self, file: &Path) {
        self.creating.borrow_mut().remove(file);
    }

    /// The facts of `principal`'s volumes, by name.
    pub fn list(&self, principal: &str) -> Vec<VolumeFacts> {
        let Ok(dir) = self.principal_dir(principal) else { return Vec::new() };
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&dir) else { return out };
        for e in rd.flatten() {
            let fname = e.file_name();
            let Some(name) = fname.to_str().and_then(|n| n.strip_suffix(SUFFIX)) else { continue };
            if !capvisor_rpc::names::valid_name(name) {
                continue; // e.g. a `.new` file of a create in progress
            }
            let Ok(meta) = e.metadata() else { continue };
            out.push(self.facts(name, &e.path(), &meta));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn facts(&self, name: &str, file: &Path, meta: &std::fs::Metadata) -> VolumeFacts {
        use std::os::unix::fs::MetadataExt;
        let created = meta
            .created()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as i64)
            .unwrap_or(meta.ctime() * 1000);
        VolumeFacts {
            name: name.to_string(),
            size_mib: meta.len() / (1024 * 1024),
            used_bytes: meta.blocks() * 512,
            created_at_ms: created,
            leases: self.leases.borrow().get(file).cloned().unwrap_or_default(),
        }
    }

    /// The facts of one volume.
    ///
    /// Errors: `invalidArgument` (bad name), `notFound`.
    pub fn get(&self, principal: &str, name: &str) -> CvResult<VolumeFacts> {
        let file = self.file(principal, name)?;
        let meta = std::fs::metadata(&file).map_err(|_| CvError::not_found(format!("no volume named {name:?}")))?;
        Ok(self.facts(name, &file, &meta))
    }

    /// Deletes volume `name` of `principal` and its data.
    ///
    /// Errors: `notFound`; `inUse` while a running VM holds it (naming it).
    pub fn remove(&self, principal: &str, name: &str) -> CvResult<()> {
        let facts = self.get(principal, name)?;
        if let Some(l) = facts.leases.first() {
            return Err(CvError::in_use(format!(
                "volume {name:?} is attached to the running VM {:?}; remove or stop that VM first",
                l.vm
            )));
        }
        let file = self.file(principal, name)?;
        std::fs::remove_file(&file).map_err(|e| CvError::internal(format!("cannot delete volume {name:?}: {e}")))
    }

    /// Leases volume `name` of `principal` to VM `vm` of `session`;
    /// returns its file and the lease id (end it with [`VolumeStore::release`]).
    ///
    /// Errors: `notFound`; `inUse` when `read_only` is false and anyone
    /// holds it, or when someone holds it read-write.
    pub fn attach(
        &self,
        principal: &str,
        session: &str,
        vm: &str,
        name: &str,
        read_only: bool,
    ) -> CvResult<(PathBuf, u64)> {
        let facts = self.get(principal, name)?;
        let conflict = facts.leases.iter().find(|l| !read_only || !l.read_only);
        if let Some(l) = conflict {
            let whose = if l.session == session { "this session's" } else { "another session's" };
            return Err(CvError::in_use(format!(
                "volume {name:?} is attached {} to {whose} running VM {:?}; {}",
                if l.read_only { "read-only" } else { "read-write" },
                l.vm,
                if read_only { "a read-write volume is exclusive" } else { "a read-write attach needs it alone" }
            )));
        }
        let file = self.file(principal, name)?;
        let id = self.next_lease.get();
        self.next_lease.set(id + 1);
        self.leases.borrow_mut().entry(file.clone()).or_default().push(Lease {
            id,
            session: session.into(),
            vm: vm.into(),
            read_only,
        });
        Ok((file, id))
    }

    /// Ends lease `id` on `file`.
    pub fn release(&self, file: &Path, id: u64) {
        let mut leases = self.leases.borrow_mut();
        if let Some(v) = leases.get_mut(file) {
            v.retain(|l| l.id != id);
            if v.is_empty() {
                leases.remove(file);
            }
        }
    }
}

fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;
    use capvisor_rpc::schema::common_capnp::ErrorCode;

    fn bundle(max: u32, total: u64) -> Bundle {
        let mut b = capvisor_manifest::Manifest::default_manifest().bundle_for("owner").unwrap().clone();
        b.max_volumes = max;
        b.max_volume_total_mib = total;
        b
    }

    /// Creates like the broker does, without mkfs (a sized file is enough
    /// for the registry).
    fn make(s: &VolumeStore, p: &str, b: &Bundle, name: &str, mib: u64) -> CvResult<()> {
        let f = s.begin_create(p, b, name, mib)?;
        std::fs::File::create(&f).unwrap().set_len(mib * 1024 * 1024).unwrap();
        s.finish_create(&f);
        Ok(())
    }

    #[test]
    fn principals_are_isolated_and_names_never_become_paths() {
        let d = tempfile::tempdir().unwrap();
        let s = VolumeStore::open(d.path()).unwrap();
        let b = bundle(8, 1024);
        make(&s, "local:alice", &b, "work", 32).unwrap();
        assert_eq!(s.list("local:alice").len(), 1);
        assert!(s.list("local:bob").is_empty(), "bob sees none of alice's volumes");
        assert_eq!(s.get("local:bob", "work").unwrap_err().code, ErrorCode::NotFound);
        assert_eq!(s.attach("local:bob", "s2", "vm", "work", true).unwrap_err().code, ErrorCode::NotFound);
        assert_eq!(s.remove("local:bob", "work").unwrap_err().code, ErrorCode::NotFound);
        for bad in ["../x", "a/b", "", "A", ".hidden", "x.ext4"] {
            assert_eq!(
                s.begin_create("local:alice", &b, bad, 32).unwrap_err().code,
                ErrorCode::InvalidArgument,
                "{bad}"
            );
        }
        let dir = s.principal_dir("local:alice").unwrap();
        assert!(dir.starts_with(d.path().join("volumes")));
        assert!(!dir.to_string_lossy().contains("alice"));
        assert_eq!(std::fs::read_to_string(dir.join("principal")).unwrap(), "local:alice\n");
        s.remove("local:alice", "work").unwrap();
        assert!(s.list("local:alice").is_empty());
    }

    #[test]
    fn count_and_total_size_are_bounded_per_principal() {
        let d = tempfile::tempdir().unwrap();
        let s = VolumeStore::open(d.path()).unwrap();
        let b = bundle(2, 100);
        assert_eq!(s.begin_create("p", &b, "tiny", 8).unwrap_err().code, ErrorCode::InvalidArgument);
        make(&s, "p", &b, "a", 60).unwrap();
        assert_eq!(make(&s, "p", &b, "a", 16).unwrap_err().code, ErrorCode::AlreadyExists);
        assert_eq!(make(&s, "p", &b, "b", 41).unwrap_err().code, ErrorCode::Quota, "60 + 41 > 100");
        // A create in progress counts and reserves its name.
        let f = s.begin_create("p", &b, "b", 40).unwrap();
        assert_eq!(s.begin_create("p", &b, "b", 16).unwrap_err().code, ErrorCode::AlreadyExists);
        assert_eq!(s.begin_create("p", &b, "c", 16).unwrap_err().code, ErrorCode::Quota, "count 2");
        s.finish_create(&f);
        // Another principal has its own budget.
        make(&s, "q", &b, "a", 100).unwrap();
    }

    #[test]
    fn read_write_leases_are_exclusive_and_end_on_release() {
        let d = tempfile::tempdir().unwrap();
        let s = VolumeStore::open(d.path()).unwrap();
        let b = bundle(8, 1024);
        make(&s, "p", &b, "v", 32).unwrap();
        let (file, rw) = s.attach("p", "s1", "a", "v", false).unwrap();
        assert!(file.ends_with("v.ext4"));
        let e = s.attach("p", "s2", "b", "v", false).unwrap_err();
        assert_eq!(e.code, ErrorCode::InUse);
        assert!(e.message.contains("another session's") && e.message.contains("\"a\""), "{}", e.message);
        assert_eq!(s.attach("p", "s1", "b", "v", true).unwrap_err().code, ErrorCode::InUse);
        assert_eq!(s.remove("p", "v").unwrap_err().code, ErrorCode::InUse);
        let f = s.get("p", "v").unwrap();
        assert_eq!(f.leases.len(), 1);
        s.release(&file, rw);
        let (_, r1) = s.attach("p", "s1", "a", "v", true).unwrap();
        let (_, r2) = s.attach("p", "s2", "b", "v", true).unwrap();
        assert_eq!(s.attach("p", "s3", "c", "v", false).unwrap_err().code, ErrorCode::InUse);
        s.release(&file, r1);
        s.release(&file, r2);
        s.remove("p", "v").unwrap();
        assert!(!file.exists());
    }
}
