//! The simulator runner (`bulwark sim` takes the same options; see
//! [`bulwark_tests::cli`]).
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

use bulwark_tests::cli::{SimArgs, run};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Run the deterministic simulator over many seeds")]
struct Cli {
    #[command(flatten)]
    sim: SimArgs,
}

fn main() -> anyhow::Result<()> {
    let violations = run(&Cli::parse().sim)?;
    if violations > 0 {
        std::process::exit(1);
    }
    Ok(())
}
