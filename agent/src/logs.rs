//! Guest logs on the agent: the datastore's logs plus its own (`guest`), enabled and disabled
//! live where the server allows it (and for every later start), published to the backup
//! storage under `database_logs/<instance>/<datastore>-<log>/`. Publishing state is kept in the
//! state dir after every piece, so neither a restart nor a rotation sends a byte twice or loses
//! one. File sizes come from a `notify` watcher, so `pending` is current without polling.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use coffer_proto::v1;
use coffer_strategies::logs::{self, LogDef, LogKind, LogState};
use tracing::{info, warn};

use crate::Ctx;

pub use coffer_strategies::logs::CONTAINER;

/// Where each log file was last seen (inode, size; None: absent), by path.
type Sizes = Mutex<HashMap<PathBuf, Option<(u64, u64)>>>;

fn sizes() -> &'static Sizes {
    static S: OnceLock<Sizes> = OnceLock::new();
    S.get_or_init(Default::default)
}

/// Every log of this instance.
pub fn definitions(ctx: &Ctx) -> Vec<LogDef> {
    let mut defs = ctx.ds.log_definitions();
    if let Some(f) = &ctx.cfg.guest_log_file {
        defs.push(LogDef {
            name: "guest".into(),
            kind: LogKind::Sys,
            file: f.clone(),
            enable: vec![],
            disable: vec![],
            records: None,
        });
    }
    defs
}

fn state_path(ctx: &Ctx, name: &str) -> PathBuf {
    state_path_in(ctx.state.root(), name)
}

fn state_path_in(root: &std::path::Path, name: &str) -> PathBuf {
    root.join("logs").join(format!("{name}.json"))
}

fn load(ctx: &Ctx, def: &LogDef) -> LogState {
    let mut st: LogState = std::fs::read(state_path(ctx, &def.name))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if def.kind == LogKind::Sys {
        st.enabled = true;
    }
    st
}

fn save(ctx: &Ctx, name: &str, st: &LogState) {
    save_in(ctx.state.root(), name, st)
}

fn save_in(root: &std::path::Path, name: &str, st: &LogState) {
    let p = state_path_in(root, name);
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(p.parent().expect("has a parent"))?;
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(st).unwrap_or_default())?;
        std::fs::rename(&tmp, &p)
    };
    if let Err(e) = write() {
        warn!(log = name, error = %e, "could not record the log's state");
    }
}

fn prefix(ctx: &Ctx, def: &LogDef) -> String {
    format!(
        "{CONTAINER}/{}/{}-{}/",
        ctx.cfg.instance_id,
        ctx.ds.name(),
        def.name
    )
}

fn metafile(ctx: &Ctx, def: &LogDef) -> String {
    format!(
        "{CONTAINER}/{}/{}-{}_metafile",
        ctx.cfg.instance_id,
        ctx.ds.name(),
        def.name
    )
}

fn info_of(ctx: &Ctx, def: &LogDef) -> v1::LogInfo {
    let st = load(ctx, def);
    let now = sizes()
        .lock()
        .unwrap()
        .get(&def.file)
        .copied()
        .unwrap_or_else(|| logs::stat(&def.file));
    let (status, pending) = logs::status(def, &st, now);
    let published = st.published > 0;
    v1::LogInfo {
        name: def.name.clone(),
        r#type: def.kind.as_str().into(),
        status: status.into(),
        published: st.published,
        pending,
        container: if published {
            CONTAINER.into()
        } else {
            "None".into()
        },
        prefix: if published {
            prefix(ctx, def)
                .trim_start_matches(&format!("{CONTAINER}/"))
                .to_string()
        } else {
            "None".into()
        },
        metafile: metafile(ctx, def)
            .trim_start_matches(&format!("{CONTAINER}/"))
            .to_string(),
    }
}

pub fn list(ctx: &Ctx) -> Vec<v1::LogInfo> {
    definitions(ctx).iter().map(|d| info_of(ctx, d)).collect()
}

/// What logs.cnf holds: the enable variables of every enabled USER log.
fn settings(ctx: &Ctx) -> Vec<(String, String)> {
    definitions(ctx)
        .iter()
        .filter(|d| d.kind == LogKind::User && load(ctx, d).enabled)
        .flat_map(|d| d.enable.clone())
        .collect()
}

