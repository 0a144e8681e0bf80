//! `moebius up --etcd` as a user runs it, with its output read line by line.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running `moebius up`, killed when dropped.
pub struct Up {
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

impl Up {
    /// Starts `moebius up --etcd <etcd> --cluster <cluster> --model <model>` on free ports
    /// with 1 thread per worker, and `extra` flags.
    pub fn start(etcd: &str, cluster: &str, model: &Path, extra: &[&str]) -> Self {
        let etcd = ["--etcd", etcd, "--cluster", cluster];
        Self::start_with(model, &[&etcd, extra].concat())
    }

    /// Starts `moebius up --model <model>` on free ports with 1 thread per worker, and `extra`
    /// flags (without `--etcd`: the whole cluster in one process).
    pub fn start_with(model: &Path, extra: &[&str]) -> Self {
        Self::spawn(model, extra, |_| {})
    }

    /// [`start_with`](Self::start_with), with `setup` applied to the command first (its
    /// environment, where its stderr goes).
    pub fn spawn(model: &Path, extra: &[&str], setup: impl FnOnce(&mut Command)) -> Self {
        Self::launch(Some(model), extra, setup)
    }

    /// `moebius up` as a newcomer runs it, on the checkpoint it bundles (no `--model`), from
    /// the repository's root, on free ports with 1 thread per worker.
    pub fn start_bundled(extra: &[&str]) -> Self {
        Self::launch(None, extra, |command| {
            command.current_dir(env!("CARGO_MANIFEST_DIR"));
        })
    }

    fn launch(model: Option<&Path>, extra: &[&str], setup: impl FnOnce(&mut Command)) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_moebius"));
        command.stderr(Stdio::inherit());
        setup(&mut command);
        command
            .args(["up", "--threads", "1"])
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--http-listen", "127.0.0.1:0"]);
        if let Some(model) = model {
            command.arg("--model").arg(model);
        }
        let mut child = command
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("moebius up starts");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
    }

    /// The next line (within 60 s) for which `pred` holds; earlier lines are skipped.
    pub fn next_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("moebius up printed no {what} within 60 s"));
            if pred(&line) {
                return line;
            }
        }
    }

    /// Waits for the banner; returns the router's address.
    pub fn router_addr(&self) -> String {
        let ready = self.next_line("banner", |l| l.starts_with("moebius is up: router on "));
        ready
            .trim_start_matches("moebius is up: router on ")
            .split([',', ' '])
            .next()
            .expect("address")
            .to_string()
    }

    /// Waits for the banner's watch line; returns the router's HTTP address (dashboard and
    /// metrics).
    pub fn http_addr(&self) -> String {
        let line = self.next_line("dashboard address", |l| {
            l.starts_with("watch it: dashboard http")
        });
        line.trim_start_matches("watch it: dashboard ")
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .split('/')
            .next()
            .expect("address")
            .to_string()
    }

    /// Waits for the banner's admin line; returns the admin address.
    pub fn admin_addr(&self) -> String {
        let line = self.next_line("admin address", |l| {
            l.starts_with("operate it: moebius admin topology")
        });
        line.rsplit(' ').next().expect("address").to_string()
    }
}

impl Drop for Up {
    /// Stops `up` as Ctrl-C does, so that it stops its children; kills it after 20 s.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return; // Stopped (and reaped) already.
        }
        // Not `send_signal`: a drop must not panic.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pid in an `[up] started <part> (pid N)` line.
pub fn pid_of(line: &str) -> u32 {
    line.rsplit("(pid ")
        .next()
        .and_then(|s| s.trim_end_matches(')').parse().ok())
        .expect("a pid")
}
