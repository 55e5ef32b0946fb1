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

/// A test hook: `COFFER_TEST_STEP_DELAY_MS=<ms>` makes every workflow step wait that long before
/// it acts (a slow or loaded controller), so that tests can meet what happens between steps.
pub async fn slow_step() {
    static MS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let ms = *MS.get_or_init(|| {
        std::env::var("COFFER_TEST_STEP_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    });
    if ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}
