//! `bulwark bench`: a fixed-rate load generator against a committee, measuring committed
//! transactions per second and end-to-end latency (submit to f+1 matching replies).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bulwark_crypto::{Committee, ReplicaId};
use bulwark_network::NetworkConfig;
use serde::Serialize;

use crate::app::kv::KvOp;
use crate::client::Client;

/// What one benchmark run measured.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// The machine the run was on (CPU model, and the CPUs this process may use):
    /// numbers from different machines do not compare.
    pub cpu_model: String,
    pub cpus: usize,
    pub nodes: usize,
    pub tx_size: usize,
    pub offered_rate: u64,
    pub duration_s: f64,
    pub submitted: u64,
    pub committed: u64,
    pub rejected: u64,
    pub committed_tps: f64,
    pub latency_ms_mean: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p95: f64,
    pub latency_ms_p99: f64,
    /// CPU seconds each replica process used during the run, when known.
    pub cpu_seconds_per_node: Vec<f64>,
    /// CPU microseconds (all replicas together) per committed transaction.
    pub cpu_us_per_tx: Option<f64>,
    /// CPU seconds the load generator (this process) used.
    pub load_generator_cpu_seconds: f64,
    /// Bytes each replica's data directory grew by during the run (RocksDB's files,
    /// its logs included, and the batch log with its 4 KiB padding per synced step),
    /// when the directories are known. A fresh testnet's replicas may make theirs after
    /// the first reading: then its growth counts from empty.
    pub storage_bytes_per_node: Vec<u64>,
    /// Bytes stored per committed transaction, per replica (mean over the replicas).
    pub storage_bytes_per_tx: Option<f64>,
    /// View changes (rounds entered by a timeout certificate) each replica counted
    /// during the run, read from its status endpoint before and after; empty unless
    /// every replica's was reachable both times. All zero on a healthy network.
    pub view_changes_per_node: Vec<u64>,
    /// Per second of the run (by submit time): what committed and how long it took.
    /// Shows stalls (a snapshot, a view change) that the percentiles only hint at.
    pub timeline: Vec<Second>,
    /// Why load clients stopped early, if any did (each stopped client's error).
    pub client_errors: Vec<String>,
}

/// The transactions submitted in one second of a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Second {
    /// Seconds since the load started.
    pub t: u64,
    pub committed: u64,
    pub latency_ms_mean: f64,
    pub latency_ms_max: f64,
}

/// What [`run`] measured, before it is summarized.
pub struct Measured {
    pub submitted: u64,
    pub rejected: u64,
    /// Submit → f+1 replies, µs, one per committed transaction.
    pub latencies_us: Vec<u64>,
    pub duration_s: f64,
    pub timeline: Vec<Second>,
    pub client_errors: Vec<String>,
}

struct ClientLoad {
    submitted: u64,
    rejected: u64,
    latencies_us: Vec<u64>,
    /// Per second of submit time: (committed, latency sum µs, latency max µs).
    seconds: Vec<(u64, u64, u64)>,
    error: Option<String>,
}

/// The load a benchmark offers.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// Transactions per second, over all clients.
    pub rate: u64,
    /// Bytes per transaction (a KV put of about this size).
    pub tx_size: usize,
    pub duration: Duration,
    /// Pipelined clients sharing the load; client `c` sends to replica `c mod n` first.
    pub clients: usize,
    /// Distinct keys each client writes in turn (`None`: every put writes a new key, so
    /// the application's state grows with the run).
    pub keys: Option<u64>,
}

