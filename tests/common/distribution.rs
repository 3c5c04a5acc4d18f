//! Fake upstream registries built from CNCF distribution 2.8 (`docker-registry`), on loopback
//! free ports with temp storage: plain, with token auth (a token server here signs RS256 JWTs
//! carrying the cert in `x5c`, as Docker Hub's auth service does), with htpasswd, with the
//! `redirect` storage middleware answering blob GETs with a 307 to a static file server here
//! (as Docker Hub redirects to its CDN), or in proxy mode (the peer in benches). Every server
//! counts what it was asked: the registry through its access log, the token and file servers
//! themselves. Uses only crates and the sibling `cmd.rs` and `ports.rs`, so benches can include
//! them with `#[path]`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const REGISTRY_BIN: &str = "docker-registry";

use super::ports::free_port;

// ---- a tiny threaded HTTP/1.1 server (one request per connection) ----

pub struct HttpReq {
    pub method: String,
    /// Path and query as sent.
    pub target: String,
    pub headers: Vec<(String, String)>,
}

impl HttpReq {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
    pub fn query_all(&self, key: &str) -> Vec<String> {
        let q = self.target.split_once('?').map(|(_, q)| q).unwrap_or("");
        url::form_urlencoded::parse(q.as_bytes()).filter(|(k, _)| k == key).map(|(_, v)| v.into_owned()).collect()
    }
}

pub enum HttpBody {
    Bytes(Vec<u8>),
    File(PathBuf),
}

pub struct HttpResp {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: HttpBody,
}

impl HttpResp {
    pub fn json(status: u16, v: serde_json::Value) -> HttpResp {
        HttpResp::bytes(status, "application/json", serde_json::to_vec(&v).unwrap())
    }
    pub fn bytes(status: u16, content_type: &'static str, body: Vec<u8>) -> HttpResp {
        HttpResp { status, content_type, headers: Vec::new(), body: HttpBody::Bytes(body) }
    }
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> HttpResp {
        self.headers.push((name, value.into()));
        self
    }
}

type Handler = Arc<dyn Fn(&HttpReq) -> HttpResp + Send + Sync>;

pub struct HttpServer {
    pub port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    pub fn start(handler: Handler) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let h = handler.clone();
                std::thread::spawn(move || {
                    let _ = serve_one(conn, &*h);
                });
            }
        });
        HttpServer { port, stop, thread: Some(thread) }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(conn: TcpStream, handler: &(dyn Fn(&HttpReq) -> HttpResp + Send + Sync)) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else { return Ok(()) };
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let req = HttpReq { method: method.to_string(), target: target.to_string(), headers };
    let resp = handler(&req);
    let mut out = conn;
    let (len, file) = match &resp.body {
        HttpBody::Bytes(b) => (b.len() as u64, None),
        HttpBody::File(p) => match std::fs::File::open(p) {
            Ok(f) => (f.metadata()?.len(), Some(f)),
            Err(_) => {
                write!(out, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
                return Ok(());
            }
        },
    };
    let mut head =
        format!("HTTP/1.1 {} X\r\nContent-Type: {}\r\nContent-Length: {len}\r\nConnection: close\r\n", resp.status, resp.content_type);
    for (k, v) in &resp.headers {
        head += &format!("{k}: {v}\r\n");
    }
    out.write_all(format!("{head}\r\n").as_bytes())?;
    if req.method != "HEAD" {
        match (resp.body, file) {
            (HttpBody::Bytes(b), _) => out.write_all(&b)?,
            (HttpBody::File(_), Some(mut f)) => {
                std::io::copy(&mut f, &mut out)?;
            }
            _ => {}
        }
    }
    out.flush()
}

// ---- token server ----

pub const TOKEN_ISSUER: &str = "berth-test-token-issuer";

/// Issues a token for whatever scope is asked (anonymous or not), signed with a fresh
/// self-signed RSA key whose cert the registry trusts, and counts the requests.
pub struct TokenServer {
    server: HttpServer,
    pub requests: Arc<AtomicUsize>,
    pub scopes: Arc<Mutex<Vec<String>>>,
    pub cert_path: PathBuf,
}

