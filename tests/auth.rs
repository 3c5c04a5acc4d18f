//! Access control against the real berth binary: htpasswd users, the token service, per-namespace
//! rules, throttling, and real clients (docker, skopeo) logging in, pushing and pulling.

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use common::cmd::{self, Output};
use common::dockerd::{self, Dockerd};
use common::Berth;
use reqwest::blocking::{Client, RequestBuilder};
use reqwest::StatusCode;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const USERS: [(&str, &str); 4] = [("ci", "ci-secret"), ("alice", "alice-secret"), ("bob", "bob-secret"), ("dave", "dave-secret")];

fn pw(user: &str) -> &'static str {
    USERS.iter().find(|(u, _)| *u == user).unwrap().1
}

/// public: anyone pulls, ci pushes. private: only alice pulls (and ci, who pushes).
/// shared: the defaults with [auth], any user pulls and pushes.
const RULES: &str = r#"
[[namespace]]
prefix = "public"
pull = ["anonymous"]
push = ["ci"]

[[namespace]]
prefix = "private"
pull = ["alice"]
push = ["ci"]

[[namespace]]
prefix = "shared"
"#;

fn write_htpasswd(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("htpasswd");
    // Cost 4 keeps the suite fast; berth accepts any bcrypt cost.
    let text: String = USERS.iter().map(|(u, pw)| format!("{u}:{}\n", bcrypt::hash(pw, 4).unwrap())).collect();
    std::fs::write(&p, text).unwrap();
    p
}

/// berth with `[auth]` (plus `auth_extra` keys), the namespaces above, and `extra` after them.
fn start(auth_extra: &str, extra: &str) -> Berth {
    let dir = tempfile::tempdir().unwrap();
    let ht = write_htpasswd(dir.path());
    Berth::start_in(dir, &format!("[auth]\nhtpasswd = \"{}\"\n{auth_extra}\n{RULES}\n{extra}", ht.display()))
}

fn client() -> Client {
    Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().unwrap()
}

fn as_user(r: RequestBuilder, user: Option<&str>) -> RequestBuilder {
    match user {
        Some(u) => r.basic_auth(u, Some(pw(u))),
        None => r,
    }
}

fn challenge(r: &reqwest::blocking::Response) -> String {
    r.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

fn push_blob(c: &Client, b: &Berth, repo: &str, data: &[u8], user: Option<&str>) -> StatusCode {
    let d = common::digest(data);
    as_user(c.post(format!("{}/v2/{repo}/blobs/uploads/?digest={d}", b.url())), user).body(data.to_vec()).send().unwrap().status()
}

/// Pushes a one-layer OCI image as `user` over the plain API; returns the manifest digest.
fn push_image(c: &Client, b: &Berth, repo: &str, tag: &str, user: &str) -> String {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"repo":"{repo}"}}"#);
    let layer = format!("layer of {repo}:{tag}").into_bytes();
    for blob in [config.as_bytes(), &layer] {
        assert_eq!(push_blob(c, b, repo, blob, Some(user)), StatusCode::CREATED);
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": common::digest(config.as_bytes()), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": common::digest(&layer), "size": layer.len()}],
    }))
    .unwrap();
    let r = as_user(c.put(format!("{}/v2/{repo}/manifests/{tag}", b.url())), Some(user))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().unwrap());
    common::digest(&manifest)
}

fn token(c: &Client, b: &Berth, user: Option<&str>, scopes: &[&str]) -> String {
    let mut q: Vec<(&str, &str)> = vec![("service", "berth")];
    q.extend(scopes.iter().map(|s| ("scope", *s)));
    let r = as_user(c.get(format!("{}/token", b.url())).query(&q), user).send().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["token"], v["access_token"]);
    assert!(v["expires_in"].as_u64().unwrap() > 0);
    v["token"].as_str().unwrap().to_string()
}

