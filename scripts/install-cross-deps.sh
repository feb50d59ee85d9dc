#!/usr/bin/env bash
# Installs what `make deb-all` and the ARM smoke tests (tests/arm/smoke.sh) need on a fresh
# amd64 Debian machine, skipping what is there: the Rust targets for arm64 and armhf, Debian's
# cross compilers with their C libraries (ring and the bundled SQLite are C; the cross gcc also
# links, see .cargo/config.toml), qemu-user-static to run the ARM binaries, and cargo-deb.
# Fails loudly, naming what is missing: the ARM packages are never skipped silently.
set -euo pipefail
RUST_TARGETS=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
PACKAGES=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf libc6-dev-armhf-cross
    qemu-user-static lintian binutils dpkg-dev)
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

command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --quiet \
    || fail "cannot install cargo-deb"
