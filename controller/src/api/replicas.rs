//! The replication view of an instance (what `crate::ops::replication` and the workflows keep).

use serde_json::{json, Value};

use super::{ApiError, Caller};
use crate::store::{InstanceRow, VersionRow};
use crate::App;

/// The replication view of an instance for `GET /instances/{id}`.
pub(super) fn view(
    app: &App,
    c: &Caller,
    r: &InstanceRow,
    replicas: &[String],
    version: Option<&VersionRow>,
    j: &mut Value,
) -> Result<(), ApiError> {
    if let Some(s) = &r.replica_of {
        j["replica_of"] = json!({"id": s, "links": c.links("instances", s)});
    }
    if !replicas.is_empty() {
        j["replicas"] = Value::Array(
            replicas
                .iter()
                .map(|id| json!({"id": id, "links": c.links("instances", id)}))
                .collect(),
        );
    }
    let (mine, source_pos) = {
        let live = app.live.lock().unwrap();
        let mine = live.get(&r.id).and_then(|l| l.hb.replication.clone());
        let source_pos = r
            .replica_of
            .as_ref()
            .and_then(|s| live.get(s))
            .and_then(|l| l.hb.replication.as_ref().map(|x| x.position.clone()));
        (mine, source_pos)
    };
    if let Some(m) = mine {
        let applied = if m.role == "replica" {
            m.applied_position.clone()
        } else {
            m.position.clone()
        };
        let mut v = json!({
            "role": m.role,
            "position": applied,
            "read_only": m.read_only,
        });
        if m.role == "replica" {
            v["io_running"] = json!(m.io_running);
            v["sql_running"] = json!(m.sql_running);
            v["lag_seconds"] = if m.seconds_behind >= 0 {
                json!(m.seconds_behind)
            } else {
                Value::Null
            };
            let ds = version
                .ok_or_else(|| anyhow::anyhow!("instance {} has no datastore version", r.id))?
                .datastore()
                .map_err(anyhow::Error::from)?;
            // In the datastore's own unit (`lag_transactions`, `lag_bytes`).
            let lag_key = format!("lag_{}", ds.lag_unit());
            v[lag_key.as_str()] = match &source_pos {
                Some(p) => json!(ds.position_behind(&m.applied_position, p)),
                None => Value::Null,
            };
            v["received_position"] = json!(m.received_position);
            if !m.last_error.is_empty() {
                v["last_error"] = json!(m.last_error);
            }
        }
        j["replication"] = v;
    }
    Ok(())
}
