//! What CI pipelines push besides plain images, in the formats their tools write: BuildKit's
//! registry cache (both layouts), buildx attestation indexes, cosign signatures (by tag and as
//! OCI 1.1 referrers), notation signatures and SBOM artifacts, and sparse indexes. Each is
//! pushed over the distribution API, pulled back byte-exact, and kept by GC and retention as
//! long as its subject is. BuildKit, cosign and notation are not packaged for Debian 12, so the
//! documents are built here from their published formats.

mod common;

use common::{digest, random_bytes, Berth};
use reqwest::blocking::{Client, Response};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
const BUILDKIT_CACHE_CONFIG: &str = "application/vnd.buildkit.cacheconfig.v0";
const IN_TOTO: &str = "application/vnd.in-toto+json";
const COSIGN_SIMPLESIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
const COSIGN_SIG_ARTIFACT: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
const NOTATION_SIG: &str = "application/vnd.cncf.notary.signature";
const SPDX: &str = "application/spdx+json";

struct Reg {
    berth: Berth,
    http: Client,
}

impl Reg {
    fn start(namespaces: &str) -> Reg {
        Reg::with_storage("", namespaces)
    }

    fn with_storage(storage: &str, namespaces: &str) -> Reg {
        let berth = Berth::start_with_storage(storage, namespaces);
        let http = Client::builder().redirect(reqwest::redirect::Policy::none()).timeout(Duration::from_secs(60)).build().unwrap();
        Reg { berth, http }
    }

    fn get(&self, path: &str) -> Response {
        self.http.get(format!("{}{path}", self.berth.url())).send().unwrap()
    }

    fn push_blob(&self, repo: &str, data: &[u8]) -> Value {
        let d = digest(data);
        let r = self.http.post(format!("{}/v2/{repo}/blobs/uploads/?digest={d}", self.berth.url())).body(data.to_vec()).send().unwrap();
        assert_eq!(r.status(), 201, "push blob to {repo}: {}", r.text().unwrap());
        json!({"digest": d, "size": data.len()})
    }

