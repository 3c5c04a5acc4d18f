//! A hand-written fake upstream registry on loopback: serves manifests and blobs from memory,
//! counts every request (by kind, and by method and path), lists tags, can demand bearer tokens,
//! and injects faults (wrong bytes, reset or stall mid-blob, error statuses). Tags move when an
//! image or index is added under a tag again. Stopping it closes the port, as a dead upstream
//! does.
#![allow(dead_code)]

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    None,
    /// Blob bodies are served with their last byte flipped.
    WrongBytes,
    /// The connection is closed halfway through a blob body.
    ResetMidBlob,
    /// Half the blob is sent, then nothing.
    StallMidBlob,
    /// Every request answers this status.
    Status(u16),
    /// Every request is read and never answered.
    Hang,
}

#[derive(Default)]
pub struct State {
    pub manifests: HashMap<(String, String), (String, Bytes)>,
    pub blobs: HashMap<String, Bytes>,
    /// "METHOD kind" -> count, kind in manifest|blob|token|tags|other.
    pub counts: HashMap<String, usize>,
    /// "METHOD /v2/<path>" -> count.
    pub paths: HashMap<String, usize>,
    pub fault: Option<Fault>,
    /// Pause between 1 MiB pieces of a blob body.
    pub blob_piece_delay: Option<Duration>,
    pub require_token: bool,
    /// Requests must carry Basic credentials for this "user:password"; others get a Basic
    /// challenge.
    pub require_basic: Option<String>,
    /// Manifests go out with chunked transfer encoding and no Content-Length, so only the bytes
    /// received tell their size.
    pub chunked_manifests: bool,
    pub blob_done_at: Vec<Instant>,
    /// A slow upstream: manifest answers (HEAD and GET) wait this long first.
    pub manifest_delay: Option<Duration>,
    /// Sent with every manifest answer (rate-limit headers, say).
    pub manifest_headers: Vec<(String, String)>,
    /// Open connections, so `stop` can cut kept-alive ones too.
    conns: Vec<tokio::task::JoinHandle<()>>,
}

