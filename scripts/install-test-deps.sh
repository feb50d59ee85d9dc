#!/usr/bin/env bash
# Installs what the tests and the demo need on a fresh Debian machine, skipping what is there:
# mosquitto (+ clients), openssl, iproute2, sqlite3, libfaketime, lintian, e2fsprogs (the
# failing-disk test formats a loop device), passwd (throwaway users), tinyproxy (the proxy
# test's real HTTP proxy), nftables (it blocks the direct routes), procps (sysctl), busybox (the
# tarball's install.sh under BusyBox ash), cargo-deb, and a
# Python venv (.venv) with the packages of requirements-dev.txt (moto[server], boto3, cfn-lint,
# checkov, pytest…) and benches/python/requirements.txt (awsiotsdk for the peer relay, matplotlib).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(mosquitto mosquitto-clients openssl iproute2 sqlite3 libfaketime socat jq lintian systemd util-linux
    e2fsprogs passwd tinyproxy-bin nftables procps busybox)
missing=()
for package in "${PACKAGES[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The broker is started by the tests themselves, never as a system service.
systemctl disable --now mosquitto >/dev/null 2>&1 || true

if [ ! -x .venv/bin/python3 ] || ! .venv/bin/python3 -c 'import moto, boto3' 2>/dev/null; then
    PYTHON=${PYTHON:-python3}
    if ! "$PYTHON" -m venv .venv 2>/dev/null; then
        apt-get install -y -qq python3-venv
        /usr/bin/python3 -m venv .venv
    fi
fi
.venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt -r benches/python/requirements.txt

# The .deb for the system test (make system-test).
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --quiet
