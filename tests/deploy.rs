//! Kubernetes deployment, checked with real tools and no cluster: the Helm chart rendered and
//! linted by real Helm (helm-python-sdk), every object validated against the Kubernetes API
//! schemas, every container's arguments and environment accepted by this binary's
//! `--check-config`, bad values refused with the value named (tests/deploy/check_chart.py); and
//! the image built from Containerfile with buildah, running `moebius --version` as its non-root
//! user (tests/deploy/check_image.sh); and the gRPC health services that the chart's probes
//! ask, answered by the parts of a running `moebius up --etcd`.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::fixture;
use common::up::Up;
use moebius_coordinator::EtcdServer;
use moebius_proto::v1::admin_client::AdminClient;
use moebius_proto::v1::GetTopologyRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python with helm-python-sdk and kubernetes-validate that `scripts/test.sh` installs.
fn python() -> PathBuf {
    let python = std::env::var_os("MOEBIUS_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/test-venv/bin/python"));
    assert!(
        python.exists(),
        "{} is missing: `bash scripts/test.sh` installs helm-python-sdk and kubernetes-validate \
         into it (or point MOEBIUS_TEST_PYTHON at a Python that has them)",
        python.display()
    );
    python
}

/// Runs `command`, prints what it wrote, and fails the test with it unless it succeeded.
fn run(mut command: Command, what: &str) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

#[test]
fn the_chart_renders_lints_validates_and_fits_the_binary() {
    let mut command = Command::new(python());
    command
        .arg(root().join("tests/deploy/check_chart.py"))
        .arg(env!("CARGO_BIN_EXE_moebius"));
    let out = run(command, "the chart checks");
    assert!(out.contains("all chart checks passed"), "{out}");
}

#[test]
fn the_image_builds_and_runs_moebius_as_its_non_root_user() {
    let buildah = Command::new("buildah").arg("--version").output();
    assert!(
        buildah.is_ok_and(|o| o.status.success()),
        "buildah is missing: `bash scripts/test.sh` installs Debian's buildah"
    );
    let mut command = Command::new("bash");
    command
        .arg(root().join("tests/deploy/check_image.sh"))
        .arg(env!("CARGO_BIN_EXE_moebius"));
    let out = run(command, "the image build");
    assert!(out.contains("image user: 65532:65532"), "{out}");
    assert!(
        out.contains(&format!(
            "in the image: moebius {}",
            env!("CARGO_PKG_VERSION")
        )),
        "{out}"
    );
}

async fn health_client(address: &str) -> HealthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
        .expect("a URI")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{address} takes no connection: {e}"));
    HealthClient::new(channel)
}

/// The status `address`'s health service gives `service`.
async fn health(address: &str, service: &str) -> ServingStatus {
    let status = health_client(address)
        .await
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("{address} has no health status for {service:?}: {e}"))
        .into_inner()
        .status;
    ServingStatus::try_from(status).expect("a known status")
}

/// What the chart's probes ask (deploy/helm/moebius): `liveness` on every part for liveness;
/// for readiness the router's API, a worker's overall status (in the active epoch) and a
/// coordinator's overall status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_part_answers_the_probes_of_the_chart() {
    let etcd = EtcdServer::start().expect("etcd starts");
    let cluster = format!("probes{}", std::process::id());
    let up = Up::start(
        etcd.endpoint(),
        &cluster,
        &fixture("tiny-v3"),
        &["--workers", "2"],
    );
    let router = up.router_addr();
    let admin = up.admin_addr();

    assert_eq!(health(&router, "liveness").await, ServingStatus::Serving);
    assert_eq!(
        health(&router, "moebius.v1.Inference").await,
        ServingStatus::Serving
    );
    assert_eq!(health(&admin, "liveness").await, ServingStatus::Serving);
    assert_eq!(health(&admin, "").await, ServingStatus::Serving);

    // The workers, from the topology: each is live and, in the active epoch, ready.
    let mut client = AdminClient::connect(format!("http://{admin}"))
        .await
        .expect("the admin service answers");
    let deadline = Instant::now() + Duration::from_secs(30);
    let workers = loop {
        let topology = client
            .get_topology(GetTopologyRequest {})
            .await
            .expect("the topology")
            .into_inner();
        if topology.workers.len() == 2 && topology.workers.iter().all(|w| w.rank >= 0) {
            break topology.workers;
        }
        assert!(
            Instant::now() < deadline,
            "no epoch of 2 workers: {topology:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for worker in &workers {
        assert_eq!(
            health(&worker.address, "liveness").await,
            ServingStatus::Serving
        );
        // Ready once its engine runs the active epoch, a moment after the epoch is written.
        let deadline = Instant::now() + Duration::from_secs(30);
        while health(&worker.address, "").await != ServingStatus::Serving {
            assert!(
                Instant::now() < deadline,
                "{} never became ready",
                worker.id
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Services nobody registered stay unknown (NOT_FOUND), rather than answering SERVING.
    let unknown = health_client(&router)
        .await
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("an unknown service");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}