pub struct Fake {
    pub port: u16,
    pub state: Arc<Mutex<State>>,
    rt: tokio::runtime::Runtime,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Fake {
    pub fn start() -> Fake {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        // A held port, so `resume` can listen on it again after `stop` without anyone else
        // having taken it in between.
        let port = super::free_port();
        let listener = rt.block_on(TcpListener::bind(("127.0.0.1", port))).unwrap();
        let mut f = Fake { port, state: Arc::new(Mutex::new(State::default())), rt, task: None };
        f.serve(listener);
        f
    }

    fn serve(&mut self, listener: TcpListener) {
        let state = self.state.clone();
        let port = self.port;
        self.task = Some(self.rt.spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else { continue };
                let st = state.clone();
                let h = tokio::spawn(async move {
                    let _ = conn(sock, st, port).await;
                });
                state.lock().unwrap().conns.push(h);
            }
        }));
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Closes the port: connections are refused until `resume`.
    pub fn stop(&mut self) {
        let (accept, state) = (self.task.take(), self.state.clone());
        // An aborted task has dropped what it held (the listener, a connection) once its handle
        // resolves: the port is closed when this returns. The accept loop goes first, so no
        // connection is added after the others were cut.
        self.rt.block_on(async move {
            if let Some(t) = accept {
                t.abort();
                let _ = t.await;
            }
            let conns: Vec<_> = state.lock().unwrap().conns.drain(..).collect();
            for t in conns {
                t.abort();
                let _ = t.await;
            }
        });
    }

    pub fn resume(&mut self) {
        let port = self.port;
        let listener = self
            .rt
            .block_on(TcpListener::bind(("127.0.0.1", port)))
            .unwrap_or_else(|e| panic!("cannot listen on fake upstream port {port} again: {e}"));
        self.serve(listener);
    }

    pub fn count(&self, key: &str) -> usize {
        self.state.lock().unwrap().counts.get(key).copied().unwrap_or(0)
    }

    /// Requests with `method` whose path ends with `suffix` (a digest, `/tags/list`).
    pub fn count_path(&self, method: &str, suffix: &str) -> usize {
        let prefix = format!("{method} ");
        self.state.lock().unwrap().paths.iter().filter(|(k, _)| k.starts_with(&prefix) && k.ends_with(suffix)).map(|(_, n)| n).sum()
    }

    pub fn set_fault(&self, f: Fault) {
        self.state.lock().unwrap().fault = if f == Fault::None { None } else { Some(f) };
    }

    pub fn add_blob(&self, data: &[u8]) -> String {
        let d = super::digest(data);
        self.state.lock().unwrap().blobs.insert(d.clone(), Bytes::copy_from_slice(data));
        d
    }

    /// Adds a manifest under its digest and, if given, a tag. Returns the digest.
    pub fn add_manifest(&self, repo: &str, tag: Option<&str>, media_type: &str, bytes: &[u8]) -> String {
        let d = super::digest(bytes);
        let mut s = self.state.lock().unwrap();
        let v = (media_type.to_string(), Bytes::copy_from_slice(bytes));
        s.manifests.insert((repo.to_string(), d.clone()), v.clone());
        if let Some(t) = tag {
            s.manifests.insert((repo.to_string(), t.to_string()), v);
        }
        d
    }

    /// A one-layer OCI image in `repo:tag`; returns (manifest digest, manifest bytes, layer digest).
    pub fn add_image(&self, repo: &str, tag: &str, layer: &[u8]) -> (String, Vec<u8>, String) {
        let config =
            format!(r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#, super::digest(layer));
        let cd = self.add_blob(config.as_bytes());
        let ld = self.add_blob(layer);
        // Deliberately unusual whitespace: berth must keep the exact bytes.
        let manifest = format!(
            "{{\n  \"schemaVersion\": 2,\n  \"mediaType\": \"application/vnd.oci.image.manifest.v1+json\",\n  \"config\": {{\"mediaType\": \"application/vnd.oci.image.config.v1+json\", \"digest\": \"{cd}\", \"size\": {}}},\n  \"layers\": [ {{\"mediaType\": \"application/vnd.oci.image.layer.v1.tar\", \"digest\": \"{ld}\", \"size\": {}}} ]\n}}\n",
            config.len(),
            layer.len()
        );
        let md = self.add_manifest(repo, Some(tag), "application/vnd.oci.image.manifest.v1+json", manifest.as_bytes());
        (md, manifest.into_bytes(), ld)
    }
}

/// One platform's image in an index the fake serves.
#[derive(Clone, Debug)]
pub struct PlatformImage {
    pub platform: String,
    pub manifest: String,
    pub config: String,
    pub layer: String,
}

impl PlatformImage {
    /// The digests a pull of this platform fetches: manifest, config, layer.
    pub fn digests(&self) -> [&str; 3] {
        [&self.manifest, &self.config, &self.layer]
    }
}

impl Fake {
    /// An OCI index in `repo:tag` with a one-layer image per platform (`os/arch`), each layer
    /// `label` and the platform. Returns the index digest and the images, in order.
    pub fn add_index(&self, repo: &str, tag: &str, platforms: &[&str], label: &str) -> (String, Vec<PlatformImage>) {
        let mut images = Vec::new();
        let mut entries = Vec::new();
        for p in platforms {
            let (os, arch) = p.split_once('/').unwrap();
            let layer = format!("{label} layer for {p}").into_bytes();
            let config =
                format!(r#"{{"architecture":"{arch}","os":"{os}","rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#, super::digest(&layer));
            let cd = self.add_blob(config.as_bytes());
            let ld = self.add_blob(&layer);
            let manifest = format!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{ld}","size":{}}}]}}"#,
                config.len(),
                layer.len()
            );
            let md = self.add_manifest(repo, None, "application/vnd.oci.image.manifest.v1+json", manifest.as_bytes());
            entries.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": md,
                "size": manifest.len(),
                "platform": {"os": os, "architecture": arch},
            }));
            images.push(PlatformImage { platform: p.to_string(), manifest: md, config: cd, layer: ld });
        }
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries,
        }))
        .unwrap();
        let d = self.add_manifest(repo, Some(tag), "application/vnd.oci.image.index.v1+json", &index);
        (d, images)
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn read_head(sock: &mut TcpStream) -> Option<(String, String, HashMap<String, String>)> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if sock.read(&mut b).await.ok()? == 0 {
            return None;
        }
        buf.push(b[0]);
        if buf.len() > 65536 {
            return None;
        }
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    Some((method, target, headers))
}

