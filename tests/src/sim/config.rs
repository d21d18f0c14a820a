//! Scenarios: every knob of one simulation, drawn from the seed, and who is Byzantine.

use std::fmt;
use std::str::FromStr;

use bulwark_consensus::byzantine::{Behaviour, Behaviours};
use bulwark_consensus::{ProtocolKind, Time};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::network::{NetworkModel, Partition};
use super::twins::TwinsScenario;

/// Which family of scenarios a seed is drawn from.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum Profile {
    /// GST in 2–12 s, 50–200 transactions, 50 blocks after GST, liveness bound 60 s.
    #[default]
    Default,
    /// The Byzantine suite's shorter runs: GST in 0.5–2 s, 10–40 transactions sent to
    /// f+1 replicas and resent to the next f+1 every 2 s, 10 blocks after GST,
    /// liveness bound 70 s (the derivation is in docs/SAFETY.md: the round under way
    /// at GST and up to 2f more can each fail at the 8 s timeout cap).
    Short,
    /// Twins: f replicas run twice, partitions and leaders chosen per round for the
    /// first 2–3 rounds, no loss; the partitions heal at 3 s.
    Twins,
}

impl Profile {
    pub fn name(self) -> &'static str {
        match self {
            Profile::Default => "default",
            Profile::Short => "short",
            Profile::Twins => "twins",
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Profile {
    type Err = String;

    fn from_str(s: &str) -> Result<Profile, String> {
        [Profile::Default, Profile::Short, Profile::Twins]
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown profile {s:?} (default, short, twins)"))
    }
}

/// Where clients send a transaction, and where they resend it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ClientModel {
    /// One replica drawn at random, each time.
    RandomReplica,
    /// `fanout` consecutive replicas from a random start, the next `fanout` on each
    /// retry: every replica has the transaction within ⌈n / fanout⌉ sends. With
    /// fanout f+1 each send reaches an honest replica; rotating matters because an
    /// honest replica whose successor in the leader order is silent never gets its own
    /// blocks certified (HotStuff votes go to the next leader).
    Rotating { fanout: usize },
}

/// Every knob of one simulation, all drawn from the seed.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub profile: Profile,
    /// Replicas in the committee (twins add instances, not members).
    pub nodes: usize,
    pub network: NetworkModel,
    pub transactions: usize,
    /// Clients submit until this time; they resubmit what has not committed.
    pub submit_until: Time,
    pub client_retry_ms: u64,
    pub clients: ClientModel,
    /// (replica, crash time, restart time); at most f replicas (minus the Byzantine
    /// ones), all before GST, never a Byzantine replica.
    pub crashes: Vec<(usize, Time, Time)>,
    /// Crash and restart every replica at once: (crash time, restart time). Never
    /// together with Byzantine replicas (that would be more than f faulty at once).
    pub whole_committee_restart: Option<(Time, Time)>,
    /// After GST, each transaction commits within this many ms of max(submit, GST).
    pub liveness_bound_ms: u64,
    /// Blocks that must be committed after GST for the run to end well.
    pub min_blocks_after_gst: usize,
    pub max_time: Time,
    /// Byzantine replicas (by position) and what they do.
    pub byzantine: Vec<(usize, Behaviours)>,
    /// Twins: replicas that run twice, and the per-round partitions and leaders.
    pub twins: Option<TwinsScenario>,
    /// The protocol core the replicas run.
    pub protocol: ProtocolKind,
}

impl SimConfig {
    /// The default scenario of `seed` for `nodes` replicas.
    pub fn from_seed(nodes: usize, seed: u64) -> SimConfig {
        SimConfig::generate(Profile::Default, nodes, seed)
    }

    /// The shorter scenario of `seed` the Byzantine suite runs.
    pub fn short(nodes: usize, seed: u64) -> SimConfig {
        SimConfig::generate(Profile::Short, nodes, seed)
    }

    pub fn generate(profile: Profile, nodes: usize, seed: u64) -> SimConfig {
        match profile {
            Profile::Default => SimConfig::draw(nodes, seed, &DEFAULT_RANGES),
            Profile::Short => {
                let mut cfg = SimConfig::draw(nodes, seed, &SHORT_RANGES);
                cfg.profile = Profile::Short;
                cfg
            }
            Profile::Twins => SimConfig::twins(nodes, seed),
        }
    }

