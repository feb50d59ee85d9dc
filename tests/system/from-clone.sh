#!/bin/bash
# The newcomer's path through the system test: a fresh clone under /tmp, with its .venv inside
# the clone, runs its own tests/system/run.sh. The container mounts a fresh tmpfs on /tmp, so
# this passes only if run.sh brings in everything it needs instead of reading the checkout.
#
#   sudo bash tests/system/from-clone.sh target/debian/iot-cognito-relay_*.deb
#
# The clone is of the committed HEAD. `make deps` in the clone would download the venv's
# packages again; instead the clone gets a venv of its own at its own path (its scripts name
# that path) holding this checkout's packages, hard-linked (copied across filesystems). Nothing
# in it may lead back here: the container sees the clone's venv, not this checkout, which may
# itself sit under /tmp (a .pth file naming it failed there).
set -euo pipefail
if [[ $# -ne 1 || ! -f ${1:-} ]]; then
    echo "usage: $0 path/to/iot-cognito-relay_VERSION_ARCH.deb" >&2
    exit 2
fi
deb=$(readlink -f "$1")
repo=$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)
source_venv=$(readlink -f "${RELAY_TEST_VENV:-$repo/.venv}")
[[ -x $source_venv/bin/moto_server ]] || { echo "$0: no moto_server in $source_venv" >&2; exit 2; }

tmp=$(mktemp -d /tmp/icr-clone.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
clone=$tmp/iot-cognito-relay
git clone --quiet "$repo" "$clone"

purelib() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
"$source_venv/bin/python3" -m venv --without-pip "$clone/.venv"
source_lib=$(purelib "$source_venv/bin/python3")
clone_lib=$(purelib "$clone/.venv/bin/python3")
# Hard links cost neither time nor space, and nothing rewrites these files in place (Python
# replaces a stale .pyc with a new file).
rm -rf "$clone_lib"
cp -al "$source_lib" "$clone_lib" 2>/dev/null || { rm -rf "$clone_lib"; cp -a "$source_lib" "$clone_lib"; }
cat >"$clone/.venv/bin/moto_server" <<SCRIPT
#!$clone/.venv/bin/python3
import sys
from moto.server import main
sys.exit(main())
SCRIPT
chmod 755 "$clone/.venv/bin/moto_server"
"$clone/.venv/bin/python3" -c 'import moto, boto3' || { echo "$0: the clone's venv is broken" >&2; exit 1; }

echo "--- running the system test from $clone (venv $clone/.venv)" >&2
cd "$clone"
env -u RELAY_TEST_VENV bash tests/system/run.sh "$deb"
