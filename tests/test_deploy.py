"""Deployment artifacts under deploy/: the image and the Kubernetes manifests.

Every kustomization is rendered with ``kubectl kustomize`` (installed by ``make tools``) and every object
is validated offline: built-in kinds with kubernetes-validate in strict mode at a pinned Kubernetes version,
the ServiceMonitor against the JSON schema kept in deploy/schemas/. Then the invariants that keep the
server alive and draining cleanly are asserted on the rendered YAML, and the Dockerfile is checked with a
small parser (no container engine needed).

The server's defaults and flag names come from ``service.config.ServeConfig`` (the dataclass behind
``pathguard serve``'s flags and ``PATHGUARD_*`` variables), and the subcommands from ``pathguard``'s own parser.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
SERVICEMONITOR_SCHEMA = DEPLOY / "schemas" / "servicemonitor.json"
# Custom resources validated against the repository's schemas (the rest against Kubernetes' own).
CRD_SCHEMAS = {
    "ServiceMonitor": SERVICEMONITOR_SCHEMA,
    "ServingRuntime": DEPLOY / "schemas" / "servingruntime.json",
    "InferenceService": DEPLOY / "schemas" / "inferenceservice.json",
}

# The Kubernetes version the manifests are validated against: the oldest release this deployment supports
# (native gRPC probes are GA since 1.27, backoffLimitPerIndex is beta and on by default since 1.29).
KUBERNETES_VERSION = "1.30.0"

OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
KUSTOMIZATIONS = {
    "base": K8S / "base",
    **{f"overlays/{o}": K8S / "overlays" / o for o in OVERLAYS},
    "eval": K8S / "eval",
    "prometheus-adapter": K8S / "prometheus-adapter",
    "kserve": DEPLOY / "kserve",
}
SERVING = [f"overlays/{o}" for o in OVERLAYS]

# The settings of `pathguard serve` that the manifests and the image must agree on.
SERVER_KEYS = ("port", "metrics_port", "grace_period")


# ---------------------------------------------------------------------------------------------- helpers


@cache
def render(name: str) -> tuple[dict, ...]:
    return tuple(_kustomize(KUSTOMIZATIONS[name]))


def _kustomize(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is not installed; `make tools` installs it"
    proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert docs, f"kubectl kustomize {path} rendered nothing"
    return docs


def objects(name: str, kind: str) -> list[dict]:
    return [d for d in render(name) if d["kind"] == kind]


def one(name: str, kind: str, obj_name: str | None = None) -> dict:
    found = [d for d in objects(name, kind) if obj_name is None or d["metadata"]["name"] == obj_name]
    assert len(found) == 1, f"{name}: expected one {kind} {obj_name or ''}, found {len(found)}"
    return found[0]


def pod_templates(name: str) -> list[tuple[str, dict]]:
    """Pod templates of workloads; a KServe ServingRuntime's containers as a template of their own."""
    out = [
        (f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"])
        for d in render(name)
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")
    ]
    return out + [
        (f"ServingRuntime/{d['metadata']['name']}", {"spec": {"containers": d["spec"]["containers"]}})
        for d in render(name)
        if d["kind"] == "ServingRuntime"
    ]


def env_of(name: str, container: dict) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps, then env values."""
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        cm_name = src["configMapRef"]["name"]
        env.update(one(name, "ConfigMap", cm_name)["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


def server(name: str) -> tuple[dict, dict, dict[str, str]]:
    """(Deployment, server container, its resolved environment) of a serving overlay."""
    deploy = one(name, "Deployment", "pathguard")
    (container,) = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "server"]
    return deploy, container, env_of(name, container)


def container_port(container: dict, port_name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == port_name]
    return port


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command/args; an unknown variable is left as is, like the kubelet."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), arg)


_SUFFIX = {
    "m": 1e-3,
    "": 1,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def quantity(value: str | int | float) -> float:
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert m and m[2] in _SUFFIX, f"unparsable quantity {value!r}"
    return float(m[1]) * _SUFFIX[m[2]]


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are checked here: {selector}"
    match = selector.get("matchLabels", {})
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


@pytest.fixture(scope="session")
def subcommands() -> dict[str, argparse.ArgumentParser]:
    """`pathguard`'s subcommand parsers, from the build_parser() of the module the console script runs."""
    import importlib

    module = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["pathguard"].partition(":")[0]
    build_parser = importlib.import_module(module).build_parser
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def serve_config_defaults() -> dict[str, object]:
    """Field defaults of service.config.ServeConfig (the server's settings)."""
    from service.config import ServeConfig

    return {f.name: f.default for f in dataclasses.fields(ServeConfig)}


@pytest.fixture(scope="session")
def server_defaults() -> dict[str, float]:
    """gRPC port, metrics port and drain grace of `pathguard serve` (ServeConfig, else issue 5's contract)."""
    fields = serve_config_defaults()
    return {key: fields[key] for key in SERVER_KEYS}


# ----------------------------------------------------------------------------- rendering and validation

EXPECTED_KINDS = {
    "base": {
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
    },
    "overlays/dev": {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
    },
    "overlays/prod": {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
    },
    "overlays/cpu-autoscaling": {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
    },
    "eval": {"ConfigMap", "PersistentVolumeClaim", "Job"},
    "prometheus-adapter": {"ConfigMap"},
    "kserve": {"ServingRuntime", "InferenceService"},
}


def test_dev_and_prod_overlays_exist():
    assert {"dev", "prod"} <= set(OVERLAYS)
    assert set(KUSTOMIZATIONS) <= set(EXPECTED_KINDS), "a new overlay needs its expected kinds listed here"


def validate(doc: dict) -> None:
    """Raise if doc is invalid: custom resources against the repo's schemas (a KServe runtime's containers
    also against Kubernetes' Container schema, inside a Pod), the rest against Kubernetes'."""
    if doc["kind"] in CRD_SCHEMAS:
        schema = json.loads(CRD_SCHEMAS[doc["kind"]].read_text())
        jsonschema.Draft202012Validator(schema).validate(doc)
        if doc["kind"] == "ServingRuntime":
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "runtime"},
                "spec": {"containers": doc["spec"]["containers"]},
            }
            kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    else:
        # strict: unknown fields are errors. A kind without a schema raises SchemaNotFoundError (no silent pass).
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_renders_and_validates(name):
    docs = render(name)
    assert {d["kind"] for d in docs} == EXPECTED_KINDS[name]
    errors = []
    for doc in docs:
        try:
            validate(doc)
        except (jsonschema.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
            where = "/".join(str(p) for p in getattr(exc, "absolute_path", []))
            errors.append(f"{doc['kind']}/{doc['metadata']['name']} at {where}: {getattr(exc, 'message', exc)}")
    assert not errors, "\n".join(errors)


def test_servicemonitor_schema_is_derived_from_upstream_and_valid():
    schema = json.loads(SERVICEMONITOR_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert "monitoring.coreos.com_servicemonitors.yaml" in schema["$comment"]
    assert schema["$defs"]["spec"]["required"] == ["endpoints", "selector"]


def test_validation_rejects_broken_objects():
    """The validators have teeth: typos and bad values in rendered objects are caught."""
    deploy = copy.deepcopy(one("overlays/prod", "Deployment"))
    deploy["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(jsonschema.ValidationError):
        validate(deploy)
    deploy = copy.deepcopy(one("overlays/prod", "Deployment"))
    deploy["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(jsonschema.ValidationError):
        validate(deploy)

    good = one("overlays/prod", "ServiceMonitor")
    validate(good)
    for breakage in (
        lambda s: s["spec"]["endpoints"][0].update(interval="15 seconds"),
        lambda s: s["spec"]["endpoints"][0].update(sheme="http"),
        lambda s: s["spec"].pop("selector"),
        lambda s: s.update(apiVersion="monitoring.coreos.com/v1alpha1"),
    ):
        sm = copy.deepcopy(good)
        breakage(sm)
        with pytest.raises(jsonschema.ValidationError):
            validate(sm)


# ------------------------------------------------------------------------------- serving invariants


@pytest.mark.parametrize("name", SERVING)
def test_ports_match_the_server(name, server_defaults):
    _, container, env = server(name)
    grpc, metrics = server_defaults["port"], server_defaults["metrics_port"]
    assert container_port(container, "grpc") == grpc
    assert container_port(container, "metrics") == metrics
    # The ConfigMap tells the server where to listen: the same ports.
    assert int(env["PATHGUARD_PORT"]) == grpc
    assert int(env["PATHGUARD_METRICS_PORT"]) == metrics
    annotations = one(name, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == metrics

    from service.server import LIVENESS_SERVICE

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container[probe]
        assert set(spec) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, f"{probe} must be a gRPC probe"
        assert spec["grpc"]["port"] == grpc, probe
        # readiness is the server's overall health (""); liveness its own service, which the watchdog turns
        # NOT_SERVING only when the worker cannot recover
        want = LIVENESS_SERVICE if probe == "livenessProbe" else ""
        assert spec["grpc"].get("service", "") == want, f"{probe}: health service should be {want!r}"
    assert env["PATHGUARD_HOST"] == "0.0.0.0", "in a pod the server must listen on all interfaces"

    services = {s["metadata"]["name"]: s for s in objects(name, "Service")}
    assert "pathguard" in services
    for svc in services.values():
        for port in svc["spec"]["ports"]:
            target = port["targetPort"]
            target = container_port(container, target) if isinstance(target, str) else target
            assert target == {"grpc": grpc, "metrics": metrics}[port["name"]], (svc["metadata"]["name"], port)
    primary = {p["name"]: p["port"] for p in services["pathguard"]["spec"]["ports"]}
    assert primary == {"grpc": grpc, "metrics": metrics}


@pytest.mark.parametrize("name", SERVING)
def test_grace_periods_are_ordered(name):
    deploy, container, env = server(name)
    # Explicit in the ConfigMap, so that the budget below is computed from what the server really uses.
    grace = float(env["PATHGUARD_GRACE_PERIOD"])
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep = int(pre_stop["sleep"]["seconds"])
    else:
        cmd = pre_stop["exec"]["command"]
        assert cmd[0] == "sleep", f"preStop should only wait for endpoint removal: {cmd}"
        sleep = int(cmd[1])
    assert sleep >= 1
    budget = deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # The kubelet's budget covers preStop and then the server's drain; SIGKILL must come after both.
    assert budget > sleep + grace, f"terminationGracePeriodSeconds={budget} <= preStop {sleep} + drain {grace}"
    # A draining server answers NOT_SERVING; liveness must not kill it before the drain ends.
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > sleep + grace


@pytest.mark.parametrize("name", SERVING)
def test_threads_follow_the_cpu_limit(name):
    _, container, _ = server(name)
    env = {v["name"]: v for v in container["env"]}
    for var in ("PATHGUARD_THREADS", "OMP_NUM_THREADS"):
        ref = env[var]["valueFrom"]["resourceFieldRef"]
        assert ref["resource"] == "limits.cpu" and ref.get("containerName", "server") == "server", var
        assert quantity(ref.get("divisor", "1")) == 1, f"{var} must count whole CPUs"
    # Threads are sized for the limit; with requests == limits they get those CPUs.
    res = container["resources"]
    assert quantity(res["requests"]["cpu"]) == quantity(res["limits"]["cpu"])


@pytest.mark.parametrize("name", SERVING)
def test_config_keys_are_server_flags(name):
    _, _, env = server(name)
    flags = set(serve_config_defaults())
    keys = {k for k in env if k.startswith("PATHGUARD_")}
    unknown = {k for k in keys if k.removeprefix("PATHGUARD_").lower() not in flags}
    # A misspelt key is silently ignored by the server, which then runs on its default.
    assert not unknown, f"not `pathguard serve` flags: {sorted(unknown)}"
    assert {"PATHGUARD_PORT", "PATHGUARD_METRICS_PORT", "PATHGUARD_GRACE_PERIOD", "PATHGUARD_BUNDLE"} <= keys


@pytest.mark.parametrize("name", SERVING)
def test_hpa_targets_the_deployment(name):
    hpa = one(name, "HorizontalPodAutoscaler")
    deploy = one(name, "Deployment")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", deploy["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # The HPA owns the replica count; a value in the manifest would reset it on every apply.
    assert "replicas" not in deploy["spec"]
    (metric,) = hpa["spec"]["metrics"]
    if name.endswith("cpu-autoscaling"):  # the fallback: CPU utilization (relative to the CPU request)
        assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
        return
    # calls in flight per pod, served by prometheus-adapter's rule under the name the HPA asks for
    from service.metrics import INFLIGHT

    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    assert metric["pods"]["metric"]["name"] in adapter_metrics()
    assert adapter_metrics()[metric["pods"]["metric"]["name"]] == INFLIGHT._name
    assert 1 <= quantity(metric["pods"]["target"]["averageValue"])


def adapter_metrics() -> dict[str, str]:
    """prometheus-adapter's rules: {name served to the HPA: Prometheus series it reads}."""
    (cm,) = objects("prometheus-adapter", "ConfigMap")
    config = yaml.safe_load(cm["data"]["config.yaml"])
    out = {}
    for rule in config["rules"]:
        series = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"])[1]
        assert re.fullmatch(rule["name"]["matches"], series), rule
        assert {"<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"} <= set(
            re.findall(r"<<\.[A-Za-z]+>>", rule["metricsQuery"])
        ), rule
        # per pod: the series' namespace and pod labels map to those resources
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}, (
            rule
        )
        out[rule["name"]["as"]] = series
    return out


@pytest.mark.parametrize("name", SERVING)
def test_server_env_spins_no_openmp_threads(name):
    _, container, env = server(name)
    values = {v["name"]: v.get("value") for v in container["env"]}
    assert values.get("OMP_WAIT_POLICY") == "PASSIVE"


@pytest.mark.parametrize("name", SERVING)
def test_selectors_match_the_server_pods(name):
    deploy = one(name, "Deployment")
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert selects(deploy["spec"]["selector"], labels)
    assert selects(one(name, "PodDisruptionBudget")["spec"]["selector"], labels)
    assert selects(one(name, "NetworkPolicy")["spec"]["podSelector"], labels)
    for svc in objects(name, "Service"):
        assert selects({"matchLabels": svc["spec"]["selector"]}, labels), svc["metadata"]["name"]

    policy = one(name, "NetworkPolicy")
    opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}
    assert {"grpc", "metrics"} <= opened

    for sm in objects(name, "ServiceMonitor"):
        chosen = [s for s in objects(name, "Service") if selects(sm["spec"]["selector"], s["metadata"]["labels"])]
        assert len(chosen) == 1, "the ServiceMonitor should scrape each pod once, through one Service"
        port_names = {p["name"] for p in chosen[0]["spec"]["ports"]}
        for endpoint in sm["spec"]["endpoints"]:
            assert endpoint["port"] == "metrics" and endpoint["port"] in port_names
            assert endpoint.get("path", "/metrics") == "/metrics"


# -------------------------------------------------------------- invariants of every pod (server and eval)

WORKLOADS = [k for k in KUSTOMIZATIONS if k != "prometheus-adapter"]  # kustomizations that run pods


@pytest.mark.parametrize("name", WORKLOADS)
def test_every_container_has_requests_and_limits(name):
    templates = pod_templates(name)
    assert templates
    for where, template in templates:
        spec = template["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            res = c.get("resources", {})
            for resource in ("cpu", "memory"):
                req, lim = res.get("requests", {}).get(resource), res.get("limits", {}).get(resource)
                assert req is not None and lim is not None, f"{where}/{c['name']}: {resource} request and limit"
                assert quantity(req) <= quantity(lim), f"{where}/{c['name']}: {resource} request > limit"


@pytest.mark.parametrize("name", [k for k in WORKLOADS if k != "kserve"])  # KServe: test_kserve_*
def test_pods_run_hardened_as_the_image_user(name):
    uid, _ = dockerfile_user()
    for where, template in pod_templates(name):
        spec = template["spec"]
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, where
        assert pod_sc.get("runAsUser") == uid, f"{where}: runAsUser should be the image's user {uid}"
        assert spec.get("automountServiceAccountToken") is False, where
        tmp_volumes = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            at = f"{where}/{c['name']}"
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, at
            assert sc.get("runAsUser", pod_sc.get("runAsUser")) not in (None, 0), at
            assert sc.get("readOnlyRootFilesystem") is True, at
            assert sc.get("allowPrivilegeEscalation") is False, at
            assert sc.get("privileged", False) is False, at
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], at
            assert not sc.get("capabilities", {}).get("add"), at
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", at
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert mounts.get("/tmp") in tmp_volumes, f"{at}: /tmp must be a writable emptyDir"


# ------------------------------------------------------------------------------- sharded evaluation


def eval_jobs() -> tuple[dict, dict]:
    jobs = {j["spec"].get("completionMode", "NonIndexed"): j for j in objects("eval", "Job")}
    assert set(jobs) == {"Indexed", "NonIndexed"}, "one Indexed shard Job and one merge Job"
    return jobs["Indexed"], jobs["NonIndexed"]


def job_container(job: dict) -> dict:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return c


def flag(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"{name} should appear once in {args}"
    return args[args.index(name) + 1]


def test_indexed_job_runs_one_shard_per_completion():
    shards, _ = eval_jobs()
    spec = shards["spec"]
    args = job_container(shards)["args"]
    assert args[0] == "evaluate" and "merge" not in args
    index, _, total = flag(args, "--shard").partition("/")
    assert index == "$(JOB_COMPLETION_INDEX)"
    assert spec["completions"] == spec["parallelism"] == int(total)
    env = env_of("eval", job_container(shards))
    assert int(env["PATHGUARD_EVAL_SHARDS"]) == int(total)
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert "suspend" not in spec or spec["suspend"] is False


def test_shard_count_is_set_in_one_place(tmp_path):
    """Changing PATHGUARD_EVAL_SHARDS changes completions, parallelism and --shard's N together."""
    copied = tmp_path / "eval"
    shutil.copytree(K8S / "eval", copied)
    env_file = copied / "eval.env"
    text, n = re.subn(r"(?m)^PATHGUARD_EVAL_SHARDS=\d+$", "PATHGUARD_EVAL_SHARDS=7", env_file.read_text())
    assert n == 1
    env_file.write_text(text)
    (job,) = [d for d in _kustomize(copied) if d["kind"] == "Job" and d["spec"].get("completionMode") == "Indexed"]
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 7
    assert flag(job_container(job)["args"], "--shard") == "$(JOB_COMPLETION_INDEX)/7"


def test_merge_job_reads_what_the_shards_wrote():
    shards, merge = eval_jobs()
    # Released after the shard Job completes (README); never starts on its own.
    assert merge["spec"]["suspend"] is True
    assert merge["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    sc, mc = job_container(shards), job_container(merge)
    assert sc["image"] == mc["image"]
    assert mc["args"][:2] == ["evaluate", "merge"]

    pvcs = {p["metadata"]["name"]: p for p in objects("eval", "PersistentVolumeClaim")}
    resolved = {}
    for job, c in ((shards, sc), (merge, mc)):
        volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
        env = {**env_of("eval", c), "JOB_COMPLETION_INDEX": "0"}
        args = [expand(a, env) for a in c["args"]]
        assert not [a for a in args if "$(" in a], f"unresolved variables in {c['name']}: {args}"
        out = flag(args, "--out")
        (mount,) = [m for m in c["volumeMounts"] if out.startswith(m["mountPath"].rstrip("/") + "/")]
        claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        # Shard pods run on several nodes at once and all write to this volume.
        assert "ReadWriteMany" in pvcs[claim]["spec"]["accessModes"]
        resolved[c["name"]] = (
            claim,
            mount["mountPath"],
            {f: flag(args, f) for f in ("--bundle", "--attacks", "--detectors", "--n", "--out")},
        )
    assert resolved[sc["name"]] == resolved[mc["name"]], "shards and merge must share the volume and the flags"


def test_eval_commands_parse_with_the_cli(subcommands):
    shards, merge = eval_jobs()
    n = shards["spec"]["completions"]
    commands = []
    for job in (shards, merge):
        c = job_container(job)
        env = {**env_of("eval", c), "JOB_COMPLETION_INDEX": str(n - 1)}
        commands.append([expand(a, env) for a in c["args"]])
    shard_args, merge_args = commands
    parser = subcommands["evaluate"]
    try:
        ns = parser.parse_args(shard_args[1:])
        merged = parser.parse_args(merge_args[1:])
    except SystemExit as exc:  # argparse reports the bad flag on stderr
        pytest.fail(f"`pathguard evaluate` rejects the Job's arguments (exit {exc.code})")
    assert ns.shard == (n - 1, n)
    assert ns.out == merged.out == flag(shard_args, "--out")
    assert merged.shard is None


# ------------------------------------------------------------------------------------------ Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, rest = buf.partition(" ")
        out.append((op.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def dockerfile_stages() -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """Global ARG defaults, and the instructions of each stage (starting with its FROM)."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    known = {
        "FROM",
        "ARG",
        "ENV",
        "RUN",
        "COPY",
        "ADD",
        "WORKDIR",
        "USER",
        "EXPOSE",
        "ENTRYPOINT",
        "CMD",
        "LABEL",
        "HEALTHCHECK",
        "STOPSIGNAL",
        "VOLUME",
        "SHELL",
        "ONBUILD",
    }
    assert {op for op, _ in instructions} <= known, "unknown Dockerfile instruction"
    global_args, stages = {}, []
    for op, rest in instructions:
        if op == "FROM":
            stages.append([])
        if not stages:
            assert op == "ARG", "only ARG may come before the first FROM"
            key, _, value = rest.partition("=")
            global_args[key] = value.strip('"')
            continue
        stages[-1].append((op, rest))
    return global_args, stages


def stage_names() -> dict[str, list[tuple[str, str]]]:
    """Named stages (``FROM ... AS name``) and their instructions."""
    return {
        stage[0][1].split()[-1]: stage
        for stage in dockerfile_stages()[1]
        if len(stage[0][1].split()) == 3 and stage[0][1].split()[1].upper() == "AS"
    }


def target(name: str = "server") -> list[tuple[str, str]]:
    """The instructions of a build target (``server``: the Deployment's image; ``eval``: the Jobs')."""
    stages = stage_names()
    assert name in stages, f"no stage {name!r} in the Dockerfile"
    return stages[name]


def exec_form(stage: list[tuple[str, str]], op: str) -> list[str]:
    values = [rest for o, rest in stage if o == op]
    assert values, f"no {op} in the stage"
    parsed = json.loads(values[-1])
    assert isinstance(parsed, list), f"{op} must use the exec (JSON) form so pathguard gets SIGTERM as PID 1"
    return parsed


def dockerfile_env(name: str = "server") -> dict[str, str]:
    """ENV of a target, including what it inherits from the stages it is built FROM."""
    stages = stage_names()
    parent = target(name)[0][1].split()[0]
    env = dockerfile_env(parent) if parent in stages else {}
    for op, rest in target(name):
        if op == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def dockerfile_user(name: str = "server") -> tuple[int, int]:
    users = [rest for op, rest in target(name) if op == "USER"]
    assert users, f"the image must not run as root: no USER in the {name} stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), "USER must be numeric so that Kubernetes can verify runAsNonRoot"
    return int(uid), int(gid or uid)


def copies(stage: list[tuple[str, str]]) -> list[tuple[list[str], str, dict[str, str]]]:
    out = []
    for op, rest in stage:
        if op == "COPY":
            words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
            opts = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
            paths = [w for w in words if not w.startswith("--")]
            out.append((paths[:-1], paths[-1], opts))
    return out


def test_dockerfile_is_multistage_with_a_supported_python():
    global_args, stages = dockerfile_stages()
    assert len(stages) >= 2, "build tools and pip caches stay in a builder stage"
    requires = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    names = stage_names()
    for stage in stages:
        image = stage[0][1].split()[0]
        if image in names:
            continue  # built on an earlier stage
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args[m[1]], image)
        m = re.match(r"python:(\d+\.\d+)", image)
        assert m, f"base image {image} is not an official python image"
        assert m[1] + ".0" in requires, f"{image} does not satisfy requires-python {requires}"
    # Each image takes its environment from a builder stage, not the network.
    for name in ("server", "eval"):
        assert any(opts.get("from") for _, _, opts in copies(target(name))), name


def test_dockerfile_installs_cpu_torch_as_the_makefile_pins_it():
    runs = " ".join(rest for stage in dockerfile_stages()[1] for op, rest in stage if op == "RUN")
    assert re.search(r"\$\{?TORCH_PIP_ARGS\}? \$\{?TORCH_SPEC", runs)
    assert re.search(r"\$\{?EVAL_TORCH_PIP_ARGS\}? \$\{?EVAL_TORCH_SPEC", runs)
    builder_args = {
        r.partition("=")[0]: r.partition("=")[2].strip('"')
        for stage in dockerfile_stages()[1]
        for op, r in stage
        if op == "ARG"
    }
    assert (
        builder_args["TORCH_PIP_ARGS"]
        == builder_args["EVAL_TORCH_PIP_ARGS"]
        == "--index-url https://download.pytorch.org/whl/cpu"
    )
    makefile = (ROOT / "Makefile").read_text()
    (make_spec,) = re.findall(r"(?m)^TORCH_SPEC \?= (.+)$", makefile)
    assert builder_args["EVAL_TORCH_SPEC"] == make_spec.strip()
    # The server gets the same torch without torchvision, which it never imports.
    assert builder_args["TORCH_SPEC"] == make_spec.split()[0]
    assert set(builder_args["OFFLINE_ONLY"].split()) == {"torchvision", "torchattacks", "matplotlib"}


def test_dockerfile_runs_the_console_script_as_non_root(subcommands):
    for name in ("server", "eval"):
        uid, gid = dockerfile_user(name)
        assert uid != 0 and gid != 0
        assert exec_form(target(name), "ENTRYPOINT") == ["pathguard"], name
    stage = target("server")
    entrypoint = exec_form(stage, "ENTRYPOINT")
    # The entrypoint is the console script pyproject declares, and its target exists.
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts[entrypoint[0]].partition(":")
    source = ROOT / (module.replace(".", "/") + ".py")
    tree = ast.parse(source.read_text())
    assert func in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, f"{module}:{func} not found"
    cmd = exec_form(stage, "CMD")
    assert cmd == ["serve"]
    assert cmd[0] in subcommands
    # Every Job/Deployment runs a pathguard subcommand through this entrypoint.
    for name in KUSTOMIZATIONS:
        for where, template in pod_templates(name):
            for c in template["spec"]["containers"]:
                assert "command" not in c, f"{where}: keep the image's ENTRYPOINT"
                assert c["args"][0] in subcommands, where


def test_dockerfile_ports_and_env_match_the_server(server_defaults):
    stage = target("server")
    exposed = {int(p.split("/")[0]) for op, rest in stage if op == "EXPOSE" for p in rest.split()}
    assert exposed == {server_defaults["port"], server_defaults["metrics_port"]}
    env = dockerfile_env("server")
    assert int(env["PATHGUARD_PORT"]) == server_defaults["port"]
    assert int(env["PATHGUARD_METRICS_PORT"]) == server_defaults["metrics_port"]
    assert float(env["PATHGUARD_GRACE_PERIOD"]) == server_defaults["grace_period"]
    assert env["PATHGUARD_HOST"] == "0.0.0.0"
    for name in ("server", "eval"):
        env = dockerfile_env(name)
        # With a read-only root filesystem, only /tmp is writable.
        assert env["HOME"].startswith("/tmp") and env["MPLCONFIGDIR"].startswith("/tmp"), name
        assert env["OMP_WAIT_POLICY"] == "PASSIVE", name


def test_default_bundle_is_baked_where_the_config_points():
    bundle = dockerfile_env()["PATHGUARD_BUNDLE"]
    bundle_copies = [(srcs, dest) for srcs, dest, opts in copies(target("server")) if "from" not in opts]
    assert (["models/default"], bundle) in [(s, d.rstrip("/")) for s, d in bundle_copies]
    # The Makefile serves the same bundle locally.
    assert re.search(r"(?m)^BUNDLE \?= models/default$", (ROOT / "Makefile").read_text())
    # Manifests point at the baked-in copy unless a volume overrides it.
    for name in SERVING:
        assert server(name)[2]["PATHGUARD_BUNDLE"] == bundle
    shards, merge = eval_jobs()
    assert env_of("eval", job_container(shards))["PATHGUARD_EVAL_BUNDLE"] == bundle


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        alternatives = {pat, pat.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(p, a) for p in prefixes for a in alternatives):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_what_the_image_copies():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    sources = [
        s for stage in dockerfile_stages()[1] for srcs, _, opts in copies(stage) if "from" not in opts for s in srcs
    ]
    assert sources
    for src in sources:
        assert not dockerignored(src, patterns), f"COPY {src} is excluded by .dockerignore"
        if not src.startswith("models/"):  # models/default is produced by training, not kept in git here
            assert (ROOT / src).exists(), f"COPY source {src} does not exist"
    assert not dockerignored("pathguard/main.py", patterns)
    assert not dockerignored("models/default/bundle.json", patterns)
    for junk in (
        ".venv/bin/python",
        ".git/HEAD",
        "runs/dense/train_log.jsonl",
        "tests/test_deploy.py",
        "detector/__pycache__/cli.cpython-311.pyc",
        "models/other/bundle.json",
    ):
        assert dockerignored(junk, patterns), f"{junk} would be sent to the Docker daemon"


# ---------------------------------------------------------------------------------------------- README


def test_readme_documents_existing_paths_and_the_build_command():
    readme = (DEPLOY / "README.md").read_text()
    assert "docker build -f deploy/docker/Dockerfile" in readme
    referenced = set(re.findall(r"(?<![\w/-])deploy/[\w./-]*\w", readme))
    assert referenced
    missing = sorted(p for p in referenced if not (ROOT / p).exists())
    assert not missing, f"README refers to missing paths: {missing}"
    for step in (
        "kubectl apply -k deploy/k8s/overlays/",
        "kubectl wait",
        "suspend",
        "PATHGUARD_BUNDLE",
        "/metrics",
        "HorizontalPodAutoscaler",
    ):
        assert step in readme, step


# ---------------------------------------------------------------------------- memory, faults, KServe


def idle_rss_bytes() -> int:
    """The idle server's resident memory, as measured by bench/flood.py (reports/service/flood.json)."""
    report = json.loads((ROOT / "reports" / "service" / "flood.json").read_text())
    return int(report["idle_rss_mb"] * 2**20)


@pytest.mark.parametrize("name", SERVING)
def test_memory_limit_holds_the_idle_server_and_the_request_budget(name):
    """limit >= idle server + what requests in flight may hold (request_memory_bound for the bundle the
    pod serves, with the pod's settings) + slack: a flood is refused, never OOM-killed."""
    from pathguard.options import config_from
    from service.config import ServeConfig
    from service.server import request_memory_bound

    _, container, env = server(name)
    cfg = config_from(
        ServeConfig,
        None,
        {
            k: v
            for k, v in env.items()
            if k.startswith("PATHGUARD_") and k not in ("PATHGUARD_BUNDLE", "PATHGUARD_THREADS")
        },
    )
    shape = tuple(json.loads((ROOT / "models" / "default" / "bundle.json").read_text())["input_shape"])
    need = idle_rss_bytes() + request_memory_bound(cfg, shape) + (128 << 20)
    limit = quantity(container["resources"]["limits"]["memory"])
    assert limit >= need, f"memory limit {limit / 2**20:.0f} MiB < {need / 2**20:.0f} MiB needed"


def test_eval_jobs_stop_on_configuration_errors_and_ignore_disruptions():
    for job in eval_jobs():
        spec = job["spec"]
        assert spec["template"]["spec"]["restartPolicy"] == "Never"  # required by podFailurePolicy
        rules = spec["podFailurePolicy"]["rules"]
        container = job_container(job)["name"]
        fail = [r for r in rules if r["action"] == "FailJob"]
        assert fail and fail[0]["onExitCodes"] == {"containerName": container, "operator": "In", "values": [2]}
        ignore = [r for r in rules if r["action"] == "Ignore"]
        assert ignore and ignore[0]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]


def kserve() -> tuple[dict, dict, dict]:
    """(ServingRuntime, InferenceService, the runtime's container)."""
    runtime, isvc = one("kserve", "ServingRuntime"), one("kserve", "InferenceService")
    (container,) = runtime["spec"]["containers"]
    return runtime, isvc, container


def test_kserve_runtime_runs_pathguard_serve_for_the_inference_service(subcommands, server_defaults):
    runtime, isvc, container = kserve()
    model = isvc["spec"]["predictor"]["model"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"] and model["protocolVersion"] == "grpc-v2"
    formats = {(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"].get("version")) in formats
    assert re.match(r"^[a-z0-9]+://", model["storageUri"])
    # the args parse with the real CLI; the model is named after the InferenceService and read from the
    # storage initializer's mount
    args = subcommands["serve"].parse_args(container["args"][1:])
    assert container["args"][0] == "serve"
    assert args.model_name == "{{.Name}}" and args.bundle == "/mnt/models" and args.host == "0.0.0.0"
    port = int(args.port)
    assert port == server_defaults["port"]
    (grpc_port,) = container["ports"]
    assert grpc_port == {"name": "h2c", "containerPort": port, "protocol": "TCP"}  # h2c: KServe routes HTTP/2
    annotations = runtime["spec"]["annotations"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert int(annotations["prometheus.kserve.io/port"]) == int(args.metrics_port)
    assert annotations["prometheus.kserve.io/path"] == "/metrics"
    env = {v["name"]: v for v in container["env"]}
    assert env["OMP_WAIT_POLICY"]["value"] == "PASSIVE"
    assert env["PATHGUARD_THREADS"]["valueFrom"]["resourceFieldRef"]["containerName"] == container["name"]


def test_kserve_probes_are_plaintext_http_beside_the_metrics():
    _, _, container = kserve()
    metrics_port = int(next(a for a in container["args"] if a.startswith("--metrics-port=")).split("=")[1])
    paths = {probe: container[probe]["httpGet"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {p["port"] for p in paths.values()} == {metrics_port}
    assert [paths[p]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")] == [
        "/readyz",
        "/readyz",
        "/healthz",
    ]
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] == dockerfile_user()[0] and sc["readOnlyRootFilesystem"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]


def test_kserve_schemas_have_teeth():
    runtime, isvc, _ = kserve()
    for doc, breakage in (
        (runtime, lambda d: d["spec"].update(protocolVersion=["grpc-v2"])),
        (runtime, lambda d: d["spec"]["containers"][0].update(livenesProbe={})),
        (isvc, lambda d: d["spec"]["predictor"]["model"].update(storageURI="s3://x")),
        (isvc, lambda d: d["spec"]["predictor"]["model"].update(protocolVersion="grpc")),
    ):
        broken = copy.deepcopy(doc)
        breakage(broken)
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)


def test_grafana_dashboard_queries_the_metrics_the_server_exports():
    """Every series a panel queries is one the server exports (or a histogram's bucket/sum/count of one),
    and every label it groups by is one of that series' labels or one Prometheus adds when scraping."""
    from prometheus_client import generate_latest

    from service import metrics

    metrics.set_model_info("m", "1", "vgg8", 0.5, ("a", "b"))  # creates the per-class children
    metrics.REQUESTS.labels(method="x", code="OK")  # labelled families appear once a child exists
    metrics.REQUEST_DURATION.labels(method="x", code="OK")
    exported: dict[str, set[str]] = {}
    for line in generate_latest(metrics.REGISTRY).decode().splitlines():
        if line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?", line)
            exported.setdefault(m[1], set()).update(re.findall(r'([a-z_]+)="', m[2] or ""))
    scrape_labels = {"namespace", "pod", "le", "job", "instance"}
    dashboard = json.loads((DEPLOY / "grafana" / "pathguard.json").read_text())
    assert dashboard["uid"] and dashboard["panels"]
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            names = set(re.findall(r"\b((?:pathguard|process)_[a-z_]+)\b", expr))
            assert names, f"{panel['title']}: no PathGuard metric in {expr}"
            for name in names:
                assert name in exported, f"{panel['title']}: {name} is not exported by the server"
                grouped = {g.strip() for by in re.findall(r"by \(([^)]*)\)", expr) for g in by.split(",")}
                assert grouped <= exported[name] | scrape_labels, f"{panel['title']}: {grouped} on {name}"
            queried |= names
    # the autoscaler's metric and the error counter are on the dashboard
    assert {"pathguard_inflight_requests", "pathguard_requests_total"} <= queried
