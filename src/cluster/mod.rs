//! Several berth nodes on one bucket, with nothing else to run.
//!
//! - Membership: each node overwrites `cluster/members/<id>` every heartbeat and lists the
//!   others; a member whose object is older than `member_timeout` (both times in the bucket's
//!   clock, so node clocks may disagree) has left.
//! - Ownership: the owner of a key (a blob digest, a mirrored tag) is the live member with the
//!   highest rendezvous hash of (member, key). Non-owners ask the owner over the peer listener
//!   and stream its fill; losing a race or an owner costs a duplicate fetch, never correctness.
//! - Read-your-writes: after each metadata journal write a node tells its live peers the
//!   sequence number and waits (bounded) until they applied it, before its client is answered;
//!   a missed message is covered by every node following the journal each second.
//! - One maintenance leader: a lease made of create-only objects `cluster/lease/<epoch>`; the
//!   holder renews by creating the next epoch, and when the newest epoch is older than the
//!   lease time any node may create the next one. Create-only PUTs decide every race, which is
//!   why a cluster refuses an engine without them.
//! - Peers sign every request with HMAC-SHA256 over the time, method and path, keyed by the
//!   shared secret.

use crate::config::ClusterConfig;
use crate::fill::{Opener, Source};
use crate::oci::{ErrorCode, OciError};
use crate::store::s3::Bucket;
use crate::store::Store;
use bytes::Bytes;
use futures::future::FutureExt;
use futures::stream::{BoxStream, StreamExt};
use parking_lot::{Mutex, RwLock};
use prometheus::{register_int_counter_vec, register_int_gauge, IntCounterVec, IntGauge};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

/// The header carrying a peer request's signature: `<unix ms>.<hex HMAC>`.
pub const PEER_HEADER: &str = "x-berth-peer";
/// Where a peer announces a journal write (`?seq=`), on the peer listener.
pub const JOURNAL_PATH: &str = "/_berth/journal";
const MEMBERS: &str = "cluster/members/";
const LEASE: &str = "cluster/lease/";
/// A signature is accepted this long around its time (clock skew between nodes included).
const SIGNATURE_WINDOW_MS: u64 = 300_000;
/// How long a writer waits for its peers to apply a write before answering anyway.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(2);

pub static MEMBERS_LIVE: LazyLock<IntGauge> =
    LazyLock::new(|| register_int_gauge!("berth_cluster_members", "Live cluster members this node sees, itself included").unwrap());
pub static LEASE_HELD: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("berth_cluster_lease_held", "1 while this node holds the maintenance lease (GC and eviction run here)").unwrap()
});
pub static FORWARDS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "berth_cluster_forwards_total",
        "Requests this node sent to the owner of a blob or tag, by kind and outcome (ok, fallback to the upstream)",
        &["kind", "result"]
    )
    .unwrap()
});
pub static PEER_BYTES: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    prometheus::register_int_counter!(
        "berth_cluster_peer_bytes_total",
        "Response bytes this node sent to other members on the peer listener"
    )
    .unwrap()
});
pub static NOTIFICATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("berth_cluster_notifications_total", "Journal writes announced to peers, by outcome", &["result"]).unwrap()
});

/// Every cluster series at zero (a single node shows 0 members), so the dashboard's cluster
/// row shows zero rather than "No data".
pub fn init_metrics() {
    for kind in ["blob", "manifest"] {
        for result in ["ok", "fallback"] {
            FORWARDS.with_label_values(&[kind, result]);
        }
    }
    for result in ["ok", "failed"] {
        NOTIFICATIONS.with_label_values(&[result]);
    }
    LazyLock::force(&PEER_BYTES);
    LazyLock::force(&MEMBERS_LIVE);
    LazyLock::force(&LEASE_HELD);
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    /// The peer listener's base URL, without a trailing slash.
    pub url: String,
}