    fn put(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> Response {
        self.http
            .put(format!("{}/v2/{repo}/manifests/{reference}", self.berth.url()))
            .header("Content-Type", media_type)
            .body(body.to_vec())
            .send()
            .unwrap()
    }

    fn put_ok(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> String {
        let r = self.put(repo, reference, media_type, body);
        assert_eq!(r.status(), 201, "PUT {repo}:{reference}: {}", r.text().unwrap());
        let d = r.headers()["docker-content-digest"].to_str().unwrap().to_string();
        assert_eq!(d, digest(body));
        d
    }

    /// The manifest comes back with the bytes, digest and media type it was pushed with.
    fn assert_byte_exact(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) {
        let r = self.http.get(format!("{}/v2/{repo}/manifests/{reference}", self.berth.url())).header("Accept", media_type).send().unwrap();
        assert_eq!(r.status(), 200, "GET {repo}:{reference}");
        assert_eq!(r.headers()["content-type"].to_str().unwrap(), media_type);
        assert_eq!(r.headers()["docker-content-digest"].to_str().unwrap(), digest(body));
        assert_eq!(r.bytes().unwrap().as_ref(), body, "{repo}:{reference} byte-exact");
    }

    fn blob_ok(&self, repo: &str, d: &str) -> bool {
        let r = self.get(&format!("/v2/{repo}/blobs/{d}"));
        r.status() == 200 && digest(&r.bytes().unwrap()) == d
    }

    fn manifest_status(&self, repo: &str, reference: &str) -> u16 {
        self.get(&format!("/v2/{repo}/manifests/{reference}")).status().as_u16()
    }

    fn tags(&self, repo: &str) -> BTreeSet<String> {
        let r = self.get(&format!("/v2/{repo}/tags/list"));
        if r.status() == 404 {
            return BTreeSet::new();
        }
        let v: Value = r.json().unwrap();
        v["tags"].as_array().map(|a| a.iter().map(|t| t.as_str().unwrap().to_string()).collect()).unwrap_or_default()
    }

    fn referrers(&self, repo: &str, subject: &str, filter: Option<&str>) -> Vec<Value> {
        let q = filter.map(|f| format!("?artifactType={f}")).unwrap_or_default();
        let r = self.get(&format!("/v2/{repo}/referrers/{subject}{q}"));
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"].to_str().unwrap(), OCI_INDEX);
        let v: Value = r.json().unwrap();
        v["manifests"].as_array().unwrap().clone()
    }

    fn gc(&self) -> Value {
        let r = self.http.post(format!("{}/gc", self.berth.admin_url())).send().unwrap();
        assert_eq!(r.status(), 200);
        r.json().unwrap()
    }
}

fn desc(media_type: &str, blob: &Value) -> Value {
    json!({"mediaType": media_type, "digest": blob["digest"], "size": blob["size"]})
}

fn error_code(r: Response) -> (u16, String) {
    let status = r.status().as_u16();
    let v: Value = r.json().unwrap_or_default();
    (status, v["errors"][0]["code"].as_str().unwrap_or("").to_string())
}

/// A one-layer image for `arch`: (manifest bytes, digest).
fn push_image(reg: &Reg, repo: &str, tag: &str, arch: &str, seed: u64) -> (Vec<u8>, String) {
    let layer = reg.push_blob(repo, &random_bytes(3000, seed));
    let config = reg.push_blob(
        repo,
        json!({"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}}).to_string().as_bytes(),
    );
    let m = serde_json::to_vec_pretty(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": desc(OCI_CONFIG, &config), "layers": [desc(OCI_LAYER, &layer)]}))
    .unwrap();
    let d = reg.put_ok(repo, tag, OCI_MANIFEST, &m);
    (m, d)
}

/// BuildKit's cache config: its layer chain and the build records that produced it.
fn cache_config(layers: &[&Value]) -> Vec<u8> {
    let ls: Vec<Value> = layers.iter().enumerate().map(|(i, l)| json!({"blob": l["digest"], "parent": i as i64 - 1})).collect();
    let records: Vec<Value> = (0..layers.len())
        .map(|i| {
            json!({"digest": digest(format!("record {i}").as_bytes()),
                "inputs": if i == 0 { json!([]) } else { json!([[{"selector": "", "link": i - 1}]]) },
                "results": [{"layer": i, "createdAt": "2026-11-30T10:00:00Z"}]})
        })
        .collect();
    serde_json::to_vec(&json!({"layers": ls, "records": records})).unwrap()
}

/// `--cache-to type=registry,mode=max`: an index whose entries are the cache's layer blobs and
/// its cache config — descriptors of blobs, not of manifests — in OCI and in Docker media types.
#[test]
fn buildkit_registry_cache_index_pushes_and_reads_back() {
    let reg = Reg::start("[[namespace]]\nprefix = \"team\"\n");
    for (index_type, layer_type, tag) in [(OCI_INDEX, OCI_LAYER, "buildcache"), (DOCKER_LIST, DOCKER_LAYER, "buildcache-docker")] {
        let l1 = reg.push_blob("team/app", &random_bytes(5000, 1));
        let l2 = reg.push_blob("team/app", &random_bytes(7000, 2));
        let cfg_bytes = cache_config(&[&l1, &l2]);
        let cfg = reg.push_blob("team/app", &cfg_bytes);
        let layer = |l: &Value| {
            let mut d = desc(layer_type, l);
            d["annotations"] = json!({"buildkit/createdat": "2026-11-30T10:00:00Z", "containerd.io/uncompressed": digest(b"uncompressed")});
            d
        };
        let index = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": index_type,
            "manifests": [layer(&l1), layer(&l2), desc(BUILDKIT_CACHE_CONFIG, &cfg)]}))
        .unwrap();
        reg.put_ok("team/app", tag, index_type, &index);
        // `--cache-from`: the index, then the config, then the layers it names.
        reg.assert_byte_exact("team/app", tag, index_type, &index);
        let got: Value = reg.get(&format!("/v2/team/app/manifests/{tag}")).json().unwrap();
        for m in got["manifests"].as_array().unwrap() {
            assert!(reg.blob_ok("team/app", m["digest"].as_str().unwrap()), "{m}");
        }
        assert_eq!(reg.get(&format!("/v2/team/app/blobs/{}", cfg["digest"].as_str().unwrap())).bytes().unwrap().as_ref(), cfg_bytes);
    }

    // Still refused: a cache index naming a blob the repository does not hold, and nothing is
    // stored.
    let before = reg.berth.stored_blobs();
    let foreign = reg.push_blob("team/other", &random_bytes(4000, 3));
    let before_with_foreign = reg.berth.stored_blobs();
    assert_eq!(before_with_foreign.len(), before.len() + 1);
    for missing in [json!({"digest": digest(b"never pushed"), "size": 12}), foreign] {
        let index = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [desc(OCI_LAYER, &missing)]}))
        .unwrap();
        let (status, code) = error_code(reg.put("team/app", "broken-cache", OCI_INDEX, &index));
        assert_eq!((status, code.as_str()), (400, "MANIFEST_BLOB_UNKNOWN"));
        assert_eq!(reg.manifest_status("team/app", &digest(&index)), 404);
    }
    assert!(!reg.tags("team/app").contains("broken-cache"));
    assert_eq!(reg.berth.stored_blobs(), before_with_foreign, "a refused index stores nothing");
}