impl TokenServer {
    pub fn start(dir: &Path) -> TokenServer {
        let key_path = dir.join("token.key");
        let cert_path = dir.join("token.crt");
        let out = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=berth-test-token", "-keyout"])
            .arg(&key_path)
            .arg("-out")
            .arg(&cert_path)
            .output()
            .expect("openssl runs");
        assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(&key_path).unwrap()).expect("rsa key");
        let cert = pem::parse(std::fs::read(&cert_path).unwrap()).expect("cert pem");
        use base64::Engine;
        let x5c = base64::engine::general_purpose::STANDARD.encode(cert.contents());
        let requests = Arc::new(AtomicUsize::new(0));
        let scopes = Arc::new(Mutex::new(Vec::new()));
        let (r2, s2) = (requests.clone(), scopes.clone());
        let serial = AtomicUsize::new(0);
        let handler: Handler = Arc::new(move |req: &HttpReq| {
            r2.fetch_add(1, Ordering::SeqCst);
            let service = req.query_all("service").pop().unwrap_or_default();
            let mut access = Vec::new();
            for scope in req.query_all("scope") {
                s2.lock().unwrap().push(scope.clone());
                // repository:<name>:<actions>; the name may not contain ':' but may contain '/'.
                let mut it = scope.splitn(3, ':');
                if let (Some(t), Some(name), Some(actions)) = (it.next(), it.next(), it.next()) {
                    access.push(serde_json::json!({"type": t, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}));
                }
            }
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
            let claims = serde_json::json!({
                "iss": TOKEN_ISSUER, "sub": "test", "aud": service,
                "exp": now + 300, "nbf": now - 10, "iat": now,
                "jti": format!("{now}-{}", serial.fetch_add(1, Ordering::SeqCst)),
                "access": access,
            });
            let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
            header.x5c = Some(vec![x5c.clone()]);
            let token = jsonwebtoken::encode(&header, &claims, &key).expect("token signs");
            HttpResp::json(200, serde_json::json!({"token": token, "access_token": token, "expires_in": 300}))
        });
        TokenServer { server: HttpServer::start(handler), requests, scopes, cert_path }
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.server.port)
    }
    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

// ---- static files (the "CDN" a redirecting registry points at) ----

pub struct StaticFiles {
    server: HttpServer,
    pub root: PathBuf,
    /// "METHOD path" of every request.
    pub log: Arc<Mutex<Vec<String>>>,
    /// Requests that carried an `Authorization` header (credentials meant for the registry).
    pub with_auth: Arc<AtomicUsize>,
}

impl StaticFiles {
    pub fn start(root: &Path) -> StaticFiles {
        let log = Arc::new(Mutex::new(Vec::new()));
        let with_auth = Arc::new(AtomicUsize::new(0));
        let (l2, a2, root2) = (log.clone(), with_auth.clone(), root.to_path_buf());
        let handler: Handler = Arc::new(move |req: &HttpReq| {
            l2.lock().unwrap().push(format!("{} {}", req.method, req.path()));
            if req.headers.iter().any(|(k, _)| k == "authorization") {
                a2.fetch_add(1, Ordering::SeqCst);
            }
            let rel = req.path().trim_start_matches('/');
            if rel.split('/').any(|c| c == "..") {
                return HttpResp::bytes(400, "text/plain", Vec::new());
            }
            HttpResp { status: 200, content_type: "application/octet-stream", headers: Vec::new(), body: HttpBody::File(root2.join(rel)) }
        });
        StaticFiles { server: HttpServer::start(handler), root: root.to_path_buf(), log, with_auth }
    }
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.server.port)
    }
    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
    /// GETs of the blob with this digest (the redirect target path ends in `<hex>/data`).
    pub fn blob_gets(&self, digest: &str) -> usize {
        let hex = digest.trim_start_matches("sha256:");
        self.requests().iter().filter(|r| r.starts_with("GET ") && r.ends_with(&format!("/{hex}/data"))).count()
    }
}

// ---- the registry ----

