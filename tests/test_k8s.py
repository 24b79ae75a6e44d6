"""The serving image and the Kubernetes manifests (deploy/docker, deploy/k8s), checked offline.

Every manifest is valid for the Kubernetes API it targets: built-in kinds against the OpenAPI schema that
kubernetes-validate bundles (strict: unknown fields are errors, as `kubectl apply` treats them by default), custom
resources (ServiceMonitor, KEDA ScaledObject, Argo Rollouts' Rollout and AnalysisTemplate) against their CRDs'
published schemas vendored in tests/schemas/, made strict the same way; a broken copy fails. The kustomizations
render (`kubectl kustomize`, when kubectl is installed) into objects that validate too. Then what a schema cannot
see: the probes hit routes the server has, on the port it listens on; the grace period outlasts preStop + drain;
the autoscaler's metrics are gauges the server exports; the image installs no torch, with the lock's versions, and
ships what it copies; the Argo Rollouts canary runs the Deployment's pod template and judges the rollout flow's
PromQL with params.yaml's thresholds.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
DOCKER = REPO / "deploy" / "docker"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
K8S_VERSION = "1.30"  # the oldest Kubernetes these manifests promise to work on
NOT_MANIFESTS = {"kustomization.yaml", "kustomizeconfig.yaml", "params.yaml"}
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name not in NOT_MANIFESTS)
KUSTOMIZATIONS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def load_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    """Every object in every manifest file (not rendered)."""
    return [d for p in MANIFESTS for d in load_docs(p.read_text())]


# --- schema validation --------------------------------------------------------------------------------------------

def _strict(schema: dict) -> dict:
    """A structural CRD schema as the API server applies it with field validation Strict: an object that lists its
    properties (and does not preserve unknown fields) admits no others. The vendored files stay as published."""
    schema = dict(schema)
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    for key in ("properties", "patternProperties"):
        if key in schema:
            schema[key] = {k: _strict(v) for k, v in schema[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            schema[key] = _strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [_strict(s) for s in schema[key]]
    return schema


def _crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    validators = {}
    for path in sorted(SCHEMAS.glob("*.json")):
        schema = json.loads(path.read_text())
        (gvk,) = schema["x-kubernetes-group-version-kind"]
        strict = _strict(schema)
        jsonschema.Draft202012Validator.check_schema(strict)
        validators[f"{gvk['group']}/{gvk['version']}", gvk["kind"]] = jsonschema.Draft202012Validator(strict)
    return validators


CRDS = _crd_validators()


def validation_error(doc: dict) -> str | None:
    """None if `doc` is a valid object of its apiVersion/kind; else the first error, one line."""
    crd = CRDS.get((doc.get("apiVersion"), doc.get("kind")))
    if crd is not None:
        error = jsonschema.exceptions.best_match(crd.iter_errors(doc))
        if error is not None:
            return f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message[:200]}"
        # a CRD's schema leaves metadata to the API server: check it as the ObjectMeta of a built-in kind
        doc = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata")}
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:200]}"
    except kubernetes_validate.SchemaNotFoundError as e:
        return f"no schema: {e.message}"  # a kind nobody checks is a failure, not a pass
    return None


def test_crd_schemas_are_the_vendored_ones():
    assert set(CRDS) == {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject"),
                         ("argoproj.io/v1alpha1", "Rollout"), ("argoproj.io/v1alpha1", "AnalysisTemplate")}
    for path in SCHEMAS.glob("*.json"):
        assert "github.com/" in json.loads(path.read_text())["$comment"], path  # names its source


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_is_valid(path):
    objects = load_docs(path.read_text())
    assert objects, f"{path}: no objects"
    for doc in objects:
        assert validation_error(doc) is None, f"{path.name} {doc.get('kind')}: {validation_error(doc)}"


def _render(directory: Path) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return load_docs(out.stdout)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_kustomization_renders_valid_objects(directory):
    objects = _render(directory)
    for doc in objects:
        assert validation_error(doc) is None, f"{doc['kind']}/{doc['metadata']['name']}: {validation_error(doc)}"
    kinds = sorted(d["kind"] for d in objects)
    app = ["ConfigMap", "Deployment", "Namespace", "PersistentVolumeClaim", "PodDisruptionBudget", "Service",
           "ServiceMonitor"]
    canary = [k if k != "Deployment" else "Rollout" for k in app] + ["AnalysisTemplate", "Service", "Service"]
    expected = {"k8s": sorted([*app, "HorizontalPodAutoscaler"]), "base": app,
                "keda": sorted([*app, "ScaledObject"]), "prometheus-adapter": ["ConfigMap"],
                "rollouts": sorted(canary)}
    assert kinds == expected[directory.name], kinds
    # the generated params ConfigMap (name + content hash) is the one the pods mount
    for workload in {"Deployment", "Rollout"} & set(kinds):
        volumes = by_kind(objects, workload)["spec"]["template"]["spec"]["volumes"]
        (params,) = [v["configMap"]["name"] for v in volumes if "configMap" in v]
        assert params == by_kind(objects, "ConfigMap")["metadata"]["name"]
        assert params.startswith("moeops-serve-params-")


def test_every_manifest_is_deployed_by_a_kustomization():
    listed = set()
    for directory in KUSTOMIZATIONS:
        k = yaml.safe_load((directory / "kustomization.yaml").read_text())
        for name in k.get("resources", []):
            assert (directory / name).exists(), f"{directory}/kustomization.yaml: {name} does not exist"
            listed.add((directory / name).resolve())
        for gen in k.get("configMapGenerator", []):
            listed.update((directory / f).resolve() for f in gen.get("files", []))
    orphans = [p for p in MANIFESTS if p.resolve() not in listed and p.parent.name != "tools"]
    assert orphans == []


# a broken copy must fail: (file, kind, breakage, where the error is)
def _set(path: str, value):
    def breakage(doc):
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[last if not last.isdigit() else int(last)] = value
    return breakage


def _rename(path: str, new: str):
    def breakage(doc):
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[new] = node.pop(last)
    return breakage


def _delete(path: str):
    def breakage(doc):
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        del node[last]
    return breakage


CONTAINER = "spec.template.spec.containers.0"
BREAKAGES = [
    ("base/deployment.yaml", _set(f"{CONTAINER}.ports.0.containerPort", "8000"), "containerPort"),
    ("base/deployment.yaml", _rename(f"{CONTAINER}.livenessProbe", "livenesProbe"), "livenesProbe"),
    ("base/deployment.yaml", _delete(f"{CONTAINER}.name"), "'name' is a required property"),
    ("base/deployment.yaml", _set("spec.template.spec.terminationGracePeriodSeconds", "45s"),
     "terminationGracePeriodSeconds"),
    ("base/deployment.yaml", _set("metadata.labelz", {}), "labelz"),
    ("hpa.yaml", _set("spec.minReplicas", "two"), "minReplicas"),
    ("hpa.yaml", _delete("spec.scaleTargetRef"), "'scaleTargetRef' is a required property"),
    ("base/pdb.yaml", _rename("spec.maxUnavailable", "maxUnavailible"), "maxUnavailible"),
    ("base/service.yaml", _set("spec.ports.0.port", "eighty"), "port"),
    ("base/servicemonitor.yaml", _set("spec.endpoints", "http"), "endpoints"),
    ("base/servicemonitor.yaml", _rename("spec.endpoints", "endpoint"), "endpoint"),
    ("base/servicemonitor.yaml", _delete("spec.selector"), "'selector' is a required property"),
    ("base/servicemonitor.yaml", _set("spec.endpoints.0.interval", "15 seconds"), "interval"),
    ("base/servicemonitor.yaml", _set("metadata.name", 7), "name"),
    ("keda/scaledobject.yaml", _delete("spec.scaleTargetRef"), "'scaleTargetRef' is a required property"),
    ("keda/scaledobject.yaml", _set("spec.minReplicaCount", "2"), "minReplicaCount"),
    ("keda/scaledobject.yaml", _rename("spec.triggers", "trigger"), "trigger"),
    ("rollouts/rollout.yaml", _set("spec.strategy.canary.steps.0.setWeight", "10%"), "setWeight"),
    ("rollouts/rollout.yaml", _rename("spec.strategy.canary.canaryService", "canaryServise"), "canaryServise"),
    ("rollouts/rollout.yaml", _rename(f"{CONTAINER}.readinessProbe", "readynessProbe"), "readynessProbe"),
    ("rollouts/analysistemplate.yaml", _rename("spec.metrics.1.successCondition", "succesCondition"),
     "succesCondition"),
    ("rollouts/analysistemplate.yaml", _delete("spec.metrics.1.name"), "'name' is a required property"),
    ("rollouts/analysistemplate.yaml", _set("spec.metrics.1.provider.prometheus.timeout", "30s"), "timeout"),
    ("rollouts/analysistemplate.yaml",
     _rename("spec.metrics.4.provider.job.spec.template.spec.containers.0.command", "comand"), "comand"),
]


@pytest.mark.parametrize("file, breakage, where", BREAKAGES,
                         ids=[f"{f}-{w.split()[0]}" for f, _, w in BREAKAGES])
def test_a_broken_copy_fails_validation(file, breakage, where):
    (doc,) = load_docs((K8S / file).read_text())
    assert validation_error(doc) is None
    broken = copy.deepcopy(doc)
    breakage(broken)
    error = validation_error(broken)
    assert error is not None, f"{file}: {breakage} passed"
    assert where in error, error


# --- the manifests against the server -------------------------------------------------------------------------------

def server_settings(command: list[str], params: Path):
    """What `moeops serve` makes of a command line (flags over params), with `params` read for --params' file."""
    from moeops.serve.server import parse_args, settings

    assert command[:2] == ["moeops", "serve"], command
    args = parse_args(command[2:])
    args.params = str(params)
    return settings(args)


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [ln for ln in (DOCKER / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in text.splitlines() if ln.strip()]


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    return instructions[last_from:]


@pytest.fixture(scope="module")
def container(docs) -> dict:
    (c,) = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


@pytest.fixture(scope="module")
def get_routes() -> set[str]:
    from moeops.serve.app import create_app
    from moeops.serve.router import Router

    app = create_app(Router("moeops"), max_prompt_tokens=127, max_new_tokens=16)
    return {r.path for r in app.routes if "GET" in (getattr(r, "methods", None) or ())}


def test_probes_hit_the_servers_routes_and_port(docs, container, get_routes):
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    probes = {k: container[k]["httpGet"] for k in ("livenessProbe", "readinessProbe", "startupProbe")}
    assert probes["livenessProbe"]["path"] == "/health/live"
    assert probes["readinessProbe"]["path"] == "/health/ready"
    for name, probe in probes.items():
        assert probe["path"] in get_routes, f"{name}: {probe['path']} is not a GET route of the app"
        assert ports.get(probe["port"], probe["port"]) == 8000, name
    # the server listens where the probes knock (the pod's params file is base/params.yaml, via the ConfigMap)
    serve, _, _ = server_settings(container["command"] + container["args"], K8S / "base" / "params.yaml")
    assert (serve.host, serve.port) == ("0.0.0.0", 8000)
    # the Service and the ServiceMonitor reach that port, and /metrics is served
    (service,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "moeops-serve"]
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in ports and service["spec"]["selector"].items() <= \
        by_kind(docs, "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    (endpoint,) = by_kind(docs, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == service_port["name"] and endpoint["path"] in get_routes
    # the image: same port, its healthcheck on a route
    final = _final_stage(_dockerfile())
    (entrypoint,) = [json.loads(a) for ins, a in final if ins == "ENTRYPOINT"]
    serve, root, _ = server_settings(entrypoint, REPO / "params.yaml")  # the image's /app/params.yaml
    assert (serve.host, serve.port, root) == ("0.0.0.0", 8000, Path("/models/registry"))
    assert ("EXPOSE", "8000") in final
    (healthcheck,) = [a for ins, a in final if ins == "HEALTHCHECK"]
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/]+)", healthcheck)
    assert int(url[1]) == 8000 and url[2] == "/health/live" and url[2] in get_routes


