#!/usr/bin/env bash
# Smoke test of built artifacts on an amd64 machine, foreign ones under user-mode emulation
# (qemu-user-static; scripts/install-cross-deps.sh installs it and the cross sysroots).
# Usage: tests/arm/smoke.sh [--e2e] ARTIFACT...
# where ARTIFACT is a PACKAGE.deb or a static binary as RUST_TARGET=PATH
# (x86_64-unknown-linux-musl, aarch64-unknown-linux-musl, armv7-unknown-linux-musleabihf,
# arm-unknown-linux-musleabihf; scripts/build-targets.sh prints them).
# For a package: its Architecture matches the binary's ELF machine, the binary needs only
# libc-family libraries, Depends' libc6 version is the newest GLIBC_ version the binary needs
# and that is at most the floor (2.28), the armhf binary is ARMv6 (no Thumb-2, VFPv2 at most:
# Raspberry Pi Zero/1), and it runs against the oldest glibc userland reachable from Debian's
# archive (tests/arm/old-glibc.sh) as well as the cross sysroot's.
# For a static binary: ELF machine and ARM architecture as the target says, no interpreter and
# no shared library; the ARMv6 one runs as an ARM1176 (`qemu-arm -cpu arm1176`), the ARMv7 one
# as a Cortex-A7.
# For both: `--version` prints the version, and `check-config` accepts the shipped config (with
# the two identity keys set as environment overrides, as an operator's config would) and
# refuses it without them. With --e2e, the end-to-end demo (scripts/demo.sh: moto + mosquitto in
# a network namespace, five readings through the socket to the broker) runs that binary too.
# Emulation is slow: no timing here is a performance figure. Needs root for --e2e.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

E2E=false
if [ "${1:-}" = --e2e ]; then E2E=true; shift; fi
[ $# -gt 0 ] || { echo "usage: $0 [--e2e] PACKAGE.deb|RUST_TARGET=BINARY..." >&2; exit 2; }

# The packages' promise: they run on glibc 2.28 (Debian 10, Ubuntu 18.04, RHEL 8, Pi OS buster).
GLIBC_FLOOR=2.28
# The emulated daemon needs more than the native 10 s to listen (tenths of a second).
EMULATED_WAIT_TENTHS=600
POOL_ID="us-east-1:0b7c5a57-6a4f-4a62-9d36-3f1c0e3b6a11"
SECRET_ID="us-east-1_AbCdEfGhI_smoke-test"
CARGO_VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)

