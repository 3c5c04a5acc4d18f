//! The admin listener, the metrics berth exports and the shipped Grafana dashboard, access logs
//! in both formats, and secrets kept out of every log line and Debug print.

mod common;
mod support;

use common::{require, Berth};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{metrics, sample};

const HOSTED: &str = "[[namespace]]\nprefix = \"team\"\n";

/// An upstream that is never contacted (nothing is pulled through it): it only makes berth
/// export its per-upstream series.
const IDLE_UPSTREAM: &str = "[[upstream]]\nname = \"registry.example\"\nurl = \"http://127.0.0.1:9\"\n";

#[test]
fn admin_endpoints_answer() {
    let b = Berth::start(HOSTED);
    assert_eq!(support::admin_status(&b, "/healthz"), Some(200));
    assert_eq!(support::admin_status(&b, "/readyz"), Some(200));
    assert_eq!(support::admin_status(&b, "/nope"), Some(404));
    let r = reqwest::blocking::get(format!("{}/metrics", b.admin_url())).unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let m = r.text().unwrap();
    assert_eq!(sample(&m, &format!("berth_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"))), Some(1.0), "{m}");
    // The admin listener keeps connections alive for scrapers.
    let c = reqwest::blocking::Client::new();
    for _ in 0..3 {
        assert_eq!(c.get(format!("{}/healthz", b.admin_url())).send().unwrap().status(), 200);
    }
}

/// Every `berth_...` name the dashboard's queries use, exactly as written (with any
/// `_bucket`/`_sum`/`_count` suffix).
fn dashboard_metric_names(d: &serde_json::Value) -> BTreeSet<String> {
    fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                        ("query", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => exprs(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    exprs(d, &mut all);
    let mut names = BTreeSet::new();
    for e in all {
        let bytes = e.as_bytes();
        let mut i = 0;
        while let Some(pos) = e[i..].find("berth_") {
            let start = i + pos;
            let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            let end = start + e[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(e.len() - start);
            if boundary {
                names.insert(e[start..end].to_string());
            }
            i = end;
        }
    }
    names
}

fn dashboard() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(common::repo_root().join("dashboards/berth.json")).unwrap()).unwrap()
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let d = dashboard();
    let names = dashboard_metric_names(&d);
    assert!(names.len() >= 12, "too few metrics found in the dashboard: {names:?}");
    let b = Berth::start(&format!("{HOSTED}{IDLE_UPSTREAM}"));
    let m = metrics(&b);
    let exported: BTreeSet<&str> =
        m.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).map(|l| l.split(['{', ' ']).next().unwrap()).collect();
    let missing: Vec<&String> =
        names.iter().filter(|n| !exported.contains(n.as_str()) && !ABSENT_UNTIL_KNOWN.contains(&n.as_str())).collect();
    assert!(missing.is_empty(), "the dashboard queries metrics berth does not export: {missing:?}\n/metrics:\n{m}");
}

