//! The bridge's Prometheus metrics (on the health port's `/metrics`).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Which side of the relay a binding is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Side {
    /// `-L`: local sockets, the relay's sender.
    Local,
    /// `-T`: the relay's listener, connecting to targets.
    Remote,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Local => "local",
            Side::Remote => "remote",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct BindingLabels {
    pub relay: String,
    pub binding: String,
    pub side: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct BytesLabels {
    pub relay: String,
    pub binding: String,
    pub side: &'static str,
    /// `to_relay` or `from_relay`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct FailureLabels {
    pub relay: String,
    pub binding: String,
    pub side: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RelayLabels {
    pub relay: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ListenerLabels {
    pub relay: String,
    /// The `-T` expression's position on the command line (several may name one relay).
    pub listener: String,
}

pub(crate) struct BridgeMetrics {
    registry: Registry,
    pub connections: Family<BindingLabels, Counter>,
    pub active: Family<BindingLabels, Gauge<i64, AtomicI64>>,
    pub bytes: Family<BytesLabels, Counter>,
    pub datagrams: Family<BytesLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub listener_present: Family<BindingLabels, Gauge<i64, AtomicI64>>,
    pub listener_checked: Family<BindingLabels, Gauge<i64, AtomicI64>>,
    pub listener_online: Family<ListenerLabels, Gauge<i64, AtomicI64>>,
    pub credentials_accepted: Family<RelayLabels, Gauge<i64, AtomicI64>>,
}

/// One binding's handles, cloned into every connection of it.
#[derive(Clone)]
pub(crate) struct BindingMetrics {
    pub connections: Counter,
    pub active: Gauge<i64, AtomicI64>,
    pub to_relay: Counter,
    pub from_relay: Counter,
    pub datagrams_to_relay: Counter,
    pub datagrams_from_relay: Counter,
    pub listener_present: Gauge<i64, AtomicI64>,
    /// Unix time (seconds) of the last connect that told whether a listener was there.
    pub listener_checked: Gauge<i64, AtomicI64>,
    failures: Family<FailureLabels, Counter>,
    labels: BindingLabels,
}

/// Connections open now across every binding of the process, and whether that number has
/// come back to zero since [`idle_again`] last said so.
static OPEN: AtomicI64 = AtomicI64::new(0);
static BACK_TO_ZERO: AtomicBool = AtomicBool::new(false);

/// True once after the last open connection closed (and none is open now): the moment to hand
/// the memory the connections used back to the system.
pub(crate) fn idle_again() -> bool {
    idle() && BACK_TO_ZERO.swap(false, Ordering::AcqRel)
}

/// No connection is open now.
pub(crate) fn idle() -> bool {
    OPEN.load(Ordering::Acquire) == 0
}

impl BindingMetrics {
    /// A connection of this binding opened: `active` and the process-wide count.
    pub fn opened(&self) {
        self.active.inc();
        OPEN.fetch_add(1, Ordering::AcqRel);
    }

    pub fn closed(&self) {
        self.active.dec();
        if OPEN.fetch_sub(1, Ordering::AcqRel) == 1 {
            BACK_TO_ZERO.store(true, Ordering::Release);
        }
    }

    /// What the last connect found: a listener (`true`) or the relay's "no listener".
    pub fn listener_found(&self, present: bool) {
        self.listener_present.set(i64::from(present));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.listener_checked.set(now);
    }

    pub fn failure(&self, reason: &'static str) {
        self.failures
            .get_or_create(&FailureLabels {
                relay: self.labels.relay.clone(),
                binding: self.labels.binding.clone(),
                side: self.labels.side,
                reason,
            })
            .inc();
    }
}

impl BridgeMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kips_bridge");
        let connections = Family::<BindingLabels, Counter>::default();
        registry.register(
            "connections",
            "Connections carried through the relay (TCP connections, or UDP routes), by relay, binding and side",
            connections.clone(),
        );
        let active = Family::<BindingLabels, Gauge<i64, AtomicI64>>::default();
        registry.register("active_connections", "Connections open now", active.clone());
        let bytes = Family::<BytesLabels, Counter>::default();
        registry.register_with_unit(
            "payload",
            "Payload bytes carried, by direction (to_relay, from_relay)",
            prometheus_client::registry::Unit::Bytes,
            bytes.clone(),
        );
        let datagrams = Family::<BytesLabels, Counter>::default();
        registry.register(
            "datagrams",
            "UDP datagrams carried, by direction",
            datagrams.clone(),
        );
        let failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "failures",
            "Connections that failed, by reason (no_listener, unauthorized, unknown_hybrid_connection, transport, unknown_port_name, target_unreachable, …)",
            failures.clone(),
        );
        let listener_present = Family::<BindingLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "listener_present",
            "1 if the last connect of this -L binding found a listener on the relay, 0 if it found none",
            listener_present.clone(),
        );
        let listener_checked = Family::<BindingLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "listener_checked_timestamp_seconds",
            "Unix time of the last connect of this -L binding that told whether a listener was present (0: none yet)",
            listener_checked.clone(),
        );
        let listener_online = Family::<ListenerLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "listener_online",
            "1 while this -T listener's control channel is connected to the relay",
            listener_online.clone(),
        );
        let credentials_accepted = Family::<RelayLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "credentials_accepted",
            "1 once the relay has accepted the credentials for this hybrid connection",
            credentials_accepted.clone(),
        );
        BridgeMetrics {
            registry,
            connections,
            active,
            bytes,
            datagrams,
            failures,
            listener_present,
            listener_checked,
            listener_online,
            credentials_accepted,
        }
    }

    pub fn binding(&self, relay: &str, binding: &str, side: Side) -> BindingMetrics {
        let labels = BindingLabels {
            relay: relay.to_owned(),
            binding: binding.to_owned(),
            side: side.label(),
        };
        let bytes = |direction| BytesLabels {
            relay: relay.to_owned(),
            binding: binding.to_owned(),
            side: side.label(),
            direction,
        };
        // One statement per family lookup: a lookup's guard lives to the end of its
        // statement, and a second lookup in the same family would wait for it forever.
        let connections = self.connections.get_or_create(&labels).clone();
        let active = self.active.get_or_create(&labels).clone();
        let to_relay = self.bytes.get_or_create(&bytes("to_relay")).clone();
        let from_relay = self.bytes.get_or_create(&bytes("from_relay")).clone();
        let datagrams_to_relay = self.datagrams.get_or_create(&bytes("to_relay")).clone();
        let datagrams_from_relay = self.datagrams.get_or_create(&bytes("from_relay")).clone();
        let listener_present = self.listener_present.get_or_create(&labels).clone();
        let listener_checked = self.listener_checked.get_or_create(&labels).clone();
        BindingMetrics {
            connections,
            active,
            to_relay,
            from_relay,
            datagrams_to_relay,
            datagrams_from_relay,
            listener_present,
            listener_checked,
            failures: self.failures.clone(),
            labels,
        }
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_get_their_series_and_the_text_names_them() {
        let metrics = BridgeMetrics::new();
        let first = metrics.binding("api", "http", Side::Local);
        let again = metrics.binding("api", "http", Side::Local);
        first.to_relay.inc_by(5);
        again.listener_found(true);
        first.failure("no_listener");
        let text = metrics.encode();
        assert!(text.contains(r#"kips_bridge_payload_bytes_total{relay="api",binding="http",side="local",direction="to_relay"} 5"#), "{text}");
        assert!(
            text.contains(
                r#"kips_bridge_listener_present{relay="api",binding="http",side="local"} 1"#
            ),
            "{text}"
        );
        let checked = text
            .lines()
            .find_map(|l| l.strip_prefix(r#"kips_bridge_listener_checked_timestamp_seconds{relay="api",binding="http",side="local"} "#))
            .and_then(|v| v.parse::<i64>().ok());
        assert!(checked.is_some_and(|t| t > 1_700_000_000), "{text}");
        assert!(text.contains(r#"kips_bridge_failures_total{relay="api",binding="http",side="local",reason="no_listener"} 1"#), "{text}");
    }
}
