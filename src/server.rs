//! Wiring: config -> store -> registry -> pingora services -> run until a shutdown signal.
//!
//! Graceful stop: on SIGTERM readiness turns 503 at once, pingora stops accepting, and the
//! process exits as soon as no request is in flight, or when the grace period ends, whichever
//! comes first. pingora alone would sleep through the whole grace period and then drop the
//! remaining tasks; `Drainer` exits instead. Anything unfinished then (a fill, an upload) only
//! ever lived in temp files that the store ignores and sweeps at the next start.

use crate::config::Config;
use crate::http::admin::{Admin, Health};
use crate::http::{InFlight, RegistryApp};
use crate::registry::Registry;
use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Store(String),
    #[error("cannot listen on {addr} ({key}): {source}")]
    Listen { key: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("cannot start the server: {0}")]
    Server(String),
    #[error("cannot set up access control: {0}")]
    Auth(String),
}

/// Marks berth ready once every listener accepts connections, and tells systemd.
struct ReadinessProbe {
    health: Arc<Health>,
    plain: Vec<SocketAddr>,
    tls: Option<SocketAddr>,
}

/// Listeners bind within milliseconds of their runtime starting; this is only a bound.
const LISTEN_DEADLINE: Duration = Duration::from_secs(10);

#[async_trait]
impl BackgroundService for ReadinessProbe {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let up = async {
            for addr in &self.plain {
                while tokio::net::TcpStream::connect(addr).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            if let Some(addr) = self.tls {
                while !crate::tls::probe(addr).await {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        if tokio::time::timeout(LISTEN_DEADLINE, up).await.is_err() {
            // pingora reports a failed bind by panicking its service thread, leaving a
            // process that would never serve: better to fail the start for the supervisor.
            tracing::error!(listen = ?self.plain, tls = ?self.tls, "listeners did not come up within {LISTEN_DEADLINE:?}; exiting");
            std::process::exit(1);
        }
        if self.health.draining.load(Ordering::SeqCst) {
            return;
        }
        self.health.ready.store(true, Ordering::SeqCst);
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        tracing::info!(listen = ?self.plain, tls = ?self.tls, "berth is ready");
    }
}

/// SIGTERM: graceful stop; SIGINT: immediate. Readiness turns 503 before pingora even hears of
/// the shutdown.
struct Signals {
    health: Arc<Health>,
    grace: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::error!("cannot install signal handlers; SIGTERM will not drain");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {
                start_draining(&self.health);
                tracing::info!(grace = ?self.grace, "SIGTERM: draining; readiness is 503, in-flight requests may finish");
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping now");
                ShutdownSignal::FastShutdown
            }
        }
    }
}

fn start_draining(health: &Health) {
    if !health.draining.swap(true, Ordering::SeqCst) {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    }
}

/// After the shutdown broadcast: exits once in-flight requests are done or the grace is over.
struct Drainer {
    health: Arc<Health>,
    in_flight: Arc<InFlight>,
    grace: Duration,
    registry: Arc<Registry>,
}

#[async_trait]
impl BackgroundService for Drainer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        start_draining(&self.health);
        if let Some(c) = self.registry.cluster() {
            // The others stop sending owner requests here; what is in flight finishes.
            let c = c.clone();
            let _ = tokio::task::spawn_blocking(move || c.leave()).await;
        }
        let pending = self.in_flight.count();
        match tokio::time::timeout(self.grace, self.in_flight.idle()).await {
            Ok(()) => tracing::info!(drained = pending, "in-flight requests finished; exiting"),
            Err(_) => tracing::warn!(
                unfinished = self.in_flight.count(),
                "grace period of {:?} over; exiting with requests still in flight",
                self.grace
            ),
        }
        std::process::exit(0);
    }
}

/// Binds and releases `addr`, so an address in use is a clear start error rather than a
/// panic inside pingora.
fn check_bindable(key: &'static str, addr: SocketAddr) -> Result<(), StartError> {
    std::net::TcpListener::bind(addr).map(drop).map_err(|source| StartError::Listen { key, addr, source })
}

