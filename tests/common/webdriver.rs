//! A small W3C WebDriver client over reqwest, driving Debian's headless Chromium through
//! `chromedriver` (both installed by `scripts/stack.sh install`): a session, navigation,
//! elements found by CSS, clicks, keys, scripts and screenshots. A missing browser or
//! driver fails the test that asked for it, saying how to install them.

use super::{free_port, Proc};
use base64::Engine;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The W3C name of an element reference in answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A browser session, with its driver; both end when it is dropped.
pub struct Browser {
    http: reqwest::Client,
    base: String,
    _driver: Proc,
}

impl Browser {
    /// Start `chromedriver` on a free port (its log in `dir`) and a headless Chromium
    /// session of 1280×900.
    pub async fn start(dir: &Path) -> Browser {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: run `make test` or scripts/stack.sh install (Debian chromium, chromium-driver)"
            );
        }
        let port = free_port();
        let mut cmd = Command::new(CHROMEDRIVER);
        cmd.arg(format!("--port={port}"));
        let mut driver = Proc::spawn(&format!("chromedriver-{port}"), dir, &mut cmd);
        driver.wait_port(port, Duration::from_secs(20));
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--window-size=1280,900", "--disable-dev-shm-usage"],
            },
        }}});
        let res: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = res["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {res}\n{}", driver.log_tail()))
            .to_string();
        Browser {
            http,
            base: format!("{base}/session/{id}"),
            _driver: driver,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut rb = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let v: Value = rb.send().await.unwrap().json().await.unwrap();
        v["value"].clone()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn goto(&self, url: &str) {
        let v = self.post("/url", json!({"url": url})).await;
        assert!(v.is_null(), "navigate to {url}: {v}");
    }

    /// Run `script` (a function body; `arguments` are `args`) in the page; its answer.
    pub async fn script(&self, script: &str, args: Value) -> Value {
        self.post("/execute/sync", json!({"script": script, "args": args}))
            .await
    }

    /// The first element matching `css`, if any.
    pub async fn find(&self, css: &str) -> Option<Element<'_>> {
        let v = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await;
        v[ELEMENT].as_str().map(|id| Element {
            browser: self,
            id: id.to_string(),
        })
    }

    /// Every element matching `css`.
    pub async fn find_all(&self, css: &str) -> Vec<Element<'_>> {
        let v = self
            .post("/elements", json!({"using": "css selector", "value": css}))
            .await;
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e[ELEMENT].as_str())
            .map(|id| Element {
                browser: self,
                id: id.to_string(),
            })
            .collect()
    }

    /// Poll until an element matches `css`, or fail after `within` naming `what`.
    pub async fn wait_for(&self, css: &str, within: Duration, what: &str) -> Element<'_> {
        let start = Instant::now();
        loop {
            if let Some(e) = self.find(css).await {
                return e;
            }
            if start.elapsed() > within {
                let page = self
                    .script("return document.body.innerText", json!([]))
                    .await;
                let last = self
                    .post("/element", json!({"using": "css selector", "value": css}))
                    .await;
                panic!("timed out after {within:?} waiting for {what} ({css}): {last}; the page:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A PNG of the window, written to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("a screenshot"))
            .unwrap();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }

    pub async fn quit(&self) {
        let _ = self.call(reqwest::Method::DELETE, "", None).await;
    }
}

/// An element of the page.
pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

impl Element<'_> {
    pub async fn click(&self) {
        let v = self
            .browser
            .post(&format!("/element/{}/click", self.id), json!({}))
            .await;
        assert!(v.is_null(), "click: {v}");
    }

    pub async fn send_keys(&self, text: &str) {
        let v = self
            .browser
            .post(
                &format!("/element/{}/value", self.id),
                json!({"text": text}),
            )
            .await;
        assert!(v.is_null(), "send keys: {v}");
    }

    pub async fn text(&self) -> String {
        let v = self
            .browser
            .call(
                reqwest::Method::GET,
                &format!("/element/{}/text", self.id),
                None,
            )
            .await;
        v.as_str().unwrap_or_default().to_string()
    }
}
