//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `POST /gc` (what `berth gc` calls
//! so that collection runs under the server's own locks and index, and in a cluster under the
//! maintenance lease: 409 naming the holder elsewhere), and the webhooks'
//! deliveries and dead letters (`/events/...`).
//!
//! It runs on a thread and runtime of its own, outside pingora's services: pingora stops every
//! service's accept loop the moment a graceful shutdown starts, and `/readyz` has to keep
//! answering 503 to load balancers for the whole drain, until the process exits.

use crate::metrics;
use crate::registry::GcRefused;
use crate::store::Store;
use bytes::Bytes;
use pingora::apps::{HttpPersistentSettings, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Readiness: set once the store is open and the listeners accept; cleared when draining.
#[derive(Default)]
pub struct Health {
    pub ready: AtomicBool,
    pub draining: AtomicBool,
}

impl Health {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.draining.load(Ordering::SeqCst)
    }
}

pub struct Admin {
    pub health: Arc<Health>,
    pub store: Arc<Store>,
    registry: Option<Arc<crate::registry::Registry>>,
}

impl Admin {
    pub fn new(health: Arc<Health>, store: Arc<Store>) -> Arc<Admin> {
        Arc::new(Admin { health, store, registry: None })
    }

    /// Enables `POST /gc` against this registry.
    pub fn with_registry(self: Arc<Self>, registry: Arc<crate::registry::Registry>) -> Arc<Admin> {
        let mut a = Arc::into_inner(self).expect("admin not shared yet");
        a.registry = Some(registry);
        Arc::new(a)
    }

