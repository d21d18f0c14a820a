//! A replica's status as `GET /status` serves it (JSON), how `bulwark status` and the
//! testnet's live view fetch it, and the table they print.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::time::Duration;

use bulwark_crypto::ReplicaId;
use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;
use crate::replica::Status;

/// One replica's view of itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub id: u16,
    pub round: u64,
    /// The leader of `round`.
    pub leader: Option<u16>,
    /// Highest executed height.
    pub height: u64,
    /// State digest after `height`, hex.
    pub state_digest: String,
    /// Peers this replica's outbound connection to is up, of `peers`.
    pub peers_connected: usize,
    pub peers: usize,
    /// Misbehaviour evidence recorded, in total and by offender.
    pub evidence: u64,
    pub evidence_against: BTreeMap<u16, u64>,
    pub transactions_executed: u64,
    pub view_changes: u64,
    pub digest_mismatches: u64,
    /// The Byzantine behaviours this replica runs (test deployments only).
    pub byzantine: Option<String>,
    /// `(height, state digest)` of the last executed heights, oldest first, so that
    /// replicas can be compared at the same height.
    pub recent_digests: Vec<(u64, String)>,
}

impl StatusReport {
    pub fn new(id: ReplicaId, status: &Status, metrics: &Metrics, peers: usize) -> StatusReport {
        StatusReport {
            id: id.0,
            round: status.round.0,
            leader: status.leader.map(|l| l.0),
            height: status.height.0,
            state_digest: status.state_digest.to_string(),
            peers_connected: status.peers_connected,
            peers,
            evidence: status.evidence,
            evidence_against: status.evidence_against.iter().map(|(r, n)| (r.0, *n)).collect(),
            transactions_executed: metrics.transactions_executed.get(),
            view_changes: metrics.view_changes.get(),
            digest_mismatches: metrics.digest_mismatches.get(),
            byzantine: status.byzantine.clone(),
            recent_digests: status.recent_digests.iter().map(|(h, d)| (h.0, d.to_string())).collect(),
        }
    }

    /// The first 8 hex digits of the state digest.
    pub fn short_digest(&self) -> &str {
        self.state_digest.get(..8).unwrap_or(&self.state_digest)
    }
}

/// A replica as `bulwark status` sees it: its report, or why there is none.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: u16,
    /// Where its status was asked for (its metrics address).
    pub address: Option<String>,
    pub report: Option<StatusReport>,
    /// How many heights it is behind the highest height of the reachable replicas.
    pub lag: Option<u64>,
}