/// `--cache-to type=registry,image-manifest=true`: an image manifest whose config is the cache
/// config; GC keeps everything the cache names.
#[test]
fn buildkit_cache_as_image_manifest_survives_gc() {
    let reg = Reg::with_storage("gc_grace = \"0s\"\n", "[[namespace]]\nprefix = \"team\"\n");
    let l1 = reg.push_blob("team/app", &random_bytes(6000, 4));
    let cfg = reg.push_blob("team/app", &cache_config(&[&l1]));
    let m = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": desc(BUILDKIT_CACHE_CONFIG, &cfg), "layers": [desc(OCI_LAYER, &l1)]}))
    .unwrap();
    reg.put_ok("team/app", "buildcache", OCI_MANIFEST, &m);
    let l2 = reg.push_blob("team/app", &random_bytes(6000, 5));
    let cfg2 = reg.push_blob("team/app", &cache_config(&[&l2]));
    let index = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [desc(OCI_LAYER, &l2), desc(BUILDKIT_CACHE_CONFIG, &cfg2)]}))
    .unwrap();
    reg.put_ok("team/app", "buildcache-index", OCI_INDEX, &index);
    let report = reg.gc();
    assert_eq!(report["blobs_removed"], 0, "{report}");
    reg.assert_byte_exact("team/app", "buildcache", OCI_MANIFEST, &m);
    reg.assert_byte_exact("team/app", "buildcache-index", OCI_INDEX, &index);
    for b in [&l1, &cfg, &l2, &cfg2] {
        assert!(reg.blob_ok("team/app", b["digest"].as_str().unwrap()));
    }
}

/// buildx with provenance and SBOM: an index with the image per platform and one attestation
/// manifest per image (`unknown/unknown`, `vnd.docker.reference.*` annotations).
#[test]
fn buildx_attestation_index_pushes_and_reads_back() {
    let reg = Reg::start("[[namespace]]\nprefix = \"team\"\n");
    let build = push_buildx_index(&reg, "team/app", "v1", 10);
    reg.assert_byte_exact("team/app", "v1", OCI_INDEX, &build.index);
    for e in &build.entries {
        let d = e["digest"].as_str().unwrap();
        assert_eq!(reg.manifest_status("team/app", d), 200);
    }
}

