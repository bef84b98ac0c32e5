#!/usr/bin/env bash
# image-base.sh - a Debian 12 base image for deploy/Dockerfile on a machine that cannot pull
# from a container registry: debootstrap (minbase) from the Debian mirror apt already uses,
# imported into podman's local storage. Prints the image name on stdout.
#
#   deploy/image-base.sh                 -> localhost/kvrelay-debian:bookworm-<key>
#   podman build --build-arg BASE=$(deploy/image-base.sh) -f deploy/Dockerfile -t kvrelay .
#
# The image is made once and reused: <key> is the ISO week, so it is rebuilt (and picks up
# Debian's updates) at most once a week; older kvrelay-debian images are removed when a
# new one is made. KVR_IMAGE_MIRROR overrides the mirror (default: the first http(s) URI
# of /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list).
set -euo pipefail

key=$(date -u +%G-w%V)
name="localhost/kvrelay-debian:bookworm-$key"
if podman image exists "$name"; then
    echo "$name"
    exit 0
fi
for c in podman debootstrap; do
    command -v $c >/dev/null || { echo "image-base.sh: $c is not installed" >&2; exit 1; }
done

mirror=${KVR_IMAGE_MIRROR:-}
if [ -z "$mirror" ]; then
    mirror=$(grep -hoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/debian.sources \
        /etc/apt/sources.list 2>/dev/null | head -n1 | awk '{print $2}' || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

dir=$(mktemp -d /var/tmp/kvrelay-debootstrap.XXXXXX)
trap 'rm -rf "$dir"' EXIT
echo "image-base.sh: debootstrap bookworm from $mirror (once a week, ~30-60 s)" >&2
t0=$(date +%s)
debootstrap --variant=minbase bookworm "$dir" "$mirror" >"$dir.log" 2>&1 || {
    tail -n 20 "$dir.log" >&2
    rm -f "$dir.log"
    exit 1
}
rm -f "$dir.log"
# The image's apt uses the same mirror; no caches or logs in the layer.
rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/var/log/*
tar -C "$dir" -c . | podman import --quiet - "$name" >/dev/null
echo "image-base.sh: $name made in $(($(date +%s) - t0)) s" >&2
for old in $(podman images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/kvrelay-debian:' | grep -vx "$name" || true); do
    podman rmi "$old" >/dev/null 2>&1 || true
done
echo "$name"
