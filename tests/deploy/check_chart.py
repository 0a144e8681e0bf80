"""Checks deploy/helm/moebius with real Helm (helm-python-sdk) and the Kubernetes API schemas
(kubernetes-validate), and runs the moebius binary on every container's arguments and
environment with --check-config. Run by tests/deploy.rs:

    python tests/deploy/check_chart.py MOEBIUS_BINARY

Prints one line per check and exits 1 at the first that fails.
"""

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import helm_python
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "moebius"
KUBERNETES = kubernetes_validate.utils.latest_version()
# The checkpoint the rendered containers point at: the bundled fixture, so that the
# coordinator's check reads a real config.json.
MODEL = {"hostPath": "/srv/models", "mountPath": str(ROOT / "fixtures"), "subPath": "tiny-v3"}
# The health services the readiness probes ask, as tests/deploy.rs finds them answered.
READY = {"router": "moebius.v1.Inference", "worker": "", "coordinator": ""}
# What the kubelet would put into the containers' downward-API variables.
POD_IP = "10.1.2.3"


def fail(message):
    print(f"FAIL: {message}")
    sys.exit(1)


def merge(base, extra):
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def render(values, name="moebius"):
    """Every rendered object, as (template, object)."""
    chart = helm_python.Chart.load(str(CHART))
    try:
        files = chart.render(values, name=name, namespace="serving")
    finally:
        chart.close()
    objects = []
    for template, text in files.items():
        if not template.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append((template, doc))
    return objects


def refused(values, *needles):
    """Rendering `values` fails with a message that names each of `needles`."""
    try:
        render(values)
    except helm_python.HelmError as e:
        message = str(e)
        missing = [n for n in needles if n not in message]
        if missing:
            fail(f"refusal of {values} does not name {missing}: {message}")
        print(f"ok: refused, naming {', '.join(needles)}: {message.strip().splitlines()[-1]}")
        return
    fail(f"values {values} rendered, but should be refused")


def pod_spec(obj):
    if obj["kind"] in ("Deployment", "StatefulSet"):
        return obj["spec"]["template"]["spec"]
    return None


def container_env(obj, container):
    """The container's environment as the kubelet would give it: downward-API fields filled
    in and $(VAR) references expanded."""
    pod_name = f"{obj['metadata']['name']}-0"
    env = {}
    for var in container.get("env", []):
        if "valueFrom" in var:
            field = var["valueFrom"]["fieldRef"]["fieldPath"]
            env[var["name"]] = {"metadata.name": pod_name, "status.podIP": POD_IP}[field]
        else:
            env[var["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"]
            )
    return env


def check_objects(objects, binary, profile):
    kinds = {}
    for template, obj in objects:
        kinds.setdefault(obj["kind"], []).append(obj["metadata"]["name"])
        if obj["kind"] == "ServiceMonitor":
            continue  # a CRD: not in the Kubernetes API schemas; checked below
        try:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
        except kubernetes_validate.utils.ValidationError as e:
            fail(f"{profile}: {template} {obj['kind']} {obj['metadata']['name']}: {e.message}")
    print(f"ok: {profile}: {len(objects)} objects valid against Kubernetes {KUBERNETES}: "
          + ", ".join(f"{k} {len(v)}" for k, v in sorted(kinds.items())))

    checked = 0
    for _, obj in objects:
        spec = pod_spec(obj)
        if spec is None:
            continue
        if spec.get("securityContext", {}).get("runAsNonRoot") is not True:
            fail(f"{profile}: {obj['metadata']['name']} may run as root")
        for container in spec["containers"]:
            for probe in ("livenessProbe", "readinessProbe"):
                if probe not in container:
                    fail(f"{profile}: {obj['metadata']['name']} has no {probe}")
            if "args" not in container or container["args"][0] not in ("worker", "router", "coordinator"):
                continue
            part = container["args"][0]
            probes = {p: container[p]["grpc"]["service"] for p in ("livenessProbe", "readinessProbe", "startupProbe")}
            want = {"livenessProbe": "liveness", "startupProbe": "liveness", "readinessProbe": READY[part]}
            if probes != want:
                fail(f"{profile}: the {part}'s probes ask {probes}, not what tests/deploy.rs checks {want}")
            env = container_env(obj, container)
            result = subprocess.run(
                [binary, *container["args"], "--check-config"],
                env={"PATH": "/usr/bin:/bin", **env},
                capture_output=True,
                text=True,
                timeout=60,
            )
            if result.returncode != 0 or "configuration ok" not in result.stdout:
                fail(f"{profile}: moebius {' '.join(container['args'])} refuses the "
                     f"environment of {obj['metadata']['name']}: {result.stderr.strip()}")
            print(f"ok: {profile}: {result.stdout.strip()}")
            checked += 1
            pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec")
            if pre_stop:
                check_pre_stop(binary, pre_stop["command"], env, profile)
    if checked < 3:
        fail(f"{profile}: only {checked} Moebius containers found")


