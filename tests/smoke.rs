mod common;

#[test]
fn base_endpoint_answers_with_api_version() {
    let b = common::Berth::start("[[namespace]]\nprefix = \"team\"\n");
    let r = reqwest::blocking::get(format!("{}/v2/", b.url())).unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-distribution-api-version"], "registry/2.0");
}

/// A port from `free_port` stays bound until the test process exits, so the kernel hands it to
/// no other `bind(:0)` (another test's, another test binary's), while the server it is meant
/// for binds it with `SO_REUSEADDR`, as berth does, and can again after a restart.
#[test]
fn free_ports_stay_held_for_their_server() {
    use std::io::ErrorKind;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
    let port = common::free_port();
    // Binding without SO_REUSEADDR is refused: something holds the port.
    let plain = tokio::net::TcpSocket::new_v4().unwrap();
    assert_eq!(plain.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).unwrap_err().kind(), ErrorKind::AddrInUse);
    if let Ok(plain6) = tokio::net::TcpSocket::new_v6() {
        match plain6.bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) {
            Err(e) => assert!(matches!(e.kind(), ErrorKind::AddrInUse | ErrorKind::AddrNotAvailable), "{e}"),
            Ok(()) => panic!("[::1]:{port} was not held"),
        }
    }
    for _ in 0..2000 {
        assert_ne!(TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port(), port);
    }
    for _ in 0..2 {
        let server = TcpListener::bind(("127.0.0.1", port)).unwrap();
        drop(TcpStream::connect(("127.0.0.1", port)).unwrap());
        drop(server);
    }
}
