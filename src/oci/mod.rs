//! The distribution protocol, pure: names, digests, references, request routes, manifests and
//! the error table. Raw strings from the wire become typed values here, once, before any
//! filesystem or network access. Must not depend on pingora, the store or the upstream client.

pub mod error;
pub mod manifest;
pub mod route;
pub mod sha256_raw;

pub use error::{ErrorCode, OciError};

use sha2::Digest as _;
use std::fmt;

pub const MAX_NAME_LEN: usize = 255;

/// A validated repository name (`[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/...)*`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    pub fn parse(s: &str) -> Result<Self, OciError> {
        let bad = |why: &str| OciError::msg(ErrorCode::NameInvalid, format!("invalid repository name {s:?}: {why}"));
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if s.len() > MAX_NAME_LEN {
            return Err(bad("longer than 255 characters"));
        }
        for component in s.split('/') {
            if !valid_component(component) {
                return Err(bad("each path component must match [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*"));
            }
        }
        Ok(RepoName(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() {
        return false;
    }
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        let x = b[i];
        if alnum(x) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or "-"+, always between alphanumerics.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// A validated tag (`[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.is_empty() || b.len() > 128 {
            return None;
        }
        let first = b[0].is_ascii_alphanumeric() || b[0] == b'_';
        let rest = b[1..].iter().all(|&x| x.is_ascii_alphanumeric() || x == b'_' || x == b'.' || x == b'-');
        (first && rest).then(|| Tag(s.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }
    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A validated content digest, `algorithm:hex`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algo: Algorithm,
    hex: String,
}

impl Digest {
    pub fn parse(s: &str) -> Result<Self, OciError> {
        let bad = |why: &str| OciError::msg(ErrorCode::DigestInvalid, format!("invalid digest {s:?}: {why}"));
        let (algo, hex) = s.split_once(':').ok_or_else(|| bad("expected algorithm:hex"))?;
        let algo = match algo {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => {
                let grammar_ok =
                    !other.is_empty() && other.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"+._-".contains(&c));
                if grammar_ok && !hex.is_empty() {
                    return Err(OciError::msg(
                        ErrorCode::Unsupported,
                        format!("digest algorithm {other:?} is not supported (use sha256 or sha512)"),
                    ));
                }
                return Err(bad("unknown algorithm"));
            }
        };
        if hex.len() != algo.hex_len() || !hex.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
            return Err(bad("wrong length or not lowercase hex"));
        }
        Ok(Digest { algo, hex: hex.to_string() })
    }

    pub fn sha256_of(data: &[u8]) -> Self {
        Digest { algo: Algorithm::Sha256, hex: hex::encode(sha2::Sha256::digest(data)) }
    }

    pub fn of(algo: Algorithm, data: &[u8]) -> Self {
        let mut h = Hasher::new(algo);
        h.update(data);
        h.finish()
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algo
    }
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algo.as_str(), self.hex)
    }
}

/// An incremental hash for either supported algorithm.
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
    /// SHA-256 resumed from a saved state.
    Sha256Raw(sha256_raw::Sha256Raw),
}

impl Hasher {
    pub fn new(algo: Algorithm) -> Self {
        match algo {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
            Hasher::Sha256Raw(h) => h.update(data),
        }
    }
    pub fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(h) => Digest { algo: Algorithm::Sha256, hex: hex::encode(h.finalize()) },
            Hasher::Sha512(h) => Digest { algo: Algorithm::Sha512, hex: hex::encode(h.finalize()) },
            Hasher::Sha256Raw(h) => Digest { algo: Algorithm::Sha256, hex: hex::encode(h.finish()) },
        }
    }
}

/// What a manifest URL names: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self, OciError> {
        if s.contains(':') {
            return Digest::parse(s).map(Reference::Digest);
        }
        Tag::parse(s).map(Reference::Tag).ok_or_else(|| OciError::msg(ErrorCode::ManifestInvalid, format!("invalid tag {s:?}")))
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "team/app", "a.b/c_d/e__f/g--h", "library/busybox", "0/1"] {
            assert!(RepoName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "A", "team/App", "a//b", "/a", "a/", "a..b", "a/../b", "..", "a___b", "-a", "a-", "a\\b", "a\0b", "a%2eb"] {
            assert_eq!(RepoName::parse(bad).unwrap_err().code, ErrorCode::NameInvalid, "{bad:?}");
        }
        assert!(RepoName::parse(&"a".repeat(256)).is_err());
        assert!(RepoName::parse(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn digests() {
        let d = Digest::sha256_of(b"");
        assert_eq!(d.to_string(), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
        assert_eq!(Digest::parse("sha256:abc").unwrap_err().code, ErrorCode::DigestInvalid);
        assert_eq!(Digest::parse("nocolon").unwrap_err().code, ErrorCode::DigestInvalid);
        assert_eq!(Digest::parse(&format!("sha256:{}", "A".repeat(64))).unwrap_err().code, ErrorCode::DigestInvalid);
        assert_eq!(Digest::parse("md5:abcd").unwrap_err().code, ErrorCode::Unsupported);
        let s512 = Digest::of(Algorithm::Sha512, b"x");
        assert_eq!(Digest::parse(&s512.to_string()).unwrap(), s512);
    }

    #[test]
    fn tags_and_references() {
        assert!(Tag::parse("v1.0_rc-1").is_some());
        assert!(Tag::parse(".x").is_none());
        assert!(Tag::parse(&"a".repeat(129)).is_none());
        assert!(matches!(Reference::parse("latest").unwrap(), Reference::Tag(_)));
        assert!(matches!(Reference::parse(&Digest::sha256_of(b"a").to_string()).unwrap(), Reference::Digest(_)));
    }
}
