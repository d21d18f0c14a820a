//! Twins (Bano et al., "Twins: BFT Systems Made Robust", as used for DiemBFT): a
//! Byzantine replica is modelled by running two honest instances of it with the same
//! key. Each instance is honest on its own; together they equivocate, double-vote and
//! lie about what they saw, exactly as a real attacker could, without anyone writing
//! the attack. A scenario picks, for each of the first few rounds, the round's leader
//! and a partition of the instances; a message about round r is delivered only inside
//! round r's partition. The partitions heal at a fixed time, after which everything is
//! delivered, so liveness is checked too.

use std::fmt;

use bulwark_consensus::{Round, Time};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The partitions and leader of one round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TwinsRound {
    /// Position of the round's leader (both instances of a twinned leader propose).
    pub leader: usize,
    /// The group of each instance (instances `0..n` are the members, `n + k` is the
    /// twin of `twinned[k]`); messages only flow inside a group.
    pub groups: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TwinsScenario {
    /// Members that run twice (f of them).
    pub twinned: Vec<usize>,
    /// Rounds 1..=len.
    pub rounds: Vec<TwinsRound>,
    /// From this time on every message is delivered.
    pub heal: Time,
}

impl TwinsScenario {
    /// The scenario of `seed` for `nodes` members: f twinned members, 2–3 rounds, each
    /// with 2–3 groups and a leader (a twinned member half of the time).
    pub fn generate(nodes: usize, seed: u64) -> TwinsScenario {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7817_5eed);
        let f = (nodes - 1) / 3;
        let mut ids: Vec<usize> = (0..nodes).collect();
        ids.shuffle(&mut rng);
        let mut twinned: Vec<usize> = ids[..f.max(1)].to_vec();
        twinned.sort_unstable();
        let instances = nodes + twinned.len();
        let rounds = (0..rng.gen_range(2..=3))
            .map(|_| {
                let leader = if rng.gen_bool(0.5) {
                    twinned[rng.gen_range(0..twinned.len())]
                } else {
                    rng.gen_range(0..nodes)
                };
                let count = rng.gen_range(2..=3u8);
                let mut groups: Vec<u8> = (0..instances).map(|_| rng.gen_range(0..count)).collect();
                // Most interesting when the two instances of a twin are apart.
                for (k, &member) in twinned.iter().enumerate() {
                    if groups[member] == groups[nodes + k] && rng.gen_bool(0.8) {
                        groups[nodes + k] = (groups[member] + 1) % count;
                    }
                }
                TwinsRound { leader, groups }
            })
            .collect();
        TwinsScenario { twinned, rounds, heal: Time(3_000) }
    }

    /// Instances in the simulation: the members plus one per twin.
    pub fn instances(&self, nodes: usize) -> usize {
        nodes + self.twinned.len()
    }

    /// The member an instance is.
    pub fn member_of(&self, nodes: usize, instance: usize) -> usize {
        if instance < nodes { instance } else { self.twinned[instance - nodes] }
    }

    /// Leaders of rounds 1..=len, by position.
    pub fn leaders(&self) -> Vec<usize> {
        self.rounds.iter().map(|r| r.leader).collect()
    }

    /// Whether a message about `round` sent at `now` from `from` reaches `to`.
    /// Messages about no round (catch-up) and about rounds past the scenario flow freely.
    pub fn delivers(&self, from: usize, to: usize, round: Option<Round>, now: Time) -> bool {
        if now >= self.heal {
            return true;
        }
        let Some(round) = round else { return true };
        let Some(setup) = round.0.checked_sub(1).and_then(|i| self.rounds.get(i as usize)) else {
            return true;
        };
        setup.groups.get(from) == setup.groups.get(to)
    }
}

impl fmt::Display for TwinsScenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "twinned {:?}; ", self.twinned)?;
        for (i, r) in self.rounds.iter().enumerate() {
            write!(f, "round {}: leader {} groups {:?}; ", i + 1, r.leader, r.groups)?;
        }
        write!(f, "heal at {} ms", self.heal.0)
    }
}
