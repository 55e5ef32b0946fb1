//! The controller's layers import in one direction (ARCHITECTURE.md, "the direction"):
//! `api/` → `workflow/` → `ops/` → `agents.rs`, `objects.rs`, `store/`. A file names a layer by
//! its module path (`crate::api`, `super::super::workflow`, ...); comments are not imports.

use std::path::Path;

fn code_of(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn rs_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(rs_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

#[test]
fn nothing_imports_a_layer_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    // (files, the layers above them they must not name)
    let rules: &[(&str, &[&str])] = &[
        (
            "store",
            &["crate::api", "crate::workflow", "crate::ops", "crate::bus"],
        ),
        ("ops", &["crate::api", "crate::workflow", "crate::bus"]),
        ("workflow", &["crate::api", "crate::bus"]),
        (
            "agents.rs",
            &["crate::api", "crate::workflow", "crate::ops"],
        ),
        (
            "objects.rs",
            &["crate::api", "crate::workflow", "crate::ops"],
        ),
        ("bus.rs", &["crate::api"]),
        ("main.rs", &["coffer_controller::api"]),
    ];
    let mut hits = vec![];
    for (place, above) in rules {
        let path = src.join(place);
        let files = if path.is_dir() {
            rs_files(&path)
        } else {
            vec![path]
        };
        assert!(!files.is_empty(), "{place} not found");
        for f in files {
            let code = code_of(&f);
            for a in *above {
                if code.contains(a) {
                    hits.push(format!("{} names {a}", f.display()));
                }
            }
        }
    }
    assert!(
        hits.is_empty(),
        "imports against the layering:\n{}",
        hits.join("\n")
    );
}

#[test]
fn sql_runs_only_in_the_store() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut hits = vec![];
    for f in rs_files(&src) {
        if f.starts_with(src.join("store")) {
            continue;
        }
        let code = code_of(&f);
        for needle in ["sqlx::query", ".pool", "query_scalar("] {
            if code.contains(needle) {
                hits.push(format!("{} uses {needle}", f.display()));
            }
        }
    }
    assert!(hits.is_empty(), "SQL outside store/:\n{}", hits.join("\n"));
}
