#!/usr/bin/env bash
# Prints the directory of an old glibc userland for one Debian architecture (amd64, arm64 or
# armhf): libc6 and libgcc-s1 of the oldest Debian release reachable here, extracted, for
# tests/arm/smoke.sh to run a package's binary against. Buster (glibc 2.28, the packages'
# floor) is tried first; it has left deb.debian.org, so where its archive is not reachable
# bullseye (glibc 2.31) is used, and said on stderr. apt itself downloads them (a private
# configuration and state: nothing of the system's apt changes), checking the release's
# signature with Debian's archive keyring and each package's hash.
# Cached under ${CARGO_TARGET_DIR:-target}/old-glibc/; fails loudly when nothing is reachable.
# Usage: tests/arm/old-glibc.sh ARCH
set -euo pipefail
cd "$(dirname "$0")/../.."
ARCH=${1:?usage: $0 amd64|arm64|armhf}
ARCHES=(amd64 arm64 armhf)
PACKAGES=(libc6 libgcc-s1)
# Oldest first; each with the archive that still serves it.
SUITES=("buster http://deb.debian.org/debian" "bullseye http://deb.debian.org/debian")
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
CACHE=$TARGET_DIR/old-glibc

fail() { echo "old-glibc: $*" >&2; exit 1; }
case " ${ARCHES[*]} " in *" $ARCH "*) ;; *) fail "unknown architecture $ARCH (one of ${ARCHES[*]})" ;; esac

if [ ! -f "$CACHE/done" ]; then
    [ -f "$KEYRING" ] || fail "$KEYRING is missing (package debian-archive-keyring)"
    command -v apt-get >/dev/null || fail "apt-get is needed to download the old libc6"
    rm -rf "$CACHE"
    apt_dir=$CACHE/apt
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial"
    touch "$apt_dir/status"
    opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::State::status=$apt_dir/status"
        -o "Dir::Cache=$apt_dir" -o "Dir::Cache::archives=$apt_dir/archives" -o Debug::NoLocking=1
        -o APT::Sandbox::User=root -o Acquire::Languages=none)
    for arch in "${ARCHES[@]}"; do opts+=(-o "APT::Architectures::=$arch"); done
    found=""
    for entry in "${SUITES[@]}"; do
        read -r suite mirror <<<"$entry"
        echo "deb [signed-by=$KEYRING] $mirror $suite main" >"$apt_dir/sources.list"
        # apt-get update exits 0 on a 404; an empty lists directory tells the suite is gone.
        rm -rf "$apt_dir/lists"/*Packages* "$apt_dir/lists"/*Release*
        if apt-get "${opts[@]}" -qq update 2>"$apt_dir/update.log" \
            && compgen -G "$apt_dir/lists/*_dists_${suite}_main_binary-amd64_Packages*" >/dev/null; then
            found=$suite
            break
        fi
        echo "old-glibc: Debian $suite is not reachable at $mirror ($(grep -m1 -E '^(E|W):' "$apt_dir/update.log" || echo 'no package list'))" >&2
    done
    [ -n "$found" ] || fail "no old Debian release is reachable (tried ${SUITES[*]}); cannot test the glibc floor"
    wanted=()
    for arch in "${ARCHES[@]}"; do
        for package in "${PACKAGES[@]}"; do wanted+=("$package:$arch"); done
    done
    (cd "$apt_dir/archives" && apt-get "${opts[@]}" -qq download "${wanted[@]}") \
        || fail "apt-get download ${wanted[*]} from Debian $found failed"
    for arch in "${ARCHES[@]}"; do
        for deb in "$apt_dir/archives"/*_"$arch".deb; do dpkg-deb -x "$deb" "$CACHE/$arch"; done
    done
    version=$(dpkg-deb --field "$(ls "$apt_dir"/archives/libc6_*_amd64.deb)" Version)
    echo "Debian $found, libc6 $version" >"$CACHE/release"
    # The package lists are large and only needed for this download.
    rm -rf "$apt_dir/lists"
    touch "$CACHE/done"
fi
echo "old-glibc: $(cat "$CACHE/release") for $ARCH" >&2
echo "$CACHE/$ARCH"
