//! The simulator runner's command line, shared by the `sim` binary and `bulwark sim`:
//! one [`SimArgs`] parser and one [`run`].
//!
//! ```text
//! sim --nodes 7 --seeds 10000                              # honest, default scenarios
//! sim --nodes 4 --seeds 1000 --byzantine 1:equivocate      # fixed Byzantine replicas
//! sim --nodes 7 --seeds 1000 --each-behaviour              # every behaviour on f replicas
//! sim --nodes 7 --seeds 1000 --mixed                       # 1..f behaviours + crashes
//! sim --nodes 4 --seeds 1000 --profile twins               # Twins scenarios
//! sim --nodes 4 --seed 17 --profile short --byzantine 2:flood   # replay one seed
//! sim --nodes 7 --seeds 300 --protocol pbft                 # the PBFT core
//! ```

use std::time::Instant;

use bulwark_consensus::ProtocolKind;
use bulwark_consensus::byzantine::{Behaviour, Behaviours, parse_assignments};
use indicatif::{ProgressBar, ProgressStyle};

use crate::sim::{Faults, Profile, RunSpec, sweep};

/// The simulator's options.
#[derive(clap::Args, Clone, Debug)]
pub struct SimArgs {
    /// Replicas in the committee (n = 3f+1: 4, 7, 10, ...).
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// How many seeds to run (per behaviour with --each-behaviour), from --first-seed.
    #[arg(long, default_value_t = 100)]
    pub seeds: u64,
    #[arg(long, default_value_t = 0)]
    pub first_seed: u64,
    /// Run exactly this seed and print its report (replays a failure).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Scenario family: default, short (the Byzantine suite's) or twins. Defaults to
    /// short with --byzantine, --each-behaviour or --mixed, to default otherwise.
    #[arg(long)]
    pub profile: Option<Profile>,
    /// Byzantine replicas: ID:BEHAVIOUR[,ID:BEHAVIOUR], behaviours joined with '+'
    /// run together (1:equivocate+double-vote); at most f of them.
    #[arg(long)]
    pub byzantine: Option<String>,
    /// Every behaviour in turn, each on f replicas chosen by the seed.
    #[arg(long, conflicts_with_all = ["byzantine", "mixed"])]
    pub each_behaviour: bool,
    /// 1..f Byzantine replicas with different behaviours plus honest crashes.
    #[arg(long, conflicts_with = "byzantine")]
    pub mixed: bool,
    /// The protocol core: hotstuff or pbft.
    #[arg(long, default_value = "hotstuff")]
    pub protocol: ProtocolKind,
}

impl SimArgs {
    /// The runs these options ask for (one per behaviour with --each-behaviour).
    pub fn specs(&self) -> anyhow::Result<Vec<RunSpec>> {
        let nodes = self.nodes;
        anyhow::ensure!(nodes >= 4, "a committee needs at least 4 replicas");
        let f = (nodes - 1) / 3;
        let byzantine_profile = self.profile.unwrap_or(Profile::Short);
        let specs = if self.each_behaviour {
            Behaviour::ALL
                .into_iter()
                .map(|b| {
                    RunSpec::new(nodes, byzantine_profile, Faults::Random { behaviours: b.into(), count: f })
                })
                .collect()
        } else if self.mixed {
            vec![RunSpec::new(nodes, byzantine_profile, Faults::Mixed)]
        } else if let Some(list) = &self.byzantine {
            let parsed = parse_assignments(list)?;
            anyhow::ensure!(
                parsed.len() <= f,
                "{} Byzantine replicas, but n = {nodes} tolerates f = {f}",
                parsed.len()
            );
            let mut fixed: Vec<(usize, Behaviours)> = Vec::new();
            for (id, behaviours) in parsed {
                anyhow::ensure!(usize::from(id) < nodes, "replica {id} is not in a committee of {nodes}");
                fixed.push((usize::from(id), behaviours));
            }
            vec![RunSpec::new(nodes, byzantine_profile, Faults::Fixed(fixed))]
        } else {
            vec![RunSpec::new(nodes, self.profile.unwrap_or_default(), Faults::None)]
        };
        Ok(specs.into_iter().map(|spec| spec.with_protocol(self.protocol)).collect())
    }
}

