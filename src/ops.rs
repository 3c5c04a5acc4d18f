//! Offline and remote store commands behind `berth gc` and `berth fsck`.

use crate::config::Config;
use crate::registry::Registry;

/// Is a berth serving this config right now? Its admin listener answers.
fn running_admin(config: &Config) -> Option<std::net::SocketAddr> {
    let addr = config.admin_listen?;
    std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(300)).ok().map(|_| addr)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// Runs GC. When the server is running, it runs inside the server (POST /gc on the admin
/// listener) so its index and locks stay authoritative; otherwise on the store directly.
pub fn gc(config: Config, dry_run: bool) -> Result<String, String> {
    if let Some(addr) = running_admin(&config) {
        let url = format!("http://{addr}/gc?dry_run={dry_run}");
        return runtime().block_on(async {
            let r = reqwest::Client::new()
                .post(&url)
                .send()
                .await
                .map_err(|e| format!("asking the running berth at {addr} to collect: {e}"))?;
            let status = r.status();
            let body = r.text().await.map_err(|e| e.to_string())?;
            if !status.is_success() {
                return Err(format!("the running berth answered {status}: {body}"));
            }
            Ok(body)
        });
    }
    let store = config.open_store()?;
    let registry = Registry::new(std::sync::Arc::new(config), store)?;
    let report = runtime().block_on(registry.gc(dry_run)).map_err(|e| format!("gc failed: {e}"))?;
    Ok(serde_json::to_string_pretty(&report).expect("report serializes"))
}

/// Verifies the whole store. Returns whether it was consistent, and the report.
pub fn fsck(config: Config, repair: bool, resume: bool) -> Result<(bool, String), String> {
    // The metadata database takes one process at a time.
    if let Some(addr) = running_admin(&config) {
        let what = if repair { "fsck --repair" } else { "fsck" };
        return Err(format!("berth is running (admin listener {addr} answers); stop it before {what}"));
    }
    let store = config.open_store()?;
    store
        .set_classes(crate::store::Classes {
            cache_roots: config.upstreams.iter().map(|u| u.name.clone()).collect(),
            namespaces: config.namespaces.iter().map(|n| n.prefix.clone()).collect(),
        })
        .map_err(|e| format!("fsck failed: {e}"))?;
    let sparse = |repo: &str| config.namespaces.iter().any(|n| n.matches(repo) && n.policy.sparse_indexes);
    let r = store.fsck_with(repair, resume, &sparse).map_err(|e| format!("fsck failed: {e}"))?;
    let mut out = String::new();
    for p in &r.problems {
        out.push_str(&format!("problem: {p}\n"));
    }
    for n in &r.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out.push_str(&format!("{} blobs verified, {} problems, {} repaired\n", r.blobs_checked, r.problems.len(), r.repaired));
    Ok((r.problems.is_empty(), out))
}

/// Copies every tag the `[[replication]]` rules match (rule `rule` only, when given) to their
/// targets: the initial sync, or a catch-up after a long outage. Inside the running server when
/// there is one (POST /replicate on the admin listener), so it shares its store; otherwise on
/// the store directly. Returns the report, and whether every tag was copied.
pub fn replicate(config: Config, rule: Option<usize>) -> Result<(bool, String), String> {
    if config.replication.is_empty() {
        return Err("the config has no [[replication]] rule".into());
    }
    if let Some(addr) = running_admin(&config) {
        let url = match rule {
            Some(r) => format!("http://{addr}/replicate?rule={r}"),
            None => format!("http://{addr}/replicate"),
        };
        return runtime().block_on(async {
            let r = reqwest::Client::new()
                .post(&url)
                .send()
                .await
                .map_err(|e| format!("asking the running berth at {addr} to replicate: {e}"))?;
            let status = r.status();
            let body = r.text().await.map_err(|e| e.to_string())?;
            if !status.is_success() {
                return Err(format!("the running berth answered {status}: {body}"));
            }
            let reports: Vec<serde_json::Value> = serde_json::from_str(&body).map_err(|e| format!("unreadable report: {e}"))?;
            let ok = reports.iter().all(|r| r["tags_failed"].as_array().is_some_and(|f| f.is_empty()));
            Ok((ok, body))
        });
    }
    let store = config.open_store()?;
    let r = crate::replicate::Replicator::new(store, &config.replication);
    let reports = runtime().block_on(r.sync(rule)).map_err(|e| format!("replication failed: {e}"))?;
    let ok = reports.iter().all(|r| r.tags_failed.is_empty());
    Ok((ok, serde_json::to_string_pretty(&reports).expect("report serializes")))
}