/// glibc keeps freed heap in its arenas: after a flood of connections (each with its head
/// buffer) the process would stay at its peak. Trimming hands free pages back; it costs
/// microseconds when there is nothing to give back.
fn return_freed_memory(every: Duration) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    let _ = std::thread::Builder::new().name("berth-trim".into()).spawn(move || loop {
        std::thread::sleep(every);
        // SAFETY: malloc_trim only releases free memory; callable from any thread.
        unsafe {
            libc::malloc_trim(0);
        }
    });
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = every;
}

pub struct Built {
    pub server: Server,
    pub registry: Arc<Registry>,
    signals: Signals,
}

pub fn build(config: Config) -> Result<Built, StartError> {
    let config = Arc::new(config);
    let store = config.open_store().map_err(StartError::Store)?;
    if let Some(b) = store.bucket() {
        crate::store::s3::watch(b, Duration::from_secs(2));
    }
    return_freed_memory(Duration::from_secs(10));
    crate::metrics::init(&config.upstreams.iter().map(|u| u.name.clone()).collect::<Vec<_>>());
    let registry = Registry::new(config.clone(), store.clone()).map_err(StartError::Auth)?;
    if let Some(c) = &config.cluster {
        check_bindable("cluster.listen", c.listen)?;
        let cluster = crate::cluster::Cluster::start(c, &store).map_err(StartError::Store)?;
        registry.join(cluster);
    }
    let conf = ServerConf {
        threads: config.threads,
        // A backstop only: Drainer exits when the grace ends.
        grace_period_seconds: Some(config.grace_period.as_secs() + 5),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let health = Arc::new(Health::default());
    let in_flight = Arc::new(InFlight::default());
    let mut plain = Vec::new();
    let app = Arc::new(RegistryApp { registry: registry.clone(), in_flight: in_flight.clone(), peer: false });
    let mut svc = Service::new("berth registry".to_string(), crate::http::front::Front { app, conns: Default::default() });
    if let Some(listen) = config.listen {
        check_bindable("server.listen", listen)?;
        svc.add_tcp(&listen.to_string());
        plain.push(listen);
    }
    if let Some(tls) = &config.tls {
        check_bindable("server.tls_listen", tls.listen)?;
        svc.add_tls_with_settings(&tls.listen.to_string(), None, crate::tls::listener_settings(&tls.identity));
    }
    server.add_service(svc);
    if let Some(c) = &config.cluster {
        let app = Arc::new(RegistryApp { registry: registry.clone(), in_flight: in_flight.clone(), peer: true });
        let mut peer = Service::new("berth peer".to_string(), crate::http::front::Front { app, conns: Default::default() });
        peer.add_tcp(&c.listen.to_string());
        server.add_service(peer);
        plain.push(c.listen);
    }
    if let Some(addr) = config.admin_listen {
        let listener =
            std::net::TcpListener::bind(addr).map_err(|source| StartError::Listen { key: "server.admin_listen", addr, source })?;
        Admin::new(health.clone(), store.clone())
            .with_registry(registry.clone())
            .spawn(listener)
            .map_err(|e| StartError::Server(format!("admin listener: {e}")))?;
    }
    let grace = config.grace_period;
    server.add_service(background_service(
        "readiness",
        ReadinessProbe { health: health.clone(), plain, tls: config.tls.as_ref().map(|t| t.listen) },
    ));
    server.add_service(background_service("maintenance", crate::maintenance::Maintenance { registry: registry.clone() }));
    server.add_service(background_service("events", crate::events::Sender(registry.events.clone())));
    server.add_service(background_service("drain", Drainer { health: health.clone(), in_flight, grace, registry: registry.clone() }));
    Ok(Built { server, registry, signals: Signals { health, grace } })
}

/// Runs until SIGTERM (graceful: drain within the grace period) or SIGINT (immediate).
/// `signal` replaces the Unix signals (tests drive a stop that way).
pub fn run(config: Config, signal: Option<Box<dyn ShutdownSignalWatch>>) -> Result<(), StartError> {
    let Built { server, registry: _registry, signals } = build(config)?;
    let args = RunArgs { shutdown_signal: signal.unwrap_or_else(|| Box::new(signals)) };
    server.run(args);
    Ok(())
}
