//! The pacemaker: which round we are in, when it times out, and who leads it.

use bulwark_crypto::{Committee, ReplicaId};

use super::types::Block;
use crate::protocol::{Round, Time};

/// Who leads a round: [`super::LeaderReputation`] in replicas, fixed schedules in tests.
pub trait LeaderElection: Send + std::fmt::Debug {
    fn leader(&self, round: Round) -> ReplicaId;

    /// A block was committed (called in chain order, oldest first).
    fn committed(&mut self, _block: &Block) {}

    /// Whether this replica knows enough history to elect what the others elect. An
    /// unsettled replica accepts any proposer and sends its votes to every replica.
    fn settled(&self) -> bool {
        true
    }
}

/// Leaders in committee id order, one round each.
#[derive(Debug, Clone)]
pub struct RoundRobin {
    ids: Vec<ReplicaId>,
}

impl RoundRobin {
    pub fn new(committee: &Committee) -> RoundRobin {
        RoundRobin { ids: committee.ids().collect() }
    }
}

impl LeaderElection for RoundRobin {
    fn leader(&self, round: Round) -> ReplicaId {
        // A committee is never empty (n ≥ 4 is validated).
        self.ids[(round.0 % self.ids.len() as u64) as usize]
    }
}

/// Round timeouts with exponential backoff and a cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeoutPolicy {
    pub base_ms: u64,
    pub max_ms: u64,
}

impl TimeoutPolicy {
    /// `base_ms · 2^consecutive_timeouts`, at most `max_ms`.
    pub fn duration(&self, consecutive_timeouts: u32) -> u64 {
        let factor = 1u64.checked_shl(consecutive_timeouts.min(32)).unwrap_or(u64::MAX);
        self.base_ms.saturating_mul(factor).min(self.max_ms)
    }
}

/// A round on a shortened timer waits this fraction of the normal timeout.
pub const SHORTENED_DIVISOR: u64 = 4;
/// A skipped round waits this fraction of the base timeout.
pub const SKIPPED_DIVISOR: u64 = 20;

/// How long a round waits for progress before its replica times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundTimer {
    /// The timeout policy's duration (with backoff).
    Full,
    /// Its leader, or the next one whom its votes go to, is suspected of having
    /// crashed: a quarter of the timeout.
    Shortened,
    /// Its leader already had a whole timeout to certify the previous round with this
    /// replica's vote and did not: only a grace of 1/20 of the base timeout.
    Skipped,
}

#[derive(Debug, Clone)]
pub struct Pacemaker {
    round: Round,
    deadline: Option<Time>,
    consecutive_timeouts: u32,
    policy: TimeoutPolicy,
    /// The current round's timer (see [`Pacemaker::advance`]).
    timer: RoundTimer,
}

impl Pacemaker {
    pub fn new(policy: TimeoutPolicy) -> Pacemaker {
        Pacemaker {
            round: Round(0),
            deadline: None,
            consecutive_timeouts: 0,
            policy,
            timer: RoundTimer::Full,
        }
    }

    pub fn round(&self) -> Round {
        self.round
    }

    pub fn deadline(&self) -> Option<Time> {
        self.deadline
    }

    /// Enters `round` if it is higher than the current one. A QC resets the backoff;
    /// a TC keeps it, so a run of failed rounds waits longer and longer. A shortened or
    /// skipped round waits less (see [`RoundTimer`]) only while at most one timeout in
    /// a row has passed; after that the full backoff applies, so suspicion can never
    /// keep rounds too short for a slow network.
    pub fn advance(&mut self, round: Round, now: Time, via_timeout: bool, timer: RoundTimer) -> bool {
        if round <= self.round {
            return false;
        }
        self.round = round;
        if !via_timeout {
            self.consecutive_timeouts = 0;
        }
        self.timer = timer;
        self.arm(now);
        true
    }

    /// The current round's leader proposed: a skipped round gets `timer` instead,
    /// counted from now (the guess that its leader had crashed was wrong).
    pub fn unskip(&mut self, now: Time, timer: RoundTimer) {
        if self.timer == RoundTimer::Skipped {
            self.timer = timer;
            self.arm(now);
        }
    }

    /// The round's timer fired: back off and re-arm.
    pub fn local_timeout(&mut self, now: Time) {
        self.consecutive_timeouts = self.consecutive_timeouts.saturating_add(1);
        self.arm(now);
    }

    fn arm(&mut self, now: Time) {
        let mut duration = self.policy.duration(self.consecutive_timeouts);
        if self.consecutive_timeouts <= 1 {
            duration = match self.timer {
                RoundTimer::Full => duration,
                RoundTimer::Shortened => (duration / SHORTENED_DIVISOR).max(1),
                RoundTimer::Skipped => (self.policy.base_ms / SKIPPED_DIVISOR).max(1),
            };
        }
        self.deadline = Some(now.plus_millis(duration));
    }

    pub fn expired(&self, now: Time) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }
}