fn claims_of(token: &str) -> serde_json::Value {
    serde_json::from_slice(&B64.decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap()
}

fn get_with_bearer(c: &Client, url: &str, token: &str) -> reqwest::blocking::Response {
    c.get(url).bearer_auth(token).send().unwrap()
}

#[test]
fn base_endpoint_challenges_and_accepts_credentials() {
    let b = start("", "");
    let c = client();
    let r = c.get(format!("{}/v2/", b.url())).send().unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(challenge(&r), format!("Bearer realm=\"http://{}/token\",service=\"berth\"", b.host()));
    assert_eq!(as_user(c.get(format!("{}/v2/", b.url())), Some("bob")).send().unwrap().status(), StatusCode::OK);
    let r = c.get(format!("{}/v2/", b.url())).basic_auth("bob", Some("wrong")).send().unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // An anonymous token is how the docker daemon pulls from a mirror after this challenge.
    let anon = token(&c, &b, None, &[]);
    assert_eq!(get_with_bearer(&c, &format!("{}/v2/", b.url()), &anon).status(), StatusCode::OK);
    let r = get_with_bearer(&c, &format!("{}/v2/", b.url()), "not.a.token");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(challenge(&r).contains("error=\"invalid_token\""), "{}", challenge(&r));
}

#[test]
fn namespace_rules_over_the_api() {
    let b = start("", "");
    let c = client();
    push_image(&c, &b, "private/app", "v1", "ci");
    push_image(&c, &b, "public/app", "v1", "ci");
    let private = format!("{}/v2/private/app/manifests/v1", b.url());
    let public = format!("{}/v2/public/app/manifests/v1", b.url());

    let r = c.get(&private).send().unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let ch = challenge(&r);
    assert!(ch.contains("scope=\"repository:private/app:pull\"") && !ch.contains("error="), "{ch}");
    let r = as_user(c.get(&private), Some("bob")).send().unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(challenge(&r).contains("error=\"insufficient_scope\""), "{}", challenge(&r));
    assert_eq!(r.json::<serde_json::Value>().unwrap()["errors"][0]["code"], "UNAUTHORIZED");
    assert_eq!(as_user(c.get(&private), Some("alice")).send().unwrap().status(), StatusCode::OK);
    assert_eq!(c.get(&public).send().unwrap().status(), StatusCode::OK, "public pulls need no credentials");

    // A pull-only user cannot push, by password or by token.
    assert_eq!(push_blob(&c, &b, "private/app", b"from alice", Some("alice")), StatusCode::UNAUTHORIZED);
    let r = as_user(c.post(format!("{}/v2/private/app/blobs/uploads/", b.url())), Some("alice")).send().unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(challenge(&r).contains("scope=\"repository:private/app:pull,push\""), "{}", challenge(&r));
    let t = token(&c, &b, Some("alice"), &["repository:private/app:pull,push"]);
    assert_eq!(claims_of(&t)["access"], json!([{"type": "repository", "name": "private/app", "actions": ["pull"]}]));
    assert_eq!(c.post(format!("{}/v2/private/app/blobs/uploads/", b.url())).bearer_auth(&t).send().unwrap().status(), 401);
    assert_eq!(c.delete(&private).bearer_auth(&t).send().unwrap().status(), 401);
    assert_eq!(get_with_bearer(&c, &private, &t).status(), StatusCode::OK);
    // Anonymous pushes to a public namespace are refused too.
    assert_eq!(push_blob(&c, &b, "public/app", b"anon", None), StatusCode::UNAUTHORIZED);

    // ci's token carries both; a push works with it.
    let t = token(&c, &b, Some("ci"), &["repository:private/app:pull,push"]);
    assert_eq!(claims_of(&t)["access"][0]["actions"], json!(["pull", "push"]));
    let data = b"pushed with a token";
    let r = c.post(format!("{}/v2/private/app/blobs/uploads/?digest={}", b.url(), common::digest(data))).bearer_auth(&t).body(&data[..]);
    assert_eq!(r.send().unwrap().status(), StatusCode::CREATED);
    // An anonymous token gets only what anonymous callers may do.
    let t = token(&c, &b, None, &["repository:private/app:pull", "repository:public/app:pull,push"]);
    assert_eq!(claims_of(&t)["access"], json!([{"type": "repository", "name": "public/app", "actions": ["pull"]}]));
    assert_eq!(claims_of(&t)["sub"], "");
}

#[test]
fn catalog_needs_credentials_and_lists_what_the_caller_may_pull() {
    let b = start("", "");
    let c = client();
    push_image(&c, &b, "private/app", "v1", "ci");
    push_image(&c, &b, "shared/tools", "v1", "bob");
    let url = format!("{}/v2/_catalog", b.url());
    let r = c.get(&url).send().unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(challenge(&r).contains("scope=\"registry:catalog:*\""), "{}", challenge(&r));
    let list = |r: reqwest::blocking::Response| {
        assert_eq!(r.status(), StatusCode::OK);
        r.json::<serde_json::Value>().unwrap()["repositories"].clone()
    };
    assert_eq!(list(as_user(c.get(&url), Some("alice")).send().unwrap()), json!(["private/app", "shared/tools"]));
    assert_eq!(list(as_user(c.get(&url), Some("bob")).send().unwrap()), json!(["shared/tools"]));
    let t = token(&c, &b, Some("bob"), &["registry:catalog:*"]);
    assert_eq!(list(get_with_bearer(&c, &url, &t)), json!(["shared/tools"]));
    let t = token(&c, &b, Some("bob"), &["repository:shared/tools:pull"]);
    assert_eq!(get_with_bearer(&c, &url, &t).status(), StatusCode::UNAUTHORIZED);
}

/// Signs `claims` with berth's own key, as only berth should be able to.
fn sign(b: &Berth, claims: &serde_json::Value) -> String {
    let pem = std::fs::read(b.data_dir().join("auth/token-key.pem")).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap();
    jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256), claims, &key).unwrap()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn tampered_tokens_are_refused() {
    let b = start("", "");
    let c = client();
    push_image(&c, &b, "private/app", "v1", "ci");
    let url = format!("{}/v2/private/app/manifests/v1", b.url());
    let refused = |t: &str, why: &str| {
        let r = get_with_bearer(&c, &url, t);
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{why}");
        assert!(challenge(&r).starts_with("Bearer realm="), "{why}");
    };

    let real = token(&c, &b, Some("alice"), &["repository:private/app:pull"]);
    assert_eq!(get_with_bearer(&c, &url, &real).status(), StatusCode::OK);
    let parts: Vec<&str> = real.split('.').collect();

    // Payload changed (another user, more rights), signature kept.
    let mut claims = claims_of(&real);
    claims["sub"] = "ci".into();
    claims["access"][0]["actions"] = json!(["pull", "push"]);
    refused(&format!("{}.{}.{}", parts[0], B64.encode(serde_json::to_vec(&claims).unwrap()), parts[2]), "payload changed");
    // alg: none, unsigned.
    refused(&format!("{}.{}.", B64.encode(br#"{"alg":"none","typ":"JWT"}"#), parts[1]), "alg none");
    // Key confusion: HMAC with the public key as the secret.
    let pem = pem::parse(std::fs::read(b.data_dir().join("auth/token-key.pem")).unwrap()).unwrap();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        pem.contents(),
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    let public = ring::signature::KeyPair::public_key(&pair).as_ref().to_vec();
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims_of(&real),
        &jsonwebtoken::EncodingKey::from_secret(&public),
    )
    .unwrap();
    refused(&hs, "HS256 with the public key");

    let t = now();
    let base = json!({"iss": "berth", "sub": "alice", "aud": "berth", "exp": t + 300, "nbf": t - 5, "iat": t - 5, "jti": "test",
        "access": [{"type": "repository", "name": "private/app", "actions": ["pull"]}]});
    // The control: this test's signing is right, so each refusal below is for its one change.
    assert_eq!(get_with_bearer(&c, &url, &sign(&b, &base)).status(), StatusCode::OK);
    let with = |k: &str, v: serde_json::Value| {
        let mut c = base.clone();
        c[k] = v;
        sign(&b, &c)
    };
    refused(&with("exp", json!(t - 60)), "expired");
    refused(&with("aud", json!("other-service")), "wrong audience");
    refused(&with("iss", json!("someone-else")), "wrong issuer");
    refused(&with("nbf", json!(t + 3600)), "not yet valid");
    refused(&with("access", json!([{"type": "repository", "name": "private/other", "actions": ["pull"]}])), "another repository");
    let other_repo = token(&c, &b, Some("alice"), &["repository:private/other:pull"]);
    let r = get_with_bearer(&c, &url, &other_repo);
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(challenge(&r).contains("error=\"insufficient_scope\""), "{}", challenge(&r));
}

#[test]
fn repeated_failures_are_throttled() {
    let b = start("", "");
    let c = client();
    let url = format!("{}/token?service=berth&scope=repository:private/app:pull", b.url());
    // Unknown user and wrong password: the same answer.
    let unknown = c.get(&url).basic_auth("mallory", Some("guess")).send().unwrap();
    let wrong = c.get(&url).basic_auth("alice", Some("guess")).send().unwrap();
    assert_eq!((unknown.status(), challenge(&unknown)), (wrong.status(), challenge(&wrong)));
    assert_eq!(unknown.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(unknown.text().unwrap(), wrong.text().unwrap());

    let mut statuses = vec![401, 401];
    let mut retry_after = None;
    for i in 0..38 {
        let r = c.get(&url).basic_auth("alice", Some(format!("guess-{i}"))).send().unwrap();
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
        }
        statuses.push(r.status().as_u16());
    }
    assert!(statuses[..10].iter().all(|s| *s == 401), "{statuses:?}");
    assert!(statuses[10..].iter().all(|s| *s == 429), "{statuses:?}");
    assert!(retry_after.is_some_and(|s| (1..=60).contains(&s)), "{retry_after:?}");
    // The right password does not get through a throttled address, on either endpoint.
    assert_eq!(c.get(&url).basic_auth("alice", Some(pw("alice"))).send().unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    let r = as_user(c.get(format!("{}/v2/", b.url())), Some("alice")).send().unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("retry-after"));
    // Anonymous access and tokens do not involve passwords and still work.
    assert_eq!(c.get(format!("{}/token?service=berth", b.url())).send().unwrap().status(), StatusCode::OK);
    let metrics = c.get(format!("{}/metrics", b.admin_url())).send().unwrap().text().unwrap();
    let value = |reason: &str| -> u64 {
        let prefix = format!("berth_auth_rejected_total{{reason=\"{reason}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("{prefix}missing:\n{metrics}")).parse().unwrap()
    };
    assert_eq!(value("bad_credentials"), 10);
    assert_eq!(value("throttled"), 32);
}

#[test]
fn htpasswd_changes_apply_without_restart() {
    // Polling with a not-yet-valid password counts as failures: allow plenty.
    let b = start("max_failures = 1000", "");
    let c = client();
    let ht = b.dir.path().join("htpasswd");
    let base = format!("{}/v2/", b.url());
    let erin = || c.get(&base).basic_auth("erin", Some("erin-secret")).send().unwrap().status();
    assert_eq!(erin(), StatusCode::UNAUTHORIZED);
    let mut text = std::fs::read_to_string(&ht).unwrap();
    text.push_str(&format!("erin:{}\n", bcrypt::hash("erin-secret", 4).unwrap()));
    std::fs::write(&ht, &text).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while erin() != StatusCode::OK && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(erin(), StatusCode::OK, "a user added to the file can log in");

    // A broken edit is reported and changes nothing.
    text.push_str("frank:plaintext\n");
    std::fs::write(&ht, &text).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !b.log().contains("does not load") && std::time::Instant::now() < deadline {
        let _ = erin();
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(strip_ansi(&b.log()).contains("line 6 (user \"frank\")"), "{}", b.log());
    assert_eq!(erin(), StatusCode::OK);
    assert_eq!(as_user(c.get(&base), Some("alice")).send().unwrap().status(), StatusCode::OK);
}

#[test]
fn token_endpoint_speaks_the_oauth2_password_grant() {
    let b = start("", "");
    let c = client();
    let post = |form: &[(&str, &str)]| c.post(format!("{}/token", b.url())).form(form).send().unwrap();
    let r = post(&[
        ("grant_type", "password"),
        ("username", "alice"),
        ("password", pw("alice")),
        ("service", "berth"),
        ("scope", "repository:private/app:pull,push repository:public/x:pull"),
        ("client_id", "containerd"),
    ]);
    assert_eq!(r.status(), StatusCode::OK);
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["scope"], "repository:private/app:pull repository:public/x:pull");
    let claims = claims_of(v["access_token"].as_str().unwrap());
    assert_eq!(claims["sub"], "alice");
    assert!(v.get("refresh_token").is_none(), "no refresh tokens: clients keep using the password grant");
    let r = post(&[("grant_type", "password"), ("username", "alice"), ("password", "nope"), ("service", "berth")]);
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = post(&[("grant_type", "refresh_token"), ("refresh_token", "x"), ("service", "berth")]);
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<serde_json::Value>().unwrap()["error"], "unsupported_grant_type");
    let r = c.get(format!("{}/token?service=elsewhere", b.url())).send().unwrap();
    assert!(r.status().is_client_error() && r.status() != StatusCode::OK);
}

#[test]
fn cross_repository_mount_needs_pull_on_the_source() {
    let b = start("", "");
    let c = client();
    let secret = b"private layer";
    let d = common::digest(secret);
    assert_eq!(push_blob(&c, &b, "private/app", secret, Some("ci")), StatusCode::CREATED);
    let mount = |repo: &str, user: &str| {
        as_user(c.post(format!("{}/v2/{repo}/blobs/uploads/?mount={d}&from=private/app", b.url())), Some(user)).send().unwrap()
    };
    // bob may push to shared/ but not pull private/app: no mount, an ordinary upload session.
    let r = mount("shared/bob", "bob");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(r.headers()["location"].to_str().unwrap().starts_with("/v2/shared/bob/blobs/uploads/"));
    let head = as_user(c.head(format!("{}/v2/shared/bob/blobs/{d}", b.url())), Some("bob")).send().unwrap();
    assert_eq!(head.status(), StatusCode::NOT_FOUND);
    // The same with a token that asked for the source but was not granted it.
    let t = token(&c, &b, Some("bob"), &["repository:shared/bob:pull,push", "repository:private/app:pull"]);
    let r = c.post(format!("{}/v2/shared/bob/blobs/uploads/?mount={d}&from=private/app", b.url())).bearer_auth(&t).send().unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // alice may pull the source, so her mount is granted.
    assert_eq!(mount("shared/alice", "alice").status(), StatusCode::CREATED);
    let head = as_user(c.head(format!("{}/v2/shared/alice/blobs/{d}", b.url())), Some("alice")).send().unwrap();
    assert_eq!(head.status(), StatusCode::OK);
}

/// A mount without `from` finds the blob only in repositories the caller may pull from.
#[test]
fn mount_without_from_discovers_only_what_the_caller_may_pull() {
    let b = start("", "");
    let c = client();
    let secret = b"private layer, discovered";
    let d = common::digest(secret);
    assert_eq!(push_blob(&c, &b, "private/app", secret, Some("ci")), StatusCode::CREATED);
    let mount =
        |repo: &str, user: &str| as_user(c.post(format!("{}/v2/{repo}/blobs/uploads/?mount={d}", b.url())), Some(user)).send().unwrap();
    let r = mount("shared/bob", "bob");
    assert_eq!(r.status(), StatusCode::ACCEPTED, "bob may not pull private/app");
    let head = as_user(c.head(format!("{}/v2/shared/bob/blobs/{d}", b.url())), Some("bob")).send().unwrap();
    assert_eq!(head.status(), StatusCode::NOT_FOUND);
    // A token for the target alone: discovery goes by the user's rights.
    let t = token(&c, &b, Some("bob"), &["repository:shared/bob:pull,push"]);
    let r = c.post(format!("{}/v2/shared/bob/blobs/uploads/?mount={d}", b.url())).bearer_auth(&t).send().unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let t = token(&c, &b, Some("alice"), &["repository:shared/alice:pull,push"]);
    let r = c.post(format!("{}/v2/shared/alice/blobs/uploads/?mount={d}", b.url())).bearer_auth(&t).send().unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let head = as_user(c.head(format!("{}/v2/shared/alice/blobs/{d}", b.url())), Some("alice")).send().unwrap();
    assert_eq!(head.status(), StatusCode::OK);
}

#[test]
fn mirrors_pull_anonymously_unless_restricted() {
    // Nothing listens on port 1: upstream fetches fail fast, which is a 5xx, never a 401.
    let b = start(
        "",
        r#"
[[upstream]]
name = "open.test"
url = "http://127.0.0.1:1"
default = true
connect_timeout = "1s"
timeout = "2s"

[[upstream]]
name = "closed.test"
url = "http://127.0.0.1:1"
pull = ["authenticated"]
connect_timeout = "1s"
timeout = "2s"
"#,
    );
    let c = client();
    let get = |path: &str, user: Option<&str>| as_user(c.get(format!("{}{path}", b.url())), user).send().unwrap();
    for path in ["/v2/open.test/x/y/manifests/latest", "/v2/x/y/manifests/latest", "/v2/x/y/manifests/latest?ns=open.test"] {
        let r = get(path, None);
        assert!(r.status().is_server_error(), "{path}: {}", r.status());
    }
    for (path, scope) in [
        ("/v2/closed.test/x/y/manifests/latest", "repository:closed.test/x/y:pull"),
        ("/v2/x/y/manifests/latest?ns=closed.test", "repository:closed.test/x/y:pull"),
    ] {
        let r = get(path, None);
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
        assert!(challenge(&r).contains(&format!("scope=\"{scope}\"")), "{path}: {}", challenge(&r));
        assert!(get(path, Some("bob")).status().is_server_error(), "{path}");
    }
    // A token granted for x/y (the default upstream) is not one for x/y?ns=closed.test.
    let t = token(&c, &b, None, &["repository:x/y:pull"]);
    assert_eq!(claims_of(&t)["access"][0]["name"], "x/y");
    let r = get_with_bearer(&c, &format!("{}/v2/x/y/manifests/latest?ns=closed.test", b.url()), &t);
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let t = token(&c, &b, Some("bob"), &["repository:closed.test/x/y:pull,push"]);
    assert_eq!(claims_of(&t)["access"][0]["actions"], json!(["pull"]), "mirrors never grant push");
    // Writes to a mirror stay a plain 403, whoever asks.
    let r = as_user(c.post(format!("{}/v2/open.test/x/y/blobs/uploads/", b.url())), Some("ci")).send().unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}

fn berth_check(config: &Path) -> Output {
    cmd::run(Command::new(env!("CARGO_BIN_EXE_berth")).arg("check").arg("--config").arg(config), Duration::from_secs(30))
}

#[test]
fn check_names_bad_htpasswd_lines_and_unknown_users() {
    let dir = tempfile::tempdir().unwrap();
    let ht = write_htpasswd(dir.path());
    let mut text = std::fs::read_to_string(&ht).unwrap();
    let config = dir.path().join("berth.toml");
    let write_config = |rules: &str| {
        let root = dir.path().join("data");
        std::fs::write(&config, format!("[storage]\nroot = \"{}\"\n[auth]\nhtpasswd = \"{}\"\n{rules}", root.display(), ht.display()))
            .unwrap();
    };
    write_config(RULES);
    berth_check(&config).expect_ok();

    text.push_str("eve:$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/\n");
    std::fs::write(&ht, &text).unwrap();
    let out = berth_check(&config);
    assert!(!out.ok);
    assert!(out.stderr.contains("auth.htpasswd") && out.stderr.contains("line 5 (user \"eve\")"), "{}", out.stderr);
    assert!(out.stderr.contains("bcrypt") && !out.stderr.contains("HqJZ"), "{}", out.stderr);

    write_htpasswd(dir.path());
    write_config("[[namespace]]\nprefix = \"team\"\npush = [\"carol\"]\n");
    let out = berth_check(&config);
    assert!(!out.ok && out.stderr.contains("namespace[0].push") && out.stderr.contains("carol"), "{}", out.stderr);

    // Rules without [auth] would protect nothing.
    std::fs::write(&config, "[[namespace]]\nprefix = \"team\"\npull = [\"alice\"]\n").unwrap();
    let out = berth_check(&config);
    assert!(!out.ok && out.stderr.contains("namespace[0].pull") && out.stderr.contains("[auth]"), "{}", out.stderr);
}

#[test]
fn without_auth_there_is_no_token_service() {
    let b = Berth::start("[[namespace]]\nprefix = \"team\"\n");
    let c = client();
    assert_eq!(c.get(format!("{}/token?service=berth", b.url())).send().unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(c.get(format!("{}/v2/", b.url())).send().unwrap().status(), StatusCode::OK);
}

fn skopeo(args: &[&str]) -> Output {
    let mut c = Command::new("skopeo");
    c.args(args);
    dockerd::no_internet(&mut c);
    cmd::run(&mut c, Duration::from_secs(120))
}

/// A one-image OCI layout at `dir` tagged `v1`, its layer a gzipped tar of one file.
fn oci_layout(dir: &Path, text: &str) {
    let sha = |d: &[u8]| common::sha256_hex(d);
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |d: &[u8]| {
        std::fs::write(blobs.join(sha(d)), d).unwrap();
        (common::digest(d), d.len())
    };
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("hello.txt"), text).unwrap();
    let tar_path = src.path().join("layer.tar");
    let mut tar = Command::new("tar");
    tar.args(["--mtime=@0", "--owner=0", "--group=0", "-C"]).arg(src.path()).arg("-cf").arg(&tar_path).arg("hello.txt");
    cmd::run(&mut tar, Duration::from_secs(30)).expect_ok();
    let tar_bytes = std::fs::read(&tar_path).unwrap();
    let gz = cmd::run(Command::new("gzip").args(["-n", "-k", "-f"]).arg(&tar_path), Duration::from_secs(30));
    assert!(gz.ok, "{}", gz.stderr);
    let (layer, layer_len) = put(&std::fs::read(src.path().join("layer.tar.gz")).unwrap());
    let config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [common::digest(&tar_bytes)]}}))
    .unwrap();
    let (config, config_len) = put(&config);
    let manifest = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_len},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": layer_len}]}))
    .unwrap();
    let (manifest, manifest_len) = put(&manifest);
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest, "size": manifest_len, "annotations": {"org.opencontainers.image.ref.name": "v1"}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// The text log colours its fields when stderr is a file too.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn creds(user: &str) -> String {
    format!("{user}:{}", pw(user))
}

