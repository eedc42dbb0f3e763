"""Offline check of KServe resources (no cluster, no CRD schemas shipped anywhere we can install).

kubernetes-validate knows only the built-in kinds, so for InferenceService and ServingRuntime we check
the fields KServe requires ourselves, and validate the pod parts they embed (containers, volumes,
tolerations...) against the Kubernetes Pod schema by wrapping them in a Pod.

Usage: python scripts/check_kserve.py FILE...   (exit status 1 on any problem, each one printed)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

# metadata.name of an InferenceService becomes a host name part and a Service name: DNS-1035 label.
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Fields of KServe's ComponentExtensionSpec: they sit beside the PodSpec fields of a predictor.
COMPONENT_FIELDS = {
    "minReplicas",
    "maxReplicas",
    "scaleTarget",
    "scaleMetric",
    "scaleMetricType",
    "containerConcurrency",
    "timeout",
    "canaryTrafficPercent",
    "logger",
    "batcher",
    "labels",
    "annotations",
    "deploymentStrategy",
    "autoScaling",
    "workerSpec",
    "storageUris",
}
# Model frameworks a predictor may name instead of `model:` / `containers:` (the older v1beta1 style).
FRAMEWORK_FIELDS = {"sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "pmml", "lightgbm", "paddle"}
PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}


def _pod_problems(pod_spec: dict[str, Any], where: str, enabled: bool) -> list[str]:
    """Validate an embedded pod spec against the Kubernetes Pod schema (strict: unknown fields fail)."""
    if not enabled:
        return []
    try:
        import kubernetes_validate
    except ImportError:  # the check script installs it; say so rather than pass silently
        return [f"{where}: kubernetes-validate is not installed, the embedded pod spec was not checked"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kserve-check"}, "spec": pod_spec}
    try:
        kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{where}: {exc.message} (at {'.'.join(str(p) for p in exc.path)})"]
    return []


def _container_problems(containers: Any, where: str) -> list[str]:
    if not isinstance(containers, list) or not containers:
        return [f"{where}.containers must be a non-empty list"]
    problems = []
    for i, container in enumerate(containers):
        if not isinstance(container, dict) or not container.get("image"):
            problems.append(f"{where}.containers[{i}] needs an image")
            continue
        ports = container.get("ports") or []
        if i == 0 and len(ports) > 1:
            problems.append(f"{where}.containers[0]: KServe routes to one port; {len(ports)} are declared")
    return problems


def check_inference_service(doc: dict[str, Any], pod_schema: bool = True) -> list[str]:
    """Problems with one serving.kserve.io/v1beta1 InferenceService (empty when it is fine)."""
    problems = []
    if doc.get("apiVersion") != "serving.kserve.io/v1beta1":
        problems.append(f"apiVersion must be serving.kserve.io/v1beta1, not {doc.get('apiVersion')!r}")
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not DNS_1035.match(name) or len(name) > 63:
        problems.append(f"metadata.name {name!r} must be a DNS-1035 label (a-z, 0-9, '-', starting with a letter)")
    predictor = (doc.get("spec") or {}).get("predictor")
    if not isinstance(predictor, dict):
        return [*problems, "spec.predictor is required"]
    has_model, has_containers = "model" in predictor, "containers" in predictor
    frameworks = FRAMEWORK_FIELDS & predictor.keys()
    if has_model + has_containers + bool(frameworks) != 1:
        problems.append("spec.predictor needs exactly one of `model`, `containers` or a framework field")
    if has_model:
        model = predictor["model"] or {}
        if not (model.get("modelFormat") or {}).get("name"):
            problems.append("spec.predictor.model.modelFormat.name is required")
        if model.get("protocolVersion", "v1") not in PROTOCOLS:
            problems.append(f"spec.predictor.model.protocolVersion must be one of {sorted(PROTOCOLS)}")
        model_only = {"modelFormat", "runtime", "protocolVersion", "storageUri"}
        model_container = {k: v for k, v in model.items() if k not in model_only}
        pod_parts = {k: v for k, v in predictor.items() if k not in COMPONENT_FIELDS | {"model"}}
        # The model spec is a container without an image (the runtime brings it): check it as one.
        pod_parts["containers"] = [{"name": "kserve-container", "image": "from-runtime", **model_container}]
        problems += _pod_problems(pod_parts, "spec.predictor", pod_schema)
    if has_containers:
        problems += _container_problems(predictor["containers"], "spec.predictor")
        pod_parts = {k: v for k, v in predictor.items() if k not in COMPONENT_FIELDS}
        problems += _pod_problems(pod_parts, "spec.predictor", pod_schema)
    for key in ("minReplicas", "maxReplicas"):
        if key in predictor and (not isinstance(predictor[key], int) or predictor[key] < 0):
            problems.append(f"spec.predictor.{key} must be a non-negative integer")
    if predictor.get("minReplicas", 1) > predictor.get("maxReplicas", sys.maxsize):
        problems.append("spec.predictor.minReplicas is above maxReplicas")
    return problems


def check_serving_runtime(doc: dict[str, Any], pod_schema: bool = True) -> list[str]:
    """Problems with one serving.kserve.io/v1alpha1 (Cluster)ServingRuntime."""
    problems = []
    if doc.get("apiVersion") != "serving.kserve.io/v1alpha1":
        problems.append(f"apiVersion must be serving.kserve.io/v1alpha1, not {doc.get('apiVersion')!r}")
    if not (doc.get("metadata") or {}).get("name"):
        problems.append("metadata.name is required")
    spec = doc.get("spec") or {}
    formats = spec.get("supportedModelFormats")
    if not isinstance(formats, list) or not all(isinstance(f, dict) and f.get("name") for f in formats):
        problems.append("spec.supportedModelFormats must list formats, each with a name")
    if not set(spec.get("protocolVersions") or ["v1"]) <= PROTOCOLS:
        problems.append(f"spec.protocolVersions must be among {sorted(PROTOCOLS)}")
    problems += _container_problems(spec.get("containers"), "spec")
    pod_fields = {"containers", "volumes", "nodeSelector", "affinity", "tolerations", "imagePullSecrets"}
    problems += _pod_problems({k: v for k, v in spec.items() if k in pod_fields}, "spec", pod_schema)
    return problems


CHECKERS = {"InferenceService": check_inference_service, "ServingRuntime": check_serving_runtime}


def check_file(path: Path, pod_schema: bool = True) -> list[str]:
    """Every problem in one YAML file of KServe resources, each prefixed with the file and resource.

    pod_schema=False skips the Pod-schema validation of the embedded pod parts (needs kubernetes-validate).
    """
    problems = []
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    if not docs:
        return [f"{path}: no resources"]
    for doc in docs:
        kind = doc.get("kind")
        label = f"{path}: {kind}/{(doc.get('metadata') or {}).get('name')}"
        checker = CHECKERS.get(kind) or CHECKERS.get(str(kind).removeprefix("Cluster"))
        if checker is None:
            problems.append(f"{label}: not a KServe kind this check knows ({sorted(CHECKERS)})")
            continue
        problems += [f"{label}: {p}" for p in checker(doc, pod_schema)]
    return problems


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    failed = False
    for name in argv:
        problems = check_file(Path(name))
        for problem in problems:
            print(f"ERROR {problem}")
        if not problems:
            print(f"INFO {name} passed (KServe required fields, embedded pod spec)")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
