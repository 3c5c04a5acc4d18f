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
