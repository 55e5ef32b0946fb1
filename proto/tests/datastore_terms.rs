//! The datastores are one closed type (`coffer_proto::Datastore`, in `proto/src/datastore.rs`,
//! with the configuration rules it bundles from `proto/rules/`):
//! no other file of the agent, the controller or the wire crate names a datastore or a term of
//! one, so a datastore is added in that description and in `strategies/`, nowhere else.

use std::path::{Path, PathBuf};

const TERMS: &[&str] = &["mariadb", "mysql", "postgres", "redis", "gtid", "binlog"];

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if p.is_dir() {
            if name != "target" && !name.starts_with('.') {
                files(&p, out);
            }
        } else {
            out.push(p);
        }
    }
}

#[test]
fn no_datastore_is_named_outside_its_description() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    // The controller's own state store may be a PostgreSQL server: that is the store's dialect
    // (one file, its migrations and the driver's feature), not a tenant's datastore.
    let allowed = [
        root.join("proto/src/datastore.rs"),
        root.join("proto/tests/datastore_terms.rs"),
        root.join("controller/src/store/dialect.rs"),
        root.join("controller/Cargo.toml"),
    ];
    let mut all = vec![];
    for d in ["agent", "controller", "proto"] {
        files(&root.join(d), &mut all);
    }
    assert!(
        all.len() > 20,
        "the tree was not found under {}",
        root.display()
    );
    let mut hits = vec![];
    // The description: the type, and the configuration rules bundled with it.
    let described = |f: &PathBuf| {
        allowed.contains(f)
            || f.starts_with(root.join("proto/rules"))
            || f.starts_with(root.join("controller/migrations/postgres"))
    };
    for f in all.iter().filter(|f| !described(f)) {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            let lower = line.to_lowercase();
            if let Some(t) = TERMS.iter().find(|t| lower.contains(*t)) {
                hits.push(format!(
                    "{}:{}: '{t}': {}",
                    f.strip_prefix(root).unwrap().display(),
                    n + 1,
                    line.trim()
                ));
            }
        }
    }
    assert!(
        hits.is_empty(),
        "datastore terms outside proto/src/datastore.rs (describe the datastore there, or \
         move the code into strategies/):\n{}",
        hits.join("\n")
    );
}

#[test]
fn the_controller_links_no_datastore_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let manifest = std::fs::read_to_string(root.join("controller/Cargo.toml")).unwrap();
    assert!(
        !manifest.contains("coffer-strategies"),
        "the controller depends on coffer-strategies: what it needs of a datastore belongs in \
         coffer_proto::Datastore, what it shares with agents in coffer-common"
    );
}
