//! The OCI distribution-spec conformance suite's case list (pull, push, content discovery,
//! content management), ported to Rust and run against the real berth binary with one hosted
//! namespace. Every error case also checks that nothing reached the store.

mod common;

use common::{digest, random_bytes, Berth};
use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

const NAMESPACE: &str = "[[namespace]]\nprefix = \"team\"\n";

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

// ---- harness ----

struct Reg {
    berth: Berth,
    http: Client,
}

fn start() -> Reg {
    let berth = Berth::start(NAMESPACE);
    let http = Client::builder().redirect(reqwest::redirect::Policy::none()).timeout(Duration::from_secs(60)).build().unwrap();
    Reg { berth, http }
}

/// Every file below `dir`, relative to it.
fn files_under(dir: &Path) -> BTreeSet<String> {
    common::local_files(dir).into_iter().collect()
}

/// What the store holds on disk, for "nothing was stored" checks.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    blobs: BTreeSet<String>,
    /// The catalog: repositories with content.
    repositories: BTreeSet<String>,
    uploads: BTreeSet<String>,
    tmp: BTreeSet<String>,
}

impl Reg {
    fn url(&self, path: &str) -> String {
        if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.berth.url())
        }
    }
    fn req(&self, m: Method, path: &str) -> RequestBuilder {
        self.http.request(m, self.url(path))
    }
    fn get(&self, path: &str) -> Response {
        self.req(Method::GET, path).send().unwrap()
    }
    fn head(&self, path: &str) -> Response {
        self.req(Method::HEAD, path).send().unwrap()
    }
    fn delete(&self, path: &str) -> Response {
        self.req(Method::DELETE, path).send().unwrap()
    }

    fn catalog(&self) -> BTreeSet<String> {
        let v: Value = self.get("/v2/_catalog?n=1000").json().unwrap();
        v["repositories"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_string()).collect()
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            blobs: self.berth.stored_blobs(),
            repositories: self.catalog(),
            uploads: self.berth.stored_uploads(),
            tmp: files_under(&self.berth.data_dir().join("tmp")),
        }
    }

    /// Monolithic upload (`POST ?digest=`); returns the digest.
    fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let d = digest(data);
        let r = self.req(Method::POST, &format!("/v2/{repo}/blobs/uploads/?digest={d}")).body(data.to_vec()).send().unwrap();
        assert_eq!(r.status(), 201, "push blob to {repo}: {}", r.text().unwrap());
        d
    }

    /// Opens an upload session; returns its Location.
    fn open_upload(&self, repo: &str) -> String {
        let r = self.req(Method::POST, &format!("/v2/{repo}/blobs/uploads/")).send().unwrap();
        assert_eq!(r.status(), 202);
        location(&r)
    }

    fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> Response {
        self.req(Method::PUT, &format!("/v2/{repo}/manifests/{reference}"))
            .header("Content-Type", media_type)
            .body(body.to_vec())
            .send()
            .unwrap()
    }

    fn put_manifest_ok(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> String {
        let r = self.put_manifest(repo, reference, media_type, body);
        let status = r.status();
        let d = header(&r, "docker-content-digest");
        assert_eq!(status, 201, "PUT manifest {repo}:{reference}: {}", r.text().unwrap());
        assert_eq!(d, digest(body));
        d
    }

    /// Pushes a one-layer OCI image (config + layer + manifest) and tags it.
    fn push_image(&self, repo: &str, tag: &str, seed: &str) -> Image {
        let config = json!({"architecture": "amd64", "os": "linux", "seed": seed}).to_string().into_bytes();
        let layer = format!("layer of {seed}").repeat(100).into_bytes();
        self.push_blob(repo, &config);
        self.push_blob(repo, &layer);
        let manifest = image_manifest(OCI_MANIFEST, OCI_CONFIG, &config, &[(OCI_LAYER, &layer)]);
        let d = self.put_manifest_ok(repo, tag, OCI_MANIFEST, &manifest);
        Image { config, layer, manifest, digest: d }
    }

    fn tags(&self, repo: &str) -> Vec<String> {
        let r = self.get(&format!("/v2/{repo}/tags/list"));
        if r.status() == 404 {
            return Vec::new();
        }
        assert_eq!(r.status(), 200);
        let v: Value = r.json().unwrap();
        v["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect()
    }
}

struct Image {
    config: Vec<u8>,
    layer: Vec<u8>,
    manifest: Vec<u8>,
    digest: String,
}

fn descriptor(media_type: &str, data: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": digest(data), "size": data.len()})
}

fn image_manifest(media_type: &str, config_type: &str, config: &[u8], layers: &[(&str, &[u8])]) -> Vec<u8> {
    let layers: Vec<Value> = layers.iter().map(|(t, l)| descriptor(t, l)).collect();
    serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": descriptor(config_type, config),
        "layers": layers,
    }))
    .unwrap()
}

fn index(media_type: &str, children: &[(&str, &[u8], &str)]) -> Vec<u8> {
    let manifests: Vec<Value> = children
        .iter()
        .map(|(t, m, arch)| {
            let mut d = descriptor(t, m);
            d["platform"] = json!({"os": "linux", "architecture": arch});
            d
        })
        .collect();
    serde_json::to_vec_pretty(&json!({"schemaVersion": 2, "mediaType": media_type, "manifests": manifests})).unwrap()
}

fn header(r: &Response, name: &str) -> String {
    r.headers().get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

fn location(r: &Response) -> String {
    let l = header(r, "location");
    assert!(!l.is_empty(), "response {} has no Location", r.status());
    l
}

/// Asserts an OCI error: status, the JSON envelope, and its first code.
fn assert_error(r: Response, status: u16, code: &str) -> Value {
    assert_eq!(r.status(), status, "expected {status} {code}");
    assert!(header(&r, "content-type").starts_with("application/json"), "error body is JSON");
    let v: Value = r.json().expect("error envelope is JSON");
    let errors = v["errors"].as_array().expect("envelope has errors[]");
    assert!(!errors.is_empty());
    assert_eq!(errors[0]["code"], code, "{v}");
    assert!(errors[0]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    v
}

/// One request over a fresh connection, bytes exactly as given: for paths an HTTP client
/// would normalise (`..`, `%2e`, backslash) and for `Expect: 100-continue`.
struct Raw {
    status: u16,
    head: String,
    body: Vec<u8>,
}

fn raw(b: &Berth, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Raw {
    let mut s = TcpStream::connect(b.host()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n", b.host(), body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    read_response(&mut s, method == "HEAD")
}

fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).unwrap();
        assert_eq!(n, 1, "connection closed inside a response head: {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

fn read_response(s: &mut TcpStream, head_only: bool) -> Raw {
    let head = read_head(s);
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let len: usize = if head_only { 0 } else { raw_header(&head, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0) };
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    Raw { status, head, body }
}

fn raw_header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_string()))
}

fn raw_code(r: &Raw) -> String {
    let v: Value = serde_json::from_slice(&r.body).unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(&r.body)));
    v["errors"][0]["code"].as_str().unwrap().to_string()
}

// ---- pull ----

#[test]
fn pull_base_endpoint_answers_200_with_api_version() {
    let reg = start();
    for r in [reg.get("/v2/"), reg.get("/v2"), reg.head("/v2/")] {
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "docker-distribution-api-version"), "registry/2.0");
    }
}

#[test]
fn pull_blobs_head_and_get() {
    let reg = start();
    let data = random_bytes(3000, 1);
    let missing = digest(b"never pushed");
    assert_eq!(reg.head(&format!("/v2/team/app/blobs/{missing}")).status(), 404);
    assert_error(reg.get(&format!("/v2/team/app/blobs/{missing}")), 404, "BLOB_UNKNOWN");

    let d = reg.push_blob("team/app", &data);
    let h = reg.head(&format!("/v2/team/app/blobs/{d}"));
    assert_eq!(h.status(), 200);
    assert_eq!(header(&h, "content-length"), "3000");
    assert_eq!(header(&h, "docker-content-digest"), d);
    assert!(h.bytes().unwrap().is_empty(), "HEAD has no body");
    let g = reg.get(&format!("/v2/team/app/blobs/{d}"));
    assert_eq!(g.status(), 200);
    assert_eq!(header(&g, "docker-content-digest"), d);
    assert_eq!(g.bytes().unwrap().as_ref(), data.as_slice());
}

#[test]
fn pull_manifests_by_tag_and_digest_with_headers() {
    let reg = start();
    let img = reg.push_image("team/app", "v1", "pull");
    let nonexistent = digest(b"no such manifest");
    assert_eq!(reg.head(&format!("/v2/team/app/manifests/{nonexistent}")).status(), 404);
    assert_eq!(reg.head("/v2/team/app/manifests/nope").status(), 404);
    assert_error(reg.get(&format!("/v2/team/app/manifests/{nonexistent}")), 404, "MANIFEST_UNKNOWN");
    assert_error(reg.get("/v2/team/app/manifests/nope"), 404, "MANIFEST_UNKNOWN");

    for reference in ["v1", img.digest.as_str()] {
        let h = reg.head(&format!("/v2/team/app/manifests/{reference}"));
        assert_eq!(h.status(), 200, "HEAD {reference}");
        assert_eq!(header(&h, "docker-content-digest"), img.digest);
        assert_eq!(header(&h, "content-type"), OCI_MANIFEST);
        assert_eq!(header(&h, "content-length"), img.manifest.len().to_string());
        let g = reg.req(Method::GET, &format!("/v2/team/app/manifests/{reference}")).header("Accept", OCI_MANIFEST).send().unwrap();
        assert_eq!(g.status(), 200, "GET {reference}");
        assert_eq!(header(&g, "docker-content-digest"), img.digest);
        assert_eq!(header(&g, "content-type"), OCI_MANIFEST);
        assert_eq!(g.bytes().unwrap().as_ref(), img.manifest.as_slice());
    }
    // A pushed manifest's blobs are pullable through the same repository.
    assert_eq!(reg.get(&format!("/v2/team/app/blobs/{}", digest(&img.config))).bytes().unwrap().as_ref(), img.config.as_slice());
    assert_eq!(reg.get(&format!("/v2/team/app/blobs/{}", digest(&img.layer))).bytes().unwrap().as_ref(), img.layer.as_slice());
}

