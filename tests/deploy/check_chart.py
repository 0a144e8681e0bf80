"""Checks deploy/helm/moebius with real Helm (helm-python-sdk) and the Kubernetes API schemas
(kubernetes-validate), and runs the moebius binary on every container's arguments and
environment with --check-config, and on the commands of its exec probes and preStop hooks. With
TLS, the files the chart mounts from Secrets are replaced by ones `moebius certs` writes here,
so that the binary reads real ones. Run by tests/deploy.rs:

    python tests/deploy/check_chart.py MOEBIUS_BINARY

Prints one line per check and exits 1 at the first that fails.
"""

import copy
import json
import re
import shlex
import subprocess
import sys
import tempfile
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
# The container port (by name) each part's probes ask.
PROBE_PORT = {"router": "grpc", "worker": "grpc", "coordinator": "admin"}
# With TLS: the Secrets' keys each part reads, by variable.
TLS_FILES = {"MOEBIUS_TLS_CERT": "tls.crt", "MOEBIUS_TLS_KEY": "tls.key", "MOEBIUS_TLS_CA": "ca.crt"}
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


def render(values, name="moebius", notes=None):
    """Every rendered object, as (template, object); NOTES.txt's text into `notes` (a list)."""
    chart = helm_python.Chart.load(str(CHART))
    try:
        files = chart.render(values, name=name, namespace="serving")
    finally:
        chart.close()
    if notes is not None:
        notes.extend(text for template, text in files.items() if template.endswith("NOTES.txt"))
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


def probe_target(probe, profile, where):
    """What a probe asks: ("grpc" or "exec", port, health service). An exec probe must run
    `moebius health --addr 127.0.0.1:PORT --service NAME`."""
    if "grpc" in probe:
        return "grpc", probe["grpc"]["port"], probe["grpc"].get("service", "")
    command = probe.get("exec", {}).get("command", [])
    flags = dict(zip(command[2::2], command[3::2]))
    if (command[:2] != ["moebius", "health"] or len(command) != 6
            or set(flags) != {"--addr", "--service"} or not flags["--addr"].startswith("127.0.0.1:")):
        fail(f"{profile}: {where} runs {command}, not moebius health --addr 127.0.0.1:PORT --service NAME")
    return "exec", int(flags["--addr"].rsplit(":", 1)[1]), flags["--service"]


