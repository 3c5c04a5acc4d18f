//! Offline and remote store commands behind `berth gc` and `berth fsck`.

use crate::config::Config;
use crate::registry::Registry;

/// Is a berth serving this config right now? Its admin listener answers.
fn running_admin(config: &Config) -> Option<std::net::SocketAddr> {
    let addr = config.admin_listen?;
    std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(300)).ok().map(|_| addr)
}

/// POSTs `path` to the running berth's admin listener and returns its answer's body; `what`
/// names the work in errors.
fn ask_running(addr: std::net::SocketAddr, path: &str, what: &str) -> Result<String, String> {
    runtime().block_on(async {
        let r = reqwest::Client::new()
            .post(format!("http://{addr}{path}"))
            .send()
            .await
            .map_err(|e| format!("asking the running berth at {addr} to {what}: {e}"))?;
        let status = r.status();
        let body = r.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            // A JSON refusal (another cluster member holds the maintenance lease) says why.
            let why = serde_json::from_str::<serde_json::Value>(&body).ok().and_then(|v| v["error"].as_str().map(str::to_string));
            return Err(format!("the running berth at {addr} answered {status}: {}", why.as_deref().unwrap_or(body.trim_end())));
        }
        Ok(body)
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// Runs GC. When the server is running, it runs inside the server (POST /gc on the admin
/// listener) so its index and locks stay authoritative, and in a cluster only where the
/// maintenance lease is held; otherwise on the store directly, which a cluster member refuses.
pub fn gc(config: Config, dry_run: bool) -> Result<String, String> {
    if let Some(addr) = running_admin(&config) {
        return ask_running(addr, &format!("/gc?dry_run={dry_run}"), "collect");
    }
    if config.cluster.is_some() {
        // Other members may be collecting or pushing on the bucket; only a running member can
        // take the maintenance lease that keeps to one GC at a time.
        return Err("this config has [cluster]: start this node (berth gc then runs inside it, under the maintenance lease) or ask a running member".into());
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
        let path = rule.map_or_else(|| "/replicate".to_string(), |r| format!("/replicate?rule={r}"));
        let body = ask_running(addr, &path, "replicate")?;
        let reports: Vec<serde_json::Value> = serde_json::from_str(&body).map_err(|e| format!("unreadable report: {e}"))?;
        let ok = reports.iter().all(|r| r["tags_failed"].as_array().is_some_and(|f| f.is_empty()));
        return Ok((ok, body));
    }
    let store = config.open_store()?;
    let r = crate::replicate::Replicator::new(store, &config.replication);
    let reports = runtime().block_on(r.sync(rule)).map_err(|e| format!("replication failed: {e}"))?;
    let ok = reports.iter().all(|r| r.tags_failed.is_empty());
    Ok((ok, serde_json::to_string_pretty(&reports).expect("report serializes")))
}

/// The multi-threaded runtime the bundle commands need: the tar stream is read and written on a
/// blocking thread that waits on the store's async writes.
fn bundle_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// The store, opened for a bundle command: refused while a berth serves this config (its
/// metadata database takes one process at a time).
fn offline_registry(config: Config, what: &str) -> Result<std::sync::Arc<Registry>, String> {
    if let Some(addr) = running_admin(&config) {
        return Err(format!("berth is running (admin listener {addr} answers); stop it before {what}"));
    }
    let store = config.open_store()?;
    Registry::new(std::sync::Arc::new(config), store)
}

/// `berth export`: the images `refs` names, from the store, as an OCI image layout tar at
/// `output` (written beside it first, renamed into place once complete).
pub fn export(config: Config, refs: &[String], output: &std::path::Path) -> Result<String, String> {
    if refs.is_empty() {
        return Err("name at least one image to export: <repository>:<tag> or <repository>@<digest>".into());
    }
    let rt = bundle_runtime();
    let registry = rt.block_on(async { offline_registry(config, "export") })?;
    let tmp = output.with_file_name(format!(".{}.partial", output.file_name().and_then(|n| n.to_str()).unwrap_or("bundle")));
    let file = std::fs::File::create(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    let result = rt.block_on(crate::bundle::export(registry.store.clone(), refs, std::io::BufWriter::with_capacity(1 << 20, file)));
    let finish = result.and_then(|(report, out)| {
        let file = out.into_inner().map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        file.sync_all().map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, output).map_err(|e| format!("cannot move the bundle to {}: {e}", output.display()))?;
        Ok(report)
    });
    match finish {
        Ok(report) => Ok(format!("exported {report} to {}", output.display())),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// `berth import`: a bundle into the store. A repository whose first component is an
/// upstream's name (or alias) goes to that upstream's mirror cache, one in a hosted namespace
/// to that namespace; `to` is put in front of every name first.
pub fn import(config: Config, bundle: &std::path::Path, to: Option<&str>) -> Result<String, String> {
    let rt = bundle_runtime();
    let registry = rt.block_on(async { offline_registry(config, "import") })?;
    let file = std::fs::File::open(bundle).map_err(|e| format!("cannot open {}: {e}", bundle.display()))?;
    let input = std::io::BufReader::with_capacity(1 << 20, file);
    let places = Places { registry: registry.clone() };
    let report = rt.block_on(crate::bundle::import(registry.store.clone(), input, to, &places))?;
    Ok(format!("imported {report} from {}", bundle.display()))
}

struct Places {
    registry: std::sync::Arc<Registry>,
}

impl crate::bundle::Destination for Places {
    fn place(&self, repo: &str) -> Result<crate::bundle::Placement, String> {
        let config = &self.registry.config;
        if let Some((first, rest)) = repo.split_once('/') {
            if let Some(u) = config.upstreams.iter().find(|u| u.answers_to(first)) {
                // As the mirror names them: Docker Hub's one-component names are library/'s.
                let rest = if u.name == "docker.io" && !rest.contains('/') { format!("library/{rest}") } else { rest.to_string() };
                return Ok(crate::bundle::Placement {
                    repo: format!("{}/{rest}", u.name),
                    cache: true,
                    quota: None,
                    immutable: std::sync::Arc::new(|_: &str| false),
                });
            }
        }
        if config.namespaces.iter().any(|n| n.matches(repo)) {
            return Ok(crate::bundle::Placement {
                repo: repo.to_string(),
                cache: false,
                quota: self.registry.quota_of(repo),
                immutable: self.registry.immutable_of(repo),
            });
        }
        let upstreams: Vec<_> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
        let namespaces: Vec<_> = config.namespaces.iter().map(|n| n.prefix.as_str()).collect();
        Err(format!(
            "{repo} is under no upstream ({}) and in no hosted namespace ({}); import it with --to <namespace>",
            if upstreams.is_empty() { "none configured".to_string() } else { upstreams.join(", ") },
            if namespaces.is_empty() { "none configured".to_string() } else { namespaces.join(", ") },
        ))
    }
}
