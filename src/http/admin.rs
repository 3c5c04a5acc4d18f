//! The admin listener: `/metrics`, `/healthz`, `/readyz`.

use crate::metrics;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::apps::{HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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

pub struct AdminApp {
    pub health: Arc<Health>,
    pub store: Arc<crate::store::Store>,
}

#[async_trait]
impl HttpServerApp for AdminApp {
    async fn process_new_http(self: &Arc<Self>, mut session: ServerSession, shutdown: &ShutdownWatch) -> Option<ReusedHttpStream> {
        if !matches!(session.read_request().await, Ok(true)) {
            return None;
        }
        if *shutdown.borrow() {
            self.health.draining.store(true, Ordering::SeqCst);
            session.set_keepalive(None);
        }
        let path = session.req_header().uri.path().to_string();
        let (status, ctype, body) = match path.as_str() {
            "/metrics" => {
                metrics::UPLOADS_IN_PROGRESS.set(self.store.uploads.in_progress() as i64);
                (200, "text/plain; version=0.0.4", metrics::render())
            }
            "/healthz" => (200, "text/plain", "ok\n".to_string()),
            "/readyz" if self.health.is_ready() => (200, "text/plain", "ready\n".to_string()),
            "/readyz" => (503, "text/plain", "not ready\n".to_string()),
            _ => (404, "text/plain", "not found\n".to_string()),
        };
        let mut h = ResponseHeader::build(status, Some(2)).ok()?;
        h.insert_header("Content-Type", ctype).ok()?;
        h.insert_header("Content-Length", body.len().to_string()).ok()?;
        session.write_response_header(Box::new(h)).await.ok()?;
        session.write_response_body(Bytes::from(body), true).await.ok()?;
        session.finish_body().await.ok()?;
        let settings = pingora::apps::HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(Some(s)) => Some(ReusedHttpStream::from_reusable_stream(s, settings)),
            _ => None,
        }
    }
}
