//! Configuration: the TOML file shape (unknown keys are errors naming the key) kept apart from
//! the validated runtime type the rest of berth uses.

use crate::oci::RepoName;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The configuration `berth serve` runs with when given no file: a Docker Hub mirror plus the
/// other big public registries.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/embedded.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid config: {key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), message: message.into() }
}

// ---- file shape ----

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    server: ServerFile,
    #[serde(default)]
    storage: StorageFile,
    #[serde(default)]
    log: LogFile,
    #[serde(default)]
    namespace: Vec<NamespaceFile>,
    #[serde(default)]
    upstream: Vec<UpstreamFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ServerFile {
    listen: Option<String>,
    admin_listen: Option<String>,
    #[serde(with = "humantime_serde")]
    grace_period: Duration,
    threads: Option<usize>,
}

impl Default for ServerFile {
    fn default() -> Self {
        ServerFile {
            listen: Some("127.0.0.1:5000".into()),
            admin_listen: Some("127.0.0.1:9100".into()),
            grace_period: Duration::from_secs(10),
            threads: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct StorageFile {
    root: PathBuf,
}

impl Default for StorageFile {
    fn default() -> Self {
        StorageFile { root: PathBuf::from("./berth-data") }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct LogFile {
    format: LogFormat,
    level: Option<String>,
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceFile {
    prefix: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamFile {
    name: String,
    url: String,
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default)]
    default: bool,
    #[serde(default = "default_tag_ttl", with = "humantime_serde")]
    tag_ttl: Duration,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    timeout: Duration,
    username: Option<String>,
    password_file: Option<PathBuf>,
}

fn default_tag_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

// ---- runtime type ----

/// A secret read from a file: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub grace_period: Duration,
    pub threads: usize,
    pub storage_root: PathBuf,
    pub log_format: LogFormat,
    pub log_level: String,
    pub namespaces: Vec<Namespace>,
    pub upstreams: Vec<Upstream>,
}

#[derive(Debug, Clone)]
pub struct Namespace {
    pub prefix: String,
}

impl Namespace {
    pub fn matches(&self, repo: &str) -> bool {
        repo == self.prefix || repo.strip_prefix(&self.prefix).is_some_and(|r| r.starts_with('/'))
    }
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub url: url::Url,
    pub aliases: Vec<String>,
    pub default: bool,
    pub tag_ttl: Duration,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub credentials: Option<(String, Secret)>,
}

impl Upstream {
    pub fn answers_to(&self, host: &str) -> bool {
        self.name == host || self.aliases.iter().any(|a| a == host)
    }
}

fn parse_addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| invalid(key, format!("{s:?} is not an address like 127.0.0.1:5000")))
}

impl Config {
    pub fn embedded_default() -> Config {
        Config::parse(EMBEDDED_DEFAULT, "(embedded default)").expect("embedded default config is valid")
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let f: File = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { origin: origin.to_string(), message: e.to_string().trim_end().to_string() })?;
        let listen = f.server.listen.as_deref().map(|s| parse_addr("server.listen", s)).transpose()?;
        let admin_listen = f.server.admin_listen.as_deref().map(|s| parse_addr("server.admin_listen", s)).transpose()?;
        if listen.is_none() {
            return Err(invalid("server.listen", "a listener is required"));
        }
        let mut namespaces = Vec::new();
        for (i, n) in f.namespace.iter().enumerate() {
            RepoName::parse(&n.prefix).map_err(|e| invalid(format!("namespace[{i}].prefix"), e.message))?;
            namespaces.push(Namespace { prefix: n.prefix.clone() });
        }
        let mut upstreams: Vec<Upstream> = Vec::new();
        for (i, u) in f.upstream.into_iter().enumerate() {
            let key = |k: &str| format!("upstream[{i}].{k}");
            let url = url::Url::parse(&u.url).map_err(|e| invalid(key("url"), format!("{:?}: {e}", u.url)))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(invalid(key("url"), format!("{:?} must be an http(s) URL with a host", u.url)));
            }
            if u.name.is_empty() || u.name.contains('/') {
                return Err(invalid(key("name"), "must be a registry host name such as docker.io"));
            }
            for other in &upstreams {
                if other.answers_to(&u.name) || u.aliases.iter().any(|a| other.answers_to(a)) {
                    return Err(invalid(key("name"), format!("{} is already served by upstream {}", u.name, other.name)));
                }
            }
            if u.default && upstreams.iter().any(|o| o.default) {
                return Err(invalid(key("default"), "only one upstream can be the default"));
            }
            let credentials = match (u.username, u.password_file) {
                (Some(user), Some(pf)) => {
                    let pw = std::fs::read_to_string(&pf)
                        .map_err(|e| invalid(key("password_file"), format!("cannot read {}: {e}", pf.display())))?;
                    Some((user, Secret(pw.trim_end_matches(['\r', '\n']).to_string())))
                }
                (None, None) => None,
                _ => return Err(invalid(key("username"), "username and password_file go together")),
            };
            upstreams.push(Upstream {
                name: u.name,
                url,
                aliases: u.aliases,
                default: u.default,
                tag_ttl: u.tag_ttl,
                connect_timeout: u.connect_timeout,
                timeout: u.timeout,
                credentials,
            });
        }
        for n in &namespaces {
            let first = n.prefix.split('/').next().unwrap_or_default();
            if let Some(u) = upstreams.iter().find(|u| u.answers_to(first)) {
                return Err(invalid("namespace.prefix", format!("{} is shadowed by upstream {}", n.prefix, u.name)));
            }
        }
        let threads = f.server.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2));
        if threads == 0 {
            return Err(invalid("server.threads", "must be at least 1"));
        }
        Ok(Config {
            listen,
            admin_listen,
            grace_period: f.server.grace_period,
            threads,
            storage_root: f.storage.root,
            log_format: f.log.format,
            log_level: f.log.level.unwrap_or_else(|| "info".to_string()),
            namespaces,
            upstreams,
        })
    }

    /// Checks what only the machine can tell: the storage root can be created and written.
    pub fn check_environment(&self) -> Result<(), ConfigError> {
        let root = &self.storage_root;
        std::fs::create_dir_all(root)
            .and_then(|_| tempfile_in(root))
            .map_err(|e| invalid("storage.root", format!("{} is not writable: {e}", root.display())))
    }
}

