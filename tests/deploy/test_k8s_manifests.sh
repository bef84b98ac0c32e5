#!/usr/bin/env bash
# test_k8s_manifests.sh - validates deploy/k8s/*.yaml offline (validate_k8s.cjs): the
# Kubernetes schemas of the npm package kubernetes-models@4.5.1 and the MPI Operator's
# MPIJob CRD schema (deploy/k8s/schemas/), after a self-test proving each check can fail.
# The npm packages are installed at test time into a temporary directory from the npm
# registry (npm's own cache makes later runs offline-fast); nothing is committed.
# Exit 0 pass, 1 fail, 77 skip (no node/npm, or the registry unreachable: reason printed).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)
command -v node >/dev/null && command -v npm >/dev/null || { echo "SKIP: node and npm are needed to validate the manifests"; exit 77; }
T=$(mktemp -d "/tmp/kvr-k8s.XXXXXX")
trap 'rm -rf "$T"' EXIT
cd "$T"
echo '{"name":"kvr-k8s-validate","private":true}' >package.json
if ! npm install --no-audit --no-fund --prefer-offline --loglevel=error kubernetes-models@4.5.1 yaml@2 >npm.log 2>&1; then
    if grep -qiE 'ENOTFOUND|ECONNREFUSED|ETIMEDOUT|EAI_AGAIN|network|ECONNRESET' npm.log; then
        echo "SKIP: the npm registry is unreachable, cannot install kubernetes-models: $(grep -m1 -iE 'ENOTFOUND|ECONNREFUSED|ETIMEDOUT|EAI_AGAIN|network|ECONNRESET' npm.log)"
        exit 77
    fi
    cat npm.log
    echo "FAIL: npm install kubernetes-models@4.5.1 yaml@2"
    exit 1
fi
node "$HERE/validate_k8s.cjs" --modules "$T" --schemas "$SRC/deploy/k8s/schemas" --self-test "$SRC"/deploy/k8s/*.yaml