def test_probes_see_live_before_ready():
    """What the probes rely on: live at once, ready only once a model is loaded (startupProbe waits for it)."""
    from starlette.testclient import TestClient

    from moeops.serve.app import create_app
    from moeops.serve.router import Router

    client = TestClient(create_app(Router("moeops"), max_prompt_tokens=127, max_new_tokens=16))
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").status_code == 503


def test_grace_period_outlasts_prestop_and_drain(docs, container):
    from moeops.config import load_section

    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and len(sleep) == 2
    for params in (REPO / "params.yaml", K8S / "base" / "params.yaml"):
        drain = load_section("serve", params).drain_timeout_s
        assert pod["terminationGracePeriodSeconds"] > float(sleep[1]) + drain, params


def test_pod_params_fit_the_pod(container):
    """deploy/k8s/base/params.yaml is valid params for the server and matches the pod it runs in."""
    from moeops.config import load_section

    path = K8S / "base" / "params.yaml"
    registry = load_section("registry", path)
    serve, root, name = server_settings(container["command"] + container["args"], path)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert container["args"][container["args"].index("--params") + 1] == "/etc/moeops/params.yaml"
    assert "/etc/moeops" in mounts
    assert root == Path(registry.root) and root.is_relative_to("/models") and name == registry.name == "moeops"
    assert mounts["/models"]["readOnly"] is True  # the server only reads the registry
    # the root filesystem is read-only: the graph cache must sit on a writable mount
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    (cache_mount,) = [m for m in mounts if Path(serve.cache_dir).is_relative_to(m)]
    assert not mounts[cache_mount].get("readOnly", False)
    # ONNX Runtime's threads = the CPUs the pod may use; Guaranteed QoS
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]
    assert serve.threads == int(resources["limits"]["cpu"])