fn tempfile_in(dir: &Path) -> std::io::Result<()> {
    let p = dir.join(format!(".berth-check-{}", std::process::id()));
    std::fs::write(&p, b"")?;
    std::fs::remove_file(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_mirrors_the_big_registries() {
        let c = Config::embedded_default();
        assert_eq!(c.listen.unwrap().to_string(), "127.0.0.1:5000");
        assert_eq!(c.admin_listen.unwrap().to_string(), "127.0.0.1:9100");
        let names: Vec<_> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["docker.io", "ghcr.io", "quay.io", "registry.k8s.io", "gcr.io"]);
        assert!(c.upstreams[0].default);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse("[server]\nlisten = \"127.0.0.1:1\"\nlisten_typo = 1\n", "t").unwrap_err();
        assert!(e.to_string().contains("listen_typo"), "{e}");
        let e = Config::parse("[[upstream]]\nname=\"a\"\nurl=\"http://x\"\nbogus=1\n", "t").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = Config::parse("[server]\nlisten = \"nope\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("server.listen"), "{e}");
        let e = Config::parse("[[namespace]]\nprefix = \"Team\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("namespace[0].prefix"), "{e}");
        let e = Config::parse("[[upstream]]\nname=\"a\"\nurl=\"http://x\"\nusername=\"u\"\npassword_file=\"/nonexistent/pw\"\n", "t")
            .unwrap_err();
        assert!(e.to_string().contains("password_file"), "{e}");
        let e = Config::parse(
            "[[upstream]]\nname=\"a\"\nurl=\"http://x\"\ndefault=true\n[[upstream]]\nname=\"b\"\nurl=\"http://y\"\ndefault=true\n",
            "t",
        )
        .unwrap_err();
        assert!(e.to_string().contains("default"), "{e}");
    }

    #[test]
    fn a_file_mirrors_only_what_it_declares() {
        let c = Config::parse("[[namespace]]\nprefix = \"team\"\n", "t").unwrap();
        assert!(c.upstreams.is_empty());
        assert!(c.namespaces[0].matches("team") && c.namespaces[0].matches("team/app") && !c.namespaces[0].matches("teamx"));
    }

    #[test]
    fn secrets_are_redacted() {
        let s = Secret("hunter2".into());
        assert_eq!(format!("{s:?}"), "<redacted>");
    }

    #[test]
    fn every_shipped_config_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                Config::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 1);
    }
}
