//! PBFT under the deterministic simulator, with the same network, crash and client
//! model and the same invariant checker as HotStuff: random delays, loss, duplication,
//! partitions healing at GST and crash-restarts of up to f replicas (and, in some
//! seeds, of the whole committee: see `simulator.rs`). Every seed must end with 0
//! violations and at least 50 blocks committed after GST. A failure prints its replay command
//! (`sim ... --protocol pbft`).

use bulwark_consensus::ProtocolKind;
use bulwark_tests::sim::{SimConfig, SimReport, run_pbft};

fn run_pbft_seed(nodes: usize, seed: u64) -> Result<SimReport, Box<bulwark_tests::sim::SimFailure>> {
    run_pbft(SimConfig::from_seed(nodes, seed).with_protocol(ProtocolKind::Pbft))
}

fn run_seeds(nodes: usize, seeds: std::ops::Range<u64>) {
    for seed in seeds {
        let report = run_pbft_seed(nodes, seed).unwrap_or_else(|failure| panic!("{failure}"));
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
    ($($name:ident: $nodes:expr, $range:expr;)*) => {
        $(
            #[test]
            fn $name() {
                run_seeds($nodes, $range);
            }
        )*
    };
}

// 300 seeds for n = 4 and 300 for n = 7, in chunks the test runner spreads over cores.
seed_chunks! {
    pbft_n4_seeds_0_to_99: 4, 0..100;
    pbft_n4_seeds_100_to_199: 4, 100..200;
    pbft_n4_seeds_200_to_299: 4, 200..300;
    pbft_n7_seeds_0_to_59: 7, 0..60;
    pbft_n7_seeds_60_to_119: 7, 60..120;
    pbft_n7_seeds_120_to_179: 7, 120..180;
    pbft_n7_seeds_180_to_239: 7, 180..240;
    pbft_n7_seeds_240_to_299: 7, 240..300;
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
        .find_map(|seed| run_pbft_seed(4, seed).err())
        .expect("forgetting prepared certificates forks within 200 seeds");
    println!("{failure}");
    assert!(matches!(failure.violation, bulwark_tests::sim::Violation::Agreement { .. }), "{failure}");
    assert!(failure.replay.contains("--protocol pbft"));
}