/// What `docker buildx build --attest` pushes: per platform an image and an attestation
/// manifest (provenance and SBOM statements) naming it, both by digest, then an index over
/// them tagged `tag`.
fn push_buildx_index(reg: &Reg, repo: &str, tag: &str, seed: u64) -> BuildxIndex {
    let mut entries = Vec::new();
    let mut attestations = Vec::new();
    for (i, arch) in ["amd64", "arm64"].iter().enumerate() {
        let seed = seed + i as u64;
        let layer = reg.push_blob(repo, &random_bytes(3000, seed));
        let config = reg.push_blob(
            repo,
            json!({"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}})
                .to_string()
                .as_bytes(),
        );
        let m = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": desc(OCI_CONFIG, &config), "layers": [desc(OCI_LAYER, &layer)]}))
        .unwrap();
        let d = reg.put_ok(repo, &digest(&m), OCI_MANIFEST, &m);
        let provenance = reg.push_blob(repo, json!({"_type": "https://in-toto.io/Statement/v0.1", "predicateType": "https://slsa.dev/provenance/v0.2", "subject": [{"digest": {"sha256": &d[7..]}}]}).to_string().as_bytes());
        let sbom = reg.push_blob(
            repo,
            json!({"_type": "https://in-toto.io/Statement/v0.1", "predicateType": "https://spdx.dev/Document", "subject": [{"digest": {"sha256": &d[7..]}}]}).to_string().as_bytes(),
        );
        let att_config = reg.push_blob(
            repo,
            json!({"architecture": "unknown", "os": "unknown", "rootfs": {"type": "layers", "diff_ids": []}}).to_string().as_bytes(),
        );
        let mut p = desc(IN_TOTO, &provenance);
        p["annotations"] = json!({"in-toto.io/predicate-type": "https://slsa.dev/provenance/v0.2"});
        let mut s = desc(IN_TOTO, &sbom);
        s["annotations"] = json!({"in-toto.io/predicate-type": "https://spdx.dev/Document"});
        let att = serde_json::to_vec(
            &json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": desc(OCI_CONFIG, &att_config), "layers": [p, s]}),
        )
        .unwrap();
        let att_d = reg.put_ok(repo, &digest(&att), OCI_MANIFEST, &att);
        let blobs = [&att_config, &provenance, &sbom].iter().map(|b| b["digest"].as_str().unwrap().to_string()).collect();
        attestations.push((att_d.clone(), blobs));
        entries.push(json!({"mediaType": OCI_MANIFEST, "digest": d, "size": m.len(), "platform": {"architecture": arch, "os": "linux"}}));
        entries.push(json!({"mediaType": OCI_MANIFEST, "digest": att_d, "size": att.len(),
            "annotations": {"vnd.docker.reference.digest": d, "vnd.docker.reference.type": "attestation-manifest"},
            "platform": {"architecture": "unknown", "os": "unknown"}}));
    }
    let index = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})).unwrap();
    reg.put_ok(repo, tag, OCI_INDEX, &index);
    BuildxIndex { index, entries, attestations }
}

struct BuildxIndex {
    index: Vec<u8>,
    entries: Vec<Value>,
    /// Per attestation manifest its digest and the blobs it references (config first).
    attestations: Vec<(String, Vec<String>)>,
}

