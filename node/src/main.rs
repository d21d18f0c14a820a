//! The `bulwark` command.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bulwark_consensus::ProtocolKind;
use bulwark_consensus::byzantine::{Behaviours, parse_assignments};
use bulwark_crypto::{Committee, Digest, Domain, KeyPair, QuorumSignatures, ReplicaId};
use bulwark_network::NetworkConfig;
use bulwark_node::app::kv::{KvOp, KvResult};
use bulwark_node::app::ledger::{LedgerOp, LedgerResult};
use bulwark_node::client::Client;
use bulwark_node::config::{NodeConfig, committee_protocol};
use bulwark_node::node::{AppKind, start_replica};
use bulwark_node::status;
use bulwark_node::testnet::{self, ClientConfig};
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
    /// Local testnets.
    Testnet {
        #[command(subcommand)]
        command: TestnetCommand,
    },
    /// Run one replica (what an organization runs on its own machine).
    Start {
        #[arg(long)]
        config: PathBuf,
    },
    /// Talk to a committee as a client (key-value store).
    Client {
        /// A testnet directory (uses its client.toml) ...
        #[arg(long, default_value = "testnet")]
        dir: PathBuf,
        /// ... or an explicit client.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        op: ClientOp,
    },
    /// Round, height, lag, leader, peers, state digest and evidence of every replica of
    /// a testnet, or of one replica.
    Status {
        /// A testnet directory (every replica in its client.toml) ...
        #[arg(long, default_value = "testnet")]
        dir: PathBuf,
        /// ... or one replica's node config (its metrics_address).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON (one object per replica, with its recent state digests).
        #[arg(long)]
        json: bool,
    },
    /// Run the deterministic simulator: a whole committee in one process, every
    /// network and crash fault drawn from a seed (the same options as the `sim` binary).
    Sim(bulwark_tests::cli::SimArgs),
    /// Start a fresh local testnet, drive KV puts at a fixed rate, and report committed
    /// tx/s and end-to-end latency (submit to f+1 matching replies).
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Replicas of the fresh testnet.
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    #[arg(long, default_value_t = 512)]
    tx_size: usize,
    /// Offered load, transactions per second.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Seconds of load.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Pipelined clients sharing the load.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Ports of the fresh testnet.
    #[arg(long, default_value_t = 7400)]
    base_port: u16,
    /// Load the running testnet in this directory instead of starting one (CPU per
    /// replica is measured when its logs/node*.pid files are there).
    #[arg(long, conflicts_with_all = ["nodes", "base_port"])]
    dir: Option<PathBuf>,
    /// Print only the JSON report.
    #[arg(long)]
    json: bool,
    /// The protocol of the fresh testnet: hotstuff or pbft.
    #[arg(long, default_value = "hotstuff", conflicts_with = "dir")]
    protocol: ProtocolKind,
    /// Distinct keys per client, overwritten in turn; 0: a new key for every put (the
    /// replicas' state then grows with the run).
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
}

#[derive(Subcommand)]
enum TestnetCommand {
    /// Write keys (marked as test keys), committee.toml and one config per node.
    Init(TestnetArgs),
    /// Start every replica of a testnet as its own process (initializing it if needed)
    /// and show their progress until Ctrl-C.
    Run(TestnetArgs),
}

#[derive(clap::Args)]
struct TestnetArgs {
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    #[arg(long, default_value = "testnet")]
    dir: PathBuf,
    /// Replicas listen on base+i, clients on base+100+i, metrics on base+200+i.
    #[arg(long, default_value_t = 7000)]
    base_port: u16,
    /// The replicated application (used when the testnet is initialized).
    #[arg(long, value_enum, default_value = "kv")]
    app: App,
    /// TEST ONLY: make these replicas malicious, ID:BEHAVIOUR[,ID:BEHAVIOUR]
    /// (behaviours joined with '+' run together: 1:equivocate+double-vote). Written
    /// into their configs; every other replica's config is made honest again.
    #[arg(long)]
    byzantine: Option<String>,
    /// Allow more than f Byzantine replicas (safety is then no longer guaranteed).
    #[arg(long)]
    force: bool,
    /// The consensus protocol (used when the testnet is initialized): hotstuff or pbft.
    #[arg(long, default_value = "hotstuff")]
    protocol: ProtocolKind,
}

