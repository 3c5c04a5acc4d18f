//! Events: what happened to repositories, as CloudEvents 1.0 documents (structured JSON).
//!
//! An event bound for a webhook is recorded in the store's outbox before the request that
//! caused it is answered; a background sender delivers it to every matching `[[webhook]]`
//! (signed with the webhook's secret, retried with exponential backoff and jitter for up to
//! the webhook's `max_age`), removes it once every webhook has it, and files what could not
//! be delivered in time as a dead letter an operator can replay. The outbox is re-read at
//! start, so a restart or a crash only ever repeats a delivery (receivers deduplicate by the
//! event's `id`), never loses one. Pushes only append to the outbox: however slow a receiver
//! is, the sender waits on it, not the client.
//!
//! In a cluster each node delivers what it recorded; the lease holder also delivers what a
//! node that is no longer a member left behind.
//!
//! Every event is also a line of the audit log (`[events] audit_file`).

pub mod audit;

use crate::config::{Config, Webhook};
use crate::store::outbox::OutboxRef;
use crate::store::{now_ms, Store, StoreError};
use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// Event names; `config` owns the list because it validates `[[webhook]] events` against it.
pub use crate::config::EVENT_KINDS as KINDS;

const TYPE_PREFIX: &str = "dev.berth.";

/// The event sender's nice value (see `lower_priority`).
const DELIVERY_NICE: libc::c_int = 10;

/// Deliveries kept for the admin listing.
const RECENT: usize = 200;

/// Requests to receivers in flight at once, over every webhook.
const CONCURRENCY: usize = 16;

/// How often the outbox is listed for entries this process does not know of (left by a
/// crash, or by a cluster member that is gone).
const SCAN_EVERY: Duration = Duration::from_secs(10);

/// A CloudEvents 1.0 event in structured mode.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CloudEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub time: String,
    pub datacontenttype: String,
    pub data: serde_json::Value,
}

impl CloudEvent {
    /// The name `[[webhook]] events` uses.
    pub fn short_kind(&self) -> &str {
        self.kind.strip_prefix(TYPE_PREFIX).unwrap_or(&self.kind)
    }
}

/// Who caused an event and from where.
#[derive(Debug, Clone, Default)]
pub struct Actor {
    pub user: Option<String>,
    pub client: Option<IpAddr>,
}

/// What the event is about, as `data` carries it.
#[derive(Debug, Default)]
pub struct About<'a> {
    pub repository: &'a str,
    pub tags: &'a [String],
    pub digest: Option<String>,
    pub media_type: Option<&'a str>,
    pub size: Option<u64>,
    /// `os/arch[/variant]` of an index's children.
    pub platforms: Vec<String>,
    pub upstream: Option<&'a str>,
}

/// An outbox entry: the event, when it was recorded, and (for a replayed dead letter) the one
/// webhook it is for.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    recorded_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    webhook: Option<String>,
    event: CloudEvent,
}

/// A dead letter: an event one webhook did not take within its `max_age`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DeadLetter {
    webhook: String,
    recorded_ms: u64,
    dead_ms: u64,
    attempts: u32,
    error: String,
    event: CloudEvent,
}

/// One delivery's latest state, for the admin listing.
#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub subject: Option<String>,
    pub webhook: String,
    /// `delivered`, `retrying` or `dead`.
    pub status: &'static str,
    pub attempts: u32,
    pub code: Option<u16>,
    pub error: Option<String>,
    pub time: String,
}

/// An entry for the sender: recorded just now (with its content), or found in the outbox.
type Queued = (OutboxRef, Option<Entry>);