/// Buildx attestations are untagged children of their image's index: GC keeps them (and their
/// statements) while the index is tagged, and retention takes them with the index once its tag
/// expires.
#[test]
fn buildx_attestations_live_and_die_with_their_index() {
    let reg = Reg::with_storage("gc_grace = \"0s\"\n", "[[namespace]]\nprefix = \"team\"\nkeep_tags = 1\n");
    let mut builds = Vec::new();
    for (i, tag) in ["v1", "v2"].iter().enumerate() {
        builds.push(push_buildx_index(&reg, "team/app", tag, 70 + 10 * i as u64));
        // Tag times order retention; the next build must be newer.
        let first = std::time::SystemTime::now();
        assert!(common::eventually(Duration::from_secs(2), || first.elapsed().unwrap() >= Duration::from_millis(2)));
    }
    let report = reg.gc();
    assert_eq!(reg.tags("team/app"), BTreeSet::from(["v2".to_string()]), "{report}");
    let (old, new) = (&builds[0], &builds[1]);
    reg.assert_byte_exact("team/app", "v2", OCI_INDEX, &new.index);
    for e in &new.entries {
        assert_eq!(reg.manifest_status("team/app", e["digest"].as_str().unwrap()), 200, "GC kept the index's child: {report}");
    }
    for (att, blobs) in &new.attestations {
        assert_eq!(reg.manifest_status("team/app", att), 200, "{report}");
        for b in blobs {
            assert!(reg.blob_ok("team/app", b), "GC kept what an attestation references: {report}");
        }
    }
    // The expired build's index, images and attestations are gone, and so are the statements
    // only they referenced (the attestation config is the same document in every build).
    for e in &old.entries {
        assert_eq!(reg.manifest_status("team/app", e["digest"].as_str().unwrap()), 404, "{report}");
    }
    for (att, blobs) in &old.attestations {
        assert_eq!(reg.manifest_status("team/app", att), 404, "an attestation goes with its index: {report}");
        for b in &blobs[1..] {
            assert!(!reg.blob_ok("team/app", b), "{b} outlived its attestation: {report}");
        }
    }
}

/// A signing tool's manifest over `subject`.
fn signature(reg: &Reg, repo: &str, kind: &str, subject: (&str, usize), seed: u64) -> Vec<u8> {
    let payload = json!({"critical": {"identity": {"docker-reference": repo}, "image": {"docker-manifest-digest": subject.0}, "type": "cosign container image signature"}, "seed": seed}).to_string();
    let subject_desc = json!({"mediaType": OCI_MANIFEST, "digest": subject.0, "size": subject.1});
    let v = match kind {
        // cosign's tag scheme: a manifest tagged sha256-<hex>.sig, no subject.
        "cosign-tag" => {
            let l = reg.push_blob(repo, payload.as_bytes());
            let c = reg.push_blob(
                repo,
                json!({"architecture": "", "os": "", "rootfs": {"type": "layers", "diff_ids": [l["digest"]]}}).to_string().as_bytes(),
            );
            let mut ld = desc(COSIGN_SIMPLESIGNING, &l);
            ld["annotations"] = json!({"dev.cosignproject.cosign/signature": "MEUCIQD-not-a-real-signature"});
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": desc(OCI_CONFIG, &c), "layers": [ld]})
        }
        // cosign with the OCI 1.1 referrers mode.
        "cosign-referrer" => {
            let l = reg.push_blob(repo, payload.as_bytes());
            let e = reg.push_blob(repo, b"{}");
            let mut ld = desc(COSIGN_SIMPLESIGNING, &l);
            ld["annotations"] = json!({"dev.cosignproject.cosign/signature": "MEUCIQD-not-a-real-signature"});
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": COSIGN_SIG_ARTIFACT,
                "config": desc(OCI_EMPTY, &e), "layers": [ld], "subject": subject_desc})
        }
        "notation" => {
            let l = reg.push_blob(repo, format!("{{\"payload\":\"eyJ0YXJnZXRBcnRpZmFjdCI6e319\",\"seed\":{seed}}}").as_bytes());
            let e = reg.push_blob(repo, b"{}");
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": NOTATION_SIG,
                "config": desc(OCI_EMPTY, &e), "layers": [desc("application/jose+json", &l)], "subject": subject_desc,
                "annotations": {"io.cncf.notary.x509chain.thumbprint#S256": "[\"abc\"]", "org.opencontainers.image.created": "2026-11-30T10:00:00Z"}})
        }
        "sbom" => {
            let l = reg.push_blob(repo, json!({"spdxVersion": "SPDX-2.3", "name": repo, "seed": seed}).to_string().as_bytes());
            let e = reg.push_blob(repo, b"{}");
            json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": SPDX,
                "config": desc(OCI_EMPTY, &e), "layers": [desc(SPDX, &l)], "subject": subject_desc})
        }
        other => unreachable!("{other}"),
    };
    serde_json::to_vec(&v).unwrap()
}