def test_autoscaling_reads_gauges_the_server_exports(docs):
    from moeops.serve import metrics

    gauges = {m.name: m for g in (metrics.WAITING, metrics.RUNNING) for m in g.describe()}
    assert set(gauges) == {"moeops_requests_waiting", "moeops_requests_running"}
    hpa = by_kind(docs, "HorizontalPodAutoscaler")
    hpa_metrics = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert hpa_metrics == set(gauges)
    # prometheus-adapter exposes each one per pod, from the scraped series (namespace/pod added by the scrape)
    adapter = yaml.safe_load(by_kind(docs, "ConfigMap")["data"]["config.yaml"])
    exposed = set()
    for rule in adapter["rules"]:
        series = re.match(r"(\w+)\{", rule["seriesQuery"])[1]
        assert series in gauges and re.search(rule["name"]["matches"], series)
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                                  "pod": {"resource": "pod"}}
        assert "by (<<.GroupBy>>)" in rule["metricsQuery"]
        exposed.add(rule["name"]["as"])
    assert exposed == hpa_metrics
    # KEDA's queries read the same gauges
    scaled = by_kind(docs, "ScaledObject")
    queried = {re.match(r"sum\((\w+)\{", t["metadata"]["query"])[1] for t in scaled["spec"]["triggers"]}
    assert queried == hpa_metrics
    assert scaled["spec"]["scaleTargetRef"]["name"] == hpa["spec"]["scaleTargetRef"]["name"] == \
        by_kind(docs, "Deployment")["metadata"]["name"]


