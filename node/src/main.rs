//! The `bulwark` command.

use std::path::PathBuf;

use anyhow::Context as _;
use bulwark_crypto::{Committee, Digest, Domain, KeyPair, QuorumSignatures};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bulwark", version, about = "Byzantine-fault-tolerant replication")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an ed25519 key pair into a new file (mode 0600).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Validate a committee file and print its quorum sizes.
    CheckCommittee { path: PathBuf },
    /// Sign a vote with every replica of a local 4-replica test committee, aggregate a
    /// quorum certificate and verify it.
    Smoke,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Keygen { out } => {
            let key = KeyPair::generate();
            key.write_file(&out)?;
            println!("wrote {} (public key {})", out.display(), key.public());
        }
        Command::CheckCommittee { path } => {
            let committee =
                Committee::from_file(&path).with_context(|| format!("committee file {}", path.display()))?;
            println!(
                "committee {:?}: n = {}, f = {}, quorum = {}, chain id {}",
                committee.name(),
                committee.size(),
                committee.max_faulty(),
                committee.quorum(),
                committee.chain_id().0
            );
        }
        Command::Smoke => smoke()?,
    }
    Ok(())
}

fn smoke() -> anyhow::Result<()> {
    let (committee, keys) = Committee::deterministic("bulwark-smoke", 4, 7000)?;
    println!(
        "committee {:?}: n = {}, f = {}, quorum = {}",
        committee.name(),
        committee.size(),
        committee.max_faulty(),
        committee.quorum()
    );
    let vote = Digest::of(b"smoke block");
    let signatures = committee
        .members()
        .iter()
        .zip(&keys)
        .map(|(m, k)| (m.id, k.sign(Domain::Vote, committee.chain_id(), &vote)))
        .collect();
    let qc = QuorumSignatures::new(signatures);
    qc.verify(&committee, Domain::Vote, &vote, committee.quorum()).context("quorum certificate")?;
    println!("signed block {} by {} replicas; the quorum certificate verifies", vote.short(), qc.len());
    let wrong = qc.verify(&committee, Domain::Timeout, &vote, committee.quorum());
    anyhow::ensure!(wrong.is_err(), "a vote certificate must not verify as a timeout certificate");
    println!(
        "the same signatures are refused as a timeout certificate: {}",
        wrong.err().map(|e| e.to_string()).unwrap_or_default()
    );
    Ok(())
}
