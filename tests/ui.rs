//! The web UI against the real berth binary: pages read over HTTP, and a real headless
//! Chromium clicking through them (skipped without chromium and chromedriver, unless
//! BERTH_REQUIRE_CLIENTS=1).

mod common;

use common::browser::Browser;
use common::fake::Fake;
use common::{digest, Berth};
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde_json::{json, Value};
use std::time::Duration;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

const USERS: [(&str, &str); 2] = [("alice", "alice-secret"), ("bob", "bob-secret")];

/// public: anyone pulls. team: any user pulls, alice pushes. secret: alice only.
const RULES: &str = r#"
[[namespace]]
prefix = "public"
pull = ["anonymous"]
push = ["alice"]

[[namespace]]
prefix = "team"
pull = ["authenticated"]
push = ["alice"]

[[namespace]]
prefix = "secret"
pull = ["alice"]
push = ["alice"]
"#;

fn client() -> Client {
    Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).timeout(Duration::from_secs(30)).build().unwrap()
}

fn start_with_auth() -> Berth {
    start_with_auth_and("")
}

fn start_with_auth_and(extra: &str) -> Berth {
    let dir = tempfile::tempdir().unwrap();
    let ht = dir.path().join("htpasswd");
    // Cost 4 keeps the suite fast; berth accepts any bcrypt cost.
    let text: String = USERS.iter().map(|(u, pw)| format!("{u}:{}\n", bcrypt::hash(pw, 4).unwrap())).collect();
    std::fs::write(&ht, text).unwrap();
    Berth::start_in(dir, &format!("[auth]\nhtpasswd = \"{}\"\n{RULES}\n{extra}", ht.display()))
}

/// Pushes over the plain API, as `user` when given.
struct Pusher<'a> {
    b: &'a Berth,
    c: Client,
    user: Option<(&'static str, &'static str)>,
}

impl Pusher<'_> {
    fn auth(&self, r: RequestBuilder) -> RequestBuilder {
        match self.user {
            Some((u, p)) => r.basic_auth(u, Some(p)),
            None => r,
        }
    }

    fn blob(&self, repo: &str, data: &[u8]) -> Value {
        let d = digest(data);
        let r = self.auth(self.c.post(format!("{}/v2/{repo}/blobs/uploads/?digest={d}", self.b.url()))).body(data.to_vec()).send().unwrap();
        assert_eq!(r.status(), 201, "blob into {repo}");
        json!({"digest": d, "size": data.len()})
    }

    fn manifest(&self, repo: &str, reference: &str, media_type: &str, body: &Value) -> String {
        let bytes = serde_json::to_vec(body).unwrap();
        let r = self
            .auth(self.c.put(format!("{}/v2/{repo}/manifests/{reference}", self.b.url())))
            .header("Content-Type", media_type)
            .body(bytes.clone())
            .send()
            .unwrap();
        assert_eq!(r.status(), 201, "manifest {repo}:{reference}: {}", r.text().unwrap());
        digest(&bytes)
    }

    /// A one-layer image for `arch`, tagged `tag` when given; returns (digest, size).
    fn image(&self, repo: &str, tag: Option<&str>, arch: &str, annotations: Value) -> (String, usize) {
        let layer = self.blob(repo, format!("layer {repo} {arch} {tag:?}").as_bytes());
        let config = self.blob(
            repo,
            json!({"architecture": arch, "os": "linux", "created": "2026-11-30T10:00:00Z",
                "config": {"Env": ["PATH=/usr/bin", format!("ARCH={arch}")], "Entrypoint": ["/app"], "Labels": {"team": "infra"}},
                "history": [{"created": "2026-11-30T10:00:00Z", "created_by": format!("COPY app-{arch} /app")}],
                "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}})
            .to_string()
            .as_bytes(),
        );
        let m = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config["digest"], "size": config["size"]},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer["digest"], "size": layer["size"]}],
            "annotations": annotations});
        let reference = tag.map(str::to_string).unwrap_or_else(|| digest(&serde_json::to_vec(&m).unwrap()));
        let d = self.manifest(repo, &reference, OCI_MANIFEST, &m);
        (d, serde_json::to_vec(&m).unwrap().len())
    }

    /// A two-platform index tagged `tag`; returns (index digest, arm64 child digest, amd64 child digest).
    fn multi_arch(&self, repo: &str, tag: &str) -> (String, String, String) {
        let (amd, amd_size) = self.image(repo, None, "amd64", json!({}));
        let (arm, arm_size) = self.image(repo, None, "arm64", json!({}));
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": amd, "size": amd_size, "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": OCI_MANIFEST, "digest": arm, "size": arm_size, "platform": {"os": "linux", "architecture": "arm64"}},
        ]});
        (self.manifest(repo, tag, OCI_INDEX, &index), arm, amd)
    }

    /// An SBOM-like artifact referring to `subject`.
    fn referrer(&self, repo: &str, subject: &str) -> String {
        let empty = self.blob(repo, b"{}");
        let doc = self.blob(repo, b"{\"sbom\":true}");
        let subject_size = self.c.get(format!("{}/v2/{repo}/manifests/{subject}", self.b.url())).send().unwrap().bytes().unwrap().len();
        let m = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.sbom+json",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty["digest"], "size": 2},
            "layers": [{"mediaType": "application/vnd.example.sbom+json", "digest": doc["digest"], "size": doc["size"]}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": subject_size}});
        let d = digest(&serde_json::to_vec(&m).unwrap());
        self.manifest(repo, &d, OCI_MANIFEST, &m)
    }
}