impl TestnetArgs {
    /// Parses and checks `--byzantine` (nothing when absent).
    fn byzantine(&self) -> anyhow::Result<Vec<(u16, Behaviours)>> {
        let assignments = match &self.byzantine {
            Some(text) => parse_assignments(text).with_context(|| format!("--byzantine {text:?}"))?,
            None => Vec::new(),
        };
        testnet::check_byzantine(self.nodes, &assignments, self.force)?;
        Ok(assignments)
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum App {
    Kv,
    Ledger,
}

impl From<App> for AppKind {
    fn from(app: App) -> AppKind {
        match app {
            App::Kv => AppKind::Kv,
            App::Ledger => AppKind::Ledger,
        }
    }
}

#[derive(Subcommand)]
enum ClientOp {
    Put {
        key: String,
        value: String,
    },
    Get {
        key: String,
    },
    Delete {
        key: String,
    },
    /// Set KEY to NEW if it is OLD (`-` for absent).
    Cas {
        key: String,
        old: String,
        new: String,
    },
    /// Keys in [START, END).
    Range {
        start: String,
        end: String,
    },
    /// Ledger: open an account for the key in KEY_FILE.
    Open {
        #[arg(long)]
        key: PathBuf,
    },
    /// Ledger: transfer AMOUNT from the account of KEY_FILE to TO (a public key, hex).
    Transfer {
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        to: String,
        #[arg(long)]
        amount: u64,
        /// The sender account's next nonce (0 for its first transfer).
        #[arg(long)]
        nonce: u64,
    },
    /// Ledger: the balance of OWNER (a public key, hex).
    Balance {
        owner: String,
    },
    /// Read KEY from one replica's committed state, without consensus.
    LocalGet {
        key: String,
        #[arg(long, default_value_t = 0)]
        replica: u16,
    },
}

/// mimalloc instead of glibc's malloc: with glibc, freed memory of the snapshot
/// encodings, batches and replies stayed in its arenas and the resident size crept up
/// for minutes while the live heap was flat (heaptrack: 187 MB live at 60 s, 183 MB at
/// 200 s; docs/PERFORMANCE.md, "Memory"). mimalloc returns freed pages to the system.
/// Built without transparent huge pages (`no_thp`): the first touch of each 2 MiB region
/// cleared all of it, and on a VM whose memory the host backs lazily that cost a fresh
/// replica a second or more of both cores while its heap grew under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Keygen { out } => {
            let key = KeyPair::generate();
            key.write_file(&out)?;
            println!("wrote {} (public key {})", out.display(), key.public());
        }
        Command::CheckCommittee { path } => {
            let committee =
                Committee::from_file(&path).with_context(|| format!("committee file {}", path.display()))?;
            let protocol = committee_protocol(&path).map_err(anyhow::Error::msg)?;
            println!(
                "committee {:?}: protocol {protocol}, n = {}, f = {}, quorum = {}, chain id {}",
                committee.name(),
                committee.size(),
                committee.max_faulty(),
                committee.quorum(),
                committee.chain_id().0
            );
        }
        Command::Smoke => smoke()?,
        Command::Testnet { command: TestnetCommand::Init(args) } => {
            let TestnetArgs { nodes, ref dir, base_port, app, force, protocol, .. } = args;
            let byzantine = args.byzantine()?;
            testnet::init(dir, nodes, base_port, &format!("bulwark-testnet-{nodes}"), app.into(), protocol)?;
            testnet::assign_byzantine(dir, nodes, &byzantine, force)?;
            println!("testnet of {nodes} replicas written to {}", dir.display());
        }
        Command::Testnet { command: TestnetCommand::Run(args) } => run_testnet(&args)?,
        Command::Start { config } => start(&config)?,
        Command::Client { dir, config, op } => {
            client(&config.unwrap_or_else(|| dir.join("client.toml")), op)?
        }
        Command::Bench(args) => bench(&args)?,
        Command::Sim(args) => {
            let violations = bulwark_tests::cli::run(&args)?;
            anyhow::ensure!(violations == 0, "the simulator found {violations} violations");
        }
        Command::Status { dir, config, json } => print_status(&dir, config.as_deref(), json)?,
    }
    Ok(())
}

