//! A real cluster for end-to-end tests: etcd, a coordinator, workers and a router, each its own
//! process on free loopback ports, all stopped when the [`Cluster`] is dropped.

#![allow(dead_code)]

pub mod http;
pub mod load;
pub mod otlp;
pub mod prometheus;
pub mod up;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use moebius_coordinator::etcd_server::EtcdServer;
use moebius_proto::v1::inference_client::InferenceClient;
use moebius_proto::v1::worker_client::WorkerClient;
use tonic::transport::Channel;

pub const LEASE_TTL_SECS: u64 = 3;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// A child process that is killed when dropped, with the first line it printed that matched.
pub struct Process {
    pub name: String,
    child: Child,
}

impl Process {
    /// Starts `moebius <args>` and waits for a stdout line starting with `ready_prefix`;
    /// returns the process and the rest of that line.
    pub fn start(name: &str, args: &[String], ready_prefix: &str) -> (Self, String) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_moebius"))
            .args(args)
            .env("MOEBIUS_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("moebius starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        let prefix = ready_prefix.to_string();
        // Reads the child's stdout until it closes; the thread ends with the child.
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !sent && line.starts_with(&prefix) {
                    let _ = tx.send(line[prefix.len()..].trim().to_string());
                    sent = true;
                }
            }
        });
        let rest = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{name} did not print {ready_prefix:?} within 60 s"));
        (
            Self {
                name: name.to_string(),
                child,
            },
            rest,
        )
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (`STOP`, `CONT`, `TERM`, ...) with `kill`.
    pub fn signal(&self, signal: &str) {
        send_signal(self.child.id(), signal);
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident memory of the process, from `/proc`.
    pub fn rss_bytes(&self) -> u64 {
        rss_bytes(self.child.id())
    }
}

/// Sends `signal` to `pid` with the `kill` command.
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Resident memory of process `pid`, from `/proc/<pid>/status`.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc status");
    kib * 1024
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a test cluster is made of, beyond the model.
#[derive(Debug, Clone)]
pub struct Options {
    pub workers: usize,
    pub capacity: u32,
    /// Coordinators `coord-a`, `coord-b`, ...: the first started leads.
    pub coordinators: usize,
    /// Extra flags of `moebius router`.
    pub router_args: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            workers: 3,
            capacity: 64,
            coordinators: 1,
            router_args: Vec::new(),
        }
    }
}

/// etcd, coordinators, workers and a router on the `model` checkpoint.
pub struct Cluster {
    pub coordinator: Process,
    /// Coordinators after the first (standbys).
    pub standbys: Vec<Process>,
    pub workers: Vec<Process>,
    /// gRPC address of each worker's internal service, by worker index.
    pub worker_addrs: Vec<String>,
    pub router: Process,
    pub router_addr: String,
    pub cluster: String,
    /// Last, so that it is dropped after the processes that use it.
    pub etcd: EtcdServer,
}

/// The logical experts a placement record gives a slot to in every MoE layer, sorted, each once.
pub fn placed_experts(record: &serde_json::Value) -> Vec<u64> {
    let record: moebius_coordinator::EpochRecord =
        serde_json::from_value(record.clone()).expect("an epoch record");
    let p = &record.placement;
    let layers = p.layers.len().max(1);
    (0..p.num_experts)
        .filter(|e| (0..layers).all(|l| p.layer(l).iter().flatten().any(|x| x == e)))
        .map(|e| e as u64)
        .collect()
}

impl Cluster {
    pub fn start(model: &Path, workers: usize, capacity: u32) -> Self {
        Self::start_with(
            model,
            Options {
                workers,
                capacity,
                ..Options::default()
            },
        )
    }