pub struct Cluster {
    me: Member,
    key: ring::hmac::Key,
    bucket: Arc<Bucket>,
    store: std::sync::Weak<Store>,
    heartbeat: Duration,
    timeout: Duration,
    live: RwLock<Arc<Vec<Member>>>,
    /// Member ids to URLs, read once per member from its heartbeat object.
    urls: Mutex<HashMap<String, String>>,
    /// When this node last created a lease epoch, if it holds the newest one.
    held: Mutex<Option<Instant>>,
    /// The member id in the newest lease epoch seen, whoever it is.
    holder: Mutex<Option<String>>,
    /// One heartbeat at a time: a run an operator asks for beats outside the thread, and two
    /// takes of the same epoch by one node would make it drop a lease it won.
    beating: Mutex<()>,
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
    stopped: AtomicBool,
}

/// Why this node may not run GC or eviction now.
#[derive(Debug)]
pub struct LeaseHeld {
    /// The member holding the lease (its advertised URL, or its id when not known yet).
    pub holder: Option<String>,
    pub reason: String,
}

/// A member's id: stable across restarts (ownership does not move when a node comes back).
pub fn id_of(url: &str) -> String {
    hex::encode(&Sha256::digest(url.as_bytes())[..8])
}

fn epoch_of(k: &str) -> Option<u64> {
    k.rsplit('/').next()?.parse().ok()
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Cluster {
    /// Joins the cluster on the store's bucket: checks the engine, announces this node, learns
    /// the others, and keeps doing so on a thread of its own.
    pub fn start(cfg: &ClusterConfig, store: &Arc<Store>) -> Result<Arc<Cluster>, String> {
        let bucket = store.bucket().ok_or("[cluster] needs [storage.s3]")?.clone();
        let journal = store.journal().ok_or("[cluster] needs [storage.s3]")?.clone();
        if !bucket.create_only() {
            return Err(format!(
                "storage {} ignores conditional writes (If-None-Match on PUT): several nodes could not order their metadata, so the cluster refuses to start",
                bucket.describe()
            ));
        }
        let url = cfg.advertise.as_str().trim_end_matches('/').to_string();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("berth-peer")
            .enable_all()
            .build()
            .map_err(|e| format!("cluster runtime: {e}"))?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("peer client: {e}"))?;
        let me = Member { id: id_of(&url), url };
        let c = Arc::new(Cluster {
            me: me.clone(),
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, cfg.secret.expose().as_bytes()),
            bucket,
            store: Arc::downgrade(store),
            heartbeat: cfg.heartbeat,
            timeout: cfg.member_timeout,
            live: RwLock::new(Arc::new(vec![me])),
            urls: Mutex::new(HashMap::new()),
            held: Mutex::new(None),
            holder: Mutex::new(None),
            beating: Mutex::new(()),
            http,
            rt,
            stopped: AtomicBool::new(false),
        });
        c.beat().map_err(|e| format!("cannot announce this node in the bucket: {e}"))?;
        let weak = Arc::downgrade(&c);
        journal.on_write(Box::new(move |seq| {
            if let Some(c) = weak.upgrade() {
                c.announce(seq);
            }
        }));
        let weak = Arc::downgrade(&c);
        let every = c.heartbeat;
        std::thread::Builder::new()
            .name("berth-cluster".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                let Some(c) = weak.upgrade() else { return };
                if c.stopped.load(Ordering::Relaxed) {
                    return;
                }
                if let Err(e) = c.beat() {
                    tracing::warn!(error = %e, "cluster heartbeat failed");
                }
            })
            .map_err(|e| format!("cluster thread: {e}"))?;
        tracing::info!(node = %c.me.url, id = %c.me.id, members = c.members().len(), "joined the cluster");
        Ok(c)
    }

    pub fn me(&self) -> &Member {
        &self.me
    }

    /// The live members, this node included, by id.
    pub fn members(&self) -> Arc<Vec<Member>> {
        self.live.read().clone()
    }

    /// The live member that owns `key`.
    pub fn owner(&self, key: &str) -> Member {
        rendezvous(&self.members(), key).unwrap_or_else(|| self.me.clone())
    }

    /// The owner of `key` when it is another node.
    pub fn owner_elsewhere(&self, key: &str) -> Option<Member> {
        Some(self.owner(key)).filter(|m| m.id != self.me.id)
    }

    /// Whether this node runs the cluster's GC and cache eviction now.
    pub fn is_leader(&self) -> bool {
        // A margin of two heartbeats under the lease time: a node that stopped renewing
        // stops acting before anyone else may take over.
        let lease = self.lease_time();
        self.held.lock().is_some_and(|t| t.elapsed() + self.heartbeat * 2 < lease)
    }

    /// Makes sure this node holds the maintenance lease before a run an operator asked for
    /// (`POST /gc`, `berth gc`): one GC at a time for the whole bucket, whichever node was
    /// asked. A lapsed lease is taken here rather than at the next heartbeat; a lease another
    /// member holds is not, and the error names that member. Blocking (bucket requests).
    pub fn hold_lease_for_run(&self) -> Result<(), LeaseHeld> {
        if self.is_leader() {
            return Ok(());
        }
        // A heartbeat now: renews this node's view and takes the lease if it lapsed.
        if let Err(e) = self.beat() {
            return Err(LeaseHeld { holder: None, reason: format!("cannot read the maintenance lease: {e}") });
        }
        if self.is_leader() {
            return Ok(());
        }
        let id = self.holder.lock().clone();
        let url = id.as_ref().and_then(|id| self.urls.lock().get(id).cloned());
        let holder = url.or(id);
        let reason = match &holder {
            Some(h) => format!("another cluster member ({h}) holds the maintenance lease; run it there, or wait until that lease lapses"),
            None => "the maintenance lease is being taken over; try again in a few seconds".to_string(),
        };
        Err(LeaseHeld { holder, reason })
    }

    fn lease_time(&self) -> Duration {
        self.timeout * 2
    }

    /// Leaves: the heartbeat object goes, so the others stop routing here at once.
    pub fn leave(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        let _ = self.bucket.delete(&format!("{MEMBERS}{}", self.me.id));
    }

    /// One heartbeat: announce, list the members, take or renew the lease.
    fn beat(&self) -> crate::store::error::Result<()> {
        let _one = self.beating.lock();
        let body = serde_json::to_vec(&serde_json::json!({"url": self.me.url})).expect("json");
        self.bucket.put(&format!("{MEMBERS}{}", self.me.id), Bytes::from(body), false)?;
        let listed = self.bucket.list_modified(MEMBERS)?;
        let mine = format!("{MEMBERS}{}", self.me.id);
        // The bucket's time now: when it stored this node's heartbeat.
        let now = listed.iter().find(|(k, _)| *k == mine).map(|(_, m)| *m).unwrap_or(i64::MAX);
        let mut live = Vec::new();
        for (k, modified) in &listed {
            let id = k.trim_start_matches(MEMBERS).to_string();
            if now.saturating_sub(*modified) > self.timeout.as_millis() as i64 {
                continue;
            }
            if id == self.me.id {
                live.push(self.me.clone());
                continue;
            }
            let known = self.urls.lock().get(&id).cloned();
            let url = match known {
                Some(u) => u,
                None => {
                    let Some(b) = self.bucket.get(k)? else { continue };
                    let Some(u) = serde_json::from_slice::<serde_json::Value>(&b).ok().and_then(|v| v["url"].as_str().map(str::to_string))
                    else {
                        continue;
                    };
                    self.urls.lock().insert(id.clone(), u.clone());
                    u
                }
            };
            live.push(Member { id, url });
        }
        live.sort_by(|a, b| a.id.cmp(&b.id));
        if live.is_empty() {
            live.push(self.me.clone());
        }
        let changed = **self.live.read() != live;
        if changed {
            tracing::info!(members = ?live.iter().map(|m| m.url.as_str()).collect::<Vec<_>>(), "cluster membership changed");
        }
        MEMBERS_LIVE.set(live.len() as i64);
        *self.live.write() = Arc::new(live);
        self.lease(now)?;
        let leader = self.is_leader();
        LEASE_HELD.set(leader as i64);
        if let Some(s) = self.store.upgrade() {
            s.set_evicts(leader);
        }
        Ok(())
    }

    /// Takes, renews or observes the maintenance lease. `now` is the bucket's clock.
    fn lease(&self, now: i64) -> crate::store::error::Result<()> {
        let epochs: Vec<(u64, i64)> = self.bucket.list_modified(LEASE)?.into_iter().filter_map(|(k, m)| Some((epoch_of(&k)?, m))).collect();
        let newest = epochs.iter().max_by_key(|(e, _)| *e).copied();
        let lease_ms = self.lease_time().as_millis() as i64;
        let take = |epoch: u64| -> crate::store::error::Result<bool> {
            let won = self.bucket.put(&format!("{LEASE}{epoch:020}"), Bytes::from(self.me.id.clone()), true)?;
            if won {
                *self.held.lock() = Some(Instant::now());
            }
            Ok(won)
        };
        let (epoch, holder) = match newest {
            None => (1, if take(1)? { Some(self.me.id.clone()) } else { None }),
            Some((e, modified)) => {
                let holder = self.bucket.get(&format!("{LEASE}{e:020}"))?.map(|b| String::from_utf8_lossy(&b).to_string());
                let age = now.saturating_sub(modified);
                let mine = holder.as_deref() == Some(self.me.id.as_str());
                if (mine && age > lease_ms / 3) || (!mine && age > lease_ms) {
                    if take(e + 1)? {
                        (e + 1, Some(self.me.id.clone()))
                    } else {
                        (e + 1, None)
                    }
                } else {
                    (e, holder)
                }
            }
        };
        if holder.as_deref() != Some(self.me.id.as_str()) {
            *self.held.lock() = None;
        }
        *self.holder.lock() = holder;
        if self.is_leader() {
            for (e, _) in epochs.iter().filter(|(e, _)| *e + 2 < epoch) {
                self.bucket.delete(&format!("{LEASE}{e:020}"))?;
            }
        }
        Ok(())
    }

    /// The signature header for a request to a peer (`path` with its query).
    pub fn sign(&self, method: &str, path: &str) -> String {
        sign_with(&self.key, now_unix_ms(), method, path)
    }

    /// Whether a request on the peer listener comes from a member.
    pub fn verify(&self, header: Option<&str>, method: &str, path: &str) -> bool {
        verify_with(&self.key, header, method, path, now_unix_ms())
    }

    /// Tells every live peer that journal entry `seq` exists and waits (bounded) until each
    /// applied it. Runs on the blocking thread that made the write.
    fn announce(&self, seq: u64) {
        let peers: Vec<Member> = self.members().iter().filter(|m| m.id != self.me.id).cloned().collect();
        if peers.is_empty() {
            return;
        }
        let path = format!("{JOURNAL_PATH}?seq={seq}");
        let calls: Vec<_> = peers
            .into_iter()
            .map(|m| {
                let req = self.http.post(format!("{}{path}", m.url)).header(PEER_HEADER, self.sign("POST", &path)).timeout(NOTIFY_TIMEOUT);
                async move {
                    match req.send().await {
                        Ok(r) if r.status().is_success() => true,
                        Ok(r) => {
                            tracing::debug!(peer = %m.url, status = %r.status(), "peer did not apply a journal write");
                            false
                        }
                        Err(e) => {
                            tracing::debug!(peer = %m.url, error = %e, "peer unreachable for a journal write");
                            false
                        }
                    }
                }
            })
            .collect();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt.spawn(async move {
            let _ = tx.send(futures::future::join_all(calls).await);
        });
        for ok in rx.recv().unwrap_or_default() {
            NOTIFICATIONS.with_label_values(&[if ok { "ok" } else { "failed" }]).inc();
        }
    }

    /// Sends a signed GET to a peer on the cluster's runtime; `path` is the registry path.
    pub async fn get(&self, to: &Member, path: &str, headers: reqwest::header::HeaderMap) -> Result<reqwest::Response, String> {
        let req = self.http.get(format!("{}{path}", to.url)).headers(headers).header(PEER_HEADER, self.sign("GET", path));
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.rt.spawn(async move {
            let _ = tx.send(req.send().await);
        });
        rx.await.map_err(|_| "peer runtime stopped".to_string())?.map_err(|e| e.to_string())
    }

    /// A fill source that streams the owner's fill of a blob (`path` on the owner), and
    /// falls back to `fallback` from the byte reached if the owner cannot be asked or fails
    /// mid-blob.
    pub fn owner_opener(self: &Arc<Self>, owner: Member, path: String, fallback: Opener) -> Opener {
        let cluster = self.clone();
        Arc::new(move |from: u64| {
            let (cluster, owner, path, fallback) = (cluster.clone(), owner.clone(), path.clone(), fallback.clone());
            async move {
                match cluster.open_from_owner(&owner, &path, from).await {
                    Ok(src) => {
                        FORWARDS.with_label_values(&["blob", "ok"]).inc();
                        Ok(Source { total: src.total, body: resume_with(src.body, from, fallback) })
                    }
                    Err(e) => {
                        FORWARDS.with_label_values(&["blob", "fallback"]).inc();
                        tracing::warn!(owner = %owner.url, error = %e, "blob owner unavailable; fetching from the upstream");
                        fallback(from).await
                    }
                }
            }
            .boxed()
        })
    }

    async fn open_from_owner(&self, owner: &Member, path: &str, from: u64) -> Result<Source, String> {
        let mut headers = reqwest::header::HeaderMap::new();
        if from > 0 {
            headers.insert(reqwest::header::RANGE, format!("bytes={from}-").parse().expect("range header"));
        }
        let r = self.get(owner, path, headers).await?;
        match (r.status().as_u16(), from) {
            (200, 0) | (206, _) => {}
            (s, _) => return Err(format!("owner answered {s}")),
        }
        let total = r.content_length();
        let body = r
            .bytes_stream()
            .map(|c| c.map_err(|e| OciError::msg(ErrorCode::UpstreamUnavailable, format!("owner stream interrupted: {e}"))))
            .boxed();
        Ok(Source { total, body })
    }
}

