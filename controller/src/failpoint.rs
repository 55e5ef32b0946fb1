//! A test hook: `COFFER_TEST_FAILPOINT=<kind>:<step>` aborts the controller at that point of an
//! operation, right after the step acted and before its result is written (the worst moment to
//! die). Tests use it to prove each operation completes or rolls back when a new controller
//! starts. Unset, it costs one comparison.

/// Aborts the process when the failpoint `kind:step` is set.
pub fn hit(kind: &str, step: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| std::env::var("COFFER_TEST_FAILPOINT").ok());
    if at.as_deref() == Some(&format!("{kind}:{step}")) {
        tracing::warn!(kind, step, "failpoint reached: aborting");
        std::process::abort();
    }
}
