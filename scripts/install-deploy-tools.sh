#!/usr/bin/env bash
# Install the Debian tools `make check-deploy` needs, only those missing:
#   docker-compose  Debian's package (Compose v1; `docker compose` v2 works too)
#   promtool        taken out of Debian's `prometheus` package into BIN, not
#                   installed: installing the package would set up a Prometheus
#                   daemon (which listens on 9090, SIA's HTTP port) and pull in
#                   a dozen JavaScript packages for its web UI.
# Usage: scripts/install-deploy-tools.sh BIN   (BIN: the virtualenv's bin folder)
# Idempotent; does nothing, quickly, when both tools are there.
set -euo pipefail

bin=${1:?usage: $0 BIN}
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi

apt_updated=""
apt_update() {
    if [ -z "$apt_updated" ]; then
        $sudo apt-get update -qq
        apt_updated=1
    fi
}

if ! command -v docker-compose >/dev/null && ! docker compose version >/dev/null 2>&1; then
    echo "install-deploy-tools: installing docker-compose (Debian)" >&2
    apt_update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        docker-compose >/dev/null
fi

if ! command -v promtool >/dev/null && [ ! -x "$bin/promtool" ]; then
    echo "install-deploy-tools: unpacking promtool from Debian's prometheus package" >&2
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    chmod 777 "$tmp" # apt-get download drops privileges to _apt where it can
    if ! (cd "$tmp" && apt-get download -qq prometheus 2>/dev/null); then
        apt_update
        (cd "$tmp" && apt-get download -qq prometheus)
    fi
    dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
    install -m 0755 "$tmp/usr/bin/promtool" "$bin/promtool"
fi
