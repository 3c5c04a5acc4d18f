//! Which `WWW-Authenticate` challenge berth answers. The grammar (challenge lists, quoted and
//! unquoted parameter values, escapes) is `http_auth`'s parser; this module only chooses.

/// A challenge berth knows how to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
}

impl Challenge {
    /// The challenge to answer among every `WWW-Authenticate` value of one 401 (a header may list
    /// several challenges, and an upstream may send several headers).
    ///
    /// Bearer wins wherever it appears: docker's authorizer tries its token handler before its
    /// Basic one whatever the order, and a token is scoped to one repository and action where
    /// Basic would send the password with every request. Basic is answered only when no usable
    /// Bearer challenge is offered and berth has credentials for this upstream; anonymous berth
    /// has nothing to send, so the 401 stands. A value with a syntax error still offers the
    /// challenges before the error.
    pub fn choose<'a>(values: impl IntoIterator<Item = &'a str>, have_credentials: bool) -> Option<Challenge> {
        let mut basic = false;
        for value in values {
            for c in http_auth::ChallengeParser::new(value).map_while(Result::ok) {
                if c.scheme.eq_ignore_ascii_case("basic") {
                    basic = true;
                    continue;
                }
                if !c.scheme.eq_ignore_ascii_case("bearer") {
                    continue;
                }
                let param = |k: &str| c.params.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)).map(|(_, v)| v.to_unescaped());
                // A Bearer challenge without a realm names no token service to ask.
                if let Some(realm) = param("realm") {
                    return Some(Challenge::Bearer { realm, service: param("service"), scope: param("scope") });
                }
            }
        }
        (basic && have_credentials).then_some(Challenge::Basic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(realm: &str, service: Option<&str>, scope: Option<&str>) -> Option<Challenge> {
        Some(Challenge::Bearer { realm: realm.into(), service: service.map(Into::into), scope: scope.map(Into::into) })
    }

    #[test]
    fn docker_hub_challenge() {
        let c = Challenge::choose(
            [r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#],
            false,
        );
        assert_eq!(c, bearer("https://auth.docker.io/token", Some("registry.docker.io"), Some("repository:library/busybox:pull,push")));
    }

    #[test]
    fn bearer_wins_over_basic_in_one_header_or_several() {
        let want = bearer("https://auth.example/token", Some("reg"), None);
        for creds in [false, true] {
            // Basic first, with an unquoted realm, then Bearer with an unquoted service.
            let one = Challenge::choose([r#"Basic realm=x, Bearer realm="https://auth.example/token",service=reg"#], creds);
            assert_eq!(one, want, "one header, credentials: {creds}");
            let two = Challenge::choose(["Basic realm=\"x\"", "Bearer realm=\"https://auth.example/token\", service=\"reg\""], creds);
            assert_eq!(two, want, "two headers, credentials: {creds}");
            let reversed = Challenge::choose([r#"Bearer realm="https://auth.example/token",service=reg, Basic realm=x"#], creds);
            assert_eq!(reversed, want, "Bearer first, credentials: {creds}");
        }
    }

    #[test]
    fn basic_only_with_credentials_and_no_usable_bearer() {
        assert_eq!(Challenge::choose(["Basic realm=\"x\""], true), Some(Challenge::Basic));
        assert_eq!(Challenge::choose(["Basic"], true), Some(Challenge::Basic));
        assert_eq!(Challenge::choose(["Basic realm=\"x\""], false), None, "nothing to answer Basic with");
        // A Bearer challenge without a realm cannot be answered; Basic can.
        assert_eq!(Challenge::choose(["Bearer service=x", "Basic realm=r"], true), Some(Challenge::Basic));
        assert_eq!(Challenge::choose(["Bearer service=x"], true), None);
        assert_eq!(Challenge::choose(["Negotiate", "Digest realm=\"x\", nonce=\"n\""], true), None);
        assert_eq!(Challenge::choose(std::iter::empty(), true), None);
    }

    #[test]
    fn params_are_case_insensitive_and_quoted_values_unescaped() {
        let c = Challenge::choose([r#"BEARER Realm="https://a.example/t\"x",SERVICE=svc"#], false);
        assert_eq!(c, bearer("https://a.example/t\"x", Some("svc"), None));
    }

    #[test]
    fn challenges_before_a_syntax_error_still_count() {
        let c = Challenge::choose([r#"Bearer realm="https://a.example/t", error error"#], false);
        assert_eq!(c, bearer("https://a.example/t", None, None));
        assert_eq!(Challenge::choose(["Basic realm=\"x\", error error"], true), Some(Challenge::Basic));
        assert_eq!(Challenge::choose(["===="], true), None);
    }
}
