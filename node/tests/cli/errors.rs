//! Bad configs and key files: a clear error naming the file and the field, a non-zero
//! exit code, never a panic.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use crate::support::{Testnet, bulwark, text};

/// Writes `name` next to the testnet's node0.toml: node0.toml with `edit` applied.
fn variant(net: &Testnet, name: &str, edit: impl Fn(String) -> String) -> String {
    let original = std::fs::read_to_string(net.config(0)).expect("node0.toml");
    let path = net.dir().join(name);
    std::fs::write(&path, edit(original)).expect("write variant");
    path.to_str().expect("utf-8 path").to_string()
}

fn write_key(dir: &Path, name: &str, contents: &str, mode: u32) {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// `bulwark start --config PATH` must fail quickly with every one of `expected` in its
/// error output.
fn refused(path: &str, expected: &[&str]) {
    let out = bulwark(&["start", "--config", path], Duration::from_secs(20));
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{path} was accepted: {stderr}");
    assert_ne!(out.status.code(), Some(0));
    assert!(!stderr.contains("panicked"), "{stderr}");
    for part in expected {
        assert!(stderr.contains(part), "{path}: expected {part:?} in: {stderr}");
    }
}

#[test]
fn bad_configs_and_key_files_are_refused_naming_the_file_and_the_field() {
    let net = Testnet::init(4, &[]);
    let dir = net.dir().to_path_buf();
    let key0 = std::fs::read_to_string(dir.join("node0.key")).expect("node0.key");
    let set_key =
        |name: &'static str| move |c: String| c.replace("key = \"node0.key\"", &format!("key = \"{name}\""));

    let path = variant(&net, "unknown-field.toml", |c| c.replacen("id = 0", "id = 0\ncolour = \"blue\"", 1));
    refused(&path, &[&path, "unknown field `colour`"]);
    let path = variant(&net, "wrong-type.toml", |c| c.replacen("id = 0", "id = \"zero\"", 1));
    refused(&path, &[&path, "id = \"zero\"", "invalid type"]);
    let path = variant(&net, "not-a-member.toml", |c| c.replacen("id = 0", "id = 9", 1));
    refused(&path, &[&path, "field `id`", "replica 9 is not in the committee"]);
    let path = variant(&net, "no-committee.toml", |c| {
        c.replace("committee = \"committee.toml\"", "committee = \"nowhere.toml\"")
    });
    refused(&path, &[&path, "field `committee`", "nowhere.toml"]);
    let path =
        variant(&net, "zero-timeout.toml", |c| c.replace("base_timeout_ms = 500", "base_timeout_ms = 0"));
    refused(&path, &[&path, "field `consensus`", "base_timeout_ms"]);
    let path =
        variant(&net, "bad-behaviour.toml", |c| c.replacen("id = 0", "id = 0\nbyzantine = \"explode\"", 1));
    refused(&path, &[&path, "field `byzantine`", "unknown behaviour \"explode\""]);
    let path = variant(&net, "test-key.toml", |c| c.replace("test_keys = true", "test_keys = false"));
    refused(&path, &[&path, "field `key`", "is a test key"]);
    refused(&dir.join("missing.toml").to_string_lossy(), &["config file", "missing.toml"]);

    // Key files.
    let path = variant(&net, "missing-key.toml", set_key("absent.key"));
    refused(&path, &[&path, "field `key`", "absent.key"]);
    write_key(&dir, "readable.key", &key0, 0o644);
    let path = variant(&net, "readable-key.toml", set_key("readable.key"));
    refused(&path, &[&path, "field `key`", "readable.key", "chmod 600"]);
    write_key(&dir, "bad-hex.key", &key0.replacen("secret_key = \"", "secret_key = \"zz", 1), 0o600);
    let path = variant(&net, "bad-hex.toml", set_key("bad-hex.key"));
    refused(&path, &[&path, "field `key`", "bad-hex.key", "secret_key is not 64 hex characters"]);
    write_key(&dir, "garbage.key", "\u{0}\u{1} not toml [[[", 0o600);
    let path = variant(&net, "garbage-key.toml", set_key("garbage.key"));
    refused(&path, &[&path, "field `key`", "garbage.key", "malformed"]);
    let path = variant(&net, "other-key.toml", set_key("node1.key"));
    refused(&path, &[&path, "field `key`", "does not match replica 0's public key"]);

    // The other commands that read files name them too.
    let client = dir.join("broken-client.toml");
    std::fs::write(&client, "committee = 7\n").expect("write");
    let out =
        bulwark(&["client", "--config", &client.to_string_lossy(), "get", "k"], Duration::from_secs(20));
    assert!(
        !out.status.success() && text(&out.stderr).contains("broken-client.toml"),
        "{}",
        text(&out.stderr)
    );
    let committee = dir.join("broken-committee.toml");
    std::fs::write(&committee, "chain_id = \"x\"\n").expect("write");
    let out = bulwark(&["check-committee", &committee.to_string_lossy()], Duration::from_secs(20));
    assert!(
        !out.status.success() && text(&out.stderr).contains("broken-committee.toml"),
        "{}",
        text(&out.stderr)
    );
    let out = bulwark(
        &["testnet", "run", "--nodes", "4", "--dir", &net.dir_arg(), "--byzantine", "1:explode"],
        Duration::from_secs(20),
    );
    assert!(!out.status.success() && text(&out.stderr).contains("--byzantine"), "{}", text(&out.stderr));
}
