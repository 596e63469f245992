#!/usr/bin/env bash
# Installs what tests/test_dashboard.py drives: Debian's Chromium and ChromeDriver (the browser test
# starts /usr/bin/chromium headless through Playwright; Playwright's own browser downloads are never
# used). Idempotent: does nothing when both are already installed.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
chromium --version
