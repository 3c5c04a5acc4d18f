//! A real headless Chromium driven through chromedriver's W3C WebDriver HTTP API (a handful of
//! JSON commands over the blocking reqwest client the suite already uses; the WebDriver crates
//! would bring a second TLS stack).

use super::{eventually, free_port, require};
use reqwest::blocking::Client;
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How an element reference is keyed in W3C WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// How long a page gets to show what a test waits for.
const WAIT: Duration = Duration::from_secs(15);

pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium session; None (skipped, with
    /// a message) when either is missing, unless BERTH_REQUIRE_CLIENTS=1.
    pub fn start() -> Option<Browser> {
        if !require("chromedriver") || !(require_any(&["chromium", "chromium-browser", "google-chrome"])) {
            return None;
        }
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let http = Client::builder().no_proxy().timeout(Duration::from_secs(60)).build().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let ready = eventually(Duration::from_secs(20), || {
            http.get(format!("{base}/status"))
                .send()
                .ok()
                .and_then(|r| r.json::<Value>().ok())
                .is_some_and(|v| v["value"]["ready"].as_bool() == Some(true))
        });
        let profile = tempfile::tempdir().unwrap();
        let mut b = Browser { driver, base, session: String::new(), http, _profile: profile };
        assert!(ready, "chromedriver did not become ready");
        let mut args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-gpu".into(),
            "--no-proxy-server".into(),
            "--window-size=1280,1024".into(),
            format!("--user-data-dir={}", b._profile.path().display()),
        ];
        args.push("--no-first-run".into());
        let mut options = json!({"args": args});
        if let Some(bin) = chromium_binary() {
            options["binary"] = bin.into();
        }
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}});
        let v = b.raw("POST", "/session", Some(caps));
        b.session = v["sessionId"].as_str().expect("a WebDriver session").to_string();
        Some(b)
    }

    fn raw(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let r = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body.unwrap_or(json!({}))),
        };
        let r = r.send().unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let status = r.status();
        let v: Value = r.json().unwrap_or_default();
        assert!(status.is_success(), "WebDriver {method} {path}: {status} {v}");
        v["value"].clone()
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.raw(method, &format!("/session/{}{path}", self.session), body)
    }

    /// Like `cmd`, but an error answer (no such element) is None.
    fn try_cmd(&self, path: &str, body: Value) -> Option<Value> {
        let r = self.http.post(format!("{}/session/{}{path}", self.base, self.session)).json(&body).send().ok()?;
        r.status().is_success().then(|| r.json::<Value>().ok()).flatten().map(|v| v["value"].clone())
    }

    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({"url": url})));
    }

    pub fn url(&self) -> String {
        self.cmd("GET", "/url", None).as_str().unwrap_or_default().to_string()
    }

    pub fn source(&self) -> String {
        self.cmd("GET", "/source", None).as_str().unwrap_or_default().to_string()
    }

    /// Elements matching a CSS selector, now.
    pub fn all(&self, css: &str) -> Vec<String> {
        self.try_cmd("/elements", json!({"using": "css selector", "value": css}))
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e[ELEMENT].as_str().map(str::to_string))
            .collect()
    }

    /// An element's text; empty for one the page has since replaced (stale).
    pub fn text_of(&self, element: &str) -> String {
        let url = format!("{}/session/{}/element/{element}/text", self.base, self.session);
        let v = self.http.get(url).send().ok().and_then(|r| r.json::<Value>().ok()).unwrap_or_default();
        v["value"].as_str().unwrap_or_default().to_string()
    }

    /// Texts of every element matching `css`, now.
    pub fn texts(&self, css: &str) -> Vec<String> {
        self.all(css).iter().map(|e| self.text_of(e)).collect()
    }

    /// Waits until `css` matches an element whose text contains `text`; returns that element.
    pub fn wait_for(&self, css: &str, text: &str) -> String {
        let mut found = None;
        let ok = eventually(WAIT, || {
            found = self.all(css).into_iter().find(|e| self.text_of(e).contains(text));
            found.is_some()
        });
        assert!(ok, "no {css} with text {text:?} on {}:\n{}", self.url(), self.source());
        found.unwrap()
    }

    /// Waits until the page's URL satisfies `f`.
    pub fn wait_url(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let mut url = String::new();
        let ok = eventually(WAIT, || {
            url = self.url();
            f(&url)
        });
        assert!(ok, "the page never reached {what}; at {url}:\n{}", self.source());
        url
    }

    pub fn click(&self, element: &str) {
        self.cmd("POST", &format!("/element/{element}/click"), Some(json!({})));
    }

    /// Clicks the element matching `css` whose text contains `text`, once it is there.
    pub fn click_on(&self, css: &str, text: &str) {
        let e = self.wait_for(css, text);
        self.click(&e);
    }

    pub fn type_into(&self, css: &str, value: &str) {
        let e = self.wait_for(css, "");
        self.cmd("POST", &format!("/element/{e}/clear"), Some(json!({})));
        self.cmd("POST", &format!("/element/{e}/value"), Some(json!({"text": value})));
    }

    /// Saves what the window shows as PNG into `$BERTH_UI_SCREENSHOTS/<name>.png`, when that is set
    /// (how the README's pictures are made).
    pub fn screenshot(&self, name: &str) {
        let Ok(dir) = std::env::var("BERTH_UI_SCREENSHOTS") else { return };
        use base64::Engine as _;
        let png = base64::engine::general_purpose::STANDARD.decode(self.cmd("GET", "/screenshot", None).as_str().unwrap()).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(std::path::Path::new(&dir).join(format!("{name}.png")), png).unwrap();
    }

    /// Waits until the page has an `h1` containing `text`: the sign that a navigation landed.
    pub fn wait_heading(&self, text: &str) {
        self.wait_for("h1", text);
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.http.delete(format!("{}/session/{}", self.base, self.session)).send();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn chromium_binary() -> Option<&'static str> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"].into_iter().find(|p| std::path::Path::new(p).exists())
}

fn require_any(cmds: &[&str]) -> bool {
    match cmds.iter().find(|c| super::have(c)) {
        Some(_) => true,
        None => require(cmds[0]),
    }
}