fn sig_tag(d: &str) -> String {
    format!("sha256-{}.sig", &d[7..])
}

/// Signatures and SBOMs from cosign and notation: pulled back byte-exact, listed by the
/// referrers API with their artifact types.
#[test]
fn signatures_and_sboms_push_list_and_read_back() {
    let reg = Reg::start("[[namespace]]\nprefix = \"team\"\n");
    let (m, d) = push_image(&reg, "team/app", "v1", "amd64", 20);
    let subject = (d.as_str(), m.len());
    let by_tag = signature(&reg, "team/app", "cosign-tag", subject, 1);
    reg.put_ok("team/app", &sig_tag(&d), OCI_MANIFEST, &by_tag);
    reg.assert_byte_exact("team/app", &sig_tag(&d), OCI_MANIFEST, &by_tag);
    let mut pushed = Vec::new();
    for (kind, artifact_type) in [("cosign-referrer", COSIGN_SIG_ARTIFACT), ("notation", NOTATION_SIG), ("sbom", SPDX)] {
        let body = signature(&reg, "team/app", kind, subject, 2);
        let r = reg.put("team/app", &digest(&body), OCI_MANIFEST, &body);
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["oci-subject"].to_str().unwrap(), d, "{kind}");
        reg.assert_byte_exact("team/app", &digest(&body), OCI_MANIFEST, &body);
        pushed.push((digest(&body), artifact_type, body));
    }
    let all = reg.referrers("team/app", &d, None);
    let listed: BTreeSet<(String, String)> =
        all.iter().map(|m| (m["digest"].as_str().unwrap().to_string(), m["artifactType"].as_str().unwrap().to_string())).collect();
    let want: BTreeSet<(String, String)> = pushed.iter().map(|(d, t, _)| (d.clone(), t.to_string())).collect();
    assert_eq!(listed, want);
    let notation = reg.referrers("team/app", &d, Some(NOTATION_SIG));
    assert_eq!(notation.len(), 1);
    assert_eq!(notation[0]["annotations"]["io.cncf.notary.x509chain.thumbprint#S256"], "[\"abc\"]");
    assert_eq!(reg.tags("team/app"), BTreeSet::from(["v1".to_string(), sig_tag(&d)]));
}