#[test]
fn push_manifest_by_digest_with_tag_parameters() {
    let reg = start();
    let img = reg.push_image("team/tagged", "first", "tag params");
    let d = &img.digest;
    // OCI 1.1: a push by digest can name its tags; each accepted one comes back as OCI-Tag.
    let r = reg
        .req(Method::PUT, &format!("/v2/team/tagged/manifests/{d}?tag=v1&tag=stable"))
        .header("Content-Type", OCI_MANIFEST)
        .body(img.manifest.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    let oci_tags: Vec<String> = r.headers().get_all("oci-tag").iter().map(|v| v.to_str().unwrap().to_string()).collect();
    assert_eq!(oci_tags, ["v1", "stable"]);
    assert_eq!(reg.tags("team/tagged"), ["first", "stable", "v1"]);
    for t in ["v1", "stable"] {
        assert_eq!(header(&reg.head(&format!("/v2/team/tagged/manifests/{t}")), "docker-content-digest"), *d);
    }
    // One bad tag refuses the whole push and stores nothing.
    let before = reg.snapshot();
    let r = reg
        .req(Method::PUT, &format!("/v2/team/tagged/manifests/{d}?tag=ok&tag=.bad"))
        .header("Content-Type", OCI_MANIFEST)
        .body(img.manifest.clone())
        .send()
        .unwrap();
    assert_error(r, 400, "MANIFEST_INVALID");
    assert_eq!(reg.snapshot(), before);
    assert!(!reg.tags("team/tagged").contains(&"ok".to_string()));
}

#[test]
fn pull_manifest_with_an_impossible_tag_is_404() {
    // The suite's "nonexistent manifest" is `.INVALID_MANIFEST_NAME`: a reference that can
    // never exist is simply unknown to a reader.
    let reg = start();
    reg.push_image("team/app", "v1", "x");
    assert_eq!(reg.head("/v2/team/app/manifests/.INVALID_MANIFEST_NAME").status(), 404);
    assert_error(reg.get("/v2/team/app/manifests/.INVALID_MANIFEST_NAME"), 404, "MANIFEST_UNKNOWN");
}

#[test]
fn pull_error_bodies_are_oci_json() {
    let reg = start();
    let r = reg
        .req(Method::GET, "/v2/team/app/manifests/sha256:totallywrong")
        .header("Content-Type", OCI_MANIFEST)
        .body("blablabla")
        .send()
        .unwrap();
    assert_error(r, 400, "DIGEST_INVALID");
}

// ---- push: blobs ----

#[test]
fn push_blob_monolithic_post_with_digest() {
    let reg = start();
    let data = random_bytes(100_000, 2);
    let d = digest(&data);
    let r = reg.req(Method::POST, &format!("/v2/team/app/blobs/uploads/?digest={d}")).body(data.clone()).send().unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(location(&r), format!("/v2/team/app/blobs/{d}"));
    assert_eq!(header(&r, "docker-content-digest"), d);
    assert_eq!(reg.get(&location(&r)).bytes().unwrap().as_ref(), data.as_slice());
    assert_eq!(reg.berth.stored_blob(&d).unwrap(), data);
    assert!(reg.snapshot().uploads.is_empty() && reg.snapshot().tmp.is_empty());
}

#[test]
fn push_blob_post_then_put() {
    let reg = start();
    let data = random_bytes(5000, 3);
    let d = digest(&data);
    let r = reg.req(Method::POST, "/v2/team/app/blobs/uploads/").send().unwrap();
    assert_eq!(r.status(), 202);
    let loc = location(&r);
    assert!(loc.starts_with("/v2/team/app/blobs/uploads/"), "{loc}");
    assert!(!header(&r, "docker-upload-uuid").is_empty());
    assert_eq!(header(&r, "range"), "0-0");
    let r = reg
        .req(Method::PUT, &format!("{loc}?digest={d}"))
        .header("Content-Type", "application/octet-stream")
        .body(data.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(location(&r), format!("/v2/team/app/blobs/{d}"));
    assert_eq!(header(&r, "docker-content-digest"), d);
    assert_eq!(reg.get(&format!("/v2/team/app/blobs/{d}")).bytes().unwrap().as_ref(), data.as_slice());
    assert_eq!(reg.get(&loc).status(), 404, "a committed session is gone");
}

#[test]
fn push_blob_streamed_patch_without_content_range() {
    let reg = start();
    let data = random_bytes(3 << 20, 4);
    let d = digest(&data);
    let loc = reg.open_upload("team/app");
    // No length up front: the body goes out with chunked transfer encoding.
    let body = reqwest::blocking::Body::new(std::io::Cursor::new(data.clone()));
    let r = reg.req(Method::PATCH, &loc).header("Content-Type", "application/octet-stream").body(body).send().unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(header(&r, "range"), format!("0-{}", data.len() - 1));
    let loc = location(&r);
    let r = reg.req(Method::PUT, &format!("{loc}?digest={d}")).send().unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(reg.get(&format!("/v2/team/app/blobs/{d}")).bytes().unwrap().as_ref(), data.as_slice());
}

fn patch(reg: &Reg, loc: &str, data: &[u8], start: usize) -> Response {
    reg.req(Method::PATCH, loc)
        .header("Content-Type", "application/octet-stream")
        .header("Content-Range", format!("{}-{}", start, start + data.len() - 1))
        .body(data.to_vec())
        .send()
        .unwrap()
}

#[test]
fn push_blob_chunked_with_content_range_and_put_last_chunk() {
    let reg = start();
    let data = random_bytes(3 * 1024 + 7, 5);
    let d = digest(&data);
    let (c1, rest) = data.split_at(1024);
    let (c2, c3) = rest.split_at(1024);
    let mut loc = reg.open_upload("team/app");
    for (start, chunk) in [(0, c1), (1024, c2)] {
        let r = patch(&reg, &loc, chunk, start);
        assert_eq!(r.status(), 202);
        assert_eq!(header(&r, "range"), format!("0-{}", start + chunk.len() - 1));
        loc = location(&r);
    }
    let status = reg.get(&loc);
    assert_eq!(status.status(), 204);
    assert_eq!(header(&status, "range"), "0-2047");
    assert!(!header(&status, "docker-upload-uuid").is_empty());
    let loc = location(&status);
    let r = reg
        .req(Method::PUT, &format!("{loc}?digest={d}"))
        .header("Content-Range", format!("2048-{}", data.len() - 1))
        .body(c3.to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "docker-content-digest"), d);
    assert_eq!(reg.get(&format!("/v2/team/app/blobs/{d}")).bytes().unwrap().as_ref(), data.as_slice());
}

#[test]
fn push_blob_chunk_out_of_order_is_416_and_the_session_survives() {
    let reg = start();
    let data = random_bytes(3000, 6);
    let d = digest(&data);
    let loc = reg.open_upload("team/app");
    let range_of = |loc: &str| {
        let r = reg.get(loc);
        assert_eq!(r.status(), 204);
        header(&r, "range")
    };

    // Skipping ahead before anything arrived.
    let r = patch(&reg, &loc, &data[1000..2000], 1000);
    assert_eq!(header(&r, "range"), "0-0");
    assert_error(r, 416, "BLOB_UPLOAD_INVALID");
    assert_eq!(range_of(&loc), "0-0");

    let r = patch(&reg, &loc, &data[..1000], 0);
    assert_eq!(r.status(), 202);
    let loc = location(&r);
    // Retrying the previous chunk, skipping ahead, and a PUT whose last chunk is out of order.
    assert_error(patch(&reg, &loc, &data[..1000], 0), 416, "BLOB_UPLOAD_INVALID");
    assert_error(patch(&reg, &loc, &data[2000..], 2000), 416, "BLOB_UPLOAD_INVALID");
    let r =
        reg.req(Method::PUT, &format!("{loc}?digest={d}")).header("Content-Range", "2000-2999").body(data[2000..].to_vec()).send().unwrap();
    assert_error(r, 416, "BLOB_UPLOAD_INVALID");
    assert_eq!(range_of(&loc), "0-999");
    assert!(reg.snapshot().blobs.is_empty(), "nothing committed by refused chunks");

    let r = patch(&reg, &loc, &data[1000..2000], 1000);
    assert_eq!(r.status(), 202);
    assert_eq!(header(&r, "range"), "0-1999");
    let r = reg.req(Method::PUT, &format!("{}?digest={d}", location(&r))).body(data[2000..].to_vec()).send().unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(reg.get(&format!("/v2/team/app/blobs/{d}")).bytes().unwrap().as_ref(), data.as_slice());
}

#[test]
fn push_upload_status_and_cancel() {
    let reg = start();
    let loc = reg.open_upload("team/app");
    let r = reg.get(&loc);
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "range"), "0-0");
    assert_eq!(location(&r), loc);
    assert_eq!(reg.snapshot().uploads.len(), 1, "a session's data is on disk while open");
    assert_eq!(patch(&reg, &loc, b"partial", 0).status(), 202);

    assert_eq!(reg.delete(&loc).status(), 204);
    assert_error(reg.get(&loc), 404, "BLOB_UPLOAD_UNKNOWN");
    assert_error(patch(&reg, &loc, b"more", 7), 404, "BLOB_UPLOAD_UNKNOWN");
    assert_error(reg.delete(&loc), 404, "BLOB_UPLOAD_UNKNOWN");
    let s = reg.snapshot();
    assert!(s.uploads.is_empty() && s.blobs.is_empty(), "{s:?}");
}

