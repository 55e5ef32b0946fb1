//! The control plane's own counters and histograms, kept in memory by each controller process
//! (as Prometheus expects of a process it scrapes: sum them over the controllers): API requests
//! by route and status, intents by kind and outcome with their latency, workflow steps, and the bytes and seconds of backups (their rate is the throughput).
//! Labels are bounded: routes are templates, never an id.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IntentLabels {
    pub kind: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub workflow: String,
    pub step: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latencies from 5 ms to about 11 min.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 18))
}

pub struct Telemetry {
    requests: Family<RequestLabels, Counter>,
    request_seconds: Histograms<RouteLabels>,
    intents: Family<IntentLabels, Counter>,
    intent_seconds: Histograms<KindLabels>,
    workflow_steps: Family<StepLabels, Counter>,
    backup_bytes: Counter,
    backup_seconds: Counter<f64, AtomicU64>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(seconds_histogram),
            intents: Family::default(),
            intent_seconds: Family::new_with_constructor(seconds_histogram),
            workflow_steps: Family::default(),
            backup_bytes: Counter::default(),
            backup_seconds: Counter::default(),
        }
    }
}

impl Telemetry {
    /// An API request answered: its route template (`unmatched` for none), method and status.
    pub fn request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let (method, route) = (method.to_string(), route.to_string());
        self.requests
            .get_or_create(&RequestLabels {
                method: method.clone(),
                route: route.clone(),
                status,
            })
            .inc();
        self.request_seconds
            .get_or_create(&RouteLabels { method, route })
            .observe(seconds);
    }

    /// An intent's outcome (`done` or `failed`), and how long its agent took from accepting it
    /// (None: not reported, as by an agent of an earlier version).
    pub fn intent(&self, kind: &str, outcome: &str, seconds: Option<f64>) {
        self.intents
            .get_or_create(&IntentLabels {
                kind: kind.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        if let Some(s) = seconds {
            self.intent_seconds
                .get_or_create(&KindLabels {
                    kind: kind.to_string(),
                })
                .observe(s);
        }
    }

    /// A workflow step carried out (by this controller).
    pub fn workflow_step(&self, workflow: &str, step: &str) {
        self.workflow_steps
            .get_or_create(&StepLabels {
                workflow: workflow.to_string(),
                step: step.to_string(),
            })
            .inc();
    }

    /// A backup completed: its stored bytes and the seconds its agent took.
    pub fn backup(&self, bytes: u64, seconds: f64) {
        self.backup_bytes.inc_by(bytes);
        self.backup_seconds.inc_by(seconds);
    }

    /// Adds the control plane's series to `reg` (the families are shared, not copied).
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "api_requests",
            "API requests answered, by route template, method and status",
            self.requests.clone(),
        );
        reg.register_with_unit(
            "api_request_duration",
            "How long API requests took to answer, by route template and method",
            Unit::Seconds,
            self.request_seconds.clone(),
        );
        reg.register(
            "intents",
            "Intents whose outcome reached this controller, by kind and outcome (done, failed)",
            self.intents.clone(),
        );
        reg.register_with_unit(
            "intent_duration",
            "How long agents took to carry out intents, from accepting one to its outcome, by kind",
            Unit::Seconds,
            self.intent_seconds.clone(),
        );
        reg.register(
            "workflow_steps",
            "Workflow steps this controller carried out, by workflow and step",
            self.workflow_steps.clone(),
        );
        reg.register_with_unit(
            "backup_stored",
            "Bytes of completed backups (rate over backup_duration_seconds_total: throughput)",
            Unit::Bytes,
            self.backup_bytes.clone(),
        );
        reg.register_with_unit(
            "backup_duration",
            "Seconds agents spent taking completed backups",
            Unit::Seconds,
            self.backup_seconds.clone(),
        );
    }
}

tokio::task_local! {
    /// The W3C traceparent of the API request being answered.
    static TRACE: String;
}

/// The traceparent of the request this task answers (empty outside one).
pub fn trace_parent() -> String {
    TRACE.try_with(|t| t.clone()).unwrap_or_default()
}

pub use coffer_proto::trace_id;

/// This request's traceparent: the caller's trace (a `traceparent` header) with a span of our
/// own, or a new trace.
pub fn request_trace(header: Option<&str>) -> String {
    let span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    let trace = header
        .and_then(trace_id)
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    format!("00-{trace}-{span}-01")
}

/// Runs `f` as the answer to a request of trace `tp`.
pub async fn in_trace<F: std::future::Future>(tp: String, f: F) -> F::Output {
    TRACE.scope(tp, f).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_traceparent_is_taken_only_when_well_formed() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            super::trace_id(tp),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let ours = super::request_trace(Some(tp));
        assert!(ours.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert_ne!(ours, tp, "a span of our own");
        for bad in [
            "",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\nforged",
            "00-4bf92f35-00f067aa0ba902b7-01",
        ] {
            assert_eq!(super::trace_id(bad), None, "{bad:?}");
            let fresh = super::request_trace(Some(bad));
            assert!(super::trace_id(&fresh).is_some(), "{fresh}");
        }
    }
}