fn alice(b: &Berth) -> Pusher<'_> {
    Pusher { b, c: client(), user: Some(USERS[0]) }
}

fn html(r: Response) -> (u16, String, String) {
    let status = r.status().as_u16();
    let ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (status, ct, r.text().unwrap())
}

fn total_upstream_requests(fake: &Fake) -> usize {
    fake.state.lock().unwrap().counts.values().sum()
}

/// The pages over plain HTTP: redirects, groups, escaping, 404s, forms without their token,
/// mirrored repositories shown from the store without a single upstream request.
#[test]
fn pages_read_the_index_only() {
    let fake = Fake::start();
    fake.add_image("library/alpine", "3", b"alpine layer");
    let b = Berth::start(&format!(
        "[[namespace]]\nprefix = \"team\"\n\n[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n",
        fake.url()
    ));
    let c = client();
    let p = Pusher { b: &b, c: client(), user: None };
    p.image("team/app", Some("v1"), "amd64", json!({"org.example.note": "<script>alert(1)</script>"}));
    assert_eq!(c.get(format!("{}/v2/docker.io/library/alpine/manifests/3", b.url())).send().unwrap().status(), 200);
    let before = total_upstream_requests(&fake);

    let r = c.get(format!("{}/", b.url())).send().unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui/");
    let (status, ct, home) = html(c.get(format!("{}/ui/", b.url())).send().unwrap());
    assert_eq!((status, ct.as_str()), (200, "text/html; charset=utf-8"));
    assert!(home.contains("Hosted · team") && home.contains("Mirror of docker.io"), "{home}");
    assert!(home.contains(">team&#x2f;app<") && home.contains(">docker.io&#x2f;library&#x2f;alpine<"), "{home}");
    // The cache at a glance names each upstream's state and the fills running.
    assert!(home.contains("fills in flight") && home.contains("class=\"upstream-state\">up<"), "{home}");
    // Each repository with its size, last push and last pull: alpine was pulled, team/app not.
    let row = |page: &str, name: &str| page.split("<tr>").find(|r| r.contains(&format!(">{name}<"))).unwrap_or_default().to_string();
    let (alpine, app) = (row(&home, "docker.io&#x2f;library&#x2f;alpine"), row(&home, "team&#x2f;app"));
    assert!(!alpine.contains("class=\"pulled\">—<") && alpine.contains("class=\"pulled\">20"), "{alpine}");
    assert!(app.contains("class=\"pulled\">—<") && app.contains("class=\"pushed\">20"), "{app}");
    assert!(!app.contains("class=\"num size\">0 B<"), "{app}");
    let (_, _, app_page) = html(c.get(format!("{}/ui/r/team/app", b.url())).send().unwrap());
    assert!(app_page.contains("class=\"created\">2026-11-30 10:00:00Z<"), "the config's date: {app_page}");
    assert!(app_page.contains("class=\"pulled\">—<"), "{app_page}");
    assert_eq!(c.get(format!("{}/v2/team/app/manifests/v1", b.url())).send().unwrap().status(), 200);
    let (_, _, app_page) = html(c.get(format!("{}/ui/r/team/app", b.url())).send().unwrap());
    assert!(!app_page.contains("class=\"pulled\">—<") && app_page.contains("class=\"pulled\">20"), "a pull is shown: {app_page}");

    let (status, _, repo) = html(c.get(format!("{}/ui/r/docker.io/library/alpine", b.url())).send().unwrap());
    assert_eq!(status, 200, "{repo}");
    assert!(repo.contains("hosts.toml") && repo.contains("capabilities = [&quot;pull&quot;, &quot;resolve&quot;]"), "{repo}");
    // A mirrored tag says whether berth trusts it now, and since when.
    assert!(repo.contains("class=\"checked\">fresh (checked "), "{repo}");
    let (status, _, tag) = html(c.get(format!("{}/ui/r/docker.io/library/alpine/-/tag/3", b.url())).send().unwrap());
    assert_eq!(status, 200, "{tag}");
    assert!(tag.contains("id=\"layers\""), "{tag}");
    let (status, _, search) = html(c.get(format!("{}/ui/?q=alp", b.url())).send().unwrap());
    assert_eq!(status, 200);
    assert!(search.contains("alpine") && !search.contains(">team&#x2f;app<"), "{search}");
    assert_eq!(total_upstream_requests(&fake), before, "the pages asked the upstream");

    // What a client pushed is shown, never run.
    let (_, _, page) = html(c.get(format!("{}/ui/r/team/app/-/tag/v1", b.url())).send().unwrap());
    assert!(page.contains("&lt;script&gt;alert(1)") && !page.contains("<script>"), "{page}");
    assert!(page.contains("COPY app-amd64") && page.contains("ARCH=amd64"), "{page}");

    for path in ["/ui/r/team/nope", "/ui/r/team/app/-/tag/nope", "/ui/nope", "/ui/r/docker.io/library/never-pulled"] {
        let (status, ct, body) = html(c.get(format!("{}{path}", b.url())).send().unwrap());
        assert_eq!((status, ct.as_str()), (404, "text/html; charset=utf-8"), "{path}");
        assert!(body.contains("id=\"error-message\""), "{path}: {body}");
    }
    assert_eq!(total_upstream_requests(&fake), before, "a missing page asked the upstream");

    // A form without the visitor's token changes nothing.
    let r = c.post(format!("{}/ui/r/team/app/-/delete-tag/v1", b.url())).form(&[("csrf", "0".repeat(64))]).send().unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(c.get(format!("{}/v2/team/app/manifests/v1", b.url())).send().unwrap().status(), 200);
    // The registry API is untouched.
    assert_eq!(c.get(format!("{}/v2/", b.url())).send().unwrap().text().unwrap(), "{}");
}