#[test]
fn push_empty_and_empty_json_blobs() {
    let reg = start();
    for data in [&b""[..], b"{}"] {
        let d = reg.push_blob("team/app", data);
        let h = reg.head(&format!("/v2/team/app/blobs/{d}"));
        assert_eq!(h.status(), 200);
        assert_eq!(header(&h, "content-length"), data.len().to_string());
        assert_eq!(reg.get(&format!("/v2/team/app/blobs/{d}")).bytes().unwrap().as_ref(), data);
        assert_eq!(reg.delete(&format!("/v2/team/app/blobs/{d}")).status(), 202);
    }
    assert_eq!(digest(b"{}"), "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a");
}

#[test]
fn push_cross_repository_mount() {
    let reg = start();
    let data = random_bytes(4096, 7);
    let d = reg.push_blob("team/a", &data);

    let r = reg.req(Method::POST, &format!("/v2/team/b/blobs/uploads/?mount={d}&from=team/a")).send().unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(location(&r), format!("/v2/team/b/blobs/{d}"));
    assert_eq!(header(&r, "docker-content-digest"), d);
    assert_eq!(reg.get(&location(&r)).bytes().unwrap().as_ref(), data.as_slice());

    // Not in the source: a plain upload session.
    let missing = digest(b"hello world");
    let r = reg.req(Method::POST, &format!("/v2/team/b/blobs/uploads/?mount={missing}&from=team/a")).send().unwrap();
    assert_eq!(r.status(), 202);
    assert!(location(&r).starts_with("/v2/team/b/blobs/uploads/"));
    // No `from` (OCI 1.1 automatic content discovery): found in team/a, linked at once.
    let r = reg.req(Method::POST, &format!("/v2/team/d/blobs/uploads/?mount={d}")).send().unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(location(&r), format!("/v2/team/d/blobs/{d}"));
    assert_eq!(reg.get(&format!("/v2/team/d/blobs/{d}")).bytes().unwrap().as_ref(), data.as_slice());
    // ...but only what some repository holds.
    let r = reg.req(Method::POST, &format!("/v2/team/d/blobs/uploads/?mount={missing}")).send().unwrap();
    assert_eq!(r.status(), 202);
    assert!(location(&r).starts_with("/v2/team/d/blobs/uploads/"));
    // A source that never had it lends nothing, and the target still cannot see it.
    let r = reg.req(Method::POST, &format!("/v2/team/c/blobs/uploads/?mount={d}&from=team/nothing")).send().unwrap();
    assert_eq!(r.status(), 202);
    // A source outside every namespace cannot be named.
    let r = reg.req(Method::POST, &format!("/v2/team/c/blobs/uploads/?mount={d}&from=elsewhere/a")).send().unwrap();
    assert_eq!(r.status(), 202);
    assert_error(reg.get(&format!("/v2/team/c/blobs/{d}")), 404, "BLOB_UNKNOWN");
    // The session a failed mount opened works like any other.
    let loc = location(&r);
    let r = reg.req(Method::PUT, &format!("{loc}?digest={d}")).body(data.clone()).send().unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(reg.get(&format!("/v2/team/c/blobs/{d}")).status(), 200);
    assert_eq!(reg.berth.stored_blobs().len(), 1, "one copy however many repositories link it");
}

#[test]
fn push_expect_100_continue() {
    let reg = start();
    let data = random_bytes(20_000, 8);
    let d = digest(&data);
    let mut s = TcpStream::connect(reg.berth.host()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /v2/team/app/blobs/uploads/?digest={d} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        reg.berth.host(),
        data.len()
    )
    .unwrap();
    let interim = read_head(&mut s);
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    s.write_all(&data).unwrap();
    let r = read_response(&mut s, false);
    assert_eq!(r.status, 201, "{}", r.head);
    assert_eq!(raw_header(&r.head, "docker-content-digest").as_deref(), Some(d.as_str()));
    assert_eq!(reg.berth.stored_blob(&d).unwrap(), data);
}

#[test]
fn push_expect_100_continue_refused_before_the_body() {
    let reg = start();
    let before = reg.snapshot();
    let d = digest(b"never sent");
    for (path, status, code) in [
        (format!("/v2/elsewhere/app/blobs/uploads/?digest={d}"), 404, "NAME_UNKNOWN"),
        (format!("/v2/team/App/blobs/uploads/?digest={d}"), 400, "NAME_INVALID"),
        ("/v2/team/app/manifests/v1".to_string(), 413, "SIZE_INVALID"),
    ] {
        let len = if status == 413 { 5 << 20 } else { 10 };
        let mut s = TcpStream::connect(reg.berth.host()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let method = if path.contains("manifests") { "PUT" } else { "POST" };
        write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\nExpect: 100-continue\r\n\r\n").unwrap();
        // The final answer comes straight away: no 100, so the client never sends the body.
        let r = read_response(&mut s, false);
        assert_eq!(r.status, status, "{path}: {}", r.head);
        assert_eq!(raw_code(&r), code);
    }
    assert_eq!(reg.snapshot(), before);
}

#[test]
fn push_concurrent_pushes_of_one_blob_both_succeed_with_one_file() {
    let reg = start();
    let data = random_bytes(8 << 20, 9);
    let d = digest(&data);
    let locs: Vec<String> = (0..2)
        .map(|_| {
            let loc = reg.open_upload("team/app");
            let r = reg.req(Method::PATCH, &loc).body(data.clone()).send().unwrap();
            assert_eq!(r.status(), 202);
            location(&r)
        })
        .collect();
    let barrier = std::sync::Barrier::new(2);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = locs
            .iter()
            .map(|loc| {
                let (reg, barrier, d) = (&reg, &barrier, &d);
                s.spawn(move || {
                    barrier.wait();
                    reg.req(Method::PUT, &format!("{loc}?digest={d}")).send().unwrap().status().as_u16()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses, [201, 201]);
    // And two monolithic pushes racing each other through separate repositories.
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = ["team/x", "team/y"]
            .iter()
            .map(|repo| {
                let (reg, barrier, d, data) = (&reg, &barrier, &d, &data);
                s.spawn(move || {
                    barrier.wait();
                    reg.req(Method::POST, &format!("/v2/{repo}/blobs/uploads/?digest={d}"))
                        .body(data.clone())
                        .send()
                        .unwrap()
                        .status()
                        .as_u16()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses, [201, 201]);
    let snap = reg.snapshot();
    assert_eq!(snap.blobs.len(), 1, "{:?}", snap.blobs);
    assert!(snap.tmp.is_empty() && snap.uploads.is_empty(), "{snap:?}");
    assert_eq!(reg.berth.stored_blob(&d).unwrap(), data);
    for repo in ["team/app", "team/x", "team/y"] {
        assert_eq!(reg.get(&format!("/v2/{repo}/blobs/{d}")).bytes().unwrap().len(), data.len());
    }
}

#[test]
fn push_sha512_blobs_and_manifests() {
    let reg = start();
    let data = random_bytes(10_000, 10);
    let d512 = format!("sha512:{}", hex::encode(<sha2::Sha512 as sha2::Digest>::digest(&data)));
    // Monolithic.
    let r = reg.req(Method::POST, &format!("/v2/team/app/blobs/uploads/?digest={d512}")).body(data.clone()).send().unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "docker-content-digest"), d512);
    assert!(reg.berth.stored_blob(&d512).is_some());
    let h = reg.head(&format!("/v2/team/app/blobs/{d512}"));
    assert_eq!(h.status(), 200);
    assert_eq!(header(&h, "docker-content-digest"), d512);
    assert_eq!(reg.get(&format!("/v2/team/app/blobs/{d512}")).bytes().unwrap().as_ref(), data.as_slice());
    // Chunked, committed under sha512.
    let other = random_bytes(5000, 11);
    let o512 = format!("sha512:{}", hex::encode(<sha2::Sha512 as sha2::Digest>::digest(&other)));
    let loc = reg.open_upload("team/app");
    let r = patch(&reg, &loc, &other[..2500], 0);
    let r = reg.req(Method::PUT, &format!("{}?digest={o512}", location(&r))).body(other[2500..].to_vec()).send().unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(reg.get(&format!("/v2/team/app/blobs/{o512}")).bytes().unwrap().as_ref(), other.as_slice());
    // A wrong sha512 is refused like a wrong sha256.
    let wrong = format!("sha512:{}", "0".repeat(128));
    let r = reg.req(Method::POST, &format!("/v2/team/app/blobs/uploads/?digest={wrong}")).body(data.clone()).send().unwrap();
    assert_error(r, 400, "DIGEST_INVALID");
    assert!(reg.berth.stored_blob(&wrong).is_none());

    // A manifest addressed by its sha512 digest.
    let config = b"{\"os\":\"linux\"}".to_vec();
    reg.push_blob("team/app", &config);
    let m = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &config),
        "layers": [{"mediaType": OCI_LAYER, "digest": d512, "size": data.len()}]}))
    .unwrap();
    let m512 = format!("sha512:{}", hex::encode(<sha2::Sha512 as sha2::Digest>::digest(&m)));
    let r = reg.put_manifest("team/app", &m512, OCI_MANIFEST, &m);
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "docker-content-digest"), m512);
    let g = reg.get(&format!("/v2/team/app/manifests/{m512}"));
    assert_eq!(g.status(), 200);
    assert_eq!(header(&g, "docker-content-digest"), m512);
    assert_eq!(g.bytes().unwrap().as_ref(), m.as_slice());
}

// ---- push: manifests ----

#[test]
fn push_docker_v2_manifest_by_tag_and_by_digest() {
    let reg = start();
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec();
    let layer = random_bytes(2048, 12);
    reg.push_blob("team/app", &config);
    reg.push_blob("team/app", &layer);
    let m = image_manifest(DOCKER_MANIFEST, DOCKER_CONFIG, &config, &[(DOCKER_LAYER, &layer)]);
    let d = digest(&m);
    // By digest first: no tag appears.
    let r = reg.put_manifest("team/app", &d, DOCKER_MANIFEST, &m);
    assert_eq!(r.status(), 201);
    assert_eq!(location(&r), format!("/v2/team/app/manifests/{d}"));
    assert_eq!(header(&r, "docker-content-digest"), d);
    assert!(reg.tags("team/app").is_empty());
    // Then by tag.
    reg.put_manifest_ok("team/app", "1.0", DOCKER_MANIFEST, &m);
    assert_eq!(reg.tags("team/app"), ["1.0"]);
    for reference in ["1.0", d.as_str()] {
        let g = reg.get(&format!("/v2/team/app/manifests/{reference}"));
        assert_eq!(header(&g, "content-type"), DOCKER_MANIFEST);
        assert_eq!(header(&g, "docker-content-digest"), d);
        assert_eq!(g.bytes().unwrap().as_ref(), m.as_slice());
    }
}