#[test]
fn skopeo_with_credentials_on_a_private_namespace() {
    if !common::require("skopeo") {
        return;
    }
    let b = start("", "");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    oci_layout(&src, "private content\n");
    let src_ref = format!("oci:{}:v1", src.display());
    let dest = format!("docker://{}/private/app:v1", b.host());
    let tls = ["--src-tls-verify=false", "--dest-tls-verify=false"];

    let push = |user: &str| {
        let c = creds(user);
        let mut args = vec!["copy"];
        args.extend(tls);
        args.extend(["--dest-creds", &c, &src_ref, &dest]);
        skopeo(&args)
    };
    push("ci").expect_ok();
    let out = push("alice");
    assert!(!out.ok, "alice may only pull:\n{}", out.stdout);

    let pull = |who: Option<&str>, to: &str| {
        let out_ref = format!("oci:{}:v1", work.path().join(to).display());
        let c = who.map(creds);
        let mut args = vec!["copy"];
        args.extend(tls);
        match &c {
            Some(c) => args.extend(["--src-creds", c.as_str()]),
            None => args.push("--src-no-creds"),
        }
        args.extend([dest.as_str(), out_ref.as_str()]);
        skopeo(&args)
    };
    let out = pull(None, "anon");
    assert!(!out.ok && out.stderr.to_lowercase().contains("unauthorized"), "anonymous pull must be refused:\n{}", out.stderr);
    let out = pull(Some("bob"), "bob");
    assert!(!out.ok, "bob has no pull on private/:\n{}", out.stdout);
    pull(Some("alice"), "alice").expect_ok();
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(work.path().join("alice/index.json")).unwrap()).unwrap();
    let src_index: serde_json::Value = serde_json::from_slice(&std::fs::read(src.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], src_index["manifests"][0]["digest"], "alice got the image ci pushed");
}

