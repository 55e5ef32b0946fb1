//! Module drivers: what applying and removing a module of each type does. A driver is one type
//! implementing [`ModuleDriver`] and one entry in [`driver`].
//!
//! - `ping`: no side effect; the result's message is the contents' `message=` line.
//! - `license`: the contents go to a 0600 file named after the module; removal deletes it
//!   (Trove's new_relic_license driver reduced to what it really does).
//! - `config`: `key = value` lines (checked like configuration-group values) become a drop-in
//!   the server reads after its configuration; the change needs a restart.

use std::path::PathBuf;

pub use coffer_common::modules::{config_values, TYPES};

/// Where drivers may write.
pub struct ModuleEnv {
    /// The module's own directory (licenses go here).
    pub dir: PathBuf,
    /// The datastore's drop-in directory for configuration.
    pub confd: PathBuf,
    /// Created when a change waits for a restart.
    pub restart_marker: PathBuf,
}

pub trait ModuleDriver: Send + Sync {
    fn name(&self) -> &'static str;
    /// Checks contents before anything is stored (the API refuses bad ones).
    fn validate(&self, contents: &[u8]) -> Result<(), String>;
    /// Applies; the message is the result's.
    fn apply(
        &self,
        env: &ModuleEnv,
        id: &str,
        name: &str,
        contents: &[u8],
    ) -> Result<String, String>;
    fn remove(&self, env: &ModuleEnv, id: &str, name: &str) -> Result<String, String>;
}

pub fn driver(kind: &str) -> Option<Box<dyn ModuleDriver>> {
    match kind {
        "ping" => Some(Box::new(Ping)),
        "license" => Some(Box::new(License)),
        "config" => Some(Box::new(Config)),
        _ => None,
    }
}

fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<(), String> {
    coffer_common::fsutil::write_atomic(path, bytes, 0o600)
        .map_err(|e| format!("{}: {e}", path.display()))
}

struct Ping;

impl ModuleDriver for Ping {
    fn name(&self) -> &'static str {
        "ping"
    }
    fn validate(&self, contents: &[u8]) -> Result<(), String> {
        coffer_common::modules::validate(self.name(), contents)
    }
    fn apply(
        &self,
        _env: &ModuleEnv,
        _id: &str,
        _name: &str,
        contents: &[u8],
    ) -> Result<String, String> {
        String::from_utf8_lossy(contents)
            .lines()
            .find_map(|l| l.trim().strip_prefix("message=").map(str::to_string))
            .ok_or_else(|| "Message not found in contents file".to_string())
    }
    fn remove(&self, _env: &ModuleEnv, _id: &str, _name: &str) -> Result<String, String> {
        Ok(String::new())
    }
}

struct License;

impl License {
    fn path(env: &ModuleEnv) -> PathBuf {
        env.dir.join("license")
    }
}

impl ModuleDriver for License {
    fn name(&self) -> &'static str {
        "license"
    }
    fn validate(&self, contents: &[u8]) -> Result<(), String> {
        coffer_common::modules::validate(self.name(), contents)
    }
    fn apply(
        &self,
        env: &ModuleEnv,
        _id: &str,
        name: &str,
        contents: &[u8],
    ) -> Result<String, String> {
        write_private(&Self::path(env), contents)?;
        Ok(format!("license {name} installed"))
    }
    fn remove(&self, env: &ModuleEnv, _id: &str, name: &str) -> Result<String, String> {
        match std::fs::remove_file(Self::path(env)) {
            Ok(()) => Ok(format!("license {name} removed")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(e.to_string()),
        }
    }
}

struct Config;

impl Config {
    fn path(env: &ModuleEnv, id: &str) -> PathBuf {
        env.confd.join(format!("module-{id}.cnf"))
    }
}

impl ModuleDriver for Config {
    fn name(&self) -> &'static str {
        "config"
    }
    fn validate(&self, contents: &[u8]) -> Result<(), String> {
        coffer_common::modules::validate(self.name(), contents)
    }
    fn apply(
        &self,
        env: &ModuleEnv,
        id: &str,
        name: &str,
        contents: &[u8],
    ) -> Result<String, String> {
        self.validate(contents)?;
        let mut text = format!("# Module {name} ({id}), written by coffer-agent.\n[mysqld]\n");
        for (k, v) in config_values(contents)? {
            text.push_str(&format!("{k} = {v}\n"));
        }
        // Readable by the server's OS user, like the rest of its configuration.
        let path = Self::path(env, id);
        std::fs::create_dir_all(&env.confd).map_err(|e| format!("{}: {e}", env.confd.display()))?;
        std::fs::write(&path, text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))?;
        let _ = std::fs::write(&env.restart_marker, format!("module {name}"));
        Ok(format!(
            "configuration from {name} in effect after a restart"
        ))
    }
    fn remove(&self, env: &ModuleEnv, id: &str, name: &str) -> Result<String, String> {
        match std::fs::remove_file(Self::path(env, id)) {
            Ok(()) => {
                let _ = std::fs::write(&env.restart_marker, format!("module {name}"));
                Ok(format!(
                    "configuration from {name} removed; restart to drop it"
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(e.to_string()),
        }
    }
}