    pub fn start_with(model: &Path, options: Options) -> Self {
        let Options {
            workers,
            capacity,
            coordinators,
            router_args,
        } = options;
        let etcd = EtcdServer::start()
            .expect("etcd starts (install Debian's etcd-server: scripts/test.sh does)");
        let endpoint = etcd.endpoint().to_string();
        let cluster = format!("e2e{}", std::process::id());
        let model = model.to_str().expect("utf-8 path").to_string();
        let common = |extra: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = vec![
                "--etcd".into(),
                endpoint.clone(),
                "--cluster".into(),
                cluster.clone(),
            ];
            v.extend(extra.iter().map(|s| s.to_string()));
            v
        };
        let ttl = LEASE_TTL_SECS.to_string();
        let n = workers.to_string();
        let mut coords = (0..coordinators.max(1)).map(|i| {
            let id = format!("coord-{}", (b'a' + i as u8) as char);
            let (p, _) = Process::start(
                &id,
                &[
                    vec!["coordinator".to_string()],
                    common(&[
                        "--model",
                        &model,
                        "--workers",
                        &n,
                        "--lease-ttl-secs",
                        &ttl,
                        "--id",
                        &id,
                        "--admin-listen",
                        "127.0.0.1:0",
                    ]),
                ]
                .concat(),
                "coordinator",
            );
            p
        });
        let coordinator = coords.next().expect("one coordinator");
        let standbys: Vec<Process> = coords.collect();
        let mut procs = Vec::new();
        let mut worker_addrs = Vec::new();
        let cap = capacity.to_string();
        for i in 0..workers {
            let id = format!("w{i}");
            let (p, rest) = Process::start(
                &id,
                &[
                    vec!["worker".to_string()],
                    common(&[
                        "--model",
                        &model,
                        "--id",
                        &id,
                        "--capacity",
                        &cap,
                        "--lease-ttl-secs",
                        &ttl,
                        "--threads",
                        "1",
                    ]),
                ]
                .concat(),
                &format!("worker {id} serving on "),
            );
            procs.push(p);
            worker_addrs.push(rest);
        }
        let mut router_flags = vec!["--listen", "127.0.0.1:0"];
        router_flags.extend(router_args.iter().map(String::as_str));
        let (router, router_addr) = Process::start(
            "router",
            &[vec!["router".to_string()], common(&router_flags)].concat(),
            "router serving on ",
        );
        Self {
            etcd,
            coordinator,
            standbys,
            workers: procs,
            worker_addrs,
            router,
            router_addr,
            cluster,
        }
    }

    pub async fn client(&self) -> InferenceClient<Channel> {
        InferenceClient::connect(format!("http://{}", self.router_addr))
            .await
            .expect("router accepts connections")
    }

    pub async fn worker_client(&self, i: usize) -> WorkerClient<Channel> {
        WorkerClient::connect(format!("http://{}", self.worker_addrs[i]))
            .await
            .expect("worker accepts connections")
    }

    /// `etcdctl get --prefix <key>` output.
    pub fn etcdctl_get(&self, key: &str, prefix: bool) -> String {
        let mut cmd = Command::new("etcdctl");
        cmd.arg("--endpoints")
            .arg(self.etcd.endpoint())
            .arg("get")
            .arg(key);
        if prefix {
            cmd.arg("--prefix");
        }
        let out = cmd.output().expect("etcdctl runs");
        assert!(
            out.status.success(),
            "etcdctl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The current placement record, parsed.
    pub fn placement(&self) -> serde_json::Value {
        self.get_json(&self.key("placement"))
    }

    /// The etcd key of `what` (e.g. `placement`, `workers/`) in this cluster.
    pub fn key(&self, what: &str) -> String {
        format!("/moebius/{}/{what}", self.cluster)
    }

    /// The value of one key, parsed (`null` when it is missing).
    pub fn get_json(&self, key: &str) -> serde_json::Value {
        let text = self.etcdctl_get(key, false);
        serde_json::from_str(text.lines().nth(1).unwrap_or("null")).expect("a JSON value")
    }

    /// The values under a prefix, parsed.
    pub fn get_prefix_json(&self, prefix: &str) -> Vec<serde_json::Value> {
        let text = self.etcdctl_get(prefix, true);
        text.lines()
            .skip(1)
            .step_by(2)
            .map(|v| serde_json::from_str(v).expect("a JSON value"))
            .collect()
    }

    /// Waits until the placement is active with `ranks` ranks.
    pub fn wait_active(&self, ranks: usize, within: Duration) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let p = self.placement();
            if p["state"] == "active" && p["workers"].as_array().map(Vec::len) == Some(ranks) {
                return p;
            }
            assert!(
                start.elapsed() < within,
                "no active epoch of {ranks} ranks within {within:?}: {p}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
