//! HotStuff and PBFT with Byzantine replicas under the deterministic simulator.
//!
//! Each behaviour runs on f replicas (chosen by the seed) for n = 4 and n = 7, 200 seeds
//! each for HotStuff (200 and 100 for PBFT), in the short scenario profile (GST in 0.5–2 s, 10–40 transactions, at least 10
//! blocks after GST, every transaction committed within 70 s of max(submit, GST)), with
//! loss, duplication, reordering and partitions before GST. Every seed must end with 0
//! safety violations and pass the liveness check; honest replicas never send a message
//! that fails verification and never hold evidence against an honest replica. A
//! failure prints its one-line replay command.

use std::collections::BTreeSet;
use std::ops::Range;

use bulwark_consensus::byzantine::{Behaviour, Behaviours};
use bulwark_consensus::hotstuff::{Message, Proposal, VoteData};
use bulwark_consensus::pbft::{self, Phase, SignedOrder, Vote};
use bulwark_consensus::{Evidence, EvidenceKind, ProtocolKind};
use bulwark_crypto::{Committee, ReplicaId, Signed, Verify, codec};
use bulwark_tests::sim::{Faults, Profile, RunSpec, SimConfig, SimReport};

/// Runs `spec` over `seeds`; panics with the replay command on any violation.
fn run(spec: &RunSpec, seeds: Range<u64>) -> Vec<(SimConfig, SimReport)> {
    let committee = sim_committee(spec.nodes);
    let mut out = Vec::new();
    for seed in seeds {
        let cfg = spec.config(seed);
        let report = spec.run(seed).unwrap_or_else(|failure| panic!("{}: {failure}", spec.label()));
        assert!(report.blocks_after_gst >= cfg.min_blocks_after_gst, "seed {seed}");
        assert_eq!(
            report.honest_verify_failures,
            0,
            "seed {seed}: honest messages failed verification: {:?}\nreplay: {}",
            report.verify_errors,
            cfg.replay_command()
        );
        let faulty: BTreeSet<ReplicaId> = cfg.faulty().into_iter().map(|p| ReplicaId(p as u16)).collect();
        for (observer, evidence) in &report.evidence_log {
            assert!(
                faulty.contains(&evidence.offender),
                "seed {seed}: replica {observer} holds evidence against honest {}\nreplay: {}",
                evidence.offender,
                cfg.replay_command()
            );
        }
        for (_, evidence) in report.evidence_log.iter().take(2) {
            match spec.protocol {
                ProtocolKind::HotStuff => check_evidence(evidence, &committee),
                ProtocolKind::Pbft => check_pbft_evidence(evidence, &committee),
            }
        }
        out.push((cfg, report));
    }
    out
}

fn sim_committee(nodes: usize) -> Committee {
    Committee::deterministic("bulwark-sim", nodes, 7000).unwrap().0
}

/// Evidence is two statements the offender really signed, for the same round, that
/// differ: anyone holding the committee can check it.
fn check_evidence(evidence: &Evidence, committee: &Committee) {
    match evidence.kind {
        EvidenceKind::ConflictingProposals => {
            let first: Proposal = codec::decode(&evidence.first, 1 << 22).unwrap();
            let second: Proposal = codec::decode(&evidence.second, 1 << 22).unwrap();
            assert_ne!(first.block, second.block);
            for p in [first, second] {
                assert_eq!((p.block.author, p.block.round), (evidence.offender, evidence.round));
                Message::Proposal(p).verify(committee).unwrap();
            }
        }
        EvidenceKind::ConflictingVotes => {
            let first: Signed<VoteData> = codec::decode(&evidence.first, 4096).unwrap();
            let second: Signed<VoteData> = codec::decode(&evidence.second, 4096).unwrap();
            assert_ne!(first.value, second.value);
            for v in [first, second] {
                assert_eq!((v.signer, v.value.round), (evidence.offender, evidence.round));
                v.verify(committee).unwrap();
            }
        }
    }
}

/// PBFT evidence: two pre-prepares the view's primary signed for one sequence number,
/// or two prepares (or commits) one replica signed for one sequence number in a view.
fn check_pbft_evidence(evidence: &Evidence, committee: &Committee) {
    match evidence.kind {
        EvidenceKind::ConflictingProposals => {
            let first: SignedOrder = codec::decode(&evidence.first, 4096).unwrap();
            let second: SignedOrder = codec::decode(&evidence.second, 4096).unwrap();
            assert_ne!(first.order, second.order);
            assert_eq!(first.order.seq, second.order.seq);
            for o in [first, second] {
                assert_eq!(o.order.view, evidence.round);
                assert_eq!(pbft::primary(committee, o.order.view), evidence.offender);
                o.verify(committee).unwrap();
            }
        }
        EvidenceKind::ConflictingVotes => {
            let first: Vote = codec::decode(&evidence.first, 4096).unwrap();
            let second: Vote = codec::decode(&evidence.second, 4096).unwrap();
            assert_ne!(first.order.digest, second.order.digest);
            assert_eq!((first.order.view, first.order.seq), (second.order.view, second.order.seq));
            for v in [first, second] {
                assert_eq!((v.signer, v.order.view), (evidence.offender, evidence.round));
                assert!(
                    v.verify(Phase::Prepare, committee).is_ok() || v.verify(Phase::Commit, committee).is_ok()
                );
            }
        }
    }
}

