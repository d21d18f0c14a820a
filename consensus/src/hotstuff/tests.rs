//! Unit tests of each HotStuff rule, driving the core through its public interface.

use bulwark_crypto::{Committee, Digest, KeyPair, QuorumSignatures, ReplicaId, Signed, Verified, codec};
use proptest::prelude::*;

use super::*;
use crate::protocol::{
    Actions, Event, Height, Input, Payload, Protocol, Recipient, Round, Time, WireMessage,
};

struct Fixture {
    committee: Committee,
    keys: Vec<KeyPair>,
}

impl Fixture {
    fn new(n: usize) -> Fixture {
        let (committee, keys) = Committee::deterministic("unit", n, 7000).unwrap();
        Fixture { committee, keys }
    }

    fn config(&self, id: u16) -> Config {
        Config {
            id: ReplicaId(id),
            committee: self.committee.clone(),
            key: KeyPair::from_seed(*self.keys[id as usize].secret_bytes()),
            timeouts: TimeoutPolicy { base_ms: 1000, max_ms: 8000 },
            sync_batch: 16,
        }
    }

    fn core(&self, id: u16) -> HotStuff {
        let mut core = HotStuff::new(self.config(id));
        core.handle(Time(0), Input::Start);
        core
    }

    fn qc(&self, block: &Block, signers: &[u16]) -> QuorumCert {
        let vote = VoteData { block: block.digest(), round: block.round, height: block.height };
        let sigs = signers
            .iter()
            .map(|&i| {
                (
                    ReplicaId(i),
                    self.keys[i as usize].sign(
                        bulwark_crypto::Domain::Vote,
                        self.committee.chain_id(),
                        &vote,
                    ),
                )
            })
            .collect();
        QuorumCert { vote, signatures: QuorumSignatures::new(sigs) }
    }

    fn block(&self, round: u64, parent: &Block, justify: QuorumCert, author: u16) -> Block {
        Block {
            round: Round(round),
            height: parent.height.next(),
            parent: parent.digest(),
            justify,
            author: ReplicaId(author),
            executed: ExecutionClaim::default(),
            payload: Payload(vec![round as u8]),
        }
    }

    fn proposal(&self, block: Block, tc: Option<TimeoutCert>) -> Message {
        let author = block.author.0 as usize;
        Message::Proposal(Proposal::new(block, &self.keys[author], &self.committee, tc))
    }

    fn verified(&self, msg: Message) -> Verified<Message> {
        Verified::check(msg, &self.committee).unwrap()
    }

    fn timeout(&self, who: u16, round: u64, high_qc: &QuorumCert) -> Message {
        let data = TimeoutData { round: Round(round), high_qc_round: high_qc.round() };
        let timeout = Signed::sign(data, ReplicaId(who), &self.keys[who as usize], self.committee.chain_id())
            .into_inner();
        Message::Timeout(TimeoutMsg { timeout, high_qc: high_qc.clone(), last_round_tc: None })
    }
}

