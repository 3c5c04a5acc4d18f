//! Wiring: config -> store -> registry -> pingora services -> run until a shutdown signal.

use crate::config::Config;
use crate::http::admin::{AdminApp, Health};
use crate::http::RegistryApp;
use crate::registry::Registry;
use crate::store::Store;
use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the store at {path}: {source}")]
    Store { path: String, source: std::io::Error },
    #[error("cannot start the server: {0}")]
    Server(String),
    #[error("cannot set up access control: {0}")]
    Auth(String),
}

/// Marks berth ready once every listener accepts connections, and tells systemd.
struct ReadinessProbe {
    health: Arc<Health>,
    addrs: Vec<SocketAddr>,
}

#[async_trait]
impl BackgroundService for ReadinessProbe {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        for addr in &self.addrs {
            // Bounded: listeners bind within milliseconds of the runtime starting.
            for _ in 0..500 {
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        self.health.ready.store(true, Ordering::SeqCst);
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        tracing::info!(listen = ?self.addrs, "berth is ready");
        let _ = shutdown.changed().await;
        self.health.draining.store(true, Ordering::SeqCst);
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    }
}

pub fn build(config: Config) -> Result<(Server, Arc<Registry>), StartError> {
    let config = Arc::new(config);
    let store = Store::open(&config.storage_root)
        .map_err(|source| StartError::Store { path: config.storage_root.display().to_string(), source })?;
    crate::metrics::init(&config.upstreams.iter().map(|u| u.name.clone()).collect::<Vec<_>>());
    let registry = Registry::new(config.clone(), store.clone()).map_err(StartError::Auth)?;
    let conf = ServerConf {
        threads: config.threads,
        grace_period_seconds: Some(config.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let health = Arc::new(Health::default());
    let mut addrs = Vec::new();
    if let Some(listen) = config.listen {
        let mut svc = Service::new("berth registry".to_string(), RegistryApp { registry: registry.clone() });
        svc.add_tcp(&listen.to_string());
        server.add_service(svc);
        addrs.push(listen);
    }
    if let Some(admin) = config.admin_listen {
        let mut svc = Service::new("berth admin".to_string(), AdminApp { health: health.clone(), store: store.clone() });
        svc.add_tcp(&admin.to_string());
        server.add_service(svc);
        addrs.push(admin);
    }
    server.add_service(background_service("readiness", ReadinessProbe { health, addrs }));
    Ok((server, registry))
}

/// Runs until SIGTERM (graceful: drain within the grace period) or SIGINT (immediate).
pub fn run(config: Config, signal: Option<Box<dyn ShutdownSignalWatch>>) -> Result<(), StartError> {
    let (server, _registry) = build(config)?;
    let mut args = RunArgs::default();
    if let Some(s) = signal {
        args.shutdown_signal = s;
    }
    server.run(args);
    Ok(())
}
