//! Prometheus metrics of a replica (text exposition format), served on `/metrics`.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

type Labels = Vec<(String, String)>;

/// Every metric a replica publishes.
pub struct Metrics {
    registry: Registry,
    pub height: Gauge,
    pub round: Gauge,
    pub view_changes: Counter,
    pub quorum_certificates: Counter,
    pub timeout_certificates: Counter,
    pub blocks_committed: Counter,
    pub transactions_executed: Counter,
    pub duplicate_transactions: Counter,
    pub batch_transactions: Counter,
    pub mempool_depth: Gauge,
    pub evidence: Counter,
    pub digest_mismatches: Counter,
    pub storage_bytes: Gauge,
    /// Messages that failed verification or were refused by the protocol, by reason.
    pub refused_messages: Family<Labels, Counter>,
    /// Client requests refused, by reason.
    pub refused_requests: Family<Labels, Counter>,
    /// Replica transport events (refused frames and connections, drops), by kind.
    pub network: Family<Labels, Counter>,
    /// Client endpoint events (refused frames and connections, dropped replies), by kind.
    pub client_network: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("bulwark");
        let m = Metrics {
            height: Gauge::default(),
            round: Gauge::default(),
            view_changes: Counter::default(),
            quorum_certificates: Counter::default(),
            timeout_certificates: Counter::default(),
            blocks_committed: Counter::default(),
            transactions_executed: Counter::default(),
            duplicate_transactions: Counter::default(),
            batch_transactions: Counter::default(),
            mempool_depth: Gauge::default(),
            evidence: Counter::default(),
            digest_mismatches: Counter::default(),
            storage_bytes: Gauge::default(),
            refused_messages: Family::default(),
            refused_requests: Family::default(),
            network: Family::default(),
            client_network: Family::default(),
            registry: Registry::default(),
        };
        registry.register("height", "Highest executed height", m.height.clone());
        registry.register("round", "Current protocol round", m.round.clone());
        registry.register("view_changes", "Rounds entered by timeout certificate", m.view_changes.clone());
        registry.register("quorum_certificates", "QCs formed by this replica", m.quorum_certificates.clone());
        registry.register(
            "timeout_certificates",
            "TCs formed by this replica",
            m.timeout_certificates.clone(),
        );
        registry.register("blocks_committed", "Blocks committed", m.blocks_committed.clone());
        registry.register("transactions_executed", "Transactions executed", m.transactions_executed.clone());
        registry.register(
            "duplicate_transactions",
            "Ordered transactions skipped as already executed",
            m.duplicate_transactions.clone(),
        );
        registry.register(
            "batch_transactions",
            "Transactions in proposed batches",
            m.batch_transactions.clone(),
        );
        registry.register("mempool_depth", "Pending transactions", m.mempool_depth.clone());
        registry.register("evidence", "Misbehaviour evidence recorded", m.evidence.clone());
        registry.register(
            "digest_mismatches",
            "Execution state digest mismatches",
            m.digest_mismatches.clone(),
        );
        registry.register("storage_bytes", "Bytes in RocksDB SST files", m.storage_bytes.clone());
        registry.register(
            "refused_messages",
            "Replica messages refused, by reason",
            m.refused_messages.clone(),
        );
        registry.register(
            "refused_requests",
            "Client requests refused, by reason",
            m.refused_requests.clone(),
        );
        registry.register("network", "Replica transport events, by kind", m.network.clone());
        registry.register("client_network", "Client endpoint events, by kind", m.client_network.clone());
        Metrics { registry, ..m }
    }
}

pub fn label(key: &str, value: &str) -> Labels {
    vec![(key.to_string(), value.to_string())]
}

impl Metrics {
    /// Brings a family of counters up to externally kept totals (the transport's).
    pub fn sync_counters(family: &Family<Labels, Counter>, key: &str, totals: &[(&'static str, u64)]) {
        for (name, total) in totals {
            let counter = family.get_or_create(&label(key, name));
            let current = counter.get();
            if *total > current {
                counter.inc_by(total - current);
            }
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped. `refresh` runs before
/// each scrape (to pull in counters kept elsewhere).
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, refresh: Arc<dyn Fn() + Send + Sync>) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else { continue };
        let metrics = metrics.clone();
        let refresh = refresh.clone();
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let n = match tokio::time::timeout(std::time::Duration::from_secs(5), socket.read(&mut request))
                .await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let head = String::from_utf8_lossy(&request[..n]);
            let response = if head.starts_with("GET /metrics") {
                refresh();
                let body = metrics.render();
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string()
            };
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}
