//! Push replication: what a hosted namespace holds, copied to another registry over the OCI
//! distribution API (another berth, CNCF distribution, Harbor, GHCR...). Manifests go byte
//! for byte, so digests match at the target; blobs the target has are skipped after a HEAD,
//! blobs this replicator already sent to another repository of the target are mounted from
//! there, the rest are streamed from the store. Token (Bearer) and Basic auth, as the target
//! challenges.

use crate::config::Replication;
use crate::oci::Digest;
use crate::store::{BlobBody, Store};
use crate::upstream::challenge::Challenge;
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// What one copy did.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Copied {
    pub manifests: usize,
    pub blobs_sent: usize,
    pub blobs_mounted: usize,
    pub blobs_present: usize,
    pub bytes_sent: u64,
}

impl Copied {
    fn add(&mut self, o: &Copied) {
        self.manifests += o.manifests;
        self.blobs_sent += o.blobs_sent;
        self.blobs_mounted += o.blobs_mounted;
        self.blobs_present += o.blobs_present;
        self.bytes_sent += o.bytes_sent;
    }
}

/// What `berth replicate` did for one rule.
#[derive(Debug, Default, Serialize)]
pub struct SyncReport {
    pub rule: usize,
    pub target: String,
    pub tags_copied: usize,
    pub tags_failed: Vec<String>,
    #[serde(flatten)]
    pub copied: Copied,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ReplicateError(pub String);

type R<T> = Result<T, ReplicateError>;

fn err(what: impl std::fmt::Display) -> ReplicateError {
    ReplicateError(what.to_string())
}

enum Auth {
    Bearer(String),
    Basic,
}

/// One rule's target registry, with the tokens it granted.
struct Target {
    rule: Replication,
    http: reqwest::Client,
    /// By scope: a token for one repository's pull and push.
    auth: Mutex<HashMap<String, Arc<Auth>>>,
    /// Where at this target each blob already is (a mount source).
    placed: Mutex<HashMap<Digest, String>>,
}

/// What one event asks of one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Copy { repo: String, tags: Vec<String> },
    Delete { repo: String, reference: String, digest: Option<Digest> },
}

pub struct Replicator {
    store: Arc<Store>,
    targets: Vec<Target>,
}

impl Replicator {
    pub fn new(store: Arc<Store>, rules: &[Replication]) -> Replicator {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::limited(5))
            .build()
            .expect("http client");
        let targets = rules
            .iter()
            .map(|r| Target { rule: r.clone(), http: http.clone(), auth: Mutex::default(), placed: Mutex::default() })
            .collect();
        Replicator { store, targets }
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// How deliveries and dead letters name rule `i`.
    pub fn name(&self, i: usize) -> String {
        format!("replication[{i}] {}", self.targets[i].rule.target)
    }