fn votes(actions: &Actions<Message, Record>) -> Vec<(Recipient, Signed<VoteData>)> {
    actions
        .send
        .iter()
        .filter_map(|o| match &o.msg {
            Message::Vote(v) => Some((o.to, v.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn replica_votes_for_a_valid_proposal_and_persists_safety_first() {
    let fx = Fixture::new(4);
    let mut core = fx.core(3);
    let genesis = Block::genesis(&fx.committee);
    // Round 1 is led by replica 1 (round-robin over ids 0..4), round 2 by replica 2.
    let b1 = fx.block(1, &genesis, QuorumCert::genesis(&fx.committee), 1);
    let actions = core.handle(
        Time(1),
        Input::Message { from: ReplicaId(1), msg: fx.verified(fx.proposal(b1.clone(), None)) },
    );
    let sent = votes(&actions);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, Recipient::One(ReplicaId(2)), "the vote goes to the next round's leader");
    // The block and the safety state recording the vote are in `persist` of the same
    // step; hosts persist before sending.
    assert!(actions.persist.iter().any(|r| matches!(r, Record::Block(b) if *b == b1)));
    assert!(
        actions.persist.iter().any(|r| matches!(r, Record::Safety(s) if s.highest_vote_round == Round(1)))
    );
}

#[test]
fn a_vote_at_or_below_the_last_voted_round_is_refused() {
    let fx = Fixture::new(4);
    let genesis_qc = QuorumCert::genesis(&fx.committee);
    let mut rules = SafetyRules::new(SafetyState {
        highest_vote_round: Round(5),
        locked_round: Round(3),
        last_proposed_round: Round(0),
        high_qc: genesis_qc,
        last_tc: None,
    });
    assert!(matches!(rules.check_vote(Round(5), Round(4), None), Err(Refusal::AlreadyVoted { .. })));
    assert!(matches!(rules.check_vote(Round(4), Round(3), None), Err(Refusal::AlreadyVoted { .. })));
    assert_eq!(rules.check_vote(Round(6), Round(5), None), Ok(()));
    // Not consecutive and no TC: refused.
    assert_eq!(rules.check_vote(Round(7), Round(5), None), Err(Refusal::NotSafeToExtend));
    rules.record_vote(Round(6), Round(5));
    assert!(rules.check_vote(Round(6), Round(5), None).is_err(), "one vote per round");
    // Never time out below the last vote.
    assert!(rules.check_timeout(Round(5)).is_err());
}

#[test]
fn a_second_proposal_in_the_same_round_gets_no_vote_and_leaves_evidence() {
    let fx = Fixture::new(4);
    let mut core = fx.core(3);
    let genesis = Block::genesis(&fx.committee);
    let qc0 = QuorumCert::genesis(&fx.committee);
    let a = fx.block(1, &genesis, qc0.clone(), 1);
    let mut b = a.clone();
    b.payload = Payload(vec![9, 9]);
    let first =
        core.handle(Time(1), Input::Message { from: ReplicaId(1), msg: fx.verified(fx.proposal(a, None)) });
    assert_eq!(votes(&first).len(), 1);
    let second =
        core.handle(Time(2), Input::Message { from: ReplicaId(1), msg: fx.verified(fx.proposal(b, None)) });
    assert!(votes(&second).is_empty());
    assert_eq!(second.evidence.len(), 1);
    assert_eq!(second.evidence[0].offender, ReplicaId(1));
}

#[test]
fn a_proposal_with_an_invalid_qc_is_refused() {
    let fx = Fixture::new(4);
    let genesis = Block::genesis(&fx.committee);
    let b1 = fx.block(1, &genesis, QuorumCert::genesis(&fx.committee), 1);
    // Only 2f = 2 signers.
    let thin = fx.qc(&b1, &[0, 1]);
    let b2 = fx.block(2, &b1, thin, 2);
    let err = Verified::check(fx.proposal(b2, None), &fx.committee).unwrap_err();
    assert!(matches!(
        err,
        VerifyError::QuorumCert(bulwark_crypto::CryptoError::InsufficientSigners { got: 2, need: 3 })
    ));
    // A duplicated signer.
    let mut dup = fx.qc(&b1, &[0, 1]);
    let sigs: Vec<_> =
        dup.signatures.signatures().iter().copied().chain([dup.signatures.signatures()[0]]).collect();
    dup.signatures = QuorumSignatures::new(sigs);
    let b2 = fx.block(2, &b1, dup, 2);
    assert!(matches!(
        Verified::check(fx.proposal(b2, None), &fx.committee),
        Err(VerifyError::QuorumCert(bulwark_crypto::CryptoError::DuplicateSigner(_)))
    ));
    // A forged round-0 certificate.
    let mut forged = QuorumCert::genesis(&fx.committee);
    forged.vote.block = Digest([7; 32]);
    let b = Block { parent: forged.block(), ..fx.block(1, &genesis, forged, 1) };
    assert_eq!(
        Verified::check(fx.proposal(b, None), &fx.committee).unwrap_err(),
        VerifyError::BadGenesisCertificate
    );
}

#[test]
fn two_f_signatures_do_not_form_a_qc() {
    for n in [4, 7] {
        let fx = Fixture::new(n);
        let genesis = Block::genesis(&fx.committee);
        let b1 = fx.block(1, &genesis, QuorumCert::genesis(&fx.committee), 1);
        let two_f: Vec<u16> = (0..(2 * fx.committee.max_faulty()) as u16).collect();
        assert!(fx.qc(&b1, &two_f).verify(&fx.committee).is_err());
        let quorum: Vec<u16> = (0..fx.committee.quorum() as u16).collect();
        assert!(fx.qc(&b1, &quorum).verify(&fx.committee).is_ok());
    }
}

#[test]
fn a_tc_advances_the_round() {
    let fx = Fixture::new(4);
    let mut core = fx.core(0);
    assert_eq!(core.round(), Round(1));
    let qc0 = QuorumCert::genesis(&fx.committee);
    let mut events = Vec::new();
    for who in [1u16, 2, 3] {
        let actions = core.handle(
            Time(5),
            Input::Message { from: ReplicaId(who), msg: fx.verified(fx.timeout(who, 1, &qc0)) },
        );
        events.extend(actions.events);
    }
    assert_eq!(core.round(), Round(2));
    assert!(events.contains(&Event::TimeoutCertificate { round: Round(1) }));
    assert!(
        events.iter().any(|e| matches!(e, Event::EnteredRound { round: Round(2), via_timeout: true, .. }))
    );
}

#[test]
fn f_plus_one_timeouts_make_a_replica_time_out_early() {
    let fx = Fixture::new(4);
    let mut core = fx.core(0);
    let qc0 = QuorumCert::genesis(&fx.committee);
    core.handle(Time(5), Input::Message { from: ReplicaId(1), msg: fx.verified(fx.timeout(1, 1, &qc0)) });
    let actions =
        core.handle(Time(6), Input::Message { from: ReplicaId(2), msg: fx.verified(fx.timeout(2, 1, &qc0)) });
    assert!(
        actions
            .send
            .iter()
            .any(|o| matches!(&o.msg, Message::Timeout(t) if t.timeout.signer == ReplicaId(0)))
    );
    assert!(
        actions.persist.iter().any(|r| matches!(r, Record::Safety(s) if s.highest_vote_round == Round(1)))
    );
}

#[test]
fn local_timer_backs_off_and_resends_the_timeout() {
    let fx = Fixture::new(4);
    let mut core = fx.core(1);
    let first_deadline = core.next_deadline().unwrap();
    assert_eq!(first_deadline, Time(1000));
    let a = core.handle(first_deadline, Input::Timeout);
    assert!(a.send.iter().any(|o| matches!(o.msg, Message::Timeout(_))));
    let second_deadline = core.next_deadline().unwrap();
    assert_eq!(second_deadline, Time(1000 + 2000), "exponential backoff");
    let b = core.handle(second_deadline, Input::Timeout);
    assert!(b.send.iter().any(|o| matches!(o.msg, Message::Timeout(_))), "resent while stuck");
    assert!(b.persist.is_empty(), "a resend signs nothing new");
    assert_eq!(TimeoutPolicy { base_ms: 1000, max_ms: 8000 }.duration(10), 8000, "capped");
}

#[test]
fn a_block_whose_state_digest_disagrees_with_local_execution_is_flagged() {
    let fx = Fixture::new(4);
    let mut core = fx.core(2);
    let genesis = Block::genesis(&fx.committee);
    let b1 = fx.block(1, &genesis, QuorumCert::genesis(&fx.committee), 1);
    core.handle(
        Time(1),
        Input::Message { from: ReplicaId(1), msg: fx.verified(fx.proposal(b1.clone(), None)) },
    );
    // Replica 2 leads round 2: pretend it formed QC(b1) and executed height 1.
    core.handle(Time(2), Input::Executed { height: Height(1), state_digest: Digest([1; 32]) });
    let qc1 = fx.qc(&b1, &[0, 1, 2]);
    let mut b2 = fx.block(2, &b1, qc1, 2);
    b2.executed = ExecutionClaim { height: Height(1), state_digest: Digest([66; 32]) };
    let b2_proposal = {
        let proposal = Proposal::new(b2, &fx.keys[2], &fx.committee, None);
        fx.verified(Message::Proposal(proposal))
    };
    let mut core3 = fx.core(3);
    core3.handle(Time(1), Input::Message { from: ReplicaId(1), msg: fx.verified(fx.proposal(b1, None)) });
    core3.handle(Time(2), Input::Executed { height: Height(1), state_digest: Digest([1; 32]) });
    let actions = core3.handle(Time(3), Input::Message { from: ReplicaId(2), msg: b2_proposal });
    assert!(
        actions.events.iter().any(|e| matches!(
            e,
            Event::StateDigestMismatch { height: Height(1), proposer: ReplicaId(2), .. }
        ))
    );
    assert!(votes(&actions).is_empty(), "no vote for a block built on a diverged state");
}

#[test]
fn two_chain_rule_commits_the_parent_of_a_certified_consecutive_child() {
    let fx = Fixture::new(4);
    let mut core = fx.core(0);
    let genesis = Block::genesis(&fx.committee);
    let b1 = fx.block(1, &genesis, QuorumCert::genesis(&fx.committee), 1);
    let b2 = fx.block(2, &b1, fx.qc(&b1, &[0, 1, 2]), 2);
    let b3 = fx.block(3, &b2, fx.qc(&b2, &[1, 2, 3]), 3);
    let mut committed = Vec::new();
    for (b, from) in [(b1.clone(), 1), (b2, 2), (b3, 3)] {
        let a = core.handle(
            Time(1),
            Input::Message { from: ReplicaId(from), msg: fx.verified(fx.proposal(b, None)) },
        );
        committed.extend(a.commit);
    }
    // b3 carries QC(b2); b2 (round 2) is b1's (round 1) child in the next round: b1 commits.
    assert_eq!(committed.len(), 1);
    assert_eq!(committed[0].digest, b1.digest());
    assert_eq!(committed[0].height, Height(1));
}

#[test]
fn a_restarted_replica_does_not_vote_twice_in_a_round() {
    let fx = Fixture::new(4);
    let mut core = fx.core(2);
    let genesis = Block::genesis(&fx.committee);
    let b1 = fx.block(1, &genesis, QuorumCert::genesis(&fx.committee), 1);
    let actions = core.handle(
        Time(1),
        Input::Message { from: ReplicaId(1), msg: fx.verified(fx.proposal(b1.clone(), None)) },
    );
    let safety = actions.persist.iter().rev().find_map(|r| match r {
        Record::Safety(s) => Some(s.clone()),
        _ => None,
    });
    let mut restarted =
        HotStuff::recover(fx.config(2), Recovery { safety, blocks: vec![b1.clone()], ..Recovery::default() });
    restarted.handle(Time(10), Input::Start);
    let mut other = b1;
    other.payload = Payload(vec![42]);
    let again = restarted
        .handle(Time(11), Input::Message { from: ReplicaId(1), msg: fx.verified(fx.proposal(other, None)) });
    assert!(votes(&again).is_empty());
}

#[test]
fn a_replica_missing_an_ancestor_asks_for_it_and_resumes() {
    let fx = Fixture::new(4);
    let mut core = fx.core(0);
    let genesis = Block::genesis(&fx.committee);
    let b1 = fx.block(1, &genesis, QuorumCert::genesis(&fx.committee), 1);
    let b2 = fx.block(2, &b1, fx.qc(&b1, &[0, 1, 2]), 2);
    let a = core.handle(
        Time(1),
        Input::Message { from: ReplicaId(2), msg: fx.verified(fx.proposal(b2.clone(), None)) },
    );
    let request = a.send.iter().find_map(|o| match &o.msg {
        Message::SyncRequest(r) => Some((o.to, *r)),
        _ => None,
    });
    let (to, request) = request.expect("asks for the missing parent");
    assert_eq!((to, request.block), (Recipient::One(ReplicaId(2)), b1.digest()));
    assert!(votes(&a).is_empty());
    // An unrelated block is refused; the right one is inserted and the vote follows.
    let wrong = SyncResponse { blocks: vec![fx.block(1, &genesis, QuorumCert::genesis(&fx.committee), 3)] };
    let w = core.handle(
        Time(2),
        Input::Message { from: ReplicaId(2), msg: fx.verified(Message::SyncResponse(wrong)) },
    );
    assert!(votes(&w).is_empty());
    let response = SyncResponse { blocks: vec![b1] };
    let r = core.handle(
        Time(3),
        Input::Message { from: ReplicaId(2), msg: fx.verified(Message::SyncResponse(response)) },
    );
    assert_eq!(votes(&r).len(), 1, "votes for round 2 once the ancestor arrived");
}

/// A replica that missed a stretch of blocks longer than one sync response while
/// proposals kept arriving: it walks back to the gap and commits again, without
/// waiting for a timeout (rounds keep advancing, so none fires).
#[test]
fn a_replica_behind_by_many_blocks_while_proposals_keep_coming_catches_up() {
    let fx = Fixture::new(4);
    let mut core = fx.core(0);
    let genesis = Block::genesis(&fx.committee);
    let mut chain = vec![genesis.clone()];
    let mut justify = QuorumCert::genesis(&fx.committee);
    for round in 1..=200u64 {
        let block = fx.block(round, chain.last().unwrap(), justify, (round % 4) as u16);
        justify = fx.qc(&block, &[0, 1, 2]);
        chain.push(block);
    }
    let by_digest: std::collections::HashMap<Digest, usize> =
        chain.iter().enumerate().map(|(i, b)| (b.digest(), i)).collect();
    let mut now = 0;
    let mut requests = Vec::new();
    let mut feed =
        |core: &mut HotStuff, from: u16, msg: Message, requests: &mut Vec<(ReplicaId, SyncRequest)>| {
            now += 5;
            let actions =
                core.handle(Time(now), Input::Message { from: ReplicaId(from), msg: fx.verified(msg) });
            requests.extend(actions.send.iter().filter_map(|o| match (&o.msg, o.to) {
                (Message::SyncRequest(r), Recipient::One(to)) => Some((to, *r)),
                _ => None,
            }));
        };
    // Blocks 1..=10 arrive; 11..=60 are lost; 61..=200 arrive before any answer.
    for height in (1..=10).chain(61..=200) {
        let block = chain[height].clone();
        let author = block.author.0;
        feed(&mut core, author, fx.proposal(block, None), &mut requests);
    }
    assert!(core.committed_height() < Height(10));
    // Peers answer every request (from the chain they hold), as many times as asked.
    for _ in 0..100 {
        let pending = std::mem::take(&mut requests);
        if pending.is_empty() {
            break;
        }
        for (to, request) in pending {
            let Some(&end) = by_digest.get(&request.block) else { continue };
            let start = end.saturating_sub(request.max_blocks as usize - 1).max(1);
            let blocks: Vec<Block> = chain[start..=end].iter().rev().cloned().collect();
            feed(&mut core, to.0, Message::SyncResponse(SyncResponse { blocks }), &mut requests);
        }
    }
    assert_eq!(core.committed_height(), Height(198), "commits up to the tip's grandparent");
}

#[test]
fn sync_requests_for_pruned_blocks_are_answered_from_storage() {
    let fx = Fixture::new(4);
    let mut core = fx.core(0);
    let request = SyncRequest { block: Digest([5; 32]), max_blocks: 8 };
    let a = core.handle(
        Time(1),
        Input::Message { from: ReplicaId(1), msg: fx.verified(Message::SyncRequest(request)) },
    );
    assert_eq!(a.load.len(), 1);
    let genesis = Block::genesis(&fx.committee);
    let b1 = fx.block(1, &genesis, QuorumCert::genesis(&fx.committee), 1);
    let load = crate::LoadRequest { key: b1.digest(), ..a.load[0] };
    let answered = core.handle(Time(2), Input::Loaded { request: load, records: vec![Record::Block(b1)] });
    assert!(
        answered
            .send
            .iter()
            .any(|o| o.to == Recipient::One(ReplicaId(1)) && matches!(o.msg, Message::SyncResponse(_)))
    );
}

fn arb_digest() -> impl Strategy<Value = Digest> {
    any::<[u8; 32]>().prop_map(Digest)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_message_round_trips_through_the_codec(round in 1u64..1_000_000, payload in proptest::collection::vec(any::<u8>(), 0..300),
                                                   parent in arb_digest(), signers in 0usize..4, claim in arb_digest()) {
        let fx = Fixture::new(4);
        let vote = VoteData { block: parent, round: Round(round - 1), height: Height(round) };
        let sigs = (0..signers).map(|i| (ReplicaId(i as u16), fx.keys[i].sign(bulwark_crypto::Domain::Vote, fx.committee.chain_id(), &vote))).collect();
        let qc = QuorumCert { vote, signatures: QuorumSignatures::new(sigs) };
        let block = Block { round: Round(round), height: Height(round + 1), parent, justify: qc.clone(), author: ReplicaId(1),
                            executed: ExecutionClaim { height: Height(round / 2), state_digest: claim }, payload: Payload(payload) };
        let tc = TimeoutCert { round: Round(round), groups: vec![(Round(round - 1), qc.signatures.clone())] };
        let timeout = Signed::sign(TimeoutData { round: Round(round), high_qc_round: Round(round - 1) }, ReplicaId(0), &fx.keys[0], fx.committee.chain_id()).into_inner();
        let messages = vec![
            Message::Proposal(Proposal::new(block.clone(), &fx.keys[1], &fx.committee, Some(tc.clone()))),
            Message::Vote(Signed::sign(vote, ReplicaId(2), &fx.keys[2], fx.committee.chain_id()).into_inner()),
            Message::Timeout(TimeoutMsg { timeout, high_qc: qc, last_round_tc: Some(tc) }),
            Message::SyncRequest(SyncRequest { block: parent, max_blocks: 3 }),
            Message::SyncResponse(SyncResponse { blocks: vec![block.clone()] }),
        ];
        for msg in messages {
            let bytes = codec::encode(&msg).unwrap();
            prop_assert_eq!(codec::decode::<Message>(&bytes, Message::MAX_ENCODED_BYTES).unwrap(), msg);
        }
        let record = Record::Block(block);
        let bytes = codec::encode(&record).unwrap();
        prop_assert_eq!(codec::decode::<Record>(&bytes, 1 << 20).unwrap(), record);
    }

    #[test]
    fn random_bytes_never_decode_into_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let fx = Fixture::new(4);
        if let Ok(msg) = codec::decode::<Message>(&bytes, Message::MAX_ENCODED_BYTES) {
            let _ = Verified::check(msg, &fx.committee);
        }
    }
}

#[test]
fn an_oversized_payload_still_yields_a_proposal() {
    let fx = Fixture::new(4);
    let mut core = HotStuff::new(fx.config(1));
    let start = core.handle(Time(0), Input::Start);
    let request = start.want_payload.expect("replica 1 leads round 1");
    let too_big = Payload(vec![0; MAX_PAYLOAD_BYTES + 1]);
    let actions = core.handle(Time(1), Input::Payload { round: request.round, payload: too_big });
    let proposed = actions.send.iter().find_map(|o| match &o.msg {
        Message::Proposal(p) => Some(p.block.payload.clone()),
        _ => None,
    });
    assert_eq!(proposed, Some(Payload::default()), "an empty block keeps the round alive");
}

#[test]
fn a_shortened_round_waits_a_quarter_of_the_timeout_for_one_timeout_in_a_row_then_backs_off_fully() {
    use crate::hotstuff::pacemaker::Pacemaker;
    let policy = TimeoutPolicy { base_ms: 1000, max_ms: 8000 };
    let mut normal = Pacemaker::new(policy);
    let mut shortened = Pacemaker::new(policy);
    assert!(normal.advance(Round(1), Time(0), false, RoundTimer::Full));
    assert!(shortened.advance(Round(1), Time(0), false, RoundTimer::Shortened));
    assert_eq!((normal.deadline(), shortened.deadline()), (Some(Time(1000)), Some(Time(250))));
    shortened.local_timeout(Time(250));
    assert_eq!(shortened.deadline(), Some(Time(250 + 500)), "one timeout in a row: still a quarter");
    shortened.local_timeout(Time(750));
    assert_eq!(shortened.deadline(), Some(Time(750 + 4000)), "two in a row: the full backoff");
    // A round entered by TC keeps the backoff; one entered by QC resets it.
    assert!(shortened.advance(Round(2), Time(800), true, RoundTimer::Shortened));
    assert_eq!(shortened.deadline(), Some(Time(800 + 4000)));
    assert!(shortened.advance(Round(3), Time(900), false, RoundTimer::Shortened));
    assert_eq!(shortened.deadline(), Some(Time(900 + 250)));
    // A skipped round waits 1/20 of the base timeout after one timeout in a row, and
    // the full backoff after two.
    let mut skipped = Pacemaker::new(policy);
    skipped.local_timeout(Time(0));
    assert!(skipped.advance(Round(4), Time(1000), true, RoundTimer::Skipped));
    assert_eq!(skipped.deadline(), Some(Time(1000 + 50)));
    skipped.local_timeout(Time(1050));
    assert_eq!(skipped.deadline(), Some(Time(1050 + 4000)));
}

#[test]
fn a_tc_makes_its_rounds_leader_suspected_until_one_of_its_blocks_is_certified() {
    let fx = Fixture::new(4);
    let mut core = fx.core(0);
    let qc0 = QuorumCert::genesis(&fx.committee);
    // Round 1 (led by replica 1) ends in a TC; replica 0 had not timed out itself.
    for who in [1u16, 2, 3] {
        let msg = fx.verified(fx.timeout(who, 1, &qc0));
        core.handle(Time(10), Input::Message { from: ReplicaId(who), msg });
    }
    assert_eq!(core.round(), Round(2));
    assert!(core.is_suspected(ReplicaId(1)));
    assert!(!core.is_suspected(ReplicaId(2)));
    // A certified block of a round replica 1 led clears it.
    let genesis = Block::genesis(&fx.committee);
    let b5 = fx.block(5, &genesis, qc0.clone(), 1);
    let qc5 = fx.qc(&b5, &[0, 1, 2]);
    let b6 = fx.block(6, &b5, qc5, 2);
    core.handle(Time(20), Input::Message { from: ReplicaId(2), msg: fx.verified(fx.proposal(b6, None)) });
    assert!(!core.is_suspected(ReplicaId(1)), "round 5's block (replica 1's) was certified");
}

#[test]
fn a_tc_of_a_round_we_voted_in_suspects_the_next_leader_and_skips_its_round() {
    let fx = Fixture::new(4);
    let mut core = fx.core(0);
    let qc0 = QuorumCert::genesis(&fx.committee);
    let genesis = Block::genesis(&fx.committee);
    // Replica 1 proposes round 1 and replica 0 votes (to replica 2, round 2's leader).
    let b1 = fx.block(1, &genesis, qc0.clone(), 1);
    let actions =
        core.handle(Time(10), Input::Message { from: ReplicaId(1), msg: fx.verified(fx.proposal(b1, None)) });
    assert_eq!(votes(&actions).len(), 1);
    // Replica 2 never certifies it: round 1 ends in a TC.
    for who in [1u16, 2, 3] {
        let msg = fx.verified(fx.timeout(who, 1, &qc0));
        core.handle(Time(1010), Input::Message { from: ReplicaId(who), msg });
    }
    assert_eq!(core.round(), Round(2));
    assert!(core.is_suspected(ReplicaId(2)), "round 2's leader had our vote and did nothing");
    assert!(!core.is_suspected(ReplicaId(1)), "round 1's leader proposed");
    assert_eq!(core.next_deadline(), Some(Time(1010 + 50)), "its round waits only a grace");
    // Replica 2 was alive after all: its proposal gives the round a fair (shortened) timer.
    let b2 = fx.block(2, &genesis, qc0.clone(), 2);
    let mut aggregator = TimeoutAggregator::default();
    let mut tc1 = None;
    for who in [1u16, 2, 3] {
        if let Message::Timeout(t) = fx.timeout(who, 1, &qc0)
            && let TimeoutOutcome::Formed(tc) = aggregator.add(&t.timeout, &fx.committee)
        {
            tc1 = Some(tc);
        }
    }
    let tc1 = tc1.expect("three timeouts form a TC");
    let actions = core.handle(
        Time(1020),
        Input::Message { from: ReplicaId(2), msg: fx.verified(fx.proposal(b2, Some(tc1))) },
    );
    assert_eq!(votes(&actions).len(), 1, "it votes for the proposal");
    // A quarter of the backed-off timeout: replica 0 timed out round 1 itself (it
    // joined the f+1 replicas that had), one timeout in a row.
    assert_eq!(core.next_deadline(), Some(Time(1020 + 2000 / 4)));
}

#[test]
fn votes_before_a_suspected_leaders_round_go_to_everyone_who_then_forms_the_qc() {
    let fx = Fixture::new(4);
    let mut core = fx.core(2);
    let qc0 = QuorumCert::genesis(&fx.committee);
    // Round 1 (replica 1's) ends in a TC: replica 1 is suspected.
    for who in [0u16, 1, 3] {
        let msg = fx.verified(fx.timeout(who, 1, &qc0));
        core.handle(Time(10), Input::Message { from: ReplicaId(who), msg });
    }
    assert!(core.is_suspected(ReplicaId(1)));
    // Round 4 (replica 0's) extends round 3's block; round 5 is replica 1's.
    let genesis = Block::genesis(&fx.committee);
    let b3 = fx.block(3, &genesis, qc0, 3);
    let b4 = fx.block(4, &b3, fx.qc(&b3, &[0, 1, 3]), 0);
    core.handle(Time(20), Input::Message { from: ReplicaId(3), msg: fx.verified(fx.proposal(b3, None)) });
    let actions = core.handle(
        Time(30),
        Input::Message { from: ReplicaId(0), msg: fx.verified(fx.proposal(b4.clone(), None)) },
    );
    let sent = votes(&actions);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, Recipient::AllOthers, "the vote goes to everyone, not only to replica 1");
    // Two more votes: replica 2 forms round 4's QC itself and enters round 5.
    for who in [0u16, 3] {
        let vote = VoteData { block: b4.digest(), round: b4.round, height: b4.height };
        let signed = Signed::sign(vote, ReplicaId(who), &fx.keys[who as usize], fx.committee.chain_id());
        let msg = fx.verified(Message::Vote(signed.into_inner()));
        core.handle(Time(40), Input::Message { from: ReplicaId(who), msg });
    }
    assert_eq!(core.high_qc().round(), Round(4));
    assert_eq!(core.round(), Round(5));
    // A replica that suspects no one still refuses votes for another leader's round.
    let mut fresh = fx.core(2);
    let vote = VoteData { block: b4.digest(), round: b4.round, height: b4.height };
    let signed = Signed::sign(vote, ReplicaId(0), &fx.keys[0], fx.committee.chain_id());
    let actions = fresh.handle(
        Time(40),
        Input::Message { from: ReplicaId(0), msg: fx.verified(Message::Vote(signed.into_inner())) },
    );
    assert!(
        actions
            .events
            .iter()
            .any(|e| matches!(e, Event::Refused { reason, .. } if reason.contains("does not lead")))
    );
}

/// Four cores on an instant, lossless network; replica 3 crashes once replica 0 is in
/// round 20. Returns the leaders of the rounds replica 0 entered after the crash and
/// replica 0's committed height at the end.
fn run_with_a_crashed_replica(rounds: u64) -> (Vec<ReplicaId>, Height) {
    let fx = Fixture::new(4);
    let mut cores: Vec<HotStuff> = (0..4).map(|i| HotStuff::new(fx.config(i))).collect();
    let mut queue: std::collections::VecDeque<(usize, Input<Message, Record>)> =
        (0..4).map(|i| (i, Input::Start)).collect();
    let mut now = Time(0);
    let mut crashed = false;
    let mut leaders_after = Vec::new();
    while cores[0].round() < Round(rounds) && now < Time(600_000) {
        while let Some((to, input)) = queue.pop_front() {
            if cores[0].round() >= Round(rounds) {
                break;
            }
            if crashed && to == 3 {
                continue;
            }
            let actions = cores[to].handle(now, input);
            for out in actions.send {
                let targets: Vec<usize> = match out.to {
                    Recipient::One(id) => vec![id.0 as usize],
                    Recipient::AllOthers => (0..4).filter(|i| *i != to).collect(),
                };
                for target in targets {
                    let msg = fx.verified(out.msg.clone());
                    queue.push_back((target, Input::Message { from: ReplicaId(to as u16), msg }));
                }
            }
            if let Some(request) = actions.want_payload {
                queue.push_back((to, Input::Payload { round: request.round, payload: Payload::default() }));
            }
            for event in actions.events {
                if let (0, Event::EnteredRound { leader, .. }) = (to, event)
                    && crashed
                {
                    leaders_after.push(leader);
                }
            }
            if !crashed && cores[0].round() >= Round(20) {
                crashed = true;
            }
        }
        // Nothing in flight: jump to the next timer.
        let Some(next) =
            (0..4).filter(|i| !crashed || *i != 3).filter_map(|i| cores[i].next_deadline()).min()
        else {
            break;
        };
        now = now.max(next);
        for i in 0..4 {
            queue.push_back((i, Input::Timeout));
        }
    }
    (leaders_after, cores[0].committed_height())
}

#[test]
fn a_crashed_leader_is_skipped_after_at_most_three_of_its_rounds() {
    let (leaders, height) = run_with_a_crashed_replica(200);
    assert!(leaders.len() > 150, "only {} rounds after the crash", leaders.len());
    let dead = leaders.iter().filter(|l| **l == ReplicaId(3)).count();
    // Round-robin would give it a quarter of the rounds (45 here).
    assert!(dead <= 3, "the crashed replica led {dead} of {} rounds after the crash", leaders.len());
    assert!(height > Height(150), "commits went on: height {height}");
}