/// 50 repositories per home page and 50 tags per repository page, each with a link to the next.
#[test]
fn home_and_tags_are_paged() {
    let b = Berth::start("[[namespace]]\nprefix = \"team\"\n");
    let p = Pusher { b: &b, c: client(), user: None };
    for i in 0..53 {
        p.image(&format!("team/r{i:02}"), Some("v1"), "amd64", json!({}));
    }
    let body: Value = p.c.get(format!("{}/v2/team/r00/manifests/v1", b.url())).send().unwrap().json().unwrap();
    for t in 0..52 {
        p.manifest("team/r00", &format!("t{t:02}"), OCI_MANIFEST, &body);
    }
    let c = client();
    let count = |page: &str, class: &str| page.matches(&format!("class=\"{class}\"")).count();
    let next_of = |page: &str| {
        page.split("id=\"next\" href=\"").nth(1).map(|r| r.split('"').next().unwrap().replace("&amp;", "&").replace("&#x2f;", "/"))
    };

    let (_, _, first) = html(c.get(format!("{}/ui/", b.url())).send().unwrap());
    assert_eq!(count(&first, "repo"), 50);
    let next = next_of(&first).expect("a link to the next page");
    assert_eq!(next, "/ui/?after=team%2Fr49");
    let (_, _, second) = html(c.get(format!("{}{next}", b.url())).send().unwrap());
    assert_eq!(count(&second, "repo"), 3, "{second}");
    assert!(second.contains(">team&#x2f;r52<") && next_of(&second).is_none(), "{second}");

    let (_, _, tags) = html(c.get(format!("{}/ui/r/team/r00", b.url())).send().unwrap());
    assert_eq!(count(&tags, "tag"), 50);
    let next = next_of(&tags).expect("a link to more tags");
    let (_, _, rest) = html(c.get(format!("{}{next}", b.url())).send().unwrap());
    assert_eq!(count(&rest, "tag"), 3, "{rest}");
    // The tag count on the home page.
    assert!(first.contains("<td class=\"num\">53</td>"), "{first}");
}

