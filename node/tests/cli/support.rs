//! Driving the real `bulwark` binary: one process per replica (or a `testnet run`
//! process that owns them), temp dirs, claimed port ranges, and `bulwark status --json`
//! as the window into each replica.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use bulwark_crypto::{Committee, ReplicaId};
use bulwark_node::config::NodeConfig;
use bulwark_node::status::NodeStatus;
use bulwark_node::testnet::{self, ClientConfig};

pub const BIN: &str = env!("CARGO_BIN_EXE_bulwark");

/// Sends `signal` (a name: INT, TERM, KILL, STOP, CONT) to process `pid`.
pub fn signal(pid: u32, signal: &str) {
    let _ =
        Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).stderr(Stdio::null()).status();
}

/// Whether process `pid` still exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        .unwrap_or(false)
}

/// Runs `bulwark ARGS` to completion (killed and failed after `timeout`).
pub fn bulwark(args: &[&str], timeout: Duration) -> Output {
    let child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bulwark");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(output) => output.expect("bulwark output"),
        Err(_) => {
            signal(pid, "KILL");
            panic!("`bulwark {}` did not finish within {timeout:?}", args.join(" "));
        }
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A range of ports no other test of this machine uses: replicas on `base + i`,
/// clients on `base + 100 + i`, metrics on `base + 200 + i` (the testnet layout).
/// Claimed with a lock file, so parallel test processes never share one; released on
/// drop (a lock older than ten minutes is from a killed run and is taken over).
pub struct Ports {
    pub base: u16,
    lock: PathBuf,
}

impl Ports {
    const FIRST: u32 = 20_000;
    const SLOTS: u32 = 40;

    pub fn claim(nodes: usize) -> Ports {
        let dir = std::env::temp_dir().join("bulwark-e2e-ports");
        std::fs::create_dir_all(&dir).expect("lock dir");
        let start = std::process::id() % Self::SLOTS;
        for k in 0..Self::SLOTS {
            let base = (Self::FIRST + ((start + k) % Self::SLOTS) * 300) as u16;
            let lock = dir.join(base.to_string());
            let stale = std::fs::metadata(&lock)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(600));
            if stale {
                let _ = std::fs::remove_file(&lock);
            }
            if std::fs::OpenOptions::new().write(true).create_new(true).open(&lock).is_err() {
                continue;
            }
            if Self::free(base, nodes) {
                return Ports { base, lock };
            }
            let _ = std::fs::remove_file(&lock);
        }
        panic!("no free range of ports from {}", Self::FIRST);
    }

    fn free(base: u16, nodes: usize) -> bool {
        (0..nodes as u16).all(|i| {
            std::net::UdpSocket::bind(("127.0.0.1", base + i)).is_ok()
                && std::net::UdpSocket::bind(("127.0.0.1", base + 100 + i)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", base + 200 + i)).is_ok()
        })
    }
}

impl Drop for Ports {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.lock);
    }
}

/// A local testnet in a temp dir whose replicas are real `bulwark` processes.
pub struct Testnet {
    pub nodes: usize,
    dir: tempfile::TempDir,
    replicas: Vec<Option<Child>>,
    /// A `bulwark testnet run` process (it owns its replicas).
    runner: Option<Child>,
    /// Replica `i` is started as `launcher(i)... bulwark start` (empty: directly).
    launcher: Box<dyn Fn(usize) -> Vec<String>>,
    // Dropped last: the ports stay claimed until every process is gone.
    pub ports: Ports,
}

