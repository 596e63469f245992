#!/usr/bin/env bash
# Installs Debian's podman (with runc: crun fails on hybrid cgroups), podman-compose, debootstrap
# and iptables (netavark publishes ports with it) for scripts/ci-podman-stack.sh, which
# tests/test_compose_podman.py runs. Idempotent: does nothing when they are installed.
set -euo pipefail
missing=0
for tool in podman runc podman-compose debootstrap iptables; do
    command -v "$tool" >/dev/null || missing=1
done
if [ "$missing" = 0 ]; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    podman runc podman-compose debootstrap iptables netavark aardvark-dns ca-certificates >/dev/null
podman --version
