//! Configuration values checked against a datastore version's rules.

use coffer_proto::v1;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::App;

/// Checks every value against the version's rules; all problems in one 422.
pub async fn check_values(
    app: &App,
    version_id: &str,
    values: &Map<String, Value>,
) -> Result<Vec<v1::Override>, ApiError> {
    let rules = app.store.params(version_id).await?;
    if rules.is_empty() {
        return Err(ApiError::unprocessable(
            "Configuration groups are not supported for this datastore (no parameters are loaded for its version).",
        ));
    }
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for (k, v) in values {
        match rules.iter().find(|r| r.name.eq_ignore_ascii_case(k)) {
            None => bad.push(format!(
                "The configuration parameter {k} is not supported for this datastore."
            )),
            Some(r) => match r.check(v) {
                Ok(value) => out.push(v1::Override {
                    name: r.name.clone(),
                    value,
                }),
                Err(e) => bad.push(e),
            },
        }
    }
    if !bad.is_empty() {
        return Err(ApiError::unprocessable(bad.join(" ")));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}
