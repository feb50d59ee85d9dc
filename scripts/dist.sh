#!/usr/bin/env bash
# `make dist`: a release's artifacts in target/dist/, release profile (fat LTO):
#   iot-cognito-relay_VERSION-1_{amd64,arm64,armhf}.deb   (scripts/deb-all.sh, glibc >= 2.28)
#   iot-cognito-relay-VERSION-{x86_64,aarch64,armv7,armv6}-linux-musl.tar.gz
#       (static musl binaries, each with its unit, config, man pages and install.sh: scripts/tarball.sh)
#   SHA256SUMS
# each smoke-tested first (tests/arm/smoke.sh, without the end-to-end demo: `make arm-smoke`).
# Outside CI: a release build of the seven binaries takes long (README "Releases").
# Usage: scripts/dist.sh [--profile NAME] (another profile only to try this script quickly).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=target/dist
profile=release
if [ "${1:-}" = --profile ]; then profile=${2:?--profile needs a name}; fi

fail() { echo "dist: $*" >&2; exit 1; }
[ -f scripts/tarball.sh ] || fail "scripts/tarball.sh (the static tarballs' layout and install.sh) is missing"
WORK=$(mktemp -d /tmp/iot-cognito-relay-dist.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

bash scripts/install-cross-deps.sh
# All seven binaries in one go, so both cargo runs keep every core busy; deb-all then finds
# its three built.
bash scripts/build-targets.sh --profile "$profile" all >"$WORK/built"
bash scripts/deb-all.sh --profile "$profile" >"$WORK/debs"
mapfile -t debs <"$WORK/debs"
[ ${#debs[@]} = 3 ] || fail "expected 3 packages from deb-all.sh, got ${#debs[@]}"

rm -rf "$OUT"
mkdir -p "$OUT"
cp "${debs[@]}" "$OUT/"
statics=()
while read -r target bin; do
    case "$target" in
        *-linux-gnu*) continue ;;
        x86_64-unknown-linux-musl) name=x86_64 ;;
        aarch64-unknown-linux-musl) name=aarch64 ;;
        armv7-unknown-linux-musleabihf) name=armv7 ;;
        arm-unknown-linux-musleabihf) name=armv6 ;;
        *) fail "no tarball name for $target" ;;
    esac
    statics+=("$target=$bin")
    tarball=$(bash scripts/tarball.sh "$bin" "$name" "$OUT" | tail -n 1)
    [ -f "$tarball" ] || fail "scripts/tarball.sh $bin $name wrote no tarball"
    echo "== $(basename "$tarball")" >&2
done <"$WORK/built"
[ ${#statics[@]} = 4 ] || fail "expected 4 static binaries, built ${#statics[@]}"

bash tests/arm/smoke.sh "$OUT"/*.deb "${statics[@]}"
(cd "$OUT" && sha256sum -- *.deb *.tar.gz >SHA256SUMS)
ls -1 "$OUT"
