//! Prometheus metrics of a replica (text exposition format), served on `/metrics`.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

type Labels = Vec<(String, String)>;

/// Every metric a replica publishes.
pub struct Metrics {
    registry: Registry,
    pub height: Gauge,
    pub round: Gauge,
    /// The leader of the current round.
    pub leader: Gauge,
    /// Peers whose connection from this replica is up.
    pub peers_connected: Gauge,
    /// Messages waiting in each peer's send queue.
    pub peer_queue_depth: Family<Labels, Gauge>,
    /// Messages to each peer dropped because its send queue was full.
    pub peer_queue_dropped: Family<Labels, Counter>,
    pub view_changes: Counter,
    pub quorum_certificates: Counter,
    pub timeout_certificates: Counter,
    pub blocks_committed: Counter,
    pub transactions_executed: Counter,
    pub duplicate_transactions: Counter,
    pub batch_transactions: Counter,
    pub mempool_depth: Gauge,
    /// Batches available and not executed.
    pub pending_batches: Gauge,
    /// Replica messages held until the batches they name arrive.
    pub held_messages: Gauge,
    /// Batch events (sealed, received, fetched, served, refused ...), by event.
    pub batches: Family<Labels, Counter>,
    /// Snapshot events (written, skipped_busy, failed), by event.
    pub snapshots: Family<Labels, Counter>,
    pub evidence: Counter,
    /// Evidence recorded, by offender and kind.
    pub evidence_against: Family<Labels, Counter>,
    /// 1, labelled with the behaviours, when this replica runs a Byzantine wrapper (test
    /// deployments only); absent on honest replicas.
    pub byzantine: Family<Labels, Gauge>,
    pub digest_mismatches: Counter,
    pub storage_bytes: Gauge,
    /// Seconds a protocol step's synced write took (the floor under every vote).
    pub persist_seconds: Histogram,
    /// RocksDB's memory by kind (memtables, table readers, block cache).
    pub storage_memory: Family<Labels, Gauge>,
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
            leader: Gauge::default(),
            peers_connected: Gauge::default(),
            peer_queue_depth: Family::default(),
            peer_queue_dropped: Family::default(),
            view_changes: Counter::default(),
            quorum_certificates: Counter::default(),
            timeout_certificates: Counter::default(),
            blocks_committed: Counter::default(),
            transactions_executed: Counter::default(),
            duplicate_transactions: Counter::default(),
            batch_transactions: Counter::default(),
            mempool_depth: Gauge::default(),
            pending_batches: Gauge::default(),
            held_messages: Gauge::default(),
            batches: Family::default(),
            snapshots: Family::default(),
            evidence: Counter::default(),
            evidence_against: Family::default(),
            byzantine: Family::default(),
            digest_mismatches: Counter::default(),
            storage_bytes: Gauge::default(),
            // 0.5 ms .. ~1 s.
            persist_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 12)),
            storage_memory: Family::default(),
            refused_messages: Family::default(),
            refused_requests: Family::default(),
            network: Family::default(),
            client_network: Family::default(),
            registry: Registry::default(),
        };
        registry.register("height", "Highest executed height", m.height.clone());
        registry.register("round", "Current protocol round", m.round.clone());
        registry.register("leader", "Leader of the current round", m.leader.clone());
        registry.register("peers_connected", "Peers this replica is connected to", m.peers_connected.clone());
        registry.register(
            "peer_queue_depth",
            "Messages in each peer's send queue",
            m.peer_queue_depth.clone(),
        );
        registry.register(
            "peer_queue_dropped",
            "Messages to each peer dropped on a full send queue",
            m.peer_queue_dropped.clone(),
        );
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
            "Transactions sealed into this replica's batches",
            m.batch_transactions.clone(),
        );
        registry.register(
            "mempool_depth",
            "This replica's pending client transactions",
            m.mempool_depth.clone(),
        );
        registry.register("pending_batches", "Batches available and not executed", m.pending_batches.clone());
        registry.register(
            "held_messages",
            "Replica messages held until the batches they name arrive",
            m.held_messages.clone(),
        );
        registry.register("batches", "Batch events, by event", m.batches.clone());
        registry.register("snapshots", "Application snapshot events, by event", m.snapshots.clone());
        registry.register("evidence", "Misbehaviour evidence recorded", m.evidence.clone());
        registry.register(
            "evidence_against",
            "Misbehaviour evidence recorded, by offender and kind",
            m.evidence_against.clone(),
        );
        registry.register(
            "byzantine_test_behaviour",
            "1 when this replica deliberately misbehaves (test deployments only), by behaviours",
            m.byzantine.clone(),
        );
        registry.register(
            "digest_mismatches",
            "Execution state digest mismatches",
            m.digest_mismatches.clone(),
        );
        registry.register(
            "storage_bytes",
            "Bytes in RocksDB SST and blob files and the batch log",
            m.storage_bytes.clone(),
        );
        registry.register(
            "persist_seconds",
            "Duration of a protocol step's synced writes (batch log, then RocksDB)",
            m.persist_seconds.clone(),
        );
        registry.register(
            "storage_memory_bytes",
            "Bytes RocksDB holds in memory, by kind",
            m.storage_memory.clone(),
        );
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

/// What the HTTP endpoint serves: Prometheus metrics, and the replica's status as JSON.
#[derive(Clone)]
pub struct Endpoints {
    pub metrics: Arc<Metrics>,
    /// Runs before each scrape (to pull in counters kept elsewhere).
    pub refresh: Arc<dyn Fn() + Send + Sync>,
    /// The body of `GET /status` (JSON).
    pub status: Arc<dyn Fn() -> String + Send + Sync>,
}

/// Serves `GET /metrics` (Prometheus text format) and `GET /status` (JSON, see
/// [`crate::status::StatusReport`]) on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, endpoints: Endpoints) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else { continue };
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let n = match tokio::time::timeout(std::time::Duration::from_secs(5), socket.read(&mut request))
                .await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let head = String::from_utf8_lossy(&request[..n]);
            let ok = |content_type: &str, body: String| {
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
            };
            let response = if head.starts_with("GET /metrics") {
                (endpoints.refresh)();
                ok("application/openmetrics-text; version=1.0.0; charset=utf-8", endpoints.metrics.render())
            } else if head.starts_with("GET /status") {
                ok("application/json", (endpoints.status)())
            } else {
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string()
            };
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}
