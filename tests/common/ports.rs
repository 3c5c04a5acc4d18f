//! Loopback ports for the servers the tests start (berth, its upstreams, other registries).
//!
//! A port found by binding `:0` and closing the socket again is free only until someone binds
//! it: another test in this process, or another test binary running at the same time, may be
//! handed the same port by the kernel before the server meant for it listens. So the port stays
//! bound instead: a socket with `SO_REUSEADDR` that never listens holds it on 127.0.0.1 and ::1
//! until the process exits. The kernel gives a port held that way to no other `bind(:0)` and
//! no outgoing connection, while a server that sets `SO_REUSEADDR` itself (berth, pingora,
//! tokio, std's listeners on Unix, Go's net package) can still listen on it, and listen on it
//! again after a restart. Self-contained, so benches can include it with `#[path]` too.
#![allow(dead_code)]

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use tokio::net::TcpSocket;

/// The sockets holding the handed-out ports, kept until the process exits.
static HELD: Mutex<Vec<TcpSocket>> = Mutex::new(Vec::new());

fn hold(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    let s = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    Ok(s)
}

/// A loopback port no one else will be given while this process runs; servers bind it on
/// 127.0.0.1 or ::1.
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let v4 = hold(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("a loopback port");
        let port = v4.local_addr().unwrap().port();
        let mut held = vec![v4];
        match hold(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) {
            Ok(v6) => held.push(v6),
            // Taken on ::1 by someone else: try another port.
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            // No IPv6 on this machine: nothing can listen on ::1 either.
            Err(_) => {}
        }
        HELD.lock().unwrap_or_else(|e| e.into_inner()).extend(held);
        return port;
    }
    panic!("no loopback port free on both 127.0.0.1 and ::1");
}