/// Carries out a log action; errors are (kind, message).
pub async fn action(
    ctx: &Ctx,
    name: &str,
    what: &str,
) -> Result<v1::LogInfo, (v1::CallError, String)> {
    let def = definitions(ctx)
        .into_iter()
        .find(|d| d.name == name)
        .ok_or_else(|| {
            (
                v1::CallError::NotFound,
                format!("Log {name} does not exist."),
            )
        })?;
    let invalid = |m: String| (v1::CallError::Invalid, m);
    match what {
        "show" => {}
        "enable" | "disable" => {
            if def.kind == LogKind::Sys {
                return Err(invalid(format!(
                    "Log {name} is a system log: it is always on and cannot be {what}d."
                )));
            }
            let on = what == "enable";
            let mut st = load(ctx, &def);
            st.enabled = on;
            save(ctx, &def.name, &st);
            ctx.ds
                .write_log_settings(&settings(ctx))
                .map_err(|e| invalid(e.to_string()))?;
            // Switched live: no restart needed.
            ctx.ds
                .switch_log_live(if on { &def.enable } else { &def.disable })
                .await
                .map_err(|e| (v1::CallError::Internal, e.to_string()))?;
            info!(
                log = name,
                enabled = on,
                "guest log switched (live, no restart needed)"
            );
        }
        "publish" | "discard" => {
            let cfg = ctx.cfg.backup.clone().ok_or_else(|| {
                (
                    v1::CallError::Unsupported,
                    "Logs are published to the backup storage, and none is configured for this agent.".to_string(),
                )
            })?;
            let mut st = load(ctx, &def);
            if def.kind == LogKind::User && !st.enabled && what == "publish" {
                return Err(invalid(format!("Log {name} is disabled: enable it first.")));
            }
            let (root, d, pre, meta) = (
                ctx.state.root().to_path_buf(),
                def.clone(),
                prefix(ctx, &def),
                metafile(ctx, &def),
            );
            let client = ctx.client.clone();
            let own = ctx.cfg.instance_id.clone();
            let publish = what == "publish";
            let st2 = tokio::task::spawn_blocking(move || -> Result<LogState, String> {
                if publish {
                    let storage = cfg.storage.build(
                        Some(&client),
                        &own,
                        coffer_strategies::storage::Access::Agent,
                    )?;
                    logs::publish(&d, &mut st, storage.as_ref(), &pre, &mut |s| {
                        save_in(&root, &d.name, s)
                    })?;
                    let meta_json = serde_json::json!({
                        "log_name": d.name, "log_type": d.kind.as_str(),
                        "log_file": d.file, "log_size": st.published, "inode": st.inode,
                    });
                    // Stored objects are never replaced: the metafile describes the log as
                    // first published (until a discard removes it with the pieces).
                    if !storage.exists(&meta) {
                        let mut w = storage.create(&meta).map_err(|e| e.to_string())?;
                        std::io::Write::write_all(&mut w, meta_json.to_string().as_bytes())
                            .map_err(|e| e.to_string())?;
                        w.commit().map_err(|e| e.to_string())?;
                    }
                } else {
                    // The published pieces are the controller's to delete; this forgets them.
                    st.published = 0;
                    st.offset = 0;
                    st.inode = logs::stat(&d.file).map(|(i, _)| i).unwrap_or(0);
                    save_in(&root, &d.name, &st);
                }
                Ok(st)
            })
            .await
            .map_err(|e| (v1::CallError::Internal, e.to_string()))?
            .map_err(|e| (v1::CallError::Internal, e))?;
            info!(
                log = name,
                action = what,
                published = st2.published,
                "guest log"
            );
        }
        other => return Err(invalid(format!("unknown log action '{other}'"))),
    }
    Ok(info_of(ctx, &def))
}

/// Keeps the sizes of the log files current from filesystem events.
pub async fn watch(ctx: Arc<Ctx>) {
    use notify::{RecursiveMode, Watcher};
    // Not the agent's own log: every line it writes would be an event, and at a verbose level
    // every event a line (its size is read on demand instead).
    let files: Vec<PathBuf> = definitions(&ctx)
        .into_iter()
        .filter(|d| d.name != "guest")
        .map(|d| d.file)
        .collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PathBuf>();
    let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            for p in ev.paths {
                let _ = tx.send(p);
            }
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "cannot watch log files; sizes are read on demand");
            return;
        }
    };
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .filter_map(|f| f.parent().map(PathBuf::from))
        .collect();
    dirs.sort();
    dirs.dedup();
    let mut watching = Vec::new();
    loop {
        // Directories appear with the data directory: (re)try the ones not watched yet.
        for d in &dirs {
            if !watching.contains(d)
                && d.exists()
                && watcher.watch(d, RecursiveMode::NonRecursive).is_ok()
            {
                watching.push(d.clone());
                for f in files.iter().filter(|f| f.parent() == Some(d.as_path())) {
                    sizes().lock().unwrap().insert(f.clone(), logs::stat(f));
                }
            }
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            p = rx.recv() => {
                let Some(p) = p else { return };
                if files.contains(&p) {
                    sizes().lock().unwrap().insert(p.clone(), logs::stat(&p));
                }
            }
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)), if watching.len() < dirs.len() => {}
        }
    }
}
