//! Who may do what: principals, per-namespace and per-upstream rules, and the token scopes
//! (`repository:team/app:pull,push`) that clients ask for and berth grants a subset of.

/// One entry of a `pull`/`push` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Everyone, with or without credentials.
    Anonymous,
    /// Any user who presented valid credentials.
    Authenticated,
    User(String),
}

impl Principal {
    pub fn parse(s: &str) -> Principal {
        match s {
            "anonymous" => Principal::Anonymous,
            "authenticated" => Principal::Authenticated,
            user => Principal::User(user.to_string()),
        }
    }

    /// Does this entry admit `user` (`None`: no credentials)?
    fn admits(&self, user: Option<&str>) -> bool {
        match self {
            Principal::Anonymous => true,
            Principal::Authenticated => user.is_some(),
            Principal::User(u) => user == Some(u.as_str()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pull,
    /// Writes of any kind: uploads, manifest PUT, DELETE.
    Push,
}

impl Action {
    pub fn scope_actions(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "pull,push",
        }
    }

    /// Is this action covered by a token's granted action list?
    pub fn granted_by(self, actions: &[String]) -> bool {
        actions.iter().any(|a| match self {
            // Whoever may write may read (see `Rules::allows`), so a push grant covers pulls.
            Action::Pull => matches!(a.as_str(), "pull" | "push" | "*"),
            Action::Push => matches!(a.as_str(), "push" | "delete" | "*"),
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    pub pull: Vec<Principal>,
    pub push: Vec<Principal>,
}

impl Rules {
    /// A namespace with `[auth]` and no rules of its own: any user may pull and push.
    pub fn hosted_default() -> Rules {
        Rules { pull: vec![Principal::Authenticated], push: vec![Principal::Authenticated] }
    }

    /// A mirror with no rules of its own: public content, pulled by anyone, never pushed.
    pub fn mirror_default() -> Rules {
        Rules { pull: vec![Principal::Anonymous], push: Vec::new() }
    }

    pub fn allows(&self, user: Option<&str>, action: Action) -> bool {
        let admits = |list: &[Principal]| list.iter().any(|p| p.admits(user));
        match action {
            // A pusher can overwrite any tag, so hiding content from them protects nothing,
            // while `docker push` would break on its existence checks.
            Action::Pull => admits(&self.pull) || admits(&self.push),
            Action::Push => admits(&self.push),
        }
    }

    /// The subset of `requested` token actions these rules give `user`, in request order.
    pub fn grant(&self, user: Option<&str>, requested: &[String]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for a in requested {
            let ok = match a.as_str() {
                "pull" => self.allows(user, Action::Pull),
                "push" | "delete" | "*" => self.allows(user, Action::Push),
                _ => false,
            };
            if ok && !out.contains(a) {
                out.push(a.clone());
            }
        }
        out
    }
}

/// Rules for every hosted namespace and mirrored upstream, as configured.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    namespaces: Vec<(String, Rules)>,
    upstreams: Vec<(String, Rules)>,
}

static DENY_ALL: Rules = Rules { pull: Vec::new(), push: Vec::new() };

impl Policy {
    pub fn add_namespace(&mut self, prefix: &str, rules: Rules) {
        self.namespaces.push((prefix.to_string(), rules));
    }

    /// Mirrors are read-only whatever the file says: only the pull list is kept.
    pub fn add_upstream(&mut self, name: &str, pull: Vec<Principal>) {
        self.upstreams.push((name.to_string(), Rules { pull, push: Vec::new() }));
    }

    /// The rules of the most specific namespace holding `repo`; nothing is allowed outside one.
    pub fn hosted(&self, repo: &str) -> &Rules {
        self.namespaces
            .iter()
            .filter(|(p, _)| repo == p || repo.strip_prefix(p.as_str()).is_some_and(|r| r.starts_with('/')))
            .max_by_key(|(p, _)| p.len())
            .map(|(_, r)| r)
            .unwrap_or(&DENY_ALL)
    }

    pub fn mirror(&self, upstream: &str) -> &Rules {
        static DEFAULT: std::sync::OnceLock<Rules> = std::sync::OnceLock::new();
        self.upstreams.iter().find(|(n, _)| n == upstream).map(|(_, r)| r).unwrap_or_else(|| DEFAULT.get_or_init(Rules::mirror_default))
    }
}

/// One requested scope: `type[(class)]:name:action,action`. The name may hold colons (a
/// registry host with a port), so the type ends at the first colon and the actions start
/// after the last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Scope> {
        let (kind, rest) = s.split_once(':')?;
        let (name, actions) = rest.rsplit_once(':')?;
        let kind = kind.split_once('(').map(|(k, _)| k).unwrap_or(kind);
        if kind.is_empty() || name.is_empty() {
            return None;
        }
        let actions = actions.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_string).collect();
        Some(Scope { kind: kind.to_string(), name: name.to_string(), actions })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn principals() {
        let rules = Rules { pull: vec![Principal::parse("anonymous")], push: vec![Principal::parse("ci")] };
        assert!(rules.allows(None, Action::Pull));
        assert!(!rules.allows(None, Action::Push));
        assert!(rules.allows(Some("ci"), Action::Push));
        assert!(!rules.allows(Some("bob"), Action::Push));
        let private = Rules { pull: vec![Principal::User("alice".into())], push: vec![] };
        assert!(!private.allows(None, Action::Pull));
        assert!(!private.allows(Some("bob"), Action::Pull));
        assert!(private.allows(Some("alice"), Action::Pull));
        let def = Rules::hosted_default();
        assert!(!def.allows(None, Action::Pull) && def.allows(Some("x"), Action::Push));
        assert!(!Rules::mirror_default().allows(Some("x"), Action::Push));
    }

    #[test]
    fn grants_the_allowed_subset() {
        let rules = Rules { pull: vec![Principal::Authenticated], push: vec![Principal::User("ci".into())] };
        assert_eq!(rules.grant(Some("bob"), &s(&["pull", "push"])), s(&["pull"]));
        assert_eq!(rules.grant(Some("ci"), &s(&["pull", "push", "delete", "bogus"])), s(&["pull", "push", "delete"]));
        assert!(rules.grant(None, &s(&["pull"])).is_empty());
        // Pushers read what they write.
        let push_only = Rules { pull: vec![], push: vec![Principal::User("ci".into())] };
        assert_eq!(push_only.grant(Some("ci"), &s(&["pull"])), s(&["pull"]));
    }

    #[test]
    fn token_actions_cover_requests() {
        assert!(Action::Pull.granted_by(&s(&["pull"])));
        assert!(Action::Pull.granted_by(&s(&["push"])));
        assert!(!Action::Push.granted_by(&s(&["pull"])));
        assert!(Action::Push.granted_by(&s(&["*"])));
        assert!(!Action::Pull.granted_by(&[]));
    }

    #[test]
    fn most_specific_namespace_wins() {
        let mut p = Policy::default();
        p.add_namespace("team", Rules::hosted_default());
        p.add_namespace("team/secret", Rules { pull: vec![Principal::User("alice".into())], push: vec![] });
        assert_eq!(p.hosted("team/app"), &Rules::hosted_default());
        assert_eq!(p.hosted("team/secret/x").pull, vec![Principal::User("alice".into())]);
        assert_eq!(p.hosted("teamx/app"), &DENY_ALL);
        p.add_upstream("docker.io", vec![Principal::Authenticated]);
        assert!(!p.mirror("docker.io").allows(None, Action::Pull));
        assert!(p.mirror("ghcr.io").allows(None, Action::Pull));
    }

    #[test]
    fn scopes() {
        assert_eq!(
            Scope::parse("repository:team/app:pull,push"),
            Some(Scope { kind: "repository".into(), name: "team/app".into(), actions: s(&["pull", "push"]) })
        );
        let sc = Scope::parse("repository(plugin):reg.local:5000/x/y:pull").unwrap();
        assert_eq!((sc.kind.as_str(), sc.name.as_str()), ("repository", "reg.local:5000/x/y"));
        assert_eq!(Scope::parse("registry:catalog:*").unwrap().actions, s(&["*"]));
        assert_eq!(Scope::parse("repository:app:").unwrap().actions, Vec::<String>::new());
        assert_eq!(Scope::parse("nonsense"), None);
        assert_eq!(Scope::parse("repository::pull"), None);
    }
}
