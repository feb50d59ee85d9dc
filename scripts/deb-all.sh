#!/usr/bin/env bash
# `make deb-all`: the three .debs (amd64 native, arm64 and armhf cross-built with the same
# release profile; .cargo/config.toml names the cross linkers), each lintian-clean like the
# amd64 one in `make system-test`, copied to target/debian-all/. Prints their paths.
set -euo pipefail
cd "$(dirname "$0")/.."
CROSS_TARGETS=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
OUT=target/debian-all

bash scripts/install-cross-deps.sh
# Both ARM targets in one cargo run: their long single-threaded steps (the largest SDK crate,
# the fat LTO link) then run side by side on two cores instead of one after the other.
echo "== cargo build --release ${CROSS_TARGETS[*]/#/--target }" >&2
cargo build --release --bin iot-cognito-relay "${CROSS_TARGETS[@]/#/--target=}"

rm -rf "$OUT"
mkdir -p "$OUT"
for target in "" "${CROSS_TARGETS[@]}"; do
    echo "== cargo deb ${target:+--target $target}" >&2
    # The ARM binaries are built above; the last line cargo-deb prints is the package's path.
    deb=$(cargo deb --quiet ${target:+--no-build --target "$target"} | tail -n 1)
    [ -f "$deb" ] || { echo "deb-all: cargo deb ${target} wrote no package" >&2; exit 1; }
    lintian --fail-on error,warning --suppress-tags initial-upload-closes-no-bugs "$deb" >&2
    cp "$deb" "$OUT/"
done
ls -1 "$OUT"/*.deb
