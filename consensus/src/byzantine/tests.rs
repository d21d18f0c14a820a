//! Each behaviour against honest HotStuff cores, in a tiny synchronous cluster (the
//! randomized, fault-injecting runs are in the simulator's tests).

use std::collections::{BTreeMap, VecDeque};

use bulwark_crypto::{Committee, Digest, KeyPair, ReplicaId, Verified};

use super::*;
use crate::hotstuff::{Config, HotStuff, Message, Record, TimeoutPolicy, VerifyError};
use crate::protocol::{Event, Evidence, EvidenceKind, Payload, Recipient, Round};

type Core = Box<dyn Protocol<Message = Message, Record = Record>>;

fn committee(n: usize) -> (Committee, Vec<KeyPair>) {
    Committee::deterministic("byzantine-unit", n, 7000).unwrap()
}

fn key(keys: &[KeyPair], id: u16) -> KeyPair {
    KeyPair::from_seed(*keys[id as usize].secret_bytes())
}

fn honest(c: &Committee, keys: &[KeyPair], id: u16) -> HotStuff {
    HotStuff::new(Config {
        id: ReplicaId(id),
        committee: c.clone(),
        key: key(keys, id),
        timeouts: TimeoutPolicy { base_ms: 500, max_ms: 8_000 },
        sync_batch: 16,
    })
}

fn byzantine(c: &Committee, keys: &[KeyPair], id: u16, behaviours: &str) -> Byzantine<HotStuff> {
    let forger = Forger::new(ReplicaId(id), key(keys, id), c.clone(), 42);
    Byzantine::new(honest(c, keys, id), behaviours.parse().unwrap(), forger)
}

/// What happened in a cluster run.
#[derive(Default, Debug)]
struct Outcome {
    /// Committed block digests per replica, in order.
    commits: BTreeMap<u16, Vec<Digest>>,
    evidence: BTreeMap<u16, Vec<Evidence>>,
    /// Verification failures by sender.
    refused_from: BTreeMap<u16, Vec<VerifyError>>,
    digest_mismatches: usize,
}

/// Blocks every honest replica commits before a cluster run stops.
const TARGET_BLOCKS: usize = 20;

/// Runs n cores with reliable, ordered delivery taking 1 ms per message, until every
/// replica but `bad` committed [`TARGET_BLOCKS`] or the clock passes `until` ms.
fn run(c: &Committee, mut cores: Vec<Core>, bad: u16, until: u64) -> Outcome {
    let mut out = Outcome::default();
    let mut queue: VecDeque<(u64, u16, u16, Message)> = VecDeque::new();
    let mut now = 0u64;
    let mut inputs: VecDeque<(u16, Input<Message, Record>)> =
        (0..cores.len() as u16).map(|i| (i, Input::Start)).collect();
    let mut payload_counter = 0u8;
    loop {
        while let Some((node, input)) = inputs.pop_front() {
            let actions = cores[node as usize].handle(Time(now), input);
            for o in actions.send {
                let targets: Vec<u16> = match o.to {
                    Recipient::One(id) => vec![id.0],
                    Recipient::AllOthers => (0..cores.len() as u16).filter(|i| *i != node).collect(),
                };
                for t in targets {
                    queue.push_back((now + 1, t, node, o.msg.clone()));
                }
            }
            for block in actions.commit {
                out.commits.entry(node).or_default().push(block.digest);
                let digest = Digest::of(&block.height.0.to_le_bytes());
                inputs.push_back((node, Input::Executed { height: block.height, state_digest: digest }));
            }
            if let Some(request) = actions.want_payload {
                payload_counter = payload_counter.wrapping_add(1);
                inputs.push_back((
                    node,
                    Input::Payload { round: request.round, payload: Payload(vec![payload_counter]) },
                ));
            }
            for request in actions.load {
                inputs.push_back((node, Input::Loaded { request, records: Vec::new() }));
            }
            out.evidence.entry(node).or_default().extend(actions.evidence);
            out.digest_mismatches +=
                actions.events.iter().filter(|e| matches!(e, Event::StateDigestMismatch { .. })).count();
        }
        let done = (0..cores.len() as u16)
            .filter(|i| *i != bad)
            .all(|i| out.commits.get(&i).is_some_and(|log| log.len() >= TARGET_BLOCKS));
        if done || now > until {
            return out;
        }
        let next_message = queue.front().map(|(at, ..)| *at);
        let next_deadline = cores.iter().filter_map(|c| c.next_deadline()).map(|t| t.0).min();
        match (next_message, next_deadline) {
            (Some(at), deadline) if deadline.is_none_or(|d| at <= d) => {
                let Some((at, to, from, msg)) = queue.pop_front() else { continue };
                now = now.max(at);
                match Verified::check(msg, c) {
                    Ok(msg) => inputs.push_back((to, Input::Message { from: ReplicaId(from), msg })),
                    Err(e) => out.refused_from.entry(from).or_default().push(e),
                }
            }
            (_, Some(deadline)) => {
                now = now.max(deadline);
                for (i, core) in cores.iter().enumerate() {
                    if core.next_deadline().is_some_and(|d| d.0 <= now) {
                        inputs.push_back((i as u16, Input::Timeout));
                    }
                }
            }
            (_, None) => return out,
        }
    }
}