/// Retention keeps one tag: signatures do not count as tags, stay with the image they sign, and
/// go with it. GC never takes what a signature references.
#[test]
fn signatures_live_and_die_with_their_subject() {
    let reg = Reg::with_storage("gc_grace = \"0s\"\n", "[[namespace]]\nprefix = \"team\"\nkeep_tags = 1\n");
    let mut images = Vec::new();
    for (i, tag) in ["v1", "v2"].iter().enumerate() {
        let (m, d) = push_image(&reg, "team/app", tag, "amd64", 30 + i as u64);
        let subject = (d.as_str(), m.len());
        let by_tag = signature(&reg, "team/app", "cosign-tag", subject, 40 + i as u64);
        reg.put_ok("team/app", &sig_tag(&d), OCI_MANIFEST, &by_tag);
        let referrers: Vec<(String, Vec<u8>)> = ["cosign-referrer", "notation", "sbom"]
            .iter()
            .map(|k| {
                let b = signature(&reg, "team/app", k, subject, 50 + i as u64);
                (reg.put_ok("team/app", &digest(&b), OCI_MANIFEST, &b), b)
            })
            .collect();
        images.push((d, by_tag, referrers));
        // Tag times order retention; the next image must be newer.
        let first = std::time::SystemTime::now();
        assert!(common::eventually(Duration::from_secs(2), || first.elapsed().unwrap() >= Duration::from_millis(2)));
    }
    let report = reg.gc();
    let (old, new) = (&images[0], &images[1]);
    assert_eq!(reg.tags("team/app"), BTreeSet::from(["v2".to_string(), sig_tag(&new.0)]), "{report}");
    assert_eq!(reg.manifest_status("team/app", &old.0), 404);
    for (d, _) in &old.2 {
        assert_eq!(reg.manifest_status("team/app", d), 404, "a referrer goes with its subject: {report}");
    }
    reg.assert_byte_exact("team/app", "v2", OCI_MANIFEST, &reg.get(&format!("/v2/team/app/manifests/{}", new.0)).bytes().unwrap());
    reg.assert_byte_exact("team/app", &sig_tag(&new.0), OCI_MANIFEST, &new.1);
    for (d, body) in &new.2 {
        reg.assert_byte_exact("team/app", d, OCI_MANIFEST, body);
        let m: Value = serde_json::from_slice(body).unwrap();
        for l in m["layers"].as_array().unwrap() {
            assert!(reg.blob_ok("team/app", l["digest"].as_str().unwrap()), "GC kept what a signature references");
        }
    }
    assert_eq!(reg.referrers("team/app", &new.0, None).len(), 3);
}

/// `sparse_indexes = true` accepts an index whose children are not all present (a
/// single-platform copy of a multi-arch image); elsewhere such an index is refused. Blobs are
/// never optional, and fsck accepts what the namespace allows.
#[test]
fn sparse_indexes_are_opt_in() {
    let mut reg = Reg::start("[[namespace]]\nprefix = \"team\"\n\n[[namespace]]\nprefix = \"copies\"\nsparse_indexes = true\n");
    let absent = json!({"mediaType": OCI_MANIFEST, "digest": digest(b"the arm64 manifest, not copied"), "size": 30, "platform": {"architecture": "arm64", "os": "linux"}});
    let mut bodies = Vec::new();
    for ns in ["team", "copies"] {
        let repo = format!("{ns}/app");
        let (m, d) = push_image(&reg, &repo, "amd64-only", "amd64", 60);
        let present =
            json!({"mediaType": OCI_MANIFEST, "digest": d, "size": m.len(), "platform": {"architecture": "amd64", "os": "linux"}});
        let index = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [present, absent]})).unwrap();
        let r = reg.put(&repo, "multi", OCI_INDEX, &index);
        if ns == "team" {
            assert_eq!(error_code(r), (400, "MANIFEST_BLOB_UNKNOWN".to_string()));
            assert_eq!(reg.manifest_status(&repo, "multi"), 404);
        } else {
            assert_eq!(r.status(), 201);
            reg.assert_byte_exact(&repo, "multi", OCI_INDEX, &index);
            bodies.push(index);
        }
    }
    // A sparse namespace still refuses an index naming a blob it does not hold.
    let blob_entry = json!({"mediaType": OCI_LAYER, "digest": digest(b"no such layer"), "size": 13});
    let index = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [blob_entry]})).unwrap();
    assert_eq!(error_code(reg.put("copies/app", "bad", OCI_INDEX, &index)), (400, "MANIFEST_BLOB_UNKNOWN".to_string()));
    reg.berth.kill();
    let out = Command::new(env!("CARGO_BIN_EXE_berth")).arg("fsck").arg("--config").arg(&reg.berth.config_path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains(" 0 problems"), "{text}");
    reg.berth.restart();
    reg.assert_byte_exact("copies/app", "multi", OCI_INDEX, &bodies[0]);
}
