//! Several berth nodes with `[cluster]` on one bucket prefix, for the cluster tests and the
//! cluster benchmark. Runs on the S3 backend only (`BERTH_TEST_BACKEND=s3`).

use super::{backend_is_s3, eventually, Berth};
use std::time::Duration;

pub struct Nodes {
    pub nodes: Vec<Berth>,
    /// Each node's peer listener URL, as it advertises it.
    pub peers: Vec<String>,
    _shared: tempfile::TempDir,
}

impl Nodes {
    /// `n` nodes on one bucket prefix, each with `extra` (upstreams, namespaces) and
    /// `storage` added to `[storage]`; returns once every node sees all of them.
    pub fn start(n: usize, storage: &str, extra: &str) -> Option<Nodes> {
        // Short, so membership settles and changes within the tests' deadlines.
        Self::start_with_heartbeat(n, "200ms", "1s", storage, extra)
    }

    /// As `start`, with the `[cluster]` heartbeat and member timeout given.
    pub fn start_with_heartbeat(n: usize, heartbeat: &str, member_timeout: &str, storage: &str, extra: &str) -> Option<Nodes> {
        if !backend_is_s3() {
            eprintln!("skipping: the cluster runs on S3 only (BERTH_TEST_BACKEND=s3)");
            return None;
        }
        let shared = tempfile::tempdir().unwrap();
        let secret = shared.path().join("cluster.secret");
        std::fs::write(&secret, "a-shared-secret-for-the-test-cluster\n").unwrap();
        let prefix = format!("t/cluster-{}/", shared.path().file_name().unwrap().to_string_lossy().trim_start_matches('.'));
        let mut nodes = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..n {
            let port = super::free_port();
            let url = format!("http://127.0.0.1:{port}");
            let section = format!(
                "\n[cluster]\nadvertise = \"{url}\"\nlisten = \"127.0.0.1:{port}\"\nsecret_file = \"{}\"\nheartbeat = \"{heartbeat}\"\nmember_timeout = \"{member_timeout}\"\n",
                secret.display()
            );
            let prefix = prefix.clone();
            let b = Berth::start_edited(extra, move |text| {
                let text: String = text
                    .lines()
                    .map(|l| if l.starts_with("prefix = \"t/") { format!("prefix = \"{prefix}\"") } else { l.to_string() })
                    .collect::<Vec<_>>()
                    .join("\n");
                let text = text.replacen("[storage]\n", &format!("[storage]\n{storage}\n"), 1);
                text + &section
            });
            nodes.push(b);
            peers.push(url);
        }
        let c = Nodes { nodes, peers, _shared: shared };
        for b in &c.nodes {
            assert!(
                eventually(Duration::from_secs(15), || metric(b, "berth_cluster_members") == Some(n as f64)),
                "node {} does not see {n} members; log:\n{}",
                b.url(),
                b.log()
            );
        }
        Some(c)
    }

    /// The node that owns `key`, by index.
    pub fn owner(&self, key: &str) -> usize {
        let url = berth::cluster::owner_url(&self.peers, key).unwrap();
        self.peers.iter().position(|p| *p == url).unwrap()
    }
}

/// The value of the first series of `name` on a node's admin /metrics.
pub fn metric(b: &Berth, name: &str) -> Option<f64> {
    let text = reqwest::blocking::get(format!("{}/metrics", b.admin_url())).ok()?.text().ok()?;
    text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{'])).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The sum of every series on a node's admin /metrics whose line starts with `prefix` (a
/// name, or a name with some of its labels).
pub fn metric_sum(b: &Berth, prefix: &str) -> f64 {
    let text = reqwest::blocking::get(format!("{}/metrics", b.admin_url())).unwrap().text().unwrap();
    text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}
