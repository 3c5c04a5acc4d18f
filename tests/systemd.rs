//! The shipped systemd unit: `systemd-analyze verify` accepts it, its offline security
//! exposure is 2.0 or less, and it keeps the properties berth relies on.

mod common;

use std::process::Command;

fn unit() -> String {
    std::fs::read_to_string(common::repo_root().join("systemd/berth.service")).unwrap()
}

fn directive<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines().filter_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('='))).map(str::trim).collect()
}

/// The unit as installed, with its binary path pointing at this build so `verify` can check
/// that the commands exist.
fn installed_copy(dir: &std::path::Path) -> std::path::PathBuf {
    let text = unit().replace("/usr/local/bin/berth", env!("CARGO_BIN_EXE_berth"));
    let path = dir.join("berth.service");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn unit_verifies_and_is_hardened() {
    if !common::require("systemd-analyze") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = installed_copy(dir.path());
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).current_dir(dir.path()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {err}");
    // verify reports some problems as warnings with a zero exit status.
    let complaints: Vec<&str> = err.lines().filter(|l| l.contains("berth.service")).collect();
    assert!(complaints.is_empty(), "systemd-analyze verify complains: {err}");

    let out = Command::new("systemd-analyze").args(["security", "--offline=true", "--no-pager"]).arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for berth.service:").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}{}", String::from_utf8_lossy(&out.stderr)));
    assert!(exposure <= 2.0, "exposure {exposure} > 2.0:\n{text}");
}

#[test]
fn unit_keeps_what_berth_relies_on() {
    let u = unit();
    let one = |k: &str| -> String {
        let v = directive(&u, k);
        assert_eq!(v.len(), 1, "{k} should be set once: {v:?}");
        v[0].to_string()
    };
    assert_eq!(one("Type"), "notify", "berth sends READY=1 once its listeners are bound");
    assert!(one("ExecStartPre").contains("berth check --config"), "a bad config must fail before the start");
    assert!(one("ExecStart").contains("berth serve --config"));
    assert_eq!(one("DynamicUser"), "yes");
    assert_eq!(one("StateDirectory"), "berth");
    assert_eq!(one("CacheDirectory"), "berth");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
    assert!(directive(&u, "SystemCallFilter").contains(&"@system-service"));
    assert_eq!(one("KillSignal"), "SIGTERM", "SIGTERM is what drains");
    // The stop timeout must leave room for the default grace period, plus the exit itself.
    let stop: u64 = one("TimeoutStopSec").trim_end_matches('s').parse().unwrap();
    let grace = berth::config::Config::parse("", "default").unwrap().grace_period.as_secs();
    assert!(stop >= grace + 5, "TimeoutStopSec={stop} leaves no room after a {grace}s grace period");
    // The shipped example config is what the unit expects to find.
    let root = common::repo_root();
    assert!(root.join("config/berth.toml").exists());
}
