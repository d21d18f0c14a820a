//! Separate hosts: each replica in a network namespace of its own, with its own address
//! on a bridge the test makes (and removes), so nothing relies on 127.0.0.1. Needs root
//! (`ip netns`); skipped with a message elsewhere.

use std::process::Command;
use std::time::Duration;

use crate::support::{Testnet, assert_same_digests, bulwark, summary, text};

/// Runs `ip ARGS`; the error is its stderr.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), text(&out.stderr).trim()))
    }
}

/// Namespaces `bw<pid>n<i>`, each with a veth on the bridge `bwbr<pid>` and the address
/// `10.213.<x>.<i+1>/24`; the host side of the bridge is `.254`. Removed on drop.
struct Hosts {
    namespaces: Vec<String>,
    bridge: String,
    subnet: String,
}

impl Hosts {
    fn create(n: usize) -> Result<Hosts, String> {
        let pid = std::process::id() % 100_000;
        let mut hosts = Hosts {
            namespaces: Vec::new(),
            bridge: format!("bwbr{pid}"),
            subnet: format!("10.213.{}", 20 + pid % 200),
        };
        // On an error part way, drop removes what was made.
        ip(&["link", "add", &hosts.bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}.254/24", hosts.subnet), "dev", &hosts.bridge])?;
        ip(&["link", "set", &hosts.bridge, "up"])?;
        for i in 0..n {
            let namespace = format!("bw{pid}n{i}");
            ip(&["netns", "add", &namespace])?;
            hosts.namespaces.push(namespace.clone());
            let (outside, inside) = (format!("bwh{pid}{i}"), format!("bwp{pid}{i}"));
            ip(&["link", "add", &outside, "type", "veth", "peer", "name", &inside])?;
            ip(&["link", "set", &inside, "netns", &namespace])?;
            ip(&["link", "set", &outside, "master", &hosts.bridge])?;
            ip(&["link", "set", &outside, "up"])?;
            let address = format!("{}/24", hosts.address(i));
            ip(&["netns", "exec", &namespace, "ip", "addr", "add", &address, "dev", &inside])?;
            ip(&["netns", "exec", &namespace, "ip", "link", "set", &inside, "up"])?;
            ip(&["netns", "exec", &namespace, "ip", "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    fn address(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, i + 1)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth pair inside it.
        for namespace in &self.namespaces {
            let _ = ip(&["netns", "del", namespace]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// Moves every address of the testnet from 127.0.0.1 to replica `i`'s own host.
fn readdress(net: &Testnet, hosts: &Hosts) {
    let mut files = vec![net.dir().join("committee.toml"), net.dir().join("client.toml")];
    files.extend((0..net.nodes).map(|i| net.config(i)));
    for file in files {
        let mut contents = std::fs::read_to_string(&file).expect("testnet file");
        for i in 0..net.nodes {
            for offset in [0, 100, 200] {
                let port = net.ports.base + offset + i as u16;
                contents = contents
                    .replace(&format!("\"127.0.0.1:{port}\""), &format!("\"{}:{port}\"", hosts.address(i)));
            }
        }
        assert!(!contents.contains("127.0.0.1"), "{}: {contents}", file.display());
        std::fs::write(&file, contents).expect("rewrite");
    }
}

#[test]
fn replicas_on_separate_hosts_commit_and_agree() {
    let hosts = match Hosts::create(4) {
        Ok(hosts) => hosts,
        Err(reason) => {
            eprintln!("skipped: cannot make network namespaces here (needs root and `ip netns`): {reason}");
            return;
        }
    };
    // Declared after `hosts`, so its replicas stop before the namespaces go.
    let mut net = Testnet::init(4, &[]);
    readdress(&net, &hosts);
    let namespaces = hosts.namespaces.clone();
    net.set_launcher(move |i| ["ip", "netns", "exec", &namespaces[i]].map(String::from).to_vec());
    net.start_all();
    let status = net.wait_for("every replica up, connected and committing", Duration::from_secs(30), |s| {
        s.iter().all(|n| n.report.as_ref().is_some_and(|r| r.height > 5 && r.peers_connected == 3))
    });
    assert!(status.iter().all(|n| n.address.as_deref().is_some_and(|a| a.starts_with(&hosts.subnet))));
    let put = net.client(&["put", "where", "namespaces"]);
    assert!(put.status.success(), "{}{}", text(&put.stdout), text(&put.stderr));
    let get = net.client(&["get", "where"]);
    assert!(text(&get.stdout).starts_with("namespaces (height "), "{}", text(&get.stderr));
    let later = net.status();
    assert!(assert_same_digests(&later, &[0, 1, 2, 3]) > 0, "no common height: {}", summary(&later));
    // Every replica is connected to its three peers, over the bridge.
    let table = bulwark(&["status", "--dir", &net.dir_arg()], Duration::from_secs(20));
    assert!(text(&table.stdout).lines().skip(1).all(|l| l.contains(" 3/3 ")), "{}", text(&table.stdout));
}
