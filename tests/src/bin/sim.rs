//! The simulator runner: `cargo run --release -p bulwark-tests --bin sim -- --nodes 7 --seeds 10000`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use bulwark_tests::sim::{SimFailure, run_hotstuff_seed};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(about = "Run the deterministic simulator over many seeds")]
struct Args {
    /// Replicas in the committee (n = 3f+1: 4, 7, 10, ...).
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// How many seeds to run, starting at --first-seed.
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
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.nodes >= 4, "a committee needs at least 4 replicas");
    if let Some(seed) = args.seed {
        println!("seed {seed}, {} replicas", args.nodes);
        return match run_hotstuff_seed(args.nodes, seed) {
            Ok(report) => {
                println!("{report:#?}");
                println!("violations: 0");
                Ok(())
            }
            Err(failure) => {
                println!("{failure}");
                println!("violations: 1");
                std::process::exit(1);
            }
        };
    }
    let started = Instant::now();
    let bar = ProgressBar::new(args.seeds);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} seeds {per_sec} eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let next = AtomicU64::new(args.first_seed);
    let end = args.first_seed + args.seeds;
    let blocks = AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::<Box<SimFailure>>::new());
    std::thread::scope(|scope| {
        for _ in 0..args.threads.max(1) {
            scope.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= end {
                        break;
                    }
                    match run_hotstuff_seed(args.nodes, seed) {
                        Ok(report) => {
                            blocks.fetch_add(report.blocks_committed, Ordering::Relaxed);
                        }
                        Err(failure) => {
                            bar.suspend(|| println!("{failure}\n"));
                            if let Ok(mut f) = failures.lock() {
                                f.push(failure);
                            }
                        }
                    }
                    bar.inc(1);
                    bar.set_message(format!("{} blocks", blocks.load(Ordering::Relaxed)));
                }
            });
        }
    });
    bar.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    let blocks = blocks.load(Ordering::Relaxed);
    let violations = failures.lock().map(|f| f.len()).unwrap_or(0);
    println!(
        "seeds run: {}, replicas: {}, {:.1} s, {:.1} scenarios/s, blocks committed: {}, {:.0} simulated blocks/s",
        args.seeds,
        args.nodes,
        elapsed,
        args.seeds as f64 / elapsed,
        blocks,
        blocks as f64 / elapsed
    );
    println!("violations: {violations}");
    if violations > 0 {
        std::process::exit(1);
    }
    Ok(())
}