    /// The copy or delete an event asks of rule `i`, if any: what a push or delete recorded in
    /// the outbox becomes at the target.
    pub fn action(&self, i: usize, kind: &str, data: &Value) -> Option<Action> {
        let r = &self.targets[i].rule;
        let repo = data.get("repository")?.as_str()?.to_string();
        let tags: Vec<String> = data
            .get("tags")
            .and_then(Value::as_array)
            .map(|t| t.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        let digest = data.get("digest").and_then(Value::as_str).and_then(|d| Digest::parse(d).ok());
        match kind {
            "manifest.pushed" => {
                let tags: Vec<String> = tags.into_iter().filter(|t| r.matches(&repo, t)).collect();
                (!tags.is_empty()).then_some(Action::Copy { repo, tags })
            }
            "tag.deleted" if r.delete => {
                let tag = tags.into_iter().next().filter(|t| r.matches(&repo, t))?;
                Some(Action::Delete { repo, reference: tag, digest })
            }
            "manifest.deleted" if r.delete && r.covers(&repo) => {
                let d = digest?;
                Some(Action::Delete { repo, reference: d.to_string(), digest: Some(d) })
            }
            _ => None,
        }
    }

    /// Carries out `a` for rule `i`.
    pub async fn apply(&self, i: usize, a: &Action) -> R<()> {
        match a {
            Action::Copy { repo, tags } => {
                for t in tags {
                    match self.copy_tag(i, repo, t).await {
                        Ok(_) => {}
                        // Deleted since it was pushed: nothing to copy any more.
                        Err(e) if self.store.meta().tag(repo, t).map_err(err)?.is_none() => {
                            tracing::info!(repository = %repo, tag = %t, error = %e, "not replicated: the tag is gone");
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
            Action::Delete { repo, reference, digest } => self.delete(i, repo, reference, digest.as_ref()).await,
        }
    }

    /// Copies `repo:tag` as the store holds it now to rule `rule`'s target.
    pub async fn copy_tag(&self, rule: usize, repo: &str, tag: &str) -> R<Copied> {
        let t = self.targets.get(rule).ok_or_else(|| err(format!("no replication rule {rule}")))?;
        let rec = self
            .store
            .meta()
            .tag(repo, tag)
            .map_err(err)?
            .ok_or_else(|| err(format!("{repo}:{tag} is not in the store (deleted since?)")))?;
        let mut c = Copied::default();
        self.copy_manifest(t, repo, &t.rule.target_name(repo), &rec.digest, tag, &mut c).await?;
        Ok(c)
    }

    /// Removes `reference` (a tag or a digest) of `repo` at the target. A tag is deleted by the
    /// manifest it pointed at where the target cannot delete tags alone.
    pub async fn delete(&self, rule: usize, repo: &str, reference: &str, digest: Option<&Digest>) -> R<()> {
        let t = self.targets.get(rule).ok_or_else(|| err(format!("no replication rule {rule}")))?;
        let name = t.rule.target_name(repo);
        let mut refs = vec![reference.to_string()];
        if let Some(d) = digest.filter(|d| d.to_string() != reference) {
            refs.push(d.to_string());
        }
        let mut last = String::new();
        for r in refs {
            let url = t.url(&format!("/v2/{name}/manifests/{r}"))?;
            let resp = t.send(&name, || t.http.delete(url.clone())).await?;
            match resp.status().as_u16() {
                200 | 202 | 404 => return Ok(()),
                s => last = format!("DELETE {name}:{r} answered {s}: {}", text(resp).await),
            }
        }
        Err(err(last))
    }

    /// Copies every matching tag of the rule's namespace (all rules when `rule` is None).
    pub async fn sync(&self, rule: Option<usize>) -> R<Vec<SyncReport>> {
        let rules: Vec<usize> = match rule {
            Some(i) if i < self.targets.len() => vec![i],
            Some(i) => return Err(err(format!("no replication rule {i} (there are {})", self.targets.len()))),
            None => (0..self.targets.len()).collect(),
        };
        let mut reports = Vec::new();
        for i in rules {
            let t = &self.targets[i];
            let mut rep = SyncReport { rule: i, target: t.rule.target.to_string(), ..Default::default() };
            let mut after: Option<String> = None;
            loop {
                let (repos, more) = self.store.repositories(after.as_deref(), 500).map_err(err)?;
                after = repos.last().cloned();
                for repo in repos.iter().filter(|r| t.rule.covers(r)) {
                    let mut tag_after: Option<String> = None;
                    while let Some((tags, more_tags)) = self.store.tags(repo, tag_after.as_deref(), 500).map_err(err)? {
                        tag_after = tags.last().cloned();
                        for tag in tags.iter().filter(|tag| t.rule.matches(repo, tag)) {
                            match self.copy_tag(i, repo, tag).await {
                                Ok(c) => {
                                    rep.tags_copied += 1;
                                    rep.copied.add(&c);
                                }
                                Err(e) => {
                                    tracing::warn!(repository = %repo, tag = %tag, target = %t.rule.target, error = %e, "replication failed");
                                    rep.tags_failed.push(format!("{repo}:{tag}: {e}"));
                                }
                            }
                        }
                        if !more_tags {
                            break;
                        }
                    }
                }
                if !more {
                    break;
                }
            }
            reports.push(rep);
        }
        Ok(reports)
    }

    async fn copy_manifest(&self, t: &Target, repo: &str, name: &str, d: &Digest, reference: &str, c: &mut Copied) -> R<()> {
        let meta = self.store.manifest_meta(repo, d).map_err(err)?.ok_or_else(|| err(format!("{repo}@{d} is not in the store")))?;
        let bytes = self.store.manifest_body(d).await.map_err(err)?.ok_or_else(|| err(format!("the bytes of {d} are missing")))?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| err(format!("{d} is not JSON: {e}")))?;
        if let Some(children) = v.get("manifests").and_then(Value::as_array) {
            for child in children {
                let Some(cd) = child.get("digest").and_then(Value::as_str).and_then(|s| Digest::parse(s).ok()) else { continue };
                let is_manifest = child.get("mediaType").and_then(Value::as_str).is_none_or(crate::oci::manifest::is_manifest_type);
                if is_manifest && self.store.manifest_meta(repo, &cd).map_err(err)?.is_some() {
                    Box::pin(self.copy_manifest(t, repo, name, &cd, &cd.to_string(), c)).await?;
                } else if !is_manifest {
                    // A BuildKit cache index lists blobs.
                    self.copy_blob(t, name, &cd, c).await?;
                }
                // A child this store does not hold (a sparse index): the target decides.
            }
        }
        let blobs = v.get("config").into_iter().chain(v.get("layers").and_then(Value::as_array).into_iter().flatten());
        for b in blobs {
            if let Some(bd) = b.get("digest").and_then(Value::as_str).and_then(|s| Digest::parse(s).ok()) {
                self.copy_blob(t, name, &bd, c).await?;
            }
        }
        let url = t.url(&format!("/v2/{name}/manifests/{reference}"))?;
        let resp = t.send(name, || t.http.put(url.clone()).header("Content-Type", meta.media_type.clone()).body(bytes.clone())).await?;
        if resp.status().as_u16() != 201 {
            let s = resp.status().as_u16();
            return Err(err(format!("PUT {name}:{reference} answered {s}: {}", text(resp).await)));
        }
        c.manifests += 1;
        Ok(())
    }

    async fn copy_blob(&self, t: &Target, name: &str, d: &Digest, c: &mut Copied) -> R<()> {
        let head = t.url(&format!("/v2/{name}/blobs/{d}"))?;
        let resp = t.send(name, || t.http.head(head.clone())).await?;
        match resp.status().as_u16() {
            200 => {
                c.blobs_present += 1;
                t.placed.lock().insert(d.clone(), name.to_string());
                return Ok(());
            }
            404 => {}
            s => return Err(err(format!("HEAD {name}@{d} answered {s}"))),
        }
        let from = t.placed.lock().get(d).cloned().filter(|f| f != name);
        let start = match &from {
            Some(f) => t.url(&format!("/v2/{name}/blobs/uploads/?mount={d}&from={f}"))?,
            None => t.url(&format!("/v2/{name}/blobs/uploads/"))?,
        };
        let resp = t.send(name, || t.http.post(start.clone()).header("Content-Length", "0")).await?;
        let status = resp.status().as_u16();
        if status == 201 && from.is_some() {
            c.blobs_mounted += 1;
            t.placed.lock().insert(d.clone(), name.to_string());
            return Ok(());
        }
        if status != 202 {
            return Err(err(format!("starting an upload to {name} answered {status}: {}", text(resp).await)));
        }
        let location = resp.headers().get("location").and_then(|v| v.to_str().ok()).ok_or_else(|| err("upload without a Location"))?;
        let mut put = t.rule.target.join(location).map_err(|e| err(format!("bad upload location {location:?}: {e}")))?;
        put.query_pairs_mut().append_pair("digest", &d.to_string());
        let size = self.store.blob_size(d).map_err(err)?.ok_or_else(|| err(format!("blob {d} is not in the store")))?;
        let body = self.body(d).await?;
        let auth = t.current(name);
        let mut req = t.http.put(put).header("Content-Type", "application/octet-stream").header("Content-Length", size.to_string());
        req = t.authorize(req, auth.as_deref());
        let resp = req.body(body).send().await.map_err(|e| err(format!("uploading {d} to {name}: {e}")))?;
        if resp.status().as_u16() != 201 {
            let s = resp.status().as_u16();
            return Err(err(format!("uploading {d} to {name} answered {s}: {}", text(resp).await)));
        }
        c.blobs_sent += 1;
        c.bytes_sent += size;
        t.placed.lock().insert(d.clone(), name.to_string());
        Ok(())
    }

    /// A blob's bytes as a request body, streamed from the store.
    async fn body(&self, d: &Digest) -> R<reqwest::Body> {
        let s = self.store.clone();
        let dd = d.clone();
        let opened = crate::store::blocking(move || s.open_blob(&dd, None)).await.map_err(err)?;
        match opened.ok_or_else(|| err(format!("blob {d} is not in the store")))? {
            BlobBody::File { file, len } => {
                // Read in a blocking thread, a chunk at a time, so a large blob never sits in memory.
                let (tx, rx) = futures::channel::mpsc::channel::<std::io::Result<Bytes>>(4);
                std::thread::spawn(move || {
                    use std::io::Read;
                    let mut r = std::io::BufReader::new(file).take(len);
                    let mut tx = tx;
                    loop {
                        let mut buf = vec![0u8; 256 << 10];
                        match r.read(&mut buf) {
                            Ok(0) => return,
                            Ok(n) => {
                                buf.truncate(n);
                                if futures::executor::block_on(futures::SinkExt::send(&mut tx, Ok(Bytes::from(buf)))).is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                let _ = futures::executor::block_on(futures::SinkExt::send(&mut tx, Err(e)));
                                return;
                            }
                        }
                    }
                });
                Ok(reqwest::Body::wrap_stream(rx))
            }
            BlobBody::Stream { stream, .. } => Ok(reqwest::Body::wrap_stream(stream)),
            BlobBody::Redirect { url, .. } => {
                let r = reqwest::get(&url).await.map_err(|e| err(format!("reading {d}: {e}")))?;
                if !r.status().is_success() {
                    return Err(err(format!("reading {d} answered {}", r.status())));
                }
                Ok(reqwest::Body::wrap_stream(r.bytes_stream().map(|x| x.map_err(std::io::Error::other))))
            }
        }
    }
}

async fn text(r: reqwest::Response) -> String {
    let mut t = r.text().await.unwrap_or_default();
    t.truncate(300);
    t
}

impl Target {
    fn url(&self, path: &str) -> R<url::Url> {
        let base = self.rule.target.as_str().trim_end_matches('/');
        url::Url::parse(&format!("{base}{path}")).map_err(|e| err(format!("{base}{path}: {e}")))
    }

    fn current(&self, name: &str) -> Option<Arc<Auth>> {
        let a = self.auth.lock();
        a.get(name).or_else(|| a.get("")).cloned()
    }

    fn authorize(&self, req: reqwest::RequestBuilder, auth: Option<&Auth>) -> reqwest::RequestBuilder {
        match (auth, &self.rule.credentials) {
            (Some(Auth::Bearer(t)), _) => req.bearer_auth(t),
            (Some(Auth::Basic), Some((u, p))) => req.basic_auth(u, Some(p.expose())),
            _ => req,
        }
    }

    /// Sends a request built by `build` (again after answering a challenge).
    async fn send(&self, name: &str, build: impl Fn() -> reqwest::RequestBuilder) -> R<reqwest::Response> {
        let target = &self.rule.target;
        let auth = self.current(name);
        let resp = self.authorize(build(), auth.as_deref()).send().await.map_err(|e| err(format!("{target}: {e}")))?;
        if resp.status().as_u16() != 401 {
            return Ok(resp);
        }
        let values: Vec<String> =
            resp.headers().get_all("www-authenticate").iter().filter_map(|v| v.to_str().ok()).map(str::to_string).collect();
        let auth = match Challenge::choose(values.iter().map(String::as_str), self.rule.credentials.is_some()) {
            Some(Challenge::Basic) => {
                self.auth.lock().insert(String::new(), Arc::new(Auth::Basic));
                Arc::new(Auth::Basic)
            }
            Some(Challenge::Bearer { realm, service, .. }) => {
                let token = self.token(&realm, service.as_deref(), name).await?;
                let a = Arc::new(Auth::Bearer(token));
                self.auth.lock().insert(name.to_string(), a.clone());
                a
            }
            None => return Err(err(format!("{target} refused the credentials (401) and offers no challenge berth can answer"))),
        };
        let resp = self.authorize(build(), Some(&auth)).send().await.map_err(|e| err(format!("{target}: {e}")))?;
        if resp.status().as_u16() == 401 {
            return Err(err(format!("{target} refused the credentials for {name} (401)")));
        }
        Ok(resp)
    }

    /// A token for pulling and pushing `name` (and mounting from the repositories this
    /// replicator placed blobs in).
    async fn token(&self, realm: &str, service: Option<&str>, name: &str) -> R<String> {
        let mut url = url::Url::parse(realm).map_err(|e| err(format!("token realm {realm:?}: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", &format!("repository:{name}:pull,push"));
            let mut froms: Vec<String> = self.placed.lock().values().filter(|f| *f != name).cloned().collect();
            froms.sort();
            froms.dedup();
            for f in froms.into_iter().take(8) {
                q.append_pair("scope", &format!("repository:{f}:pull"));
            }
        }
        let mut req = self.http.get(url);
        if let Some((u, p)) = &self.rule.credentials {
            req = req.basic_auth(u, Some(p.expose()));
        }
        let resp = req.send().await.map_err(|e| err(format!("token service {realm}: {e}")))?;
        if !resp.status().is_success() {
            let s = resp.status().as_u16();
            return Err(err(format!("token service {realm} answered {s}: {}", text(resp).await)));
        }
        let body = resp.bytes().await.map_err(|e| err(format!("token service {realm}: {e}")))?;
        let v: Value = serde_json::from_slice(&body).map_err(|e| err(format!("token service {realm}: {e}")))?;
        v.get("token")
            .or_else(|| v.get("access_token"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| err(format!("token service {realm} sent no token")))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn rules_match_namespace_tags_and_name_the_target_repository() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "secret\n").unwrap();
        let c = Config::parse(
            &format!(
                "[[namespace]]\nprefix = \"team\"\n\n[[replication]]\nnamespace = \"team\"\ntarget = \"http://127.0.0.1:1\"\nprefix = \"mirror/team\"\ntags = [\"v*\", \"latest\"]\nusername = \"robot\"\npassword_file = \"{}\"\n",
                pw.display()
            ),
            "t",
        )
        .unwrap();
        let r = &c.replication[0];
        assert!(r.matches("team/app", "v1.2") && r.matches("team/x/y", "latest"));
        assert!(!r.matches("team/app", "dev") && !r.matches("teamx/app", "v1") && !r.matches("other/app", "v1"));
        assert_eq!(r.target_name("team/app"), "mirror/team/app");
        assert_eq!(r.credentials.as_ref().map(|(u, p)| (u.as_str(), p.expose())), Some(("robot", "secret")));
        let bad = Config::parse("[[replication]]\nnamespace = \"team\"\ntarget = \"http://127.0.0.1:1\"\n", "t").unwrap_err();
        assert!(bad.to_string().contains("replication[0].namespace"), "{bad}");
    }
}