#[derive(Default)]
pub struct Options {
    pub token: bool,
    /// (user, password) for `auth.htpasswd`.
    pub htpasswd: Option<(String, String)>,
    /// Blob GETs answer 307 to a [`StaticFiles`] server over the storage directory.
    pub redirect: bool,
    /// Pull-through proxy of this URL (`proxy.remoteurl`).
    pub proxy: Option<String>,
    /// `storage: s3` on this bucket instead of the filesystem: (endpoint, bucket, region,
    /// access key, secret key, root directory inside the bucket).
    pub s3: Option<[String; 6]>,
    /// Listen here (a registry started again where clients expect it); a free port otherwise.
    pub port: Option<u16>,
    /// A benchmark's stand-in for a registry on another machine, which must not take what is
    /// measured from it: run at nice 19 with its storage in memory (/dev/shm), so it neither
    /// takes the CPU nor puts writes ahead of the measured process's syncs on the same disk.
    pub remote: bool,
}

/// One line of the registry's access log.
#[derive(Debug, Clone)]
pub struct Access {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub bytes: u64,
    pub user: String,
}

pub struct Registry {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub token: Option<TokenServer>,
    pub files: Option<StaticFiles>,
    pub creds: Option<(String, String)>,
    access_log: PathBuf,
    error_log: PathBuf,
}

impl Registry {
    pub fn start(opts: Options) -> Registry {
        let dir = if opts.remote { tempfile::tempdir_in("/dev/shm").unwrap() } else { tempfile::tempdir().unwrap() };
        let port = opts.port.unwrap_or_else(free_port);
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let mut extra = String::new();
        let token = opts.token.then(|| TokenServer::start(dir.path()));
        if let Some(t) = &token {
            extra += &format!(
                "auth:\n  token:\n    realm: {}\n    service: fake-registry\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                t.realm(),
                t.cert_path.display()
            );
        }
        if let Some((user, pass)) = &opts.htpasswd {
            // Cost 4: the registry checks the hash on every request.
            let hash = bcrypt::hash(pass, 4).unwrap();
            let path = dir.path().join("htpasswd");
            std::fs::write(&path, format!("{user}:{hash}\n")).unwrap();
            extra += &format!("auth:\n  htpasswd:\n    realm: fake-registry\n    path: {}\n", path.display());
        }
        let files = opts.redirect.then(|| StaticFiles::start(&storage));
        if let Some(f) = &files {
            extra += &format!("middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: {}\n", f.base_url());
        }
        if let Some(remote) = &opts.proxy {
            extra += &format!("proxy:\n  remoteurl: {remote}\n");
        }
        let backend = match &opts.s3 {
            None => format!("filesystem:\n    rootdirectory: {}", storage.display()),
            Some([endpoint, bucket, region, ak, sk, root]) => format!(
                "s3:\n    regionendpoint: {endpoint}\n    bucket: {bucket}\n    region: {region}\n    accesskey: {ak}\n    secretkey: {sk}\n    rootdirectory: /{root}\n    secure: false\n    v4auth: true\n    forcepathstyle: true"
            ),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\nstorage:\n  {backend}\n  cache:\n    blobdescriptor: inmemory\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: berth-test-secret\n{extra}"
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let access_log = dir.path().join("access.log");
        let error_log = dir.path().join("registry.log");
        let mut cmd = if opts.remote {
            let mut c = Command::new("nice");
            c.arg("-n").arg("19").arg(REGISTRY_BIN);
            c
        } else {
            Command::new(REGISTRY_BIN)
        };
        let child = cmd
            .arg("serve")
            .arg(&config_path)
            // The registry reads REGISTRY_* overrides from the environment; none may leak in.
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&access_log).unwrap())
            .stderr(std::fs::File::create(&error_log).unwrap())
            .spawn()
            .expect("docker-registry starts");
        let mut r = Registry { port, dir, child: Some(child), token, files, creds: opts.htpasswd, access_log, error_log };
        r.wait_ready();
        r
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(s) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("docker-registry exited with {s}:\n{}", self.error_log_text());
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = write!(s, "GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut buf = [0u8; 12];
                if s.read_exact(&mut buf).is_ok() && (buf.ends_with(b"200") || buf.ends_with(b"401")) {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("docker-registry did not become ready:\n{}", self.error_log_text());
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }
    pub fn error_log_text(&self) -> String {
        std::fs::read_to_string(&self.error_log).unwrap_or_default()
    }

    /// Every request the registry has finished, oldest first.
    /// The requests since the first `before`, once none has finished for a second (bounded):
    /// counting right after the clients return would miss requests still being logged.
    pub fn settle(&self, before: usize) -> Vec<Access> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let mut last = self.access().len();
        let mut quiet_since = std::time::Instant::now();
        while std::time::Instant::now() < deadline && quiet_since.elapsed() < std::time::Duration::from_secs(1) {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let now = self.access().len();
            if now != last {
                last = now;
                quiet_since = std::time::Instant::now();
            }
        }
        self.access().into_iter().skip(before).collect()
    }

