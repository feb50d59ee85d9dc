#!/usr/bin/env bash
# Smoke test of a built .deb on an amd64 machine, ARM ones under user-mode emulation
# (qemu-user-static with the cross sysroot as library root; scripts/install-cross-deps.sh
# installs both). Usage: tests/arm/smoke.sh [--e2e] PACKAGE.deb...
# For each package: its Architecture matches the binary's ELF machine, the binary needs only
# libc-family libraries, `--version` prints the package's version, and `check-config` accepts
# the config the package ships (with the two identity keys set as environment overrides, as an
# operator's config would). With --e2e, the end-to-end demo (scripts/demo.sh: moto + mosquitto
# in a network namespace, five readings through the socket to the broker) runs that binary too.
# Emulation is slow: no timing here is a performance figure. Needs root for --e2e.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

E2E=false
if [ "${1:-}" = --e2e ]; then E2E=true; shift; fi
[ $# -gt 0 ] || { echo "usage: $0 [--e2e] PACKAGE.deb..." >&2; exit 2; }

# The emulated daemon needs more than the native 10 s to listen (tenths of a second).
EMULATED_WAIT_TENTHS=600
POOL_ID="us-east-1:0b7c5a57-6a4f-4a62-9d36-3f1c0e3b6a11"
SECRET_ID="us-east-1_AbCdEfGhI_smoke-test"

WORK=$(mktemp -d /tmp/iot-cognito-relay-smoke.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
fail() { echo "smoke: FAIL: $*" >&2; exit 1; }

passed=0
for deb in "$@"; do
    [ -f "$deb" ] || fail "$deb: no such package"
    arch=$(dpkg-deb --field "$deb" Architecture)
    version=$(dpkg-deb --field "$deb" Version)
    # Debian architecture -> ELF machine (as readelf prints it), emulator and cross sysroot.
    case "$arch" in
        amd64) machine="Advanced Micro Devices X86-64" runner=() ;;
        arm64) machine=AArch64 runner=(qemu-aarch64-static -L /usr/aarch64-linux-gnu) ;;
        armhf) machine=ARM runner=(qemu-arm-static -L /usr/arm-linux-gnueabihf) ;;
        *) fail "$deb: unexpected Architecture $arch" ;;
    esac
    echo "== $(basename "$deb"): $arch, version $version"
    root=$WORK/$arch
    dpkg-deb -x "$deb" "$root"
    bin=$root/usr/bin/iot-cognito-relay
    [ -x "$bin" ] || fail "$deb ships no usr/bin/iot-cognito-relay"

    elf_machine=$(readelf -h "$bin" | sed -n 's/^ *Machine: *//p')
    [ "$elf_machine" = "$machine" ] || fail "$deb is $arch but its binary is for '$elf_machine'"
    if [ "$arch" = armhf ]; then
        # armhf means the hard-float ABI (armel is the soft-float one).
        readelf -h "$bin" | grep -q 'hard-float ABI' || fail "$deb: binary is not hard-float"
    fi
    # Only libc's own libraries: ring and SQLite are linked in statically.
    needed=$(readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | sort | tr '\n' ' ')
    for lib in $needed; do
        case "$lib" in
            libc.so.*|libm.so.*|libgcc_s.so.*|ld-linux*|libdl.so.*|libpthread.so.*|librt.so.*) ;;
            *) fail "$deb: binary needs $lib, which the package does not depend on" ;;
        esac
    done
    depends=$(dpkg-deb --field "$deb" Depends)
    grep -q 'libc6' <<<"$depends" || fail "$deb: Depends '$depends' lacks libc6"
    if grep -q 'cross' <<<"$depends"; then fail "$deb: Depends '$depends' names a cross package"; fi
    echo "   ELF $elf_machine, needs: $needed; Depends: $depends"

    out=$("${runner[@]}" "$bin" --version) || fail "$deb: --version exited $?"
    [ "$out" = "iot-cognito-relay ${version%%-*}" ] || fail "$deb: --version printed '$out'"
    echo "   --version: $out"

    # The shipped conffile as installed, plus the two keys the operator must set.
    cp "$root/etc/iot-cognito-relay/config.toml" "$WORK/config-$arch.toml"
    chmod 0644 "$WORK/config-$arch.toml"
    effective=$(env -u RUST_LOG IOT_COGNITO_RELAY__IDENTITY__IDENTITY_POOL_ID="$POOL_ID" \
        IOT_COGNITO_RELAY__IDENTITY__SECRET_ID="$SECRET_ID" \
        "${runner[@]}" "$bin" check-config --config "$WORK/config-$arch.toml") \
        || fail "$deb: check-config on the shipped config exited $?"
    grep -qF "identity_pool_id = \"$POOL_ID\"" <<<"$effective" \
        || fail "$deb: check-config did not print the effective config: $effective"
    grep -qF 'region = "us-east-1"' <<<"$effective" || fail "$deb: defaults missing: $effective"
    # Without the identity keys the shipped config must be refused (exit 2, naming the key).
    set +e
    refused=$(env -u RUST_LOG "${runner[@]}" "$bin" check-config --config "$WORK/config-$arch.toml" 2>&1)
    code=$?
    set -e
    [ "$code" = 2 ] && grep -q identity <<<"$refused" \
        || fail "$deb: check-config without identity keys exited $code: $refused"
    echo "   check-config: shipped config accepted with identity keys, refused without (exit 2)"

    if $E2E; then
        echo "   end-to-end demo under ${runner[*]:-native execution}"
        RELAY_BIN=$bin RELAY_RUNNER="${runner[*]}" RELAY_WAIT_TENTHS=$EMULATED_WAIT_TENTHS \
            bash "$ROOT/scripts/demo.sh" >"$WORK/demo-$arch.log" 2>&1 \
            || { cat "$WORK/demo-$arch.log" >&2; fail "$deb: end-to-end demo failed"; }
        received=$(sed -n '/== what the broker received/,/== daemon status/p' "$WORK/demo-$arch.log" \
            | grep -c '/sensors/temperature {"celsius"' || true)
        [ "$received" = 5 ] || { cat "$WORK/demo-$arch.log" >&2; fail "$deb: broker got $received of 5 readings"; }
        echo "   end-to-end: broker received 5 of 5 readings"
    fi
    passed=$((passed + 1))
done
echo "smoke: $passed passed, 0 failed"
