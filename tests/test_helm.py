"""The Helm chart renders to valid Kubernetes manifests for the default, GPU and Jetson values.

Rendered by Helm itself: ``helm-python-sdk`` (import ``helm_python``, a wheel bundling Helm v4's Go SDK; no
helm binary, no Go toolchain). Its render validates the merged values against ``values.schema.json`` as
``helm install`` does, and ``helm lint`` runs on the chart. Every manifest is then validated against the
Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields fail) for the oldest and newest
Kubernetes the chart supports, and the serving config against the server's own settings model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "visionserve"

helm = pytest.importorskip("helm_python", reason="pip install helm-python-sdk (dev extra)")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (dev extra)")

KUBE_VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]
CRD_KINDS = {"ServiceMonitor"}  # not in the Kubernetes schemas; checked by hand below

CASES = {
    "default": [],
    "gpu": ["values-gpu.yaml"],
    "jetson": ["values-jetson.yaml"],
    "full": ["ci/full-values.yaml"],
    "pvc": ["ci/pvc-values.yaml"],
    "poll": ["values-poll.yaml"],
    "gpu-full": ["values-gpu.yaml", "ci/full-values.yaml"],
}


def values_files(files: list[str]) -> dict[str, Any]:
    """``-f a.yaml -f b.yaml`` as the helm CLI merges them before the chart's defaults (Helm's
    ``pkg/cli/values`` mergeMaps: maps merge key by key, anything else in a later file wins)."""

    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    merged: dict[str, Any] = {}
    for f in files:
        path = Path(f) if Path(f).is_absolute() else CHART / f
        merged = merge(merged, yaml.safe_load(path.read_text()) or {})
    return merged


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART) as c:
        yield c


def render(chart: Any, files: list[str]) -> tuple[list[dict], dict]:
    """Helm's render of the chart with these values files; returns the manifests and the values used."""
    user = values_files(files)
    manifests = chart.render(user, name="vs", namespace="serving")
    docs = [d for path, text in sorted(manifests.items()) if path.endswith((".yaml", ".yml"))
            for d in yaml.safe_load_all(text) if d]
    return docs, chart.merge_values(user)


def by_kind(docs: list[dict]) -> dict[str, dict]:
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), kinds
    return {d["kind"]: d for d in docs}


def test_helm_lint_finds_nothing_to_fix() -> None:
    for files in CASES.values():
        report = helm.lint(CHART, values_files(files), strict=True)
        assert report["errors"] == [], report
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def check_settings(env: dict[str, str]) -> None:
    """Every VISIONSERVE_* variable is a real server setting and parses (the server ignores unknown env)."""
    from visionserve.service.settings import ModelSettings, Settings

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
def test_renders_valid_manifests(chart: Any, case: str) -> None:
    docs, values = render(chart, CASES[case])
    chart.validate_schema(values)
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
    cpus = next(e for e in c["env"] if e["name"] == "VISIONSERVE_CPUS")  # threads sized from the CPU request
    assert cpus["valueFrom"]["resourceFieldRef"] == {"containerName": c["name"], "resource": "requests.cpu",
                                                     "divisor": "1"}
    check_settings({"VISIONSERVE_CPUS": "2"})
    check_settings(config)
    drain = float(config["VISIONSERVE_GRACEFUL_TIMEOUT_S"])
    pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > drain + pre_stop
    # Rollouts: no old pod leaves before its replacement is ready (models loaded, warmed up) and stayed so;
    # the rollout is not declared failed while a new pod may still be loading its models.
    spec = dep["spec"]
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0 and spec["minReadySeconds"] > 0
    startup = c["startupProbe"]
    assert spec["progressDeadlineSeconds"] >= startup["periodSeconds"] * startup["failureThreshold"]
    assert config["VISIONSERVE_MODEL_CONTROL"] == values["modelRepository"]["control"]["mode"]

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


def test_gpu_values(chart: Any) -> None:
    docs, _ = render(chart, CASES["gpu"])
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


def test_poll_values(chart: Any) -> None:
    """Live model updates: the repository on a PVC (read-only for the pods), polled within 5 s."""
    docs, _ = render(chart, CASES["poll"])
    k = by_kind(docs)
    config = k["ConfigMap"]["data"]
    assert config["VISIONSERVE_MODEL_CONTROL"] == "poll" and 0 < float(config["VISIONSERVE_POLL_INTERVAL_S"]) <= 5
    assert config["VISIONSERVE_STRICT_READINESS"] == "false"
    pod = k["Deployment"]["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts[config["VISIONSERVE_REPOSITORY"]]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts[config["VISIONSERVE_REPOSITORY"]]["name"]]["persistentVolumeClaim"]["claimName"]
    with pytest.raises(helm.HelmRenderError, match=r"poll needs modelRepository\.source pvc"):
        chart.render({"modelRepository": {"control": {"mode": "poll"}}}, name="vs", namespace="serving")


def test_jetson_values(chart: Any) -> None:
    docs, _ = render(chart, CASES["jetson"])
    k = by_kind(docs)
    pod = k["Deployment"]["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"]["kubernetes.io/arch"] == "arm64"
    assert pod["tolerations"]
    assert pod["containers"][0]["image"].endswith(":0.1.0-jetson")
    assert k["ConfigMap"]["data"]["VISIONSERVE_DEFAULTS__TRT_FP16"] == "true"
    assert "HorizontalPodAutoscaler" not in k and "PodDisruptionBudget" not in k
    assert k["Deployment"]["spec"]["replicas"] == 1


def test_schema_refuses_bad_values(chart: Any) -> None:
    bad = {
        "modelRepository": {"source": "pvc"},
        "image": {"flavor": "tpu"},
        "config": {"LOG_LEVEL": "info"},
        "replicas": 3,
    }
    with pytest.raises(helm.HelmValuesError) as refused:
        chart.validate_schema(chart.merge_values(bad))
    errors = str(refused.value)
    assert "claimName" in errors
    assert "value must be one of 'cpu', 'cuda', 'jetson'" in errors
    assert "LOG_LEVEL" in errors
    assert "'replicas' not allowed" in errors
    with pytest.raises(helm.HelmValuesError, match="flavor"):  # and the render refuses them, as install does
        chart.render(bad, name="vs", namespace="serving")


def test_required_values_fail_the_render(chart: Any) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"modelRepository.init.url \(or init.command\) is required"):
        chart.render({"modelRepository": {"source": "init"}}, name="vs", namespace="serving")


def test_null_removes_a_default_and_later_files_win(chart: Any, tmp_path: Path) -> None:
    """Helm's rules for several values files and for null, which the cases above rely on."""
    a = tmp_path / "a.yaml"
    a.write_text("nodeSelector: {disk: ssd}\nresources:\n  limits: null\n")
    b = tmp_path / "b.yaml"
    b.write_text("nodeSelector: {disk: nvme}\n")
    docs, values = render(chart, [str(a), str(b)])
    pod = by_kind(docs)["Deployment"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"disk": "nvme"}
    assert "limits" not in pod["containers"][0]["resources"]
    assert values["resources"] == {"requests": {"cpu": "2", "memory": "1Gi"}}