    pub fn access(&self) -> Vec<Access> {
        std::fs::read_to_string(&self.access_log).unwrap_or_default().lines().filter_map(parse_access).collect()
    }

    /// Requests with this method whose path ends with `suffix`.
    pub fn count(&self, method: &str, suffix: &str) -> usize {
        self.access().iter().filter(|a| a.method == method && a.path.ends_with(suffix)).count()
    }

    /// Pushes an OCI layout into this registry with skopeo (`--all`: every platform).
    pub fn push(&self, layout_ref: &str, repo_tag: &str) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--all", "--dest-tls-verify=false", "--retry-times=0"]);
        if let Some((u, p)) = &self.creds {
            cmd.arg(format!("--dest-creds={u}:{p}"));
        }
        cmd.arg(layout_ref).arg(format!("docker://{}/{repo_tag}", self.host()));
        super::cmd::run(&mut cmd, Duration::from_secs(120)).expect_ok();
    }

    /// Tags the manifest `repo:from` also as `repo:to`, through the registry's API.
    pub fn retag(&self, repo: &str, from: &str, to: &str) {
        let c = reqwest::blocking::Client::new();
        let auth = |r: reqwest::blocking::RequestBuilder| match &self.creds {
            Some((u, p)) => r.basic_auth(u, Some(p)),
            None => r,
        };
        let accept = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json";
        let r = auth(c.get(format!("{}/v2/{repo}/manifests/{from}", self.url())).header("Accept", accept)).send().unwrap();
        assert_eq!(r.status(), 200, "GET {repo}:{from}");
        let media_type = r.headers()["content-type"].clone();
        let bytes = r.bytes().unwrap();
        let r =
            auth(c.put(format!("{}/v2/{repo}/manifests/{to}", self.url())).header("Content-Type", media_type).body(bytes)).send().unwrap();
        assert_eq!(r.status(), 201, "PUT {repo}:{to}");
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `127.0.0.1 - user [date] "GET /v2/x HTTP/1.1" 200 1234 "referer" "agent"`
fn parse_access(line: &str) -> Option<Access> {
    let mut head = line.split_whitespace();
    let _ip = head.next()?;
    let _ident = head.next()?;
    let user = head.next()?.to_string();
    let (_, rest) = line.split_once('"')?;
    let (request, rest) = rest.split_once('"')?;
    let mut req = request.split_whitespace();
    let method = req.next()?.to_string();
    let path = req.next()?.to_string();
    let mut tail = rest.split_whitespace();
    let status = tail.next()?.parse().ok()?;
    let bytes = tail.next()?.parse().unwrap_or(0);
    Some(Access { method, path, status, bytes, user })
}

/// Pushes a blob to any registry with POST then PUT (the flow distribution accepts), for
/// seeding upstreams and peers alike.
pub fn push_blob(base: &str, repo: &str, digest: &str, blob: Vec<u8>) {
    let c = reqwest::blocking::Client::builder().timeout(std::time::Duration::from_secs(120)).build().unwrap();
    let r = c.post(format!("{base}/v2/{repo}/blobs/uploads/")).send().unwrap();
    assert_eq!(r.status(), 202, "upload start");
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let loc = if loc.starts_with("http") { loc } else { format!("{base}{loc}") };
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = c.put(format!("{loc}{sep}digest={digest}")).body(blob).send().unwrap();
    assert_eq!(r.status(), 201, "upload commit");
}
