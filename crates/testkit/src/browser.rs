//! A real headless Chromium driven through ChromeDriver (Debian's `chromium` and
//! `chromium-driver`), with a small W3C WebDriver client over HTTP/JSON (ureq, already in
//! the workspace; fantoccini would bring hyper and a second TLS stack for a loopback
//! protocol of a dozen calls).
//!
//! The browser gets a fresh HOME whose NSS database (`certutil`, Debian's `libnss3-tools`)
//! trusts the CA the test names: certificate checking stays on (no
//! `--ignore-certificate-errors`). Its profile, HOME and TMPDIR are in a temp dir removed on
//! drop, with the ChromeDriver process (which ends its Chromium).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{free_port, require_program, wait_for_port};

/// The W3C element reference key.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One Chromium session.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    /// HOME, profile, TMPDIR.
    pub dir: tempfile::TempDir,
    agent: ureq::Agent,
}

/// A WebDriver error answer.
#[derive(Debug)]
pub struct WdError {
    /// The W3C error code (`no such element`, `no such alert`, ...).
    pub error: String,
    /// Its message.
    pub message: String,
}

impl Browser {
    /// Start ChromeDriver and a headless Chromium trusting `ca_pem` (a file) for TLS, with a
    /// viewport of exactly `width` x `height`.
    pub fn start(ca_pem: &Path, width: u32, height: u32) -> Browser {
        require_program("chromedriver", "chromium-driver");
        require_program("chromium", "chromium");
        require_program("certutil", "libnss3-tools");
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let nss = home.join(".pki/nssdb");
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&nss).unwrap();
        std::fs::create_dir_all(&tmp).unwrap();
        let db = format!("sql:{}", nss.display());
        let run = |args: &[&str]| {
            let out = Command::new("certutil").args(args).output().unwrap();
            assert!(
                out.status.success(),
                "certutil {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&["-N", "-d", &db, "--empty-password"]);
        run(&[
            "-A",
            "-d",
            &db,
            "-n",
            "devid-test-ca",
            "-t",
            "C,,",
            "-i",
            ca_pem.to_str().unwrap(),
        ]);
        let port = free_port();
        let log = dir.path().join("chromedriver.log");
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .env("HOME", &home)
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(
            wait_for_port(port, Duration::from_secs(20)),
            "chromedriver did not listen"
        );
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(60))
            .build();
        let base = format!("http://127.0.0.1:{port}");
        let profile = dir.path().join("profile");
        let mut args = vec![
            "--headless=new".to_owned(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            format!("--user-data-dir={}", profile.display()),
            format!("--window-size={width},{height}"),
        ];
        // As root Chromium refuses to start with its sandbox (crbug.com/638180).
        if is_root() {
            args.push("--no-sandbox".into());
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": false,
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}
        }}});
        let resp = agent
            .post(&format!("{base}/session"))
            .send_json(caps)
            .map_err(describe)
            .unwrap_or_else(|e| {
                panic!(
                    "WebDriver session not created: {e}; chromedriver log: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        let v: Value = resp.into_json().unwrap();
        let session = v["value"]["sessionId"].as_str().unwrap().to_owned();
        let b = Browser {
            driver,
            base,
            session,
            dir,
            agent,
        };
        // an exact viewport (the window size counts the window's chrome)
        b.cmd(
            "POST",
            "goog/cdp/execute",
            json!({"cmd": "Emulation.setDeviceMetricsOverride", "params": {
                "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}}),
        )
        .unwrap();
        b
    }

    fn cmd(&self, method: &str, path: &str, body: Value) -> Result<Value, WdError> {
        let url = format!("{}/session/{}/{path}", self.base, self.session);
        let req = self.agent.request(method, &url);
        let resp = if method == "GET" {
            req.call()
        } else {
            req.send_json(body)
        };
        match resp {
            Ok(r) => Ok(r.into_json::<Value>().map(|v| v["value"].clone()).unwrap()),
            Err(ureq::Error::Status(_, r)) => {
                let v: Value = r.into_json().unwrap_or(Value::Null);
                Err(WdError {
                    error: v["value"]["error"].as_str().unwrap_or("?").to_owned(),
                    message: v["value"]["message"].as_str().unwrap_or("").to_owned(),
                })
            }
            Err(e) => Err(WdError {
                error: "transport".into(),
                message: e.to_string(),
            }),
        }
    }

    /// Navigate and wait for the page to load.
    pub fn goto(&self, url: &str) {
        self.cmd("POST", "url", json!({"url": url}))
            .unwrap_or_else(|e| panic!("navigate to {url}: {e:?}"));
    }

    /// The current URL.
    pub fn url(&self) -> String {
        self.cmd("GET", "url", Value::Null)
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The element matching `css`, if any.
    pub fn find(&self, css: &str) -> Option<String> {
        match self.cmd(
            "POST",
            "element",
            json!({"using": "css selector", "value": css}),
        ) {
            Ok(v) => v[ELEMENT_KEY].as_str().map(str::to_owned),
            Err(e) if e.error == "no such element" => None,
            Err(e) => panic!("find {css}: {e:?}"),
        }
    }

    fn must(&self, css: &str) -> String {
        self.find(css)
            .unwrap_or_else(|| panic!("no element {css} on {}", self.url()))
    }

    /// Click the element matching `css` (a real pointer click).
    pub fn click(&self, css: &str) {
        let e = self.must(css);
        self.cmd("POST", &format!("element/{e}/click"), json!({}))
            .unwrap_or_else(|err| panic!("click {css}: {err:?}"));
    }

    /// Type `text` into the element matching `css`.
    pub fn type_into(&self, css: &str, text: &str) {
        let e = self.must(css);
        self.cmd("POST", &format!("element/{e}/clear"), json!({}))
            .unwrap();
        self.cmd("POST", &format!("element/{e}/value"), json!({"text": text}))
            .unwrap_or_else(|err| panic!("type into {css}: {err:?}"));
    }

    /// The rendered text of the element matching `css`.
    pub fn text(&self, css: &str) -> String {
        let e = self.must(css);
        self.cmd("GET", &format!("element/{e}/text"), Value::Null)
            .unwrap()
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    /// Run `script` (a function body; `arguments` are `args`) and return its value.
    pub fn exec(&self, script: &str, args: Value) -> Value {
        self.try_exec(script, args)
            .unwrap_or_else(|e| panic!("script failed: {e:?}"))
    }

    /// [`Browser::exec`], returning the error.
    pub fn try_exec(&self, script: &str, args: Value) -> Result<Value, WdError> {
        self.cmd(
            "POST",
            "execute/sync",
            json!({"script": script, "args": args}),
        )
    }

    /// An async script: it calls `arguments[arguments.length - 1]` with its result.
    pub fn exec_async(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "execute/async",
            json!({"script": script, "args": args}),
        )
        .unwrap_or_else(|e| panic!("async script failed: {e:?}"))
    }

    /// Poll the script's value until `ok` accepts it (bounded by `timeout`).
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        script: &str,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let t = Instant::now();
        loop {
            let v = self.try_exec(script, json!([])).unwrap_or(Value::Null);
            if ok(&v) {
                return v;
            }
            assert!(
                t.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what} (last value {v}) on {}",
                self.url()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The text of an open alert/confirm/prompt, if one is open.
    pub fn alert_text(&self) -> Option<String> {
        match self.cmd("GET", "alert/text", Value::Null) {
            Ok(v) => Some(v.as_str().unwrap_or("").to_owned()),
            Err(_) => None,
        }
    }

    /// Every cookie of the current page (HttpOnly ones too: WebDriver sees them).
    pub fn cookies(&self) -> Vec<Value> {
        self.cmd("GET", "cookie", Value::Null)
            .unwrap()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Forget every cookie (a fresh login next).
    pub fn delete_cookies(&self) {
        self.cmd("DELETE", "cookie", Value::Null).unwrap();
    }

    /// Save a PNG screenshot of the viewport to `path`.
    pub fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let v = self.cmd("GET", "screenshot", Value::Null).unwrap();
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap();
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }

    /// Save a PNG of the whole page (up to 4000 px tall) at `width`, then restore the
    /// viewport to `width` x `height`.
    pub fn screenshot_full(&self, path: &Path, width: u32, height: u32) {
        let full = self
            .exec(
                "return Math.ceil(document.documentElement.scrollHeight)",
                json!([]),
            )
            .as_u64()
            .unwrap_or(u64::from(height))
            .clamp(u64::from(height), 4000);
        let metrics = |h: u64| {
            json!({"cmd": "Emulation.setDeviceMetricsOverride", "params": {
                "width": width, "height": h, "deviceScaleFactor": 1, "mobile": false}})
        };
        self.cmd("POST", "goog/cdp/execute", metrics(full)).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        self.screenshot(path);
        self.cmd("POST", "goog/cdp/execute", metrics(u64::from(height)))
            .unwrap();
    }

    /// Where test artifacts (screenshots) go: `target/console-artifacts/`.
    pub fn artifacts_dir() -> PathBuf {
        let exe = std::env::current_exe().unwrap();
        // target/debug/deps/<test> -> target/
        let target = exe
            .ancestors()
            .nth(3)
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        target.join("console-artifacts")
    }
}

fn describe(e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, r) => format!("{code}: {}", r.into_string().unwrap_or_default()),
        e => e.to_string(),
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self
            .agent
            .delete(&format!("{}/session/{}", self.base, self.session))
            .call();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