# --- the Argo Rollouts canary (deploy/k8s/rollouts) ------------------------------------------------------------------

ROLLOUTS = K8S / "rollouts"


@pytest.fixture(scope="module")
def rollout() -> dict:
    (doc,) = load_docs((ROLLOUTS / "rollout.yaml").read_text())
    return doc


@pytest.fixture(scope="module")
def analysis() -> dict:
    (doc,) = load_docs((ROLLOUTS / "analysistemplate.yaml").read_text())
    return doc


def argo_field(rollout: dict, path: str) -> str:
    """An analysis arg's valueFrom.fieldRef.fieldPath resolved against the Rollout as Argo Rollouts v1.9 does:
    metadata.annotations['k'] / metadata.labels['k'] (Kubernetes' field paths) or, for any other path, keys
    split at '.', '[' and ']' (utils/analysis/factory.go extractValueFromRollout); the end must be a scalar."""
    if m := re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path):
        return rollout["metadata"][m[1]][m[2]]
    node = rollout
    for key in filter(None, re.split(r"[.\[\]]+", path)):
        node = node[int(key)] if isinstance(node, list) else node[key]
    assert not isinstance(node, (dict, list)), path
    return str(node)


def test_rollout_runs_the_deployments_pod_template_with_a_pinned_version(rollout):
    """The Rollout's pod template is base/deployment.yaml's except for the model version it pins (the label
    the analysis reads as `canary`, and --alias: one version per ReplicaSet, so Argo can canary it)."""
    (deployment,) = load_docs((K8S / "base" / "deployment.yaml").read_text())
    template = copy.deepcopy(rollout["spec"]["template"])
    version = template["metadata"]["labels"].pop("model-version")
    (container,) = template["spec"]["containers"]
    args = container["args"]
    # the README's `kubectl patch` replaces args/7
    assert args.index("--alias") == 6 and args[7] == version and re.fullmatch(r"v\d+", version)
    args[7] = "champion"
    assert template == deployment["spec"]["template"]
    assert rollout["spec"]["selector"] == deployment["spec"]["selector"]
    assert rollout["metadata"]["annotations"]["moeops.dev/stable-model-version"] == version  # nothing to canary yet