pub struct Events {
    store: Arc<Store>,
    hooks: Vec<Arc<Webhook>>,
    audit: Option<audit::Audit>,
    cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
    host: String,
    tx: tokio::sync::mpsc::UnboundedSender<Queued>,
    rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Queued>>>,
    /// Entries a delivery task of this process is working on, with when they were recorded.
    working: Mutex<HashMap<OutboxRef, u64>>,
    /// Entries delivered and waiting to be removed from the outbox.
    delivered: Mutex<Vec<OutboxRef>>,
    delivered_ready: tokio::sync::Notify,
    recent: Mutex<VecDeque<Delivery>>,
    permits: Arc<tokio::sync::Semaphore>,
    http: reqwest::Client,
    /// `[[replication]]`: its rules take pushes and deletes from the same outbox.
    replicator: Arc<crate::replicate::Replicator>,
}

/// How long a replication keeps retrying before its event is dead-lettered.
const REPLICATION_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// The URL as listings show it: without credentials.
fn shown(url: &url::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_password(None);
    let _ = u.set_username("");
    u.to_string()
}

/// `sha256=<hex>` of the body under the webhook's secret.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!("sha256={}", hex::encode(ring::hmac::sign(&key, body).as_ref()))
}

/// The platforms an index lists (`os/arch[/variant]`); empty for anything else.
pub fn platforms_of(manifest: &[u8]) -> Vec<String> {
    #[derive(Deserialize)]
    struct Index {
        #[serde(default)]
        manifests: Vec<Child>,
    }
    #[derive(Deserialize)]
    struct Child {
        platform: Option<Platform>,
    }
    #[derive(Deserialize)]
    struct Platform {
        os: String,
        architecture: String,
        variant: Option<String>,
    }
    let Ok(i) = serde_json::from_slice::<Index>(manifest) else { return Vec::new() };
    let mut out: Vec<String> = i
        .manifests
        .into_iter()
        .filter_map(|c| c.platform)
        .filter(|p| p.os != "unknown")
        .map(|p| match p.variant {
            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
            None => format!("{}/{}", p.os, p.architecture),
        })
        .collect();
    out.dedup();
    out
}

/// Backoff before attempt `n + 1`: doubling from a quarter second, capped at a minute (and at
/// a quarter of the webhook's `max_age`, so a short one still sees several attempts), with
/// up to half of it added at random so that receivers coming back are not hit in lockstep.
/// An event ready to be recorded (see [`Events::prepare`]).
#[derive(Default)]
pub struct Prepared {
    outbox: Option<(OutboxRef, Entry)>,
    /// The entry's bytes, until the caller takes them to write.
    body: Option<Vec<u8>>,
    audit: Option<serde_json::Value>,
}

impl Prepared {
    /// The outbox entry to make durable, if anything will deliver the event (once).
    pub fn take_outbox(&mut self) -> Option<(OutboxRef, Vec<u8>)> {
        Some((self.outbox.as_ref()?.0.clone(), self.body.take()?))
    }
}

fn backoff(n: u32, max_age: Duration) -> Duration {
    let cap = Duration::from_secs(60).min(max_age / 4).max(Duration::from_millis(100));
    let base = Duration::from_millis(250).saturating_mul(1u32 << n.min(16)).min(cap);
    let mut r = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r);
    base + base.mul_f64(u16::from_le_bytes(r) as f64 / u16::MAX as f64 / 2.0)
}

fn wants(hook: &Webhook, ev: &CloudEvent) -> bool {
    let kind_ok = hook.events.as_ref().is_none_or(|e| e.iter().any(|k| k == ev.short_kind()));
    let ns_ok = match (&hook.namespaces, &ev.subject) {
        (None, _) | (Some(_), None) => true,
        (Some(ns), Some(s)) => ns.iter().any(|n| s == n || s.strip_prefix(n.as_str()).is_some_and(|r| r.starts_with('/'))),
    };
    kind_ok && ns_ok
}