#[test]
fn push_docker_manifest_list() {
    let reg = start();
    let mut children = Vec::new();
    for arch in ["amd64", "arm64"] {
        let config = format!("{{\"architecture\":\"{arch}\",\"os\":\"linux\"}}").into_bytes();
        let layer = format!("{arch} layer").into_bytes();
        reg.push_blob("team/multi", &config);
        reg.push_blob("team/multi", &layer);
        let m = image_manifest(DOCKER_MANIFEST, DOCKER_CONFIG, &config, &[(DOCKER_LAYER, &layer)]);
        reg.put_manifest_ok("team/multi", &digest(&m), DOCKER_MANIFEST, &m);
        children.push((m, arch));
    }
    let list = index(DOCKER_LIST, &children.iter().map(|(m, a)| (DOCKER_MANIFEST, m.as_slice(), *a)).collect::<Vec<_>>());
    let d = reg.put_manifest_ok("team/multi", "latest", DOCKER_LIST, &list);
    let h = reg.head("/v2/team/multi/manifests/latest");
    assert_eq!(header(&h, "content-type"), DOCKER_LIST);
    assert_eq!(header(&h, "docker-content-digest"), d);
    assert_eq!(header(&h, "content-length"), list.len().to_string());
    for (m, _) in &children {
        assert_eq!(reg.get(&format!("/v2/team/multi/manifests/{}", digest(m))).bytes().unwrap().as_ref(), m.as_slice());
    }
}

#[test]
fn push_oci_index_multi_arch_and_nested() {
    let reg = start();
    let a = reg.push_image("team/idx", "amd64", "amd64");
    let b = reg.push_image("team/idx", "arm64", "arm64");
    let idx = index(OCI_INDEX, &[(OCI_MANIFEST, &a.manifest, "amd64"), (OCI_MANIFEST, &b.manifest, "arm64")]);
    let d = reg.put_manifest_ok("team/idx", "multi", OCI_INDEX, &idx);
    let g = reg.get("/v2/team/idx/manifests/multi");
    assert_eq!(header(&g, "content-type"), OCI_INDEX);
    assert_eq!(header(&g, "docker-content-digest"), d);
    assert_eq!(g.bytes().unwrap().as_ref(), idx.as_slice());
    // An index of indexes.
    let nested =
        serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor(OCI_INDEX, &idx)]})).unwrap();
    reg.put_manifest_ok("team/idx", "nested", OCI_INDEX, &nested);
    // An empty index is a valid index.
    let empty = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})).unwrap();
    reg.put_manifest_ok("team/idx", "empty", OCI_INDEX, &empty);
    assert_eq!(reg.tags("team/idx"), ["amd64", "arm64", "empty", "multi", "nested"]);
}

#[test]
fn push_artifacts_and_custom_fields() {
    // The newer suite's data sets: an artifact, an artifact without layers, an artifact index,
    // and manifests carrying fields no spec defines. All stored and served as pushed.
    let reg = start();
    let empty = b"{}".to_vec();
    let payload = b"sbom contents".to_vec();
    reg.push_blob("team/art", &empty);
    reg.push_blob("team/art", &payload);
    let artifact = serde_json::to_vec_pretty(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sbom", "config": descriptor(OCI_EMPTY, &empty),
        "layers": [descriptor("application/spdx+json", &payload)], "org.example.custom": {"any": ["thing", 1]}}))
    .unwrap();
    let bare = serde_json::to_vec_pretty(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.signal", "config": descriptor(OCI_EMPTY, &empty), "layers": [],
        "annotations": {"org.example.note": "no layers at all"}}))
    .unwrap();
    let art_index = serde_json::to_vec_pretty(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
        "artifactType": "application/vnd.example.bundle",
        "manifests": [descriptor(OCI_MANIFEST, &artifact), descriptor(OCI_MANIFEST, &bare)], "org.example.custom": true}))
    .unwrap();
    for (tag, mt, body) in [("sbom", OCI_MANIFEST, &artifact), ("bare", OCI_MANIFEST, &bare), ("bundle", OCI_INDEX, &art_index)] {
        let d = reg.put_manifest_ok("team/art", tag, mt, body);
        let g = reg.get(&format!("/v2/team/art/manifests/{tag}"));
        assert_eq!(header(&g, "content-type"), mt);
        assert_eq!(header(&g, "docker-content-digest"), d);
        assert_eq!(g.bytes().unwrap().as_ref(), body.as_slice());
    }
    // An uncompressed layer type is just another blob.
    let tar = random_bytes(1024, 15);
    reg.push_blob("team/art", &tar);
    let config = br#"{"os":"linux"}"#.to_vec();
    reg.push_blob("team/art", &config);
    let m = image_manifest(OCI_MANIFEST, OCI_CONFIG, &config, &[("application/vnd.oci.image.layer.v1.tar", &tar)]);
    reg.put_manifest_ok("team/art", "uncompressed", OCI_MANIFEST, &m);
}

#[test]
fn push_manifest_with_no_layers_and_unknown_fields() {
    let reg = start();
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    reg.push_blob("team/app", &config);
    // The suite's "empty layer" manifest: data and unspecified fields in the descriptor.
    let m = serde_json::to_vec_pretty(&json!({"schemaVersion": 2,
        "config": {"mediaType": OCI_CONFIG, "digest": digest(&config), "size": config.len(),
                   "data": "eyJhcmNoaXRlY3R1cmUiOiJhbWQ2NCIsIm9zIjoibGludXgifQ==", "newUnspecifiedField": "aGVsbG8gd29ybGQ="},
        "layers": []}))
    .unwrap();
    let d = reg.put_manifest_ok("team/app", "emptylayer", OCI_MANIFEST, &m);
    let g = reg.get(&format!("/v2/team/app/manifests/{d}"));
    assert_eq!(header(&g, "content-type"), OCI_MANIFEST);
    assert_eq!(g.bytes().unwrap().as_ref(), m.as_slice());
}

#[test]
fn push_other_media_types_are_stored_as_given() {
    let reg = start();
    let body = br#"{"kind":"something else","v":1}"#;
    let mt = "application/vnd.example.thing.v1+json";
    let d = reg.put_manifest_ok("team/app", "thing", mt, body);
    let h = reg.head("/v2/team/app/manifests/thing");
    assert_eq!(header(&h, "content-type"), mt);
    assert_eq!(header(&h, "docker-content-digest"), d);
    assert_eq!(reg.get(&format!("/v2/team/app/manifests/{d}")).bytes().unwrap().as_ref(), body);
}

#[test]
fn push_manifest_bytes_are_served_exactly_as_pushed() {
    let reg = start();
    let config = br#"{"os":"linux"}"#.to_vec();
    let layer = b"layer".to_vec();
    reg.push_blob("team/app", &config);
    reg.push_blob("team/app", &layer);
    // Tabs, CRLF, odd spacing, key order nobody would choose, an escaped character and a
    // trailing newline: any re-serialisation would change the digest.
    let m = format!(
        "{{\r\n\t\"layers\" :[ {{\"size\":{},\"digest\":  \"{}\",\"mediaType\":\"{OCI_LAYER}\"}}\t],\n  \"schemaVersion\"  :  2,\n\"config\":{{\"size\":{},  \"mediaType\":\"{OCI_CONFIG}\",\"digest\":\"{}\"}},\"mediaType\":\"{OCI_MANIFEST}\",\"annotations\":{{\"note\":\"caf\\u00e9 \u{2603}\"}}  }}\n\n",
        layer.len(),
        digest(&layer),
        config.len(),
        digest(&config)
    )
    .into_bytes();
    let d = reg.put_manifest_ok("team/app", "odd", OCI_MANIFEST, &m);
    for reference in ["odd", d.as_str()] {
        let g = reg.get(&format!("/v2/team/app/manifests/{reference}"));
        assert_eq!(header(&g, "content-length"), m.len().to_string());
        let got = g.bytes().unwrap();
        assert_eq!(got.as_ref(), m.as_slice());
        assert_eq!(digest(&got), d);
    }
}

#[test]
fn push_manifest_at_exactly_4_mib_is_accepted() {
    let reg = start();
    let config = br#"{"os":"linux"}"#.to_vec();
    reg.push_blob("team/app", &config);
    let m = padded_manifest(&config, 4 << 20);
    assert_eq!(m.len(), 4 << 20);
    let d = reg.put_manifest_ok("team/app", "big", OCI_MANIFEST, &m);
    assert_eq!(reg.get(&format!("/v2/team/app/manifests/{d}")).bytes().unwrap().len(), 4 << 20);
}

/// An OCI manifest padded with an annotation to exactly `size` bytes.
fn padded_manifest(config: &[u8], size: usize) -> Vec<u8> {
    let build = |pad: usize| {
        serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor(OCI_CONFIG, config),
            "layers": [], "annotations": {"pad": "a".repeat(pad)}}))
        .unwrap()
    };
    let base = build(0).len();
    build(size - base)
}

// ---- content discovery ----

