//! The simulator runner.
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
use bulwark_tests::sim::{Faults, Profile, RunSpec, sweep};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(about = "Run the deterministic simulator over many seeds")]
struct Args {
    /// Replicas in the committee (n = 3f+1: 4, 7, 10, ...).
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// How many seeds to run (per behaviour with --each-behaviour), from --first-seed.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    #[arg(long, default_value_t = 0)]
    first_seed: u64,
    /// Run exactly this seed and print its report (replays a failure).
    #[arg(long)]
    seed: Option<u64>,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Scenario family: default, short (the Byzantine suite's) or twins.
    #[arg(long, default_value = "default")]
    profile: Profile,
    /// Byzantine replicas: ID:BEHAVIOUR[,ID:BEHAVIOUR], behaviours joined with '+'
    /// run together (1:equivocate+double-vote). Implies --profile short unless given.
    #[arg(long)]
    byzantine: Option<String>,
    /// Every behaviour in turn, each on f replicas chosen by the seed (short profile).
    #[arg(long, conflicts_with_all = ["byzantine", "mixed"])]
    each_behaviour: bool,
    /// 1..f Byzantine replicas with different behaviours plus honest crashes.
    #[arg(long, conflicts_with = "byzantine")]
    mixed: bool,
    /// The protocol core: hotstuff or pbft.
    #[arg(long, default_value = "hotstuff")]
    protocol: ProtocolKind,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.nodes >= 4, "a committee needs at least 4 replicas");
    let explicit_profile = std::env::args().any(|a| a == "--profile" || a.starts_with("--profile="));
    let byzantine_profile = if explicit_profile { args.profile } else { Profile::Short };
    let specs: Vec<RunSpec> = if args.each_behaviour {
        let f = (args.nodes - 1) / 3;
        Behaviour::ALL
            .into_iter()
            .map(|b| {
                RunSpec::new(args.nodes, byzantine_profile, Faults::Random { behaviours: b.into(), count: f })
            })
            .collect()
    } else if args.mixed {
        vec![RunSpec::new(args.nodes, byzantine_profile, Faults::Mixed)]
    } else if let Some(list) = &args.byzantine {
        let parsed = parse_assignments(list)?;
        let f = (args.nodes - 1) / 3;
        anyhow::ensure!(
            parsed.len() <= f,
            "{} Byzantine replicas, but n = {} tolerates f = {f}",
            parsed.len(),
            args.nodes
        );
        let mut fixed: Vec<(usize, Behaviours)> = Vec::new();
        for (id, behaviours) in parsed {
            anyhow::ensure!(
                usize::from(id) < args.nodes,
                "replica {id} is not in a committee of {}",
                args.nodes
            );
            fixed.push((usize::from(id), behaviours));
        }
        vec![RunSpec::new(args.nodes, byzantine_profile, Faults::Fixed(fixed))]
    } else {
        vec![RunSpec::new(args.nodes, args.profile, Faults::None)]
    };
    let specs: Vec<RunSpec> = specs.into_iter().map(|s| s.with_protocol(args.protocol)).collect();

    if let Some(seed) = args.seed {
        let mut failed = false;
        for spec in &specs {
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
                    failed = true;
                }
            }
        }
        if failed {
            std::process::exit(1);
        }
        return Ok(());
    }

    let mut violations = 0;
    for spec in &specs {
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
            total.seeds as f64 / elapsed
        );
        violations += total.failures.len();
    }
    println!("violations: {violations}");
    if violations > 0 {
        std::process::exit(1);
    }
    Ok(())
}