def secret_files(spec, container, env):
    """The variables of `env` that name a file of a mounted Secret: {variable: (Secret, key,
    read-only)}."""
    secrets = {v["name"]: v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
    files = {}
    for var, value in env.items():
        for mount in container.get("volumeMounts", []):
            if mount["name"] in secrets and value.startswith(mount["mountPath"].rstrip("/") + "/"):
                key = value[len(mount["mountPath"].rstrip("/")) + 1:]
                files[var] = (secrets[mount["name"]], key, mount.get("readOnly") is True)
    return files


def localize(env, files, local):
    """`env` with the Secrets' files replaced by the files here that `local` names by key."""
    return {**env, **{var: str(local[key]) for var, (_, key, _) in files.items()}}


def run(binary, args, env):
    return subprocess.run([binary, *args], env={"PATH": "/usr/bin:/bin", **env},
                          capture_output=True, text=True, timeout=60)


def check_objects(objects, binary, profile, local, tls=None, api_keys=None, cluster_secret=None):
    """`tls`: the values' tls block when tls.enabled; `api_keys`: apiKeys.secretName;
    `cluster_secret`: tls.clusterSecretName (taken from `tls` when not given)."""
    cluster_secret = cluster_secret or (tls or {}).get("clusterSecretName")
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
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            kind = "exec" if tls else "grpc"
            probes = {p: probe_target(container[p], profile, f"the {part}'s {p}")
                      for p in ("livenessProbe", "readinessProbe", "startupProbe")}
            want = {p: (kind, ports[PROBE_PORT[part]], service) for p, service in
                    (("livenessProbe", "liveness"), ("startupProbe", "liveness"), ("readinessProbe", READY[part]))}
            if probes != want:
                fail(f"{profile}: the {part}'s probes ask {probes}, not what tests/deploy.rs checks {want}")
            env = container_env(obj, container)
            files = secret_files(spec, container, env)
            check_security(part, env, files, profile, tls, api_keys, cluster_secret)
            result = run(binary, [*container["args"], "--check-config"], env)
            if result.returncode != 0 or "configuration ok" not in result.stdout:
                fail(f"{profile}: moebius {' '.join(container['args'])} refuses the "
                     f"environment of {obj['metadata']['name']}: {result.stderr.strip()}")
            print(f"ok: {profile}: {result.stdout.strip()}")
            if files:
                # The same with the Secrets' files here: the binary reads and checks them.
                here = localize(env, files, local)
                result = run(binary, [*container["args"], "--check-config"], here)
                if result.returncode != 0 or "not checked" in result.stdout:
                    fail(f"{profile}: moebius {part} --check-config with the Secrets' files here: "
                         f"rc {result.returncode}: {result.stdout.strip()} {result.stderr.strip()}")
                print(f"ok: {profile}: {part} reads {', '.join(sorted(files))} from Secrets: "
                      f"{result.stdout.strip()}")
            checked += 1
            if tls:
                check_health_probes(binary, container, env, files, local, profile, part)
            pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec")
            if pre_stop:
                check_pre_stop(binary, pre_stop["command"], localize(env, files, local), profile)
    if checked < 3:
        fail(f"{profile}: only {checked} Moebius containers found")


def check_security(part, env, files, profile, tls, api_keys, cluster_secret):
    """TLS, the data-plane secret and the API keys: the variables each part gets, each file
    from the right Secret, mounted read-only."""
    want = {}
    if tls:
        want = {var: (tls["secretName"], key) for var, key in TLS_FILES.items()}
        if env.get("MOEBIUS_TLS_SERVER_NAME") != tls["serverName"]:
            fail(f"{profile}: the {part} gets MOEBIUS_TLS_SERVER_NAME={env.get('MOEBIUS_TLS_SERVER_NAME')!r}, "
                 f"not {tls['serverName']!r}")
        etcd = env["MOEBIUS_ETCD"].split(",")
        if not all(e.startswith("https://") for e in etcd):
            fail(f"{profile}: the {part} dials etcd at {etcd}, not over https://")
        if part == "worker" and not cluster_secret and env.get("MOEBIUS_INSECURE_DATA_PLANE") != "true":
            fail(f"{profile}: the workers have neither the data-plane secret nor MOEBIUS_INSECURE_DATA_PLANE")
    elif any(var.startswith("MOEBIUS_TLS_") for var in env):
        fail(f"{profile}: the {part} gets TLS variables without tls.enabled")
    if cluster_secret and part == "worker":
        want["MOEBIUS_CLUSTER_SECRET_FILE"] = (cluster_secret, "cluster-secret")
    if api_keys and part == "router":
        want["MOEBIUS_API_KEY_FILE"] = (api_keys, "api-keys")
    got = {var: (secret, key) for var, (secret, key, _) in files.items()}
    if got != want:
        fail(f"{profile}: the {part} reads {got} from Secrets, not {want}")
    writable = [var for var, (_, _, read_only) in files.items() if not read_only]
    if writable:
        fail(f"{profile}: the {part} mounts the Secrets of {writable} writable")
    if want:
        print(f"ok: {profile}: the {part} reads " + ", ".join(
            f"{var} ({secret}/{key})" for var, (secret, key) in sorted(want.items())) + ", mounted read-only")


def check_health_probes(binary, container, env, files, local, profile, part):
    """Each probe's command parses and dials its port: against a closed port it exits 1,
    naming the address (a usage error would exit 2); without TLS variables, and with the
    Secrets' files here (with TLS as in the pod)."""
    commands = {tuple(container[p]["exec"]["command"]) for p in ("livenessProbe", "readinessProbe", "startupProbe")}
    plain = {k: v for k, v in env.items() if not k.startswith("MOEBIUS_TLS_")}
    for command in sorted(commands):
        args = list(command[1:])
        args[args.index("--addr") + 1] = "127.0.0.1:1"
        for what, probe_env in (("without TLS", plain), ("with TLS", localize(env, files, local))):
            result = run(binary, args, probe_env)
            if result.returncode != 1 or "cannot reach 127.0.0.1:1" not in result.stderr:
                fail(f"{profile}: the {part}'s probe {list(command)} {what} did not parse: "
                     f"rc {result.returncode}: {result.stderr.strip()}")
        print(f"ok: {profile}: the {part}'s probe {shlex.join(command)} parses (with and without TLS)")


def check_pre_stop(binary, command, env, profile):
    """The hook's command parses: it gets as far as dialling etcd (here nothing listens)."""
    if command[0] != "moebius":
        fail(f"{profile}: preStop runs {command[0]}, not moebius")
    scheme = env["MOEBIUS_ETCD"].split("://")[0]
    env = {**env, "MOEBIUS_ETCD": f"{scheme}://127.0.0.1:9"}
    result = run(binary, command[1:], env)
    if (result.returncode != 1 or "cannot connect to etcd" not in result.stderr
            or "every etcd endpoint must be" in result.stderr or "needs TLS" in result.stderr):
        fail(f"{profile}: preStop {command} did not parse: rc {result.returncode}: {result.stderr}")
    print(f"ok: {profile}: preStop {' '.join(command)} parses (drains $MOEBIUS_WORKER_ID, etcd over {scheme})")


def check_tls_etcd(objects, tls):
    """The chart's etcd with TLS: https for clients and peers from the chart's Secret, client
    certificates required, probes on the plaintext health port."""
    etcd = [o for _, o in objects if o["kind"] == "StatefulSet" and o["metadata"]["name"].endswith("-etcd")][0]
    spec = etcd["spec"]["template"]["spec"]
    container = spec["containers"][0]
    args = dict(a[2:].split("=", 1) for a in container["args"])
    for flag in ("listen-client-urls", "listen-peer-urls", "advertise-client-urls", "initial-advertise-peer-urls"):
        if not args[flag].startswith("https://"):
            fail(f"tls: etcd --{flag}={args[flag]} is not https")
    if args["initial-cluster"].count("=https://") != etcd["spec"]["replicas"] or "=http://" in args["initial-cluster"]:
        fail(f"tls: etcd's peers are not all https: {args['initial-cluster']}")
    for flag in ("client-cert-auth", "peer-client-cert-auth"):
        if args.get(flag) != "true":
            fail(f"tls: etcd runs without --{flag}")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for flag, key in (("cert-file", "tls.crt"), ("key-file", "tls.key"), ("trusted-ca-file", "ca.crt"),
                      ("peer-cert-file", "tls.crt"), ("peer-key-file", "tls.key"), ("peer-trusted-ca-file", "ca.crt")):
        path = args.get(flag, "")
        mount = mounts.get(path.rsplit("/", 1)[0])
        if (mount is None or path.rsplit("/", 1)[1] != key or mount.get("readOnly") is not True
                or volumes[mount["name"]].get("secret", {}).get("secretName") != tls["secretName"]):
            fail(f"tls: etcd --{flag}={path} is not {key} of Secret {tls['secretName']} mounted read-only")
    health = args.get("listen-metrics-urls", "")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        port = container[probe]["httpGet"]["port"]
        port = ports.get(port, port)
        if not health.startswith("http://") or not health.endswith(f":{port}") or port == 2379:
            fail(f"tls: etcd's {probe} asks port {port}, not its plaintext health port {health}")
    print(f"ok: tls: etcd serves clients and peers over mutual TLS ({etcd['spec']['replicas']} members), "
          f"probed on {health}")


def check_tls_monitoring(objects, tls):
    monitor = [o for _, o in objects if o["kind"] == "ServiceMonitor"][0]
    for endpoint in monitor["spec"]["endpoints"]:
        config = endpoint.get("tlsConfig", {})
        if (endpoint.get("scheme") != "https" or config.get("serverName") != tls["serverName"]
                or config.get("ca", {}).get("secret") != {"name": tls["secretName"], "key": "ca.crt"}):
            fail(f"tls: the ServiceMonitor scrapes {endpoint} without https and the CA of {tls['secretName']}")
    print("ok: tls: the ServiceMonitor scrapes over https, checking the CA for " + tls["serverName"])


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


def make_local(binary, folder):
    """Files here for the keys of the chart's Secrets: a certificate, its key and CA, and a
    data-plane secret from `moebius certs`; a file of API keys."""
    result = run(binary, ["certs", str(folder)], {})
    if result.returncode != 0:
        fail(f"moebius certs {folder}: rc {result.returncode}: {result.stderr.strip()}")
    (folder / "api-keys").write_text("# the keys of the test\nkey-of-the-test-1\n")
    return {"tls.crt": folder / "cert.pem", "tls.key": folder / "key.pem", "ca.crt": folder / "ca.pem",
            "cluster-secret": folder / "cluster-secret", "api-keys": folder / "api-keys"}


def main():
    binary = sys.argv[1]
    with tempfile.TemporaryDirectory() as folder:
        check_chart(binary, make_local(binary, Path(folder)))


def check_chart(binary, local):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    gpu = yaml.safe_load((CHART / "values-gpu.yaml").read_text())

    tls = {"enabled": True, "secretName": "moebius-tls", "serverName": "moebius.serving",
           "clusterSecretName": "moebius-cluster-secret"}
    tls_values = {"model": MODEL, "tls": tls, "apiKeys": {"secretName": "moebius-api-keys"}}
    for what, lint_values in (("", {"model": MODEL}), (" (tls)", tls_values)):
        lint = helm_python.lint(str(CHART), lint_values, strict=True)
        problems = [m for m in lint["messages"] if m["severity"] > 1] + lint["errors"]
        if problems:
            fail(f"helm lint --strict{what}: {problems}")
        print(f"ok: helm lint --strict{what} (Helm {helm_python.helm_sdk_version()})")

    cpu = render({"model": MODEL})
    check_objects(cpu, binary, "cpu", local)
    workers = [o for _, o in cpu if o["kind"] == "StatefulSet" and o["metadata"]["name"].endswith("-worker")][0]
    if workers["spec"]["podManagementPolicy"] != "Parallel":
        fail("workers must start together (podManagementPolicy: Parallel)")
    grace = workers["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    if grace <= values["worker"]["drainSeconds"]:
        fail(f"a worker's grace period {grace} s leaves no room for its {values['worker']['drainSeconds']} s drain")

    gpu_objects = render(merge(gpu, {"model": MODEL}))
    check_objects(gpu_objects, binary, "gpu", local)
    gpu_pod = [o for _, o in gpu_objects if o["kind"] == "StatefulSet" and o["metadata"]["name"].endswith("-worker")][0]["spec"]["template"]["spec"]
    if gpu_pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") != 1 or not gpu_pod.get("hostNetwork"):
        fail("the GPU profile's workers lack a GPU or host networking")
    print("ok: gpu: workers request nvidia.com/gpu with host networking")

    # GPU workers on the nccl data plane: the binary takes the variables (--check-config).
    nccl_objects = render(merge(gpu, {"model": MODEL, "worker": {"device": "cuda:0", "dataPlane": "nccl",
                                                                 "kvCacheTokens": 65536}}))
    check_objects(nccl_objects, binary, "gpu-nccl", local)
    nccl_pod = [o for _, o in nccl_objects if o["kind"] == "StatefulSet" and o["metadata"]["name"].endswith("-worker")][0]["spec"]["template"]["spec"]
    nccl_env = {v["name"]: v.get("value") for v in nccl_pod["containers"][0]["env"]}
    if (nccl_env.get("MOEBIUS_WORKER_DEVICE") != "cuda:0" or nccl_env.get("MOEBIUS_WORKER_DATA_PLANE") != "nccl"
            or nccl_env.get("MOEBIUS_WORKER_KV_CACHE_TOKENS") != "65536"):
        fail(f"gpu-nccl: the workers' device variables are wrong: {nccl_env}")
    print("ok: gpu-nccl: workers run MOEBIUS_WORKER_DEVICE=cuda:0 MOEBIUS_WORKER_DATA_PLANE=nccl "
          "MOEBIUS_WORKER_KV_CACHE_TOKENS=65536")
    if any(v["name"] == "MOEBIUS_WORKER_KV_CACHE_TOKENS" for v in gpu_pod["containers"][0]["env"]):
        fail("the default worker sets a KV cache budget; it should size it from memory")

    everything = render({
        "model": {"existingClaim": "deepseek-v3"},
        "etcd": {"replicas": 3},
        "router": {"replicas": 2, "maxInFlightPerWorker": 32},
        "metrics": {"serviceMonitor": {"enabled": True}, "grafanaDashboards": {"enabled": True}},
        "otlpEndpoint": "http://otel-collector:4317",
    })
    check_objects(everything, binary, "monitored", local)
    check_monitoring(everything)
    etcd = [o for _, o in everything if o["kind"] == "StatefulSet" and o["metadata"]["name"].endswith("-etcd")][0]
    peers = [a for a in etcd["spec"]["template"]["spec"]["containers"][0]["args"] if a.startswith("--initial-cluster=")][0]
    if peers.count("=http://") != 3:
        fail(f"3 etcd members expected: {peers}")
    print("ok: etcd.replicas=3 forms a 3-member cluster")

    external = render({"model": MODEL, "etcd": {"enabled": False, "externalUrl": "http://etcd.infra:2379"}})
    if any(o["kind"] == "StatefulSet" and o["metadata"]["name"].endswith("-etcd") for _, o in external):
        fail("etcd.enabled=false still renders etcd")
    check_objects(external, binary, "external-etcd", local)

    # TLS everywhere, the data-plane secret and API keys, from Secrets.
    notes = []
    secured = render(merge(tls_values, {
        "etcd": {"replicas": 3},
        "metrics": {"serviceMonitor": {"enabled": True}, "grafanaDashboards": {"enabled": True}},
    }), notes=notes)
    check_objects(secured, binary, "tls", local, tls=tls, api_keys="moebius-api-keys")
    check_monitoring(secured)
    check_tls_monitoring(secured, tls)
    check_tls_etcd(secured, tls)
    if "https://" not in notes[0] or "-plaintext" in notes[0] or "authorization: Bearer" not in notes[0]:
        fail(f"tls: NOTES.txt does not show https and the API key: {notes[0]}")
    print("ok: tls: NOTES.txt shows https and the API key")

    # TLS with an open data plane, and an external etcd over https.
    insecure_tls = {"enabled": True, "secretName": "moebius-tls", "serverName": "moebius", "insecureDataPlane": True}
    insecure = render({"model": MODEL, "tls": insecure_tls,
                       "etcd": {"enabled": False, "externalUrl": "https://etcd-0.infra:2379,https://etcd-1.infra:2379"}})
    check_objects(insecure, binary, "tls-insecure-data-plane", local, tls=insecure_tls)
    pod = [o for _, o in insecure if o["kind"] == "StatefulSet" and o["metadata"]["name"].endswith("-worker")][0]["spec"]["template"]["spec"]
    env = {v["name"]: v.get("value") for v in pod["containers"][0]["env"]}
    if env.get("MOEBIUS_INSECURE_DATA_PLANE") != "true" or "MOEBIUS_CLUSTER_SECRET_FILE" in env:
        fail(f"tls-insecure-data-plane: the workers' data-plane variables are wrong: {env}")
    if any(v["name"] == "cluster-secret" or "moebius-cluster-secret" in json.dumps(v) for v in pod["volumes"]):
        fail("tls-insecure-data-plane: the workers still mount a data-plane secret")
    print("ok: tls-insecure-data-plane: workers run MOEBIUS_INSECURE_DATA_PLANE=true with no secret mounted")

    # API keys and the data-plane secret without TLS.
    keyed = render({"model": MODEL, "apiKeys": {"secretName": "keys"}, "tls": {"clusterSecretName": "secret"}})
    check_objects(keyed, binary, "api-keys", local, api_keys="keys", cluster_secret="secret")

    # Helm names a value that breaks the schema by its JSON pointer.
    refused({"model": MODEL, "worker": {"replicas": -1}}, "/worker/replicas")
    refused({"model": MODEL, "router": {"replicas": -2}}, "/router/replicas")
    refused({}, "model.existingClaim", "model.hostPath")
    refused({"model": MODEL, "profile": "tpu"}, "/profile")
    refused({"model": MODEL, "worker": {"replica": 3}}, "/worker", "'replica'")
    refused({"model": MODEL, "coordinator": {"rebalanceThreshold": 0.5}}, "/coordinator/rebalanceThreshold")
    refused({"model": MODEL, "etcd": {"enabled": False}}, "etcd.externalUrl")
    refused({"model": MODEL, "profile": "gpu"}, "nvidia.com/gpu")
    refused({"model": MODEL, "worker": {"device": "gpu0"}}, "/worker/device")
    refused({"model": MODEL, "worker": {"dataPlane": "udp"}}, "/worker/dataPlane")
    refused({"model": MODEL, "worker": {"kvCacheTokens": 8}}, "/worker/kvCacheTokens")
    refused({"model": MODEL, "worker": {"dataPlane": "nccl"}}, "worker.dataPlane nccl", "worker.device")
    refused({"model": MODEL, "tls": {"enabled": True}}, "tls.secretName")
    refused({"model": MODEL, "tls": {"enabled": True, "secretName": "t"}},
            "tls.clusterSecretName", "tls.insecureDataPlane")
    refused({"model": MODEL, "tls": {"clusterSecretName": "s", "insecureDataPlane": True}},
            "tls.clusterSecretName", "tls.insecureDataPlane")
    refused({"model": MODEL, "tls": {"enabled": True, "secretName": "t", "clusterSecretName": "s"},
             "etcd": {"enabled": False, "externalUrl": "https://etcd-0.infra:2379,http://etcd-1.infra:2379"}},
            "etcd.externalUrl", "http://etcd-1.infra:2379")
    refused({"model": MODEL, "tls": {"secretName": "Moebius_TLS"}}, "/tls/secretName")
    refused({"model": MODEL, "tls": {"serverName": ""}}, "/tls/serverName")
    refused({"model": MODEL, "apiKeys": {"secret": "keys"}}, "/apiKeys", "'secret'")
    print("all chart checks passed")


if __name__ == "__main__":
    main()
