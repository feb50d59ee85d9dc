#!/bin/bash
# System test of the Debian package under a real systemd (PID 1 of a throwaway container).
#
#   sudo bash tests/system/run.sh target/debian/iot-cognito-relay_*.deb
#
# The container and the emulated cloud are tests/system/lib.sh's: an overlay of the host's /
# in new namespaces, entered with pivot_root, nothing written to the host; moto (AWS) and
# mosquitto (IoT Core) run in it as transient units.
#
# Inside it the package is installed with dpkg, configured against them, and checked: socket
# access by group, delivery, journald fields, reload, watchdog, clean stop, removal and purge.
#
# Needs root, util-linux (unshare, nsenter), iproute2, openssl, mosquitto + mosquitto-clients,
# and the repo's .venv with moto[server] and boto3 (RELAY_TEST_VENV overrides its path).
set -uo pipefail

if [[ $# -ne 1 || ! -f ${1:-} ]]; then
    echo "usage: $0 path/to/iot-cognito-relay_VERSION_ARCH.deb" >&2
    exit 2
fi
if [[ $EUID -ne 0 ]]; then
    echo "$0: needs root (namespaces, mounts, cgroups)" >&2
    exit 2
fi
deb=$(readlink -f "$1")
self=$(readlink -f "$0")
repo=$(cd "$(dirname "$self")/../.." && pwd)
venv=${RELAY_TEST_VENV:-$repo/.venv}
[[ -x $venv/bin/moto_server ]] || { echo "$0: no moto_server in $venv (see README)" >&2; exit 2; }
# The container sees nothing of the checkout: the venv is bound in at its real path (lib.sh),
# the .deb and the provisioning script are copied in. So the checkout may live anywhere,
# /tmp included.
venv=$(readlink -f "$venv")
started=$(date +%s.%N)

unit=iot-cognito-relay.service
# shellcheck source=tests/system/lib.sh
source "$repo/tests/system/lib.sh"

container_boot systemd
cloud_start

# --- install ---------------------------------------------------------------------------------
log "installing $(basename "$deb")"
ct mkdir -p /root/pkg
cat "$deb" | ct bash -c 'cat >/root/pkg/relay.deb'
if ct_env DEBIAN_FRONTEND=noninteractive dpkg -i /root/pkg/relay.deb >"$host_dir/dpkg-i.log" 2>&1; then
    pass "dpkg -i"
else
    cat "$host_dir/dpkg-i.log"
    die "dpkg -i"
fi
# The AWS SDK's HTTPS client trusts the system's store (/etc/ssl/certs) where there is one
# (the built-in Amazon roots only where there is none): the package brings it.
depends=$(dpkg-deb --field "$deb" Depends)
check "(0) Depends names ca-certificates ($depends)" grep -qw ca-certificates <<<"$depends"
check "(0) the unit is enabled ($(ct systemctl is-enabled "$unit" 2>&1))" \
    test "$(ct systemctl is-enabled "$unit" 2>&1)" = enabled
has_account() { ct id iot-cognito-relay >/dev/null 2>&1 && ct getent group iot-cognito-relay >/dev/null; }
check "(0) sysusers created the user and group ($(ct id iot-cognito-relay 2>&1))" has_account
check "(0) /etc/iot-cognito-relay/config.toml is a conffile" \
    ct grep -q '^ /etc/iot-cognito-relay/config.toml ' <(ct dpkg-query -W -f='${Conffiles}\n' iot-cognito-relay)
write_config
ct systemctl restart "$unit" || true

show() { ct systemctl show --value -p "$1" "$unit"; }
status_json() { ct /usr/bin/iot-cognito-relay status --json 2>/dev/null; }
connected() { status_json | grep -q '"state": *"connected"'; }

# (1) the unit is active and connected to the (emulated) IoT Core.
daemon_up=yes
if wait_until 30 connected; then
    pass "(1) unit active ($(show ActiveState)/$(show SubState)) and connected"
else
    daemon_up=no
    fail "(1) unit active and connected: $(show ActiveState)/$(show SubState); status: $(status_json)"
    ct journalctl -u "$unit" --no-pager -n 15
fi
# Checks (1) to (6) of a running daemon.
daemon_checks() {
modes() { ct stat -c '%a %U:%G' "$@" | tr '\n' ' ' | sed 's/ $//'; }
expected='750 iot-cognito-relay:iot-cognito-relay 660 iot-cognito-relay:iot-cognito-relay 700 iot-cognito-relay:iot-cognito-relay'
got=$(modes /run/iot-cognito-relay /run/iot-cognito-relay/relay.sock /var/lib/iot-cognito-relay)
check "(1) modes of /run/iot-cognito-relay, relay.sock, /var/lib/iot-cognito-relay: $got" \
    test "$got" = "$expected"
identity_id=$(status_json | "$venv/bin/python3" -c 'import json, sys
s = json.load(sys.stdin)
print(s.get("status", s).get("identity_id") or "")' 2>/dev/null)

echo "--- systemd-analyze security $unit (installed, in the container)"
ct systemd-analyze security --no-pager "$unit" | grep -E '✗|Overall'

# (2) socket access: a member of the group publishes; others are refused.
ct useradd --system --no-create-home --shell /usr/sbin/nologin \
    --groups iot-cognito-relay appuser
ct useradd --system --no-create-home --shell /usr/sbin/nologin outsider
raw_send='import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect("/run/iot-cognito-relay/relay.sock")
try:
    s.sendall(sys.argv[1].encode() + b"\n")
except BrokenPipeError:
    pass  # refused: the answer is already waiting
print(s.makefile().readline().strip())'
answer=$(ct_env runuser -u appuser -- /usr/bin/python3 -c "$raw_send" \
    '{"topic":"sensors/t","payload":{"n":1},"id":1}' 2>&1)
if is_ok "$answer" 1; then
    pass "(2a) group member writes to relay.sock: $answer"
else
    fail "(2a) group member writes to relay.sock: $answer"
fi
cli=$(ct_env runuser -u appuser -- /usr/bin/iot-cognito-relay send --topic sensors/t '{"n":2}' 2>&1)
check "(2b) group member: iot-cognito-relay send exits 0 ${cli:+($cli)}" test $? -eq 0
if wait_until 15 delivered 1 >/dev/null && wait_until 5 delivered 2 >/dev/null; then
    topic=$(delivered 1)
    pass "(2c) mosquitto_sub received both on $topic"
    [[ -n $identity_id && $topic == "$pool_id/$identity_id/sensors/t" ]] ||
        fail "(2c') topic is not <pool>/<identity>/sensors/t (identity $identity_id)"
else
    fail "(2c) mosquitto_sub received the messages"
    ct cat "$cloud/received.jsonl"
    ct journalctl -u "$unit" --no-pager -n 30
fi
answer=$(ct_env runuser -u outsider -- /usr/bin/python3 -c "$raw_send" \
    '{"topic":"sensors/t","payload":{"n":3},"id":3}' 2>&1)
if [[ $answer == *PermissionError* ]]; then
    pass "(2d) non-member is refused (EACCES)"
else
    fail "(2d) non-member is refused: $answer"
fi
ct_env runuser -u outsider -- /usr/bin/iot-cognito-relay send --topic sensors/t '{"n":4}' \
    >"$host_dir/outsider.out" 2>&1
rc=$?
check "(2e) non-member: iot-cognito-relay send fails (exit $rc: $(head -c 200 "$host_dir/outsider.out"))" \
    test $rc -ne 0

# (2f) socket.allowed_uids sees the real uid of a peer (SO_PEERCRED) under the unit's
# sandbox: the allowed member is served, another member of the group is refused.
ct useradd --system --no-create-home --shell /usr/sbin/nologin \
    --groups iot-cognito-relay member2
write_config "[socket]
allowed_uids = [$(ct id -u appuser)]"
if ct systemctl restart "$unit"; then
    allowed=$(ct_env runuser -u appuser -- /usr/bin/python3 -c "$raw_send" \
        '{"topic":"sensors/t","payload":{"n":6},"id":6}' 2>&1)
    other=$(ct_env runuser -u member2 -- /usr/bin/python3 -c "$raw_send" \
        '{"topic":"sensors/t","payload":{"n":7},"id":7}' 2>&1)
    if is_ok "$allowed" 6 && [[ $other == *'"ok":false'* ]]; then
        pass "(2f) allowed_uids: appuser served, member2 refused: $other"
    else
        fail "(2f) allowed_uids: appuser got: $allowed; member2 got: $other"
        ct journalctl -u "$unit" --no-pager -n 10 | grep -i -e refused -e connected
    fi
else
    fail "(2f) restart with allowed_uids"
fi
# (2g) check-config knows the installed unit's sandbox: a state dir outside its writable set
# is named with the drop-in that fixes it, and passes once the drop-in is there.
write_config "[state]
dir = \"/data/relay\""
ct_env /usr/bin/iot-cognito-relay check-config >/dev/null 2>"$host_dir/sandbox.err"
rc=$?
check "(2g) check-config names a path the unit cannot write (exit $rc: $(head -c 200 "$host_dir/sandbox.err"))" \
    bash -c "[[ $rc -eq 1 ]] && grep -q 'ReadWritePaths=/data/relay' '$host_dir/sandbox.err'"
ct mkdir -p /etc/systemd/system/iot-cognito-relay.service.d
ct_env bash -ec 'printf "[Service]\nReadWritePaths=/data/relay\n" >/etc/systemd/system/iot-cognito-relay.service.d/data.conf'
ct systemctl daemon-reload
check "(2g) with the ReadWritePaths= drop-in check-config passes" \
    ct_env /usr/bin/iot-cognito-relay check-config
ct rm -f /etc/systemd/system/iot-cognito-relay.service.d/data.conf
ct systemctl daemon-reload

write_config
ct systemctl restart "$unit"
wait_until 30 connected || fail "(2f) reconnected after the allowed_uids check"

# (3) journald: identifier and structured fields.
ct journalctl -u "$unit" -o verbose --no-pager >"$host_dir/journal.txt" 2>&1
for field in SYSLOG_IDENTIFIER=iot-cognito-relay "IDENTITY_ID=${identity_id:-?}" STATE=connected; do
    check "(3) journal has $field$(grep -m1 -o "^ *$field.*" "$host_dir/journal.txt" | sed 's/^ */: /')" \
        grep -q "^ *$field" "$host_dir/journal.txt"
done
if grep -qF -e "$password" -e ABCSECRETKEY -e ABC12345 -e eyJ "$host_dir/journal.txt"; then
    fail "(3) journal holds no secrets (password, secret key, session token or JWT found)"
else
    pass "(3) journal holds no secrets"
fi

# (4) reload: SIGHUP, the unit stays active with the same process.
pid_before=$(show MainPID)
if ct systemctl reload "$unit" && sleep 0.5 && [[ $(show ActiveState) == active ]] &&
    [[ $(show MainPID) == "$pid_before" ]]; then
    pass "(4) systemctl reload: active, same MainPID $pid_before"
else
    fail "(4) systemctl reload: $(show ActiveState)/$(show SubState), MainPID $pid_before -> $(show MainPID)"
    ct journalctl -u "$unit" --no-pager -n 20
fi

# (5) watchdog: a stopped daemon is killed and restarted.
ct mkdir -p "/run/systemd/system/$unit.d"
ct_env bash -c "cat >/run/systemd/system/$unit.d/zz-system-test.conf" <<EOF
[Service]
WatchdogSec=3s
RestartSec=1s
EOF
ct systemctl daemon-reload
ct systemctl restart "$unit"
wait_until 15 connected
restarts_before=$(show NRestarts)
pid_before=$(show MainPID)
watchdog_cursor=$(ct journalctl -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p')
[[ $pid_before =~ ^[1-9][0-9]*$ ]] && ct kill -STOP "$pid_before"
restarted() {
    local pid
    pid=$(show MainPID)
    [[ $pid != 0 && $pid != "$pid_before" && $(show ActiveState) == active ]]
}
if wait_until 30 restarted; then
    ct journalctl -u "$unit" --after-cursor="$watchdog_cursor" --no-pager >"$host_dir/watchdog.txt"
    restarts_after=$(show NRestarts)
    if ((restarts_after > restarts_before)) && grep -qi watchdog "$host_dir/watchdog.txt"; then
        pass "(5) watchdog: killed and restarted (MainPID $pid_before -> $(show MainPID), NRestarts $restarts_before -> $restarts_after): $(grep -i -m1 watchdog "$host_dir/watchdog.txt" | sed 's/^.*\]: //')"
    else
        fail "(5) watchdog: NRestarts $restarts_before -> $restarts_after; journal:"
        cat "$host_dir/watchdog.txt"
    fi
else
    fail "(5) watchdog: not restarted ($(show ActiveState)/$(show SubState), MainPID $(show MainPID))"
    ct journalctl -u "$unit" --no-pager -n 20
fi
ct rm -rf "/run/systemd/system/$unit.d"
ct systemctl daemon-reload

# (6) stop: STOPPING=1, drain, exit 0.
wait_until 15 connected
ct_env runuser -u appuser -- /usr/bin/iot-cognito-relay send --topic sensors/t '{"n":5}' >/dev/null 2>&1
stop_started=$(date +%s.%N)
ct systemctl stop "$unit"
stop_rc=$?
stop_took=$(seconds "$stop_started" "$(date +%s.%N)")
result=$(show Result)
exec_status=$(show ExecMainStatus)
exec_code=$(show ExecMainCode)
if [[ $stop_rc == 0 && $result == success && $exec_status == 0 && $(show ActiveState) == inactive ]]; then
    pass "(6) systemctl stop: Result=$result ExecMainCode=$exec_code ExecMainStatus=$exec_status in $stop_took s"
else
    fail "(6) systemctl stop: rc=$stop_rc Result=$result ExecMainCode=$exec_code ExecMainStatus=$exec_status ActiveState=$(show ActiveState)"
    ct journalctl -u "$unit" --no-pager -n 20
fi
check "(6) /run/iot-cognito-relay removed on stop" ct test ! -e /run/iot-cognito-relay

}
if [[ $daemon_up == yes ]]; then
    daemon_checks
else
    echo "SKIP  (1)-(6): the daemon does not run"
fi

# (7) remove, then purge: only the system user stays.
ct systemctl start "$unit" # removal must also stop a running daemon
if ct_env DEBIAN_FRONTEND=noninteractive dpkg -r iot-cognito-relay >"$host_dir/dpkg-r.log" 2>&1; then
    pass "(7) dpkg -r"
else
    fail "(7) dpkg -r"
    cat "$host_dir/dpkg-r.log"
fi
check "(7) after -r: unit stopped" test "$(ct systemctl is-active "$unit")" != active
check "(7) after -r: /usr/bin/iot-cognito-relay gone" ct test ! -e /usr/bin/iot-cognito-relay
check "(7) after -r: unit file gone" ct test ! -e /lib/systemd/system/$unit -a ! -e /usr/lib/systemd/system/$unit
check "(7) after -r: conffile kept" ct test -f /etc/iot-cognito-relay/config.toml
if ct_env DEBIAN_FRONTEND=noninteractive dpkg -P iot-cognito-relay >"$host_dir/dpkg-p.log" 2>&1; then
    pass "(7) dpkg -P$(grep -i warning "$host_dir/dpkg-p.log" | sed 's/^/ /' | tr '\n' ';')"
else
    fail "(7) dpkg -P"
    cat "$host_dir/dpkg-p.log"
fi
for path in /etc/iot-cognito-relay /var/lib/iot-cognito-relay /run/iot-cognito-relay \
    /lib/systemd/system/$unit /usr/lib/systemd/system/$unit /etc/systemd/system/$unit \
    /etc/systemd/system/multi-user.target.wants/$unit \
    /var/lib/systemd/deb-systemd-helper-enabled/$unit.dsh-also \
    /var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/$unit; do
    if ct test -e "$path" -o -L "$path"; then
        fail "(7) after -P: $path is left: $(ct ls -la "$path" 2>&1 | head -5 | tr '\n' ' ')"
    else
        pass "(7) after -P: $path gone"
    fi
done
check "(7) after -P: the unit is unknown to systemd" \
    test -z "$(ct systemctl list-unit-files --no-legend "$unit")"
check "(7) after -P: dpkg forgot the package" \
    test -z "$(ct dpkg-query -W -f='${Status}' iot-cognito-relay 2>/dev/null | grep -v not-installed)"
user=$(ct getent passwd iot-cognito-relay)
check "(7) after -P: system user kept ($user)" test -n "$user"

# Evidence for docs/operations.md: RELAY_SYSTEM_TEST_OUT=DIR keeps the journal excerpts.
if [[ -n ${RELAY_SYSTEM_TEST_OUT:-} ]]; then
    mkdir -p "$RELAY_SYSTEM_TEST_OUT"
    cp "$host_dir"/*.txt "$RELAY_SYSTEM_TEST_OUT"/ 2>/dev/null || true
fi

finished=$(date +%s.%N)
printf '\n%s: %d failure(s), %s s in all\n' "$([[ $failures == 0 ]] && echo PASS || echo FAIL)" \
    "$failures" "$(seconds "$started" "$finished")"
((failures == 0))
