#!/usr/bin/env bash
# Installs what `make deb-all`, `make dist` and the smoke tests (tests/arm/smoke.sh) need on a
# fresh amd64 Debian machine, skipping what is there: zig and cargo-zigbuild (pinned, from PyPI,
# into .venv-cross/), which compile the C parts (ring, the bundled SQLite) and link every
# package and static binary against glibc 2.28's symbols or musl; the Rust targets with a
# prebuilt std, and rust-src for the 32-bit ARM ones that have none (-Zbuild-std); Debian's
# cross C libraries as qemu's sysroot (and their cross gcc for `cargo build --target` of the
# ARMv7 glibc target, .cargo/config.toml); qemu-user-static to run the ARM binaries; cargo-deb.
# Fails loudly, naming what is missing: no target is ever skipped silently.
set -euo pipefail
cd "$(dirname "$0")/.."
RUST_TARGETS=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf x86_64-unknown-linux-musl
    aarch64-unknown-linux-musl)
# A venv of its own, not the tests' .venv: a release machine runs `make dist` without the test
# dependencies, and upgrading those never moves the toolchain that links the shipped binaries.
# Versions pinned: zig's bundled glibc stubs and musl decide what the binaries link against.
VENV=.venv-cross
PYPI_PACKAGES=(ziglang==0.15.2 cargo-zigbuild==0.24.1)
PACKAGES=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf libc6-dev-armhf-cross
    qemu-user-static lintian binutils dpkg-dev python3-venv debian-archive-keyring)
# What must exist afterwards, whatever the package names on this release.
COMMANDS=(aarch64-linux-gnu-gcc arm-linux-gnueabihf-gcc aarch64-linux-gnu-readelf
    arm-linux-gnueabihf-readelf qemu-aarch64-static qemu-arm-static lintian readelf dpkg-shlibdeps)
SYSROOTS=(/usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 /usr/arm-linux-gnueabihf/lib/ld-linux-armhf.so.3)

fail() { echo "install-cross-deps: $*" >&2; exit 1; }

missing=()
for package in "${PACKAGES[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || fail "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        || fail "cannot install the cross toolchain: ${missing[*]}"
fi
for command in "${COMMANDS[@]}"; do
    command -v "$command" >/dev/null || fail "$command is missing after installing ${PACKAGES[*]}"
done
for file in "${SYSROOTS[@]}"; do
    [ -e "$file" ] || fail "cross sysroot incomplete: $file is missing"
done

command -v rustup >/dev/null || fail "rustup is needed to add the Rust targets ${RUST_TARGETS[*]}"
installed=$(rustup target list --installed)
for target in "${RUST_TARGETS[@]}"; do
    grep -qx "$target" <<<"$installed" || rustup target add "$target" \
        || fail "cannot add the Rust target $target"
done
rustup component list --installed | grep -q '^rust-src' || rustup component add rust-src \
    || fail "cannot add the rust-src component (needed for -Zbuild-std on the 32-bit ARM targets)"

if ! "$VENV/bin/python3" -c 'import ziglang' 2>/dev/null; then
    rm -rf "$VENV"
    /usr/bin/python3 -m venv "$VENV" || fail "cannot create $VENV (python3-venv)"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check "${PYPI_PACKAGES[@]}" \
    || fail "cannot install ${PYPI_PACKAGES[*]} from PyPI into $VENV"
"$VENV/bin/cargo-zigbuild" --version >/dev/null || fail "$VENV/bin/cargo-zigbuild does not run"
"$VENV/bin/python3" -m ziglang version >/dev/null || fail "zig (python -m ziglang) does not run"

command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --quiet \
    || fail "cannot install cargo-deb"