#[test]
fn ui_can_be_turned_off() {
    let b = Berth::start("[ui]\nenabled = false\n");
    let c = client();
    for path in ["/", "/ui/"] {
        let r = c.get(format!("{}{path}", b.url())).send().unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(r.headers()["content-type"], "application/json", "{path}: an OCI error, as before the UI");
    }
}

fn cookie(r: &Response, name: &str) -> Option<String> {
    r.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_string()).find(|v| v.starts_with(&format!("{name}=")))
}

fn hidden_csrf(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a form token") + "name=\"csrf\" value=\"".len();
    page[at..at + 64].to_string()
}

/// The login form over plain HTTP: a strict session cookie, the token required, and what each
/// visitor sees.
#[test]
fn login_sessions_and_visibility_over_http() {
    // A mirror only users may pull through.
    let fake = Fake::start();
    fake.add_image("library/alpine", "3", b"alpine layer");
    let b = start_with_auth_and(&format!("[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\npull = [\"authenticated\"]\n", fake.url()));
    let a = alice(&b);
    a.image("public/app", Some("1"), "amd64", json!({}));
    a.image("team/app", Some("1"), "amd64", json!({}));
    a.image("secret/app", Some("1"), "amd64", json!({}));
    let pulled = a.auth(a.c.get(format!("{}/v2/docker.io/library/alpine/manifests/3", b.url()))).send().unwrap();
    assert_eq!(pulled.status(), 200);
    let c = client();

    let (_, _, anon) = html(c.get(format!("{}/ui/", b.url())).send().unwrap());
    assert!(anon.contains(">public&#x2f;app<") && !anon.contains("team&#x2f;app") && !anon.contains("secret"), "{anon}");
    assert!(!anon.contains("alpine"), "{anon}");
    assert_eq!(c.get(format!("{}/ui/r/docker.io/library/alpine", b.url())).send().unwrap().status(), 404);
    assert!(!anon.contains("hosted content stored"), "anonymous visitors see no hosted totals");
    for path in ["/ui/r/secret/app", "/ui/r/team/app", "/ui/r/secret/app/-/tag/1", "/ui/r/secret/app/-/delete-tag/1"] {
        assert_eq!(c.get(format!("{}{path}", b.url())).send().unwrap().status(), 404, "{path} is invisible, not forbidden");
    }

    let r = c.get(format!("{}/ui/login", b.url())).send().unwrap();
    let csrf_cookie = cookie(&r, "berth_csrf").expect("a token cookie");
    let csrf = hidden_csrf(&r.text().unwrap());
    assert!(csrf_cookie.starts_with(&format!("berth_csrf={csrf}")));
    let login = |user: &str, pw: &str, token: &str| {
        c.post(format!("{}/ui/login", b.url()))
            .header("Cookie", format!("berth_csrf={csrf}"))
            .form(&[("csrf", token), ("username", user), ("password", pw)])
            .send()
            .unwrap()
    };
    assert_eq!(login("alice", "alice-secret", &"0".repeat(64)).status(), 403, "a login without the form's token");
    let wrong = login("alice", "nope", &csrf);
    assert_eq!(wrong.status(), 401);
    assert!(cookie(&wrong, "berth_session").is_none());
    let ok = login("alice", "alice-secret", &csrf);
    assert_eq!(ok.status(), 303);
    let session = cookie(&ok, "berth_session").expect("a session cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(session.contains(attr), "{session} lacks {attr}");
    }
    let id = session.split(';').next().unwrap().to_string();
    let (status, _, home) = html(c.get(format!("{}/ui/", b.url())).header("Cookie", &id).send().unwrap());
    assert_eq!(status, 200);
    assert!(home.contains("secret&#x2f;app") && home.contains("team&#x2f;app") && home.contains("hosted content stored"), "{home}");
    assert!(home.contains(">docker.io&#x2f;library&#x2f;alpine<"), "{home}");
    assert_eq!(c.get(format!("{}/ui/r/secret/app", b.url())).header("Cookie", &id).send().unwrap().status(), 200);

    // Logging in again replaces the session: the old id stops working.
    let relogin = c
        .post(format!("{}/ui/login", b.url()))
        .header("Cookie", &id)
        .form(&[("csrf", hidden_csrf(&home).as_str()), ("username", "alice"), ("password", "alice-secret")])
        .send()
        .unwrap();
    assert_eq!(relogin.status(), 303);
    let old = id;
    let id = cookie(&relogin, "berth_session").unwrap().split(';').next().unwrap().to_string();
    assert_ne!(id, old);
    assert_eq!(c.get(format!("{}/ui/r/secret/app", b.url())).header("Cookie", &old).send().unwrap().status(), 404);
    let (_, _, home) = html(c.get(format!("{}/ui/", b.url())).header("Cookie", &id).send().unwrap());

    // Logging out ends the session on the server, whatever the browser keeps.
    let token = hidden_csrf(&home);
    let out = c.post(format!("{}/ui/logout", b.url())).header("Cookie", &id).form(&[("csrf", token.as_str())]).send().unwrap();
    assert_eq!(out.status(), 303);
    assert!(cookie(&out, "berth_session").is_some_and(|v| v.contains("Max-Age=0")));
    assert_eq!(c.get(format!("{}/ui/r/secret/app", b.url())).header("Cookie", &id).send().unwrap().status(), 404);

    // A new password in htpasswd ends the sessions logged in with the old one.
    let again = login("alice", "alice-secret", &csrf);
    let id = cookie(&again, "berth_session").unwrap().split(';').next().unwrap().to_string();
    let secret_status = || c.get(format!("{}/ui/r/secret/app", b.url())).header("Cookie", &id).send().unwrap().status();
    assert_eq!(secret_status(), 200);
    let text: String = [("alice", "changed"), USERS[1]].iter().map(|(u, pw)| format!("{u}:{}\n", bcrypt::hash(pw, 4).unwrap())).collect();
    std::fs::write(b.dir.path().join("htpasswd"), text).unwrap();
    assert!(common::eventually(Duration::from_secs(20), || secret_status() == 404), "the session outlived the password");
}

