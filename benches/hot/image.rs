//! The benchmarks' test image: an OCI layout of random layers (skopeo pushes it as is).
#![allow(dead_code)]

use crate::util::{seed, Rng};
use sha2::Digest as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

pub struct Layer {
    pub digest: String,
    pub size: u64,
}

pub struct Image {
    pub dir: PathBuf,
    pub layers: Vec<Layer>,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub total: u64,
}

impl Image {
    pub fn largest(&self) -> u64 {
        self.layers.iter().map(|l| l.size).max().unwrap_or(0)
    }

    /// An OCI layout with one layer per size. Layers are random bytes behind a gzip magic so
    /// skopeo takes them as compressed and sends them unchanged instead of gzipping them.
    pub fn generate(dir: &Path, sizes_mib: &[usize]) -> Image {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let put = |data: &[u8]| {
            let d = hex::encode(sha2::Sha256::digest(data));
            std::fs::write(blobs.join(&d), data).unwrap();
            format!("sha256:{d}")
        };
        let mut layers = Vec::new();
        for (i, &mib) in sizes_mib.iter().enumerate() {
            let size = (mib as u64) << 20;
            let tmp = blobs.join("tmp");
            let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp).unwrap());
            let mut h = sha2::Sha256::new();
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1) ^ seed());
            let mut chunk = vec![0u8; 1 << 20];
            let mut left = size;
            let mut first = true;
            while left > 0 {
                let n = chunk.len().min(left as usize);
                rng.fill(&mut chunk[..n]);
                if first {
                    chunk[..3].copy_from_slice(&[0x1f, 0x8b, 0x08]);
                    first = false;
                }
                h.update(&chunk[..n]);
                f.write_all(&chunk[..n]).unwrap();
                left -= n as u64;
            }
            f.flush().unwrap();
            drop(f);
            let d = hex::encode(h.finalize());
            std::fs::rename(&tmp, blobs.join(&d)).unwrap();
            layers.push(Layer { digest: format!("sha256:{d}"), size });
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>()},
        }))
        .unwrap();
        let config_digest = put(&config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": layers.iter().map(|l| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": l.digest, "size": l.size,
            })).collect::<Vec<_>>(),
        }))
        .unwrap();
        let manifest_digest = put(&manifest);
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }]});
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let total = layers.iter().map(|l| l.size).sum::<u64>() + config.len() as u64 + manifest.len() as u64;
        Image { dir: dir.to_path_buf(), layers, manifest, manifest_digest, total }
    }
}

pub fn random_blob(size: usize, salt: u64) -> Vec<u8> {
    let mut v = vec![0u8; size];
    Rng(seed() ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15)).fill(&mut v);
    v
}

/// The manifest was stored byte for byte: the digest the registry reports is the layout's.
pub fn check_pushed(base: &str, image: &Image) {
    let c = reqwest::blocking::Client::new();
    let r = c
        .get(format!("{base}/v2/bench/img/manifests/latest"))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{base}");
    assert_eq!(r.headers()["docker-content-digest"].to_str().unwrap(), image.manifest_digest, "{base}: skopeo rewrote the manifest");
}