fn cluster(n: usize, bad: u16, behaviours: &str) -> (Committee, Vec<Core>) {
    let (c, keys) = committee(n);
    let cores = (0..n as u16)
        .map(|i| -> Core {
            if i == bad {
                Box::new(byzantine(&c, &keys, i, behaviours))
            } else {
                Box::new(honest(&c, &keys, i))
            }
        })
        .collect();
    (c, cores)
}

/// Honest replicas agree (one is a prefix of the other) and each committed `min`.
fn assert_safe_and_live(outcome: &Outcome, bad: u16, n: u16, min: usize) {
    let logs: Vec<&Vec<Digest>> = (0..n).filter(|i| *i != bad).map(|i| &outcome.commits[&i]).collect();
    for log in &logs {
        assert!(log.len() >= min, "only {} blocks committed: {outcome:?}", log.len());
        for other in &logs {
            let k = log.len().min(other.len());
            assert_eq!(log[..k], other[..k], "honest replicas forked");
        }
    }
}

#[test]
fn equivocating_leader_sends_two_signed_blocks_to_two_halves_and_is_caught() {
    let (c, keys) = committee(4);
    let mut leader = byzantine(&c, &keys, 1, "equivocate");
    leader.handle(Time(0), Input::Start);
    let actions = leader.handle(Time(1), Input::Payload { round: Round(1), payload: Payload(vec![7]) });
    let mut by_recipient: BTreeMap<u16, Vec<Message>> = BTreeMap::new();
    for o in actions.send.into_iter().filter(|o| matches!(o.msg, Message::Proposal(_))) {
        let Recipient::One(to) = o.to else { panic!("an equivocation is never broadcast") };
        by_recipient.entry(to.0).or_default().push(o.msg);
    }
    // Others rotated by round 1: [2, 3, 0]; halves [2, 3] and [0]; 0 also gets the first.
    assert_eq!(by_recipient[&2], by_recipient[&3]);
    assert_eq!(by_recipient[&0].len(), 2);
    assert_ne!(by_recipient[&0][0], by_recipient[&2][0]);
    assert_eq!(by_recipient[&0][1], by_recipient[&2][0]);
    for msg in by_recipient.values().flatten() {
        assert!(
            Verified::check(msg.clone(), &c).is_ok(),
            "both proposals carry the leader's valid signature"
        );
        assert_eq!(msg.round(), Some(Round(1)));
    }
    // The replica that saw both holds the proof.
    let mut witness = honest(&c, &keys, 0);
    witness.handle(Time(0), Input::Start);
    let mut evidence = Vec::new();
    for msg in by_recipient[&0].clone() {
        let msg = Verified::check(msg, &c).unwrap();
        evidence.extend(witness.handle(Time(2), Input::Message { from: ReplicaId(1), msg }).evidence);
    }
    assert_eq!(evidence.len(), 1);
    assert_eq!((evidence[0].offender, evidence[0].kind), (ReplicaId(1), EvidenceKind::ConflictingProposals));
}

