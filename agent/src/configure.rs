//! Configuration groups on the agent: the group's values become the overrides file beside the
//! rendered configuration (read at every start), dynamic changes are applied live, and any other
//! change leaves a `restart-pending` marker that makes heartbeats say restart_required until the
//! server is next started (the supervisor removes it when it spawns the server).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use coffer_proto::v1;
use tracing::{info, warn};

use crate::Ctx;

pub fn restart_marker(ctx: &Ctx) -> PathBuf {
    ctx.state.root().join("restart-pending")
}

/// Whether a change is waiting for a restart to take effect.
pub fn restart_pending(ctx: &Ctx) -> bool {
    restart_marker(ctx).exists()
}

fn to_map(overrides: &[v1::Override]) -> Result<BTreeMap<String, String>, String> {
    let mut m = BTreeMap::new();
    for o in overrides {
        if !coffer_strategies::config_rules::safe_name(&o.name)
            || !coffer_strategies::config_rules::safe_value(&o.value)
        {
            return Err(format!(
                "configuration override '{}' has characters that are not allowed",
                o.name
            ));
        }
        m.insert(o.name.clone(), o.value.clone());
    }
    Ok(m)
}

/// Writes the overrides before the first start (prepare): nothing to apply live.
pub fn write_initial(ctx: &Ctx, overrides: &[v1::Override]) -> Result<(), String> {
    let next = to_map(overrides)?;
    ctx.ds.write_overrides(&next).map_err(|e| e.to_string())
}

/// Makes `c` the instance's whole set of overrides.
pub async fn configure(ctx: &Arc<Ctx>, c: v1::Configure) -> Result<String, String> {
    let ds = &ctx.ds;
    let next = to_map(&c.overrides)?;
    let prev = ds.overrides().map_err(|e| e.to_string())?;
    let changed: Vec<(&String, Option<&String>)> = next
        .iter()
        .filter(|(k, v)| prev.get(*k) != Some(*v))
        .map(|(k, v)| (k, Some(v)))
        .chain(
            prev.keys()
                .filter(|k| !next.contains_key(*k))
                .map(|k| (k, None)),
        )
        .collect();
    let running = ctx.sup.observed.borrow().status == v1::ServiceStatus::Running;
    let mut live = Vec::new();
    let mut restart = Vec::new();
    if running {
        for (k, v) in &changed {
            match ds.is_dynamic(k).await {
                Ok(true) => live.push((*k, *v)),
                Ok(false) => restart.push(k.as_str()),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
    // Live first: a value the server refuses is reported and nothing is kept.
    let mut applied: Vec<&String> = Vec::new();
    for (k, v) in &live {
        if let Err(e) = ds.set_global(k, v.map(|s| s.as_str())).await {
            for done in applied {
                if let Err(undo) = ds
                    .set_global(done, prev.get(done).map(|s| s.as_str()))
                    .await
                {
                    warn!(parameter = %done, error = %undo, "could not undo a live change");
                }
            }
            return Err(format!("applying {k}: {e}"));
        }
        applied.push(k);
    }
    ds.write_overrides(&next).map_err(|e| e.to_string())?;
    if !restart.is_empty() {
        std::fs::write(restart_marker(ctx), restart.join("\n"))
            .map_err(|e| format!("recording the pending restart: {e}"))?;
    }
    info!(
        live = live.len(),
        restart_required = restart.len(),
        total = next.len(),
        "configuration overrides updated"
    );
    Ok(if restart.is_empty() {
        format!("{} overrides in effect", next.len())
    } else {
        format!(
            "{} overrides written; restart to apply {}",
            next.len(),
            restart.join(", ")
        )
    })
}
