#!/usr/bin/env bash
# `make deb-all`: the three .debs, amd64, arm64 and armhf (ARMv6 + VFP hard-float, as Raspberry
# Pi OS's own armhf: Pi Zero/1 and every later Pi), each built by scripts/build-targets.sh
# against glibc 2.28's symbols, each lintian-clean like the amd64 one in `make system-test`,
# copied to target/debian-all/. Prints their paths.
# Usage: scripts/deb-all.sh [--profile NAME]; release by default, CI passes --profile ci.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=target/debian-all
profile=release
if [ "${1:-}" = --profile ]; then profile=${2:?--profile needs a name}; fi

fail() { echo "deb-all: $*" >&2; exit 1; }
WORK=$(mktemp -d /tmp/iot-cognito-relay-deb-all.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

bash scripts/install-cross-deps.sh
bash scripts/build-targets.sh --profile "$profile" packages >"$WORK/built"

# The newest GLIBC_ version the binary needs (its .gnu.version_r section), e.g. 2.28.
newest_glibc() {
    readelf --version-info --wide "$1" | sed -n '/Version needs section/,$p' \
        | grep -o 'Name: GLIBC_[0-9][0-9.]*' | sed 's/Name: GLIBC_//' | sort -V | tail -n 1
}

# cargo-deb's $auto takes libc6's version from dpkg-shlibdeps, which for a cross target reads
# the cross libc's shlibs file (the build machine's glibc, 2.36 on Debian 12), not the symbols
# the binary uses. The libc6 entry is set to the binary's newest GLIBC_ need instead and the
# package rebuilt with dpkg-deb: cargo-deb takes no computed dependency.
set_libc6_floor() {
    local deb=$1 floor=$2 root=$WORK/root
    rm -rf "$root"
    dpkg-deb --raw-extract "$deb" "$root"
    grep -q '^Depends:.*libc6' "$root/DEBIAN/control" || fail "$deb: cargo-deb wrote no libc6 dependency"
    sed -i "/^Depends:/s/libc6\(:[a-z0-9]*\)\? ([^)]*)/libc6 (>= $floor)/" "$root/DEBIAN/control"
    # The directories extraction created carry its time: back to cargo-deb's, for a package
    # that only differs in its Depends line.
    local stamp
    stamp=$(stat -c %Y "$root/etc")
    find "$root" -path "$root/DEBIAN" -prune -o -newermt "@$stamp" -exec touch -h -d "@$stamp" {} +
    dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
}

rm -rf "$OUT"
mkdir -p "$OUT"
while read -r target bin; do
    echo "== cargo deb --no-build --target $target --profile $profile" >&2
    # The last line cargo-deb prints is the package's path. --fast: dpkg-deb compresses it again.
    deb=$(cargo deb --quiet --fast --no-build --target "$target" --profile "$profile" | tail -n 1)
    [ -f "$deb" ] || fail "cargo deb --target $target wrote no package"
    floor=$(newest_glibc "$bin")
    [ -n "$floor" ] || fail "$bin needs no GLIBC_ version: not a glibc binary?"
    set_libc6_floor "$deb" "$floor"
    echo "   $(basename "$deb"): Depends: $(dpkg-deb --field "$deb" Depends)" >&2
    lintian --fail-on error,warning --suppress-tags initial-upload-closes-no-bugs "$deb" >&2
    cp "$deb" "$OUT/"
done <"$WORK/built"
ls -1 "$OUT"/*.deb
