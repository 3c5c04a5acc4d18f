//! htpasswd files as `htpasswd -B` writes them: one `user:$2y$...` line per user.
//!
//! Only bcrypt is accepted. MD5-crypt (`$apr1$`), `{SHA}` and crypt(3) entries can be brute-forced
//! offline in hours, so a file holding one is refused at load with its line number rather than
//! silently weakening the registry.

use std::collections::HashMap;
use std::path::Path;

/// bcrypt's own default, used for the dummy verification when the file has no entries.
const DEFAULT_COST: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum HtpasswdError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{origin} line {line}{user}: {message}")]
    Line { origin: String, line: usize, user: String, message: String },
}

/// Users and their bcrypt hashes. Debug never prints a hash.
#[derive(Clone, Default)]
pub struct Htpasswd {
    users: HashMap<String, String>,
    cost: u32,
}

impl std::fmt::Debug for Htpasswd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.users.keys().collect();
        names.sort();
        f.debug_struct("Htpasswd").field("users", &names).finish()
    }
}

impl Htpasswd {
    pub fn load(path: &Path) -> Result<Htpasswd, HtpasswdError> {
        let text = std::fs::read_to_string(path).map_err(|source| HtpasswdError::Read { path: path.display().to_string(), source })?;
        Htpasswd::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Htpasswd, HtpasswdError> {
        let mut users = HashMap::new();
        let mut cost = 0;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let err = |user: &str, message: String| HtpasswdError::Line {
                origin: origin.to_string(),
                line: i + 1,
                user: if user.is_empty() { String::new() } else { format!(" (user {user:?})") },
                message,
            };
            let Some((user, hash)) = line.split_once(':') else {
                return Err(err("", "not a `user:hash` entry".into()));
            };
            if user.is_empty() || user.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(err("", "the user name is empty or contains spaces".into()));
            }
            let c = bcrypt_cost(hash).ok_or_else(|| err(user, not_bcrypt(hash)))?;
            if users.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(err(user, "the user is listed twice".into()));
            }
            cost = cost.max(c);
        }
        Ok(Htpasswd { users, cost: if cost == 0 { DEFAULT_COST } else { cost } })
    }

    pub fn hash_of(&self, user: &str) -> Option<&str> {
        self.users.get(user).map(String::as_str)
    }

    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The highest cost in the file: every wrong password, and every unknown user, costs the
    /// bcrypt work of this cost.
    pub fn cost(&self) -> u32 {
        self.cost
    }
}

/// The cost of an entry's hash, as the file was checked with at load.
pub(crate) fn hash_cost(hash: &str) -> Option<u32> {
    bcrypt_cost(hash)
}

/// The cost of a well-formed `$2a$`/`$2b$`/`$2y$` hash: `$2y$CC$` then 53 characters of bcrypt's
/// base64 (22 of salt, 31 of hash).
fn bcrypt_cost(hash: &str) -> Option<u32> {
    let rest = hash.strip_prefix("$2a$").or_else(|| hash.strip_prefix("$2b$")).or_else(|| hash.strip_prefix("$2y$"))?;
    let (cost, body) = rest.split_once('$')?;
    if cost.len() != 2 || body.len() != 53 || !body.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/') {
        return None;
    }
    let cost: u32 = cost.parse().ok()?;
    (4..=31).contains(&cost).then_some(cost)
}

fn not_bcrypt(hash: &str) -> String {
    let kind = if hash.starts_with("$apr1$") || hash.starts_with("$1$") {
        "an MD5-crypt hash"
    } else if hash.starts_with("{SHA}") {
        "a SHA-1 hash"
    } else if hash.starts_with("$5$") || hash.starts_with("$6$") {
        "a SHA-crypt hash"
    } else if hash.starts_with("$2") {
        "a malformed bcrypt hash"
    } else {
        "plain text or crypt(3)"
    };
    format!("{kind}; only bcrypt entries ($2a$, $2b$, $2y$) are accepted: recreate the user with `htpasswd -B`")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str = "$2y$05$O7dCs5zY7sPeMSGgUnbNXeVoKCXKJKv0qDVrdKDNrgIPVM6TDhTCe";

    #[test]
    fn parses_bcrypt_entries_and_skips_comments() {
        let text = format!("# users\n\nalice:{ALICE}\r\nbob:{}\n", ALICE.replacen("$2y$", "$2b$", 1));
        let h = Htpasswd::parse(&text, "t").unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h.hash_of("alice"), Some(ALICE));
        assert_eq!(h.cost(), 5);
        assert!(!format!("{h:?}").contains("$2y$"));
    }

    #[test]
    fn other_formats_are_refused_naming_the_line() {
        for (entry, kind) in [
            ("carol:$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/", "MD5"),
            ("carol:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "SHA-1"),
            ("carol:secret", "plain text"),
            ("carol:$2y$05$short", "malformed bcrypt"),
            ("carol:$2y$99$O7dCs5zY7sPeMSGgUnbNXeVoKCXKJKv0qDVrdKDNrgIPVM6TDhTCe", "malformed bcrypt"),
        ] {
            let e = Htpasswd::parse(&format!("alice:{ALICE}\n\n{entry}\n"), "/etc/berth/htpasswd").unwrap_err().to_string();
            assert!(e.contains("/etc/berth/htpasswd line 3 (user \"carol\")"), "{e}");
            assert!(e.contains(kind), "{e}");
            assert!(!e.contains("HqJZ") && !e.contains("secret"), "no hash material in errors: {e}");
        }
        let e = Htpasswd::parse("no colon here\n", "f").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        let e = Htpasswd::parse(&format!("alice:{ALICE}\nalice:{ALICE}\n"), "f").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("twice"), "{e}");
    }

    #[test]
    fn an_empty_file_has_the_default_cost() {
        let h = Htpasswd::parse("", "t").unwrap();
        assert!(h.is_empty());
        assert_eq!(h.cost(), DEFAULT_COST);
    }
}
