"""Cross-file rules of the deployment files that no schema can see.

The schema checks (hadolint, the Compose Specification, kubernetes-validate, the KServe fields) run in
scripts/check_deploy.sh; these tests hold the files to each other and to the server: the same port, the
same user, every setting present with its real default, probes on the real routes, grace periods above
the request and drain timeouts, selectors that select. They read files only (PyYAML), never import
torch, and run in the project's test suite as well as in check_deploy.sh's tool virtualenv.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KSERVE = ROOT / "deploy" / "kserve"
PORT = 8000
# Settings the deployment files leave unset on purpose: unset means "every model in the repository",
# "inferred", "the checkpoint's", "no key" (Kubernetes takes it from an optional Secret), "min(4, CPUs)" or
# "the CPUs available, shared among the workers", "2 on a CPU with 2+ threads" or "4 x max-image-pixels"; for
# image search, "the user's data directory" and "the embedded PostgreSQL" (Kubernetes takes the shared database's
# URL from a Secret).
UNSET_ON_PURPOSE = {
    "VIT_MAX_DECODED_BYTES",
    "VIT_DATA_DIR",
    "VIT_COLLECTIONS_URL",
    "VIT_MODEL",
    "VIT_ARCH",
    "VIT_IMAGE_SIZE",
    "VIT_API_KEY",
    "VIT_DECODE_WORKERS",
    "VIT_THREADS",
    "VIT_LANES",
}
# Settings whose value in a container deliberately differs from the command line's default.
# Compose points VIT_COLLECTIONS_URL at its own PostgreSQL service.
CONTAINER_VALUES = {
    "VIT_HOST": "0.0.0.0",
    "VIT_MODELS_DIR": None,
    "VIT_MAX_BATCH_SIZE": None,
    "VIT_COLLECTIONS_URL": None,
}


# ---------------------------------------------------------------------------------------------- helpers
def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def settings_defaults() -> dict[str, Any]:
    """VIT_<FIELD> -> default, read from app/settings.py's Settings class without importing it.

    The default is None where it is computed at run time (default_factory) or depends on the device.
    """
    tree = ast.parse((ROOT / "app" / "settings.py").read_text())
    settings = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    namespace = {"MiB": 1 << 20}
    defaults: dict[str, Any] = {}
    for node in settings.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)) or node.value is None:
            continue
        name = node.target.id
        if name == "model_config":
            continue
        value = node.value
        if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "Field":
            value = value.args[0] if value.args else None
        try:
            default = eval(compile(ast.Expression(value), "settings", "eval"), {}, dict(namespace)) if value else None
        except NameError:
            default = None
        defaults[f"VIT_{name.upper()}"] = default
    return defaults


def same_value(text: Any, default: Any) -> bool:
    """Does an environment string mean the same as a Settings default?"""
    text = str(text)
    if isinstance(default, bool):
        return text.lower() == str(default).lower()
    if isinstance(default, int | float):
        return float(text) == float(default)
    return text == str(default)


def duration_s(text: str | int) -> float:
    """Compose durations ('75s', '1m30s', 90) in seconds."""
    if isinstance(text, int | float):
        return float(text)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text}"
    return sum(float(n) * units[u] for n, u in parts)


def compose_default(value: Any) -> Any:
    """The default of an interpolated compose value: '${VIT_X:-5}' -> '5'; plain values unchanged."""
    if isinstance(value, str):
        m = re.fullmatch(r"\$\{[A-Z0-9_]+:-([^}]*)\}", value)
        if m:
            return m.group(1)
    return value


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        lines.append(current + raw)
        current = ""
    out = []
    for line in lines:
        instruction, _, args = line.strip().partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (FROM line first)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for instruction, args in dockerfile_instructions():
        if instruction == "FROM":
            name = args.split()[-1] if " AS " in args.upper() else f"stage{len(stages)}"
            current = stages.setdefault(name, [])
        current.append((instruction, args))
    return stages


def dockerfile_arg_defaults() -> dict[str, str]:
    out = {}
    for instruction, args in dockerfile_instructions():
        if instruction == "ARG" and "=" in args:
            key, _, value = args.partition("=")
            out.setdefault(key, value)
    return out


def dockerfile_uid() -> int:
    users = [args for instruction, args in dockerfile_instructions() if instruction == "USER"]
    assert len(users) == 1, users
    return int(users[0].split(":")[0])


def k8s_resources() -> dict[str, dict[str, Any]]:
    """kind -> resource for every file listed in kustomization.yaml."""
    out = {}
    for name in load_yaml(K8S / "kustomization.yaml")["resources"]:
        for doc in load_all(K8S / name):
            assert doc["kind"] not in out, f"two {doc['kind']} resources"
            out[doc["kind"]] = doc
    return out


def probe_path(probe: dict[str, Any]) -> str:
    return probe["httpGet"]["path"]


def prestop_sleep_s(container: dict[str, Any]) -> float:
    prestop = container["lifecycle"]["preStop"]
    if "sleep" in prestop:
        return float(prestop["sleep"]["seconds"])
    command = prestop["exec"]["command"]
    assert command[0] == "sleep", command
    return float(command[1])


# -------------------------------------------------------------------------------------------- Dockerfile
def test_dockerfile_stages_and_variants() -> None:
    stages = dockerfile_stages()
    assert {"builder", "runtime-gpu", "runtime-cpu", "runtime"} <= stages.keys()
    assert dockerfile_arg_defaults()["VARIANT"] == "gpu"
    gpu_base = stages["runtime-gpu"][0][1]
    assert re.match(r"(pytorch/pytorch:\S*-runtime|nvidia/cuda:\S*-runtime-)", gpu_base), gpu_base
    assert stages["runtime-cpu"][0][1].startswith("python:${PYTHON_VERSION}-slim")
    assert stages["runtime"][0][1].startswith("runtime-${VARIANT}")
    cpu_torch = " ".join(a for i, a in stages["runtime-cpu"] if i == "RUN")
    assert "--index-url https://download.pytorch.org/whl/cpu" in cpu_torch
    assert '"torch==${TORCH_VERSION}"' in cpu_torch


def test_dockerfile_installs_the_package_from_pyproject_only() -> None:
    """No drifting dependency lists: pip installs torch (pinned) and the wheel built from pyproject.toml."""
    stages = dockerfile_stages()
    builder_runs = " ".join(a for i, a in stages["builder"] if i == "RUN")
    assert "pip wheel --no-cache-dir --no-deps --wheel-dir /dist ." in builder_runs
    for name, instructions in stages.items():
        for instruction, args in instructions:
            for command in re.findall(r"pip install ([^&;]+)", args) if instruction == "RUN" else []:
                packages = [w for w in command.split() if not w.startswith("-") and "://" not in w]
                allowed = {'"torch==${TORCH_VERSION}"', "/tmp/dist/vitserve-*.whl"}
                assert set(packages) <= allowed, f"{name}: pip install {command}"
    assert any("pip install --no-cache-dir /tmp/dist/vitserve-*.whl" in a for _, a in stages["runtime"])


def test_dockerfile_copies_only_what_the_dockerignore_allows() -> None:
    copied = []
    for instruction, args in dockerfile_stages()["builder"]:
        if instruction == "COPY" and "--from" not in args:
            copied += args.split()[:-1]
    assert set(copied) == {"pyproject.toml", "README.md", "app", "models"}
    allowed = [
        line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    ]
    assert set(copied) == set(allowed)
    for path in copied:
        assert (ROOT / path).exists(), path


def test_dockerignore_keeps_the_context_small() -> None:
    build = pytest.importorskip("docker.utils.build", reason="docker-py (check_deploy.sh installs it)")
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    context = set(build.exclude_paths(str(ROOT), patterns, dockerfile="Dockerfile"))
    assert {"pyproject.toml", "README.md", "app/__init__.py", "app/__main__.py"} <= context
    for path in context:
        top = path.split("/")[0]
        assert top in {"pyproject.toml", "README.md", "app", "models", "Dockerfile", ".dockerignore"}, path
        assert "__pycache__" not in path and not path.endswith(".pyc"), path


def test_dockerfile_runtime_contract() -> None:
    instructions = dockerfile_instructions()
    by_name: dict[str, list[str]] = {}
    for instruction, args in instructions:
        by_name.setdefault(instruction, []).append(args)
    assert by_name["EXPOSE"] == [str(PORT)]
    assert by_name["ENTRYPOINT"] == ['["vit-serve"]']
    # No flags in CMD: a flag would beat the VIT_* variables that compose and Kubernetes set.
    assert by_name.get("CMD", ["[]"]) == ["[]"]
    env = " ".join(by_name["ENV"])
    assert re.search(r"VIT_HOST=0\.0\.0\.0\b", env) and re.search(rf"VIT_PORT={PORT}\b", env)
    assert dockerfile_uid() >= 1000
    # The user switch comes after every install, so nothing installed is writable by the server.
    last_run = max(i for i, (n, _) in enumerate(instructions) if n == "RUN")
    user_at = next(i for i, (n, _) in enumerate(instructions) if n == "USER")
    assert user_at > last_run
    (healthcheck,) = by_name["HEALTHCHECK"]
    assert "/readyz" in healthcheck
    start_period = re.search(r"--start-period=(\S+)", healthcheck)
    assert start_period and duration_s(start_period.group(1)) >= 60


def test_smoke_check_installs_the_dockerfiles_torch_version() -> None:
    smoke = (ROOT / "scripts" / "container_smoke.sh").read_text()
    pin = re.search(r"VITSERVE_SMOKE_TORCH:-torch==([\w.]+)\}", smoke)
    assert pin and pin.group(1) == dockerfile_arg_defaults()["TORCH_VERSION"]


@pytest.mark.parametrize("script", ["check_deploy.sh", "container_smoke.sh"])
def test_scripts_are_valid_bash_and_executable(script: str) -> None:
    path = ROOT / "scripts" / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)


# -------------------------------------------------------------------------------------------- compose
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(ROOT / "docker-compose.yml")


def test_compose_gpu_service(compose: dict[str, Any]) -> None:
    service = compose["services"]["vitserve"]
    assert "profiles" not in service, "the GPU service is the default one"
    assert service["build"]["args"]["VARIANT"] == "gpu"
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "count" in device or "device_ids" in device


def test_compose_cpu_profile(compose: dict[str, Any]) -> None:
    service = compose["services"]["vitserve-cpu"]
    assert service["profiles"] == ["cpu"]
    assert service["build"]["args"]["VARIANT"] == "cpu"
    assert "deploy" not in service, "no GPU reservation on the CPU variant"
    assert service["environment"]["VIT_DEVICE"] == "cpu"


@pytest.mark.parametrize("name", ["vitserve", "vitserve-cpu"])
def test_compose_service_runs_like_the_image(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    env = service["environment"]
    assert env["VIT_HOST"] == "0.0.0.0" and str(env["VIT_PORT"]) == str(PORT)
    assert any(p.endswith(f":{PORT}") for p in service["ports"])
    (mount,) = [v for v in service["volumes"] if isinstance(v, dict) and v["target"] == env["VIT_MODELS_DIR"]]
    assert mount["source"] == "./models" and mount["read_only"] is True
    assert "/readyz" in " ".join(service["healthcheck"]["test"])
    assert duration_s(service["healthcheck"]["start_period"]) >= 60
    assert service["restart"] in {"unless-stopped", "always", "on-failure"}
    # Docker's default 10 s before SIGKILL would cut off accepted requests.
    request_timeout = float(compose_default(env["VIT_REQUEST_TIMEOUT_S"]))
    drain_timeout = float(compose_default(env["VIT_DRAIN_TIMEOUT_S"]))
    assert duration_s(service["stop_grace_period"]) > max(request_timeout, drain_timeout)


@pytest.mark.parametrize("name", ["vitserve", "vitserve-cpu"])
def test_compose_sets_every_setting_with_its_default(compose: dict[str, Any], name: str) -> None:
    env = compose["services"][name]["environment"]
    defaults = settings_defaults()
    assert set(defaults) <= set(env), f"missing: {sorted(set(defaults) - set(env))}"
    assert set(env) <= set(defaults), f"not a setting: {sorted(set(env) - set(defaults))}"
    for key in (UNSET_ON_PURPOSE - set(CONTAINER_VALUES)) & set(defaults):
        assert env[key] is None, f"{key} must pass through unset (a bare name), not {env[key]!r}"
    overridden = {"VIT_DEVICE", "VIT_DTYPE"} if name == "vitserve-cpu" else set()
    for key, default in defaults.items():
        if key in UNSET_ON_PURPOSE or key in CONTAINER_VALUES or key in overridden or default is None:
            continue
        assert same_value(compose_default(env[key]), default), f"{key}: {env[key]!r} vs default {default!r}"


def test_compose_postgres_for_collections(compose: dict[str, Any]) -> None:
    """Image search: both variants reach one PostgreSQL with pgvector (0.8+) that keeps its data in a named
    volume and is healthy before they start."""
    postgres = compose["services"]["postgres"]
    image, _, tag = postgres["image"].partition(":")
    assert image == "pgvector/pgvector" and tuple(int(x) for x in tag.split("-")[0].split(".")[:2]) >= (0, 8)
    (volume,) = postgres["volumes"]
    name, _, target = volume.partition(":")
    assert name in compose["volumes"] and target == "/var/lib/postgresql/data"
    assert "ports" not in postgres, "the database is reached on the compose network only"
    env = postgres["environment"]
    for service in ("vitserve", "vitserve-cpu"):
        s = compose["services"][service]
        assert s["depends_on"]["postgres"]["condition"] == "service_healthy"
        url = s["environment"]["VIT_COLLECTIONS_URL"]
        assert url == (
            f"postgresql://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/{env['POSTGRES_DB']}"
        )


def test_compose_prometheus_profile(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    (config_mount,) = [v for v in prometheus["volumes"] if isinstance(v, dict)]
    config = load_yaml(ROOT / config_mount["source"])
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (targets,) = [c["targets"] for c in job["static_configs"]]
    aliases = {
        alias
        for name in ("vitserve", "vitserve-cpu")
        for alias in compose["services"][name]["networks"]["default"]["aliases"]
    }
    assert targets == [f"{alias}:{PORT}" for alias in sorted(aliases)]


# -------------------------------------------------------------------------------------------- kubernetes
def test_kustomization_lists_every_manifest() -> None:
    listed = set(load_yaml(K8S / "kustomization.yaml")["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert set(k8s_resources()) == {
        "ConfigMap",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }


def test_configmap_sets_every_setting_with_its_default() -> None:
    data = k8s_resources()["ConfigMap"]["data"]
    defaults = settings_defaults()
    assert set(data) <= set(defaults), f"not a setting: {sorted(set(data) - set(defaults))}"
    assert set(defaults) - set(data) == UNSET_ON_PURPOSE & set(defaults)
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values are strings"
    for key, default in defaults.items():
        if key in data and key not in CONTAINER_VALUES and default is not None:
            assert same_value(data[key], default), f"{key}: {data[key]!r} vs default {default!r}"


def test_deployment_probes_gpu_and_shutdown() -> None:
    resources = k8s_resources()
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (port,) = container["ports"]
    assert port["containerPort"] == PORT and port["name"] == "http"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert probe_path(container["readinessProbe"]) == "/readyz"
    assert probe_path(container["livenessProbe"]) == "/healthz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "time to load and warm the models"
    config = resources["ConfigMap"]
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    data = config["data"]
    longest_drain = max(float(data["VIT_REQUEST_TIMEOUT_S"]), float(data["VIT_DRAIN_TIMEOUT_S"]))
    assert pod["terminationGracePeriodSeconds"] > prestop_sleep_s(container) + longest_drain
    assert pod["enableServiceLinks"] is False, "service links would inject *_PORT variables"
    env = {e["name"]: e for e in container["env"]}
    url = env["VIT_COLLECTIONS_URL"]["valueFrom"]["secretKeyRef"]
    assert url["name"] == "vitserve-collections" and url["key"] == "url", "the shared database's URL, from a Secret"


def test_deployment_security_and_volumes() -> None:
    resources = k8s_resources()
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid()
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    if security.get("readOnlyRootFilesystem"):
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "a read-only root needs a writable /tmp"
    models = mounts[resources["ConfigMap"]["data"]["VIT_MODELS_DIR"]]
    assert models["readOnly"] is True
    claim = volumes[models["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == resources["PersistentVolumeClaim"]["metadata"]["name"]


def test_service_hpa_and_pdb_select_the_deployment() -> None:
    resources = k8s_resources()
    deployment = resources["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    service = resources["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in ("http", PORT)
    hpa = resources["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    pdb = resources["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    # A drain must be possible at the HPA's floor: more replicas than the budget keeps.
    assert hpa["minReplicas"] > pdb["minAvailable"] >= 1


# -------------------------------------------------------------------------------------------- KServe
def load_kserve_checker() -> Any:
    spec = importlib.util.spec_from_file_location("check_kserve", ROOT / "scripts" / "check_kserve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kserve_required_fields() -> None:
    checker = load_kserve_checker()
    files = sorted(KSERVE.glob("*.yaml"))
    assert files
    with_pod_schema = importlib.util.find_spec("kubernetes_validate") is not None
    for path in files:
        assert checker.check_file(path, pod_schema=with_pod_schema) == [], path


def test_kserve_rejects_what_kserve_rejects() -> None:
    """The checker itself: a resource missing what KServe requires is reported."""
    checker = load_kserve_checker()
    good = load_yaml(KSERVE / "inferenceservice.yaml")
    assert checker.check_inference_service(good, pod_schema=False) == []
    bad_name = {**good, "metadata": {"name": "ViT_Serve"}}
    no_predictor = {**good, "spec": {}}
    no_image = {**good, "spec": {"predictor": {"containers": [{"name": "kserve-container"}]}}}
    wrong_api = {**good, "apiVersion": "serving.kserve.io/v1alpha1"}
    for doc in (bad_name, no_predictor, no_image, wrong_api):
        assert checker.check_inference_service(doc, pod_schema=False), doc


def test_kserve_custom_predictor_runs_our_image() -> None:
    isvc = load_yaml(KSERVE / "inferenceservice.yaml")
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    image_name = load_yaml(K8S / "kustomization.yaml")["images"][0]["name"]
    assert container["image"].split(":")[0] == image_name
    assert [p["containerPort"] for p in container["ports"]] == [PORT]
    args = container["args"]
    assert args[args.index("--port") + 1] == str(PORT) and args[args.index("--host") + 1] == "0.0.0.0"
    # The v2 protocol's health routes answer as /readyz and /healthz do.
    assert probe_path(container["readinessProbe"]) in {"/readyz", "/v2/health/ready"}
    assert probe_path(container["livenessProbe"]) in {"/healthz", "/v2/health/live"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["VIT_MODELS_DIR"] == "/mnt/models" and env["STORAGE_URI"].startswith("pvc://")
    longest_drain = max(float(env["VIT_REQUEST_TIMEOUT_S"]), float(env["VIT_DRAIN_TIMEOUT_S"]))
    assert predictor["terminationGracePeriodSeconds"] > prestop_sleep_s(container) + longest_drain
    runtime_isvc = load_yaml(KSERVE / "inferenceservice-runtime.yaml")
    assert runtime_isvc["spec"]["predictor"]["model"]["protocolVersion"] == "v2"
    assert load_yaml(KSERVE / "servingruntime.yaml")["spec"]["protocolVersions"] == ["v2"]
