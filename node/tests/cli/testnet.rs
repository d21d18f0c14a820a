//! `bulwark testnet run`, `client` and `status` against live replica processes, honest
//! and with Byzantine replicas.

use std::time::Duration;

use crate::support::{Testnet, assert_same_digests, bulwark, height, summary, text};

fn ok(out: &std::process::Output) -> String {
    assert!(out.status.success(), "failed ({}): {}{}", out.status, text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn a_four_node_testnet_serves_writes_and_reads_and_status_shows_progress() {
    let mut net = Testnet::init(4, &[]);
    net.run(&[]);
    let first = net.wait_for("every replica up, connected and committing", Duration::from_secs(30), |s| {
        s.iter().all(|n| n.report.as_ref().is_some_and(|r| r.height > 0 && r.peers_connected == 3))
    });

    for (key, value) in [("alpha", "1"), ("beta", "2"), ("gamma", "3")] {
        let put = ok(&net.client(&["put", key, value]));
        assert!(put.starts_with("ok (height ") && put.contains("matching replies from replicas"), "{put}");
    }
    for (key, value) in [("alpha", "1"), ("beta", "2"), ("gamma", "3")] {
        assert!(ok(&net.client(&["get", key])).starts_with(&format!("{value} (height ")));
    }
    let cas = ok(&net.client(&["cas", "alpha", "1", "one"]));
    assert!(cas.starts_with("swapped: true, previous: 1"), "{cas}");
    let stale = ok(&net.client(&["cas", "alpha", "1", "uno"]));
    assert!(stale.starts_with("swapped: false, previous: one"), "{stale}");
    ok(&net.client(&["delete", "gamma"]));
    assert!(ok(&net.client(&["get", "gamma"])).starts_with("(absent)"));
    let local = ok(&net.client(&["local-get", "alpha", "--replica", "2"]));
    assert!(local.starts_with("one (local read from replica 2 at height "), "{local}");

    // Status shows progress: every replica's height grew past the highest one before.
    let before = first.iter().filter_map(|n| n.report.as_ref().map(|r| r.height)).max().unwrap_or(0);
    let later =
        net.wait_for("heights to grow", Duration::from_secs(20), |s| (0..4).all(|i| height(s, i) > before));
    assert!(assert_same_digests(&later, &[0, 1, 2, 3]) > 0, "no common height: {}", summary(&later));
    let table = ok(&bulwark(&["status", "--dir", &net.dir_arg()], Duration::from_secs(20)));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 5, "{table}");
    for column in ["ROUND", "HEIGHT", "LAG", "LEADER", "PEERS", "DIGEST", "VIEWCHG", "EVIDENCE"] {
        assert!(lines[0].contains(column), "{table}");
    }
    assert!(lines[1..].iter().all(|l| l.contains(" 3/3 ")), "{table}");
    // One replica by its own config.
    let config = net.config(1);
    let one =
        ok(&bulwark(&["status", "--config", config.to_str().unwrap_or_default()], Duration::from_secs(20)));
    assert_eq!(one.lines().count(), 2, "{one}");
    assert!(one.lines().nth(1).is_some_and(|l| l.starts_with('1')), "{one}");

    // The metrics behind it.
    let address = later[0].address.clone().expect("metrics address");
    let metrics = bulwark_node::status::http_get(&address, "/metrics").expect("metrics scrape");
    for sample in [
        "bulwark_height ",
        "bulwark_leader ",
        "bulwark_peers_connected 3",
        "bulwark_peer_queue_depth{peer=\"1\"} ",
        "bulwark_peer_queue_dropped_total{peer=\"1\"} 0",
        "bulwark_storage_bytes ",
        "bulwark_evidence_total 0",
    ] {
        assert!(metrics.contains(sample), "{sample:?} missing from {metrics}");
    }

    // A short load test against this running testnet (not a fresh one).
    let bench = ok(&bulwark(
        &["bench", "--dir", &net.dir_arg(), "--rate", "100", "--duration", "2", "--clients", "1", "--json"],
        Duration::from_secs(40),
    ));
    let report: serde_json::Value = serde_json::from_str(bench.trim()).expect("bench JSON");
    assert_eq!(report["nodes"].as_f64(), Some(4.0), "{report}");
    assert!(report["committed"].as_f64().is_some_and(|c| c > 0.0), "{report}");
    assert_eq!(report["cpu_seconds_per_node"].as_array().map(Vec::len), Some(4), "{report}");

    // Ctrl-C stops every replica.
    let pids = net.runner_pids();
    assert_eq!(pids.len(), 4);
    net.interrupt_runner();
    assert!(pids.iter().all(|p| !crate::support::alive(*p)), "a replica outlived testnet run");
    let down = bulwark(&["status", "--dir", &net.dir_arg()], Duration::from_secs(20));
    assert!(!down.status.success() && text(&down.stdout).contains("down"), "{}", text(&down.stdout));
}

#[test]
fn byzantine_replicas_are_shown_their_evidence_reported_and_honest_replicas_agree() {
    let mut net = Testnet::init(7, &[]);
    // More than f = 2 Byzantine replicas is refused before anything starts.
    let dir = net.dir_arg();
    let base = net.ports.base.to_string();
    let too_many = bulwark(
        &[
            "testnet",
            "run",
            "--nodes",
            "7",
            "--dir",
            &dir,
            "--base-port",
            &base,
            "--byzantine",
            "0:silent,1:silent,3:silent",
        ],
        Duration::from_secs(20),
    );
    assert!(!too_many.status.success());
    assert!(text(&too_many.stderr).contains("tolerates only f = 2"), "{}", text(&too_many.stderr));
    assert!(net.runner_pids().is_empty(), "nothing was started");

    net.run(&["--byzantine", "2:equivocate,5:silent"]);
    let honest = [0, 1, 3, 4, 6];
    let status = net.wait_for("commits and evidence against replica 2", Duration::from_secs(45), |s| {
        let evidence: u64 = s
            .iter()
            .filter_map(|n| n.report.as_ref())
            .filter(|r| honest.contains(&usize::from(r.id)))
            .map(|r| r.evidence_against.get(&2).copied().unwrap_or(0))
            .sum();
        evidence > 0 && honest.iter().all(|&i| height(s, i) >= 20)
    });
    let byzantine = |id: usize| status[id].report.as_ref().and_then(|r| r.byzantine.clone());
    assert_eq!(byzantine(2).as_deref(), Some("equivocate"));
    assert_eq!(byzantine(5).as_deref(), Some("silent"));
    assert!(honest.iter().all(|&i| byzantine(i).is_none()));
    // Evidence only ever names the equivocator.
    for report in status.iter().filter_map(|n| n.report.as_ref()) {
        assert!(report.evidence_against.keys().all(|offender| *offender == 2), "{}", summary(&status));
    }
    assert!(assert_same_digests(&status, &honest) > 0, "no common height: {}", summary(&status));

    // A client still gets f+1 = 3 matching replies.
    let put = ok(&net.client(&["put", "k", "v"]));
    assert!(put.contains("matching replies"), "{put}");
    assert!(ok(&net.client(&["get", "k"])).starts_with("v (height "));

    // The operator's view: the table marks them, and the metrics carry the evidence.
    let table = ok(&bulwark(&["status", "--dir", &net.dir_arg()], Duration::from_secs(20)));
    assert!(table.contains("BYZANTINE (equivocate)") && table.contains("BYZANTINE (silent)"), "{table}");
    assert!(table.contains("evidence against 2: "), "{table}");
    let observer = status
        .iter()
        .find(|n| n.report.as_ref().is_some_and(|r| r.evidence_against.contains_key(&2)))
        .and_then(|n| n.address.clone())
        .expect("an observer of the evidence");
    let metrics = bulwark_node::status::http_get(&observer, "/metrics").expect("metrics scrape");
    assert!(metrics.contains("bulwark_evidence_against_total{offender=\"2\""), "{metrics}");
    let run_out = std::fs::read_to_string(net.dir().join("run.out")).unwrap_or_default();
    assert!(run_out.contains("Byzantine replicas 2:equivocate,5:silent"), "{run_out}");

    // The behaviours live in the replicas' configs (the unit tests of `testnet` show a
    // re-run without --byzantine removes them).
    net.interrupt_runner();
    let config = std::fs::read_to_string(net.config(2)).expect("node2.toml");
    assert!(config.contains("byzantine = \"equivocate\"") && config.contains("TEST ONLY"), "{config}");
    assert!(!std::fs::read_to_string(net.config(0)).expect("node0.toml").contains("byzantine"));
}

/// `testnet run --protocol pbft`: the same client and status work over PBFT replicas.
#[test]
fn a_pbft_testnet_serves_the_same_client_and_status() {
    let mut net = Testnet::init(4, &["--protocol", "pbft"]);
    net.run(&["--protocol", "pbft"]);
    net.wait_for("every replica up, connected and committing", Duration::from_secs(30), |s| {
        s.iter().all(|n| n.report.as_ref().is_some_and(|r| r.height > 0 && r.peers_connected == 3))
    });
    let put = ok(&net.client(&["put", "alpha", "1"]));
    assert!(put.starts_with("ok (height ") && put.contains("matching replies from replicas"), "{put}");
    assert!(ok(&net.client(&["get", "alpha"])).starts_with("1 (height "));
    // Every replica names the same primary (the view's, whatever view startup reached).
    let primaries = |s: &[bulwark_node::status::NodeStatus]| {
        s.iter().filter_map(|n| n.report.as_ref()?.leader).collect::<std::collections::BTreeSet<_>>().len()
    };
    net.wait_for("a common height and one primary", Duration::from_secs(20), |s| {
        assert_same_digests(s, &[0, 1, 2, 3]) > 0 && primaries(s) == 1
    });
    // The directory is a PBFT testnet now: running it as HotStuff is refused.
    net.interrupt_runner();
    let dir = net.dir_arg();
    let out = bulwark(&["testnet", "run", "--nodes", "4", "--dir", &dir], Duration::from_secs(20));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("holds a pbft testnet, not hotstuff"), "{}", text(&out.stderr));
}