    fn draw(nodes: usize, seed: u64, ranges: &Ranges) -> SimConfig {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_f0b0_10a4);
        let f = (nodes - 1) / 3;
        let gst = Time(rng.gen_range(ranges.gst.0..ranges.gst.1));
        let mut partitions = Vec::new();
        for _ in 0..rng.gen_range(0..3) {
            let start = rng.gen_range(0..gst.0);
            let end = (start + rng.gen_range(ranges.partition.0..ranges.partition.1)).min(gst.0);
            let side = (0..nodes).map(|_| rng.gen_bool(0.5)).collect();
            partitions.push(Partition { start: Time(start), end: Time(end), side });
        }
        let network = NetworkModel {
            gst,
            pre_gst_max_delay: rng.gen_range(5..400),
            post_gst_max_delay: rng.gen_range(2..60),
            drop_rate: [0.0, 0.01, 0.05, 0.2][rng.gen_range(0..4)],
            duplicate_rate: [0.0, 0.02, 0.1][rng.gen_range(0..3)],
            partitions,
        };
        let mut ids: Vec<usize> = (0..nodes).collect();
        ids.shuffle(&mut rng);
        let crashes = ids
            .into_iter()
            .take(rng.gen_range(0..=f))
            .map(|id| {
                let at = rng.gen_range(0..gst.0);
                let back = (at + rng.gen_range(100..ranges.crash_max)).min(gst.0);
                (id, Time(at), Time(back))
            })
            .collect();
        let whole_committee_restart = rng.gen_bool(0.15).then(|| {
            let at = rng.gen_range(200..gst.0);
            (Time(at), Time((at + rng.gen_range(50..2_000)).min(gst.0 + 500)))
        });
        SimConfig {
            seed,
            profile: Profile::Default,
            nodes,
            network,
            transactions: rng.gen_range(ranges.transactions.0..ranges.transactions.1),
            submit_until: gst.plus_millis(ranges.submit_after_gst),
            client_retry_ms: ranges.client_retry_ms,
            clients: if ranges.rotating_clients {
                ClientModel::Rotating { fanout: f + 1 }
            } else {
                ClientModel::RandomReplica
            },
            crashes,
            whole_committee_restart,
            liveness_bound_ms: ranges.liveness_bound_ms,
            min_blocks_after_gst: ranges.min_blocks_after_gst,
            max_time: gst.plus_millis(ranges.max_after_gst),
            byzantine: Vec::new(),
            twins: None,
            protocol: ProtocolKind::HotStuff,
        }
    }

    /// The Twins scenario of `seed`: f replicas run as two instances each.
    pub fn twins(nodes: usize, seed: u64) -> SimConfig {
        let scenario = TwinsScenario::generate(nodes, seed);
        let heal = scenario.heal;
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7e1e_5eed);
        SimConfig {
            seed,
            profile: Profile::Twins,
            nodes,
            network: NetworkModel {
                gst: heal,
                pre_gst_max_delay: rng.gen_range(1..30),
                post_gst_max_delay: rng.gen_range(2..30),
                drop_rate: 0.0,
                duplicate_rate: 0.0,
                partitions: Vec::new(),
            },
            transactions: rng.gen_range(10..30),
            submit_until: heal.plus_millis(500),
            client_retry_ms: 2_000,
            clients: ClientModel::Rotating { fanout: (nodes - 1) / 3 + 1 },
            crashes: Vec::new(),
            whole_committee_restart: None,
            liveness_bound_ms: 30_000,
            min_blocks_after_gst: 5,
            max_time: heal.plus_millis(60_000),
            byzantine: Vec::new(),
            twins: Some(scenario),
            protocol: ProtocolKind::HotStuff,
        }
    }

    /// Makes `byzantine` malicious. They count toward the fault budget: crashes are
    /// kept only for honest replicas and only up to f minus the Byzantine count, and
    /// there is no whole-committee restart.
    /// The same scenario for `protocol`. PBFT's clients send each transaction to every
    /// replica (as the node's client does): only the primary orders, so a request
    /// must reach it.
    pub fn with_protocol(mut self, protocol: ProtocolKind) -> SimConfig {
        self.protocol = protocol;
        if protocol == ProtocolKind::Pbft {
            self.clients = ClientModel::Rotating { fanout: self.nodes };
        }
        self
    }

    pub fn with_byzantine(mut self, byzantine: Vec<(usize, Behaviours)>) -> SimConfig {
        let f = (self.nodes - 1) / 3;
        let budget = f.saturating_sub(byzantine.len());
        self.crashes.retain(|(id, _, _)| !byzantine.iter().any(|(b, _)| b == id));
        self.crashes.truncate(budget);
        if !byzantine.is_empty() {
            self.whole_committee_restart = None;
        }
        self.byzantine = byzantine;
        self
    }

    /// `count` Byzantine replicas chosen by the seed, each running `behaviours`.
    pub fn with_random_byzantine(self, behaviours: &Behaviours, count: usize) -> SimConfig {
        let ids = self.random_ids(count, 0xb1ee);
        self.with_byzantine(ids.into_iter().map(|id| (id, behaviours.clone())).collect())
    }

    /// Between 1 and f Byzantine replicas chosen by the seed, each with a behaviour of
    /// its own (different ones when there are several), plus crashes of honest
    /// replicas up to the rest of the budget.
    pub fn with_mixed_byzantine(self) -> SimConfig {
        let f = (self.nodes - 1) / 3;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x000a_1ced);
        let count = rng.gen_range(1..=f.max(1));
        let ids = self.random_ids(count, 0x0a1c_ed1d);
        let mut behaviours: Vec<Behaviour> = Behaviour::ALL.to_vec();
        behaviours.shuffle(&mut rng);
        let assigned = ids.into_iter().zip(behaviours).map(|(id, b)| (id, Behaviours::one(b))).collect();
        self.with_byzantine(assigned)
    }

    fn random_ids(&self, count: usize, salt: u64) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ salt);
        let mut ids: Vec<usize> = (0..self.nodes).collect();
        ids.shuffle(&mut rng);
        ids.truncate(count);
        ids.sort_unstable();
        ids
    }

    /// Replicas that are not honest: Byzantine ones and twinned ones.
    pub fn faulty(&self) -> Vec<usize> {
        let mut ids: Vec<usize> = self.byzantine.iter().map(|(id, _)| *id).collect();
        if let Some(twins) = &self.twins {
            ids.extend(twins.twinned.iter().copied());
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// `--byzantine` as the runner takes it.
    pub fn byzantine_arg(&self) -> String {
        self.byzantine.iter().map(|(id, b)| format!("{id}:{b}")).collect::<Vec<_>>().join(",")
    }

    /// The one command that replays this scenario.
    pub fn replay_command(&self) -> String {
        let mut command = format!(
            "cargo run --release -p bulwark-tests --bin sim -- --nodes {} --seed {}",
            self.nodes, self.seed
        );
        if self.protocol != ProtocolKind::HotStuff {
            command.push_str(&format!(" --protocol {}", self.protocol));
        }
        if self.profile != Profile::Default {
            command.push_str(&format!(" --profile {}", self.profile));
        }
        if !self.byzantine.is_empty() {
            command.push_str(&format!(" --byzantine {}", self.byzantine_arg()));
        }
        command
    }
}

struct Ranges {
    gst: (u64, u64),
    partition: (u64, u64),
    crash_max: u64,
    transactions: (usize, usize),
    submit_after_gst: u64,
    client_retry_ms: u64,
    rotating_clients: bool,
    liveness_bound_ms: u64,
    min_blocks_after_gst: usize,
    max_after_gst: u64,
}

const DEFAULT_RANGES: Ranges = Ranges {
    gst: (2_000, 12_000),
    partition: (500, 4_000),
    crash_max: 5_000,
    transactions: (50, 200),
    submit_after_gst: 5_000,
    client_retry_ms: 3_000,
    rotating_clients: false,
    liveness_bound_ms: 60_000,
    min_blocks_after_gst: 50,
    max_after_gst: 120_000,
};

const SHORT_RANGES: Ranges = Ranges {
    gst: (500, 2_000),
    partition: (200, 1_500),
    crash_max: 1_500,
    transactions: (10, 40),
    submit_after_gst: 500,
    client_retry_ms: 2_000,
    rotating_clients: true,
    liveness_bound_ms: 70_000,
    min_blocks_after_gst: 10,
    max_after_gst: 100_000,
};
