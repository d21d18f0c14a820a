//! The invariants checked after every step of a simulation.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use bulwark_consensus::{Height, Time};
use bulwark_crypto::Digest;

/// What went wrong. Safety, liveness and crash failures are told apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Two honest replicas committed different blocks at one height.
    Agreement { height: Height, first: Digest, second: Digest, replica: usize },
    /// A replica's committed log skipped a height.
    Prefix { replica: usize, expected: Height, got: Height },
    /// A committed transaction was never submitted.
    Validity { tx: u64, height: Height },
    /// A transaction was committed at two heights.
    Integrity { tx: u64, first: Height, second: Height },
    /// Honest replicas reached different state digests at one height.
    Execution { height: Height, replica: usize },
    /// After GST, a transaction did not commit within the bound.
    Liveness { detail: String },
    /// A core panicked.
    Crash { replica: usize, message: String },
}

impl Violation {
    pub fn class(&self) -> &'static str {
        match self {
            Violation::Liveness { .. } => "liveness",
            Violation::Crash { .. } => "crash",
            _ => "safety",
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Agreement { height, first, second, replica } => write!(
                f,
                "agreement: replica {replica} committed {} at height {height}, another honest replica committed {}",
                second.short(),
                first.short()
            ),
            Violation::Prefix { replica, expected, got } => {
                write!(f, "prefix: replica {replica} committed height {got}, expected {expected}")
            }
            Violation::Validity { tx, height } => {
                write!(f, "validity: tx {tx} at height {height} was never submitted")
            }
            Violation::Integrity { tx, first, second } => {
                write!(f, "integrity: tx {tx} committed at heights {first} and {second}")
            }
            Violation::Execution { height, replica } => {
                write!(f, "execution: replica {replica} has a different state digest at height {height}")
            }
            Violation::Liveness { detail } => write!(f, "liveness: {detail}"),
            Violation::Crash { replica, message } => {
                write!(f, "crash: replica {replica} panicked: {message}")
            }
        }
    }
}

/// The global view the checker keeps.
#[derive(Debug, Default)]
pub struct Checker {
    /// First commit of each height: block digest, state digest, time.
    pub log: BTreeMap<Height, (Digest, Digest, Time)>,
    pub submitted: BTreeMap<u64, Time>,
    pub committed_tx: BTreeMap<u64, (Height, Time)>,
    pub honest: BTreeSet<usize>,
}

impl Checker {
    /// Checks one executed block of `replica`.
    #[allow(clippy::too_many_arguments)]
    pub fn on_execute(
        &mut self,
        replica: usize,
        previous_height: Height,
        height: Height,
        block: Digest,
        state_digest: Digest,
        txs: &[u64],
        now: Time,
    ) -> Result<(), Violation> {
        if !self.honest.contains(&replica) {
            return Ok(());
        }
        if height != previous_height.next() {
            return Err(Violation::Prefix { replica, expected: previous_height.next(), got: height });
        }
        match self.log.get(&height) {
            Some((first, _, _)) if *first != block => {
                return Err(Violation::Agreement { height, first: *first, second: block, replica });
            }
            Some((_, digest, _)) if *digest != state_digest => {
                return Err(Violation::Execution { height, replica });
            }
            Some(_) => {}
            None => {
                self.log.insert(height, (block, state_digest, now));
            }
        }
        for tx in txs {
            if !self.submitted.contains_key(tx) {
                return Err(Violation::Validity { tx: *tx, height });
            }
            match self.committed_tx.get(tx) {
                Some((first, _)) if *first != height => {
                    return Err(Violation::Integrity { tx: *tx, first: *first, second: height });
                }
                Some(_) => {}
                None => {
                    self.committed_tx.insert(*tx, (height, now));
                }
            }
        }
        Ok(())
    }

    /// Blocks first committed at or after `gst`.
    pub fn blocks_after(&self, gst: Time) -> usize {
        self.log.values().filter(|(_, _, t)| *t >= gst).count()
    }

    /// The longest any committed transaction took after max(submit, `gst`), in ms.
    pub fn worst_latency(&self, gst: Time) -> u64 {
        self.committed_tx
            .iter()
            .filter_map(|(tx, (_, committed))| {
                let since = (*self.submitted.get(tx)?).max(gst);
                Some(committed.0.saturating_sub(since.0))
            })
            .max()
            .unwrap_or(0)
    }

    /// The first transaction that missed its liveness deadline at `now`.
    pub fn overdue(&self, now: Time, gst: Time, bound_ms: u64) -> Option<(u64, Time)> {
        self.submitted
            .iter()
            .filter(|(tx, _)| !self.committed_tx.contains_key(tx))
            .map(|(tx, submitted)| (*tx, (*submitted).max(gst).plus_millis(bound_ms)))
            .find(|(_, deadline)| now > *deadline)
    }
}