/// Runs what `args` asks for, printing progress and one summary line per run (or the
/// full report of `--seed`), and returns the number of violations found. An error means
/// the options were wrong, not that the simulation failed.
pub fn run(args: &SimArgs) -> anyhow::Result<usize> {
    let specs = args.specs()?;
    match args.seed {
        Some(seed) => Ok(replay(args, &specs, seed)),
        None => {
            let violations = specs.iter().map(|spec| sweep_one(args, spec)).sum();
            println!("violations: {violations}");
            Ok(violations)
        }
    }
}

fn replay(args: &SimArgs, specs: &[RunSpec], seed: u64) -> usize {
    let mut violations = 0;
    for spec in specs {
        let cfg = spec.config(seed);
        println!(
            "seed {seed}, {} {} replicas, profile {}, faults {}",
            args.nodes,
            args.protocol,
            cfg.profile,
            spec.label()
        );
        if let Some(twins) = &cfg.twins {
            println!("twins: {twins}");
        }
        match spec.run(seed) {
            Ok(mut report) => {
                let evidence = std::mem::take(&mut report.evidence_log);
                println!("{report:#?}");
                for (observer, e) in evidence.iter().take(10) {
                    println!(
                        "evidence held by {observer}: {:?} by replica {} in round {}",
                        e.kind, e.offender, e.round
                    );
                }
                println!("violations: 0");
            }
            Err(failure) => {
                println!("{failure}");
                println!("violations: 1");
                violations += 1;
            }
        }
    }
    violations
}

fn sweep_one(args: &SimArgs, spec: &RunSpec) -> usize {
    let started = Instant::now();
    let bar = ProgressBar::new(args.seeds);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} seeds {per_sec} eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(spec.label());
    let seeds = args.first_seed..args.first_seed + args.seeds;
    let total = sweep(spec, seeds, args.threads, &|_, result| {
        if let Err(failure) = result {
            bar.suspend(|| println!("{failure}\n"));
        }
        bar.inc(1);
    });
    bar.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "behaviour {}: seeds run {}, replicas {}, profile {}, blocks committed {}, violations {}, \
         evidence {}, refused messages {}, digest mismatches {}, worst commit latency after GST {} ms, \
         {:.1} s ({:.1} seeds/s)",
        spec.label(),
        total.seeds,
        args.nodes,
        spec.profile,
        total.blocks,
        total.failures.len(),
        total.evidence,
        total.refused,
        total.digest_mismatches,
        total.worst_latency_ms,
        elapsed,
        total.seeds as f64 / elapsed.max(1e-9)
    );
    total.failures.len()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }

    fn specs(args: &[&str]) -> anyhow::Result<Vec<RunSpec>> {
        let cli = Cli::try_parse_from(std::iter::once("sim").chain(args.iter().copied()))?;
        cli.sim.specs()
    }

    #[test]
    fn options_choose_profiles_and_faults() {
        let honest = specs(&[]).unwrap();
        assert_eq!((honest.len(), honest[0].profile), (1, Profile::Default));
        let fixed = specs(&["--nodes", "7", "--byzantine", "2:equivocate,5:silent"]).unwrap();
        assert_eq!(fixed[0].profile, Profile::Short);
        assert!(matches!(&fixed[0].faults, Faults::Fixed(list) if list.len() == 2 && list[1].0 == 5));
        let twins = specs(&["--byzantine", "1:flood", "--profile", "twins"]).unwrap();
        assert_eq!(twins[0].profile, Profile::Twins);
        assert_eq!(specs(&["--each-behaviour"]).unwrap().len(), Behaviour::ALL.len());
        assert!(matches!(specs(&["--mixed"]).unwrap()[0].faults, Faults::Mixed));
    }

    #[test]
    fn bad_options_are_refused_with_the_reason() {
        let error = |args: &[&str]| specs(args).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error(&["--byzantine", "1:silent,2:silent"]).contains("tolerates f = 1"));
        assert!(error(&["--byzantine", "4:silent"]).contains("replica 4 is not in a committee of 4"));
        assert!(error(&["--byzantine", "1:explode"]).contains("unknown behaviour"));
        assert!(error(&["--nodes", "3"]).contains("at least 4"));
        assert!(!error(&["--mixed", "--byzantine", "1:silent"]).is_empty());
    }
}
