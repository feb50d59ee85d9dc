#!/usr/bin/env bash
# The release tarball for one architecture (`make dist` calls it per static binary):
#
#   scripts/tarball.sh BINARY NAME OUTDIR      NAME: x86_64, aarch64, armv7 or armv6
#
# writes OUTDIR/iot-cognito-relay-<version>-<NAME>.tar.gz and prints its path. One top-level
# directory holds the binary, install.sh (with the version and NAME filled in), the unit, the
# sysusers and tmpfiles snippets, an OpenRC service script, the default config, the man pages,
# the completions, README, LICENSE and the docs. The binary must be for NAME's machine (ELF
# header; ARMv6 or v7 from its build attributes) and static: a tarball is for systems without
# a matching libc. TARBALL_ALLOW_DYNAMIC=1 lets a dynamic binary in, for tests on this machine.
#
# Reproducible for the same inputs: entries sorted, owner root, fixed modes, every mtime set to
# SOURCE_DATE_EPOCH (default: the last commit's time), gzip without name or timestamp.
set -euo pipefail

usage() { echo "usage: $0 BINARY NAME(x86_64|aarch64|armv7|armv6) OUTDIR" >&2; exit 2; }
fail() { echo "tarball: $*" >&2; exit 1; }

[ $# -eq 3 ] || usage
binary=$1 name=$2 outdir=$3
repo=$(cd "$(dirname "$0")/.." && pwd)

for command in readelf tar gzip git sed; do
    command -v "$command" >/dev/null || fail "$command is missing (binutils, tar, gzip, git, sed)"
done
[ -f "$binary" ] || fail "$binary: no such file"

# NAME -> the ELF machine readelf prints, and the ARM architecture the binary must target.
case "$name" in
    x86_64) machine="Advanced Micro Devices X86-64" cpu_arch= ;;
    aarch64) machine=AArch64 cpu_arch= ;;
    armv7) machine=ARM cpu_arch=v7 ;;
    armv6) machine=ARM cpu_arch=v6 ;;
    *) usage ;;
esac
elf_machine=$(readelf -h "$binary" 2>/dev/null | sed -n 's/^ *Machine: *//p')
[ "$elf_machine" = "$machine" ] || fail "$binary is for '${elf_machine:-not an ELF file}', not $name"
if [ -n "$cpu_arch" ]; then
    # Tag_CPU_arch: v7 for armv7, v6 (or v6KZ, the ARM1176 of the Pi Zero/1) for armv6.
    tag=$(readelf -A "$binary" | sed -n 's/^ *Tag_CPU_arch: *//p')
    case "$cpu_arch:$tag" in
        v7:v7 | v6:v6 | v6:v6KZ | v6:v6K) ;;
        *) fail "$binary targets ARM ${tag:-(no Tag_CPU_arch)}, not $cpu_arch" ;;
    esac
fi
if readelf -l "$binary" | grep -q 'program interpreter' && [ "${TARBALL_ALLOW_DYNAMIC:-}" != 1 ]; then
    fail "$binary is dynamically linked: the tarball needs the static (musl) build"
fi

version=$(sed -n '/^\[package\]/,/^\[/ s/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml")
[ -n "$version" ] || fail "no version in $repo/Cargo.toml"
top=iot-cognito-relay-$version-$name
mtime=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || echo 0)}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stage=$work/$top
mkdir -p "$stage/man" "$stage/completions" "$stage/docs"

put() { # put MODE SOURCE DEST (relative to the top directory)
    cp "$2" "$stage/$3"
    chmod "$1" "$stage/$3"
}
put 0755 "$binary" iot-cognito-relay
sed -e "s/@VERSION@/$version/g" -e "s/@ARCH@/$name/g" "$repo/packaging/install.sh" >"$stage/install.sh"
chmod 0755 "$stage/install.sh"
if grep -q -e @VERSION@ -e @ARCH@ "$stage/install.sh"; then fail "install.sh kept a placeholder"; fi
put 0644 "$repo/packaging/iot-cognito-relay.service" iot-cognito-relay.service
put 0644 "$repo/packaging/iot-cognito-relay.sysusers" iot-cognito-relay.sysusers
put 0644 "$repo/packaging/iot-cognito-relay.tmpfiles" iot-cognito-relay.tmpfiles
put 0644 "$repo/packaging/iot-cognito-relay.openrc" iot-cognito-relay.openrc
put 0644 "$repo/config/config.toml" config.toml
put 0644 "$repo/README.md" README.md
put 0644 "$repo/LICENSE" LICENSE
for page in "$repo"/packaging/man/*.1; do put 0644 "$page" "man/$(basename "$page")"; done
for file in iot-cognito-relay.bash _iot-cognito-relay iot-cognito-relay.fish; do
    put 0644 "$repo/packaging/completions/$file" "completions/$file"
done
for doc in "$repo"/docs/*.md; do put 0644 "$doc" "docs/$(basename "$doc")"; done
chmod 0755 "$stage" "$stage"/*/

mkdir -p "$outdir"
out=$(cd "$outdir" && pwd)/$top.tar.gz
tar --sort=name --format=gnu --owner=0 --group=0 --numeric-owner --mtime="@$mtime" \
    -C "$work" -cf - "$top" | gzip -9 -n >"$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
