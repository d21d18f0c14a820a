//! Running scenarios (HotStuff or PBFT): one seed, or a sweep of seeds over threads. Shared by
//! the `sim` binary and the tests, so a test failure and its replay command run the
//! same code.

use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bulwark_consensus::ProtocolKind;
use bulwark_consensus::byzantine::Behaviours;

use super::{HotStuffHarness, PbftHarness, Profile, SimConfig, SimFailure, SimReport, Simulation};

/// Which replicas are faulty beyond the profile's crashes, and how.
#[derive(Clone, Debug, Default)]
pub enum Faults {
    /// Honest replicas only (crashes as the profile draws them).
    #[default]
    None,
    /// These replicas (by position) run these behaviours.
    Fixed(Vec<(usize, Behaviours)>),
    /// `count` replicas chosen by the seed run `behaviours`.
    Random { behaviours: Behaviours, count: usize },
    /// 1 to f replicas chosen by the seed, each with a different behaviour, plus
    /// crash-restarts of honest replicas up to the rest of the budget.
    Mixed,
}

/// What to run for each seed.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub nodes: usize,
    pub profile: Profile,
    pub faults: Faults,
    pub protocol: ProtocolKind,
}

impl RunSpec {
    pub fn new(nodes: usize, profile: Profile, faults: Faults) -> RunSpec {
        RunSpec { nodes, profile, faults, protocol: ProtocolKind::HotStuff }
    }

    pub fn with_protocol(mut self, protocol: ProtocolKind) -> RunSpec {
        self.protocol = protocol;
        self
    }

    /// `behaviours` on f replicas chosen by each seed, in the short profile.
    pub fn on_f(nodes: usize, behaviours: impl Into<Behaviours>) -> RunSpec {
        let count = (nodes - 1) / 3;
        RunSpec::new(nodes, Profile::Short, Faults::Random { behaviours: behaviours.into(), count })
    }

    /// A short human label: the behaviours, "mixed", "twins" or "honest".
    pub fn label(&self) -> String {
        match (&self.faults, self.profile) {
            (_, Profile::Twins) => "twins".into(),
            (Faults::None, _) => "honest".into(),
            (Faults::Fixed(list), _) => {
                list.iter().map(|(id, b)| format!("{id}:{b}")).collect::<Vec<_>>().join(",")
            }
            (Faults::Random { behaviours, .. }, _) => behaviours.to_string(),
            (Faults::Mixed, _) => "mixed".into(),
        }
    }

    pub fn config(&self, seed: u64) -> SimConfig {
        let cfg = SimConfig::generate(self.profile, self.nodes, seed).with_protocol(self.protocol);
        match &self.faults {
            Faults::None => cfg,
            Faults::Fixed(list) => cfg.with_byzantine(list.clone()),
            Faults::Random { behaviours, count } => cfg.with_random_byzantine(behaviours, *count),
            Faults::Mixed => cfg.with_mixed_byzantine(),
        }
    }

    pub fn run(&self, seed: u64) -> Result<SimReport, Box<SimFailure>> {
        run_scenario(self.config(seed))
    }
}

/// Runs one scenario with the protocol it names.
pub fn run_scenario(cfg: SimConfig) -> Result<SimReport, Box<SimFailure>> {
    match cfg.protocol {
        ProtocolKind::HotStuff => run_hotstuff(cfg),
        ProtocolKind::Pbft => run_pbft(cfg),
    }
}

/// Runs one scenario of PBFT (see [`SimConfig::with_protocol`] for its clients).
pub fn run_pbft(cfg: SimConfig) -> Result<SimReport, Box<SimFailure>> {
    Simulation::new(PbftHarness::new(cfg.nodes), cfg).run()
}

/// Runs one scenario of HotStuff.
pub fn run_hotstuff(cfg: SimConfig) -> Result<SimReport, Box<SimFailure>> {
    Simulation::new(HotStuffHarness::new(cfg.nodes), cfg).run()
}

/// Runs one seed of the default scenario for HotStuff with `nodes` replicas.
pub fn run_hotstuff_seed(nodes: usize, seed: u64) -> Result<SimReport, Box<SimFailure>> {
    run_hotstuff(SimConfig::from_seed(nodes, seed))
}

/// What one seed ended with.
pub type SeedResult = Result<SimReport, Box<SimFailure>>;

/// Totals over a sweep of seeds.
#[derive(Debug, Default)]
pub struct Sweep {
    pub seeds: u64,
    pub blocks: u64,
    pub transactions: u64,
    /// Evidence honest replicas recorded.
    pub evidence: u64,
    /// Messages honest replicas refused as unverifiable (from Byzantine senders).
    pub refused: u64,
    pub digest_mismatches: u64,
    pub worst_latency_ms: u64,
    pub failures: Vec<Box<SimFailure>>,
}

impl Sweep {
    fn add(&mut self, result: SeedResult) {
        self.seeds += 1;
        match result {
            Ok(r) => {
                self.blocks += r.blocks_committed as u64;
                self.transactions += r.transactions as u64;
                self.evidence += r.evidence as u64;
                self.refused += r.verify_failures;
                self.digest_mismatches += r.digest_mismatches as u64;
                self.worst_latency_ms = self.worst_latency_ms.max(r.worst_latency_ms);
            }
            Err(failure) => self.failures.push(failure),
        }
    }
}

/// Runs `seeds` of `spec` on `threads` threads; `each` sees every result as it ends.
pub fn sweep(
    spec: &RunSpec,
    seeds: Range<u64>,
    threads: usize,
    each: &(dyn Fn(u64, &SeedResult) + Sync),
) -> Sweep {
    let next = AtomicU64::new(seeds.start);
    let total = Mutex::new(Sweep::default());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= seeds.end {
                        break;
                    }
                    let result = spec.run(seed);
                    each(seed, &result);
                    if let Ok(mut total) = total.lock() {
                        total.add(result);
                    }
                }
            });
        }
    });
    let mut total = total.into_inner().unwrap_or_default();
    total.failures.sort_by_key(|f| f.seed);
    total
}
