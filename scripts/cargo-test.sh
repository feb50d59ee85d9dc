#!/usr/bin/env bash
# `make test`'s Rust suite: every target `cargo test --all-targets` runs, in two lanes.
# tests/credentials.rs lives through real two-minute credential lifetimes: about 5 of the
# suite's 15 minutes, nearly all of it asleep, so it runs beside the other targets instead of
# after them. Each target's output is printed whole when it ends, with its time; every target
# runs even after a failure, and the status is non-zero if any failed.
# Arguments go to every test binary (a filter, --nocapture…).
set -euo pipefail
cd "$(dirname "$0")/.."

# Targets of their own lane: long, and waiting on timers rather than the CPU.
SIDE_LANE="credentials"

work=$(mktemp -d /tmp/icr-cargo-test.XXXXXX)
trap 'rm -rf "$work"' EXIT

# Build everything first, as cargo test does; one line per test binary: KIND NAME PATH.
cargo test --all-targets --no-run --message-format=json-render-diagnostics >"$work/build.json"
python3 - "$work/build.json" >"$work/targets" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    message = json.loads(line)
    if message.get("reason") != "compiler-artifact" or not message.get("executable"):
        continue
    if not message["profile"]["test"]:
        continue
    target = message["target"]
    print(target["kind"][0], target["name"], message["executable"])
EOF
[ -s "$work/targets" ] || { echo "cargo-test: cargo built no test binary" >&2; exit 1; }

# run KIND NAME PATH ARGS...: one binary, its output held until it ends, then printed whole
# (one lane at a time); a failure is noted in $work/failed.
run() {
    local kind=$1 name=$2 path=$3 log="$work/$1-$2.log" start=$SECONDS status=0
    shift 3
    "$path" "$@" </dev/null >"$log" 2>&1 || status=$?
    if [ "$status" != 0 ]; then echo "$kind $name" >>"$work/failed"; fi
    {
        flock 9
        echo "     Running $kind $name ($path)"
        cat "$log"
        echo "== $kind $name took $((SECONDS - start)) s (exit status $status)"
    } 9>"$work/print.lock"
}

lane() {
    local side=$1 kind name path
    shift
    while read -r kind name path; do
        case " $SIDE_LANE " in
            *" $name "*) [ "$side" = side ] || continue ;;
            *) [ "$side" = main ] || continue ;;
        esac
        run "$kind" "$name" "$path" "$@"
    done <"$work/targets"
}

touch "$work/failed"
lane side "$@" &
side_pid=$!
lane main "$@"
wait "$side_pid"

if [ -s "$work/failed" ]; then
    echo "cargo-test: failed: $(paste -sd, "$work/failed")" >&2
    exit 101
fi
