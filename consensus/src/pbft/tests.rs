//! PBFT rule tests: a tiny in-memory committee, and the checks each message must pass.

use std::collections::VecDeque;

use bulwark_crypto::{Committee, KeyPair, QuorumSignatures, ReplicaId, Signed, Verified, Verify};

use super::*;
use crate::hotstuff::TimeoutPolicy;
use crate::protocol::{Actions, Height, Input, Payload, Protocol, Recipient, Round, Time};

fn committee() -> (Committee, Vec<KeyPair>) {
    Committee::deterministic("pbft-unit", 4, 9000).unwrap()
}

fn replica(committee: &Committee, keys: &[KeyPair], i: usize, recovery: Recovery) -> Pbft {
    let cfg = Config {
        id: committee.members()[i].id,
        committee: committee.clone(),
        key: KeyPair::from_seed(*keys[i].secret_bytes()),
        timeouts: TimeoutPolicy { base_ms: 500, max_ms: 8_000 },
        pipeline: 4,
    };
    Pbft::recover(cfg, recovery)
}

/// Delivers every message at once, answers payload requests with `payloads` in turn
/// (then empty ones), executes commits; returns each replica's committed payloads.
fn run_committee(payloads: &[&[u8]], steps: usize) -> Vec<Vec<(Height, Payload)>> {
    let (committee, keys) = committee();
    let mut nodes: Vec<Pbft> = (0..4).map(|i| replica(&committee, &keys, i, Recovery::default())).collect();
    let mut queue: VecDeque<(usize, Input<Message, Record>)> = (0..4).map(|i| (i, Input::Start)).collect();
    let mut wanted: VecDeque<&[u8]> = payloads.iter().copied().collect();
    let mut committed = vec![Vec::new(); 4];
    for _ in 0..steps {
        let Some((i, input)) = queue.pop_front() else { break };
        let actions: Actions<Message, Record> = nodes[i].handle(Time(0), input);
        let from = nodes[i].id();
        for out in actions.send {
            for (j, node) in nodes.iter().enumerate() {
                let to_it = match out.to {
                    Recipient::AllOthers => node.id() != from,
                    Recipient::One(id) => node.id() == id,
                };
                if to_it {
                    let msg = Verified::check(out.msg.clone(), &committee).unwrap();
                    queue.push_back((j, Input::Message { from, msg }));
                }
            }
        }
        for block in actions.commit {
            committed[i].push((block.height, block.payload.clone()));
            queue.push_back((i, Input::Executed { height: block.height, state_digest: Digest::ZERO }));
        }
        if let Some(request) = actions.want_payload
            && let Some(bytes) = wanted.pop_front()
        {
            queue.push_back((i, Input::Payload { round: request.round, payload: Payload(bytes.to_vec()) }));
        }
    }
    committed
}

use bulwark_crypto::Digest;

#[test]
fn a_committee_commits_the_primarys_batches_in_order_everywhere() {
    let committed = run_committee(&[b"one", b"two", b"three"], 10_000);
    let expected: Vec<(Height, Payload)> = [b"one".as_slice(), b"two", b"three"]
        .iter()
        .enumerate()
        .map(|(i, p)| (Height(i as u64 + 1), Payload(p.to_vec())))
        .collect();
    for log in committed {
        assert_eq!(log, expected);
    }
}

fn order(view: u64, seq: u64, payload: &[u8]) -> Order {
    Order { view: Round(view), seq: Height(seq), digest: batch_digest(&Payload(payload.to_vec())) }
}

fn pre_prepare(keys: &[KeyPair], committee: &Committee, signer: usize, o: Order, payload: &[u8]) -> Message {
    Message::PrePrepare(PrePrepare {
        order: SignedOrder::sign(o, &keys[signer], committee),
        payload: Payload(payload.to_vec()),
    })
}

#[test]
fn only_the_views_primary_may_pre_prepare_and_it_never_prepares() {
    let (committee, keys) = committee();
    let o = order(1, 1, b"x");
    assert!(pre_prepare(&keys, &committee, 1, o, b"x").verify(&committee).is_ok());
    assert!(pre_prepare(&keys, &committee, 2, o, b"x").verify(&committee).is_err());
    assert!(pre_prepare(&keys, &committee, 1, o, b"y").verify(&committee).is_err(), "payload must match");
    let from_primary = Vote::sign(Phase::Prepare, o, committee.members()[1].id, &keys[1], &committee);
    assert!(Message::Prepare(from_primary).verify(&committee).is_err());
    let backup = Vote::sign(Phase::Prepare, o, committee.members()[2].id, &keys[2], &committee);
    assert!(Message::Prepare(backup).verify(&committee).is_ok());
    assert!(Message::Commit(backup).verify(&committee).is_err(), "a prepare is not a commit");
}