async fn respond(sock: &mut TcpStream, status: u16, headers: &[(&str, String)], body: &[u8], head: bool) -> std::io::Result<()> {
    let mut out = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    sock.write_all(out.as_bytes()).await?;
    if !head {
        sock.write_all(body).await?;
    }
    Ok(())
}

async fn conn(mut sock: TcpStream, state: Arc<Mutex<State>>, port: u16) -> std::io::Result<()> {
    while let Some((method, target, headers)) = read_head(&mut sock).await {
        let head = method == "HEAD";
        let path = target.split('?').next().unwrap_or("").to_string();
        let kind = if path == "/token" {
            "token"
        } else if path.contains("/manifests/") {
            "manifest"
        } else if path.contains("/blobs/") {
            "blob"
        } else if path.ends_with("/tags/list") {
            "tags"
        } else {
            "other"
        };
        let (fault, require_token, delay, chunked, basic) = {
            let mut s = state.lock().unwrap();
            *s.counts.entry(format!("{method} {kind}")).or_default() += 1;
            *s.paths.entry(format!("{method} {path}")).or_default() += 1;
            (s.fault.clone(), s.require_token, s.blob_piece_delay, s.chunked_manifests, s.require_basic.clone())
        };
        if fault == Some(Fault::Hang) {
            // The fault itself: an upstream that takes requests and never answers.
            tokio::time::sleep(Duration::from_secs(600)).await;
            return Ok(());
        }
        if let Some(creds) = basic {
            use base64::Engine;
            let want = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(creds));
            if headers.get("authorization") != Some(&want) {
                *state.lock().unwrap().counts.entry("unauthorized".into()).or_default() += 1;
                let challenge = "Basic realm=\"fake\"".to_string();
                respond(
                    &mut sock,
                    401,
                    &[("WWW-Authenticate", challenge)],
                    br#"{"errors":[{"code":"UNAUTHORIZED","message":"basic"}]}"#,
                    head,
                )
                .await?;
                continue;
            }
        }
        if kind == "token" {
            let n = state.lock().unwrap().counts.get("GET token").copied().unwrap_or(0);
            respond(
                &mut sock,
                200,
                &[("Content-Type", "application/json".into())],
                format!(r#"{{"token":"tok-{n}","expires_in":300}}"#).as_bytes(),
                head,
            )
            .await?;
            continue;
        }
        if let Some(Fault::Status(s)) = fault {
            // A rate limit says when to come back, as Docker Hub does.
            let after: Vec<(&str, String)> = if s == 429 { vec![("Retry-After", "37".to_string())] } else { vec![] };
            respond(&mut sock, s, &after, br#"{"errors":[{"code":"UNAVAILABLE","message":"fault"}]}"#, head).await?;
            continue;
        }
        if require_token && !headers.get("authorization").is_some_and(|a| a.starts_with("Bearer tok-")) {
            let challenge = format!("Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"fake\",scope=\"repository:x:pull\"");
            respond(&mut sock, 401, &[("WWW-Authenticate", challenge)], br#"{"errors":[{"code":"UNAUTHORIZED","message":"token"}]}"#, head)
                .await?;
            continue;
        }
        let Some(rest) = path.strip_prefix("/v2/") else {
            respond(&mut sock, 200, &[], b"{}", head).await?;
            continue;
        };
        if kind == "manifest" {
            let (repo, reference) = rest.rsplit_once("/manifests/").unwrap();
            let (found, slow, extra) = {
                let s = state.lock().unwrap();
                (s.manifests.get(&(repo.to_string(), reference.to_string())).cloned(), s.manifest_delay, s.manifest_headers.clone())
            };
            if let Some(d) = slow {
                // Pacing, not synchronization: the slow upstream under test.
                tokio::time::sleep(d).await;
            }
            match found {
                Some((mt, bytes)) if chunked => {
                    let d = super::digest(&bytes);
                    let hdr = format!(
                        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: {mt}\r\nDocker-Content-Digest: {d}\r\n\r\n"
                    );
                    sock.write_all(hdr.as_bytes()).await?;
                    if !head {
                        for piece in bytes.chunks(64 << 10) {
                            sock.write_all(format!("{:x}\r\n", piece.len()).as_bytes()).await?;
                            sock.write_all(piece).await?;
                            sock.write_all(b"\r\n").await?;
                        }
                        sock.write_all(b"0\r\n\r\n").await?;
                    }
                }
                Some((mt, bytes)) => {
                    let d = super::digest(&bytes);
                    let mut hs: Vec<(&str, String)> = vec![("Content-Type", mt), ("Docker-Content-Digest", d)];
                    hs.extend(extra.iter().map(|(k, v)| (k.as_str(), v.clone())));
                    respond(&mut sock, 200, &hs, &bytes, head).await?
                }
                None => respond(&mut sock, 404, &[], br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}"#, head).await?,
            }
            continue;
        }
        if kind == "tags" {
            let repo = rest.strip_suffix("/tags/list").unwrap();
            let mut tags: Vec<String> =
                state.lock().unwrap().manifests.keys().filter(|(r, t)| r == repo && !t.contains(':')).map(|(_, t)| t.clone()).collect();
            tags.sort();
            let body = serde_json::to_vec(&serde_json::json!({"name": repo, "tags": tags})).unwrap();
            respond(&mut sock, 200, &[("Content-Type", "application/json".into())], &body, head).await?;
            continue;
        }
        if kind == "blob" {
            let d = rest.rsplit_once("/blobs/").unwrap().1.to_string();
            let Some(data) = state.lock().unwrap().blobs.get(&d).cloned() else {
                respond(&mut sock, 404, &[], br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"no"}]}"#, head).await?;
                continue;
            };
            let hdr = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nDocker-Content-Digest: {d}\r\nContent-Type: application/octet-stream\r\n\r\n",
                data.len()
            );
            sock.write_all(hdr.as_bytes()).await?;
            if head {
                continue;
            }
            let mut body = data.to_vec();
            if fault == Some(Fault::WrongBytes) {
                if let Some(last) = body.last_mut() {
                    *last ^= 0xff;
                }
            }
            let half = body.len() / 2;
            let mut sent = 0;
            for piece in body.chunks(1 << 20) {
                if sent >= half && fault == Some(Fault::ResetMidBlob) {
                    return Ok(());
                }
                if sent >= half && fault == Some(Fault::StallMidBlob) {
                    // The fault itself: an upstream that goes quiet mid-body, longer than any
                    // test waits for it.
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    return Ok(());
                }
                if let Some(d) = delay {
                    // Pacing, not synchronization: a slow upstream, so fills stay in flight.
                    tokio::time::sleep(d).await;
                }
                // Small blobs go out in two pieces so faults mid-body apply to them too.
                if piece.len() > 1 && (fault == Some(Fault::ResetMidBlob) || fault == Some(Fault::StallMidBlob)) {
                    let (a, _) = piece.split_at(half.max(1).min(piece.len()));
                    sock.write_all(a).await?;
                    sock.flush().await?;
                    if fault == Some(Fault::StallMidBlob) {
                        // The stall fault, as above.
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    return Ok(());
                }
                sock.write_all(piece).await?;
                sent += piece.len();
            }
            sock.flush().await?;
            state.lock().unwrap().blob_done_at.push(Instant::now());
            continue;
        }
        respond(&mut sock, 404, &[], b"{}", head).await?;
    }
    Ok(())
}