#[test]
fn discovery_tags_list_sorted_with_n_last_and_link() {
    let reg = start();
    let img = reg.push_image("team/app", "v0", "tags");
    let mut tags: Vec<String> = ["latest", "v1", "v2", "A", "b", "_x", "1.0"].iter().map(|s| s.to_string()).collect();
    for t in &tags {
        reg.put_manifest_ok("team/app", t, OCI_MANIFEST, &img.manifest);
    }
    tags.push("v0".into());
    tags.sort();
    let all = reg.get("/v2/team/app/tags/list");
    assert_eq!(all.status(), 200);
    assert!(header(&all, "link").is_empty(), "one page, no Link");
    let v: Value = all.json().unwrap();
    assert_eq!(v["name"], "team/app");
    assert_eq!(v["tags"], json!(tags));

    // Walk every page of 3 through the Link header.
    let mut seen = Vec::new();
    let mut next = Some("/v2/team/app/tags/list?n=3".to_string());
    let mut pages = 0;
    while let Some(url) = next.take() {
        pages += 1;
        assert!(pages <= tags.len(), "pagination does not terminate");
        let r = reg.get(&url);
        assert_eq!(r.status(), 200);
        let link = header(&r, "link");
        let v: Value = r.json().unwrap();
        let page: Vec<String> = v["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
        assert!(page.len() <= 3);
        seen.extend(page);
        if !link.is_empty() {
            assert!(link.ends_with("; rel=\"next\""), "{link}");
            let target = link.trim_start_matches('<').split('>').next().unwrap();
            assert!(target.starts_with("/v2/team/app/tags/list?") && target.contains("n=3"), "{link}");
            next = Some(target.to_string());
        }
    }
    assert_eq!(seen, tags);
    assert_eq!(pages, tags.len().div_ceil(3));

    let r: Value = reg.get(&format!("/v2/team/app/tags/list?n=2&last={}", tags[2])).json().unwrap();
    assert_eq!(r["tags"], json!(tags[3..5]));
    let r: Value = reg.get(&format!("/v2/team/app/tags/list?last={}", tags[tags.len() - 1])).json().unwrap();
    assert_eq!(r["tags"], json!([]));
    let r = reg.get("/v2/team/app/tags/list?n=0");
    assert_eq!(r.status(), 200);
    assert!(header(&r, "link").is_empty(), "an empty page links nowhere");
    assert_eq!(r.json::<Value>().unwrap()["tags"], json!([]));
}

#[test]
fn discovery_tags_n_is_clamped_to_1000() {
    let reg = start();
    let img = reg.push_image("team/many", "t0000", "many");
    for i in 1..1005 {
        let r = reg.put_manifest("team/many", &format!("t{i:04}"), OCI_MANIFEST, &img.manifest);
        assert_eq!(r.status(), 201);
    }
    for query in ["?n=5000", ""] {
        let r = reg.get(&format!("/v2/team/many/tags/list{query}"));
        assert_eq!(r.status(), 200);
        let link = header(&r, "link");
        assert_eq!(link, "</v2/team/many/tags/list?n=1000&last=t0999>; rel=\"next\"", "{query}");
        let v: Value = r.json().unwrap();
        assert_eq!(v["tags"].as_array().unwrap().len(), 1000);
        let rest: Value = reg.get(link.trim_start_matches('<').split('>').next().unwrap()).json().unwrap();
        assert_eq!(rest["tags"], json!(["t1000", "t1001", "t1002", "t1003", "t1004"]));
    }
}

#[test]
fn discovery_catalog_with_pagination() {
    let reg = start();
    let names = ["team/c", "team/a", "team/b/deep", "team", "team/d"];
    for n in names {
        reg.push_blob(n, n.as_bytes());
    }
    let mut sorted: Vec<&str> = names.to_vec();
    sorted.sort();
    let v: Value = reg.get("/v2/_catalog").json().unwrap();
    assert_eq!(v["repositories"], json!(sorted));
    let r = reg.get("/v2/_catalog?n=2");
    assert_eq!(header(&r, "link"), format!("</v2/_catalog?n=2&last={}>; rel=\"next\"", sorted[1].replace('/', "%2F")));
    assert_eq!(r.json::<Value>().unwrap()["repositories"], json!(sorted[..2]));
    let r = reg.get(&format!("/v2/_catalog?n=2&last={}", sorted[1]));
    assert_eq!(r.json::<Value>().unwrap()["repositories"], json!(sorted[2..4]));
    let r = reg.get(&format!("/v2/_catalog?n=2&last={}", sorted[3]));
    assert!(header(&r, "link").is_empty());
    assert_eq!(r.json::<Value>().unwrap()["repositories"], json!(sorted[4..]));
}

#[test]
fn discovery_referrers_with_artifact_type_filter() {
    let reg = start();
    let subject = reg.push_image("team/app", "subject", "subject");
    let empty = b"{}".to_vec();
    reg.push_blob("team/app", &empty);
    let (type_a, type_b) = ("application/vnd.conformance.a", "application/vnd.conformance.b");
    let (blob_a, blob_b) = (b"referrer a".to_vec(), b"referrer b".to_vec());
    reg.push_blob("team/app", &blob_a);
    reg.push_blob("team/app", &blob_b);
    let subject_desc = descriptor(OCI_MANIFEST, &subject.manifest);
    let annotated = |mut m: Value, note: &str| {
        m["subject"] = subject_desc.clone();
        m["annotations"] = json!({"org.opencontainers.conformance": note});
        serde_json::to_vec_pretty(&m).unwrap()
    };
    // artifactType from the config's media type, and from `artifactType` with an empty config.
    let config_a = annotated(
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor(type_a, &blob_a), "layers": [descriptor(OCI_EMPTY, &empty)]}),
        "config a",
    );
    let layer_a = annotated(
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": type_a, "config": descriptor(OCI_EMPTY, &empty), "layers": [descriptor(type_a, &blob_a)]}),
        "layer a",
    );
    let config_b = annotated(
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor(type_b, &blob_b), "layers": [descriptor(OCI_EMPTY, &empty)]}),
        "config b",
    );
    let layer_b = annotated(
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": type_b, "config": descriptor(OCI_EMPTY, &empty), "layers": [descriptor(type_b, &blob_b)]}),
        "layer b",
    );
    let mut pushed = Vec::new();
    for m in [&config_a, &layer_a, &config_b, &layer_b] {
        let r = reg.put_manifest("team/app", &digest(m), OCI_MANIFEST, m);
        assert_eq!(r.status(), 201);
        assert_eq!(header(&r, "oci-subject"), subject.digest);
        pushed.push(digest(m));
    }
    let idx = annotated(
        json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "artifactType": "application/vnd.food.stand",
               "manifests": [descriptor(OCI_MANIFEST, &config_a), descriptor(OCI_MANIFEST, &layer_a)]}),
        "index",
    );
    let r = reg.put_manifest("team/app", &digest(&idx), OCI_INDEX, &idx);
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "oci-subject"), subject.digest);
    pushed.push(digest(&idx));

    // A referrer whose subject was never pushed is accepted and listed.
    let ghost = digest(b"missing content");
    let orphan = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": type_b,
        "config": descriptor(OCI_EMPTY, &empty), "layers": [descriptor(type_b, &blob_b)],
        "subject": {"mediaType": OCI_MANIFEST, "digest": ghost, "size": 123}}))
    .unwrap();
    let r = reg.put_manifest("team/app", &digest(&orphan), OCI_MANIFEST, &orphan);
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "oci-subject"), ghost);

    let r = reg.get(&format!("/v2/team/app/referrers/{}", subject.digest));
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), OCI_INDEX);
    assert!(header(&r, "oci-filters-applied").is_empty());
    let v: Value = r.json().unwrap();
    assert_eq!(v["schemaVersion"], 2);
    assert_eq!(v["mediaType"], OCI_INDEX);
    let list = v["manifests"].as_array().unwrap();
    let mut got: Vec<&str> = list.iter().map(|m| m["digest"].as_str().unwrap()).collect();
    got.sort();
    pushed.sort();
    assert_eq!(got, pushed);
    for m in list {
        assert_eq!(m["annotations"].as_object().unwrap().len(), 1, "{m}");
        assert!(m["size"].as_u64().unwrap() > 0);
        assert!(m["mediaType"] == OCI_MANIFEST || m["mediaType"] == OCI_INDEX);
    }
    let by_digest = |d: &str| list.iter().find(|m| m["digest"] == d).unwrap().clone();
    assert_eq!(by_digest(&digest(&config_a))["artifactType"], type_a);
    assert_eq!(by_digest(&digest(&layer_b))["artifactType"], type_b);
    assert_eq!(by_digest(&digest(&idx))["artifactType"], "application/vnd.food.stand");
    assert_eq!(by_digest(&digest(&idx))["mediaType"], OCI_INDEX);

    let r = reg.get(&format!("/v2/team/app/referrers/{}?artifactType={type_a}", subject.digest));
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "oci-filters-applied"), "artifactType");
    let v: Value = r.json().unwrap();
    let mut got: Vec<&str> = v["manifests"].as_array().unwrap().iter().map(|m| m["digest"].as_str().unwrap()).collect();
    got.sort();
    let mut want = vec![digest(&config_a), digest(&layer_a)];
    want.sort();
    assert_eq!(got, want);

    let v: Value = reg.get(&format!("/v2/team/app/referrers/{ghost}")).json().unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(v["manifests"][0]["digest"], digest(&orphan));

    // Nothing refers to a digest nobody pushed: an empty index, not an error.
    let r = reg.get(&format!("/v2/team/app/referrers/{}", digest(b"hello world")));
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), OCI_INDEX);
    assert_eq!(r.json::<Value>().unwrap()["manifests"], json!([]));
    // Referrers are per repository.
    let v: Value = reg.get(&format!("/v2/team/other/referrers/{}", subject.digest)).json().unwrap();
    assert_eq!(v["manifests"], json!([]));

    // Deleting a referrer removes it from the list.
    assert_eq!(reg.delete(&format!("/v2/team/app/manifests/{}", digest(&layer_a))).status(), 202);
    let v: Value = reg.get(&format!("/v2/team/app/referrers/{}?artifactType={type_a}", subject.digest)).json().unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
}

// ---- content management ----