#[test]
fn dashboard_is_importable_and_complete() {
    let d = dashboard();
    assert_eq!(d["uid"], "berth-overview", "a fixed uid keeps links and provisioning stable");
    let vars = d["templating"]["list"].as_array().unwrap();
    let ds = vars.iter().find(|v| v["type"] == "datasource").expect("a datasource variable");
    assert_eq!(ds["query"], "prometheus");
    let ds_ref = format!("${{{}}}", ds["name"].as_str().unwrap());
    let panels: Vec<&serde_json::Value> = d["panels"].as_array().unwrap().iter().filter(|p| p["type"] != "row").collect();
    let mut ids = BTreeSet::new();
    for p in &panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id in {}", p["title"]);
        assert_eq!(p["datasource"]["uid"], ds_ref.as_str(), "panel {} must use the datasource variable", p["title"]);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let e = t["expr"].as_str().unwrap();
            assert_eq!(e.matches('(').count(), e.matches(')').count(), "unbalanced ( in {e}");
            assert_eq!(e.matches('{').count(), e.matches('}').count(), "unbalanced {{ in {e}");
        }
    }
    let queries: Vec<String> =
        panels.iter().flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_string())).collect();
    let uses = |needle: &str| queries.iter().any(|q| q.contains(needle));
    // What the dashboard must show, by the metric (and detail) each needs.
    for (what, needle) in [
        ("request rate by code", "sum by (code) (rate(berth_http_requests_total"),
        ("p50 latency", "histogram_quantile(0.50, sum by (le) (rate(berth_http_request_duration_seconds_bucket"),
        ("p95 latency", "histogram_quantile(0.95, sum by (le) (rate(berth_http_request_duration_seconds_bucket"),
        ("p99 latency", "histogram_quantile(0.99, sum by (le) (rate(berth_http_request_duration_seconds_bucket"),
        ("cache hit ratio", "berth_cache_requests_total{instance=~\"$instance\",result=~\"hit|coalesced\"}"),
        ("bytes served", "berth_served_bytes_total"),
        ("bytes fetched upstream", "berth_upstream_bytes_total"),
        ("fills in flight", "berth_fills_in_flight"),
        ("digest mismatches", "berth_digest_mismatch_total"),
        ("upstream errors", "berth_upstream_requests_total{instance=~\"$instance\",code!~"),
        ("upstream 429s", "code=\"429\""),
        ("rate-limit remaining", "berth_upstream_ratelimit_remaining"),
        ("store size by class", "sum by (class) (berth_store_bytes"),
        ("pulls spent", "berth_upstream_pulls_spent_total"),
        ("pulls saved", "berth_upstream_pulls_saved_total"),
        ("upstream circuit", "berth_upstream_state"),
        ("live cluster members", "berth_cluster_members"),
        ("maintenance lease holder", "berth_cluster_lease_held"),
        ("owner forwards", "berth_cluster_forwards_total"),
        ("peer bytes", "berth_cluster_peer_bytes_total"),
    ] {
        assert!(uses(needle), "the dashboard lacks {what} ({needle})");
    }
}

fn upload_start(b: &Berth, repo: &str) -> String {
    let r = reqwest::blocking::Client::new().post(format!("{}/v2/{repo}/blobs/uploads/", b.url())).send().unwrap();
    assert_eq!(r.status(), 202);
    r.headers()["location"].to_str().unwrap().to_string()
}

#[test]
fn hosted_traffic_moves_the_metrics() {
    let b = Berth::start(HOSTED);
    let before = metrics(&b);
    let served = |m: &str| sample(m, "berth_served_bytes_total{source=\"hosted\"}").unwrap_or(0.0);
    let gets = |m: &str| sample(m, "berth_http_requests_total{code=\"200\",method=\"GET\",route=\"blob\"}").unwrap_or(0.0);
    assert_eq!(sample(&before, "berth_uploads_in_progress"), Some(0.0), "{before}");

    let data: Vec<u8> = (0..123_457u32).map(|i| (i * 7 % 256) as u8).collect();
    let d = support::push_blob(&b.url(), "team/metrics", &data);
    let got = reqwest::blocking::get(format!("{}/v2/team/metrics/blobs/{d}", b.url())).unwrap().bytes().unwrap();
    assert_eq!(got.len(), data.len());
    let _open = upload_start(&b, "team/metrics");

    let after = metrics(&b);
    assert_eq!(served(&after) - served(&before), data.len() as f64, "{after}");
    assert_eq!(gets(&after) - gets(&before), 1.0, "{after}");
    assert_eq!(sample(&after, "berth_uploads_in_progress"), Some(1.0), "{after}");
    assert!(after.contains("berth_http_request_duration_seconds_bucket{route=\"blob\""), "{after}");
    // Store size is measured by walking the store, at most every few seconds.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = metrics(&b);
        let hosted = sample(&m, "berth_store_bytes{class=\"hosted\"}").unwrap_or(0.0);
        if hosted >= data.len() as f64 {
            assert_eq!(sample(&m, "berth_store_bytes{class=\"cache\"}"), Some(0.0), "{m}");
            break;
        }
        assert!(Instant::now() < deadline, "berth_store_bytes{{class=\"hosted\"}} stayed at {hosted}:\n{m}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn no_repository_tag_or_digest_becomes_a_label() {
    let b = Berth::start(HOSTED);
    let data = b"label check".to_vec();
    let d = support::push_blob(&b.url(), "team/label-probe", &data);
    let _ = reqwest::blocking::get(format!("{}/v2/team/label-probe/manifests/sometag", b.url())).unwrap();
    let m = metrics(&b);
    for needle in ["label-probe", "sometag", &d[7..]] {
        assert!(!m.contains(needle), "{needle} appears in /metrics");
    }
}

fn access_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("access")).collect()
}

