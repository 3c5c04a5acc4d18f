//! Test images built offline as OCI image layouts, for skopeo to push into fake upstreams:
//! a multi-arch index (linux/amd64 and linux/arm64). The amd64 image carries the host's static
//! busybox so the docker daemon can run it; both carry `/etc/platform` naming their platform,
//! which is how a test sees which image a client picked. Self-contained (only crates and the
//! `tar`/`gzip` tools) so benches can include it with `#[path]` as well.
#![allow(dead_code)]

use sha2::Digest as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Debian's busybox-static puts its binary.
pub const STATIC_BUSYBOX: &str = "/bin/busybox";

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

pub struct PlatformImage {
    pub arch: String,
    pub manifest: String,
    pub config: String,
    pub layers: Vec<String>,
}

impl PlatformImage {
    /// The blobs a client pulling this image fetches (config and layers).
    pub fn blobs(&self) -> Vec<String> {
        let mut v = vec![self.config.clone()];
        v.extend(self.layers.iter().cloned());
        v
    }
}

pub struct Layout {
    pub dir: PathBuf,
    pub tag: String,
    pub index: String,
    pub images: Vec<PlatformImage>,
    /// Size of every blob in the layout, by digest.
    pub sizes: std::collections::BTreeMap<String, u64>,
}

impl Layout {
    pub fn image(&self, arch: &str) -> &PlatformImage {
        self.images.iter().find(|i| i.arch == arch).unwrap_or_else(|| panic!("no {arch} image"))
    }
    /// `oci:<dir>:<tag>` for skopeo.
    pub fn skopeo_ref(&self) -> String {
        format!("oci:{}:{}", self.dir.display(), self.tag)
    }
}

/// Is the static busybox the images need installed? (apt package busybox-static)
pub fn have_static_busybox() -> bool {
    Path::new(STATIC_BUSYBOX).is_file()
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

fn write_blob(layout: &Path, data: &[u8]) -> String {
    let d = sha256(data);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(d.trim_start_matches("sha256:")), data).unwrap();
    d
}

fn descriptor(media_type: &str, digest: &str, size: usize) -> serde_json::Value {
    serde_json::json!({"mediaType": media_type, "digest": digest, "size": size})
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// A gzipped layer of the files under `root`, reproducible (sorted, zero mtimes, root owner),
/// and its diff_id (the digest of the uncompressed tar).
fn layer(root: &Path, scratch: &Path) -> (Vec<u8>, String) {
    let tar_path = scratch.join("layer.tar");
    run(Command::new("tar")
        .args(["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(root)
        .arg("-cf")
        .arg(&tar_path)
        .arg("."));
    let tar = std::fs::read(&tar_path).unwrap();
    let gz = run(Command::new("gzip").args(["-n", "-c"]).arg(&tar_path));
    std::fs::remove_file(&tar_path).unwrap();
    (gz, sha256(&tar))
}

/// Builds `dir` as an OCI layout holding one multi-arch index tagged `tag`. `label` goes into
/// every layer so that images with different labels share no blob.
pub fn multi_arch(dir: &Path, tag: &str, label: &str) -> Layout {
    std::fs::create_dir_all(dir).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let mut images = Vec::new();
    let mut index_manifests = Vec::new();
    for arch in ["amd64", "arm64"] {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        if arch == "amd64" {
            let root = scratch.path().join("busybox");
            std::fs::create_dir_all(root.join("bin")).unwrap();
            std::fs::copy(STATIC_BUSYBOX, root.join("bin/busybox")).unwrap();
            for applet in ["sh", "cat", "ls"] {
                std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
            }
            // Clients deduplicate layers by digest: a shared layer would never be asked for twice.
            std::fs::create_dir_all(root.join("etc")).unwrap();
            std::fs::write(root.join("etc/image"), format!("{label}\n")).unwrap();
            let (gz, diff) = layer(&root, scratch.path());
            layers.push((write_blob(dir, &gz), gz.len()));
            diff_ids.push(diff);
        }
        let root = scratch.path().join(format!("platform-{arch}"));
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/platform"), format!("linux/{arch} {label}\n")).unwrap();
        let (gz, diff) = layer(&root, scratch.path());
        layers.push((write_blob(dir, &gz), gz.len()));
        diff_ids.push(diff);

        let config = serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["cat", "/etc/platform"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config = serde_json::to_vec(&config).unwrap();
        let config_digest = write_blob(dir, &config);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, &config_digest, config.len()),
            "layers": layers.iter().map(|(d, n)| descriptor(OCI_LAYER_GZIP, d, *n)).collect::<Vec<_>>(),
        });
        let manifest = serde_json::to_vec(&manifest).unwrap();
        let manifest_digest = write_blob(dir, &manifest);
        let mut desc = descriptor(OCI_MANIFEST, &manifest_digest, manifest.len());
        desc["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
        index_manifests.push(desc);
        images.push(PlatformImage {
            arch: arch.to_string(),
            manifest: manifest_digest,
            config: config_digest,
            layers: layers.into_iter().map(|(d, _)| d).collect(),
        });
    }
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index_manifests});
    let index = serde_json::to_vec(&index).unwrap();
    let index_digest = write_blob(dir, &index);
    let mut top = descriptor(OCI_INDEX, &index_digest, index.len());
    top["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [top]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let sizes = std::fs::read_dir(dir.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (format!("sha256:{}", e.file_name().to_string_lossy()), e.metadata().unwrap().len()))
        .collect();
    Layout { dir: dir.to_path_buf(), tag: tag.to_string(), index: index_digest, images, sizes }
}

/// The clients a real-client test drives, and the static busybox its images run: true when all
/// are there; a skip otherwise, or a failure under BERTH_REQUIRE_CLIENTS=1.
pub fn require_runnable(cmds: &[&str]) -> bool {
    if !cmds.iter().all(|c| super::require(c)) {
        return false;
    }
    if !have_static_busybox() {
        assert!(
            std::env::var("BERTH_REQUIRE_CLIENTS").as_deref() != Ok("1"),
            "busybox-static is required (BERTH_REQUIRE_CLIENTS=1) but {STATIC_BUSYBOX} is missing"
        );
        eprintln!("skipping: {STATIC_BUSYBOX} (busybox-static) not installed");
        return false;
    }
    true
}

/// A root filesystem holding the static busybox and a marker file.
pub fn busybox_rootfs(root: &Path, marker: &str) {
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::copy(STATIC_BUSYBOX, root.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "echo"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("etc/marker"), format!("{marker}\n")).unwrap();
}
