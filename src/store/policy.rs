//! Per-namespace policies for hosted repositories: retention, immutable tags, quota.

/// A hosted namespace's lifecycle rules. Empty means "keep everything, allow everything".
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Keep the newest N tags per repository...
    pub keep_tags: Option<usize>,
    /// ...and every tag matching one of these.
    pub keep_patterns: Vec<glob::Pattern>,
    /// Tags matching these can be pushed once, never moved or deleted.
    pub immutable_tags: Vec<glob::Pattern>,
    pub quota_bytes: Option<u64>,
    /// Indexes may name child manifests the repository does not hold (a single-platform copy
    /// of a multi-arch image); blobs an index or manifest names must still be there.
    pub sparse_indexes: bool,
}

impl Policy {
    pub fn new(keep_tags: Option<usize>, keep: &[String], immutable: &[String], quota_bytes: Option<u64>) -> Result<Policy, String> {
        let compile = |key: &str, v: &[String]| -> Result<Vec<glob::Pattern>, String> {
            v.iter().map(|p| glob::Pattern::new(p).map_err(|e| format!("{key}: bad pattern {p:?}: {e}"))).collect()
        };
        Ok(Policy {
            keep_tags,
            keep_patterns: compile("keep_patterns", keep)?,
            immutable_tags: compile("immutable_tags", immutable)?,
            quota_bytes,
            sparse_indexes: false,
        })
    }

    pub fn is_immutable(&self, tag: &str) -> bool {
        self.immutable_tags.iter().any(|p| p.matches(tag))
    }

    /// Tags retention never removes, whatever their age.
    pub fn always_kept(&self, tag: &str) -> bool {
        self.is_immutable(tag) || self.keep_patterns.iter().any(|p| p.matches(tag))
    }

    /// Which of `tags` (newest first) retention removes.
    pub fn expired<'a>(&self, newest_first: &'a [String]) -> Vec<&'a str> {
        let Some(n) = self.keep_tags else { return Vec::new() };
        newest_first.iter().skip(n).filter(|t| !self.always_kept(t)).map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_newest_and_patterns() {
        let p = Policy::new(Some(2), &["v*".into(), "latest".into()], &[], None).unwrap();
        let tags: Vec<String> = ["c", "b", "v1", "a", "latest", "z"].iter().map(|s| s.to_string()).collect();
        assert_eq!(p.expired(&tags), vec!["a", "z"]);
        assert!(Policy::default().expired(&tags).is_empty());
    }

    #[test]
    fn immutable_patterns() {
        let p = Policy::new(None, &[], &["v*".into()], None).unwrap();
        assert!(p.is_immutable("v1.2"));
        assert!(!p.is_immutable("latest"));
        assert!(Policy::new(None, &["[".into()], &[], None).is_err());
    }
}
