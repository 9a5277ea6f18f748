"""The Helm chart renders to valid Kubernetes manifests for the default, GPU and Jetson values.

helm is not installable here, so tests/helm_render/ renders the chart with what Helm itself uses: Go's
text/template with the Sprig functions and Helm's own built-ins (include, tpl, required, toYaml...). The
merged values are checked against values.schema.json (as `helm install` does), every manifest against the
Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields fail) for the oldest and newest
Kubernetes the chart supports, and the serving config against the server's own settings model.

Needs Go and Debian's Go sources of Sprig and ghodss/yaml:
    apt-get install -y golang-go golang-github-masterminds-sprig-dev golang-github-ghodss-yaml-dev
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "visionserve"
RENDERER = ROOT / "tests" / "helm_render"
GOPATH = Path("/usr/share/gocode")
GO_DEPS = [GOPATH / "src/github.com/Masterminds/sprig", GOPATH / "src/github.com/ghodss/yaml"]
APT = "apt-get install -y golang-go golang-github-masterminds-sprig-dev golang-github-ghodss-yaml-dev"

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (dev extra)")
jsonschema = pytest.importorskip("jsonschema")

if shutil.which("go") is None or not all(p.is_dir() for p in GO_DEPS):
    pytest.skip(f"Go with Sprig is needed to render the Helm chart: {APT}", allow_module_level=True)

KUBE_VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]
CRD_KINDS = {"ServiceMonitor"}  # not in the Kubernetes schemas; checked by hand below

CASES = {
    "default": [],
    "gpu": ["values-gpu.yaml"],
    "jetson": ["values-jetson.yaml"],
    "full": ["ci/full-values.yaml"],
    "pvc": ["ci/pvc-values.yaml"],
    "gpu-full": ["values-gpu.yaml", "ci/full-values.yaml"],
}


@pytest.fixture(scope="module")
def renderer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("helm_render") / "helm_render"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": str(GOPATH), "CGO_ENABLED": "0"}
    env.setdefault("GOCACHE", str(Path(os.environ.get("XDG_CACHE_HOME", "/tmp")) / "visionserve-go-build"))
    subprocess.run(["go", "build", "-o", str(out), "."], cwd=RENDERER, env=env, check=True)
    return out


def render(renderer: Path, tmp_path: Path, files: list[str], *extra: str) -> tuple[list[dict], dict]:
    values_out = tmp_path / "values.json"
    args = [str(renderer), "--name", "vs", "--namespace", "serving", "--values-out", str(values_out)]
    for f in files:
        args += ["-f", str(f if Path(f).is_absolute() else CHART / f)]
    proc = subprocess.run([*args, *extra, str(CHART)], capture_output=True, text=True)
    if proc.returncode:
        raise RenderError(proc.stderr)
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return docs, json.loads(values_out.read_text())


class RenderError(Exception):
    pass


def by_kind(docs: list[dict]) -> dict[str, dict]:
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), kinds
    return {d["kind"]: d for d in docs}


def schema_errors(values: dict) -> list[str]:
    schema = json.loads((CHART / "values.schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(values)]


def check_settings(env: dict[str, str]) -> None:
    """Every VISIONSERVE_* variable is a real server setting and parses (the server ignores unknown env)."""
    from service.settings import ModelSettings, Settings

    for key in env:
        assert key.startswith("VISIONSERVE_"), key
        parts = key.removeprefix("VISIONSERVE_").lower().split("__")
        assert parts[0] in Settings.model_fields, f"{key}: no such setting"
        if parts[0] == "defaults":
            assert len(parts) == 2 and parts[1] in ModelSettings.model_fields, f"{key}: no such model setting"
    old = {k: v for k, v in os.environ.items() if k.startswith("VISIONSERVE_")}
    try:
        for k in old:
            del os.environ[k]
        os.environ.update(env)
        Settings()  # raises on a value the server would refuse
    finally:
        for k in env:
            os.environ.pop(k, None)
        os.environ.update(old)


@pytest.mark.parametrize("case", list(CASES))
def test_renders_valid_manifests(renderer: Path, tmp_path: Path, case: str) -> None:
    docs, values = render(renderer, tmp_path, CASES[case])
    assert schema_errors(values) == []
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)

    k = by_kind(docs)
    dep = k["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]

    config = k["ConfigMap"]["data"]
    assert c["envFrom"] == [{"configMapRef": {"name": k["ConfigMap"]["metadata"]["name"]}}]
    check_settings(config)
    drain = float(config["VISIONSERVE_GRACEFUL_TIMEOUT_S"])
    pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > drain + pre_stop

    svc = k["Service"]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == c["ports"][0]["name"]

    if values["autoscaling"]["enabled"]:
        hpa = k["HorizontalPodAutoscaler"]
        assert "replicas" not in dep["spec"]
        assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
        types = [m["type"] for m in hpa["spec"]["metrics"]]
        assert types[0] == "Resource"
        if values["autoscaling"]["queueDepth"]["enabled"]:
            assert hpa["spec"]["metrics"][1]["pods"]["metric"]["name"] == "visionserve_queue_depth"
    else:
        assert "HorizontalPodAutoscaler" not in k
        assert dep["spec"]["replicas"] == values["replicaCount"]
    if values["podDisruptionBudget"]["enabled"]:
        assert k["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    if "ServiceMonitor" in k:
        sm = k["ServiceMonitor"]
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        assert sm["spec"]["endpoints"][0] | {"port": "http", "path": "/metrics"} == sm["spec"]["endpoints"][0]
        svc_labels = svc["metadata"]["labels"]
        assert svc_labels | sm["spec"]["selector"]["matchLabels"] == svc_labels

    source = values["modelRepository"]["source"]
    if source == "image":
        assert "/models" not in mounts
    else:
        assert mounts["/models"] == "models"
        if source == "pvc":
            assert volumes["models"]["persistentVolumeClaim"]["readOnly"] is True
        else:
            (init,) = pod["initContainers"]
            assert {"name": "models", "mountPath": "/models"} in init["volumeMounts"]
            assert init["securityContext"]["readOnlyRootFilesystem"] is True


def test_gpu_values(renderer: Path, tmp_path: Path) -> None:
    docs, _ = render(renderer, tmp_path, CASES["gpu"])
    pod = by_kind(docs)["Deployment"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"].endswith(":0.1.0-cuda")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    config = by_kind(docs)["ConfigMap"]["data"]
    assert json.loads(config["VISIONSERVE_DEFAULTS__PROVIDERS"])[0] == "TensorrtExecutionProvider"
    assert config["VISIONSERVE_DEFAULTS__TRT_ENGINE_CACHE"] == "/cache/tensorrt"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/cache/tensorrt"] == "tensorrt-cache"


def test_jetson_values(renderer: Path, tmp_path: Path) -> None:
    docs, _ = render(renderer, tmp_path, CASES["jetson"])
    k = by_kind(docs)
    pod = k["Deployment"]["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"]["kubernetes.io/arch"] == "arm64"
    assert pod["tolerations"]
    assert pod["containers"][0]["image"].endswith(":0.1.0-jetson")
    assert k["ConfigMap"]["data"]["VISIONSERVE_DEFAULTS__TRT_FP16"] == "true"
    assert "HorizontalPodAutoscaler" not in k and "PodDisruptionBudget" not in k
    assert k["Deployment"]["spec"]["replicas"] == 1


def test_schema_refuses_bad_values(renderer: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "modelRepository": {"source": "pvc"},
        "image": {"flavor": "tpu"},
        "config": {"LOG_LEVEL": "info"},
        "replicas": 3,
    }))
    _, values = render(renderer, tmp_path, [str(bad)], "--values-only")
    errors = "\n".join(schema_errors(values))
    assert "claimName" in errors
    assert "'tpu' is not one of" in errors
    assert "LOG_LEVEL" in errors
    assert "'replicas' was unexpected" in errors


def test_required_values_fail_the_render(renderer: Path, tmp_path: Path) -> None:
    bad = tmp_path / "init.yaml"
    bad.write_text("modelRepository:\n  source: init\n")
    with pytest.raises(RenderError, match=r"modelRepository.init.url \(or init.command\) is required"):
        render(renderer, tmp_path, [str(bad)])


def test_null_removes_a_default_and_later_files_win(renderer: Path, tmp_path: Path) -> None:
    """Helm's coalescing rules, which the renderer must follow for the cases above to mean anything."""
    a = tmp_path / "a.yaml"
    a.write_text("nodeSelector: {disk: ssd}\nresources:\n  limits: null\n")
    b = tmp_path / "b.yaml"
    b.write_text("nodeSelector: {disk: nvme}\n")
    docs, values = render(renderer, tmp_path, [str(a), str(b)])
    pod = by_kind(docs)["Deployment"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"disk": "nvme"}
    assert "limits" not in pod["containers"][0]["resources"]
    assert values["resources"] == {"requests": {"cpu": "2", "memory": "1Gi"}}
