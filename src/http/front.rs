//! The registry listener's connection handling in front of the request handler: caps on
//! connections (in all and per client address) and, for HTTP/1, the wait for each request's
//! first byte bounded by the idle timeout, so the head deadline ([`super::RegistryApp`])
//! starts when a request does. HTTP/2 connections go to pingora's own handling.

use super::RegistryApp;
use crate::config::ClientLimits;
use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// Open connections, in all and per address.
#[derive(Default)]
pub struct Conns {
    by_addr: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; dropping it releases the slot.
pub struct Slot<'a> {
    conns: &'a Conns,
    addr: Option<IpAddr>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut g = self.conns.by_addr.lock();
        g.0 -= 1;
        if let Some(a) = self.addr {
            if let Some(n) = g.1.get_mut(&a) {
                *n -= 1;
                if *n == 0 {
                    g.1.remove(&a);
                }
            }
        }
    }
}

impl Conns {
    /// A slot for a connection from `addr`, unless that would pass a cap: `Err` says which.
    pub fn admit(&self, addr: Option<IpAddr>, total: usize, per_addr: usize) -> Result<Slot<'_>, &'static str> {
        let mut g = self.by_addr.lock();
        if g.0 >= total {
            return Err("too many connections");
        }
        if let Some(a) = addr {
            let n = g.1.entry(a).or_default();
            if *n >= per_addr {
                return Err("too many connections from this address");
            }
            *n += 1;
        }
        g.0 += 1;
        Ok(Slot { conns: self, addr })
    }

    pub fn open(&self) -> usize {
        self.by_addr.lock().0
    }
}

/// Marks a reused connection whose next request was already read (pipelined).
pub struct Pipelined;

pub struct Front {
    pub app: Arc<RegistryApp>,
    pub conns: Conns,
}

/// The whole answer to a connection over a cap: written raw, the connection closed after it.
fn refusal(why: &str) -> Vec<u8> {
    let body = serde_json::json!({"errors": [{"code": "TOOMANYREQUESTS", "message": why, "detail": null}]}).to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl Front {
    fn limits(&self) -> ClientLimits {
        self.app.registry.config.clients
    }
}

#[async_trait]
impl ServerApp for Front {
    async fn process_new(self: &Arc<Self>, mut stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let limits = self.limits();
        let addr = stream.get_socket_digest().and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let _slot = match self.conns.admit(addr, limits.max_connections, limits.max_connections_per_address) {
            Ok(s) => s,
            Err(why) => {
                crate::metrics::CONNECTIONS_REFUSED.with_label_values(&[why]).inc();
                if !matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
                    use tokio::io::AsyncWriteExt;
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        stream.write_all(&refusal(why)).await?;
                        stream.flush().await
                    })
                    .await;
                }
                return None;
            }
        };
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return self.app.process_new(stream, shutdown).await;
        }
        let mut settings: Option<HttpPersistentSettings> = None;
        loop {
            let pipelined = settings.as_mut().and_then(|s| s.take_user_context()).is_some_and(|c| c.is::<Pipelined>());
            if !pipelined {
                // Idle until the next request's first byte; a connection that sends nothing
                // goes.
                let mut first = [0u8; 1];
                match tokio::time::timeout(limits.idle_timeout, stream.try_peek(&mut first)).await {
                    Ok(Ok(_)) => {}
                    _ => return None,
                }
            }
            let mut session = ServerSession::new_http1(stream);
            if let Some(s) = settings.take() {
                s.apply_to_session(&mut session);
            } else {
                session.set_keepalive(Some(limits.idle_timeout.as_secs().max(1)));
            }
            if *shutdown.borrow() {
                session.set_keepalive(None);
            }
            // Requests sent before the previous answer are answered in order.
            session.set_pipelining_enabled(true);
            let reused = self.app.process_new_http(session, shutdown).await?;
            let (s, persistent) = reused.consume();
            stream = s;
            settings = persistent;
        }
    }

    async fn cleanup(&self) {
        self.app.http_cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_per_address_and_in_all_and_release_on_drop() {
        let c = Conns::default();
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let s1 = c.admit(Some(a), 3, 2).unwrap();
        let s2 = c.admit(Some(a), 3, 2).unwrap();
        assert_eq!(c.admit(Some(a), 3, 2).err(), Some("too many connections from this address"));
        let s3 = c.admit(Some(b), 3, 2).unwrap();
        assert_eq!(c.admit(Some(b), 3, 2).err(), Some("too many connections"));
        drop(s1);
        assert_eq!(c.open(), 2);
        let _s4 = c.admit(Some(a), 3, 2).unwrap();
        drop((s2, s3));
        assert_eq!(c.open(), 1);
    }
}
