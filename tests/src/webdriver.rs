//! A small W3C WebDriver client for the browser test: chromedriver started on a port it
//! picks itself (`--port=0`, read back from its banner), one headless Chromium session, and
//! the dozen commands the test needs. Blocking (ureq): the test drives the browser from its
//! own thread while the services run on a runtime.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

/// The key under which WebDriver returns an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A failed command: WebDriver's error name and message, or the transport's.
pub type Error = String;

/// A running chromedriver, killed on drop.
pub struct Driver {
    child: Child,
    base: String,
    agent: ureq::Agent,
}

impl Driver {
    /// Starts `chromedriver` (a path or a name on PATH) on a free loopback port.
    pub fn start(chromedriver: &str) -> Result<Self, Error> {
        let mut child = Command::new(chromedriver)
            .args(["--port=0", "--allowed-ips=127.0.0.1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {chromedriver}: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        // "ChromeDriver was started successfully on port 39785."
        let port = loop {
            let line = lines
                .next()
                .ok_or("chromedriver exited before saying its port")?
                .map_err(|e| e.to_string())?;
            // (The line before it, "Starting ChromeDriver ... on port 0", names the port asked for.)
            if let Some(rest) = line.split("started successfully on port ").nth(1) {
                break rest.trim_end_matches('.').trim().to_string();
            }
        };
        // Keep reading its stdout so that it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .new_agent();
        Ok(Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            agent,
        })
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, Error> {
        let url = format!("{}{path}", self.base);
        let reply = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            (_, body) => self
                .agent
                .post(&url)
                .header("Content-Type", "application/json")
                .send(body.unwrap_or_else(|| json!({})).to_string()),
        };
        let mut reply = reply.map_err(|e| format!("{method} {path}: {e}"))?;
        let text = reply
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{path}: {e}: {text}"))?;
        let value = v.get("value").cloned().unwrap_or(Value::Null);
        if let Some(error) = value.get("error").and_then(Value::as_str) {
            let message = value.get("message").and_then(Value::as_str).unwrap_or("");
            return Err(format!("{method} {path}: {error}: {message}"));
        }
        Ok(value)
    }

    /// A headless Chromium session of `width` x `height` (the binary at `chromium`), with a
    /// fake camera that needs no permission prompt.
    pub fn session(&self, chromium: &str, width: u32, height: u32) -> Result<Session<'_>, Error> {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    format!("--window-size={width},{height}"),
                    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                    "--no-first-run", "--no-default-browser-check",
                ],
            },
        }}});
        let v = self.call("POST", "/session", Some(caps))?;
        let id = v["sessionId"].as_str().ok_or("no sessionId")?.to_string();
        Ok(Session { driver: self, id })
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser session, closed on drop.
pub struct Session<'d> {
    driver: &'d Driver,
    id: String,
}

/// An element of the page.
#[derive(Clone, Debug)]
pub struct Element(String);

impl Session<'_> {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, Error> {
        self.driver
            .call(method, &format!("/session/{}{path}", self.id), body)
    }

    pub fn goto(&self, url: &str) -> Result<(), Error> {
        self.call("POST", "/url", Some(json!({ "url": url })))
            .map(drop)
    }

    pub fn resize(&self, width: u32, height: u32) -> Result<(), Error> {
        let rect = json!({ "width": width, "height": height });
        self.call("POST", "/window/rect", Some(rect)).map(drop)
    }

    pub fn find(&self, css: &str) -> Result<Element, Error> {
        let q = json!({ "using": "css selector", "value": css });
        let v = self.call("POST", "/element", Some(q))?;
        v[ELEMENT]
            .as_str()
            .map(|id| Element(id.to_string()))
            .ok_or_else(|| format!("no element reference for {css}: {v}"))
    }

    pub fn find_all(&self, css: &str) -> Result<Vec<Element>, Error> {
        let q = json!({ "using": "css selector", "value": css });
        let v = self.call("POST", "/elements", Some(q))?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e[ELEMENT].as_str().map(|id| Element(id.to_string())))
            .collect())
    }

    /// Types `text`; into an `<input type=file>`, the paths of the files to choose (one per
    /// line), which is how WebDriver uploads.
    pub fn send_keys(&self, e: &Element, text: &str) -> Result<(), Error> {
        let body = json!({ "text": text });
        self.call("POST", &format!("/element/{}/value", e.0), Some(body))
            .map(drop)
    }

    /// Chooses `files` in an `<input type=file>` (chromedriver wants canonical paths).
    pub fn choose_files(&self, e: &Element, files: &[&Path]) -> Result<(), Error> {
        let paths = files
            .iter()
            .map(|p| {
                std::fs::canonicalize(p)
                    .map(|p| p.display().to_string())
                    .map_err(|e| format!("{}: {e}", p.display()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.send_keys(e, &paths.join("\n"))
    }

    pub fn click(&self, e: &Element) -> Result<(), Error> {
        self.call("POST", &format!("/element/{}/click", e.0), None)
            .map(drop)
    }

    /// The rendered text, as a person reads it.
    pub fn text(&self, e: &Element) -> Result<String, Error> {
        let v = self.call("GET", &format!("/element/{}/text", e.0), None)?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    pub fn attribute(&self, e: &Element, name: &str) -> Result<Option<String>, Error> {
        let v = self.call("GET", &format!("/element/{}/attribute/{name}", e.0), None)?;
        Ok(v.as_str().map(str::to_string))
    }

    /// Runs `script` in the page; its `return` value.
    pub fn execute(&self, script: &str) -> Result<Value, Error> {
        let body = json!({ "script": script, "args": [] });
        self.call("POST", "/execute/sync", Some(body))
    }

    /// Accepts the open `confirm()` or `alert()`.
    pub fn accept_alert(&self) -> Result<(), Error> {
        self.call("POST", "/alert/accept", None).map(drop)
    }

    /// The page as a PNG file at `path`.
    pub fn screenshot(&self, path: &Path) -> Result<(), Error> {
        let v = self.call("GET", "/screenshot", None)?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .map_err(|e| e.to_string())?;
        std::fs::write(path, png).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Asks `check` until it returns `Some`, up to `within`. The page answers asynchronously
    /// (a fetch, then a repaint) and WebDriver has no event to wait on, so this is how
    /// WebDriver waits everywhere; a bug fails after the bound instead of hanging.
    pub fn wait_for<T>(
        &self,
        what: &str,
        within: Duration,
        mut check: impl FnMut(&Self) -> Result<Option<T>, Error>,
    ) -> Result<T, Error> {
        let end = Instant::now() + within;
        loop {
            if let Some(v) = check(self)? {
                return Ok(v);
            }
            if Instant::now() > end {
                return Err(format!("timed out after {within:?} waiting for {what}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let _ = self
            .driver
            .call("DELETE", &format!("/session/{}", self.id), None);
    }
}
