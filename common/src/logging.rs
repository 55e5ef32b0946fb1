//! The processes' own log (stderr): human-readable lines, or one JSON object a line when
//! `COFFER_LOG_FORMAT=json` (for a log collector). Either way each line carries the fields of
//! the spans it is in: an agent's `intent{intent_id, kind}`, the controller's `instance`,
//! `workflow`, `intent_id` fields. `RUST_LOG` filters, as usual.

/// Installs the process's log; `default_filter` applies when `RUST_LOG` is unset.
pub fn init(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let json = std::env::var("COFFER_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let base = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        base.json()
            .with_current_span(true)
            .with_span_list(true)
            .flatten_event(true)
            .init();
    } else {
        base.init();
    }
}
