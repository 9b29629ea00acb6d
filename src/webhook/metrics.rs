//! Prometheus metrics, served as text on `/metrics`.

use std::sync::atomic::AtomicI64;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub kind: String,
    pub operation: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EffectLabels {
    pub kind: String,
    pub effect: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<KindLabels, Histogram>,
    pub effects: Family<EffectLabels, Counter>,
    pub certificate_reloads: Family<ResultLabels, Counter>,
    pub certificate_not_after: Gauge<i64, AtomicI64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kips");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "admission_requests",
            "Admission reviews by object kind, operation and outcome (allowed, patched, denied, error)",
            requests.clone(),
        );
        // 50 µs to ~1.6 s: admission answers in microseconds; the tail shows trouble.
        let duration = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.00005, 2.0, 16,
            ))
        });
        registry.register_with_unit(
            "admission_duration",
            "Time from a complete request body to its response",
            prometheus_client::registry::Unit::Seconds,
            duration.clone(),
        );
        let effects = Family::<EffectLabels, Counter>::default();
        registry.register(
            "admission_effects",
            "What admission did: injected, skipped (kips pod let through uninjected), redirect_on/off/changed (workloads)",
            effects.clone(),
        );
        let certificate_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "certificate_reloads",
            "Serving certificate loads by result (loaded, rejected)",
            certificate_reloads.clone(),
        );
        let certificate_not_after = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "certificate_not_after_timestamp_seconds",
            "Expiry of the serving certificate in use, as a Unix timestamp",
            certificate_not_after.clone(),
        );
        let build_info = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register("build_info", "kips version", build_info.clone());
        build_info
            .get_or_create(&vec![(
                "version".to_owned(),
                crate::inject::VERSION.to_owned(),
            )])
            .set(1);
        Self {
            registry,
            requests,
            duration,
            effects,
            certificate_reloads,
            certificate_not_after,
        }
    }

    pub fn observe_review(
        &self,
        kind: &str,
        operation: &str,
        outcome: &'static str,
        effect: &'static str,
        elapsed: Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                kind: kind.to_owned(),
                operation: operation.to_owned(),
                outcome,
            })
            .inc();
        self.duration
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
        if effect != "unchanged" {
            self.effects
                .get_or_create(&EffectLabels {
                    kind: kind.to_owned(),
                    effect,
                })
                .inc();
        }
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

impl crate::tls::CertObserver for Metrics {
    fn serving(&self, not_after: Option<SystemTime>) {
        if let Some(expiry) = not_after {
            let seconds = expiry
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.certificate_not_after
                .set(i64::try_from(seconds).unwrap_or(i64::MAX));
        }
    }

    fn reloaded(&self) {
        self.certificate_reloads
            .get_or_create(&ResultLabels { result: "loaded" })
            .inc();
    }

    fn rejected(&self) {
        self.certificate_reloads
            .get_or_create(&ResultLabels { result: "rejected" })
            .inc();
    }
}