#[test]
fn management_delete_manifest_by_tag() {
    let reg = start();
    let img = reg.push_image("team/app", "keep", "del");
    reg.put_manifest_ok("team/app", "drop", OCI_MANIFEST, &img.manifest);
    assert_eq!(reg.tags("team/app"), ["drop", "keep"]);
    assert_eq!(reg.delete("/v2/team/app/manifests/drop").status(), 202);
    assert_eq!(reg.tags("team/app"), ["keep"]);
    assert_error(reg.get("/v2/team/app/manifests/drop"), 404, "MANIFEST_UNKNOWN");
    assert_eq!(reg.get(&format!("/v2/team/app/manifests/{}", img.digest)).status(), 200, "the revision stays");
    assert_error(reg.delete("/v2/team/app/manifests/drop"), 404, "MANIFEST_UNKNOWN");
}

#[test]
fn management_delete_manifest_by_digest_removes_its_tags() {
    let reg = start();
    let img = reg.push_image("team/app", "a", "del");
    let other = reg.push_image("team/app", "other", "other");
    reg.put_manifest_ok("team/app", "b", OCI_MANIFEST, &img.manifest);
    assert_eq!(reg.tags("team/app"), ["a", "b", "other"]);
    assert_eq!(reg.delete(&format!("/v2/team/app/manifests/{}", img.digest)).status(), 202);
    assert_error(reg.get(&format!("/v2/team/app/manifests/{}", img.digest)), 404, "MANIFEST_UNKNOWN");
    assert_eq!(reg.head("/v2/team/app/manifests/a").status(), 404);
    assert_eq!(reg.tags("team/app"), ["other"]);
    assert_eq!(reg.get(&format!("/v2/team/app/manifests/{}", other.digest)).status(), 200);
    assert_error(reg.delete(&format!("/v2/team/app/manifests/{}", img.digest)), 404, "MANIFEST_UNKNOWN");
    // Survives a restart: the deletion reached the disk.
    let mut reg = reg;
    reg.berth.restart();
    assert_eq!(reg.tags("team/app"), ["other"]);
    assert_eq!(reg.get(&format!("/v2/team/app/manifests/{}", img.digest)).status(), 404);
}

#[test]
fn management_delete_blob() {
    let reg = start();
    let d = reg.push_blob("team/app", b"to be deleted");
    let keep = reg.push_blob("team/app", b"to be kept");
    assert_eq!(reg.delete(&format!("/v2/team/app/blobs/{d}")).status(), 202);
    assert_error(reg.get(&format!("/v2/team/app/blobs/{d}")), 404, "BLOB_UNKNOWN");
    assert_eq!(reg.head(&format!("/v2/team/app/blobs/{d}")).status(), 404);
    assert_error(reg.delete(&format!("/v2/team/app/blobs/{d}")), 404, "BLOB_UNKNOWN");
    assert_eq!(reg.get(&format!("/v2/team/app/blobs/{keep}")).status(), 200);
    // A deleted blob can no longer back a manifest in that repository.
    let m = image_manifest(OCI_MANIFEST, OCI_CONFIG, b"to be deleted", &[]);
    assert_error(reg.put_manifest("team/app", "v1", OCI_MANIFEST, &m), 400, "MANIFEST_BLOB_UNKNOWN");
}

#[test]
fn blob_range_requests() {
    let reg = start();
    let data = random_bytes(2048, 13);
    let d = reg.push_blob("team/app", &data);
    let url = format!("/v2/team/app/blobs/{d}");
    for (range, from, to) in [
        ("bytes=500-1499", 500, 1499),
        ("bytes=500-", 500, 2047),
        ("bytes=-500", 1548, 2047),
        ("bytes=2000-5000", 2000, 2047),
        ("bytes=0-0", 0, 0),
    ] {
        let r = reg.req(Method::GET, &url).header("Range", range).send().unwrap();
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(header(&r, "content-range"), format!("bytes {from}-{to}/2048"), "{range}");
        assert_eq!(header(&r, "content-length"), (to - from + 1).to_string(), "{range}");
        assert_eq!(header(&r, "docker-content-digest"), d);
        assert_eq!(r.bytes().unwrap().as_ref(), &data[from..=to], "{range}");
    }
    for range in ["bytes=500-0", "bytes=5000-10000", "bytes=2048-"] {
        let r = reg.req(Method::GET, &url).header("Range", range).send().unwrap();
        assert_eq!(header(&r, "content-range"), "bytes */2048", "{range}");
        assert_error(r, 416, "BLOB_UPLOAD_INVALID");
    }
    let r = reg.get(&url);
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "accept-ranges"), "bytes");
}

#[test]
fn blob_range_headers_off_the_grammar_are_ignored() {
    // RFC 9110 section 14.2: a Range header that does not parse is ignored, and the whole blob
    // is the answer; one that parses but selects nothing is 416.
    let reg = start();
    let data = random_bytes(2048, 14);
    let d = reg.push_blob("team/app", &data);
    let url = format!("/v2/team/app/blobs/{d}");
    for range in ["bytes=x-1", "bytes=5", "bytes=", "bytes=--5", "bytes=0-1,x", "bytes=1-2-3", "bytes 0-4"] {
        for m in [Method::GET, Method::HEAD] {
            let r = reg.req(m.clone(), &url).header("Range", range).send().unwrap();
            assert_eq!(r.status(), 200, "{m} {range}");
            assert_eq!(header(&r, "content-range"), "", "{m} {range}");
            assert_eq!(header(&r, "content-length"), "2048", "{m} {range}");
            if m == Method::GET {
                assert_eq!(r.bytes().unwrap().as_ref(), data.as_slice(), "{range}");
            }
        }
    }
    // Several ranges that the blob can satisfy: the whole blob, as before.
    let r = reg.req(Method::GET, &url).header("Range", "bytes=0-9,100-109").send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().as_ref(), data.as_slice());
    // Several ranges of which none is in the blob, and an empty suffix: nothing to send.
    for range in ["bytes=5000-6000,7000-", "bytes=-0"] {
        let r = reg.req(Method::GET, &url).header("Range", range).send().unwrap();
        assert_eq!(header(&r, "content-range"), "bytes */2048", "{range}");
        assert_error(r, 416, "BLOB_UPLOAD_INVALID");
    }
}

// ---- isolation ----

#[test]
fn repositories_are_isolated() {
    let reg = start();
    let img = reg.push_image("team/a", "v1", "iso");
    let d = digest(&img.layer);
    for m in [Method::GET, Method::HEAD] {
        assert_eq!(reg.req(m.clone(), &format!("/v2/team/b/blobs/{d}")).send().unwrap().status(), 404);
        assert_eq!(reg.req(m, &format!("/v2/team/b/manifests/{}", img.digest)).send().unwrap().status(), 404);
    }
    assert_error(reg.get(&format!("/v2/team/b/blobs/{d}")), 404, "BLOB_UNKNOWN");
    assert_error(reg.get(&format!("/v2/team/b/manifests/{}", img.digest)), 404, "MANIFEST_UNKNOWN");
    // The manifest digest is not a blob of another repository either.
    assert_error(reg.get(&format!("/v2/team/b/blobs/{}", img.digest)), 404, "BLOB_UNKNOWN");
    // Nor can team/b reference what only team/a holds, or delete it.
    let before = reg.snapshot();
    assert_error(reg.put_manifest("team/b", "v1", OCI_MANIFEST, &img.manifest), 400, "MANIFEST_BLOB_UNKNOWN");
    assert_error(reg.delete(&format!("/v2/team/b/blobs/{d}")), 404, "BLOB_UNKNOWN");
    assert_eq!(reg.snapshot(), before);
    // Uploads are per repository too.
    let loc = reg.open_upload("team/a");
    let stolen = loc.replace("/team/a/", "/team/b/");
    assert_error(reg.get(&stolen), 404, "BLOB_UPLOAD_UNKNOWN");
    assert_error(reg.req(Method::PUT, &format!("{stolen}?digest={}", digest(b""))).send().unwrap(), 404, "BLOB_UPLOAD_UNKNOWN");
    assert_eq!(reg.get(&loc).status(), 204, "the owner's session is untouched");
    assert_eq!(reg.get(&format!("/v2/team/a/blobs/{d}")).status(), 200);
}

// ---- errors: status, code, and nothing stored ----

#[test]
fn error_manifest_blob_unknown() {
    let reg = start();
    let config = br#"{"os":"linux"}"#.to_vec();
    let layer = b"present layer".to_vec();
    reg.push_blob("team/app", &config);
    reg.push_blob("team/app", &layer);
    let missing = b"missing layer".to_vec();
    let cases = [
        image_manifest(OCI_MANIFEST, OCI_CONFIG, &config, &[(OCI_LAYER, &layer), (OCI_LAYER, &missing)]),
        image_manifest(OCI_MANIFEST, OCI_CONFIG, b"missing config", &[(OCI_LAYER, &layer)]),
        image_manifest(DOCKER_MANIFEST, DOCKER_CONFIG, &config, &[(DOCKER_LAYER, &missing)]),
        index(OCI_INDEX, &[(OCI_MANIFEST, b"{\"not\":\"pushed\"}", "amd64")]),
        index(DOCKER_LIST, &[(DOCKER_MANIFEST, b"{\"not\":\"pushed\"}", "amd64")]),
    ];
    let before = reg.snapshot();
    for m in &cases {
        let mt = serde_json::from_slice::<Value>(m).unwrap()["mediaType"].as_str().unwrap().to_string();
        let v = assert_error(reg.put_manifest("team/app", "v1", &mt, m), 400, "MANIFEST_BLOB_UNKNOWN");
        assert!(v["errors"][0]["detail"]["digest"].is_string(), "{v}");
        assert_error(reg.put_manifest("team/app", &digest(m), &mt, m), 400, "MANIFEST_BLOB_UNKNOWN");
        assert_eq!(reg.get(&format!("/v2/team/app/manifests/{}", digest(m))).status(), 404);
    }
    assert_eq!(reg.snapshot(), before);
    assert!(reg.tags("team/app").is_empty());
}