impl Events {
    pub fn new(config: &Config, store: Arc<Store>, replicator: Arc<crate::replicate::Replicator>) -> Arc<Events> {
        // Series at 0 from the start: dashboards show 0, not "No data".
        for result in ["ok", "retry"] {
            crate::metrics::REPLICATIONS.with_label_values(&[result]);
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("building the webhook client");
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        Arc::new(Events {
            store,
            hooks: config.webhooks.iter().cloned().map(Arc::new).collect(),
            audit: config.events.audit_file.clone().map(|p| audit::Audit::new(p, config.events.audit_max_size, config.events.audit_keep)),
            cluster: std::sync::OnceLock::new(),
            host: if host.is_empty() { "localhost".into() } else { host },
            tx,
            rx: Mutex::new(Some(rx)),
            working: Mutex::new(HashMap::new()),
            delivered: Mutex::new(Vec::new()),
            delivered_ready: tokio::sync::Notify::new(),
            recent: Mutex::new(VecDeque::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(CONCURRENCY)),
            http,
            replicator,
        })
    }

    pub fn join(&self, cluster: Arc<crate::cluster::Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    /// Whether anything listens: without webhooks, replication or an audit log, events cost
    /// nothing.
    pub fn enabled(&self) -> bool {
        !self.hooks.is_empty() || self.audit.is_some() || !self.replicator.is_empty()
    }

    /// The replication rules `ev` asks something of.
    fn replications(&self, ev: &CloudEvent) -> Vec<(usize, crate::replicate::Action)> {
        (0..self.replicator.len()).filter_map(|i| self.replicator.action(i, ev.short_kind(), &ev.data).map(|a| (i, a))).collect()
    }

    pub fn has_webhooks(&self) -> bool {
        !self.hooks.is_empty()
    }

    /// Whether anything is delivered from here: a webhook or a replication rule.
    pub fn delivers(&self) -> bool {
        !self.hooks.is_empty() || !self.replicator.is_empty()
    }

    /// The node as events name it: the cluster's advertised URL, or the host name.
    fn source(&self) -> String {
        match self.cluster.get() {
            Some(c) => c.me().url.clone(),
            None => format!("berth://{}", self.host),
        }
    }

    /// Whose outbox folder this process writes: stable across restarts.
    fn node(&self) -> String {
        match self.cluster.get() {
            Some(c) => c.me().id.clone(),
            None => "local".to_string(),
        }
    }

    /// Builds an event about a repository.
    pub fn event(&self, kind: &str, about: &About<'_>, actor: &Actor) -> CloudEvent {
        let mut data = serde_json::Map::new();
        data.insert("repository".into(), about.repository.into());
        if let Some(t) = about.tags.first() {
            data.insert("tag".into(), t.as_str().into());
        }
        if !about.tags.is_empty() {
            data.insert("tags".into(), about.tags.into());
        }
        if let Some(d) = &about.digest {
            data.insert("digest".into(), d.as_str().into());
        }
        if let Some(m) = about.media_type {
            data.insert("mediaType".into(), m.into());
        }
        if let Some(s) = about.size {
            data.insert("size".into(), s.into());
        }
        if !about.platforms.is_empty() {
            data.insert("platforms".into(), about.platforms.clone().into());
        }
        if let Some(u) = &actor.user {
            data.insert("actor".into(), u.as_str().into());
        }
        if let Some(u) = about.upstream {
            data.insert("upstream".into(), u.into());
        }
        self.raw_event(kind, Some(about.repository), serde_json::Value::Object(data))
    }

    /// Builds an event with the given `data`.
    pub fn raw_event(&self, kind: &str, subject: Option<&str>, data: serde_json::Value) -> CloudEvent {
        debug_assert!(KINDS.contains(&kind), "unknown event {kind}");
        CloudEvent {
            specversion: "1.0".into(),
            id: uuid::Uuid::new_v4().to_string(),
            source: self.source(),
            kind: format!("{TYPE_PREFIX}{kind}"),
            subject: subject.map(str::to_string),
            time: rfc3339(now_ms()),
            datacontenttype: "application/json".into(),
            data,
        }
    }

    /// Prepares `ev` for recording: its outbox entry when a webhook or a replication rule
    /// wants it, and its audit line. The caller makes the entry durable (with what it records,
    /// or through [`Events::emit`]) and then hands it over with [`Events::recorded`].
    pub fn prepare(&self, ev: CloudEvent, actor: &Actor) -> Prepared {
        if !self.enabled() {
            return Prepared::default();
        }
        let audit = self.audit.as_ref().map(|_| {
            let mut l = serde_json::json!({
                "time": ev.time,
                "id": ev.id,
                "type": ev.kind,
                "actor": ev.data.get("actor"),
                "client": actor.client.map(|c| c.to_string()),
                "subject": ev.subject,
                "source": ev.source,
                "data": ev.data,
            });
            if let Some(o) = l.as_object_mut() {
                o.retain(|_, v| !v.is_null());
            }
            l
        });
        let (mut outbox, mut body) = (None, None);
        if self.hooks.iter().any(|h| wants(h, &ev)) || !self.replications(&ev).is_empty() {
            let ms = now_ms();
            let r = OutboxRef::new(&self.node(), ms, &ev.id);
            let entry = Entry { recorded_ms: ms, webhook: None, event: ev };
            body = Some(serde_json::to_vec(&entry).expect("an event serializes"));
            outbox = Some((r, entry));
        }
        Prepared { outbox, body, audit }
    }

    /// Hands a prepared event whose outbox entry is durable to the sender, and writes its
    /// audit line.
    pub async fn recorded(self: &Arc<Self>, p: Prepared) {
        if let (Some(_), Some(line)) = (&self.audit, p.audit) {
            let this = self.clone();
            let written = crate::store::blocking(move || {
                if let Some(a) = &this.audit {
                    a.write(line.to_string().as_bytes())?;
                }
                Ok(())
            })
            .await;
            if let Err(e) = written {
                tracing::error!(error = %e, "writing the audit log");
            }
        }
        if let Some((r, entry)) = p.outbox {
            let _ = self.tx.send((r, Some(entry)));
        }
    }

    /// Records an event: in the outbox when a webhook or a replication rule wants it (durable
    /// when this returns), and in the audit log. An error means the outbox could not be
    /// written.
    pub async fn emit(self: &Arc<Self>, ev: CloudEvent, actor: &Actor) -> Result<(), StoreError> {
        if !self.enabled() {
            return Ok(());
        }
        let mut p = self.prepare(ev, actor);
        if let Some((r, body)) = p.take_outbox() {
            let store = self.store.clone();
            crate::store::blocking(move || store.outbox_append(&r, &body)).await?;
        }
        self.recorded(p).await;
        Ok(())
    }

    /// Records an event whose loss would not fail the request that caused it (a mirror fill,
    /// a refusal, a collection): a failure is logged.
    pub async fn emit_logged(self: &Arc<Self>, ev: CloudEvent, actor: &Actor) {
        let (kind, subject) = (ev.kind.clone(), ev.subject.clone());
        if let Err(e) = self.emit(ev, actor).await {
            tracing::error!(error = %e, event = %kind, subject = ?subject, "recording an event failed");
        }
    }

    // ---- delivery ----

    /// Delivers until shutdown: what arrives from `emit`, and what the outbox holds.
    pub async fn run(self: Arc<Self>, mut shutdown: pingora::server::ShutdownWatch) {
        let Some(mut rx) = self.rx.lock().take() else { return };
        if self.hooks.is_empty() && self.replicator.is_empty() {
            return;
        }
        let mut scan = tokio::time::interval(SCAN_EVERY);
        scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some((r, entry)) = rx.recv() => self.start(r, entry),
                _ = scan.tick() => self.scan().await,
                _ = self.delivered_ready.notified() => self.remove_delivered().await,
                _ = shutdown.changed() => {
                    // What was delivered is not delivered again after the restart.
                    self.remove_delivered().await;
                    return;
                }
            }
        }
    }