def test_rollout_steps_and_analysis_args(rollout, analysis):
    from moeops.config import load_section

    canary = rollout["spec"]["strategy"]["canary"]
    steps = canary["steps"]
    # params.yaml rollout.steps' shape with the weights explicit: 10 -> analysis -> 50 -> analysis -> promote
    assert [next(iter(s)) for s in steps] == ["setWeight", "analysis", "setWeight", "analysis"]
    assert [steps[0]["setWeight"], steps[2]["setWeight"]] == [10, 50]
    params = load_section("rollout", REPO / "params.yaml")
    assert steps[0]["setWeight"] == round(100 * params.traffic_ratio)
    assert [s.set_weight for s in params.steps if s.set_weight is not None] == [steps[2]["setWeight"]]
    # every analysis runs this template, its required args resolved from the Rollout to the two versions
    required = {a["name"] for a in analysis["spec"]["args"] if "value" not in a}
    for step in (steps[1], steps[3]):
        assert step["analysis"]["templates"] == [{"templateName": analysis["metadata"]["name"]}]
        resolved = {a["name"]: argo_field(rollout, a["valueFrom"]["fieldRef"]["fieldPath"])
                    for a in step["analysis"]["args"]}
        assert set(resolved) == required == {"canary", "stable"}
        assert resolved == {"canary": rollout["spec"]["template"]["metadata"]["labels"]["model-version"],
                            "stable": rollout["metadata"]["annotations"]["moeops.dev/stable-model-version"]}
    # the canary/stable Services exist, select the Rollout's pods, and stay out of the ServiceMonitor's selection
    services = {d["metadata"]["name"]: d for d in load_docs((ROLLOUTS / "services.yaml").read_text())}
    (monitor,) = load_docs((K8S / "base" / "servicemonitor.yaml").read_text())
    pod_labels = rollout["spec"]["template"]["metadata"]["labels"]
    for name in (canary["canaryService"], canary["stableService"]):
        assert services[name]["spec"]["selector"].items() <= pod_labels.items()
        assert not monitor["spec"]["selector"]["matchLabels"].items() <= services[name]["metadata"]["labels"].items()


def _prometheus_metrics(analysis: dict) -> dict[str, dict]:
    return {m["name"]: m for m in analysis["spec"]["metrics"] if "prometheus" in m["provider"]}


def test_analysis_template_queries_are_the_rollout_flows(analysis):
    from moeops.rollout.analysis import QUERIES

    argo = {"canary": "{{args.canary}}", "stable": "{{args.stable}}", "window": "{{args.window}}"}
    queries = {name: m["provider"]["prometheus"]["query"] for name, m in _prometheus_metrics(analysis).items()}
    assert queries == {name: q.format(**argo) for name, q in QUERIES.items()}