#[test]
fn error_manifest_too_large() {
    let reg = start();
    let config = br#"{"os":"linux"}"#.to_vec();
    reg.push_blob("team/app", &config);
    let m = padded_manifest(&config, (4 << 20) + 1);
    let before = reg.snapshot();
    // Declared up front, and discovered while streaming (no Content-Length).
    assert_error(reg.put_manifest("team/app", "big", OCI_MANIFEST, &m), 413, "SIZE_INVALID");
    let body = reqwest::blocking::Body::new(std::io::Cursor::new(m.clone()));
    let r = reg
        .req(Method::PUT, &format!("/v2/team/app/manifests/{}", digest(&m)))
        .header("Content-Type", OCI_MANIFEST)
        .body(body)
        .send()
        .unwrap();
    assert_error(r, 413, "SIZE_INVALID");
    assert_eq!(reg.snapshot(), before);
    assert!(reg.tags("team/app").is_empty());
    // The connection-level refusal leaves the registry serving normally.
    assert_eq!(reg.get("/v2/").status(), 200);
}

#[test]
fn error_digest_invalid_on_upload_commit() {
    let reg = start();
    let data = random_bytes(10_000, 14);
    let wrong = digest(b"something else");
    let before = reg.snapshot();
    // Monolithic POST.
    let r = reg.req(Method::POST, &format!("/v2/team/app/blobs/uploads/?digest={wrong}")).body(data.clone()).send().unwrap();
    assert_error(r, 400, "DIGEST_INVALID");
    // POST + PUT.
    let loc = reg.open_upload("team/app");
    assert_error(reg.req(Method::PUT, &format!("{loc}?digest={wrong}")).body(data.clone()).send().unwrap(), 400, "DIGEST_INVALID");
    // Chunked, then an empty PUT.
    let loc = reg.open_upload("team/app");
    let loc = location(&patch(&reg, &loc, &data, 0));
    assert_error(reg.req(Method::PUT, &format!("{loc}?digest={wrong}")).send().unwrap(), 400, "DIGEST_INVALID");
    // Streamed.
    let loc = reg.open_upload("team/app");
    let r = reg.req(Method::PATCH, &loc).body(reqwest::blocking::Body::new(std::io::Cursor::new(data.clone()))).send().unwrap();
    assert_error(reg.req(Method::PUT, &format!("{}?digest={wrong}", location(&r))).send().unwrap(), 400, "DIGEST_INVALID");
    // The last chunk riding on the PUT.
    let loc = reg.open_upload("team/app");
    let loc = location(&patch(&reg, &loc, &data[..5000], 0));
    let r = reg
        .req(Method::PUT, &format!("{loc}?digest={wrong}"))
        .header("Content-Range", format!("5000-{}", data.len() - 1))
        .body(data[5000..].to_vec())
        .send()
        .unwrap();
    assert_error(r, 400, "DIGEST_INVALID");
    // Malformed digests and a commit without one.
    let loc = reg.open_upload("team/app");
    for bad in ["sha256:abc".to_string(), "sha256".into(), "sha256:".into(), format!("sha256:{}", "G".repeat(64))] {
        assert_error(reg.req(Method::PUT, &format!("{loc}?digest={bad}")).body(data.clone()).send().unwrap(), 400, "DIGEST_INVALID");
        let r = reg.req(Method::POST, &format!("/v2/team/app/blobs/uploads/?digest={bad}")).body(data.clone()).send().unwrap();
        assert_error(r, 400, "DIGEST_INVALID");
    }
    let loc = reg.open_upload("team/app");
    assert_error(reg.req(Method::PUT, &loc).body(data.clone()).send().unwrap(), 400, "DIGEST_INVALID");

    let after = reg.snapshot();
    assert_eq!(after.blobs, before.blobs, "no blob was committed");
    assert!(after.tmp.is_empty(), "{:?}", after.tmp);
    assert!(reg.berth.stored_blob(&digest(&data)).is_none() && reg.berth.stored_blob(&wrong).is_none());
    assert_error(reg.get(&format!("/v2/team/app/blobs/{wrong}")), 404, "BLOB_UNKNOWN");
    assert_error(reg.get(&format!("/v2/team/app/blobs/{}", digest(&data))), 404, "BLOB_UNKNOWN");
}

#[test]
fn error_digest_invalid_on_manifest_put_by_digest() {
    let reg = start();
    let img = reg.push_image("team/app", "v1", "dig");
    let before = reg.snapshot();
    // The suite's "bad digest image": two trailing spaces change the bytes, not the meaning.
    let mut padded = img.manifest.clone();
    padded.extend_from_slice(b"  ");
    assert_error(reg.put_manifest("team/app", &img.digest, OCI_MANIFEST, &padded), 400, "DIGEST_INVALID");
    let other = digest(b"another manifest");
    assert_error(reg.put_manifest("team/app", &other, OCI_MANIFEST, &img.manifest), 400, "DIGEST_INVALID");
    assert_error(reg.put_manifest("team/app", "sha256:0123", OCI_MANIFEST, &img.manifest), 400, "DIGEST_INVALID");
    assert_eq!(reg.snapshot(), before);
    assert_error(reg.get(&format!("/v2/team/app/manifests/{other}")), 404, "MANIFEST_UNKNOWN");
    assert_error(reg.get(&format!("/v2/team/app/manifests/{}", digest(&padded))), 404, "MANIFEST_UNKNOWN");
    assert_eq!(reg.get(&format!("/v2/team/app/manifests/{}", img.digest)).bytes().unwrap().as_ref(), img.manifest.as_slice());
}

#[test]
fn error_name_invalid() {
    let reg = start();
    let d = digest(b"x");
    let long = format!("team/{}", "a".repeat(251));
    assert_eq!(long.len(), 256);
    let names = [
        "team/App".to_string(),
        "Team/app".to_string(),
        "team/../team/app".to_string(),
        "team/%2e%2e/app".to_string(),
        "team/%2E/app".to_string(),
        "team//app".to_string(),
        "team\\app".to_string(),
        "team/app\\..\\x".to_string(),
        "team/a%00b".to_string(),
        "team/-app".to_string(),
        "team/app_".to_string(),
        "team/a..b".to_string(),
        long,
    ];
    let before = reg.snapshot();
    for name in &names {
        let cases = [
            ("GET", format!("/v2/{name}/tags/list"), &b""[..]),
            ("GET", format!("/v2/{name}/manifests/latest"), b""),
            ("PUT", format!("/v2/{name}/manifests/latest"), b"{}"),
            ("HEAD", format!("/v2/{name}/blobs/{d}"), b""),
            ("POST", format!("/v2/{name}/blobs/uploads/?digest={d}"), b"x"),
            ("POST", format!("/v2/{name}/blobs/uploads/"), b""),
        ];
        for (method, path, body) in cases {
            let r = raw(&reg.berth, method, &path, &[("Content-Type", OCI_MANIFEST)], body);
            assert_eq!(r.status, 400, "{method} {path}: {}", r.head);
            if method != "HEAD" {
                assert_eq!(raw_code(&r), "NAME_INVALID", "{method} {path}");
            }
        }
    }
    // A raw NUL byte in the request line, and the boundary: 255 characters is a valid name.
    let r = raw(&reg.berth, "GET", "/v2/team/a\0b/tags/list", &[], b"");
    assert_eq!(r.status, 400, "{}", r.head);
    let ok = format!("team/{}", "a".repeat(250));
    let r = reg.req(Method::POST, &format!("/v2/{ok}/blobs/uploads/?digest={d}")).body("x").send().unwrap();
    assert_eq!(r.status(), 201);
    let after = reg.snapshot();
    assert_eq!(after.uploads, before.uploads);
    assert_eq!(after.repositories.len(), 1, "only the valid 255-character name: {:?}", after.repositories);
    assert!(!reg.berth.dir.path().join("app").exists() && !reg.berth.data_dir().join("app").exists());
}

#[test]
fn error_name_unknown_outside_every_namespace() {
    let reg = start();
    let d = digest(b"x");
    let before = reg.snapshot();
    for (m, path) in [
        (Method::GET, "/v2/elsewhere/app/manifests/latest".to_string()),
        (Method::GET, "/v2/elsewhere/app/tags/list".to_string()),
        (Method::GET, format!("/v2/elsewhere/app/blobs/{d}")),
        (Method::POST, "/v2/elsewhere/app/blobs/uploads/".to_string()),
        (Method::POST, format!("/v2/elsewhere/app/blobs/uploads/?digest={d}")),
        (Method::PUT, "/v2/elsewhere/app/manifests/v1".to_string()),
        (Method::GET, "/v2/teamx/app/tags/list".to_string()),
        (Method::DELETE, format!("/v2/library/busybox/manifests/{d}")),
    ] {
        let r = reg.req(m.clone(), &path).body("x").send().unwrap();
        assert_error(r, 404, "NAME_UNKNOWN");
    }
    // A hosted repository nobody pushed to has no tags list either.
    assert_error(reg.get("/v2/team/never/tags/list"), 404, "NAME_UNKNOWN");
    assert_eq!(reg.snapshot(), before);
}

#[test]
fn error_denied_for_writes_to_a_mirrored_repository() {
    // The upstream is a closed loopback port: a refusal must come before any upstream contact.
    let berth = Berth::start(&format!("{NAMESPACE}[[upstream]]\nname = \"mirror.test\"\nurl = \"http://127.0.0.1:1\"\ndefault = true\n"));
    let reg = Reg { berth, http: Client::new() };
    let d = digest(b"x");
    let before = reg.snapshot();
    for (m, path) in [
        (Method::PUT, "/v2/mirror.test/app/manifests/v1".to_string()),
        (Method::PUT, "/v2/app/manifests/v1?ns=mirror.test".to_string()),
        (Method::PUT, "/v2/library/app/manifests/v1".to_string()),
        (Method::POST, "/v2/mirror.test/app/blobs/uploads/".to_string()),
        (Method::POST, format!("/v2/elsewhere/app/blobs/uploads/?digest={d}")),
        (Method::DELETE, format!("/v2/mirror.test/app/blobs/{d}")),
        (Method::DELETE, format!("/v2/mirror.test/app/manifests/{d}")),
    ] {
        let r = reg.req(m.clone(), &path).header("Content-Type", OCI_MANIFEST).body("x").send().unwrap();
        assert_error(r, 403, "DENIED");
    }
    assert_eq!(reg.snapshot(), before);
    // The hosted namespace is untouched by the default upstream.
    reg.push_blob("team/app", b"x");
}