impl Testnet {
    /// `bulwark testnet init` with `extra` arguments, then shorter round timeouts (so a
    /// dead leader's rounds cost 0.5 s, not 1 s).
    pub fn init(nodes: usize, extra: &[&str]) -> Testnet {
        let ports = Ports::claim(nodes);
        let dir = tempfile::tempdir().expect("temp dir");
        let (n, base) = (nodes.to_string(), ports.base.to_string());
        let path = dir.path().to_str().expect("utf-8 temp dir").to_string();
        let mut args = vec!["testnet", "init", "--nodes", &n, "--dir", &path, "--base-port", &base];
        args.extend_from_slice(extra);
        let out = bulwark(&args, Duration::from_secs(30));
        assert!(out.status.success(), "testnet init failed: {}", text(&out.stderr));
        for i in 0..nodes {
            let path = testnet::node_config_path(dir.path(), i);
            let mut config = NodeConfig::load(&path).expect("generated config loads");
            config.consensus.base_timeout_ms = 500;
            config.consensus.max_timeout_ms = 2_000;
            testnet::write_node_config(&path, &config).expect("config written");
        }
        Testnet {
            nodes,
            dir,
            replicas: (0..nodes).map(|_| None).collect(),
            runner: None,
            launcher: Box::new(|_| Vec::new()),
            ports,
        }
    }

