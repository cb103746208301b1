#!/usr/bin/env bash
# Install the browser the playground's tests drive (tests/http/test_playground.py):
# Debian's `chromium` package, only when /usr/bin/chromium is missing. Playwright's
# Python package drives it through `executable_path`; it never downloads a browser
# of its own (do not run `playwright install`).
# Usage: scripts/install-test-browser.sh
# Idempotent; does nothing, quickly, when chromium is there.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi

echo "install-test-browser: installing chromium (Debian)" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    chromium >/dev/null