/// Drives `load` through pipelined clients; `tick` is called about once a second with
/// (elapsed, committed so far).
pub async fn run(
    committee: &Committee,
    endpoints: &[(ReplicaId, SocketAddr)],
    load: Load,
    tick: impl Fn(Duration, u64) + Send + Sync + 'static,
) -> anyhow::Result<Measured> {
    let Load { rate, tx_size, duration, clients, keys } = load;
    let clients = clients.max(1);
    let committed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    let started = Instant::now();
    for c in 0..clients {
        let mut client = Client::connect(committee, endpoints, None, NetworkConfig::default()).await?;
        client.timeout = Duration::from_secs(30);
        if !endpoints.is_empty() {
            client.set_home(endpoints[c % endpoints.len()].0);
        }
        let per_client = rate as f64 / clients as f64;
        let committed = committed.clone();
        tasks.push(tokio::spawn(async move {
            let mut load = ClientLoad {
                submitted: 0,
                rejected: 0,
                latencies_us: Vec::new(),
                seconds: Vec::new(),
                error: None,
            };
            let mut interval = tokio::time::interval(Duration::from_millis(5));
            let mut owed = 0.0;
            let end = started + duration;
            let mut counter = 0u64;
            // Load stops at `end`; the run then waits for what is outstanding, until the
            // drain time (replies lost to overload, dropped from a full reply queue, must
            // not keep it waiting longer).
            let finish = tokio::time::sleep_until(end.into());
            let drain = tokio::time::sleep_until((end + Duration::from_secs(5)).into());
            tokio::pin!(finish, drain);
            let mut ended = false;
            loop {
                if ended && client.outstanding() == 0 {
                    break;
                }
                tokio::select! {
                    _ = &mut drain => break,
                    _ = &mut finish, if !ended => ended = true,
                    _ = interval.tick(), if !ended => {
                        owed += per_client * 0.005;
                        while owed >= 1.0 {
                            owed -= 1.0;
                            counter += 1;
                            let key = format!("c{c}-{}", keys.map_or(counter, |k| counter % k.max(1))).into_bytes();
                            let value = vec![(counter % 251) as u8; tx_size.saturating_sub(key.len() + 8)];
                            let op = KvOp::Put { key, value }.encode();
                            // Backpressure (replicas not reading) must not outlast the run:
                            // the drain timer bounds a submit waiting on a full queue (a
                            // timer per submit cost the load generator a tenth of its CPU).
                            tokio::select! {
                                biased;
                                _ = client.submit(op) => {}
                                _ = &mut drain => break,
                            }
                            load.submitted += 1;
                        }
                    }
                    result = client.next_certified() => match result {
                        Ok(Ok(certified)) => {
                            // Submit → f + 1 matching replies, as the client measured it.
                            let latency = certified.latency.as_micros() as u64;
                            load.latencies_us.push(latency);
                            let second = certified.submitted.into_std().saturating_duration_since(started).as_secs() as usize;
                            if load.seconds.len() <= second {
                                load.seconds.resize(second + 1, (0, 0, 0));
                            }
                            let (n, sum, max) = &mut load.seconds[second];
                            *n += 1;
                            *sum += latency;
                            *max = (*max).max(latency);
                            committed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Ok(Err(_)) => load.rejected += 1,
                        Err(e) => {
                            load.error = Some(format!("client {c}: {e}"));
                            break;
                        }
                    },
                }
            }
            load
        }));
    }
    let progress = {
        let committed = committed.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                tick(started.elapsed(), committed.load(std::sync::atomic::Ordering::Relaxed));
            }
        })
    };
    let mut submitted = 0;
    let mut rejected = 0;
    let mut latencies = Vec::new();
    let mut seconds: Vec<(u64, u64, u64)> = Vec::new();
    let mut client_errors = Vec::new();
    for task in tasks {
        let load = task.await?;
        client_errors.extend(load.error);
        submitted += load.submitted;
        rejected += load.rejected;
        latencies.extend(load.latencies_us);
        if seconds.len() < load.seconds.len() {
            seconds.resize(load.seconds.len(), (0, 0, 0));
        }
        for (total, (n, sum, max)) in seconds.iter_mut().zip(load.seconds) {
            *total = (total.0 + n, total.1 + sum, total.2.max(max));
        }
    }
    progress.abort();
    let timeline = seconds
        .into_iter()
        .enumerate()
        .map(|(t, (n, sum, max))| Second {
            t: t as u64,
            committed: n,
            latency_ms_mean: if n == 0 { 0.0 } else { sum as f64 / n as f64 / 1000.0 },
            latency_ms_max: max as f64 / 1000.0,
        })
        .collect();
    Ok(Measured {
        submitted,
        rejected,
        latencies_us: latencies,
        duration_s: duration.as_secs_f64(),
        timeline,
        client_errors,
    })
}

/// Summarizes latencies (µs) into a report.
pub fn report(
    nodes: usize,
    tx_size: usize,
    rate: u64,
    measured: Measured,
    cpu_seconds_per_node: Vec<f64>,
    load_generator_cpu_seconds: f64,
    storage_bytes_per_node: Vec<u64>,
) -> BenchReport {
    let Measured { submitted, rejected, latencies_us: mut latencies, duration_s, timeline, client_errors } =
        measured;
    let committed = latencies.len() as u64;
    latencies.sort_unstable();
    let pick = |q: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 - 1.0) * q).round() as usize;
        latencies[i] as f64 / 1000.0
    };
    let mean = if latencies.is_empty() {
        0.0
    } else {
        latencies.iter().sum::<u64>() as f64 / latencies.len() as f64 / 1000.0
    };
    let cpu_total: f64 = cpu_seconds_per_node.iter().sum();
    let stored: u64 = storage_bytes_per_node.iter().sum();
    let storage_bytes_per_tx = (committed > 0 && !storage_bytes_per_node.is_empty())
        .then(|| stored as f64 / storage_bytes_per_node.len() as f64 / committed as f64);
    BenchReport {
        cpu_model: cpu_model(),
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        nodes,
        tx_size,
        offered_rate: rate,
        duration_s,
        submitted,
        committed,
        rejected,
        committed_tps: committed as f64 / duration_s,
        latency_ms_mean: mean,
        latency_ms_p50: pick(0.50),
        latency_ms_p95: pick(0.95),
        latency_ms_p99: pick(0.99),
        cpu_us_per_tx: (committed > 0 && cpu_total > 0.0).then(|| cpu_total * 1e6 / committed as f64),
        cpu_seconds_per_node,
        load_generator_cpu_seconds,
        storage_bytes_per_node,
        storage_bytes_per_tx,
        view_changes_per_node: Vec::new(),
        timeline,
        client_errors,
    }
}

/// Each replica's view-change count from its status endpoint (`(id, metrics
/// address)`); `None` unless every one answered.
pub fn view_changes(targets: &[(u16, Option<String>)]) -> Option<Vec<u64>> {
    if targets.is_empty() {
        return None;
    }
    crate::status::collect(targets).iter().map(|node| node.report.as_ref().map(|r| r.view_changes)).collect()
}

/// The CPU model Linux reports (empty where /proc/cpuinfo does not say).
fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|line| {
            line.strip_prefix("model name")?.split_once(':').map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_default()
}

/// Bytes in the files under `dir` (their lengths; 0 for what cannot be read).
pub fn directory_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| Some((entry.path(), entry.metadata().ok()?)))
        .map(|(path, meta)| if meta.is_dir() { directory_bytes(&path) } else { meta.len() })
        .sum()
}

/// CPU seconds (user + system) a process has used, from /proc.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}
