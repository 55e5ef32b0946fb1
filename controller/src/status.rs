//! Derivation of the API `status` and `operating_status` from the controller's task, the agent's
//! reported service status and heartbeat freshness. The only place these are computed.

/// What the controller is doing to an instance (the `task` column).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::Type, serde::Serialize, serde::Deserialize,
)]
#[sqlx(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Task {
    #[default]
    None,
    Building,
    BuildingError,
    Rebooting,
    Deleting,
    Promoting,
    Ejecting,
    Detaching,
    /// An old source taken out by an eject (fenced; needs the operator).
    Ejected,
}

/// The name serde gives a unit variant (its stored and logged name: `building_error`, `FAILED`).
pub fn serde_name(v: &impl serde::Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&serde_name(self))
    }
}

/// Who placed an instance's agent (the `placement` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, serde::Serialize, serde::Deserialize)]
#[sqlx(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum PlacedBy {
    /// The controller's provisioner (a local process or a VM): it also removes it.
    Provisioner,
    /// An agent that enrolled with a token on a host of its own: nothing to remove.
    Enrolled,
}

/// A backup's status (the `status` column), as Trove shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, serde::Serialize, serde::Deserialize)]
#[sqlx(rename_all = "UPPERCASE")]
#[serde(rename_all = "UPPERCASE")]
pub enum BackupStatus {
    New,
    Building,
    Completed,
    Failed,
}

impl BackupStatus {
    /// Still being taken (neither completed nor failed).
    pub fn running(self) -> bool {
        matches!(self, BackupStatus::New | BackupStatus::Building)
    }
}

impl std::fmt::Display for BackupStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&serde_name(self))
    }
}

/// Returns `(status, operating_status)`. `service` is the agent's lower-case service status;
/// `fresh` is false once the heartbeat is older than the expiry.
pub fn derive(task: Task, service: &str, fresh: bool) -> (&'static str, &'static str) {
    match task {
        Task::BuildingError | Task::Ejected => return ("ERROR", ""),
        Task::Building => return ("BUILD", ""),
        Task::Rebooting => return ("REBOOT", ""),
        Task::Deleting => return ("SHUTDOWN", ""),
        Task::Promoting => return ("PROMOTE", ""),
        Task::Ejecting => return ("EJECT", ""),
        Task::Detaching => return ("DETACH", ""),
        Task::None => {}
    }
    if !fresh {
        return ("ERROR", "ERROR");
    }
    match service {
        "running" => ("ACTIVE", "HEALTHY"),
        "blocked" => ("ACTIVE", "BLOCKED"),
        "restarting" => ("REBOOT", "RESTARTING"),
        "shutdown" | "crashed" => ("SHUTDOWN", "SHUTDOWN"),
        "failed" => ("ERROR", "FAILED"),
        "restart_required" => ("RESTART_REQUIRED", "RESTART_REQUIRED"),
        "building" => ("BUILD", "BUILD"),
        "new" => ("BUILD", "NEW"),
        "promoting" => ("PROMOTE", "PROMOTE"),
        "ejecting" => ("EJECT", "EJECT"),
        "deleted" => ("SHUTDOWN", "DELETED"),
        _ => ("ERROR", "ERROR"),
    }
}

/// Service statuses in which an action (restart, ...) may start, as in Trove.
pub fn action_allowed(service: &str) -> bool {
    matches!(
        service,
        "running" | "shutdown" | "crashed" | "blocked" | "restart_required"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table() {
        let table: &[(&str, &str, bool, &str, &str)] = &[
            // task, service, fresh => status, operating_status
            ("building", "new", true, "BUILD", ""),
            ("building", "running", true, "BUILD", ""),
            ("building", "running", false, "BUILD", ""),
            ("building_error", "failed", true, "ERROR", ""),
            ("rebooting", "restarting", true, "REBOOT", ""),
            ("deleting", "running", true, "SHUTDOWN", ""),
            ("none", "running", true, "ACTIVE", "HEALTHY"),
            ("none", "running", false, "ERROR", "ERROR"),
            ("none", "blocked", true, "ACTIVE", "BLOCKED"),
            ("none", "crashed", true, "SHUTDOWN", "SHUTDOWN"),
            ("none", "shutdown", true, "SHUTDOWN", "SHUTDOWN"),
            ("none", "restarting", true, "REBOOT", "RESTARTING"),
            ("none", "failed", true, "ERROR", "FAILED"),
            ("none", "unknown", true, "ERROR", "ERROR"),
            (
                "none",
                "restart_required",
                true,
                "RESTART_REQUIRED",
                "RESTART_REQUIRED",
            ),
            ("none", "new", true, "BUILD", "NEW"),
            ("none", "deleted", true, "SHUTDOWN", "DELETED"),
            ("none", "something-new", true, "ERROR", "ERROR"),
        ];
        const TROVE: &[&str] = &[
            "BUILD",
            "ACTIVE",
            "REBOOT",
            "RESIZE",
            "UPGRADE",
            "RESTART_REQUIRED",
            "PROMOTE",
            "EJECT",
            "DETACH",
            "SHUTDOWN",
            "BACKUP",
            "ERROR",
            "UNKNOWN",
        ];
        for (t, s, f, want_status, want_op) in table {
            let (st, op) = derive(serde_json::from_value(serde_json::json!(t)).unwrap(), s, *f);
            assert_eq!(
                (st, op),
                (*want_status, *want_op),
                "task={t} service={s} fresh={f}"
            );
            assert!(TROVE.contains(&st), "{st} is not a Trove status");
        }
    }

    #[test]
    fn actions_need_a_settled_service() {
        assert!(action_allowed("running"));
        assert!(action_allowed("crashed"));
        assert!(!action_allowed("building"));
        assert!(!action_allowed("new"));
    }
}