/// The member with the highest hash of (member, key): when a member leaves, only its keys
/// move, and every node that sees the same members picks the same owner.
fn rendezvous(members: &[Member], key: &str) -> Option<Member> {
    let score = |m: &Member| {
        let h = Sha256::new().chain_update(m.id.as_bytes()).chain_update([0u8]).chain_update(key.as_bytes()).finalize();
        u64::from_be_bytes(h[..8].try_into().expect("8 bytes"))
    };
    members.iter().max_by_key(|m| (score(m), m.id.clone())).cloned()
}

/// Which of the nodes advertising `urls` owns `key` when all of them are live (tests and
/// benchmarks use it to aim at an owner).
pub fn owner_url(urls: &[String], key: &str) -> Option<String> {
    let members: Vec<Member> = urls.iter().map(|u| Member { id: id_of(u.trim_end_matches('/')), url: u.clone() }).collect();
    rendezvous(&members, key).map(|m| m.url)
}

fn sign_with(key: &ring::hmac::Key, ts: u64, method: &str, path: &str) -> String {
    format!("{ts}.{}", hex::encode(ring::hmac::sign(key, format!("{ts} {method} {path}").as_bytes()).as_ref()))
}

fn verify_with(key: &ring::hmac::Key, header: Option<&str>, method: &str, path: &str, now: u64) -> bool {
    let Some((ts, mac)) = header.and_then(|h| h.split_once('.')) else { return false };
    let Ok(ts) = ts.parse::<u64>() else { return false };
    if now.abs_diff(ts) > SIGNATURE_WINDOW_MS {
        return false;
    }
    let Ok(mac) = hex::decode(mac) else { return false };
    ring::hmac::verify(key, format!("{ts} {method} {path}").as_bytes(), &mac).is_ok()
}

