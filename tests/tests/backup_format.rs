//! The backup format's spec and its test vector are read by an independent implementation
//! (Python's `cryptography`), so the text in docs/backup-format.md is checked, not just the code.

#[test]
fn the_spec_decrypts_its_own_test_vector_independently() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let python = std::env::var("COFFER_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/.cache/coffer/venv/bin/python",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let out = std::process::Command::new(python)
        .arg(root.join("tests/py/backup_format_vector.py"))
        .arg(root.join("docs/backup-format.md"))
        .output()
        .expect("python with cryptography (cargo xtask test installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = std::fs::read_to_string(root.join("docs/backup-format.md")).unwrap();
    let fields: Vec<&str> = stdout.trim().rsplitn(3, ' ').collect();
    let (boundary, sha, plain) = (fields[0], fields[1], fields[2]);
    assert_eq!(plain, "coffer backup format v1 test vector: 3 frames!!!");
    assert!(doc.contains(sha), "the documented SHA-256 matches");
    assert!(
        doc.contains(&format!("offset {boundary}")),
        "the documented frame boundary matches"
    );
}
