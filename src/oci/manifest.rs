//! Manifest inspection: which blobs and child manifests a manifest references, its subject and
//! artifact type. The bytes themselves are never re-serialized: digests are over exact bytes.

use super::{Digest, ErrorCode, OciError};
use serde::{Deserialize, Serialize};

pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_EMPTY_CONFIG: &str = "application/vnd.oci.empty.v1+json";

/// Every manifest media type berth advertises to upstreams, so indexes come back as indexes.
pub const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.v1+prettyjws;q=0.5, application/json;q=0.1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub digest: String,
    pub size: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    artifact_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    subject: Option<Descriptor>,
    #[serde(default)]
    annotations: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    blobs: Option<Vec<Descriptor>>,
}

/// What the registry needs to know about a manifest.
#[derive(Debug, Clone)]
pub struct ManifestInfo {
    pub media_type: String,
    pub artifact_type: Option<String>,
    pub blobs: Vec<Digest>,
    pub children: Vec<Digest>,
    pub subject: Option<Digest>,
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
    pub config_media_type: Option<String>,
}

fn invalid(msg: impl Into<String>) -> OciError {
    OciError::msg(ErrorCode::ManifestInvalid, msg)
}

fn digest_of(d: &Descriptor) -> Result<Digest, OciError> {
    Digest::parse(&d.digest).map_err(|e| invalid(format!("bad descriptor digest: {}", e.message)))
}

/// Inspects a manifest. `content_type` is the media type the client declared (if any); it wins
/// over the body's `mediaType`, since clients name the type explicitly on PUT.
pub fn inspect(bytes: &[u8], content_type: Option<&str>) -> Result<ManifestInfo, OciError> {
    let raw: Raw = serde_json::from_slice(bytes).map_err(|e| invalid(format!("manifest is not valid JSON: {e}")))?;
    let declared = content_type.map(|c| c.split(';').next().unwrap_or(c).trim()).filter(|c| !c.is_empty());
    let media_type = match (declared, raw.media_type.as_deref()) {
        (Some(ct), Some(body)) if ct != body && ct != "application/json" => {
            return Err(invalid(format!("Content-Type {ct} does not match the manifest's mediaType {body}")))
        }
        (Some(ct), _) if ct != "application/json" => ct.to_string(),
        (_, Some(body)) => body.to_string(),
        _ if raw.manifests.is_some() => OCI_INDEX.to_string(),
        _ => OCI_MANIFEST.to_string(),
    };
    let mut blobs = Vec::new();
    let mut children = Vec::new();
    let is_index = media_type == OCI_INDEX || media_type == DOCKER_LIST || (raw.manifests.is_some() && raw.layers.is_none());
    if is_index {
        for m in raw.manifests.iter().flatten() {
            // BuildKit's registry cache is an index whose entries are its layer blobs and its
            // cache config: descriptors of blobs, which the repository must hold as blobs.
            if names_manifest(m) {
                children.push(digest_of(m)?);
            } else {
                blobs.push(digest_of(m)?);
            }
        }
    } else {
        if media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST {
            if raw.config.is_none() {
                return Err(invalid("image manifest has no config"));
            }
            if raw.layers.is_none() && media_type == DOCKER_MANIFEST {
                return Err(invalid("image manifest has no layers"));
            }
        }
        if let Some(c) = &raw.config {
            blobs.push(digest_of(c)?);
        }
        for l in raw.layers.iter().flatten().chain(raw.blobs.iter().flatten()) {
            // Foreign layers (Windows base images) live elsewhere; their URLs are the source.
            if l.urls.as_ref().is_some_and(|u| !u.is_empty()) {
                continue;
            }
            blobs.push(digest_of(l)?);
        }
    }
    let subject = raw.subject.as_ref().map(digest_of).transpose()?;
    Ok(ManifestInfo {
        media_type,
        artifact_type: raw.artifact_type,
        config_media_type: raw.config.as_ref().and_then(|c| c.media_type.clone()),
        blobs,
        children,
        subject,
        annotations: raw.annotations,
    })
}

/// Whether an index entry is a manifest (the usual case, and the reading when the entry does
/// not say) rather than a blob.
fn names_manifest(d: &Descriptor) -> bool {
    match d.media_type.as_deref() {
        None => true,
        Some(t) => is_manifest_type(t),
    }
}

/// Every media type a manifest is stored under, including Docker's schema 1.
pub fn is_manifest_type(t: &str) -> bool {
    matches!(
        t,
        OCI_MANIFEST
            | OCI_INDEX
            | DOCKER_MANIFEST
            | DOCKER_LIST
            | "application/vnd.docker.distribution.manifest.v1+json"
            | "application/vnd.docker.distribution.manifest.v1+prettyjws"
            | "application/vnd.oci.artifact.manifest.v1+json"
    )
}

