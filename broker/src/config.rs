//! The broker's configuration, handed over by the supervisor in the
//! environment variable [`CONFIG_ENV`] as JSON (docs/processes.md).

use capvisor_manifest::{BuiltImage, Manifest};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Environment variable holding the JSON [`BrokerConfig`].
pub const CONFIG_ENV: &str = "CAPVISOR_BROKER_CONFIG";

/// Environment variable holding a worker's JSON
/// [`capvisor_manifest::SessionContext`] (set by the broker at spawn).
pub const SESSION_CONTEXT_ENV: &str = "CAPVISOR_SESSION_CONTEXT";

/// Everything the broker needs, resolved by the supervisor. Holds no secret.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
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
    /// Reads and parses [`CONFIG_ENV`].
    ///
    /// Errors: the variable is unset or not valid JSON for this struct, or
    /// the manifest inside fails [`Manifest::validate`].
    pub fn from_env() -> anyhow::Result<Self> {
        let text = std::env::var(CONFIG_ENV).map_err(|_| anyhow::anyhow!("{CONFIG_ENV} is not set"))?;
        Self::from_json(&text)
    }

    /// Parses the JSON form (see [`BrokerConfig::from_env`] for errors).
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let cfg: BrokerConfig =
            serde_json::from_str(text).map_err(|e| anyhow::anyhow!("{CONFIG_ENV}: invalid JSON: {e}"))?;
        cfg.manifest.validate().map_err(|e| anyhow::anyhow!("{CONFIG_ENV}: manifest: {e}"))?;
        Ok(cfg)
    }

    /// The JSON form for [`CONFIG_ENV`].
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("BrokerConfig serialises")
    }

    /// Whether the manifest enables auth method `method` (`"local"`, `"password"`).
    pub fn auth_enabled(&self, method: &str) -> bool {
        self.manifest.gateway.auth.iter().any(|m| m == method)
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
    fn json_round_trip() {
        let cfg = BrokerConfig {
            manifest: Manifest::default_manifest(),
            images: BTreeMap::new(),
            state_dir: "/tmp/x".into(),
            owner_uids: vec![1000],
            worker_bin: "/bin/false".into(),
        };
        let back = BrokerConfig::from_json(&cfg.to_json()).unwrap();
        assert_eq!(back, cfg);
        assert!(back.auth_enabled("password"));
        assert!(BrokerConfig::from_json("{}").is_err());
    }
}