#[test]
fn docker_login_push_and_anonymous_pull() {
    if !common::require("dockerd") || !common::require("docker") {
        return;
    }
    let b = start("", "");
    let d = Dockerd::start(None);
    let host = b.host();
    let image = format!("{host}/public/hello:v1");

    let out = d.docker(&["login", "-u", "ci", "-p", "wrong-password", &host]);
    assert!(!out.ok, "a wrong password must not log in:\n{}", out.stdout);
    d.docker(&["login", "-u", "ci", "-p", pw("ci"), &host]).expect_ok();

    // The smallest image there is: one file, imported from a tar.
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("hello.txt"), "hello from berth\n").unwrap();
    let tar = work.path().join("rootfs.tar");
    cmd::run(Command::new("tar").arg("-C").arg(work.path()).arg("-cf").arg(&tar).arg("hello.txt"), Duration::from_secs(30)).expect_ok();
    d.docker(&["import", tar.to_str().unwrap(), &image]).expect_ok();
    d.docker(&["push", &image]).expect_ok();
    let private = format!("{host}/private/hello:v1");
    d.docker(&["tag", &image, &private]).expect_ok();
    d.docker(&["push", &private]).expect_ok();
    let log = strip_ansi(&b.log());
    assert!(
        log.lines().any(|l| l.contains("method=PUT route=\"manifest\"") && l.contains("user=\"ci\"") && l.contains("status=201")),
        "pushes are logged with their user:\n{log}"
    );

    d.docker(&["logout", &host]).expect_ok();
    d.docker(&["rmi", &image]).expect_ok();
    d.docker(&["pull", &image]).expect_ok();
    let id = d.docker(&["image", "inspect", "--format", "{{.Id}}", &image]).expect_ok();
    assert!(id.stdout.trim().starts_with("sha256:"), "{}", id.stdout);

    // Logged out, pushing is refused; so is pulling a private namespace.
    d.docker(&["tag", &image, &format!("{host}/public/hello:v2")]).expect_ok();
    let out = d.docker(&["push", &format!("{host}/public/hello:v2")]);
    assert!(!out.ok, "anonymous push must fail:\n{}", out.stdout);
    d.docker(&["rmi", &private]).expect_ok();
    let out = d.docker(&["pull", &private]);
    assert!(!out.ok, "anonymous pull of a private repository must fail:\n{}", out.stdout);

    // containerd asks for its token with the OAuth2 password grant (POST /token).
    let pull = |user: Option<&str>| {
        let mut args = vec!["images", "pull", "--plain-http", "--snapshotter", "native"];
        let c = user.map(creds);
        if let Some(c) = &c {
            args.extend(["--user", c.as_str()]);
        }
        args.push(&private);
        d.ctr("berth-auth", &args)
    };
    assert!(!pull(None).ok, "containerd without credentials must be refused");
    assert!(!pull(Some("bob")).ok, "bob has no pull on private/");
    pull(Some("alice")).expect_ok();
    let log = strip_ansi(&b.log());
    assert!(
        log.lines().any(|l| l.contains("method=POST route=\"token\"") && l.contains("user=\"alice\"") && l.contains("status=200")),
        "containerd used the password grant:\n{log}"
    );
}

