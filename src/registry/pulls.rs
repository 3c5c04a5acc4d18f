//! When each tag and repository was last pulled through this node: what the web UI shows next
//! to push dates. In memory and bounded (a node restarted, or a tag pushed out of the bound,
//! shows no pull until the next one); pulls are far too frequent to journal.

use moka::sync::Cache;

pub struct Pulls {
    tags: Cache<(String, String), u64>,
    repos: Cache<String, u64>,
}

impl Default for Pulls {
    fn default() -> Self {
        Pulls { tags: Cache::new(200_000), repos: Cache::new(100_000) }
    }
}

impl Pulls {
    /// A manifest of `repo` (by `tag`, when pulled by one) was served at `now_ms`.
    pub fn record(&self, repo: &str, tag: Option<&str>, now_ms: u64) {
        if let Some(t) = tag {
            self.tags.insert((repo.to_string(), t.to_string()), now_ms);
        }
        self.repos.insert(repo.to_string(), now_ms);
    }

    pub fn tag(&self, repo: &str, tag: &str) -> Option<u64> {
        self.tags.get(&(repo.to_string(), tag.to_string()))
    }

    pub fn repository(&self, repo: &str) -> Option<u64> {
        self.repos.get(repo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_last_pull_per_tag_and_repository() {
        let p = Pulls::default();
        assert_eq!(p.tag("a", "1"), None);
        p.record("a", Some("1"), 5);
        p.record("a", None, 9);
        assert_eq!((p.tag("a", "1"), p.repository("a"), p.repository("b")), (Some(5), Some(9), None));
    }
}
