#!/usr/bin/env bash
# Builds the daemon for the packages and the static tarballs with cargo zigbuild (zig links
# and compiles the C parts; scripts/install-cross-deps.sh installs it):
#   packages: x86_64, aarch64 and ARMv6 hard-float (armhf, Raspberry Pi Zero/1 and later)
#             against glibc 2.28's symbols (the `.2.28` suffix);
#   static:   musl for x86_64, aarch64, ARMv7 and ARMv6.
# Usage: scripts/build-targets.sh [--profile NAME] packages|static|all
# Default profile: release (what ships); CI passes --profile ci (no LTO, Cargo.toml).
# Prints one line per binary: RUST_TARGET PATH (the target without the glibc suffix).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGE_TARGETS=(x86_64-unknown-linux-gnu.2.28 aarch64-unknown-linux-gnu.2.28 arm-unknown-linux-gnueabihf.2.28)
STATIC_TARGETS=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf
    arm-unknown-linux-musleabihf)
# rustup has no std for these: it is built from rust-src (-Zbuild-std, RUSTC_BOOTSTRAP on stable).
NO_PREBUILT_STD=(arm-unknown-linux-gnueabihf armv7-unknown-linux-musleabihf arm-unknown-linux-musleabihf)

fail() { echo "build-targets: $*" >&2; exit 1; }

profile=release
if [ "${1:-}" = --profile ]; then profile=${2:?--profile needs a name}; shift 2; fi
case "${1:-}" in
    packages) targets=("${PACKAGE_TARGETS[@]}") ;;
    static) targets=("${STATIC_TARGETS[@]}") ;;
    all) targets=("${PACKAGE_TARGETS[@]}" "${STATIC_TARGETS[@]}") ;;
    *) fail "usage: $0 [--profile NAME] packages|static|all" ;;
esac

VENV=$PWD/.venv-cross
[ -x "$VENV/bin/cargo-zigbuild" ] || fail "$VENV/bin/cargo-zigbuild is missing: run scripts/install-cross-deps.sh"
# cargo-zigbuild finds zig as `python3 -m ziglang`: the venv's python3 first on PATH.
export PATH=$VENV/bin:$PATH
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

with_std=() without_std=()
for target in "${targets[@]}"; do
    case " ${NO_PREBUILT_STD[*]} " in
        *" ${target%.2.*} "*) without_std+=("$target") ;;
        *) with_std+=("$target") ;;
    esac
done

# One cargo run per group, every target of it at once: the host's build scripts and proc
# macros are built once, and the long single-threaded crates (the AWS SDKs, the final link) of
# different targets run side by side on all cores.
build() {
    local t=$SECONDS
    echo "== cargo zigbuild --profile $profile $* (${#targets[@]} targets in all)" >&2
    cargo zigbuild --locked --profile "$profile" --bin iot-cognito-relay "$@" >&2 \
        || fail "cargo zigbuild $* failed"
    echo "== cargo zigbuild took $((SECONDS - t)) s" >&2
}
if [ ${#with_std[@]} -gt 0 ]; then
    build "${with_std[@]/#/--target=}"
fi
if [ ${#without_std[@]} -gt 0 ]; then
    # panic_abort: the std build needs it listed, though the binary unwinds (the profile's default).
    RUSTC_BOOTSTRAP=1 build -Zbuild-std=std,panic_abort "${without_std[@]/#/--target=}"
fi

for target in "${targets[@]}"; do
    triple=${target%.2.*}
    bin=$TARGET_DIR/$triple/$profile/iot-cognito-relay
    [ -x "$bin" ] || fail "cargo zigbuild --target $target wrote no $bin"
    echo "$triple $bin"
done
