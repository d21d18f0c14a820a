//! HotStuff and PBFT under the deterministic simulator, with one network, crash and
//! client model and one invariant checker: many seeds of random delays, loss,
//! duplication, partitions that heal at GST, and crash-restarts of up to f replicas
//! (and, in some seeds, of the whole committee). Every seed must end with 0 violations
//! and at least 50 blocks committed after GST. A failure prints its replay command.

use bulwark_consensus::ProtocolKind;
use bulwark_tests::sim::{SimConfig, SimFailure, SimReport, run_scenario};

fn run_seed(protocol: ProtocolKind, nodes: usize, seed: u64) -> Result<SimReport, Box<SimFailure>> {
    run_scenario(SimConfig::from_seed(nodes, seed).with_protocol(protocol))
}

fn run_seeds(protocol: ProtocolKind, nodes: usize, seeds: std::ops::Range<u64>) {
    for seed in seeds {
        let report = run_seed(protocol, nodes, seed).unwrap_or_else(|failure| panic!("{failure}"));
        assert!(report.blocks_after_gst >= 50, "seed {seed}: {} blocks after GST", report.blocks_after_gst);
        assert_eq!(
            report.verify_failures, 0,
            "seed {seed}: honest messages failed verification: {:?}",
            report.verify_errors
        );
        assert_eq!(report.evidence, 0, "seed {seed}: evidence against honest replicas");
        assert_eq!(report.digest_mismatches, 0, "seed {seed}: honest replicas executed differently");
    }
}

macro_rules! seed_chunks {
    ($($name:ident: $protocol:ident, $nodes:expr, $range:expr;)*) => {
        $(
            #[test]
            fn $name() {
                run_seeds(ProtocolKind::$protocol, $nodes, $range);
            }
        )*
    };
}

// 300 seeds for n = 4 and 300 for n = 7, in chunks so the test runner spreads them
// over the cores.
seed_chunks! {
    hotstuff_n4_seeds_0_to_74: HotStuff, 4, 0..75;
    hotstuff_n4_seeds_75_to_149: HotStuff, 4, 75..150;
    hotstuff_n4_seeds_150_to_224: HotStuff, 4, 150..225;
    hotstuff_n4_seeds_225_to_299: HotStuff, 4, 225..300;
    hotstuff_n7_seeds_0_to_49: HotStuff, 7, 0..50;
    hotstuff_n7_seeds_50_to_99: HotStuff, 7, 50..100;
    hotstuff_n7_seeds_100_to_149: HotStuff, 7, 100..150;
    hotstuff_n7_seeds_150_to_199: HotStuff, 7, 150..200;
    hotstuff_n7_seeds_200_to_249: HotStuff, 7, 200..250;
    hotstuff_n7_seeds_250_to_299: HotStuff, 7, 250..300;
    pbft_n4_seeds_0_to_99: Pbft, 4, 0..100;
    pbft_n4_seeds_100_to_199: Pbft, 4, 100..200;
    pbft_n4_seeds_200_to_299: Pbft, 4, 200..300;
    pbft_n7_seeds_0_to_59: Pbft, 7, 0..60;
    pbft_n7_seeds_60_to_119: Pbft, 7, 60..120;
    pbft_n7_seeds_120_to_179: Pbft, 7, 120..180;
    pbft_n7_seeds_180_to_239: Pbft, 7, 180..240;
    pbft_n7_seeds_240_to_299: Pbft, 7, 240..300;
}

/// The whole committee crashes at once, each replica right after its next persist
/// (a vote, prepare or view change durable but not sent) or 200 ms later, and restarts
/// from its disk; before GST this often lands inside a view change.
fn whole_committee_restart(protocol: ProtocolKind, seeds: std::ops::Range<u64>) {
    for nodes in [4, 7] {
        for seed in seeds.clone() {
            let mut cfg = SimConfig::from_seed(nodes, seed).with_protocol(protocol);
            let gst = cfg.network.gst.0;
            let down = bulwark_consensus::Time(gst / 2);
            cfg.whole_committee_restart = Some((down, down.plus_millis(300 + seed % 1_000)));
            let report = run_scenario(cfg).unwrap_or_else(|f| panic!("{f}"));
            assert!(report.blocks_after_gst >= 50, "seed {seed}");
        }
    }
}

#[test]
fn whole_committee_restart_resumes_from_what_was_persisted() {
    whole_committee_restart(ProtocolKind::HotStuff, 1_000..1_025);
}

#[test]
fn pbft_whole_committee_restart_resumes_from_what_was_persisted() {
    whole_committee_restart(ProtocolKind::Pbft, 1_000..1_020);
}

fn same_seed_same_trace(protocol: ProtocolKind) {
    let run = |nodes: usize, seed: u64| {
        run_scenario(SimConfig::from_seed(nodes, seed).with_protocol(protocol))
            .unwrap_or_else(|f| panic!("{f}"))
    };
    for (nodes, seed) in [(4, 17), (7, 3)] {
        let (first, second) = (run(nodes, seed), run(nodes, seed));
        assert_eq!(first.trace_digest, second.trace_digest);
        assert_eq!((first.steps, first.messages_delivered), (second.steps, second.messages_delivered));
        let other = run(nodes, seed + 1);
        assert_ne!(first.trace_digest, other.trace_digest, "different seeds, different runs");
    }
}

#[test]
fn hotstuff_same_seed_same_trace() {
    same_seed_same_trace(ProtocolKind::HotStuff);
}

#[test]
fn pbft_same_seed_same_trace() {
    same_seed_same_trace(ProtocolKind::Pbft);
}

/// Built only with `--features unsafe-one-chain-commit` (see scripts/test): the core
/// commits a block as soon as it is certified, and the checker must catch the forks.
#[cfg(feature = "unsafe-one-chain-commit")]
#[test]
fn checker_finds_the_fork_of_a_broken_commit_rule() {
    let mut found = None;
    for seed in 0..200 {
        match run_seed(ProtocolKind::HotStuff, 4, seed) {
            Err(failure) if failure.violation.class() == "safety" => {
                found = Some(failure);
                break;
            }
            // Forked commits also feed the leader election different histories, which
            // can stall a run before it forks: a liveness failure, not what this is about.
            Err(_) | Ok(_) => {}
        }
    }
    let failure = found.expect("a one-chain commit rule forks within 200 seeds");
    println!("{failure}");
    assert_eq!(failure.violation.class(), "safety");
    assert!(matches!(failure.violation, bulwark_tests::sim::Violation::Agreement { .. }), "{failure}");
    assert!(failure.replay.contains(&format!("--seed {}", failure.seed)));
}

#[test]
fn pbft_replay_command_names_the_protocol() {
    let cfg = SimConfig::from_seed(4, 9).with_protocol(ProtocolKind::Pbft);
    assert!(cfg.replay_command().contains("--protocol pbft"), "{}", cfg.replay_command());
}

/// Built only with `--features unsafe-pbft-forget-prepared` (see scripts/test): new
/// views forget prepared certificates, so a batch committed in one view can be
/// replaced in the next, and the checker must catch the fork.
#[cfg(feature = "unsafe-pbft-forget-prepared")]
#[test]
fn checker_finds_the_fork_of_a_new_view_that_forgets_prepared_batches() {
    let failure = (0..200)
        .find_map(|seed| run_seed(ProtocolKind::Pbft, 4, seed).err())
        .expect("forgetting prepared certificates forks within 200 seeds");
    println!("{failure}");
    assert!(matches!(failure.violation, bulwark_tests::sim::Violation::Agreement { .. }), "{failure}");
    assert!(failure.replay.contains("--protocol pbft"));
}