    /// Starts a delivery task for every pending entry this node is responsible for and no
    /// task works on.
    async fn scan(self: &Arc<Self>) {
        let store = self.store.clone();
        let pending = match crate::store::blocking(move || store.outbox_pending()).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "listing the event outbox");
                return;
            }
        };
        let me = self.node();
        let (takeover, live): (bool, Vec<String>) = match self.cluster.get() {
            None => (true, Vec::new()),
            Some(c) => (c.is_leader(), c.members().iter().map(|m| m.id.clone()).collect()),
        };
        for r in pending {
            let mine = r.node == me || (takeover && !live.contains(&r.node));
            if mine {
                self.start(r, None);
            }
        }
    }

    fn start(self: &Arc<Self>, r: OutboxRef, entry: Option<Entry>) {
        {
            let mut w = self.working.lock();
            if w.contains_key(&r) {
                return;
            }
            w.insert(r.clone(), r.ms);
        }
        let this = self.clone();
        tokio::spawn(async move {
            if !this.deliver(&r, entry).await {
                this.working.lock().remove(&r);
            }
        });
    }

    /// Removes delivered entries from the outbox, all that are waiting in one write: a
    /// removal per delivery would be a commit per delivery competing with pushes for the
    /// store. An entry stays among those worked on until its removal is written, so that a
    /// scan does not start it again.
    async fn remove_delivered(self: &Arc<Self>) {
        let batch: Vec<OutboxRef> = std::mem::take(&mut *self.delivered.lock());
        if batch.is_empty() {
            return;
        }
        let refs = batch.clone();
        self.blocking("removing delivered outbox entries", move |s| s.outbox_remove_many(&refs)).await;
        let mut w = self.working.lock();
        for r in &batch {
            w.remove(r);
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        what: &str,
        f: impl Fn(&Store) -> crate::store::error::Result<T> + Send + Sync + 'static,
    ) -> Option<T> {
        let f = Arc::new(f);
        // Storage that fails is retried a few times; the entry stays, and a later scan
        // picks it up again.
        for n in 0..5u32 {
            let (s, f) = (self.store.clone(), f.clone());
            match crate::store::blocking(move || (*f)(&s)).await {
                Ok(v) => return Some(v),
                Err(e) => {
                    tracing::warn!(error = %e, "{what}");
                    tokio::time::sleep(Duration::from_millis(200) * 2u32.pow(n)).await;
                }
            }
        }
        None
    }

    /// Delivers an entry to everything that wants it. True when it is done and queued for
    /// removal ([`Events::remove_delivered`]).
    async fn deliver(self: &Arc<Self>, r: &OutboxRef, entry: Option<Entry>) -> bool {
        let entry = match entry {
            Some(e) => e,
            None => {
                let rr = r.clone();
                let Some(bytes) = self.blocking("reading an outbox entry", move |s| s.outbox_read(&rr)).await else { return false };
                let Some(bytes) = bytes else { return false };
                match serde_json::from_slice::<Entry>(&bytes) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::error!(error = %e, entry = %r.name, "an outbox entry is not readable; dropping it");
                        let rr = r.clone();
                        self.blocking("removing an outbox entry", move |s| s.outbox_remove(&rr)).await;
                        return false;
                    }
                }
            }
        };
        self.working.lock().insert(r.clone(), entry.recorded_ms);
        let body = Bytes::from(serde_json::to_vec(&entry.event).expect("an event serializes"));
        let mut remaining: Vec<(Arc<Webhook>, u32, String)> = self
            .hooks
            .iter()
            .filter(|h| match &entry.webhook {
                Some(url) => h.url.as_str() == url,
                None => wants(h, &entry.event),
            })
            .map(|h| (h.clone(), 0, String::new()))
            .collect();
        let mut reps: Vec<(usize, crate::replicate::Action, u32, String)> = self
            .replications(&entry.event)
            .into_iter()
            .filter(|(i, _)| entry.webhook.as_ref().is_none_or(|w| *w == self.replicator.name(*i)))
            .map(|(i, a)| (i, a, 0, String::new()))
            .collect();
        if remaining.is_empty() && reps.is_empty() {
            tracing::warn!(event = %entry.event.id, "no configured webhook or replication takes this event any more; dropping it");
        }
        let mut round = 0u32;
        while !remaining.is_empty() || !reps.is_empty() {
            let mut rep_next = Vec::new();
            for (i, action, attempts, _) in reps {
                let attempts = attempts + 1;
                match self.replicator.apply(i, &action).await {
                    Ok(()) => {
                        crate::metrics::REPLICATIONS.with_label_values(&["ok"]).inc();
                        self.note_as(&entry.event, self.replicator.name(i), "delivered", attempts, None, None);
                    }
                    Err(e) => {
                        crate::metrics::REPLICATIONS.with_label_values(&["retry"]).inc();
                        tracing::warn!(event = %entry.event.id, rule = i, error = %e, "replication failed; retrying");
                        self.note_as(&entry.event, self.replicator.name(i), "retrying", attempts, None, Some(e.to_string()));
                        rep_next.push((i, action, attempts, e.to_string()));
                    }
                }
            }
            reps = Vec::new();
            let age = Duration::from_millis(now_ms().saturating_sub(entry.recorded_ms));
            for (i, action, attempts, error) in rep_next {
                if age < REPLICATION_MAX_AGE {
                    reps.push((i, action, attempts, error));
                    continue;
                }
                if !self.dead_letter(&entry, self.replicator.name(i), self.replicator.name(i), attempts, error).await {
                    return false;
                }
            }
            let mut next = Vec::new();
            for (hook, attempts, _) in remaining {
                let attempts = attempts + 1;
                let (status, code, error) = self.post(&hook, &body).await;
                self.note(&entry.event, &hook, status, attempts, code, error.clone());
                match status {
                    "delivered" => crate::metrics::WEBHOOK_DELIVERED.inc(),
                    _ => next.push((hook, attempts, error.unwrap_or_default())),
                }
            }
            remaining = Vec::new();
            let age = Duration::from_millis(now_ms().saturating_sub(entry.recorded_ms));
            for (hook, attempts, error) in next {
                if age < hook.max_age {
                    remaining.push((hook, attempts, error));
                    continue;
                }
                if !self.dead_letter(&entry, hook.url.to_string(), shown(&hook.url), attempts, error).await {
                    return false;
                }
            }
            if remaining.is_empty() && reps.is_empty() {
                break;
            }
            if self.cluster.get().is_some_and(|c| c.me().id != r.node && !c.is_leader()) {
                // Taken over while its node was gone; the node (or the new lease holder) goes on.
                return false;
            }
            crate::metrics::WEBHOOK_RETRIED.inc_by(remaining.len() as u64);
            let shortest = remaining
                .iter()
                .map(|(h, _, _)| h.max_age)
                .chain((!reps.is_empty()).then_some(REPLICATION_MAX_AGE))
                .min()
                .unwrap_or_default();
            tokio::time::sleep(backoff(round, shortest)).await;
            round += 1;
        }
        self.delivered.lock().push(r.clone());
        self.delivered_ready.notify_one();
        true
    }

    /// Moves what `to` (a webhook's URL or a replication rule's name) did not take within its
    /// time to the dead letters. False if that could not be written: the entry stays in the
    /// outbox and a later scan tries again.
    async fn dead_letter(&self, entry: &Entry, to: String, shown_as: String, attempts: u32, error: String) -> bool {
        let dead =
            DeadLetter { webhook: to, recorded_ms: entry.recorded_ms, dead_ms: now_ms(), attempts, error, event: entry.event.clone() };
        let body = serde_json::to_vec(&dead).expect("a dead letter serializes");
        // Unique per receiver: one event can die for several.
        let id = format!("{}.{}", entry.event.id, &uuid::Uuid::new_v4().simple().to_string()[..8]);
        if self.blocking("writing a dead letter", move |s| s.dead_append(now_ms(), &id, &body)).await.is_none() {
            return false;
        }
        crate::metrics::WEBHOOK_DEAD.inc();
        self.note_as(&entry.event, shown_as.clone(), "dead", attempts, None, Some(dead.error.clone()));
        tracing::warn!(event = %entry.event.id, to = %shown_as, attempts, "not taken within max_age; dead-lettered");
        true
    }

    /// One attempt: `delivered`, or `retrying` with the answer's status or the error.
    async fn post(&self, hook: &Webhook, body: &Bytes) -> (&'static str, Option<u16>, Option<String>) {
        let _permit = self.permits.acquire().await;
        let r = self
            .http
            .post(hook.url.clone())
            .timeout(hook.timeout)
            .header("content-type", "application/cloudevents+json")
            .header("x-berth-signature-256", signature(hook.secret.expose(), body))
            .body(body.clone())
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => ("delivered", Some(resp.status().as_u16()), None),
            Ok(resp) => ("retrying", Some(resp.status().as_u16()), Some(format!("answered {}", resp.status()))),
            Err(e) => ("retrying", None, Some(crate::events::error_text(&e))),
        }
    }

    fn note(&self, ev: &CloudEvent, hook: &Webhook, status: &'static str, attempts: u32, code: Option<u16>, error: Option<String>) {
        self.note_as(ev, shown(&hook.url), status, attempts, code, error)
    }

    fn note_as(&self, ev: &CloudEvent, to: String, status: &'static str, attempts: u32, code: Option<u16>, error: Option<String>) {
        let d = Delivery {
            id: ev.id.clone(),
            kind: ev.kind.clone(),
            subject: ev.subject.clone(),
            webhook: to,
            status,
            attempts,
            code,
            error,
            time: rfc3339(now_ms()),
        };
        let mut recent = self.recent.lock();
        // One line per event and webhook: its latest state.
        recent.retain(|x| !(x.id == d.id && x.webhook == d.webhook));
        recent.push_front(d);
        recent.truncate(RECENT);
    }

    // ---- operators ----

    /// The latest deliveries, newest first.
    pub fn recent(&self) -> Vec<Delivery> {
        self.recent.lock().iter().cloned().collect()
    }

    /// Seconds since the oldest entry this process is delivering was recorded.
    pub fn queue_age(&self) -> f64 {
        let oldest = self.working.lock().values().min().copied();
        oldest.map_or(0.0, |ms| now_ms().saturating_sub(ms) as f64 / 1000.0)
    }

    /// The dead letters, oldest first (blocking).
    pub fn dead_letters(&self) -> Result<Vec<serde_json::Value>, StoreError> {
        let mut out = Vec::new();
        for name in self.store.dead_letters()? {
            let Some(bytes) = self.store.dead_read(&name)? else { continue };
            let Ok(d) = serde_json::from_slice::<DeadLetter>(&bytes) else { continue };
            out.push(serde_json::json!({
                "name": name,
                "id": d.event.id,
                "type": d.event.kind,
                "subject": d.event.subject,
                "webhook": url::Url::parse(&d.webhook).map(|u| shown(&u)).unwrap_or_default(),
                "recorded": rfc3339(d.recorded_ms),
                "dead": rfc3339(d.dead_ms),
                "attempts": d.attempts,
                "error": d.error,
            }));
        }
        Ok(out)
    }

    /// Puts a dead letter back in the outbox for its webhook, with a fresh `max_age` and the
    /// same event id. False if there is no such dead letter.
    pub async fn replay(self: &Arc<Self>, name: &str) -> Result<bool, StoreError> {
        let (this, name) = (self.clone(), name.to_string());
        let queued = crate::store::blocking(move || {
            let Some(bytes) = this.store.dead_read(&name)? else { return Ok(None) };
            let d: DeadLetter = serde_json::from_slice(&bytes)?;
            let ms = now_ms();
            let entry = Entry { recorded_ms: ms, webhook: Some(d.webhook), event: d.event };
            let r = OutboxRef::new(&this.node(), ms, &entry.event.id);
            this.store.outbox_append(&r, &serde_json::to_vec(&entry)?)?;
            this.store.dead_remove(&name)?;
            Ok(Some((r, entry)))
        })
        .await?;
        match queued {
            Some((r, entry)) => {
                let _ = self.tx.send((r, Some(entry)));
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// An HTTP client error with its causes (reqwest's own text omits them).
pub(crate) fn error_text(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Runs the sender on the server's background runtime.
pub struct Sender(pub Arc<Events>);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Sender {
    async fn start(&self, shutdown: pingora::server::ShutdownWatch) {
        lower_priority();
        self.0.clone().run(shutdown).await
    }
}

/// Deliveries yield the CPU to serving: on a machine busy with pushes, a push goes first and
/// deliveries catch up when it is idle. This service has a runtime of its own (one thread);
/// that thread runs at nice 10, and the threads it starts (its blocking pool, the
/// replicator's readers) inherit that, since Linux keeps a nice value per thread.
fn lower_priority() {
    // SAFETY: setpriority only reads its arguments; the calling thread's id names that thread.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, DELIVERY_NICE) };
    if r != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "lowering the event sender's priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(events: Option<&[&str]>, ns: Option<&[&str]>) -> Webhook {
        Webhook {
            url: url::Url::parse("http://127.0.0.1:1/").unwrap(),
            events: events.map(|e| e.iter().map(|s| s.to_string()).collect()),
            namespaces: ns.map(|e| e.iter().map(|s| s.to_string()).collect()),
            secret: crate::config::Secret::new("s"),
            max_age: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        }
    }

    fn ev(kind: &str, subject: Option<&str>) -> CloudEvent {
        CloudEvent {
            specversion: "1.0".into(),
            id: "x".into(),
            source: "berth://h".into(),
            kind: format!("{TYPE_PREFIX}{kind}"),
            subject: subject.map(str::to_string),
            time: rfc3339(0),
            datacontenttype: "application/json".into(),
            data: serde_json::json!({}),
        }
    }

    #[test]
    fn filters_by_event_and_namespace() {
        let all = hook(None, None);
        let team = hook(Some(&["manifest.pushed"]), Some(&["team"]));
        assert!(wants(&all, &ev("tag.deleted", Some("x/y"))));
        assert!(wants(&team, &ev("manifest.pushed", Some("team/app"))));
        assert!(wants(&team, &ev("manifest.pushed", Some("team"))));
        assert!(!wants(&team, &ev("manifest.pushed", Some("teams/app"))));
        assert!(!wants(&team, &ev("tag.deleted", Some("team/app"))));
        assert!(wants(&hook(None, Some(&["team"])), &ev("gc.completed", None)));
    }

    #[test]
    fn signature_is_github_style_hmac() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let day = Duration::from_secs(86400);
        assert!(backoff(0, day) >= Duration::from_millis(250) && backoff(0, day) <= Duration::from_millis(375));
        assert!(backoff(30, day) <= Duration::from_secs(90));
        assert!(backoff(30, Duration::from_secs(2)) <= Duration::from_millis(750));
    }

    #[test]
    fn platforms_of_an_index() {
        let idx = br#"{"manifests":[{"platform":{"os":"linux","architecture":"arm64","variant":"v8"}},{"platform":{"os":"linux","architecture":"amd64"}},{"platform":{"os":"unknown","architecture":"unknown"}}]}"#;
        assert_eq!(platforms_of(idx), vec!["linux/arm64/v8", "linux/amd64"]);
        assert!(platforms_of(b"{}").is_empty());
    }
}