/// The log once `done` holds for it. An access line is written after its response, so a
/// client can see the answer a moment before the line exists.
fn log_when(b: &Berth, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = b.log();
        if done(&log) || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn text_access_log_has_one_line_per_request() {
    let b = Berth::start(HOSTED);
    let c = reqwest::blocking::Client::new();
    for _ in 0..3 {
        c.get(format!("{}/v2/team/app/manifests/v1", b.url())).send().unwrap();
    }
    let log = log_when(&b, |log| access_lines(log).iter().filter(|l| l.contains("team/app")).count() >= 3);
    let lines: Vec<&str> = access_lines(&log).into_iter().filter(|l| l.contains("team/app")).collect();
    assert_eq!(lines.len(), 3, "{log}");
    for l in lines {
        for field in [
            "access",
            "method=GET",
            "route=\"manifest\"",
            "repository=\"team/app\"",
            "status=404",
            "bytes=",
            "duration_ms=",
            "cache=",
            "upstream=",
        ] {
            assert!(l.contains(field), "{field} missing from {l}");
        }
        assert!(!l.trim_start().starts_with('{'), "text is the default format: {l}");
        assert!(!l.contains('\x1b'), "no terminal colour codes in a log file: {l:?}");
    }
}

fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
        .collect()
}

fn check_json_access(b: &Berth) {
    let log = &log_when(b, |log| log.matches("\"target\":\"access\"").count() >= 2);
    let lines = json_lines(log);
    let access: Vec<&serde_json::Value> =
        lines.iter().filter(|v| v["target"] == "access" && v["fields"]["repository"] == "team/app").collect();
    assert_eq!(access.len(), 2, "{log}");
    for v in access {
        let f = &v["fields"];
        assert_eq!(f["method"], "GET");
        assert_eq!(f["route"], "manifest");
        assert_eq!(f["status"], 404);
        assert!(f["bytes"].is_u64() && f["duration_ms"].is_f64(), "{v}");
        assert!(f.get("cache").is_some() && f.get("upstream").is_some(), "{v}");
    }
}

#[test]
fn json_logs_by_config_key() {
    let b = Berth::start(&format!("{HOSTED}[log]\nformat = \"json\"\n"));
    let c = reqwest::blocking::Client::new();
    for _ in 0..2 {
        c.get(format!("{}/v2/team/app/manifests/v1", b.url())).send().unwrap();
    }
    check_json_access(&b);
}

