//! Mirrored repositories: read-only, served from the store, filled from upstream.

use super::{Outcome, Request, Response};
use crate::config::{Config, Upstream};
use crate::oci::route::Endpoint;
use crate::oci::{ErrorCode, OciError, RepoName};
use crate::store::Store;
use std::sync::Arc;

pub struct Mirror {
    upstreams: Vec<Arc<Upstream>>,
    #[allow(dead_code)]
    store: Arc<Store>,
}

impl Mirror {
    pub fn new(config: &Config, store: Arc<Store>) -> Arc<Mirror> {
        Arc::new(Mirror { upstreams: config.upstreams.iter().cloned().map(Arc::new).collect(), store })
    }

    pub fn upstream_named(&self, host: &str) -> Option<Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.answers_to(host)).cloned()
    }

    pub fn default_upstream(&self) -> Option<Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.default).cloned()
    }

    pub async fn handle(
        &self,
        _req: &Request<'_>,
        _ep: &Endpoint,
        upstream: &Upstream,
        _repo: &RepoName,
        _outcome: &mut Outcome,
    ) -> Result<Response, OciError> {
        Err(OciError::msg(ErrorCode::UpstreamUnavailable, format!("mirror of {} not available", upstream.name)))
    }
}