def _judge(condition: str, result: list[float]) -> bool:
    """An Argo Rollouts (expr-lang) condition of the forms used here, evaluated in Python."""
    assert re.fullmatch(r"[\w\s\[\]().<>=&!]+", condition), condition
    return eval(condition.replace("&&", " and ").replace("false", "False"), {"len": len, "result": result})  # noqa: S307


def _phase(metric: dict, result: list[float]) -> str:
    """evaluate.EvaluateResult of Argo Rollouts v1.9 for a metric with both conditions."""
    success, failure = _judge(metric["successCondition"], result), _judge(metric["failureCondition"], result)
    return "Failed" if failure else "Successful" if success else "Inconclusive"


def test_analysis_template_judges_as_params_rollout(analysis):
    """Thresholds, limits, interval and count are params.yaml's (rollout:, gate.max_regression); an empty or NaN
    result is Inconclusive (the Rollout pauses), never Successful; low traffic never fails or passes."""
    from moeops.config import load_section

    params = load_section("rollout", REPO / "params.yaml")
    max_regression = load_section("gate", REPO / "params.yaml").max_regression
    (analyze, *_) = [s.analyze for s in params.steps if s.analyze is not None]
    window = {a["name"]: a.get("value") for a in analysis["spec"]["args"]}["window"]
    metrics = _prometheus_metrics(analysis)
    limits = {"requests": params.min_requests, "error_rate": params.max_error_rate,
              "ttft_p95_ratio": params.max_latency_ratio, "itl_p95_ratio": params.max_latency_ratio,
              "quality_regression_upper": max_regression}
    assert set(metrics) == set(limits)
    nan = float("nan")
    for name, m in metrics.items():
        assert (m["failureLimit"], m["consecutiveErrorLimit"]) == (params.failure_limit, params.consecutive_error_limit)
        assert (m["interval"], m["count"], m["initialDelay"]) == (f"{analyze.interval_s:g}s", analyze.count, window)
        assert "inconclusiveLimit" not in m  # 0: one inconclusive measurement pauses the Rollout
        limit = limits[name]
        assert _phase(m, []) == _phase(m, [nan]) == "Inconclusive", name
        if name == "requests":  # at least min_requests
            assert [_phase(m, [limit]), _phase(m, [limit - 1]), _phase(m, [0.0])] == \
                ["Successful", "Inconclusive", "Inconclusive"]
        else:  # at most the limit
            assert [_phase(m, [limit]), _phase(m, [limit * 0.5]), _phase(m, [limit * 1.01])] == \
                ["Successful", "Successful", "Failed"], name


