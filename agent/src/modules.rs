//! Modules on the agent: applied through the drivers in `coffer_strategies::modules`, in order
//! (priority modules first, then `apply_order`, then name), each result recorded in the state
//! dir (`modules/<id>/result.json`), so the list survives agent restarts.

use std::path::PathBuf;

use coffer_proto::{seal, v1};
use coffer_strategies::modules::{driver, ModuleEnv};
use tracing::{info, warn};

use crate::Ctx;

fn dir(ctx: &Ctx, id: &str) -> PathBuf {
    ctx.state.root().join("modules").join(id)
}

fn env(ctx: &Ctx, id: &str) -> ModuleEnv {
    ModuleEnv {
        dir: dir(ctx, id),
        confd: ctx.ds.confd_dir(),
        restart_marker: crate::configure::restart_marker(ctx),
    }
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn load(ctx: &Ctx, id: &str) -> Option<v1::ModuleResult> {
    let b = std::fs::read(dir(ctx, id).join("result.bin")).ok()?;
    prost::Message::decode(b.as_slice()).ok()
}

fn store(ctx: &Ctx, r: &v1::ModuleResult) {
    let id = r.module.as_ref().map(|m| m.id.clone()).unwrap_or_default();
    let d = dir(ctx, &id);
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&d)?;
        let tmp = d.join("result.tmp");
        std::fs::write(&tmp, prost::Message::encode_to_vec(r))?;
        std::fs::rename(&tmp, d.join("result.bin"))
    };
    if let Err(e) = write() {
        warn!(module = %id, error = %e, "could not record the module's result");
    }
}

/// Every recorded module (removed ones included), in the order they were applied.
pub fn list(ctx: &Ctx) -> Vec<v1::ModuleResult> {
    let mut out: Vec<v1::ModuleResult> = std::fs::read_dir(ctx.state.root().join("modules"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| load(ctx, &e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default();
    out.sort_by_key(|r| r.sequence);
    out
}

fn next_sequence(ctx: &Ctx) -> u64 {
    list(ctx).iter().map(|r| r.sequence).max().unwrap_or(0) + 1
}

/// Applies modules in order; every one gets a result (failures do not stop the others).
pub fn apply(ctx: &Ctx, mut specs: Vec<v1::ModuleSpec>) -> Vec<v1::ModuleResult> {
    specs.sort_by(|a, b| {
        b.priority_apply
            .cmp(&a.priority_apply)
            .then(a.apply_order.cmp(&b.apply_order))
            .then(a.name.cmp(&b.name))
    });
    let mut out = Vec::new();
    for m in specs {
        // A module id names a directory under the state dir: nothing but one plain token.
        if !coffer_proto::subjects::valid_token(&m.id) {
            warn!(module = %m.name, "a module id that is not a plain token; refused");
            out.push(v1::ModuleResult {
                module: Some(v1::ModuleSpec {
                    contents_sealed: vec![],
                    ..m
                }),
                status: "ERROR".into(),
                message: "the module id is not a plain token ([A-Za-z0-9_-])".into(),
                ..Default::default()
            });
            continue;
        }
        let seq = next_sequence(ctx);
        let created = load(ctx, &m.id)
            .filter(|r| r.removed.is_empty())
            .map(|r| r.created)
            .unwrap_or_else(now);
        let outcome = (|| -> Result<String, String> {
            let d =
                driver(&m.r#type).ok_or_else(|| format!("no driver for type '{}'", m.r#type))?;
            let contents = seal::open(
                &ctx.secret_key,
                &seal::module_contents_context(&ctx.cfg.instance_id, &m.id),
                &m.contents_sealed,
            )
            .map_err(|e| format!("the module's contents: {e}"))?;
            d.apply(&env(ctx, &m.id), &m.id, &m.name, &contents)
        })();
        let (status, message) = match outcome {
            Ok(msg) => ("OK", msg),
            Err(e) => ("ERROR", e),
        };
        info!(module = %m.name, r#type = %m.r#type, status, sequence = seq, "module applied");
        let r = v1::ModuleResult {
            module: Some(v1::ModuleSpec {
                contents_sealed: vec![],
                ..m
            }),
            status: status.into(),
            message,
            created,
            updated: now(),
            removed: String::new(),
            sequence: seq,
        };
        store(ctx, &r);
        out.push(r);
    }
    out
}

/// Removes an applied module (its driver undoes what it did); the record stays, marked removed.
pub fn remove(ctx: &Ctx, id: &str) -> Result<v1::ModuleResult, (v1::CallError, String)> {
    if !coffer_proto::subjects::valid_token(id) {
        return Err((
            v1::CallError::Invalid,
            "the module id is not a plain token ([A-Za-z0-9_-])".into(),
        ));
    }
    let mut r = load(ctx, id)
        .filter(|r| r.removed.is_empty())
        .ok_or_else(|| {
            (
                v1::CallError::NotFound,
                format!("Module {id} is not applied to this instance."),
            )
        })?;
    let m = r.module.clone().unwrap_or_default();
    let d = driver(&m.r#type).ok_or_else(|| {
        (
            v1::CallError::Internal,
            format!("no driver for type '{}'", m.r#type),
        )
    })?;
    let msg = d
        .remove(&env(ctx, id), id, &m.name)
        .map_err(|e| (v1::CallError::Internal, e))?;
    r.removed = now();
    r.updated = r.removed.clone();
    r.message = msg;
    store(ctx, &r);
    info!(module = %m.name, "module removed");
    Ok(r)
}
