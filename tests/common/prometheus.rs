//! A real Prometheus (Debian's `prometheus` package) scraping the parts of a cluster under
//! test, and queries of its HTTP API.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::http;

/// A running Prometheus, killed when dropped.
pub struct Prometheus {
    child: Child,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`host:port`, path `/metrics`) every second.
    pub fn start(targets: &[String]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let list = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: moebius\n    static_configs:\n      - targets: [{list}]\n"
        );
        let config_path: PathBuf = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write the config");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus is installed (scripts/test.sh installs Debian's package)");
        let prometheus = Self {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = std::net::TcpStream::connect(&prometheus.addr).is_ok()
                && http::get(&prometheus.addr, "/-/ready").0 == 200;
            if ready {
                return prometheus;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within 30 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// An instant query: the API's whole answer (`status`, `data`, or `error`).
    pub fn query(&self, promql: &str) -> Value {
        let (_, body) = http::get(
            &self.addr,
            &format!("/api/v1/query?query={}", http::encode(promql)),
        );
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{promql}: {e}: {body}"))
    }

    /// The value of a query that yields one number (`None` while it yields nothing).
    pub fn scalar(&self, promql: &str) -> Option<f64> {
        let answer = self.query(promql);
        assert_eq!(answer["status"], "success", "{promql}: {answer}");
        let result = answer["data"]["result"].as_array()?;
        let value = result.first()?["value"][1].as_str()?;
        value.parse().ok()
    }

    /// Waits (up to 60 s) until `promql` yields `want`; returns what it yielded last.
    pub fn wait_for(&self, promql: &str, want: f64) -> Option<f64> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = self.scalar(promql);
            if got == Some(want) || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Every metric name Prometheus has samples of.
    pub fn names(&self) -> Vec<String> {
        let (_, body) = http::get(&self.addr, "/api/v1/label/__name__/values");
        let answer: Value = serde_json::from_str(&body).expect("JSON");
        answer["data"]
            .as_array()
            .expect("names")
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