fn prepared(keys: &[KeyPair], committee: &Committee, o: Order, preparers: &[usize]) -> PreparedCert {
    let primary = committee.position(primary(committee, o.view)).unwrap();
    let prepares = preparers
        .iter()
        .map(|&i| {
            let v = Vote::sign(Phase::Prepare, o, committee.members()[i].id, &keys[i], committee);
            (v.signer, v.signature)
        })
        .collect();
    PreparedCert {
        pre_prepare: SignedOrder::sign(o, &keys[primary], committee),
        prepares: QuorumSignatures::new(prepares),
    }
}

fn view_change(
    keys: &[KeyPair],
    committee: &Committee,
    i: usize,
    view: u64,
    certs: Vec<PreparedCert>,
) -> Signed<ViewChangeData> {
    let data =
        ViewChangeData { view: Round(view), stable: CheckpointCert::genesis(committee), prepared: certs };
    Signed::sign(data, committee.members()[i].id, &keys[i], committee.chain_id()).into_inner()
}

#[test]
fn prepared_certificates_need_2f_backups_and_not_the_primary() {
    let (committee, keys) = committee();
    let o = order(1, 1, b"x");
    assert!(prepared(&keys, &committee, o, &[2, 3]).verify(&committee).is_ok());
    assert!(prepared(&keys, &committee, o, &[2]).verify(&committee).is_err());
    assert!(prepared(&keys, &committee, o, &[1, 2]).verify(&committee).is_err());
}

#[test]
fn a_new_view_keeps_the_highest_prepared_batch_and_fills_gaps_with_null_requests() {
    let (committee, keys) = committee();
    let low = prepared(&keys, &committee, order(0, 1, b"old"), &[1, 2]);
    let high = prepared(&keys, &committee, order(1, 1, b"new"), &[2, 3]);
    let third = prepared(&keys, &committee, order(1, 3, b"third"), &[2, 3]);
    let vcs = vec![
        view_change(&keys, &committee, 0, 2, vec![low]),
        view_change(&keys, &committee, 1, 2, vec![high.clone(), third.clone()]),
        view_change(&keys, &committee, 3, 2, vec![]),
    ];
    let plan = plan_new_view(&vcs).unwrap();
    assert_eq!(
        plan.orders,
        vec![(Height(1), high.order().digest), (Height(2), null_digest()), (Height(3), third.order().digest)]
    );
    // The new primary (position 2) signs it; a backup re-checks it against the view changes.
    let sign = |orders: &[(Height, Digest)]| {
        let pre_prepares = orders
            .iter()
            .map(|(seq, digest)| {
                SignedOrder::sign(Order { view: Round(2), seq: *seq, digest: *digest }, &keys[2], &committee)
            })
            .collect();
        let data = NewViewData { view: Round(2), view_changes: vcs.clone(), pre_prepares };
        Message::NewView(
            Signed::sign(data, committee.members()[2].id, &keys[2], committee.chain_id()).into_inner(),
        )
    };
    assert!(sign(&plan.orders).verify(&committee).is_ok());
    let mut forgetful = plan.orders.clone();
    forgetful[0].1 = null_digest();
    assert_eq!(sign(&forgetful).verify(&committee), Err(VerifyError::NewViewMismatch));
    assert_eq!(sign(&plan.orders[..2]).verify(&committee), Err(VerifyError::NewViewMismatch));
}