/// `body` (which starts at byte `from`), continued from `fallback` at the byte reached if it
/// fails before its end.
fn resume_with(
    body: BoxStream<'static, Result<Bytes, OciError>>,
    from: u64,
    fallback: Opener,
) -> BoxStream<'static, Result<Bytes, OciError>> {
    struct St {
        body: BoxStream<'static, Result<Bytes, OciError>>,
        pos: u64,
        fallback: Option<Opener>,
    }
    futures::stream::unfold(St { body, pos: from, fallback: Some(fallback) }, |mut st| async move {
        loop {
            match st.body.next().await {
                None => return None,
                Some(Ok(b)) => {
                    st.pos += b.len() as u64;
                    return Some((Ok(b), st));
                }
                Some(Err(e)) => {
                    let Some(fb) = st.fallback.take() else { return Some((Err(e), st)) };
                    tracing::warn!(error = %e, at = st.pos, "blob owner failed mid-blob; continuing from the upstream");
                    FORWARDS.with_label_values(&["blob", "fallback"]).inc();
                    match fb(st.pos).await {
                        Ok(src) => st.body = src.body,
                        Err(e2) => return Some((Err(e2), st)),
                    }
                }
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_moves_only_the_keys_of_a_member_that_leaves() {
        let members: Vec<Member> = (0..4).map(|i| Member { id: id_of(&format!("http://n{i}")), url: format!("http://n{i}") }).collect();
        let owner = |ms: &[Member], k: &str| rendezvous(ms, k).unwrap().id;
        let keys: Vec<String> = (0..2000).map(|i| format!("sha256:{i}")).collect();
        let before: Vec<String> = keys.iter().map(|k| owner(&members, k)).collect();
        let mut counts = HashMap::new();
        for o in &before {
            *counts.entry(o.clone()).or_insert(0) += 1;
        }
        assert!(counts.values().all(|&n| (350..650).contains(&n)), "spread: {counts:?}");
        let after: Vec<String> = keys.iter().map(|k| owner(&members[1..], k)).collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != members[0].id {
                assert_eq!(a, b, "a key whose owner stayed did not move");
            }
        }
    }

    #[tokio::test]
    async fn resume_continues_from_the_fallback_at_the_byte_reached() {
        let data: Vec<u8> = (0..100u8).collect();
        let first: BoxStream<'static, Result<Bytes, OciError>> = futures::stream::iter(vec![
            Ok(Bytes::copy_from_slice(&data[10..40])),
            Err(OciError::msg(ErrorCode::UpstreamUnavailable, "owner died")),
        ])
        .boxed();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let (d2, a2) = (data.clone(), asked.clone());
        let fallback: Opener = Arc::new(move |from: u64| {
            a2.lock().push(from);
            let rest = Bytes::copy_from_slice(&d2[from as usize..]);
            async move { Ok(Source { total: Some(rest.len() as u64), body: futures::stream::iter(vec![Ok(rest)]).boxed() }) }.boxed()
        });
        let mut out = Vec::new();
        let mut s = resume_with(first, 10, fallback);
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c.unwrap());
        }
        assert_eq!(out, data[10..].to_vec());
        assert_eq!(*asked.lock(), vec![40]);
    }

    #[test]
    fn signatures_bind_method_path_and_time() {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"0123456789abcdef0123");
        let other = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"another secret, same length");
        let now = now_unix_ms();
        let good = sign_with(&key, now, "GET", "/v2/x/blobs/sha256:1");
        assert!(verify_with(&key, Some(&good), "GET", "/v2/x/blobs/sha256:1", now));
        assert!(!verify_with(&other, Some(&good), "GET", "/v2/x/blobs/sha256:1", now));
        assert!(!verify_with(&key, Some(&good), "POST", "/v2/x/blobs/sha256:1", now));
        assert!(!verify_with(&key, Some(&good), "GET", "/v2/y/blobs/sha256:1", now));
        assert!(!verify_with(&key, Some(&good), "GET", "/v2/x/blobs/sha256:1", now + SIGNATURE_WINDOW_MS + 1));
        assert!(!verify_with(&key, None, "GET", "/p", now) && !verify_with(&key, Some("12.zz"), "GET", "/p", now));
    }
}