/// Deleting a manifest from its confirm page, then a GC dry run that reports what it would
/// free and frees nothing.
#[test]
fn delete_manifest_then_gc_dry_run() {
    let b = Berth::start_with_storage("gc_grace = \"0s\"\n", "[[namespace]]\nprefix = \"team\"\nimmutable_tags = [\"release-*\"]\n");
    let p = Pusher { b: &b, c: client(), user: None };
    let (d, _) = p.image("team/app", Some("v1"), "amd64", json!({}));
    p.image("team/app", Some("release-1"), "arm64", json!({}));
    let c = client();
    let get = |path: &str| {
        let r = c.get(format!("{}{path}", b.url())).send().unwrap();
        let set = cookie(&r, "berth_csrf").map(|v| v.split(';').next().unwrap().to_string());
        (set, html(r))
    };
    let (token_cookie, (status, _, confirm)) = get(&format!("/ui/r/team/app/-/delete-manifest/{d}"));
    assert_eq!(status, 200, "{confirm}");
    assert!(confirm.contains("These tags point at it and are deleted with it") && confirm.contains(">v1<"), "{confirm}");
    let token_cookie = token_cookie.expect("a token cookie");
    let token = hidden_csrf(&confirm);
    let post =
        |path: &str| c.post(format!("{}{path}", b.url())).header("Cookie", &token_cookie).form(&[("csrf", token.as_str())]).send().unwrap();
    let r = post(&format!("/ui/r/team/app/-/delete-manifest/{d}"));
    assert_eq!(r.status(), 303);
    assert_eq!(c.get(format!("{}/v2/team/app/manifests/{d}", b.url())).send().unwrap().status(), 404);

    // An immutable tag is refused with a page that says why.
    let (status, _, refused) = html(post("/ui/r/team/app/-/delete-tag/release-1"));
    assert_eq!(status, 403);
    assert!(refused.contains("immutable"), "{refused}");

    let (_, (_, _, gc)) = get("/ui/gc");
    assert!(gc.contains("id=\"dry-run\""), "{gc}");
    let (status, _, report) = html(post("/ui/gc"));
    assert_eq!(status, 200, "{report}");
    let freed = report.split("id=\"gc-bytes\">").nth(1).unwrap().split('<').next().unwrap().to_string();
    assert!(!freed.starts_with("0 B in 0 blobs"), "the deleted image's blobs are unreferenced: {freed}");
    // A dry run: the blobs are all still stored.
    let (_, _, again) = html(post("/ui/gc"));
    assert!(again.contains(&freed), "a second dry run frees the same: {again}");
}