WORK=$(mktemp -d /tmp/iot-cognito-relay-smoke.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
fail() { echo "smoke: FAIL: $*" >&2; exit 1; }

# `--version` and `check-config` of $bin (with $name, $version, $config set), run by the words given.
run_checks() {
    local label=$1 out effective refused code
    shift
    out=$("$@" "$bin" --version) || fail "$name: --version ($label) exited $?"
    [ "$out" = "iot-cognito-relay $version" ] || fail "$name: --version ($label) printed '$out'"
    effective=$(env -u RUST_LOG IOT_COGNITO_RELAY__IDENTITY__IDENTITY_POOL_ID="$POOL_ID" \
        IOT_COGNITO_RELAY__IDENTITY__SECRET_ID="$SECRET_ID" \
        "$@" "$bin" check-config --config "$config") \
        || fail "$name: check-config ($label) on the shipped config exited $?"
    grep -qF "identity_pool_id = \"$POOL_ID\"" <<<"$effective" \
        || fail "$name: check-config ($label) did not print the effective config: $effective"
    grep -qF 'region = "us-east-1"' <<<"$effective" || fail "$name: defaults missing: $effective"
    # Without the identity keys the shipped config must be refused (exit 2, naming the key).
    set +e
    refused=$(env -u RUST_LOG "$@" "$bin" check-config --config "$config" 2>&1)
    code=$?
    set -e
    [ "$code" = 2 ] && grep -q identity <<<"$refused" \
        || fail "$name: check-config ($label) without identity keys exited $code: $refused"
    echo "   $label: --version '$out'; shipped config accepted with identity keys, refused without (exit 2)"
}

# Tag_CPU_arch of an ARM binary ("v6", "v7"), and the checks that it runs on that CPU: Thumb-2
# and VFPv3 exist from ARMv7 on; one object using them makes the whole binary crash on an ARM1176.
arm_checks() {
    local attributes cpu_arch want=$1
    attributes=$(readelf -A "$bin")
    readelf -h "$bin" | grep -q 'hard-float ABI' || fail "$name: binary is not hard-float"
    cpu_arch=$(sed -n 's/^ *Tag_CPU_arch: *//p' <<<"$attributes")
    [ "$cpu_arch" = "$want" ] || fail "$name: Tag_CPU_arch is '$cpu_arch', want $want"
    if [ "$want" = v6 ]; then
        if grep -q 'Tag_THUMB_ISA_use: Thumb-2' <<<"$attributes"; then fail "$name: ARMv6 binary uses Thumb-2"; fi
        if grep -q 'Tag_FP_arch:' <<<"$attributes" && ! grep -q 'Tag_FP_arch: VFPv2$' <<<"$attributes"; then
            fail "$name: ARMv6 binary needs $(grep 'Tag_FP_arch' <<<"$attributes")"
        fi
    fi
    echo "   ARM attributes: $(grep -E 'Tag_(CPU_arch|THUMB_ISA_use|FP_arch):' <<<"$attributes" | sed 's/^ *//' | paste -sd ' ')"
}

passed=0
for artifact in "$@"; do
    deb=""
    if [[ "$artifact" == *.deb ]]; then
        deb=$artifact name=$(basename "$deb")
        [ -f "$deb" ] || fail "$deb: no such package"
        arch=$(dpkg-deb --field "$deb" Architecture)
        version=$(dpkg-deb --field "$deb" Version)
        version=${version%%-*}
        # Debian architecture -> ELF machine (as readelf prints it), emulator, cross sysroot and
        # the old glibc's multiarch directory and dynamic loader.
        case "$arch" in
            amd64) machine="Advanced Micro Devices X86-64" emulator=() sysroot=""
                multiarch=x86_64-linux-gnu loader=ld-linux-x86-64.so.2 ;;
            arm64) machine=AArch64 emulator=(qemu-aarch64-static) sysroot=/usr/aarch64-linux-gnu
                multiarch=aarch64-linux-gnu loader=ld-linux-aarch64.so.1 ;;
            armhf) machine=ARM emulator=(qemu-arm-static) sysroot=/usr/arm-linux-gnueabihf
                multiarch=arm-linux-gnueabihf loader=ld-linux-armhf.so.3 ;;
            *) fail "$deb: unexpected Architecture $arch" ;;
        esac
        echo "== $name: $arch, version $version"
        root=$WORK/$arch
        dpkg-deb -x "$deb" "$root"
        bin=$root/usr/bin/iot-cognito-relay
        [ -x "$bin" ] || fail "$deb ships no usr/bin/iot-cognito-relay"
        # The shipped conffile as installed.
        config=$WORK/config-$arch.toml
        cp "$root/etc/iot-cognito-relay/config.toml" "$config"
    else
        target=${artifact%%=*} bin=${artifact#*=} name=$target version=$CARGO_VERSION
        [ "$target" != "$artifact" ] || fail "$artifact: want a .deb or RUST_TARGET=BINARY"
        [ -x "$bin" ] || fail "$name: $bin is not an executable"
        case "$target" in
            x86_64-unknown-linux-musl) machine="Advanced Micro Devices X86-64" emulator=() ;;
            aarch64-unknown-linux-musl) machine=AArch64 emulator=(qemu-aarch64-static) ;;
            armv7-unknown-linux-musleabihf) machine=ARM emulator=(qemu-arm-static -cpu cortex-a7) ;;
            arm-unknown-linux-musleabihf) machine=ARM emulator=(qemu-arm-static -cpu arm1176) ;;
            *) fail "$artifact: unexpected static target $target" ;;
        esac
        echo "== static $name: $(du -k "$bin" | cut -f1) KiB"
        config=$WORK/config-$target.toml
        cp config/config.toml "$config"
    fi
    chmod 0644 "$config"

    elf_machine=$(readelf -h "$bin" | sed -n 's/^ *Machine: *//p')
    [ "$elf_machine" = "$machine" ] || fail "$name: binary is for '$elf_machine', want $machine"
    needed=$(readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | sort | tr '\n' ' ')

    if [ -n "$deb" ]; then
        [ "$arch" != armhf ] || arm_checks v6
        # Only libc's own libraries: ring and SQLite are linked in statically.
        for lib in $needed; do
            case "$lib" in
                libc.so.*|libm.so.*|libgcc_s.so.*|ld-linux*|libdl.so.*|libpthread.so.*|librt.so.*) ;;
                *) fail "$deb: binary needs $lib, which the package does not depend on" ;;
            esac
        done
        depends=$(dpkg-deb --field "$deb" Depends)
        if grep -q 'cross' <<<"$depends"; then fail "$deb: Depends '$depends' names a cross package"; fi
        # The floor the package states is the one its binary has: the newest GLIBC_ version
        # in the binary's version needs (.gnu.version_r), not the build machine's glibc.
        newest=$(readelf --version-info --wide "$bin" | sed -n '/Version needs section/,$p' \
            | grep -o 'Name: GLIBC_[0-9][0-9.]*' | sed 's/Name: GLIBC_//' | sort -V | tail -n 1)
        [ -n "$newest" ] || fail "$deb: the binary needs no GLIBC_ version"
        [ "$(printf '%s\n' "$newest" "$GLIBC_FLOOR" | sort -V | tail -n 1)" = "$GLIBC_FLOOR" ] \
            || fail "$deb: the binary needs GLIBC_$newest, above the floor $GLIBC_FLOOR"
        stated=$(grep -o 'libc6[^,]*' <<<"$depends")
        [ "$stated" = "libc6 (>= $newest)" ] \
            || fail "$deb: Depends says '$stated', the binary's newest need is GLIBC_$newest"
        echo "   ELF $elf_machine, needs: $needed; newest GLIBC_$newest; Depends: $depends"

        label=natively
        [ -z "$sysroot" ] || label="under ${emulator[*]} with the cross sysroot"
        run_checks "$label" "${emulator[@]}" ${sysroot:+-L "$sysroot"}
        # Through the old release's own dynamic loader; LD_DEBUG shows which libc.so.6 it loaded.
        old=$(bash tests/arm/old-glibc.sh "$arch")
        libdir=$old/lib/$multiarch
        old_run=("${emulator[@]}" "$libdir/$loader" --library-path "$libdir")
        LD_DEBUG=libs "${old_run[@]}" "$bin" --version >/dev/null 2>"$WORK/ld-debug" \
            || { cat "$WORK/ld-debug" >&2; fail "$deb: --version on the old glibc exited non-zero"; }
        grep -q "calling init: $libdir/libc.so.6\$" "$WORK/ld-debug" \
            || { cat "$WORK/ld-debug" >&2; fail "$deb: the old glibc's libc.so.6 was not the one loaded"; }
        run_checks "on $(sed 's/, / glibc /;s/libc6 //' "${old%/*}/release")" "${old_run[@]}"
        runner=("${emulator[@]}" ${sysroot:+-L "$sysroot"})
    else
        case "$target" in
            armv7-*) arm_checks v7 ;;
            arm-*) arm_checks v6 ;;
        esac
        [ -z "$needed" ] || fail "$name: a static binary needs $needed"
        if readelf -l "$bin" | grep -q 'INTERP'; then fail "$name: a static binary has an interpreter"; fi
        echo "   ELF $elf_machine, static: no interpreter, no shared library"
        run_checks "under ${emulator[*]:-native execution}" "${emulator[@]}"
        runner=("${emulator[@]}")
    fi

    if $E2E; then
        echo "   end-to-end demo under ${runner[*]:-native execution}"
        log=$WORK/demo-$name.log
        RELAY_BIN=$bin RELAY_RUNNER="${runner[*]}" RELAY_WAIT_TENTHS=$EMULATED_WAIT_TENTHS \
            bash "$ROOT/scripts/demo.sh" >"$log" 2>&1 \
            || { cat "$log" >&2; fail "$name: end-to-end demo failed"; }
        received=$(sed -n '/== what the broker received/,/== daemon status/p' "$log" \
            | grep -c '/sensors/temperature {"celsius"' || true)
        [ "$received" = 5 ] || { cat "$log" >&2; fail "$name: broker got $received of 5 readings"; }
        echo "   end-to-end: broker received 5 of 5 readings"
    fi
    passed=$((passed + 1))
done
echo "smoke: $passed passed, 0 failed"