/// `GET path` over plain HTTP/1.1 with short timeouts; the body of a 200 answer.
pub fn http_get(address: &str, path: &str) -> Option<String> {
    let addr: SocketAddr = address.parse().ok()?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nhost: bulwark\r\n\r\n").as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// Asks each `(id, metrics address)` for its status and computes the lags.
pub fn collect(targets: &[(u16, Option<String>)]) -> Vec<NodeStatus> {
    let mut nodes: Vec<NodeStatus> = targets
        .iter()
        .map(|(id, address)| NodeStatus {
            id: *id,
            address: address.clone(),
            report: address
                .as_deref()
                .and_then(|a| http_get(a, "/status"))
                .and_then(|body| serde_json::from_str(&body).ok()),
            lag: None,
        })
        .collect();
    set_lags(&mut nodes);
    nodes
}

/// Sets each reachable replica's lag behind the highest height any of them reported.
pub fn set_lags(nodes: &mut [NodeStatus]) {
    let highest = nodes.iter().filter_map(|n| n.report.as_ref().map(|r| r.height)).max();
    for node in nodes {
        node.lag = match (&node.report, highest) {
            (Some(report), Some(highest)) => Some(highest.saturating_sub(report.height)),
            _ => None,
        };
    }
}

/// The status table: one line per replica. With `rates` (committed tx/s per replica,
/// measured by the caller between two collections) a TX/S column is added.
pub fn table(nodes: &[NodeStatus], rates: Option<&BTreeMap<u16, f64>>) -> Vec<String> {
    let header = format!(
        "{:<5} {:>8} {:>8} {:>5} {:>6} {:>6} {:<8} {:>8} {:>9}{} NOTE",
        "NODE",
        "ROUND",
        "HEIGHT",
        "LAG",
        "LEADER",
        "PEERS",
        "DIGEST",
        "VIEWCHG",
        "EVIDENCE",
        if rates.is_some() { format!(" {:>8}", "TX/S") } else { String::new() }
    );
    let mut lines = vec![header];
    for node in nodes {
        let Some(r) = &node.report else {
            let why = match &node.address {
                Some(a) => format!("down (no answer from {a})"),
                None => "no metrics_address configured".into(),
            };
            lines.push(format!("{:<5} {why}", node.id));
            continue;
        };
        let mut notes = Vec::new();
        if let Some(behaviours) = &r.byzantine {
            notes.push(format!("BYZANTINE ({behaviours})"));
        }
        if !r.evidence_against.is_empty() {
            let against: Vec<String> = r.evidence_against.iter().map(|(o, n)| format!("{o}: {n}")).collect();
            notes.push(format!("evidence against {}", against.join(", ")));
        }
        if r.digest_mismatches > 0 {
            notes.push(format!("{} digest mismatches", r.digest_mismatches));
        }
        let rate = match rates {
            Some(rates) => format!(" {:>8.0}", rates.get(&node.id).copied().unwrap_or(0.0)),
            None => String::new(),
        };
        lines.push(format!(
            "{:<5} {:>8} {:>8} {:>5} {:>6} {:>6} {:<8} {:>8} {:>9}{rate} {}",
            r.id,
            r.round,
            r.height,
            node.lag.map(|l| l.to_string()).unwrap_or("-".into()),
            r.leader.map(|l| l.to_string()).unwrap_or("-".into()),
            format!("{}/{}", r.peers_connected, r.peers),
            r.short_digest(),
            r.view_changes,
            r.evidence,
            notes.join("; ")
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(id: u16, height: u64) -> StatusReport {
        StatusReport {
            id,
            round: height + 2,
            leader: Some(1),
            height,
            state_digest: "0123456789abcdef".into(),
            peers_connected: 3,
            peers: 3,
            evidence: 0,
            evidence_against: BTreeMap::new(),
            transactions_executed: 0,
            view_changes: 0,
            digest_mismatches: 0,
            byzantine: None,
            recent_digests: vec![(height, "0123456789abcdef".into())],
        }
    }

    #[test]
    fn the_table_names_lag_byzantine_nodes_evidence_and_down_nodes() {
        let mut byzantine = report(2, 10);
        byzantine.byzantine = Some("equivocate".into());
        let mut observer = report(0, 12);
        observer.evidence = 3;
        observer.evidence_against.insert(2, 3);
        let nodes = vec![
            NodeStatus { id: 0, address: None, report: Some(observer), lag: Some(0) },
            NodeStatus { id: 2, address: None, report: Some(byzantine), lag: Some(2) },
            NodeStatus { id: 3, address: Some("127.0.0.1:1".into()), report: None, lag: None },
        ];
        let lines = table(&nodes, None);
        assert!(lines[0].contains("LAG") && lines[0].contains("VIEWCHG") && !lines[0].contains("TX/S"));
        assert!(lines[1].contains("01234567") && !lines[1].contains("89abcdef"), "{}", lines[1]);
        assert!(lines[1].contains("evidence against 2: 3"), "{}", lines[1]);
        assert!(lines[2].contains("BYZANTINE (equivocate)"), "{}", lines[2]);
        assert!(lines[3].contains("down (no answer from 127.0.0.1:1)"), "{}", lines[3]);
        let rates = BTreeMap::from([(0, 250.0)]);
        assert!(table(&nodes, Some(&rates))[1].contains(" 250 "));
    }

    #[test]
    fn lag_is_measured_against_the_highest_reachable_replica() {
        let node = |id, report| NodeStatus { id, address: None, report, lag: None };
        let mut nodes = vec![node(0, Some(report(0, 40))), node(1, None), node(2, Some(report(2, 47)))];
        set_lags(&mut nodes);
        let lags: Vec<Option<u64>> = nodes.iter().map(|n| n.lag).collect();
        assert_eq!(lags, vec![Some(7), None, Some(0)]);
    }

    #[test]
    fn unreachable_replicas_have_no_report_and_no_lag() {
        // Port 1 has no listener; the second has no address; the third is not one.
        let nodes =
            collect(&[(0, Some("127.0.0.1:1".into())), (1, None), (2, Some("not an address".into()))]);
        assert!(nodes.iter().all(|n| n.report.is_none() && n.lag.is_none()));
    }

    #[test]
    fn reports_round_trip_through_json() {
        let mut r = report(1, 5);
        r.evidence_against.insert(2, 7);
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<StatusReport>(&text).unwrap(), r);
    }
}
