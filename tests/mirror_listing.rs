//! tags/list of a mirrored repository pages through the upstream's own paging. CNCF
//! distribution 2.8 does not page tags, Docker Hub and GHCR do: a scripted upstream stands in.

mod common;

use common::distribution::{HttpReq, HttpResp, HttpServer};
use common::Berth;
use std::sync::{Arc, Mutex};

const TAGS: [&str; 3] = ["a", "b", "c"];

/// Answers tags/list for `acme/tool` in pages of `n` after `last`, with a next link the way
/// registries write it (their own path, parameters in their own order).
fn paging_upstream(seen: Arc<Mutex<Vec<String>>>) -> HttpServer {
    HttpServer::start(Arc::new(move |req: &HttpReq| {
        if req.path() != "/v2/acme/tool/tags/list" {
            return HttpResp::json(200, serde_json::json!({}));
        }
        seen.lock().unwrap().push(req.target.clone());
        let n: usize = req.query_all("n").pop().and_then(|v| v.parse().ok()).unwrap_or(TAGS.len());
        let last = req.query_all("last").pop();
        let rest: Vec<&str> = TAGS.iter().copied().filter(|t| last.as_deref().is_none_or(|l| *t > l)).collect();
        let page = &rest[..n.min(rest.len())];
        let r = HttpResp::json(200, serde_json::json!({"name": "acme/tool", "tags": page}));
        match (rest.len() > page.len(), page.last()) {
            (true, Some(l)) => r.header("Link", format!("</v2/acme/tool/tags/list?last={l}&n={n}>; rel=\"next\"")),
            _ => r,
        }
    }))
}

fn get(url: &str) -> (Option<String>, serde_json::Value) {
    let r = reqwest::blocking::get(url).unwrap();
    assert_eq!(r.status(), 200, "{url}");
    let link = r.headers().get("link").map(|v| v.to_str().unwrap().to_string());
    (link, r.json().unwrap())
}

fn link_target(link: &str) -> &str {
    link.trim_start_matches('<').split_once('>').unwrap().0
}

#[test]
fn tags_list_pages_follow_the_upstream_with_links_back_to_berth() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let upstream = paging_upstream(seen.clone());
    let b = Berth::start(&format!("[[upstream]]\nname = \"ghcr.io\"\nurl = \"http://127.0.0.1:{}\"\n", upstream.port));

    // Path-prefix form: the link names the same path on berth, so it routes back to ghcr.io.
    let (link, body) = get(&format!("{}/v2/ghcr.io/acme/tool/tags/list?n=2", b.url()));
    assert_eq!(body["tags"], serde_json::json!(["a", "b"]));
    let link = link.expect("a next link while the upstream has more");
    assert_eq!(link, "</v2/ghcr.io/acme/tool/tags/list?last=b&n=2>; rel=\"next\"");
    let (link, body) = get(&format!("{}{}", b.url(), link_target(&link)));
    assert_eq!(body["tags"], serde_json::json!(["c"]));
    assert_eq!(link, None);

    // containerd's form: `ns` stays on berth's link and never goes upstream.
    let (link, body) = get(&format!("{}/v2/acme/tool/tags/list?ns=ghcr.io&n=1", b.url()));
    assert_eq!(body["tags"], serde_json::json!(["a"]));
    let link = link.unwrap();
    assert_eq!(link, "</v2/acme/tool/tags/list?last=a&n=1&ns=ghcr.io>; rel=\"next\"");
    let (_, body) = get(&format!("{}{}", b.url(), link_target(&link)));
    assert_eq!(body["tags"], serde_json::json!(["b"]));

    assert_eq!(
        *seen.lock().unwrap(),
        [
            "/v2/acme/tool/tags/list?n=2",
            "/v2/acme/tool/tags/list?last=b&n=2",
            "/v2/acme/tool/tags/list?n=1",
            "/v2/acme/tool/tags/list?last=a&n=1"
        ]
    );
}

#[test]
fn next_links_are_found_however_the_upstream_writes_them() {
    // Each way a registry may announce the next page of `acme/tool` after tag `a`: unquoted
    // `rel`, beside other links in one header, or in a second `Link` header.
    let next = "</v2/acme/tool/tags/list?n=1&last=a>";
    let variants: Vec<Vec<String>> = vec![
        vec![format!("{next}; rel=next")],
        vec![format!("</v2/acme/tool/tags/list?n=1>; rel=\"first\", {next}; rel=\"next\"")],
        vec!["</v2/acme/tool/tags/list?n=1>; rel=\"first\"".into(), format!("{next};rel=\"next\"")],
    ];
    for links in variants {
        let sent = links.clone();
        let upstream = HttpServer::start(Arc::new(move |req: &HttpReq| {
            let r = HttpResp::json(200, serde_json::json!({"name": "acme/tool", "tags": ["a"]}));
            if req.path() != "/v2/acme/tool/tags/list" {
                return HttpResp::json(200, serde_json::json!({}));
            }
            sent.iter().fold(r, |r, l| r.header("Link", l.clone()))
        }));
        let b = Berth::start(&format!("[[upstream]]\nname = \"ghcr.io\"\nurl = \"http://127.0.0.1:{}\"\n", upstream.port));
        let (link, body) = get(&format!("{}/v2/ghcr.io/acme/tool/tags/list?n=1", b.url()));
        assert_eq!(body["tags"], serde_json::json!(["a"]));
        assert_eq!(link.as_deref(), Some("</v2/ghcr.io/acme/tool/tags/list?n=1&last=a>; rel=\"next\""), "{links:?}");
    }
}