    /// Starts replica `i` behind the command `launcher(i)` returns (for example
    /// `ip netns exec NS`), which must exec the rest of its arguments.
    pub fn set_launcher(&mut self, launcher: impl Fn(usize) -> Vec<String> + 'static) {
        self.launcher = Box::new(launcher);
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn dir_arg(&self) -> String {
        self.dir().to_str().expect("utf-8 temp dir").to_string()
    }

    pub fn config(&self, i: usize) -> PathBuf {
        testnet::node_config_path(self.dir(), i)
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir().join("logs").join(format!("node{i}.log"))
    }

    /// The last lines of every replica's log (for failure messages).
    pub fn logs(&self) -> String {
        (0..self.nodes)
            .map(|i| {
                let log = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                format!("--- node {i}\n{}", lines[lines.len().saturating_sub(8)..].join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `bulwark start --config nodeI.toml`, appending to its log.
    pub fn start(&mut self, i: usize) {
        std::fs::create_dir_all(self.dir().join("logs")).expect("log dir");
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(i)).expect("log file");
        let prefix = (self.launcher)(i);
        let mut command = match prefix.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(BIN);
                command
            }
            None => Command::new(BIN),
        };
        let child = command
            .arg("start")
            .arg("--config")
            .arg(self.config(i))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log file")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn replica");
        self.replicas[i] = Some(child);
    }

    pub fn start_all(&mut self) {
        for i in 0..self.nodes {
            self.start(i);
        }
    }

    pub fn pid(&self, i: usize) -> u32 {
        self.replicas[i].as_ref().expect("replica started by the test").id()
    }

    /// `kill -9`: no clean shutdown, no snapshot.
    pub fn kill9(&mut self, i: usize) {
        let mut child = self.replicas[i].take().expect("replica running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }

    /// `bulwark testnet run` on this testnet with `extra` arguments, as one process.
    pub fn run(&mut self, extra: &[&str]) {
        let (n, base, dir) = (self.nodes.to_string(), self.ports.base.to_string(), self.dir_arg());
        let out = std::fs::File::create(self.dir().join("run.out")).expect("run.out");
        let child = Command::new(BIN)
            .args(["testnet", "run", "--nodes", &n, "--dir", &dir, "--base-port", &base])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().expect("run.out")))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("spawn testnet run");
        self.runner = Some(child);
    }

    /// The process ids `testnet run` wrote for its replicas.
    pub fn runner_pids(&self) -> Vec<u32> {
        (0..self.nodes)
            .filter_map(|i| {
                let path = self.dir().join("logs").join(format!("node{i}.pid"));
                std::fs::read_to_string(path).ok()?.trim().parse().ok()
            })
            .collect()
    }

    /// Ctrl-C to `testnet run`: it must stop every replica and exit 0.
    pub fn interrupt_runner(&mut self) {
        let mut runner = self.runner.take().expect("testnet run started");
        signal(runner.id(), "INT");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = runner.try_wait().expect("wait") {
                assert!(status.success(), "testnet run exited with {status}");
                break;
            }
            assert!(Instant::now() < deadline, "testnet run did not stop within 20 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `bulwark status --dir D --json`.
    pub fn status(&self) -> Vec<NodeStatus> {
        let out = bulwark(&["status", "--dir", &self.dir_arg(), "--json"], Duration::from_secs(20));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json: {e}: {}{}", text(&out.stdout), text(&out.stderr)))
    }

    /// `bulwark client --dir D ARGS`.
    pub fn client(&self, args: &[&str]) -> Output {
        let dir = self.dir_arg();
        let mut all = vec!["client", "--dir", &dir];
        all.extend_from_slice(args);
        bulwark(&all, Duration::from_secs(40))
    }

    /// Polls status until `done` holds; panics with the last status and the logs after
    /// `timeout`.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[NodeStatus]) -> bool,
    ) -> Vec<NodeStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            if done(&status) {
                return status;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}: {}\n{}", summary(&status), self.logs());
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The committee and client endpoints, for the client library.
    pub fn client_setup(&self) -> (Committee, Vec<(ReplicaId, SocketAddr)>) {
        let path = self.dir().join("client.toml");
        let config: ClientConfig = toml::from_str(&std::fs::read_to_string(&path).expect("client.toml"))
            .expect("client.toml parses");
        let committee = Committee::from_file(&self.dir().join(&config.committee)).expect("committee");
        let endpoints = config
            .replicas
            .iter()
            .map(|r| (ReplicaId(r.id), r.client_address.parse().expect("client address")))
            .collect();
        (committee, endpoints)
    }
}

impl Drop for Testnet {
    fn drop(&mut self) {
        if let Some(mut runner) = self.runner.take() {
            signal(runner.id(), "INT");
            let deadline = Instant::now() + Duration::from_secs(10);
            while runner.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = runner.kill();
            let _ = runner.wait();
            for pid in self.runner_pids() {
                if alive(pid) {
                    signal(pid, "KILL");
                }
            }
        }
        for child in self.replicas.iter_mut().flatten() {
            signal(child.id(), "CONT");
            signal(child.id(), "TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for child in self.replicas.iter_mut().flatten() {
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // A failed test keeps its testnet (logs, configs, stores) for a post-mortem.
        if std::thread::panicking() {
            let kept = self.dir.path().with_extension("failed");
            if std::fs::rename(self.dir.path(), &kept).is_ok() {
                eprintln!("the failed test's testnet (logs, data) is kept in {}", kept.display());
            }
        }
    }
}

/// One line per replica: id, height, round, leader, evidence.
pub fn summary(status: &[NodeStatus]) -> String {
    status
        .iter()
        .map(|n| match &n.report {
            Some(r) => format!(
                "[{}: height {} round {} leader {:?} peers {} evidence {:?} lag {:?}]",
                n.id, r.height, r.round, r.leader, r.peers_connected, r.evidence_against, n.lag
            ),
            None => format!("[{}: down]", n.id),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn height(status: &[NodeStatus], id: usize) -> u64 {
    status.iter().find(|n| n.id as usize == id).and_then(|n| n.report.as_ref()).map_or(0, |r| r.height)
}

/// Asserts that the replicas `ids` report the same state digest at every height their
/// recent histories share, and returns how many (replica pair, height) comparisons
/// there were.
pub fn assert_same_digests(status: &[NodeStatus], ids: &[usize]) -> usize {
    let histories: Vec<(usize, BTreeMap<u64, &str>)> = ids
        .iter()
        .map(|&id| {
            let report = status
                .iter()
                .find(|n| n.id as usize == id)
                .and_then(|n| n.report.as_ref())
                .unwrap_or_else(|| panic!("replica {id} is down: {}", summary(status)));
            (id, report.recent_digests.iter().map(|(h, d)| (*h, d.as_str())).collect())
        })
        .collect();
    let mut compared = 0;
    for (a, ours) in &histories {
        for (b, theirs) in &histories {
            if a >= b {
                continue;
            }
            for (height, digest) in ours {
                if let Some(other) = theirs.get(height) {
                    assert_eq!(digest, other, "replicas {a} and {b} differ at height {height}");
                    compared += 1;
                }
            }
        }
    }
    compared
}