/// A webhook receiver on loopback that takes every delivery with 200 and counts them.
struct Receiver {
    port: u16,
    received: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Receiver {
    fn start() -> Receiver {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind(("127.0.0.1", common::free_port())).unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = received.clone();
        // Lives as long as the test process; each connection carries one request.
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let (mut buf, mut chunk) = (Vec::new(), [0u8; 8192]);
                let complete = loop {
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4) {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len: usize =
                            head.lines().find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse().ok())).unwrap_or(0);
                        if buf.len() >= end + len {
                            break true;
                        }
                    }
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => break false,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                if complete {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                }
            }
        });
        Receiver { port, received }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }
}

fn webhook_to(dir: &std::path::Path, r: &Receiver) -> String {
    let secret = dir.join("hook.secret");
    std::fs::write(&secret, "a-webhook-secret-of-some-length\n").unwrap();
    format!("[[webhook]]\nurl = \"{}\"\nsecret_file = \"{}\"\n", r.url(), secret.display())
}

/// Logs `user` in through the login form; returns the session cookie to send.
fn log_in(c: &Client, b: &Berth, user: &str, password: &str) -> String {
    let r = c.get(format!("{}/ui/login", b.url())).send().unwrap();
    let token_cookie = cookie(&r, "berth_csrf").unwrap().split(';').next().unwrap().to_string();
    let csrf = hidden_csrf(&r.text().unwrap());
    let r = c
        .post(format!("{}/ui/login", b.url()))
        .header("Cookie", &token_cookie)
        .form(&[("csrf", csrf.as_str()), ("username", user), ("password", password)])
        .send()
        .unwrap();
    assert_eq!(r.status(), 303, "log in as {user}");
    cookie(&r, "berth_session").unwrap().split(';').next().unwrap().to_string()
}

/// Recent webhook deliveries: a page linked from the header for those who may run a
/// collection, showing a push's delivery to a loopback receiver as delivered; nobody else
/// sees it, and without a webhook or replication rule there is no such page.
#[test]
fn recent_deliveries_show_a_push_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let r = Receiver::start();
    let hook = webhook_to(dir.path(), &r);
    let b = Berth::start_in(dir, &format!("[[namespace]]\nprefix = \"team\"\n\n{hook}"));
    let p = Pusher { b: &b, c: client(), user: None };
    let (d, _) = p.image("team/app", Some("v1"), "amd64", json!({}));
    let c = client();
    let (status, _, home) = html(c.get(format!("{}/ui/", b.url())).send().unwrap());
    assert_eq!(status, 200);
    assert!(home.contains("href=\"/ui/deliveries\" id=\"deliveries\""), "{home}");
    let page = || html(c.get(format!("{}/ui/deliveries", b.url())).send().unwrap());
    let mut last = String::new();
    let shown = common::eventually(Duration::from_secs(20), || {
        let (status, _, text) = page();
        assert_eq!(status, 200, "{text}");
        last = text;
        last.contains("<td class=\"status\">delivered (200)</td>")
    });
    assert!(shown, "the push never showed as delivered: {last}");
    assert!(r.received.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let row = last.split("<tr class=\"delivery delivered\">").nth(1).unwrap().split("</tr>").next().unwrap();
    assert!(row.contains("dev.berth.manifest.pushed") && row.contains(">team&#x2f;app<"), "{row}");
    assert!(row.contains(&format!("127.0.0.1:{}", r.port)), "the target: {row}");
    assert!(row.contains("<td class=\"num attempts\">1</td>") && row.contains("<td class=\"error\"></td>"), "{row}");
    assert!(row.contains("<td class=\"time\">20"), "{row}");
    // The admin listener lists the same delivery.
    let admin: Value = c.get(format!("{}/events/deliveries", b.admin_url())).send().unwrap().json().unwrap();
    assert!(admin.as_array().unwrap().iter().any(|x| x["status"] == "delivered" && x["subject"] == "team/app"), "{admin} ({d})");

    // Under [auth]: only users who may push see it.
    let dir = tempfile::tempdir().unwrap();
    let hook = webhook_to(dir.path(), &r);
    let ht = dir.path().join("htpasswd");
    let text: String = USERS.iter().map(|(u, pw)| format!("{u}:{}\n", bcrypt::hash(pw, 4).unwrap())).collect();
    std::fs::write(&ht, text).unwrap();
    let b = Berth::start_in(dir, &format!("[auth]\nhtpasswd = \"{}\"\n{RULES}\n{hook}", ht.display()));
    alice(&b).image("secret/app", Some("1"), "amd64", json!({}));
    let as_who = |session: Option<&str>| {
        let get = |path: &str| {
            let r = c.get(format!("{}{path}", b.url()));
            html(
                match session {
                    Some(s) => r.header("Cookie", s),
                    None => r,
                }
                .send()
                .unwrap(),
            )
        };
        (get("/ui/"), get("/ui/deliveries"))
    };
    let ((_, _, home), (status, _, _)) = as_who(None);
    assert!(!home.contains("id=\"deliveries\""), "{home}");
    assert_eq!(status, 403, "anonymous visitors see no deliveries");
    let bob = log_in(&c, &b, USERS[1].0, USERS[1].1);
    let ((_, _, home), (status, _, _)) = as_who(Some(&bob));
    assert!(!home.contains("id=\"deliveries\""), "{home}");
    assert_eq!(status, 403, "bob may push nowhere");
    let alice_session = log_in(&c, &b, USERS[0].0, USERS[0].1);
    assert!(common::eventually(Duration::from_secs(20), || {
        let ((_, _, home), (status, _, page)) = as_who(Some(&alice_session));
        home.contains("id=\"deliveries\"") && status == 200 && page.contains(">secret&#x2f;app<") && page.contains("delivered (200)")
    }));

    // No webhook, no replication: no link and no page.
    let b = Berth::start("[[namespace]]\nprefix = \"team\"\n");
    Pusher { b: &b, c: client(), user: None }.image("team/app", Some("v1"), "amd64", json!({}));
    let (_, _, home) = html(c.get(format!("{}/ui/", b.url())).send().unwrap());
    assert!(home.contains("id=\"gc\"") && !home.contains("id=\"deliveries\""), "{home}");
    assert_eq!(c.get(format!("{}/ui/deliveries", b.url())).send().unwrap().status(), 404);
}