#[test]
fn behaviours_keep_honest_replicas_safe_and_live_in_a_synchronous_cluster() {
    for n in [4usize, 7] {
        for behaviour in Behaviour::ALL {
            for bad in [1u16, 3] {
                let (c, cores) = cluster(n, bad, &behaviour.to_string());
                let outcome = run(&c, cores, bad, 60_000);
                assert_safe_and_live(&outcome, bad, n as u16, TARGET_BLOCKS);
                let from_honest: usize =
                    outcome.refused_from.iter().filter(|(i, _)| **i != bad).map(|(_, e)| e.len()).sum();
                assert_eq!(from_honest, 0, "{behaviour}: honest messages refused: {outcome:?}");
                let evidence: Vec<&Evidence> =
                    outcome.evidence.iter().filter(|(i, _)| **i != bad).flat_map(|(_, e)| e.iter()).collect();
                assert!(
                    evidence.iter().all(|e| e.offender == ReplicaId(bad)),
                    "{behaviour}: evidence names an honest replica"
                );
                let refused = outcome.refused_from.get(&bad).map_or(0, Vec::len);
                match behaviour {
                    Behaviour::Equivocate { .. } | Behaviour::DoubleVote => {
                        assert!(!evidence.is_empty(), "{behaviour} (n = {n}, bad = {bad}) left no evidence")
                    }
                    Behaviour::BadSignature | Behaviour::ForgeQc { .. } | Behaviour::ForgeTc { .. } => {
                        assert!(refused > 0, "{behaviour}: nothing was refused")
                    }
                    Behaviour::WrongStateDigest => {
                        assert!(outcome.digest_mismatches > 0, "the wrong digest was not noticed")
                    }
                    _ => {}
                }
            }
        }
    }
}

#[test]
fn forged_certificates_fail_verification_for_each_defect() {
    for defect in CertDefect::ALL {
        for which in ["forge-qc", "forge-tc"] {
            let (c, cores) = cluster(4, 2, &format!("{which}={}", defect.name()));
            let outcome = run(&c, cores, 2, 20_000);
            let errors = outcome.refused_from.get(&2).cloned().unwrap_or_default();
            assert!(!errors.is_empty(), "{which}={}: nothing refused", defect.name());
            for e in errors {
                assert!(
                    matches!(
                        e,
                        VerifyError::QuorumCert(_)
                            | VerifyError::TimeoutCert(_)
                            | VerifyError::BadGenesisCertificate
                            | VerifyError::MalformedTimeoutCert
                    ),
                    "{which}={}: {e}",
                    defect.name()
                );
            }
        }
    }
}

#[test]
fn round_jumps_near_the_end_of_the_round_space_do_not_move_honest_replicas() {
    let (c, cores) = cluster(4, 1, "round-jump");
    let outcome = run(&c, cores, 1, 60_000);
    assert_safe_and_live(&outcome, 1, 4, TARGET_BLOCKS);
    assert!(outcome.refused_from.is_empty(), "jumped messages are validly signed: {outcome:?}");
}

#[test]
fn a_silent_replica_only_costs_the_rounds_it_leads() {
    let (c, cores) = cluster(4, 0, "silent");
    let outcome = run(&c, cores, 0, 60_000);
    assert_safe_and_live(&outcome, 0, 4, TARGET_BLOCKS);
}

#[test]
fn jumped_rounds_are_led_by_the_forger_even_at_the_end_of_the_round_space() {
    for n in [4usize, 7] {
        let (c, keys) = committee(n);
        for id in 0..n as u16 {
            let forger = Forger::new(ReplicaId(id), key(&keys, id), c.clone(), 1);
            for target in [1, 5, 1_000_000, u64::MAX - 3, u64::MAX - 1, u64::MAX] {
                let round = super::hotstuff::led_round(&forger, Round(target));
                assert_eq!(round.0 % n as u64, u64::from(id), "n = {n}, id = {id}, target = {target}");
                assert!(round.0.abs_diff(target) < n as u64, "n = {n}, id = {id}, target = {target}");
            }
        }
    }
}