fn init_logging() {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn start(config_path: &Path) -> anyhow::Result<()> {
    init_logging();
    let config = NodeConfig::load(config_path)?;
    let settings = config.settings(config_path)?;
    runtime()?.block_on(async {
        let replica = start_replica(settings).await.context("starting the replica")?;
        tracing::info!(id = %replica.id, client = %replica.client_address, metrics = ?replica.metrics_address, "replica running");
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("stopping");
        replica.stop().await.context("stopping the replica")?;
        Ok(())
    })
}

fn load_client_config(path: &Path) -> anyhow::Result<(Committee, Vec<testnet::ClientEndpointEntry>)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("client config {}", path.display()))?;
    let config: ClientConfig =
        toml::from_str(&text).with_context(|| format!("client config {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let committee_path = base.join(&config.committee);
    let committee = Committee::from_file(&committee_path)
        .with_context(|| format!("committee file {}", committee_path.display()))?;
    Ok((committee, config.replicas))
}

fn client(config_path: &Path, op: ClientOp) -> anyhow::Result<()> {
    let (committee, entries) = load_client_config(config_path)?;
    let mut endpoints = Vec::new();
    for entry in &entries {
        let address: SocketAddr = entry.client_address.parse().with_context(|| {
            format!("{}: client_address {:?}", config_path.display(), entry.client_address)
        })?;
        endpoints.push((ReplicaId(entry.id), address));
    }
    runtime()?.block_on(async {
        let key = KeyPair::generate();
        let mut client =
            Client::connect(&committee, &endpoints, Some(&key), NetworkConfig::default()).await?;
        let bytes = |s: &str| s.as_bytes().to_vec();
        let op = match op {
            ClientOp::Put { key, value } => KvOp::Put { key: bytes(&key), value: bytes(&value) },
            ClientOp::Get { key } => KvOp::Get { key: bytes(&key) },
            ClientOp::Delete { key } => KvOp::Delete { key: bytes(&key) },
            ClientOp::Cas { key, old, new } => KvOp::CompareAndSwap {
                key: bytes(&key),
                expected: (old != "-").then(|| bytes(&old)),
                new: bytes(&new),
            },
            ClientOp::Range { start, end } => {
                KvOp::Range { start: bytes(&start), end: bytes(&end), limit: 1000 }
            }
            ClientOp::Open { key } => {
                let owner = KeyPair::read_file(&key)?.public();
                return ledger(&mut client, LedgerOp::Open { owner: owner.to_bytes() }).await;
            }
            ClientOp::Transfer { key, to, amount, nonce } => {
                let sender = KeyPair::read_file(&key)?;
                let to: bulwark_crypto::PublicKey = to.parse().context("--to is not a public key")?;
                let op = LedgerOp::signed_transfer(&sender, committee.chain_id(), &to, amount, nonce);
                return ledger(&mut client, op).await;
            }
            ClientOp::Balance { owner } => {
                let owner: bulwark_crypto::PublicKey = owner.parse().context("OWNER is not a public key")?;
                return ledger(&mut client, LedgerOp::Balance { owner: owner.to_bytes() }).await;
            }
            ClientOp::LocalGet { key, replica } => {
                let (height, result) =
                    client.read_local(ReplicaId(replica), KvOp::Get { key: bytes(&key) }.encode()).await?;
                println!("{} (local read from replica {replica} at height {height})", show(&result));
                return Ok(());
            }
        };
        let certified = client.execute(op.encode()).await?;
        let replicas: Vec<String> = certified.replicas.iter().map(|r| r.to_string()).collect();
        println!(
            "{} (height {}, matching replies from replicas {})",
            show(&certified.result),
            certified.height,
            replicas.join(", ")
        );
        Ok(())
    })
}

async fn ledger(client: &mut Client, op: LedgerOp) -> anyhow::Result<()> {
    let certified = client.execute(op.encode()).await?;
    let replicas: Vec<String> = certified.replicas.iter().map(|r| r.to_string()).collect();
    let text = match LedgerResult::decode(&certified.result) {
        Some(LedgerResult::Opened { balance }) => format!("account open, balance {balance}"),
        Some(LedgerResult::Transferred { from_balance }) => {
            format!("transferred; sender balance {from_balance}")
        }
        Some(LedgerResult::Balance(Some(b))) => format!("balance {b}"),
        Some(LedgerResult::Balance(None)) => "no such account".into(),
        Some(LedgerResult::Rejected(reason)) => format!("refused: {reason}"),
        None => "(undecodable result)".into(),
    };
    println!("{text} (height {}, matching replies from replicas {})", certified.height, replicas.join(", "));
    Ok(())
}

fn show(result: &[u8]) -> String {
    let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    match KvResult::decode(result) {
        Some(KvResult::Done) => "ok".into(),
        Some(KvResult::Value(Some(v))) => text(&v),
        Some(KvResult::Value(None)) => "(absent)".into(),
        Some(KvResult::Swapped { swapped, previous }) => {
            format!(
                "swapped: {swapped}, previous: {}",
                previous.map(|p| text(&p)).unwrap_or("(absent)".into())
            )
        }
        Some(KvResult::Entries(entries)) => {
            entries.iter().map(|(k, v)| format!("{} = {}", text(k), text(v))).collect::<Vec<_>>().join("\n")
        }
        Some(KvResult::Invalid(reason)) => format!("refused: {reason}"),
        None => "(undecodable result)".into(),
    }
}

/// Where each replica of the testnet in `dir` serves its status.
fn status_targets(dir: &Path) -> anyhow::Result<Vec<(u16, Option<String>)>> {
    let (_, entries) = load_client_config(&dir.join("client.toml"))?;
    Ok(entries.into_iter().map(|e| (e.id, e.metrics_address)).collect())
}

fn print_status(dir: &Path, config: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let targets = match config {
        Some(path) => {
            let config = NodeConfig::load(path)?;
            if config.metrics_address.is_none() {
                bail!(
                    "config file {}: field `metrics_address`: not set; status is served there",
                    path.display()
                );
            }
            vec![(config.id, config.metrics_address)]
        }
        None => status_targets(dir)?,
    };
    let nodes = status::collect(&targets);
    if json {
        println!("{}", serde_json::to_string(&nodes)?);
    } else {
        for line in status::table(&nodes, None) {
            println!("{line}");
        }
    }
    anyhow::ensure!(nodes.iter().any(|n| n.report.is_some()), "no replica answered");
    Ok(())
}

fn run_testnet(args: &TestnetArgs) -> anyhow::Result<()> {
    let TestnetArgs { nodes, ref dir, base_port, app, force, protocol, .. } = *args;
    // A bad list is refused before anything is written or started.
    let byzantine = args.byzantine()?;
    if !dir.join("committee.toml").exists() {
        testnet::init(dir, nodes, base_port, &format!("bulwark-testnet-{nodes}"), app.into(), protocol)?;
        println!("initialized a {nodes}-replica {protocol} testnet in {}", dir.display());
    }
    let existing = committee_protocol(&dir.join("committee.toml")).map_err(anyhow::Error::msg)?;
    if existing != protocol {
        bail!("{} holds a {existing} testnet, not {protocol}: use another --dir", dir.display());
    }
    let (committee, entries) = load_client_config(&dir.join("client.toml"))?;
    if committee.size() != nodes {
        bail!(
            "{} holds a testnet of {} replicas, not {nodes}: use another --dir",
            dir.display(),
            committee.size()
        );
    }
    testnet::assign_byzantine(dir, nodes, &byzantine, force)?;
    let logs = dir.join("logs");
    let mut children = spawn_replicas(dir, nodes)?;
    println!("started {nodes} replicas of committee {:?}", committee.name());
    println!("  configs and keys: {}/node*.toml, node*.key (test keys)", dir.display());
    println!("  data:             {}/data/node*", dir.display());
    println!("  logs and pids:    {}/node*.log, node*.pid", logs.display());
    for entry in &entries {
        if let Some(m) = &entry.metrics_address {
            println!(
                "  node {} metrics:   http://{m}/metrics  status: http://{m}/status  clients: {}",
                entry.id, entry.client_address
            );
        }
    }
    if let Some(text) = &args.byzantine {
        println!("  TEST ONLY: Byzantine replicas {text}");
    }
    println!("try: bulwark client --dir {} put hello world    (Ctrl-C stops the testnet)", dir.display());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc_handler(move || stop.store(true, std::sync::atomic::Ordering::SeqCst))?;
    }
    // On a terminal the view redraws in place; otherwise (a log file) it is printed
    // every PRINT_EVERY polls.
    const PRINT_EVERY: u64 = 10;
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = indicatif::ProgressBar::new_spinner();
    let targets: Vec<(u16, Option<String>)> =
        entries.iter().map(|e| (e.id, e.metrics_address.clone())).collect();
    let mut previous: std::collections::BTreeMap<u16, (std::time::Instant, u64)> = Default::default();
    let mut exited = vec![false; children.len()];
    let mut polls = 0u64;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let nodes = status::collect(&targets);
        let now = std::time::Instant::now();
        let mut rates = std::collections::BTreeMap::new();
        for node in &nodes {
            let Some(report) = &node.report else { continue };
            if let Some((at, executed)) = previous.get(&node.id) {
                let seconds = now.duration_since(*at).as_secs_f64().max(0.001);
                rates
                    .insert(node.id, report.transactions_executed.saturating_sub(*executed) as f64 / seconds);
            }
            previous.insert(node.id, (now, report.transactions_executed));
        }
        let view = status::table(&nodes, Some(&rates)).join("\n");
        if interactive {
            bar.set_message(view);
            bar.tick();
        } else if polls % PRINT_EVERY == 3 {
            println!("{view}");
        }
        polls += 1;
        for (i, child) in children.iter_mut().enumerate() {
            if let Ok(Some(code)) = child.try_wait()
                && !exited[i]
            {
                exited[i] = true;
                bar.suspend(|| eprintln!("replica {i} exited ({code}); see {}/node{i}.log", logs.display()));
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    bar.finish_and_clear();
    println!("stopping {nodes} replicas");
    stop_replicas(&mut children);
    Ok(())
}

/// Starts `bulwark start` for each node config of the testnet in `dir`, logging to
/// `dir/logs/node{i}.log` and its process id to `dir/logs/node{i}.pid`.
fn spawn_replicas(dir: &Path, nodes: usize) -> anyhow::Result<Vec<Child>> {
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for i in 0..nodes {
        let log = std::fs::File::create(logs.join(format!("node{i}.log")))?;
        let child = Process::new(&exe)
            .arg("start")
            .arg("--config")
            .arg(testnet::node_config_path(dir, i))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting replica {i}"))?;
        // So an operator (or a test) can signal one replica: kill -9 $(cat node2.pid).
        std::fs::write(logs.join(format!("node{i}.pid")), format!("{}\n", child.id()))?;
        children.push(child);
    }
    Ok(children)
}

/// SIGTERM to each replica (it saves a snapshot and closes its connections), then wait.
fn stop_replicas(children: &mut [Child]) {
    for child in children.iter() {
        let _ = Process::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    }
    for child in children.iter_mut() {
        let _ = child.wait();
    }
}

fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    let BenchArgs { tx_size, rate, duration, clients, json, .. } = *args;
    // A fresh testnet (stopped at the end), or the running one in --dir.
    let fresh = match &args.dir {
        Some(_) => None,
        None => {
            let dir = tempfile::tempdir()?;
            let nodes = args.nodes;
            let name = format!("bulwark-bench-{nodes}");
            testnet::init(dir.path(), nodes, args.base_port, &name, AppKind::Kv, args.protocol)?;
            let children = spawn_replicas(dir.path(), nodes)?;
            Some((dir, children))
        }
    };
    let dir = match (&args.dir, &fresh) {
        (Some(dir), _) => dir.clone(),
        (None, Some((temp, _))) => temp.path().to_path_buf(),
        (None, None) => bail!("no testnet to load"),
    };
    let (committee, entries) = load_client_config(&dir.join("client.toml"))?;
    let nodes = committee.size();
    let endpoints: Vec<(ReplicaId, SocketAddr)> =
        entries.iter().filter_map(|e| Some((ReplicaId(e.id), e.client_address.parse().ok()?))).collect();
    let pids: Vec<u32> = match &fresh {
        Some((_, children)) => children.iter().map(|c| c.id()).collect(),
        None => (0..nodes)
            .map_while(|i| {
                let pid = std::fs::read_to_string(dir.join("logs").join(format!("node{i}.pid"))).ok()?;
                pid.trim().parse().ok()
            })
            .collect(),
    };
    // CPU per replica only when every replica's process is known.
    let pids = if pids.len() == nodes { pids } else { Vec::new() };
    // Each replica's data directory (RocksDB and the batch log) and status endpoint,
    // from its config; storage is measured only when every directory is known.
    let configs: Vec<(PathBuf, NodeConfig)> = (0..nodes)
        .filter_map(|i| {
            let path = testnet::node_config_path(&dir, i);
            NodeConfig::load(&path).ok().map(|config| (path, config))
        })
        .collect();
    let data_dirs: Vec<PathBuf> = configs.iter().map(|(path, config)| config.data_dir(path)).collect();
    let data_dirs = if data_dirs.len() == nodes { data_dirs } else { Vec::new() };
    // View changes are read only when every replica's status endpoint is known.
    let status_targets: Vec<(u16, Option<String>)> = if configs.len() == nodes {
        configs.iter().map(|(_, config)| (config.id, config.metrics_address.clone())).collect()
    } else {
        Vec::new()
    };
    let settle = if fresh.is_some() { Duration::from_secs(2) } else { Duration::ZERO };
    let result = runtime()?.block_on(async {
        tokio::time::sleep(settle).await; // let fresh replicas connect
        let own_before = bulwark_node::bench::process_cpu_seconds(std::process::id()).unwrap_or(0.0);
        let cpu_before: Vec<f64> =
            pids.iter().map(|p| bulwark_node::bench::process_cpu_seconds(*p).unwrap_or(0.0)).collect();
        let stored_before: Vec<u64> =
            data_dirs.iter().map(|d| bulwark_node::bench::directory_bytes(d)).collect();
        let views_before = bulwark_node::bench::view_changes(&status_targets);
        let bar = if json { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(duration) };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} s {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let progress = bar.clone();
        let load = bulwark_node::bench::Load {
            rate,
            tx_size,
            duration: Duration::from_secs(duration),
            clients,
            keys: (args.keys > 0).then_some(args.keys),
        };
        let measured = bulwark_node::bench::run(&committee, &endpoints, load, move |elapsed, committed| {
            progress.set_position(elapsed.as_secs().min(duration));
            progress.set_message(format!("{committed} committed"));
        })
        .await;
        bar.finish_and_clear();
        let cpu: Vec<f64> = pids
            .iter()
            .zip(&cpu_before)
            .map(|(p, before)| {
                bulwark_node::bench::process_cpu_seconds(*p).map(|after| after - before).unwrap_or(0.0)
            })
            .collect();
        let own = bulwark_node::bench::process_cpu_seconds(std::process::id()).unwrap_or(0.0) - own_before;
        let stored: Vec<u64> = data_dirs
            .iter()
            .zip(&stored_before)
            .map(|(d, before)| bulwark_node::bench::directory_bytes(d).saturating_sub(*before))
            .collect();
        let views_after = bulwark_node::bench::view_changes(&status_targets);
        measured.map(|m| {
            let mut report = bulwark_node::bench::report(nodes, tx_size, rate, m, cpu, own, stored);
            if let (Some(before), Some(after)) = (views_before, views_after) {
                report.view_changes_per_node =
                    after.iter().zip(&before).map(|(a, b)| a.saturating_sub(*b)).collect();
            }
            report
        })
    });
    let failed = result.as_ref().map_or(true, |r| !r.client_errors.is_empty());
    if let Some((temp, mut children)) = fresh {
        stop_replicas(&mut children);
        if failed {
            // What went wrong is in the replicas' logs: keep them (not the stores,
            // gigabytes after a loaded minute).
            let kept = temp.keep();
            let _ = std::fs::remove_dir_all(kept.join("data"));
            eprintln!("load clients failed: the testnet's logs and configs are kept in {}", kept.display());
        }
    }
    let report = result?;
    for error in &report.client_errors {
        eprintln!("a load client stopped early: {error}");
    }
    if !json {
        println!("machine: {} ({} CPUs)", report.cpu_model, report.cpus);
        println!(
            "{} replicas, {} B txs, offered {} tx/s for {} s: committed {:.0} tx/s ({} of {} submitted, {} rejected)",
            report.nodes,
            report.tx_size,
            report.offered_rate,
            duration,
            report.committed_tps,
            report.committed,
            report.submitted,
            report.rejected
        );
        println!(
            "latency submit -> f+1 replies: mean {:.1} ms, p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms",
            report.latency_ms_mean, report.latency_ms_p50, report.latency_ms_p95, report.latency_ms_p99
        );
        let cpu: Vec<String> = report.cpu_seconds_per_node.iter().map(|c| format!("{c:.1}")).collect();
        println!(
            "CPU seconds per replica: [{}]; {} µs of replica CPU per committed tx; load generator {:.1} CPU s",
            cpu.join(", "),
            report.cpu_us_per_tx.map(|c| format!("{c:.0}")).unwrap_or("-".into()),
            report.load_generator_cpu_seconds
        );
        if let Some(per_tx) = report.storage_bytes_per_tx {
            let mib: Vec<String> = report
                .storage_bytes_per_node
                .iter()
                .map(|b| format!("{:.0}", *b as f64 / 1048576.0))
                .collect();
            println!("storage grew by [{}] MiB per replica: {per_tx:.0} B per committed tx", mib.join(", "));
        }
        if !report.view_changes_per_node.is_empty() {
            println!("view changes during the run, per replica: {:?}", report.view_changes_per_node);
        }
        if let Some(worst) =
            report.timeline.iter().max_by(|a, b| a.latency_ms_mean.total_cmp(&b.latency_ms_mean))
        {
            println!(
                "slowest second (by submit time): {} s in, mean {:.1} ms, max {:.1} ms (per second: \"timeline\" in the JSON)",
                worst.t, worst.latency_ms_mean, worst.latency_ms_max
            );
        }
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn ctrlc_handler(f: impl Fn() + Send + 'static) -> anyhow::Result<()> {
    let rt = runtime()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
            f();
        })
    });
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
