//! Quotas: the check every create makes inside its write transaction.

use crate::error::ApiError;
use crate::store::{Store, Tx};

/// Refuses (413) a create that would take a project past a limit. Runs inside the create's
/// `BEGIN IMMEDIATE` transaction, so two concurrent creates cannot both pass.
pub async fn check(tx: &mut Tx, project: &str, ram: i64, volume: i64) -> Result<(), ApiError> {
    let limits = Store::quota_limits_with(&mut **tx, project).await?;
    let (n, used_ram, used_vol) = Store::usage(tx, project).await?;
    let mut over = vec![];
    for (resource, limit) in &limits {
        // Checked: a sum that does not fit is over any limit, never a wrapped small number.
        let after = match resource.as_str() {
            "instances" => n.checked_add(1),
            "ram" => used_ram.checked_add(ram),
            "volumes" => used_vol.checked_add(volume),
            _ => continue,
        };
        if *limit >= 0 && after.is_none_or(|a| a > *limit) {
            over.push(format!("'{resource}'"));
        }
    }
    if over.is_empty() {
        Ok(())
    } else {
        Err(ApiError::over_limit(format!(
            "Quota exceeded for resources: [{}].",
            over.join(", ")
        )))
    }
}