impl ManifestInfo {
    /// The referrers-API artifact type: `artifactType`, else the config's media type.
    pub fn effective_artifact_type(&self) -> Option<String> {
        self.artifact_type.clone().or_else(|| self.config_media_type.clone())
    }
}

/// An `os/arch[/variant]` as an index entry's `platform` names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn parse(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &&str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
        match parts.as_slice() {
            [os, arch] | [os, arch, _] if parts.iter().all(ok) => {
                Ok(Platform { os: os.to_string(), arch: arch.to_string(), variant: parts.get(2).map(|v| v.to_string()) })
            }
            _ => Err(format!("{s:?}: a platform is os/arch or os/arch/variant, as in \"linux/arm64\" or \"linux/arm/v7\"")),
        }
    }

    /// The platform of an index entry, if it names one.
    pub fn of(d: &Descriptor) -> Option<Platform> {
        let p = d.platform.as_ref()?;
        let s = |k: &str| p.get(k).and_then(|v| v.as_str()).filter(|v| !v.is_empty()).map(str::to_string);
        Some(Platform { os: s("os")?, arch: s("architecture")?, variant: s("variant") })
    }

    /// Whether `entry` is this platform; a pattern without a variant takes every variant.
    pub fn covers(&self, entry: &Platform) -> bool {
        self.os == entry.os && self.arch == entry.arch && (self.variant.is_none() || self.variant == entry.variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dg(s: &str) -> String {
        Digest::sha256_of(s.as_bytes()).to_string()
    }

    #[test]
    fn image_manifest() {
        let m = serde_json::json!({"schemaVersion":2,"mediaType":OCI_MANIFEST,
            "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":dg("c"),"size":1},
            "layers":[{"mediaType":"x","digest":dg("l"),"size":1},{"mediaType":"x","digest":dg("f"),"size":1,"urls":["http://x"]}]});
        let i = inspect(&serde_json::to_vec(&m).unwrap(), None).unwrap();
        assert_eq!(i.media_type, OCI_MANIFEST);
        assert_eq!(i.blobs.len(), 2);
        assert!(i.children.is_empty());
    }

    #[test]
    fn index_and_subject() {
        let m = serde_json::json!({"schemaVersion":2,"mediaType":OCI_INDEX,
            "manifests":[{"mediaType":OCI_MANIFEST,"digest":dg("a"),"size":1}],
            "subject":{"mediaType":OCI_MANIFEST,"digest":dg("s"),"size":1},"artifactType":"application/x"});
        let i = inspect(&serde_json::to_vec(&m).unwrap(), Some(OCI_INDEX)).unwrap();
        assert_eq!(i.children.len(), 1);
        assert_eq!(i.subject.as_ref().unwrap().to_string(), dg("s"));
        assert_eq!(i.effective_artifact_type().as_deref(), Some("application/x"));
    }

    #[test]
    fn buildkit_cache_index_lists_blobs() {
        let m = serde_json::json!({"schemaVersion":2,"mediaType":OCI_INDEX,"manifests":[
            {"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":dg("l1"),"size":1,
             "annotations":{"buildkit/createdat":"2026-01-01T00:00:00Z"}},
            {"mediaType":"application/vnd.buildkit.cacheconfig.v0","digest":dg("cfg"),"size":1},
            {"mediaType":OCI_MANIFEST,"digest":dg("m"),"size":1},
            {"digest":dg("untyped"),"size":1}]});
        let i = inspect(&serde_json::to_vec(&m).unwrap(), Some(OCI_INDEX)).unwrap();
        let s = |v: &[Digest]| v.iter().map(|d| d.to_string()).collect::<Vec<_>>();
        assert_eq!(s(&i.blobs), vec![dg("l1"), dg("cfg")]);
        assert_eq!(s(&i.children), vec![dg("m"), dg("untyped")]);
    }

    #[test]
    fn invalid_manifests() {
        assert_eq!(inspect(b"not json", None).unwrap_err().code, ErrorCode::ManifestInvalid);
        let m = serde_json::json!({"schemaVersion":2,"mediaType":OCI_MANIFEST,"layers":[]});
        assert!(inspect(&serde_json::to_vec(&m).unwrap(), None).is_err());
        let m = serde_json::json!({"schemaVersion":2,"mediaType":OCI_MANIFEST,"config":{"digest":"bad","size":1},"layers":[]});
        assert!(inspect(&serde_json::to_vec(&m).unwrap(), None).is_err());
        let m = serde_json::json!({"schemaVersion":2,"mediaType":OCI_INDEX,"manifests":[]});
        assert!(inspect(&serde_json::to_vec(&m).unwrap(), Some(OCI_MANIFEST)).is_err());
    }
}