def check_pre_stop(binary, command, env, profile):
    """The hook's command parses: it gets as far as dialling etcd (here nothing listens)."""
    if command[0] != "moebius":
        fail(f"{profile}: preStop runs {command[0]}, not moebius")
    env = {**env, "MOEBIUS_ETCD": "http://127.0.0.1:9"}
    result = subprocess.run([binary, *command[1:]], env={"PATH": "/usr/bin:/bin", **env},
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 1 or "cannot connect to etcd" not in result.stderr:
        fail(f"{profile}: preStop {command} did not parse: rc {result.returncode}: {result.stderr}")
    print(f"ok: {profile}: preStop {' '.join(command)} parses (drains $MOEBIUS_WORKER_ID)")


def check_monitoring(objects):
    services = [o for _, o in objects if o["kind"] == "Service"]
    monitors = [o for _, o in objects if o["kind"] == "ServiceMonitor"]
    if len(monitors) != 1:
        fail(f"expected one ServiceMonitor, got {len(monitors)}")
    monitor = monitors[0]
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in services
                if all(s["metadata"]["labels"].get(k) == v for k, v in selector.items())]
    scraped = {}
    for endpoint in monitor["spec"]["endpoints"]:
        for service in selected:
            if any(p["name"] == endpoint["port"] for p in service["spec"]["ports"]):
                scraped.setdefault(service["metadata"]["labels"]["app.kubernetes.io/component"], []).append(endpoint["port"])
    for component in ("router", "coordinator", "worker"):
        if component not in scraped:
            fail(f"the ServiceMonitor scrapes no port of the {component}s: {scraped}")
    print(f"ok: the ServiceMonitor scrapes {scraped}")

    maps = [o for _, o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboards")]
    if len(maps) != 1:
        fail("no ConfigMap of Grafana dashboards")
    for path in sorted((ROOT / "deploy" / "grafana").glob("*.json")):
        shipped = maps[0]["data"].get(path.name)
        if shipped is None or json.loads(shipped) != json.loads(path.read_text()):
            fail(f"the dashboards ConfigMap does not carry deploy/grafana/{path.name} as it is")
    print(f"ok: the dashboards ConfigMap carries {sorted(maps[0]['data'])}")


def main():
    binary = sys.argv[1]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    gpu = yaml.safe_load((CHART / "values-gpu.yaml").read_text())

    lint = helm_python.lint(str(CHART), {"model": MODEL}, strict=True)
    problems = [m for m in lint["messages"] if m["severity"] > 1] + lint["errors"]
    if problems:
        fail(f"helm lint --strict: {problems}")
    print(f"ok: helm lint --strict (Helm {helm_python.helm_sdk_version()})")

    cpu = render({"model": MODEL})
    check_objects(cpu, binary, "cpu")
    workers = [o for _, o in cpu if o["kind"] == "StatefulSet" and o["metadata"]["name"].endswith("-worker")][0]
    if workers["spec"]["podManagementPolicy"] != "Parallel":
        fail("workers must start together (podManagementPolicy: Parallel)")
    grace = workers["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    if grace <= values["worker"]["drainSeconds"]:
        fail(f"a worker's grace period {grace} s leaves no room for its {values['worker']['drainSeconds']} s drain")

    gpu_objects = render(merge(gpu, {"model": MODEL}))
    check_objects(gpu_objects, binary, "gpu")
    gpu_pod = [o for _, o in gpu_objects if o["kind"] == "StatefulSet" and o["metadata"]["name"].endswith("-worker")][0]["spec"]["template"]["spec"]
    if gpu_pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") != 1 or not gpu_pod.get("hostNetwork"):
        fail("the GPU profile's workers lack a GPU or host networking")
    print("ok: gpu: workers request nvidia.com/gpu with host networking")

    everything = render({
        "model": {"existingClaim": "deepseek-v3"},
        "etcd": {"replicas": 3},
        "router": {"replicas": 2, "maxInFlightPerWorker": 32},
        "metrics": {"serviceMonitor": {"enabled": True}, "grafanaDashboards": {"enabled": True}},
        "otlpEndpoint": "http://otel-collector:4317",
    })
    check_objects(everything, binary, "monitored")
    check_monitoring(everything)
    etcd = [o for _, o in everything if o["kind"] == "StatefulSet" and o["metadata"]["name"].endswith("-etcd")][0]
    peers = [a for a in etcd["spec"]["template"]["spec"]["containers"][0]["args"] if a.startswith("--initial-cluster=")][0]
    if peers.count("=http://") != 3:
        fail(f"3 etcd members expected: {peers}")
    print("ok: etcd.replicas=3 forms a 3-member cluster")

    external = render({"model": MODEL, "etcd": {"enabled": False, "externalUrl": "http://etcd.infra:2379"}})
    if any(o["kind"] == "StatefulSet" and o["metadata"]["name"].endswith("-etcd") for _, o in external):
        fail("etcd.enabled=false still renders etcd")
    check_objects(external, binary, "external-etcd")

    # Helm names a value that breaks the schema by its JSON pointer.
    refused({"model": MODEL, "worker": {"replicas": -1}}, "/worker/replicas")
    refused({"model": MODEL, "router": {"replicas": -2}}, "/router/replicas")
    refused({}, "model.existingClaim", "model.hostPath")
    refused({"model": MODEL, "profile": "tpu"}, "/profile")
    refused({"model": MODEL, "worker": {"replica": 3}}, "/worker", "'replica'")
    refused({"model": MODEL, "coordinator": {"rebalanceThreshold": 0.5}}, "/coordinator/rebalanceThreshold")
    refused({"model": MODEL, "etcd": {"enabled": False}}, "etcd.externalUrl")
    refused({"model": MODEL, "profile": "gpu"}, "nvidia.com/gpu")
    print("all chart checks passed")


if __name__ == "__main__":
    main()
