#!/bin/bash
# Static checks of the packaged unit and sysusers file (root; no systemd needed as PID 1):
#   - `systemd-analyze verify` prints nothing at all (it only warns, exit 0, on unknown keys);
#   - `systemd-analyze security --offline=true` stays at or below MAX_EXPOSURE (default 1.5);
#   - `systemd-sysusers --dry-run` accepts the sysusers file.
# verify checks that ExecStart's binary exists; when /usr/bin/iot-cognito-relay is not
# installed, a private mount namespace overlays /usr/bin with a stand-in (a copy of
# /bin/true) that only this check sees. It also runs man(1) for Documentation=man:...; the
# pages in packaging/man/ are added to MANPATH for that.
#
#   sudo bash tests/system/verify-unit.sh [packaging/iot-cognito-relay.service]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
unit=$(readlink -f "${1:-$here/../../packaging/iot-cognito-relay.service}")
sysusers=${unit%.service}.sysusers
max=${MAX_EXPOSURE:-1.5}
failures=0

echo "--- systemd-analyze verify $unit"
verify_out=$(unshare --mount --propagation private bash -ec '
    mount -t tmpfs icr-verify /mnt
    if [[ ! -e /usr/bin/iot-cognito-relay ]]; then
        mkdir /mnt/upper /mnt/work
        cp /bin/true /mnt/upper/iot-cognito-relay
        mount -t overlay icr-verify -o lowerdir=/usr/bin,upperdir=/mnt/upper,workdir=/mnt/work /usr/bin
    fi
    # Documentation=man:... pages are looked up with man(1): the package'"'"'s pages count.
    if compgen -G "$(dirname "$1")/man/*.1" >/dev/null; then
        mkdir -p /mnt/man/man1
        cp "$(dirname "$1")"/man/*.1 /mnt/man/man1/
        export MANPATH=/mnt/man:$(manpath 2>/dev/null)
    fi
    cd "$(dirname "$1")"
    systemd-analyze verify "./$(basename "$1")"
' verify "$unit" 2>&1) && verify_rc=0 || verify_rc=$?
if [[ $verify_rc -ne 0 || -n $verify_out ]]; then
    echo "$verify_out"
    echo "FAIL  verify: exit $verify_rc, output above"
    failures=$((failures + 1))
else
    echo "PASS  verify: no output"
fi

echo "--- systemd-analyze security --offline=true $unit"
security=$(cd "$(dirname "$unit")" && systemd-analyze security --offline=true --no-pager "./$(basename "$unit")")
grep -E '✗|Overall' <<<"$security"
exposure=$(sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p' <<<"$security")
if awk -v e="$exposure" -v m="$max" 'BEGIN { exit !(e != "" && e <= m) }'; then
    echo "PASS  exposure $exposure <= $max"
else
    echo "FAIL  exposure ${exposure:-?} > $max"
    failures=$((failures + 1))
fi

echo "--- systemd-sysusers --dry-run $sysusers"
if out=$(systemd-sysusers --dry-run "$sysusers" 2>&1) && ! grep -qi -e fail -e invalid -e warn <<<"$out"; then
    echo "$out" | sed 's/^/    /'
    echo "PASS  sysusers"
else
    echo "$out"
    echo "FAIL  sysusers"
    failures=$((failures + 1))
fi
((failures == 0))