#[test]
fn error_blob_unknown() {
    let reg = start();
    reg.push_blob("team/app", b"something");
    let d = digest(b"not here");
    let before = reg.snapshot();
    assert_error(reg.get(&format!("/v2/team/app/blobs/{d}")), 404, "BLOB_UNKNOWN");
    assert_eq!(reg.head(&format!("/v2/team/app/blobs/{d}")).status(), 404);
    assert_error(reg.delete(&format!("/v2/team/app/blobs/{d}")), 404, "BLOB_UNKNOWN");
    assert_error(reg.get(&format!("/v2/team/nothing/blobs/{d}")), 404, "BLOB_UNKNOWN");
    assert_eq!(reg.snapshot(), before);
}

#[test]
fn error_blob_upload_unknown() {
    let reg = start();
    let before = reg.snapshot();
    let id = "3f6c5b38-7d2a-4f0e-9a54-1c1e2b4d5a6f";
    let loc = format!("/v2/team/app/blobs/uploads/{id}");
    assert_error(reg.get(&loc), 404, "BLOB_UPLOAD_UNKNOWN");
    assert_error(patch(&reg, &loc, b"data", 0), 404, "BLOB_UPLOAD_UNKNOWN");
    assert_error(
        reg.req(Method::PUT, &format!("{loc}?digest={}", digest(b"data"))).body("data").send().unwrap(),
        404,
        "BLOB_UPLOAD_UNKNOWN",
    );
    assert_error(reg.delete(&loc), 404, "BLOB_UPLOAD_UNKNOWN");
    assert_error(reg.get("/v2/team/app/blobs/uploads/not_a.valid.id"), 404, "BLOB_UPLOAD_UNKNOWN");
    // Path tricks in the id never reach the filesystem.
    let r = raw(&reg.berth, "GET", "/v2/team/app/blobs/uploads/..", &[], b"");
    assert_eq!(r.status, 400);
    assert_eq!(reg.snapshot(), before);
    assert!(reg.berth.stored_blob(&digest(b"data")).is_none());
}

#[test]
fn error_manifest_unknown() {
    let reg = start();
    reg.push_image("team/app", "v1", "mu");
    let d = digest(b"no manifest");
    let before = reg.snapshot();
    for path in ["/v2/team/app/manifests/v2".to_string(), format!("/v2/team/app/manifests/{d}")] {
        let v = assert_error(reg.get(&path), 404, "MANIFEST_UNKNOWN");
        assert_eq!(v["errors"][0]["detail"]["name"], "team/app");
        assert_eq!(reg.head(&path).status(), 404);
        assert_error(reg.delete(&path), 404, "MANIFEST_UNKNOWN");
    }
    assert_error(reg.get("/v2/team/empty/manifests/v1"), 404, "MANIFEST_UNKNOWN");
    assert_eq!(reg.tags("team/app"), ["v1"]);
    assert_eq!(reg.snapshot(), before);
}

#[test]
fn error_manifest_invalid() {
    let reg = start();
    let config = br#"{"os":"linux"}"#.to_vec();
    reg.push_blob("team/app", &config);
    let good = image_manifest(OCI_MANIFEST, OCI_CONFIG, &config, &[]);
    let cases: Vec<(String, Vec<u8>)> = vec![
        (OCI_MANIFEST.into(), b"blablabla".to_vec()),
        (OCI_MANIFEST.into(), b"".to_vec()),
        (OCI_MANIFEST.into(), b"[1,2,3]".to_vec()),
        // Content-Type and mediaType disagree.
        (DOCKER_MANIFEST.into(), good.clone()),
        (OCI_INDEX.into(), good.clone()),
        // No config.
        (OCI_MANIFEST.into(), serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []})).unwrap()),
        // A descriptor whose digest is not a digest.
        (
            OCI_MANIFEST.into(),
            serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": "sha256:nothex", "size": 1}, "layers": []}))
            .unwrap(),
        ),
        (OCI_INDEX.into(), serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{"digest": 5}]})).unwrap()),
    ];
    let before = reg.snapshot();
    for (mt, body) in &cases {
        let r = reg.put_manifest("team/app", "v1", mt, body);
        assert_error(r, 400, "MANIFEST_INVALID");
    }
    // An impossible tag in a PUT.
    assert_error(reg.put_manifest("team/app", "-bad", OCI_MANIFEST, &good), 400, "MANIFEST_INVALID");
    assert_error(reg.put_manifest("team/app", &"t".repeat(129), OCI_MANIFEST, &good), 400, "MANIFEST_INVALID");
    assert_eq!(reg.snapshot(), before);
    assert!(reg.tags("team/app").is_empty());
}

#[test]
fn error_unsupported_digest_algorithm() {
    let reg = start();
    reg.push_blob("team/app", b"x");
    let before = reg.snapshot();
    let md5 = "md5:9dd4e461268c8034f5c8564e155c67a6";
    let blake = format!("blake3:{}", "a".repeat(64));
    for d in [md5, blake.as_str()] {
        assert_error(
            reg.req(Method::POST, &format!("/v2/team/app/blobs/uploads/?digest={d}")).body("x").send().unwrap(),
            400,
            "UNSUPPORTED",
        );
        assert_error(reg.get(&format!("/v2/team/app/blobs/{d}")), 400, "UNSUPPORTED");
        assert_error(reg.get(&format!("/v2/team/app/manifests/{d}")), 400, "UNSUPPORTED");
        let loc = reg.open_upload("team/app");
        assert_error(reg.req(Method::PUT, &format!("{loc}?digest={d}")).body("x").send().unwrap(), 400, "UNSUPPORTED");
        assert_eq!(reg.delete(&loc).status(), 204);
    }
    assert_eq!(reg.snapshot(), before);
}

// ---- the store is the truth ----

#[test]
fn index_is_rebuilt_from_disk_after_restart() {
    let mut reg = start();
    let a = reg.push_image("team/app", "v1", "a");
    let b = reg.push_image("team/app", "v2", "b");
    let idx = index(OCI_INDEX, &[(OCI_MANIFEST, &a.manifest, "amd64"), (OCI_MANIFEST, &b.manifest, "arm64")]);
    let idx_digest = reg.put_manifest_ok("team/app", "multi", OCI_INDEX, &idx);
    let empty = b"{}".to_vec();
    reg.push_blob("team/app", &empty);
    let sig = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.sig",
        "config": descriptor(OCI_EMPTY, &empty), "layers": [descriptor(OCI_EMPTY, &empty)], "subject": descriptor(OCI_MANIFEST, &a.manifest)}))
    .unwrap();
    let sig_digest = reg.put_manifest_ok("team/app", &digest(&sig), OCI_MANIFEST, &sig);
    let loose = reg.push_blob("team/other", b"loose blob");
    let dm = reg.push_image("team/docker", "latest", "docker");
    // An upload left half-done before the restart.
    let loc = reg.open_upload("team/app");
    let loc = location(&patch(&reg, &loc, b"half of ", 0));

    reg.berth.restart();

    assert_eq!(reg.tags("team/app"), ["multi", "v1", "v2"]);
    let v: Value = reg.get("/v2/_catalog").json().unwrap();
    assert_eq!(v["repositories"], json!(["team/app", "team/docker", "team/other"]));
    for (reference, img) in [("v1", &a), ("v2", &b)] {
        let g = reg.get(&format!("/v2/team/app/manifests/{reference}"));
        assert_eq!(header(&g, "docker-content-digest"), img.digest);
        assert_eq!(header(&g, "content-type"), OCI_MANIFEST);
        assert_eq!(g.bytes().unwrap().as_ref(), img.manifest.as_slice());
        assert_eq!(reg.get(&format!("/v2/team/app/blobs/{}", digest(&img.layer))).bytes().unwrap().as_ref(), img.layer.as_slice());
        assert_eq!(reg.get(&format!("/v2/team/app/blobs/{}", digest(&img.config))).bytes().unwrap().as_ref(), img.config.as_slice());
    }
    let g = reg.get("/v2/team/app/manifests/multi");
    assert_eq!(header(&g, "content-type"), OCI_INDEX);
    assert_eq!(header(&g, "docker-content-digest"), idx_digest);
    assert_eq!(g.bytes().unwrap().as_ref(), idx.as_slice());
    let h = reg.head(&format!("/v2/team/app/manifests/{sig_digest}"));
    assert_eq!(header(&h, "content-length"), sig.len().to_string());
    let refs: Value = reg.get(&format!("/v2/team/app/referrers/{}", a.digest)).json().unwrap();
    assert_eq!(refs["manifests"][0]["digest"], sig_digest);
    assert_eq!(refs["manifests"][0]["artifactType"], "application/vnd.example.sig");
    assert_eq!(reg.get(&format!("/v2/team/other/blobs/{loose}")).bytes().unwrap().as_ref(), b"loose blob");
    assert_error(reg.get(&format!("/v2/team/other/blobs/{}", digest(&a.layer))), 404, "BLOB_UNKNOWN");
    assert_eq!(reg.get(&format!("/v2/team/docker/manifests/{}", dm.digest)).status(), 200);

    // The interrupted upload resumes where it stopped.
    let r = reg.get(&loc);
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "range"), "0-7");
    let whole = b"half of the blob";
    let r =
        reg.req(Method::PUT, &format!("{loc}?digest={}", digest(whole))).header("Content-Range", "8-15").body(&whole[8..]).send().unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(reg.get(&format!("/v2/team/app/blobs/{}", digest(whole))).bytes().unwrap().as_ref(), whole);
}