/// What each behaviour must visibly do, beyond safety and liveness, in at least
/// `percent` of the seeds (and at least one). Under HotStuff every replica leads in
/// turn, so every seed shows it; under PBFT a Byzantine replica leads only if the
/// views reach it (the fixed-primary test below shows it in most seeds).
fn check_effects(percent: usize, behaviour: Behaviour, runs: &[(SimConfig, SimReport)]) {
    let seeds = runs.len();
    let count = |pred: &dyn Fn(&SimReport) -> bool| runs.iter().filter(|(_, r)| pred(r)).count();
    let needed = |share: usize| (seeds * percent * share / 10_000).max(1);
    match behaviour {
        Behaviour::Equivocate { .. } | Behaviour::DoubleVote => {
            let kind = if behaviour == Behaviour::DoubleVote {
                EvidenceKind::ConflictingVotes
            } else {
                EvidenceKind::ConflictingProposals
            };
            // Some honest replica holds evidence naming the culprit.
            let caught = |(cfg, report): &&(SimConfig, SimReport)| {
                let culprits: BTreeSet<ReplicaId> =
                    cfg.byzantine.iter().map(|(id, _)| ReplicaId(*id as u16)).collect();
                report.evidence_log.iter().any(|(_, e)| e.kind == kind && culprits.contains(&e.offender))
            };
            let missed = runs.iter().filter(|r| !caught(r)).map(|(cfg, _)| cfg.replay_command()).next();
            assert!(
                runs.iter().filter(caught).count() >= needed(100),
                "no {kind:?} evidence against the culprits\nreplay: {missed:?}"
            );
        }
        Behaviour::BadSignature | Behaviour::ForgeQc { .. } | Behaviour::ForgeTc { .. } => {
            assert!(
                count(&|r| r.verify_failures > 0) >= needed(100),
                "{behaviour}: forged messages were accepted"
            );
        }
        Behaviour::WrongStateDigest => {
            assert!(count(&|r| r.digest_mismatches > 0) >= needed(90), "wrong digests went unnoticed");
        }
        _ => {}
    }
}

fn behaviour(protocol: ProtocolKind, nodes: usize, behaviour: Behaviour, seeds: Range<u64>) {
    let spec = RunSpec::on_f(nodes, behaviour).with_protocol(protocol);
    let runs = run(&spec, seeds);
    let percent = match protocol {
        ProtocolKind::HotStuff => 100,
        ProtocolKind::Pbft => 0,
    };
    check_effects(percent, behaviour, &runs);
    let worst = runs.iter().map(|(_, r)| r.worst_latency_ms).max().unwrap_or(0);
    let blocks: usize = runs.iter().map(|(_, r)| r.blocks_committed).sum();
    println!(
        "{protocol} {behaviour} n = {nodes}: {} seeds, {blocks} blocks, worst latency after GST {worst} ms",
        runs.len()
    );
}

macro_rules! behaviour_tests {
    ($($name:ident: $behaviour:expr;)*) => {
        $(
            mod $name {
                use super::*;

                #[test]
                fn n4_seeds_0_to_199() {
                    behaviour(ProtocolKind::HotStuff, 4, $behaviour, 0..200);
                }

                #[test]
                fn n7_seeds_0_to_99() {
                    behaviour(ProtocolKind::HotStuff, 7, $behaviour, 0..100);
                }

                #[test]
                fn n7_seeds_100_to_199() {
                    behaviour(ProtocolKind::HotStuff, 7, $behaviour, 100..200);
                }

                #[test]
                fn pbft_n4_seeds_0_to_199() {
                    behaviour(ProtocolKind::Pbft, 4, $behaviour, 0..200);
                }

                #[test]
                fn pbft_n7_seeds_0_to_99() {
                    behaviour(ProtocolKind::Pbft, 7, $behaviour, 0..100);
                }
            }
        )*
    };
}

