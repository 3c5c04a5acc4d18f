//! berth's bearer tokens: short-lived ES256 JWTs carrying the granted scopes, in the shape
//! Docker Hub's token service uses (`access: [{type, name, actions}]`).
//!
//! Verification pins the algorithm to ES256 with an EC public key, so `alg: none` and
//! HMAC-with-the-public-key tokens are refused before any claim is read; then issuer,
//! audience, expiry and not-before are checked.

use crate::store::BlobStore;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const ISSUER: &str = "berth";
/// Where a generated key is kept, under `storage.root`.
pub const GENERATED_KEY: &str = "auth/token-key.pem";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The user name; empty for an anonymous token.
    pub sub: String,
    pub aud: String,
    pub exp: u64,
    pub nbf: u64,
    pub iat: u64,
    pub jti: String,
    #[serde(default)]
    pub access: Vec<Access>,
}

/// The signing key pair. Debug prints only the key id.
pub struct TokenKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
    kid: String,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey").field("kid", &self.kid).finish()
    }
}

impl TokenKey {
    /// A P-256 private key in PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), as
    /// `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256` writes it.
    pub fn from_pem(text: &[u8]) -> Result<TokenKey, String> {
        let p = pem::parse(text).map_err(|e| format!("not a PEM file: {e}"))?;
        if p.tag() != "PRIVATE KEY" {
            return Err(format!(
                "expected a PKCS#8 \"PRIVATE KEY\" PEM, found {:?} (convert with `openssl pkcs8 -topk8 -nocrypt`)",
                p.tag()
            ));
        }
        TokenKey::from_pkcs8(p.contents())
    }