    /// Serves the admin endpoints on `listener` from a thread of its own until the process ends.
    pub fn spawn(self: Arc<Self>, listener: std::net::TcpListener) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::Builder::new().name("berth-admin".into()).spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("admin listener: {e}");
                        return;
                    }
                };
                loop {
                    match listener.accept().await {
                        Ok((tcp, _)) => {
                            tokio::spawn(self.clone().connection(tcp));
                        }
                        Err(e) => {
                            // Out of descriptors, most likely: let others close some.
                            tracing::warn!("admin accept: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            })
        })?;
        Ok(())
    }

    async fn connection(self: Arc<Self>, tcp: tokio::net::TcpStream) {
        // Head and body go out as two writes: without this a keep-alive scrape waits for the
        // client's delayed ACK (~40 ms) before the body leaves.
        let _ = tcp.set_nodelay(true);
        let stream = pingora::protocols::l4::stream::Stream::from(tcp);
        let mut session = ServerSession::new_http1(Box::new(stream));
        session.set_keepalive(Some(60));
        loop {
            session.set_read_timeout(Some(Duration::from_secs(60)));
            let Some(reused) = self.request(session).await else { return };
            let (stream, settings) = reused.consume();
            session = ServerSession::new_http1(stream);
            if let Some(s) = settings {
                s.apply_to_session(&mut session);
            }
        }
    }

    async fn request(&self, mut session: ServerSession) -> Option<ReusedHttpStream> {
        if !matches!(session.read_request().await, Ok(true)) {
            return None;
        }
        let path = session.req_header().uri.path().to_string();
        let is_post = session.req_header().method == http::Method::POST;
        let query = session.req_header().uri.query().unwrap_or("").to_string();
        let (status, ctype, body) = match path.as_str() {
            "/gc" if !is_post => (405, "text/plain", "use POST\n".to_string()),
            "/gc" => match &self.registry {
                None => (503, "text/plain", "no registry\n".to_string()),
                Some(reg) => {
                    let dry_run = crate::oci::route::query_param(Some(&query), "dry_run").is_some_and(|v| v == "true" || v == "1");
                    match reg.gc_requested(dry_run).await {
                        Ok(r) => (200, "application/json", serde_json::to_string_pretty(&r).expect("report serializes")),
                        Err(GcRefused::LeaseHeld(l)) => {
                            (409, "application/json", serde_json::json!({ "error": l.reason, "lease_holder": l.holder }).to_string())
                        }
                        Err(GcRefused::Failed(e)) => (500, "text/plain", format!("gc failed: {e}\n")),
                    }
                }
            },
            "/replicate" if !is_post => (405, "text/plain", "use POST\n".to_string()),
            "/replicate" => match &self.registry {
                None => (503, "text/plain", "no registry\n".to_string()),
                Some(reg) => {
                    let rule = crate::oci::route::query_param(Some(&query), "rule").map(|v| v.parse::<usize>());
                    match rule.transpose() {
                        Err(_) => (400, "text/plain", "rule must be a number\n".to_string()),
                        Ok(rule) => match reg.replicator.sync(rule).await {
                            Ok(r) => (200, "application/json", serde_json::to_string_pretty(&r).expect("report serializes")),
                            Err(e) => (500, "text/plain", format!("replication failed: {e}\n")),
                        },
                    }
                }
            },
            "/events/deliveries" | "/events/dead" if is_post => (405, "text/plain", "use GET\n".to_string()),
            "/events/deliveries" => match &self.registry {
                None => (503, "text/plain", "no registry\n".to_string()),
                Some(reg) => (200, "application/json", serde_json::to_string_pretty(&reg.events.recent()).expect("deliveries serialize")),
            },
            "/events/dead" => match &self.registry {
                None => (503, "text/plain", "no registry\n".to_string()),
                Some(reg) => {
                    let events = reg.events.clone();
                    match crate::store::blocking(move || events.dead_letters()).await {
                        Ok(d) => (200, "application/json", serde_json::to_string_pretty(&d).expect("dead letters serialize")),
                        Err(e) => (503, "text/plain", format!("listing dead letters failed: {e}\n")),
                    }
                }
            },
            p if p.starts_with("/events/dead/") && p.ends_with("/replay") => {
                let name = &p["/events/dead/".len()..p.len() - "/replay".len()];
                match (&self.registry, is_post) {
                    (_, false) => (405, "text/plain", "use POST\n".to_string()),
                    (None, _) => (503, "text/plain", "no registry\n".to_string()),
                    (Some(reg), true) => match reg.events.replay(name).await {
                        Ok(true) => (200, "application/json", serde_json::json!({ "replayed": name }).to_string()),
                        Ok(false) => (404, "text/plain", format!("no dead letter {name:?}\n")),
                        Err(e) => (503, "text/plain", format!("replaying failed: {e}\n")),
                    },
                }
            }
            "/metrics" => {
                self.refresh_gauges().await;
                (200, "text/plain; version=0.0.4", metrics::render())
            }
            "/healthz" => (200, "text/plain", "ok\n".to_string()),
            "/readyz" if self.health.is_ready() && !self.store.storage_ready() => (503, "text/plain", "storage unavailable\n".to_string()),
            "/readyz" if self.health.is_ready() => (200, "text/plain", "ready\n".to_string()),
            "/readyz" if self.health.draining.load(Ordering::SeqCst) => (503, "text/plain", "draining\n".to_string()),
            "/readyz" => (503, "text/plain", "starting\n".to_string()),
            _ => (404, "text/plain", "not found\n".to_string()),
        };
        let mut h = ResponseHeader::build(status, Some(2)).ok()?;
        h.insert_header("Content-Type", ctype).ok()?;
        h.insert_header("Content-Length", body.len().to_string()).ok()?;
        session.write_response_header(Box::new(h)).await.ok()?;
        session.write_response_body(Bytes::from(body), true).await.ok()?;
        session.finish_body().await.ok()?;
        let settings = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(Some(s)) => Some(ReusedHttpStream::from_reusable_stream(s, settings)),
            _ => None,
        }
    }

    /// Gauges read from the store's counters: O(1) whatever the store's size.
    async fn refresh_gauges(&self) {
        if let Some(reg) = &self.registry {
            metrics::WEBHOOK_QUEUE_AGE.set(reg.events.queue_age());
        }
        metrics::UPLOADS_IN_PROGRESS.set(self.store.uploads.in_progress() as i64);
        if let Some(hot) = self.store.hot_tier_bytes() {
            metrics::HOT_TIER_BYTES.set(hot as i64);
        }
        match self.store.usage() {
            Ok(u) => {
                metrics::STORE_BYTES.with_label_values(&["hosted"]).set(u.hosted as i64);
                metrics::STORE_BYTES.with_label_values(&["cache"]).set(u.cache as i64);
            }
            Err(e) => tracing::warn!("reading the store's usage: {e}"),
        }
    }
}
