//! Access control over the TLS listener: the token realm a client is sent to keeps its scheme,
//! and the login flow works over h2.

mod common;
mod support;

use common::free_port;
use reqwest::StatusCode;
use support::TestCa;

#[test]
fn challenges_over_tls_point_at_an_https_realm() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = TestCa::new().write(&dir.path().join("tls"));
    let ht = dir.path().join("htpasswd");
    std::fs::write(&ht, format!("ci:{}\n", bcrypt::hash("ci-secret", 4).unwrap())).unwrap();
    let tls_port = free_port();
    let server = format!("tls_listen = \"127.0.0.1:{tls_port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n", cert.display(), key.display());
    let b = support::start(dir, &server, &format!("[auth]\nhtpasswd = \"{}\"\n[[namespace]]\nprefix = \"team\"\n", ht.display()));
    let ca_path = ca;
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&ca_path).unwrap()).unwrap();
    let c = reqwest::blocking::Client::builder().add_root_certificate(ca).no_proxy().build().unwrap();
    let base = format!("https://127.0.0.1:{tls_port}");

    let r = c.get(format!("{base}/v2/")).send().unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_string();
    let realm = format!("https://127.0.0.1:{tls_port}/token");
    assert!(challenge.starts_with(&format!("Bearer realm=\"{realm}\"")), "{challenge}");
    // The plain listener keeps announcing its own scheme.
    let r = c.get(format!("{}/v2/", b.url())).send().unwrap();
    assert!(r.headers()["www-authenticate"].to_str().unwrap().starts_with(&format!("Bearer realm=\"http://{}/token\"", b.host())));

    // Over h2 the host arrives as :authority, not a Host header; curl negotiates h2 by ALPN.
    if common::require("curl") {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--http2", "--max-time", "20", "-o", "/dev/null", "-D", "-", "--cacert"])
            .arg(&ca_path)
            .arg(format!("{base}/v2/"))
            .output()
            .unwrap();
        let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
        assert!(head.starts_with("http/2 401"), "{head}");
        assert!(head.contains(&format!("www-authenticate: bearer realm=\"{realm}\"")), "{head}");
    }

    let v: serde_json::Value =
        c.get(&realm).query(&[("service", "berth")]).basic_auth("ci", Some("ci-secret")).send().unwrap().json().unwrap();
    let token = v["token"].as_str().unwrap();
    assert_eq!(c.get(format!("{base}/v2/")).bearer_auth(token).send().unwrap().status(), StatusCode::OK);
}