/// home → repository → tag → platform → layers, referrers, and search, in a real browser.
#[test]
fn browser_clicks_through_repositories_without_auth() {
    let b = Berth::start("[[namespace]]\nprefix = \"team\"\n\n[[namespace]]\nprefix = \"secret\"\n");
    let p = Pusher { b: &b, c: client(), user: None };
    let (_, arm, amd) = p.multi_arch("team/app", "v1");
    p.image("team/app", Some("v2"), "amd64", json!({"org.opencontainers.image.source": "https://example.com/app"}));
    p.image("team/tools/lint", Some("1"), "amd64", json!({}));
    p.image("secret/app", Some("1"), "amd64", json!({}));
    let sbom = p.referrer("team/app", &amd);
    let Some(br) = Browser::start() else { return };

    br.goto(&format!("{}/", b.url()));
    br.wait_url("/ui/", |u| u.ends_with("/ui/"));
    br.wait_heading("Repositories");
    // Without [auth] every namespace is listed, "private" ones included.
    assert_eq!(br.texts("a.repo"), ["secret/app", "team/app", "team/tools/lint"]);
    br.screenshot("home");

    br.click_on("a.repo", "team/app");
    br.wait_heading("team/app");
    let row = br.wait_for("#tags tr", "v1");
    // Each platform with its own size.
    let text = br.text_of(&row);
    assert!(text.contains("linux/amd64 (") && text.contains("), linux/arm64 (") && text.contains(" B)"), "{text}");
    br.wait_for("#tags tr", "v2");
    br.wait_for(".pull pre", "docker pull");
    br.screenshot("repository");

    br.click_on("a.tag", "v1");
    br.wait_heading("team/app:v1");
    assert_eq!(br.texts("#platforms a.platform"), ["linux/amd64", "linux/arm64"]);
    br.screenshot("index");
    br.click_on("#platforms a.platform", "linux/arm64");
    br.wait_url("the arm64 manifest", |u| u.ends_with(&arm));
    br.wait_heading("team/app@");
    assert_eq!(br.all("#layers tr.layer").len(), 1);
    br.wait_for("#config-platform", "linux/arm64");
    br.wait_for("#env li", "ARCH=arm64");
    br.wait_for("#entrypoint", "/app");
    br.wait_for("#history", "COPY app-arm64 /app");
    br.screenshot("image");

    // The amd64 image carries an SBOM; its page links it.
    br.goto(&format!("{}/ui/r/team/app/-/manifest/{amd}", b.url()));
    br.wait_for("#referrers .referrer-type", "application/vnd.example.sbom+json");
    br.click_on("#referrers a", &sbom[7..19]);
    br.wait_url("the SBOM", |u| u.ends_with(&sbom));
    br.wait_for("dd", "application/vnd.example.sbom+json");

    br.goto(&format!("{}/ui/r/team/app/-/tag/v2", b.url()));
    br.wait_for("#annotations", "https://example.com/app");

    // Pull commands have copy buttons (the page's script adds them).
    br.goto(&format!("{}/ui/r/team/app", b.url()));
    br.wait_for("button.copy", "Copy");
    // Search as you type: the results replace the page without submitting the form.
    br.type_into(".search input[name=q]", "lint");
    br.wait_heading("matching");
    assert_eq!(br.texts("a.repo"), ["team/tools/lint"]);
    br.wait_url("the search in the address bar", |u| u.ends_with("/ui/?q=lint"));
    // And the form still works as a form.
    br.type_into(".search input[name=q]", "lint");
    br.click_on(".search button", "Search");
    br.wait_heading("matching");
    assert_eq!(br.texts("a.repo"), ["team/tools/lint"]);

    br.goto(&format!("{}/ui/r/team/missing", b.url()));
    br.wait_heading("Not found");
}

