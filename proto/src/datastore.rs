//! The closed set of datastores, described without IO: what the controller must know of each
//! (its id, how its replication positions order, what lag is counted in, how its replicas
//! follow, what a create may ask of it) and what agent and controller agree on. Adding a
//! datastore is a new variant here: every `match` that forgets it fails to compile.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Datastore {
    Mariadb,
    Postgresql,
    Redis,
}

impl Datastore {
    pub const ALL: [Datastore; 3] = [Datastore::Mariadb, Datastore::Postgresql, Datastore::Redis];

    /// The datastore a command or an enrolment that names none means.
    pub const DEFAULT: Datastore = Datastore::Mariadb;

    /// The replication strategies an operator can choose for new replicas (`[replication]
    /// strategy` in the controller's configuration), the default first: by GTID, or by binlog
    /// file and position. Datastores without a choice use their own
    /// ([`Datastore::replication_strategy`]).
    pub const CONFIGURABLE_REPLICATION: [&'static str; 2] = ["mariadb-gtid", "binlog"];

    /// The system service a host's own server of this datastore runs as (what to stop before
    /// an agent takes the port).
    pub fn system_service(self) -> &'static str {
        match self {
            Datastore::Mariadb => "mariadb",
            Datastore::Postgresql => "postgresql",
            Datastore::Redis => "redis-server",
        }
    }

    /// The id used in configuration, catalogs (`manager`) and the API.
    pub fn id(self) -> &'static str {
        match self {
            Datastore::Mariadb => "mariadb",
            Datastore::Postgresql => "postgresql",
            Datastore::Redis => "redis",
        }
    }

    /// How far replication position `a` is behind `b`: transactions summed over GTID domains
    /// (MariaDB), WAL bytes between LSNs `X/Y` (PostgreSQL), stream bytes between offsets
    /// (Redis); 0 when `a` covers `b`. An unreadable `a` against a readable `b` is behind.
    pub fn position_behind(self, a: &str, b: &str) -> u64 {
        let (a, b) = match self {
            Datastore::Mariadb => return gtid_behind(a, b),
            Datastore::Postgresql => (parse_lsn(a), parse_lsn(b)),
            Datastore::Redis => (a.trim().parse().ok(), b.trim().parse().ok()),
        };
        match (a, b) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            (None, Some(b)) => b.max(1),
            _ => 0,
        }
    }

    /// Whether replication position `a` has everything `b` has.
    pub fn position_covers(self, a: &str, b: &str) -> bool {
        self.position_behind(a, b) == 0
    }

    /// What a replica's lag behind its source is counted in, for the API (`lag_<unit>`).
    pub fn lag_unit(self) -> &'static str {
        match self {
            Datastore::Mariadb => "transactions",
            Datastore::Postgresql | Datastore::Redis => "bytes",
        }
    }

    /// The replication strategy of new replicas: the configured one where the datastore has
    /// a choice (MariaDB: by GTID or by binlog file and position), its own otherwise.
    pub fn replication_strategy(self, configured: &str) -> String {
        match self {
            Datastore::Mariadb => configured.into(),
            Datastore::Postgresql => "postgresql-streaming".into(),
            Datastore::Redis => "redis-replicaof".into(),
        }
    }

    /// The strategy a switchover or failover re-points replicas with (one that positions
    /// itself, whatever the replicas were built with).
    pub fn repoint_strategy(self) -> &'static str {
        match self {
            Datastore::Mariadb => "mariadb-gtid",
            Datastore::Postgresql => "postgresql-streaming",
            Datastore::Redis => "redis-replicaof",
        }
    }

    /// The configuration-group rules bundled for a version of the datastore (Trove's
    /// `validation-rules.json` format, `coffer_common::config_rules::RulesFile`), if any.
    pub fn bundled_rules(self, version: &str) -> Option<&'static str> {
        let mut parts = version.split('.');
        let (major, minor) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        match (self, major, minor) {
            (Datastore::Mariadb, "10", "11") => Some(include_str!("../rules/mariadb-10.11.json")),
            (Datastore::Postgresql, "15", _) => Some(include_str!("../rules/postgresql-15.json")),
            (Datastore::Redis, "7", "0") => Some(include_str!("../rules/redis-7.0.json")),
            _ => None,
        }
    }

    /// Whether its sources archive their change stream continuously, so a restore can roll a
    /// backup forward to a time or a position (point-in-time recovery).
    pub fn archives_changes(self) -> bool {
        match self {
            Datastore::Mariadb | Datastore::Postgresql => true,
            Datastore::Redis => false,
        }
    }

    /// What is offered instead of point-in-time recovery, where it is not.
    pub fn point_in_time_note(self) -> &'static str {
        match self {
            Datastore::Mariadb | Datastore::Postgresql => "",
            Datastore::Redis => "Redis backups are RDB snapshots and no change stream (AOF) is archived; they restore to the moment they were taken",
        }
    }

    /// Whether the datastore has named databases a create, a user's grants or
    /// `POST /databases` can name (Redis has numbered keyspaces only).
    pub fn has_named_databases(self) -> bool {
        match self {
            Datastore::Mariadb | Datastore::Postgresql => true,
            Datastore::Redis => false,
        }
    }
}

/// Backup methods, selectable by name in configuration (`[backup] strategy`, snake_case). Each
/// backs up one datastore; the first of a datastore's in [`BackupMethod::ALL`] is its default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupMethod {
    /// MariaDB, physical (full and incremental), the default.
    #[default]
    Mariabackup,
    /// MariaDB, logical, full only.
    MariadbDump,
    /// PostgreSQL, physical (`pg_basebackup` tar with its WAL), full only.
    PgBasebackup,
    /// Redis, an RDB snapshot (BGSAVE), full only.
    RedisRdb,
}

