//! Backup settings and keys shared by the controller (which holds the operator keyring and
//! issues each backup its instance's key) and the agents (which seal and open the streams).

use std::path::{Path, PathBuf};

use coffer_proto::datastore::BackupMethod;
use serde::{Deserialize, Serialize};

/// Backup settings shared by the controller (which hands them to agents) and the agents.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackupConfig {
    /// Where backups are stored.
    pub storage: crate::storage::StorageKind,
    /// Operator keys (TOML: `current = "id"` and a `[keys]` table of id = 64 hex chars), 0600.
    #[serde(default)]
    pub keyring_file: Option<PathBuf>,
    /// Encrypt backups (default). Turning it off must be explicit. Agents get no keyring: the
    /// controller issues each backup the instance's own key ([`instance_key`]) and a restore
    /// exactly the keys of its chain.
    #[serde(default = "default_true")]
    pub encryption: bool,
    /// zstd level (1 is fast and, on database pages, as small as 3).
    #[serde(default = "default_level")]
    pub zstd_level: i32,
    /// The method for its datastore's instances (one of `coffer_proto::datastore::BackupMethod`);
    /// instances of the other datastores use their own default method.
    #[serde(default)]
    pub strategy: BackupMethod,
    /// Archive the change stream of sources continuously (point-in-time recovery), where the
    /// datastore has one.
    #[serde(default = "default_true")]
    pub archive: bool,
    /// While writes go on, ship what the archive gathered at least this often (ms): the
    /// bound on how far behind the latest restorable time runs.
    #[serde(default = "default_ship_ms")]
    pub archive_ship_ms: u64,
    /// Close the change file being written (and store it whole) once it was stored in this
    /// many pieces or grew to `archive_rotate_mb`.
    #[serde(default = "default_rotate_segments")]
    pub archive_rotate_segments: u32,
    #[serde(default = "default_rotate_mb")]
    pub archive_rotate_mb: u64,
}

fn default_rotate_segments() -> u32 {
    120
}
fn default_rotate_mb() -> u64 {
    64
}

fn default_ship_ms() -> u64 {
    500
}

fn default_true() -> bool {
    true
}
fn default_level() -> i32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyringFile {
    current: Option<String>,
    #[serde(default)]
    keys: std::collections::BTreeMap<String, String>,
}

/// Reads a keyring file (never logs or echoes a key).
pub fn load_keyring(path: &Path) -> Result<crate::pipeline::Keyring, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading keyring {}: {e}", path.display()))?;
    let f: KeyringFile = toml::from_str(&text)
        .map_err(|e| format!("parsing keyring {}: {}", path.display(), e.message()))?;
    let mut ring = crate::pipeline::Keyring::default();
    for (id, hex) in &f.keys {
        let bytes: Option<Vec<u8>> = (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .collect();
        let key: [u8; 32] = bytes
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("key '{id}' in {} is not 64 hex characters", path.display()))?;
        ring.add(id, key);
    }
    if let Some(c) = &f.current {
        if ring.get(c).is_none() {
            return Err(format!("current key '{c}' is not in {}", path.display()));
        }
        ring.set_current(c);
    }
    Ok(ring)
}

/// The key one instance's backups are sealed with under operator key `master_id` of `ring`:
/// `(<master_id>:<instance>, HMAC-SHA256(master, context ‖ instance))`. A leaked instance key
/// opens that instance's backups and nothing else; the operator's keyring never leaves the
/// controller.
pub fn instance_key(
    ring: &crate::pipeline::Keyring,
    master_id: &str,
    instance: &str,
) -> Result<(String, [u8; 32]), String> {
    let master = ring
        .get(master_id)
        .ok_or_else(|| format!("the operator key '{master_id}' is not in the keyring"))?;
    let derive = || -> Result<Vec<u8>, openssl::error::ErrorStack> {
        let pkey = openssl::pkey::PKey::hmac(master)?;
        let mut s = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &pkey)?;
        s.update(b"coffer instance backup key v1\0")?;
        s.update(instance.as_bytes())?;
        s.sign_to_vec()
    };
    let k = derive().map_err(|e| format!("deriving an instance key: {e}"))?;
    let mut key = [0u8; 32];
    key.copy_from_slice(&k[..32]);
    Ok((format!("{master_id}:{instance}"), key))
}

/// The operator key and instance of a key id [`instance_key`] made (None for an operator key
/// used directly, as backups were sealed before keys were per instance).
pub fn split_key_id(key_id: &str) -> Option<(&str, &str)> {
    key_id.split_once(':')
}

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn instance_keys_are_per_instance_and_per_operator_key() {
        let mut ring = crate::pipeline::Keyring::default();
        ring.add("k1", [7u8; 32]);
        ring.add("k2", [9u8; 32]);
        let (id, a) = instance_key(&ring, "k1", "inst-a").unwrap();
        assert_eq!(id, "k1:inst-a");
        assert_eq!(split_key_id(&id), Some(("k1", "inst-a")));
        assert_eq!(
            instance_key(&ring, "k1", "inst-a").unwrap().1,
            a,
            "deterministic"
        );
        assert_ne!(instance_key(&ring, "k1", "inst-b").unwrap().1, a);
        assert_ne!(instance_key(&ring, "k2", "inst-a").unwrap().1, a);
        assert_ne!(a, [7u8; 32], "never the operator key itself");
        assert!(instance_key(&ring, "k9", "inst-a").is_err());
        assert_eq!(split_key_id("k1"), None);
    }
}
