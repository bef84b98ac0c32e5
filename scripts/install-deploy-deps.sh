#!/usr/bin/env bash
# install-deploy-deps.sh - the Debian packages the deploy tests need (tests/deploy/), if any
# are missing: Slurm and munge (the Slurm test), podman, buildah, runc and debootstrap
# (the container image test; catatonit: the pods' infra container), iproute2 (emulated hosts). Unattended; uses sudo when not
# root; safe to run again. scripts/test.sh calls it and carries on without them when
# they cannot be installed: the tests that need them then skip with the reason.
# Node.js and npm (manifest validation) are not installed here: the machine's own are used.
set -euo pipefail

PKGS=(slurmctld slurmd slurm-client munge
      podman buildah runc catatonit debootstrap
      iproute2 util-linux)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "install-deploy-deps: installing ${missing[*]}" >&2
$SUDO apt-get update -qq
# The packages' postinst scripts start no daemon on a machine without systemd; the tests
# start their own munged/slurmctld/slurmd under a temporary directory.
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