behaviour_tests! {
    equivocate: Behaviour::Equivocate { overlap: 1 };
    double_vote: Behaviour::DoubleVote;
    silent: Behaviour::Silent;
    withhold_votes: Behaviour::WithholdVotes { to_positions: None };
    bad_signature: Behaviour::BadSignature;
    forge_qc: Behaviour::ForgeQc { defect: None };
    forge_tc: Behaviour::ForgeTc { defect: None };
    stale_replay: Behaviour::StaleReplay { lag: 3 };
    round_jump: Behaviour::RoundJump { by: 1_000_000 };
    wrong_state_digest: Behaviour::WrongStateDigest;
    flood: Behaviour::Flood { per_step: 4 };
    selective_leader: Behaviour::SelectiveLeader;
}

/// Between 1 and f Byzantine replicas with different behaviours, plus crash-restarts
/// of honest replicas up to the rest of the budget and the profile's drops.
#[test]
fn mixed_n4_seeds_0_to_199() {
    run(&RunSpec::new(4, Profile::Short, Faults::Mixed), 0..200);
}

#[test]
fn mixed_n7_seeds_0_to_99() {
    let runs = run(&RunSpec::new(7, Profile::Short, Faults::Mixed), 0..100);
    assert!(runs.iter().any(|(cfg, _)| cfg.byzantine.len() == 2), "two behaviours at once");
    assert!(runs.iter().any(|(cfg, _)| cfg.byzantine.len() == 1 && !cfg.crashes.is_empty()), "a crash too");
}

#[test]
fn mixed_n7_seeds_100_to_199() {
    run(&RunSpec::new(7, Profile::Short, Faults::Mixed), 100..200);
}

/// A PBFT primary that equivocates (or a replica that double-votes) from view 0 is
/// caught with evidence naming it, unless the pre-GST network hides it and a view
/// change replaces it first.
#[test]
fn pbft_equivocation_and_double_votes_of_the_first_primary_leave_evidence() {
    for behaviour in [Behaviour::Equivocate { overlap: 1 }, Behaviour::DoubleVote] {
        for nodes in [4, 7] {
            let spec = RunSpec::new(nodes, Profile::Short, Faults::Fixed(vec![(0, behaviour.into())]))
                .with_protocol(ProtocolKind::Pbft);
            let runs = run(&spec, 0..40);
            check_effects(80, behaviour, &runs);
        }
    }
}

#[test]
fn pbft_mixed_n4_seeds_0_to_199() {
    run(&RunSpec::new(4, Profile::Short, Faults::Mixed).with_protocol(ProtocolKind::Pbft), 0..200);
}

#[test]
fn pbft_mixed_n7_seeds_0_to_99() {
    run(&RunSpec::new(7, Profile::Short, Faults::Mixed).with_protocol(ProtocolKind::Pbft), 0..100);
}

/// Composed behaviours on one replica: a leader that equivocates and votes for both
/// of its blocks, and a replica that floods while replaying stale messages.
#[test]
fn composed_behaviours_on_one_replica() {
    for text in ["equivocate+double-vote", "flood+stale-replay", "equivocate=0+selective-leader"] {
        let behaviours: Behaviours = text.parse().unwrap();
        for nodes in [4, 7] {
            let count = (nodes - 1) / 3;
            let spec =
                RunSpec::new(nodes, Profile::Short, Faults::Random { behaviours: behaviours.clone(), count });
            run(&spec, 1_000..1_030);
        }
    }
}

/// The fault budget: Byzantine replicas never crash, crashes are trimmed to f minus the
/// Byzantine count, and there is no whole-committee restart.
#[test]
fn byzantine_replicas_count_toward_the_fault_budget() {
    for seed in 0..500 {
        for nodes in [4, 7, 10] {
            let f = (nodes - 1) / 3;
            let cfg = SimConfig::short(nodes, seed).with_mixed_byzantine();
            assert!((1..=f).contains(&cfg.byzantine.len()));
            assert!(cfg.byzantine.len() + cfg.crashes.len() <= f, "seed {seed}: over budget");
            assert!(cfg.whole_committee_restart.is_none());
            assert!(cfg.crashes.iter().all(|(id, _, _)| !cfg.byzantine.iter().any(|(b, _)| b == id)));
            let names: BTreeSet<&str> = cfg.byzantine.iter().map(|(_, b)| b.0[0].name()).collect();
            assert_eq!(names.len(), cfg.byzantine.len(), "different behaviours");
        }
    }
}

#[test]
fn a_byzantine_seed_replays_from_its_command() {
    let spec = RunSpec::on_f(7, Behaviour::Equivocate { overlap: 1 });
    let cfg = spec.config(5);
    let command = cfg.replay_command();
    assert!(command.contains("--profile short --byzantine "), "{command}");
    let first = spec.run(5).unwrap();
    let again = bulwark_tests::sim::run_hotstuff(cfg).unwrap();
    assert_eq!(first.trace_digest, again.trace_digest);
}