impl BackupMethod {
    pub const ALL: [BackupMethod; 4] = [
        BackupMethod::Mariabackup,
        BackupMethod::MariadbDump,
        BackupMethod::PgBasebackup,
        BackupMethod::RedisRdb,
    ];

    /// The datastore this method backs up.
    pub fn datastore(self) -> Datastore {
        match self {
            BackupMethod::Mariabackup | BackupMethod::MariadbDump => Datastore::Mariadb,
            BackupMethod::PgBasebackup => Datastore::Postgresql,
            BackupMethod::RedisRdb => Datastore::Redis,
        }
    }

    /// The name a backup's manifest records (restores follow the backup, not the setting).
    pub fn name(self) -> &'static str {
        match self {
            BackupMethod::Mariabackup => "mariabackup",
            BackupMethod::MariadbDump => "mariadb-dump",
            BackupMethod::PgBasebackup => "pg_basebackup",
            BackupMethod::RedisRdb => "redis_rdb",
        }
    }

    /// The method a manifest names.
    pub fn from_name(name: &str) -> Option<BackupMethod> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The method for `datastore`: the configured one when it is that datastore's, else the
    /// datastore's default; None for a datastore no method backs up.
    pub fn for_datastore(datastore: Datastore, configured: BackupMethod) -> Option<BackupMethod> {
        if configured.datastore() == datastore {
            return Some(configured);
        }
        Self::ALL.into_iter().find(|k| k.datastore() == datastore)
    }

    /// Whether the method takes incremental backups.
    pub fn incremental(self) -> bool {
        match self {
            BackupMethod::Mariabackup | BackupMethod::PgBasebackup => true,
            BackupMethod::MariadbDump | BackupMethod::RedisRdb => false,
        }
    }
}

impl fmt::Display for Datastore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

/// A datastore id this release does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown datastore '{0}'; this release knows mariadb, postgresql and redis")]
pub struct UnknownDatastore(pub String);

impl FromStr for Datastore {
    type Err = UnknownDatastore;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Datastore::ALL
            .into_iter()
            .find(|d| d.id() == s)
            .ok_or_else(|| UnknownDatastore(s.to_string()))
    }
}

/// Parses a GTID position (`0-1-5,1-2-9`) into (domain → (server, seq)).
pub fn parse_gtids(pos: &str) -> std::collections::BTreeMap<u32, (u32, u64)> {
    pos.split(',')
        .filter_map(|g| {
            let mut it = g.trim().split('-');
            let d = it.next()?.parse().ok()?;
            let s = it.next()?.parse().ok()?;
            let n = it.next()?.parse().ok()?;
            Some((d, (s, n)))
        })
        .collect()
}

/// Transactions GTID position `a` is behind `b`, summed over domains.
pub fn gtid_behind(a: &str, b: &str) -> u64 {
    let a = parse_gtids(a);
    parse_gtids(b)
        .iter()
        .map(|(d, (_, n))| n.saturating_sub(a.get(d).map(|x| x.1).unwrap_or(0)))
        .sum()
}

/// A PostgreSQL WAL location `X/Y` (hexadecimal high and low words) as one number.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::Datastore::*;
    use super::*;

    #[test]
    fn positions_are_ordered_by_their_datastore() {
        // WAL LSNs: hexadecimal high/low words.
        assert!(Postgresql.position_covers("1/0", "0/FFFFFFFF"));
        assert!(!Postgresql.position_covers("0/3000000", "0/3000060"));
        assert_eq!(Postgresql.position_behind("0/3000000", "0/3000060"), 0x60);
        assert!(!Postgresql.position_covers("", "0/1"));
        // Redis offsets: decimal.
        assert!(Redis.position_covers("1000", "999"));
        assert_eq!(Redis.position_behind("90", "100"), 10);
        assert!(!Redis.position_covers("", "1"));
        // MariaDB GTIDs, per domain.
        assert!(Mariadb.position_covers("0-1-5,1-2-9", "0-1-4"));
        assert!(!Mariadb.position_covers("0-1-5", "0-1-5,1-2-1"));
        assert_eq!(Mariadb.position_behind("0-1-3", "0-1-5,1-2-1"), 3);
    }

    #[test]
    fn ids_round_trip_and_unknown_ones_are_refused() {
        for d in Datastore::ALL {
            assert_eq!(d.id().parse::<Datastore>(), Ok(d));
        }
        let e = "mongodb".parse::<Datastore>().unwrap_err();
        assert!(e.to_string().contains("unknown datastore 'mongodb'"), "{e}");
        assert_eq!(Mariadb.replication_strategy("binlog"), "binlog");
        assert_eq!(
            Postgresql.replication_strategy("binlog"),
            "postgresql-streaming"
        );
        assert!(!Redis.has_named_databases());
        for d in Datastore::ALL {
            let m = BackupMethod::for_datastore(d, BackupMethod::default()).unwrap();
            assert_eq!(m.datastore(), d);
            assert_eq!(BackupMethod::from_name(m.name()), Some(m));
        }
        assert!(Mariadb.bundled_rules("10.11.19").is_some());
        assert!(Postgresql.bundled_rules("15.14").is_some());
        assert!(Redis.bundled_rules("7.0.15").is_some());
        assert!(Redis.bundled_rules("6.2").is_none());
    }
}