/// Log in, delete a tag another tag shares, log out; private namespaces stay invisible.
#[test]
fn browser_login_delete_tag_logout_with_auth() {
    let b = start_with_auth();
    let a = alice(&b);
    a.image("public/app", Some("1"), "amd64", json!({}));
    let (d, _) = a.image("team/app", Some("v1"), "amd64", json!({}));
    let m = a.c.get(format!("{}/v2/team/app/manifests/v1", b.url())).basic_auth("alice", Some("alice-secret")).send().unwrap();
    let body: Value = m.json().unwrap();
    assert_eq!(a.manifest("team/app", "stable", OCI_MANIFEST, &body), d);
    a.image("secret/app", Some("1"), "amd64", json!({}));
    let Some(br) = Browser::start() else { return };

    br.goto(&format!("{}/ui/", b.url()));
    br.wait_heading("Repositories");
    assert_eq!(br.texts("a.repo"), ["public/app"], "anonymous visitors see what anonymous may pull");
    br.goto(&format!("{}/ui/r/secret/app", b.url()));
    br.wait_heading("Not found");

    let login = |user: &str, pw: &str| {
        br.goto(&format!("{}/ui/", b.url()));
        br.click_on("#login", "Log in");
        br.wait_heading("Log in");
        br.type_into("#username", user);
        br.type_into("#password", pw);
        br.click_on("#submit", "Log in");
    };
    login("alice", "wrong");
    br.wait_for("#login-error", "Incorrect username or password");
    login("alice", "alice-secret");
    br.wait_heading("Repositories");
    br.wait_for(".who", "alice");
    assert_eq!(br.texts("a.repo"), ["public/app", "secret/app", "team/app"]);

    br.click_on("a.repo", "team/app");
    br.wait_heading("team/app");
    br.click_on("a.tag", "v1");
    br.wait_heading("team/app:v1");
    br.click_on("#delete-tag", "Delete tag v1");
    br.wait_heading("Delete team/app:v1?");
    br.wait_for("#others .other-tag", "stable");
    br.click_on("#confirm", "Delete");
    br.wait_for("#notice", "Deleted v1");
    assert_eq!(br.texts("a.tag"), ["stable"]);
    let tags: Value =
        a.c.get(format!("{}/v2/team/app/tags/list", b.url())).basic_auth("alice", Some("alice-secret")).send().unwrap().json().unwrap();
    assert_eq!(tags["tags"], json!(["stable"]));

    br.click_on("#logout", "Log out");
    br.wait_for("#login", "Log in");
    assert_eq!(br.texts("a.repo"), ["public/app"]);

    // bob may pull team/ but not push there, and never sees secret/.
    login("bob", "bob-secret");
    br.wait_for(".who", "bob");
    assert_eq!(br.texts("a.repo"), ["public/app", "team/app"]);
    br.click_on("a.repo", "team/app");
    br.wait_heading("team/app");
    br.wait_for("#tags tr", "stable");
    assert!(br.all("a.danger").is_empty(), "no delete links for bob");
    br.goto(&format!("{}/ui/r/team/app/-/delete-tag/stable", b.url()));
    br.wait_heading("Not allowed");
    br.goto(&format!("{}/ui/r/secret/app", b.url()));
    br.wait_heading("Not found");
}
