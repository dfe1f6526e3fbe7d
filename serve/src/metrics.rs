//! `GET /metrics`: Prometheus text (prometheus-client) — requests by endpoint and status, request
//! latency, rows and batches per model, batch sizes, requests refused because a queue was full.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// The server's metrics (cheap to clone: shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
    rows: Family<Labels, Counter>,
    batches: Family<Labels, Counter>,
    batch_rows: Family<Labels, Histogram>,
    queue_full: Counter,
    model_loads: Counter,
    models_held: Gauge,
    connections: Gauge,
    connections_refused: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ddm");
        let requests = Family::<Labels, Counter>::default();
        let latency = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 18)) // 0.5 ms .. ~65 s
        });
        let rows = Family::<Labels, Counter>::default();
        let batches = Family::<Labels, Counter>::default();
        let batch_rows = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(1.0, 2.0, 14)) // 1 .. 8192 rows
        });
        let queue_full = Counter::default();
        registry.register(
            "requests",
            "HTTP requests by endpoint and status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to its answer",
            latency.clone(),
        );
        registry.register("rows", "Rows computed, by model", rows.clone());
        registry.register(
            "batches",
            "Forwards run (coalesced batches), by model",
            batches.clone(),
        );
        registry.register("batch_rows", "Rows per forward, by model", batch_rows.clone());
        registry.register(
            "queue_full",
            "Requests refused with 503 because a model's queue was full",
            queue_full.clone(),
        );
        let model_loads = Counter::default();
        let models_held = Gauge::default();
        registry.register(
            "model_loads",
            "Models loaded, again after an unload under --max-memory",
            model_loads.clone(),
        );
        registry.register(
            "models_held",
            "Models in memory now (under --max-memory)",
            models_held.clone(),
        );
        let connections = Gauge::default();
        let connections_refused = Counter::default();
        registry.register("connections", "Client connections held now", connections.clone());
        registry.register(
            "connections_refused",
            "Connections answered 503 and closed because --max-connections were held",
            connections_refused.clone(),
        );
        Self {
            connections,
            connections_refused,
            model_loads,
            models_held,
            registry: Arc::new(Mutex::new(registry)),
            requests,
            latency,
            rows,
            batches,
            batch_rows,
            queue_full,
        }
    }

    pub fn request(&self, endpoint: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&vec![
                ("endpoint".into(), endpoint.into()),
                ("status".into(), status.to_string()),
            ])
            .inc();
        self.latency
            .get_or_create(&vec![("endpoint".into(), endpoint.into())])
            .observe(seconds);
    }

    pub fn batch(&self, model: &str, rows: usize) {
        let l = vec![("model".into(), model.into())];
        self.rows.get_or_create(&l).inc_by(rows as u64);
        self.batches.get_or_create(&l).inc();
        self.batch_rows.get_or_create(&l).observe(rows as f64);
    }

    pub fn model_loaded(&self, held: usize) {
        self.model_loads.inc();
        self.models_held.set(held as i64);
    }

    pub fn model_unloaded(&self, held: usize) {
        self.models_held.set(held as i64);
    }

    pub fn connection_opened(&self) {
        self.connections.inc();
    }

    pub fn connection_closed(&self) {
        self.connections.dec();
    }

    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    pub fn queue_full(&self) {
        self.queue_full.inc();
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        encode(&mut s, &registry).expect("writing to a String cannot fail");
        s
    }
}