    fn from_pkcs8(der: &[u8]) -> Result<TokenKey, String> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &SystemRandom::new())
            .map_err(|e| format!("not a P-256 (ES256) private key: {e}"))?;
        let public = pair.public_key().as_ref();
        let kid = hex::encode(&sha2::Sha256::digest(public)[..12]);
        Ok(TokenKey { encoding: EncodingKey::from_ec_der(der), decoding: DecodingKey::from_ec_der(public), kid })
    }

    pub fn load(path: &Path) -> Result<TokenKey, String> {
        let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        TokenKey::from_pem(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The configured key, or the one kept in the store (every node on the same storage
    /// signs with it), generated on first start.
    pub fn load_or_generate(configured: Option<&Path>, store: &dyn BlobStore) -> Result<TokenKey, String> {
        if let Some(p) = configured {
            return TokenKey::load(p);
        }
        let read = |what: &str| -> Result<Option<TokenKey>, String> {
            match store.object(GENERATED_KEY).map_err(|e| format!("reading the token signing key: {e}"))? {
                None => Ok(None),
                Some(b) => TokenKey::from_pem(&b).map(Some).map_err(|e| format!("the {what} token signing key {GENERATED_KEY}: {e}")),
            }
        };
        if let Some(k) = read("stored")? {
            return Ok(k);
        }
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .map_err(|_| "cannot generate a signing key".to_string())?;
        let text = pem::encode(&pem::Pem::new("PRIVATE KEY", doc.as_ref().to_vec()));
        if store.put_object_new(GENERATED_KEY, text.as_bytes()).map_err(|e| format!("storing the token signing key: {e}"))? {
            tracing::info!(key = GENERATED_KEY, "generated a token signing key");
            return TokenKey::from_pkcs8(doc.as_ref());
        }
        // Another process stored one first: everyone signs with that.
        read("stored")?.ok_or_else(|| "the token signing key vanished while it was being created".to_string())
    }
}

/// A signed token and what the token endpoint reports about it.
pub struct Issued {
    pub token: String,
    pub expires_in: u64,
    pub issued_at: SystemTime,
}

pub struct Tokens {
    key: TokenKey,
    audience: String,
    ttl: Duration,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Tokens {
    pub fn new(key: TokenKey, audience: &str, ttl: Duration) -> Tokens {
        Tokens { key, audience: audience.to_string(), ttl }
    }

    pub fn issue(&self, user: Option<&str>, access: Vec<Access>) -> Issued {
        let now = SystemTime::now();
        let iat = unix(now);
        let claims = Claims {
            iss: ISSUER.to_string(),
            sub: user.unwrap_or_default().to_string(),
            aud: self.audience.clone(),
            exp: iat + self.ttl.as_secs(),
            nbf: iat,
            iat,
            jti: uuid::Uuid::new_v4().simple().to_string(),
            access,
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.key.encoding).expect("ES256 signing with a validated key");
        Issued { token, expires_in: self.ttl.as_secs(), issued_at: now }
    }

    pub fn verify(&self, token: &str) -> Result<Claims, String> {
        let mut v = Validation::new(Algorithm::ES256);
        v.set_issuer(&[ISSUER]);
        v.set_audience(&[&self.audience]);
        v.set_required_spec_claims(&["exp", "nbf", "iss", "aud"]);
        v.validate_nbf = true;
        // berth checks its own tokens: there is no second clock to allow for.
        v.leeway = 0;
        jsonwebtoken::decode::<Claims>(token, &self.key.decoding, &v).map(|d| d.claims).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine as _;

    fn tokens(aud: &str) -> Tokens {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::local::LocalBlobs::open(dir.path()).unwrap();
        Tokens::new(TokenKey::load_or_generate(None, &store).unwrap(), aud, Duration::from_secs(300))
    }

    fn access(name: &str) -> Vec<Access> {
        vec![Access { kind: "repository".into(), name: name.into(), actions: vec!["pull".into()] }]
    }

    #[test]
    fn issued_tokens_verify_and_carry_the_grant() {
        let t = tokens("berth");
        let issued = t.issue(Some("alice"), access("team/app"));
        let c = t.verify(&issued.token).unwrap();
        assert_eq!(c.sub, "alice");
        assert_eq!(c.access, access("team/app"));
        assert_eq!(issued.expires_in, 300);
        let header = jsonwebtoken::decode_header(&issued.token).unwrap();
        assert_eq!(header.alg, Algorithm::ES256);
    }

    #[test]
    fn tampering_is_refused() {
        let t = tokens("berth");
        let tok = t.issue(Some("bob"), access("team/app")).token;
        let parts: Vec<&str> = tok.split('.').collect();
        // Payload rewritten to grant another repository, signature kept.
        let mut claims: serde_json::Value = serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
        claims["access"][0]["name"] = "team/secret".into();
        let forged = format!("{}.{}.{}", parts[0], B64.encode(serde_json::to_vec(&claims).unwrap()), parts[2]);
        assert!(t.verify(&forged).is_err());
        // alg: none, no signature.
        let none = format!("{}.{}.", B64.encode(br#"{"alg":"none","typ":"JWT"}"#), parts[1]);
        assert!(t.verify(&none).is_err());
        // Another key's token.
        assert!(tokens("berth").verify(&tok).is_err());
        // Another audience.
        let other = tokens("other");
        let o = other.issue(None, vec![]).token;
        let same_key_other_aud = Tokens { key: other.key, audience: "berth".into(), ttl: Duration::from_secs(1) };
        assert!(same_key_other_aud.verify(&o).is_err());
    }

    #[test]
    fn expired_tokens_are_refused() {
        let t = tokens("berth");
        let now = unix(SystemTime::now());
        let claims = Claims {
            iss: ISSUER.into(),
            sub: "alice".into(),
            aud: "berth".into(),
            exp: now - 10,
            nbf: now - 400,
            iat: now - 400,
            jti: "x".into(),
            access: access("team/app"),
        };
        let tok = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &t.key.encoding).unwrap();
        assert!(t.verify(&tok).unwrap_err().contains("Expired"));
    }

    #[test]
    fn keys_persist_and_bad_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::local::LocalBlobs::open(dir.path()).unwrap();
        let a = TokenKey::load_or_generate(None, &store).unwrap();
        let b = TokenKey::load_or_generate(None, &store).unwrap();
        assert_eq!(a.kid, b.kid);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(GENERATED_KEY)).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the key is private to berth");
        assert!(!format!("{a:?}").contains("PRIVATE"));
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n").unwrap();
        assert!(TokenKey::load(&bad).unwrap_err().contains("pkcs8"));
    }
}