#[test]
fn json_logs_by_flag() {
    let dir = tempfile::tempdir().unwrap();
    let (config_path, port, admin_port) = Berth::write_config(dir.path(), "", "", HOSTED);
    let log_path = dir.path().join("berth.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["serve", "--log-json", "--config"])
        .arg(&config_path)
        .stderr(log)
        .spawn()
        .unwrap();
    let b = Berth { child: Some(child), port, admin_port, config_path, log_path, dir };
    assert!(common::wait_for_port(format!("127.0.0.1:{port}").parse().unwrap(), Duration::from_secs(20)));
    let c = reqwest::blocking::Client::new();
    for _ in 0..2 {
        c.get(format!("{}/v2/team/app/manifests/v1", b.url())).send().unwrap();
    }
    check_json_access(&b);
}

/// An upstream that wants a bearer token, handed out only for the right basic credentials.
struct TokenUpstream {
    port: u16,
    token_grants: Arc<AtomicUsize>,
    bearer_uses: Arc<AtomicUsize>,
}

impl TokenUpstream {
    fn start(user: &str, password: &str, token: &str) -> TokenUpstream {
        use base64::Engine;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")));
        let bearer = format!("Bearer {token}");
        let token = token.to_string();
        let token_grants = Arc::new(AtomicUsize::new(0));
        let bearer_uses = Arc::new(AtomicUsize::new(0));
        let (grants, uses) = (token_grants.clone(), bearer_uses.clone());
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                let (basic, bearer, token, grants, uses) = (basic.clone(), bearer.clone(), token.clone(), grants.clone(), uses.clone());
                std::thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut r = BufReader::new(s.try_clone().unwrap());
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                        let mut auth = String::new();
                        let mut len = 0usize;
                        loop {
                            let mut h = String::new();
                            if r.read_line(&mut h).unwrap_or(0) == 0 {
                                return;
                            }
                            let h = h.trim_end();
                            if h.is_empty() {
                                break;
                            }
                            let (k, v) = h.split_once(':').unwrap_or((h, ""));
                            match k.to_ascii_lowercase().as_str() {
                                "authorization" => auth = v.trim().to_string(),
                                "content-length" => len = v.trim().parse().unwrap_or(0),
                                _ => {}
                            }
                        }
                        let mut body = vec![0; len];
                        let _ = r.read_exact(&mut body);
                        let challenge = format!("Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"fake\"");
                        let (status, extra, body) = if path.starts_with("/token") {
                            if auth == basic {
                                grants.fetch_add(1, Ordering::SeqCst);
                                (200, String::new(), format!("{{\"token\":\"{token}\",\"expires_in\":300}}"))
                            } else {
                                (401, String::new(), "{}".to_string())
                            }
                        } else if auth == bearer {
                            uses.fetch_add(1, Ordering::SeqCst);
                            (404, String::new(), r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no such manifest"}]}"#.to_string())
                        } else {
                            (401, format!("WWW-Authenticate: {challenge}\r\n"), r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#.to_string())
                        };
                        let reason = if status == 200 { "OK" } else { "Error" };
                        let resp = format!(
                            "HTTP/1.1 {status} {reason}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(resp.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        TokenUpstream { port, token_grants, bearer_uses }
    }
}

#[test]
fn secrets_never_reach_logs_or_debug_output() {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let password = "pw-Sekr1t-upstream-7f3a";
    let token = "tok-Sekr1t-bearer-91c2";
    let client_password = "pw-Sekr1t-client-44d0";
    let client_token = "tok-Sekr1t-client-5e6b";
    let up = TokenUpstream::start("berth-bot", password, token);

    let dir = tempfile::tempdir().unwrap();
    let pw_file = dir.path().join("upstream.pw");
    std::fs::write(&pw_file, format!("{password}\n")).unwrap();
    let extra = format!(
        "{HOSTED}[log]\nlevel = \"trace\"\n[[upstream]]\nname = \"private.example\"\nurl = \"http://127.0.0.1:{}\"\nusername = \"berth-bot\"\npassword_file = \"{}\"\n",
        up.port,
        pw_file.display()
    );
    let b = Berth::start_in(dir, &extra);
    let c = reqwest::blocking::Client::new();
    let r = c
        .get(format!("{}/v2/private.example/app/manifests/v1", b.url()))
        .header("Authorization", format!("Bearer {client_token}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404, "{}", r.text().unwrap_or_default());
    let _ = c
        .get(format!("{}/v2/team/app/manifests/v1", b.url()))
        .header("Authorization", format!("Basic {}", b64(&format!("ci:{client_password}"))))
        .send()
        .unwrap();
    let _ = c.get(format!("{}/v2/team/app/tags/list", b.url())).basic_auth("ci", Some(client_password)).send().unwrap();
    assert!(up.token_grants.load(Ordering::SeqCst) >= 1, "berth never asked the upstream for a token");
    assert!(up.bearer_uses.load(Ordering::SeqCst) >= 1, "berth never used the upstream token");

    let (ok, out, err) =
        support::run(std::process::Command::new(env!("CARGO_BIN_EXE_berth")).args(["check", "--config"]).arg(&b.config_path));
    assert!(ok, "{out}{err}");
    let log = log_when(&b, |log| log.matches("tags/list").count() + log.matches("route=\"tags\"").count() >= 1);
    assert!(log.lines().count() > 5, "trace logging produced almost nothing:\n{log}");
    let everything = format!("{log}\n{out}\n{err}");
    let secrets = [
        password.to_string(),
        token.to_string(),
        client_password.to_string(),
        client_token.to_string(),
        b64(&format!("berth-bot:{password}")),
        b64(&format!("ci:{client_password}")),
    ];
    for s in &secrets {
        assert!(!everything.contains(s.as_str()), "secret {s} appears in the output:\n{everything}");
    }

    // Debug prints of the loaded configuration redact the password too.
    let config = berth::config::Config::load(&b.config_path).unwrap();
    let debug = format!("{config:?} {config:#?}");
    assert!(debug.contains("berth-bot"), "the config was not loaded with the credentials");
    assert!(!debug.contains(password), "{debug}");
}

#[test]
fn store_walk_ignores_partial_files() {
    // A temp file mid-write is not content: only published blobs count as stored bytes.
    let dir = tempfile::tempdir().unwrap();
    let b = Berth::start_in(dir, HOSTED);
    std::fs::write(b.data_dir().join("tmp/partial"), vec![0u8; 4096]).unwrap();
    let m = metrics(&b);
    assert_eq!(sample(&m, "berth_store_bytes{class=\"cache\"}"), Some(0.0), "{m}");
    assert_eq!(sample(&m, "berth_store_bytes{class=\"hosted\"}"), Some(0.0), "{m}");
}

#[test]
fn prometheus_evaluates_every_dashboard_query() {
    // The real Prometheus parses and runs each query against a scrape of berth: catches
    // PromQL syntax errors and type errors (e.g. rate() of a gauge) that a name check cannot.
    if !require("prometheus") {
        return;
    }
    let b = Berth::start(&format!("{HOSTED}{IDLE_UPSTREAM}"));
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: berth\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            b.admin_port
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let mut prom = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _kill = Kill(&mut prom);
    let c = reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let api = format!("http://127.0.0.1:{port}/api/v1/query");
    let query = |q: &str| -> serde_json::Value {
        c.get(&api).query(&[("query", q)]).send().and_then(|r| r.json()).unwrap_or(serde_json::Value::Null)
    };
    // Wait for two scrapes, so rate() has points to work with.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = query("count_over_time(berth_build_info[1m])");
        if v["data"]["result"][0]["value"][1].as_str().and_then(|s| s.parse::<f64>().ok()).is_some_and(|n| n >= 2.0) {
            break;
        }
        assert!(Instant::now() < deadline, "prometheus never scraped berth: {v}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let d = dashboard();
    let mut n = 0;
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap().replace("$__rate_interval", "1m").replace("$__range", "5m").replace("$instance", ".*");
            let v = query(&expr);
            assert_eq!(v["status"], "success", "panel {}: {expr}: {v}", p["title"]);
            n += 1;
        }
    }
    assert!(n >= 20, "only {n} queries");
    let v = query("berth_build_info");
    assert_eq!(v["data"]["result"].as_array().map(|a| a.len()), Some(1), "{v}");
}

#[test]
fn a_port_in_use_is_a_clear_start_error() {
    let a = Berth::start(HOSTED);
    let dir = tempfile::tempdir().unwrap();
    for (key, listen, admin) in [("server.listen", a.port, common::free_port()), ("server.admin_listen", common::free_port(), a.admin_port)]
    {
        let config = dir.path().join("berth.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{listen}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n[storage]\nroot = \"{}\"\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let out = common::cmd::run(
            std::process::Command::new(env!("CARGO_BIN_EXE_berth")).args(["serve", "--config"]).arg(&config),
            Duration::from_secs(60),
        );
        assert!(!out.ok, "a second berth started on a port in use");
        assert!(out.stderr.contains(key) && out.stderr.contains("cannot listen"), "{key}: {}", out.stderr);
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    }
    assert_eq!(support::admin_status(&a, "/readyz"), Some(200), "the first berth is unharmed");
}

/// Series a dashboard queries that berth leaves out until it knows a value: an upstream's
/// remaining rate limit at 0 would read as "no pulls left" before the upstream said anything.
const ABSENT_UNTIL_KNOWN: [&str; 1] = ["berth_upstream_ratelimit_remaining"];

#[test]
fn every_upstream_has_its_series_at_zero_from_the_start() {
    let second = "[[upstream]]\nname = \"mirror.example\"\nurl = \"http://127.0.0.1:9\"\n";
    let b = Berth::start(&format!("{HOSTED}{IDLE_UPSTREAM}{second}"));
    let m = metrics(&b);
    for u in ["registry.example", "mirror.example"] {
        for series in [
            format!("berth_upstream_bytes_total{{upstream=\"{u}\"}}"),
            format!("berth_stale_served_total{{upstream=\"{u}\"}}"),
            format!("berth_upstream_request_duration_seconds_count{{upstream=\"{u}\"}}"),
            // Success, the rate-limit panel's 429 and the error panel's failures without a status.
            format!("berth_upstream_requests_total{{code=\"200\",upstream=\"{u}\"}}"),
            format!("berth_upstream_requests_total{{code=\"429\",upstream=\"{u}\"}}"),
            format!("berth_upstream_requests_total{{code=\"timeout\",upstream=\"{u}\"}}"),
            format!("berth_upstream_requests_total{{code=\"error\",upstream=\"{u}\"}}"),
        ] {
            assert_eq!(sample(&m, &series), Some(0.0), "{series}\n/metrics:\n{m}");
        }
    }
    for name in ABSENT_UNTIL_KNOWN {
        assert!(!m.lines().any(|l| l.starts_with(name)), "{name} is exported before any upstream announced it:\n{m}");
    }
}