#[test]
fn docker_daemon_pulls_through_the_mirror_anonymously_with_auth_on() {
    use common::distribution::{Options, Registry};
    use common::oci_layout;
    if !["docker-registry", "skopeo", "dockerd", "docker"].iter().all(|c| common::require(c)) {
        return;
    }
    if !oci_layout::have_static_busybox() {
        assert!(std::env::var("BERTH_REQUIRE_CLIENTS").as_deref() != Ok("1"), "busybox-static is required");
        eprintln!("skipping: busybox-static not installed");
        return;
    }
    // A fake Docker Hub with token auth of its own, as the real one has.
    let hub = Registry::start(Options { token: true, ..Default::default() });
    let layouts = tempfile::tempdir().unwrap();
    let img = oci_layout::multi_arch(&layouts.path().join("layout"), "latest", "through-auth");
    hub.push(&img.skopeo_ref(), "library/busybox:latest");
    let b = start("", &format!("[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n", hub.url()));
    let d = Dockerd::start(Some(&b.url()));

    // The daemon meets berth's challenge on /v2/, fetches an anonymous token and pulls.
    d.docker(&["pull", "busybox"]).expect_ok();
    let run = d.docker(&["run", "--rm", "--network", "none", "busybox"]).expect_ok();
    assert_eq!(run.stdout.trim(), "linux/amd64 through-auth");
    assert!(!d.log_text().contains("Attempting next endpoint"), "the daemon gave up on the mirror:\n{}", d.log_text());
    let log = strip_ansi(&b.log());
    assert!(log.lines().any(|l| l.contains("route=\"token\"") && l.contains("status=200")), "{log}");
    assert!(log.lines().any(|l| l.contains("route=\"manifest\"") && l.contains("status=200") && l.contains("user=\"-\"")), "{log}");
}
