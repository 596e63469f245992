#!/usr/bin/env bash
# Installs Debian's docker-compose (v1.29, Python) for tests/test_compose.py, which runs
# `docker-compose config` to validate docker-compose.yml without a Docker engine.
# Idempotent: does nothing when it is already installed.
set -euo pipefail
if command -v docker-compose >/dev/null; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
docker-compose version --short
