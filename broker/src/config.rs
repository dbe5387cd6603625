//! The broker's configuration, handed over by the supervisor as the schema
//! message `BrokerConfig` (internal.capnp) in a memfd at the broker's
//! `--config-fd` (docs/processes.md).

use capvisor_manifest::{BuiltImage, Manifest};
use capvisor_rpc::schema::internal_capnp::broker_config;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Everything the broker needs, resolved by the supervisor. Holds no secret.
#[derive(Clone, Debug, PartialEq)]
pub struct BrokerConfig {
    /// The validated manifest (auth methods, session TTL, profiles, bundles).
    pub manifest: Manifest,
    /// Built guest images by manifest image name; each session gets the
    /// subset its bundle allows.
    pub images: BTreeMap<String, BuiltImage>,
    /// State directory: `accounts.json`, `audit.jsonl`, `sessions/<id>/`.
    /// Must exist (the supervisor creates it with mode 0700).
    pub state_dir: PathBuf,
    /// Uids that get the `owner` profile by `loginLocal` (already resolved:
    /// `manifest.local.owner_uids`, or the uid running `capvisor serve`).
    pub owner_uids: Vec<u32>,
    /// Path of the `capvisor-worker` binary spawned per session.
    pub worker_bin: PathBuf,
}

impl BrokerConfig {
    /// Encodes as the schema `BrokerConfig` (the manifest as its TOML text).
    ///
    /// Errors: the manifest cannot be rendered as TOML, or a path is not UTF-8.
    pub fn to_message(&self) -> anyhow::Result<capnp::message::Builder<capnp::message::HeapAllocator>> {
        use capvisor_rpc::error::path_text;
        let mut m = capnp::message::Builder::new_default();
        {
            let mut b = m.init_root::<broker_config::Builder>();
            b.set_manifest_toml(toml::to_string(&self.manifest)?.as_str());
            capvisor_manifest::write_images(&self.images, b.reborrow().init_images(self.images.len() as u32))?;
            b.set_state_dir(path_text(&self.state_dir)?);
            let mut uids = b.reborrow().init_owner_uids(self.owner_uids.len() as u32);
            for (i, u) in self.owner_uids.iter().enumerate() {
                uids.set(i as u32, *u);
            }
            b.set_worker_bin(path_text(&self.worker_bin)?);
        }
        Ok(m)
    }

    /// Decodes a schema `BrokerConfig` and validates its manifest.
    ///
    /// Errors: a missing or malformed field, or a manifest that does not
    /// parse or validate.
    pub fn read_from(r: broker_config::Reader<'_>) -> anyhow::Result<Self> {
        let text = |t| capvisor_rpc::error::text(t).map_err(|e| anyhow::anyhow!("BrokerConfig: {e}"));
        let manifest = Manifest::parse(&text(r.get_manifest_toml())?)
            .map_err(|e| anyhow::anyhow!("BrokerConfig: manifest: {e:#}"))?;
        Ok(Self {
            manifest,
            images: capvisor_manifest::read_images(r.get_images()?)?,
            state_dir: text(r.get_state_dir())?.into(),
            owner_uids: r.get_owner_uids()?.iter().collect(),
            worker_bin: text(r.get_worker_bin())?.into(),
        })
    }

    /// Reads the config message from the inherited memfd `fd`.
    ///
    /// Errors: as [`capvisor_rpc::spawn::read_config`] and [`BrokerConfig::read_from`].
    pub fn from_fd(fd: std::os::fd::RawFd) -> anyhow::Result<Self> {
        let msg = capvisor_rpc::spawn::read_config(fd)?;
        Self::read_from(msg.get_root()?)
    }

    /// Whether the manifest enables auth method `method`.
    pub fn auth_enabled(&self, method: capvisor_rpc::schema::capvisor_capnp::AuthMethod) -> bool {
        let name = capvisor_rpc::principal::method_name(method);
        self.manifest.gateway.auth.iter().any(|m| m == name)
    }

    /// Path of the credential store.
    pub fn accounts_path(&self) -> PathBuf {
        self.state_dir.join("accounts.json")
    }

    /// Path of the audit log.
    pub fn audit_path(&self) -> PathBuf {
        self.state_dir.join("audit.jsonl")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_round_trip() {
        let cfg = BrokerConfig {
            manifest: Manifest::default_manifest(),
            images: BTreeMap::new(),
            state_dir: "/tmp/x".into(),
            owner_uids: vec![1000],
            worker_bin: "/bin/false".into(),
        };
        let msg = cfg.to_message().unwrap();
        let back = BrokerConfig::read_from(msg.get_root_as_reader().unwrap()).unwrap();
        assert_eq!(back, cfg);
        assert!(back.auth_enabled(capvisor_rpc::schema::capvisor_capnp::AuthMethod::Password));
        let empty = capnp::message::Builder::new_default();
        let mut empty = empty;
        empty.init_root::<broker_config::Builder>();
        assert!(BrokerConfig::read_from(empty.get_root_as_reader().unwrap()).is_err(), "an empty manifest is invalid");
    }
}