def test_quality_probe_job_runs_the_rollout_probe(analysis):
    (job,) = [m for m in analysis["spec"]["metrics"] if "job" in m["provider"]]
    (container,) = job["provider"]["job"]["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:3] == ["python", "-m", "moeops.rollout.probe"]
    flags = {a: command[i + 1] for i, a in enumerate(command) if a.startswith("--")}
    assert flags["--canary"] == "{{args.canary}}" and flags["--stable"] == "{{args.stable}}"
    assert flags["--pushgateway"] == "{{args.pushgateway}}"
    services = {d["metadata"]["name"] for d in load_docs((ROLLOUTS / "services.yaml").read_text())}
    assert {flags["--server"], flags["--stable-server"]} == {f"http://{s}" for s in services}
    assert container["image"] == "moeops-serve"  # the server's image (kustomize sets its tag)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in job["provider"]["job"]["spec"]["template"]["spec"]["volumes"]}
    assert Path(flags["--documents"]).parent == Path(mounts["documents"])
    assert volumes["documents"]["configMap"]["name"] == "moeops-probe-documents"


def test_quality_probe_takes_the_jobs_flags(analysis):
    (job,) = [m for m in analysis["spec"]["metrics"] if "job" in m["provider"]]
    (container,) = job["provider"]["job"]["spec"]["template"]["spec"]["containers"]
    flags = [a for a in container["command"] if a.startswith("--")]
    out = subprocess.run([sys.executable, "-m", "moeops.rollout.probe", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [f for f in flags if f not in out.stdout] == []


# --- the image -------------------------------------------------------------------------------------------------------

def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()  # no comment, no environment marker
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


SERVE_PINS = _pins(DOCKER / "requirements-serve.txt")


def test_serving_requirements_are_the_locks_versions_without_torch():
    lock = _pins(REPO / "requirements.txt")
    assert not {"torch", "deepspeed", "transformers", "triton"} & set(SERVE_PINS)
    assert not [n for n in SERVE_PINS if n.startswith(("torch", "nvidia-"))]
    assert {n: v for n, v in SERVE_PINS.items() if lock.get(n) != v} == {}


def test_serving_requirements_are_closed():
    """Every requirement of every pinned package (as installed from the same lock here) is pinned too, so
    `pip install` in the image resolves to exactly this set."""
    env = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "python_version": "3.11", "python_full_version": "3.11.0", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    missing = []
    for name, version in SERVE_PINS.items():
        dist = importlib.metadata.distribution(name)
        assert dist.version == version, name
        for req in map(Requirement, dist.requires or []):
            if (req.marker is None or req.marker.evaluate(env)) and canonicalize_name(req.name) not in SERVE_PINS:
                missing.append(f"{name} requires {req}")
    assert missing == []


# Run in a fresh interpreter: hide every installed distribution that requirements-serve.txt does not pin (as if
# only the image's packages were there; optional imports such as orjson or httptools then fall back as they do in
# the image), import what `moeops serve` imports, build the app and let uvicorn load it.
_SERVE_IMPORTS = """
import importlib.metadata, json, re, sys
allowed = set(json.loads(sys.argv[1])) | {"moeops"}
owners = importlib.metadata.packages_distributions()

class HideUnpinned:
    def find_spec(self, name, path=None, target=None):
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in owners.get(name.partition(".")[0], [])}
        if dists and not dists & allowed:
            raise ModuleNotFoundError(f"No module named {name!r} (not in requirements-serve.txt)", name=name)
        return None

sys.meta_path.insert(0, HideUnpinned())
import onnxruntime, tokenizers, uvicorn
from onnxruntime.capi import onnxruntime_pybind11_state
import moeops.__main__, moeops.registry, moeops.serve.engine, moeops.serve.server, moeops.serve.watch
import moeops.serve.tenants, moeops.rollout.probe, moeops.evaluate.bootstrap  # the probe Job runs in this image too
from moeops.serve.app import create_app
from moeops.serve.router import Router
uvicorn.Config(create_app(Router("moeops"), max_prompt_tokens=127, max_new_tokens=16)).load()
print(json.dumps({"torch": "torch" in sys.modules}))
"""


def test_serving_requirements_cover_what_the_server_imports():
    out = subprocess.run([sys.executable, "-c", _SERVE_IMPORTS, json.dumps(sorted(SERVE_PINS))],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1])["torch"] is False


def test_dockerfile():
    instructions = _dockerfile()
    final = _final_stage(instructions)
    assert final[0] == ("FROM", "python:3.11-slim")
    (user,) = [a for ins, a in final if ins == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so runAsNonRoot can check it
    runs = " ".join(a for ins, a in instructions if ins == "RUN")
    assert "-r /tmp/requirements-serve.txt" in runs and "install --no-deps /wheels/" in runs
    assert "torch" not in runs
    # the Deployment runs the image as the same user
    (deployment,) = [d for d in load_docs((K8S / "base" / "deployment.yaml").read_text())]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)
    # every COPY from the build context survives the allow-list in Dockerfile.dockerignore
    allowed = [ln[1:].rstrip("/") for ln in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
               if ln.startswith("!")]
    sources = [a.split()[-2] for ins, a in instructions if ins == "COPY" and "--from=" not in a]
    assert sources
    for src in sources:
        src = src.rstrip("/")
        assert src in allowed or any(Path(src).is_relative_to(a) for a in allowed), src
        assert (REPO / src).exists(), src
