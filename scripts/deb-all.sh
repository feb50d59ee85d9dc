#!/usr/bin/env bash
# `make deb-all`: the three .debs (amd64 native, arm64 and armhf cross-built with the same
# release profile; .cargo/config.toml names the cross linkers), each lintian-clean like the
# amd64 one in `make system-test`, copied to target/debian-all/. Prints their paths.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGETS=("" aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
OUT=target/debian-all

bash scripts/install-cross-deps.sh
rm -rf "$OUT"
mkdir -p "$OUT"
for target in "${TARGETS[@]}"; do
    echo "== cargo deb ${target:+--target $target}" >&2
    # The last line cargo-deb prints is the package's path.
    deb=$(cargo deb --quiet ${target:+--target "$target"} | tail -n 1)
    [ -f "$deb" ] || { echo "deb-all: cargo deb ${target} wrote no package" >&2; exit 1; }
    lintian --fail-on error,warning --suppress-tags initial-upload-closes-no-bugs "$deb" >&2
    cp "$deb" "$OUT/"
done
ls -1 "$OUT"/*.deb