#[test]
fn a_prepare_leaves_only_with_its_accepted_order_persisted() {
    let (committee, keys) = committee();
    let mut backup = replica(&committee, &keys, 1, Recovery::default());
    backup.handle(Time(0), Input::Start);
    let o = order(0, 1, b"x");
    let msg = Verified::check(pre_prepare(&keys, &committee, 0, o, b"x"), &committee).unwrap();
    let actions = backup.handle(Time(1), Input::Message { from: committee.members()[0].id, msg });
    assert!(actions.send.iter().any(|s| matches!(&s.msg, Message::Prepare(v) if v.order == o)));
    let safety = actions.persist.iter().find_map(|r| match r {
        Record::Safety(s) => Some(s.clone()),
        _ => None,
    });
    let safety = safety.expect("the safety state is persisted in the same step");
    assert!(safety.accepted.iter().any(|a| a.order == o));

    // Restarted from that state, it refuses a conflicting pre-prepare for the slot and
    // records the primary's equivocation.
    let mut restarted =
        replica(&committee, &keys, 1, Recovery { safety: Some(safety), ..Recovery::default() });
    restarted.handle(Time(2), Input::Start);
    let other = order(0, 1, b"y");
    let msg = Verified::check(pre_prepare(&keys, &committee, 0, other, b"y"), &committee).unwrap();
    let actions = restarted.handle(Time(3), Input::Message { from: committee.members()[0].id, msg });
    assert!(actions.send.is_empty(), "no second prepare for sequence 1 in view 0");
    assert_eq!(actions.evidence.len(), 1);
    assert_eq!(actions.evidence[0].offender, ReplicaId(committee.members()[0].id.0));
}

#[test]
fn state_transfer_entries_must_be_consecutive_and_proven() {
    let (committee, keys) = committee();
    let o = order(0, 1, b"x");
    let commits = (0..3)
        .map(|i| {
            let v = Vote::sign(Phase::Commit, o, committee.members()[i].id, &keys[i], &committee);
            (v.signer, v.signature)
        })
        .collect();
    let entry = CommittedEntry {
        cert: CommitCert { order: o, commits: QuorumSignatures::new(commits) },
        payload: Payload(b"x".to_vec()),
        parent: genesis_log_digest(&committee),
    };
    assert!(Message::LogEntries(vec![entry.clone()]).verify(&committee).is_ok());
    let mut short = entry.clone();
    short.cert.commits = QuorumSignatures::new(short.cert.commits.signatures()[..2].to_vec());
    assert!(Message::LogEntries(vec![short]).verify(&committee).is_err());
    let mut swapped = entry.clone();
    swapped.payload = Payload(b"y".to_vec());
    assert!(Message::LogEntries(vec![swapped]).verify(&committee).is_err());
    assert!(Message::LogEntries(vec![entry.clone(), entry]).verify(&committee).is_err());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    #[test]
    fn random_bytes_never_decode_into_a_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
        let (committee, _) = committee();
        if let Ok(msg) = bulwark_crypto::codec::decode::<Message>(&bytes, <Message as crate::WireMessage>::MAX_ENCODED_BYTES) {
            let _ = Verified::check(msg, &committee);
        }
    }

    #[test]
    fn votes_and_pre_prepares_round_trip_through_the_codec(
        view in 0u64..1_000_000,
        seq in 1u64..1_000_000,
        payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
    ) {
        let (committee, keys) = committee();
        let o = Order { view: Round(view), seq: Height(seq), digest: batch_digest(&Payload(payload.clone())) };
        let signer = committee.position(primary(&committee, o.view)).unwrap();
        let backup = (signer + 1) % 4;
        let vote = Vote::sign(Phase::Commit, o, committee.members()[backup].id, &keys[backup], &committee);
        for msg in [pre_prepare(&keys, &committee, signer, o, &payload), Message::Commit(vote)] {
            let bytes = bulwark_crypto::codec::encode(&msg).unwrap();
            let back: Message = bulwark_crypto::codec::decode(&bytes, 1 << 20).unwrap();
            proptest::prop_assert!(back.verify(&committee).is_ok());
            proptest::prop_assert_eq!(back, msg);
        }
    }
}

#[test]
fn an_oversized_payload_still_yields_a_pre_prepare() {
    let (committee, keys) = committee();
    let mut primary_replica = replica(&committee, &keys, 0, Recovery::default());
    let start = primary_replica.handle(Time(0), Input::Start);
    let request = start.want_payload.expect("replica 0 leads view 0");
    let too_big = Payload(vec![0; MAX_PAYLOAD_BYTES + 1]);
    let actions = primary_replica.handle(Time(1), Input::Payload { round: request.round, payload: too_big });
    let ordered = actions.send.iter().find_map(|o| match &o.msg {
        Message::PrePrepare(p) => Some(p.payload.clone()),
        _ => None,
    });
    assert_eq!(ordered, Some(Payload::default()));
}
