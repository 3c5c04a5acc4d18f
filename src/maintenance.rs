//! In-server housekeeping on a schedule: upload sessions past `upload_ttl` are removed, and
//! retention plus garbage collection run every `gc_interval`. Prefetching and the checks of
//! watched tags run beside it, in tasks of their own.

use crate::registry::Registry;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Maintenance {
    pub registry: Arc<Registry>,
}

impl Maintenance {
    /// Removes upload sessions idle for longer than the TTL; returns how many.
    pub async fn expire_uploads(registry: &Registry) -> usize {
        let ttl = registry.config.storage.upload_ttl.as_millis() as u64;
        let uploads = &registry.store.uploads;
        let now = crate::store::now_ms();
        let list = match uploads.list() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "listing upload sessions");
                return 0;
            }
        };
        let mut n = 0;
        for (id, last) in list {
            if now.saturating_sub(last) >= ttl {
                uploads.remove(&id).await;
                n += 1;
            }
        }
        n
    }
}

#[async_trait]
impl BackgroundService for Maintenance {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        crate::registry::warm::start(&self.registry.mirror, shutdown.clone());
        let storage = &self.registry.config.storage;
        // Often enough that an expired upload or a due GC is never late by more than a tick.
        let tick = storage.upload_ttl.min(storage.gc_interval).min(Duration::from_secs(60)).max(Duration::from_millis(200)) / 2;
        let mut last_gc = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.changed() => return,
            }
            let expired = Self::expire_uploads(&self.registry).await;
            if expired > 0 {
                tracing::info!(expired, "removed expired upload sessions");
            }
            // In a cluster the lease holder collects and evicts for the whole bucket.
            let cluster = self.registry.cluster();
            if cluster.is_some_and(|c| !c.is_leader()) {
                continue;
            }
            if cluster.is_some() {
                let store = self.registry.store.clone();
                match tokio::task::spawn_blocking(move || store.enforce_cache_bound_from_index()).await {
                    Ok(Ok(n)) if n > 0 => tracing::info!(bytes = n, "evicted mirrored content past the cache bound"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "cache eviction failed"),
                    _ => {}
                }
            }
            if last_gc.elapsed() >= storage.gc_interval {
                last_gc = Instant::now();
                match self.registry.gc(false).await {
                    Ok(r) => tracing::info!(
                        tags = r.tags_removed.len(),
                        manifests = r.manifests_removed.len(),
                        blobs = r.blobs_removed,
                        bytes = r.bytes_freed,
                        "garbage collection done"
                    ),
                    Err(e) => tracing::warn!(error = %e, "garbage collection failed"),
                }
            }
        }
    }
}
