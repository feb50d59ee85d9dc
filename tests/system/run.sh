#!/bin/bash
# System test of the Debian package under a real systemd (PID 1 of a throwaway container).
#
#   sudo bash tests/system/run.sh target/debian/iot-cognito-relay_*.deb
#
# The container: new pid/mount/uts/net/ipc/cgroup namespaces; its root is an overlay of the
# host's / with a tmpfs upper layer, entered with pivot_root; tmpfs /run, /tmp and /dev (with
# a few device nodes bound in), its own proc, a read-only sysfs and its own cgroup2 subtree;
# units that would touch the host are masked. Every mount lives in the container's private
# mount namespace, so nothing is written to the host, and killing the namespace's PID 1 ends
# everything: the EXIT trap does that, removes the cgroup and the temp dir.
#
# Inside it, moto (AWS) and mosquitto (IoT Core) run as transient units, the package is
# installed with dpkg, configured against them, and checked: socket access by group, delivery,
# journald fields, reload, watchdog, clean stop, removal and purge.
#
# Needs root, util-linux (unshare, nsenter), openssl, mosquitto + mosquitto-clients, and the
# repo's .venv with moto[server] and boto3 (RELAY_TEST_VENV overrides its path).
set -uo pipefail

# ---------------------------------------------------------------------------------------------
# Stage 2: runs as PID 1 of the new namespaces, builds the root and becomes systemd.
if [[ ${1:-} == __stage2 ]]; then
    set -e
    host_dir=$2
    venv=$3
    ns=$host_dir/ns
    mkdir -p "$ns"
    mount -t tmpfs -o mode=0700 icr-system "$ns"
    mkdir "$ns/upper" "$ns/work" "$ns/root"
    root=$ns/root
    mount -t overlay icr-system-root -o "lowerdir=/,upperdir=$ns/upper,workdir=$ns/work" "$root"

    mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
    mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
    mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$root/sys/fs/cgroup"
    mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$root/run"
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"
    mount -t tmpfs -o mode=0755,nosuid tmpfs "$root/dev"
    for node in null zero full random urandom tty; do
        touch "$root/dev/$node"
        mount --bind "/dev/$node" "$root/dev/$node"
    done
    # systemd's console: a file the host can read.
    touch "$root/dev/console"
    mount --bind "$host_dir/console.log" "$root/dev/console"
    mkdir "$root/dev/pts" "$root/dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,nosuid,noexec devpts "$root/dev/pts"
    ln -s pts/ptmx "$root/dev/ptmx"
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
    # The test's Python venv (moto, boto3), read-only at the same path as on the host (its
    # scripts name their interpreter by absolute path). Bound explicitly: the overlay shows
    # neither other filesystems nor the host's /tmp, where a fresh checkout (and so its .venv)
    # may well be.
    mkdir -p "$root$venv"
    mount --rbind "$venv" "$root$venv"
    mount -o remount,bind,ro "$root$venv"
    ln -s /proc/self/fd "$root/dev/fd"
    ln -s /proc/self/fd/0 "$root/dev/stdin"
    ln -s /proc/self/fd/1 "$root/dev/stdout"
    ln -s /proc/self/fd/2 "$root/dev/stderr"

    # Host-touching or merely slow units of this image; all are irrelevant to the test. (The
# kernel-wide ones would also be stopped by the read-only /proc/sys and the dropped
# capabilities below; masked all the same.)
    for unit in \
        getty@tty1.service console-getty.service serial-getty@.service container-getty@.service \
        systemd-timesyncd.service systemd-pstore.service systemd-remount-fs.service \
        systemd-networkd.service systemd-networkd.socket systemd-networkd-wait-online.service \
        systemd-resolved.service hwclock.service systemd-binfmt.service systemd-sysctl.service \
        systemd-modules-load.service modprobe@.service systemd-journald-audit.socket \
        proc-sys-fs-binfmt_misc.automount proc-sys-fs-binfmt_misc.mount \
        sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount \
        sys-fs-fuse-connections.mount dev-hugepages.mount dev-mqueue.mount \
        postgresql.service e2scrub_reap.service mosquitto.service \
        apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
        fstrim.timer man-db.timer; do
        ln -sf /dev/null "$root/etc/systemd/system/$unit"
    done
    # The image's policy-rc.d forbids starting services: gone, so dpkg starts the unit.
    rm -f "$root/usr/sbin/policy-rc.d"
    # Its own machine id (and so its own journal directory).
    tr -d '\n-' </proc/sys/kernel/random/uuid >"$root/etc/machine-id"
    echo >>"$root/etc/machine-id"
    echo icr-system-test >"$root/etc/hostname"

    mkdir "$root/.oldroot"
    cd "$root"
    pivot_root . .oldroot
    cd /
    umount -l /.oldroot
    rmdir /.oldroot
    # Kernel-wide knobs stay out of reach, as under systemd-nspawn: /proc/sys read-only (or
    # systemd-sysctl.service applies sysctl.d to the host kernel), and no capabilities to load
    # modules (modprobe@*.service), set the clock, do raw I/O or read the kernel log.
    for path in /proc/sys /proc/sysrq-trigger; do
        [[ -e $path ]] || continue
        mount --bind "$path" "$path"
        mount -o remount,bind,ro "$path"
    done
    exec setpriv --bounding-set \
        -sys_module,-sys_rawio,-sys_time,-syslog,-wake_alarm,-mac_admin,-mac_override,-block_suspend,-sys_pacct,-audit_read \
        -- env -i container=icr-system-test TERM=dumb \
        /lib/systemd/systemd --show-status=no </dev/null
fi

# ---------------------------------------------------------------------------------------------
# Stage 1: the test.
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
# The container sees nothing of the checkout: the venv is bound in at its real path (stage 2),
# the .deb and the provisioning script are copied in. So the checkout may live anywhere,
# /tmp included.
venv=$(readlink -f "$venv")
started=$(date +%s.%N)

unit=iot-cognito-relay.service
cloud=/root/icr-cloud           # inside the container
host_dir=$(mktemp -d /tmp/icr-system.XXXXXX)
touch "$host_dir/console.log"
if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
    cgroup_root=/sys/fs/cgroup
else
    cgroup_root=/sys/fs/cgroup/unified # hybrid hierarchy
fi
cgroup=$cgroup_root/icr-system-$$
unshare_pid=
ct_pid=
failures=0

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $ct_pid ]] && kill -0 "$ct_pid" 2>/dev/null; then
        # SIGKILL to a PID namespace's init kills every process in it; the mount namespace
        # (the overlay, the tmpfs mounts) goes with the last of them.
        kill -KILL "$ct_pid" 2>/dev/null
    fi
    if [[ -n $unshare_pid ]]; then
        kill -KILL "$unshare_pid" 2>/dev/null
        wait "$unshare_pid" 2>/dev/null
    fi
    if [[ -d $cgroup ]]; then
        [[ -f $cgroup/cgroup.kill ]] && echo 1 >"$cgroup/cgroup.kill" 2>/dev/null
        for _ in $(seq 100); do
            # Child cgroups (systemd's slices) first, deepest first.
            find "$cgroup" -mindepth 1 -depth -type d -exec rmdir {} + 2>/dev/null
            rmdir "$cgroup" 2>/dev/null && break
            sleep 0.05
        done
        [[ -d $cgroup ]] && echo "warning: could not remove $cgroup" >&2
    fi
    rm -rf "$host_dir"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { printf '%s\n' "--- $*" >&2; }
pass() { printf 'PASS  %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; failures=$((failures + 1)); }
die() { printf 'FAIL  %s\n' "$*"; exit 1; }
check() { # check "description" command...
    local what=$1
    shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}

# Runs a command inside the container (all its namespaces and its root).
ct() { nsenter --target "$ct_pid" --all --root --wd -- "$@"; }
# Like ct, with a clean environment.
ct_env() { ct env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }

# wait_until SECONDS command...: polls every 0.1 s.
wait_until() {
    local deadline=$(($(date +%s) + $1))
    shift
    until "$@"; do
        (($(date +%s) >= deadline)) && return 1
        sleep 0.1
    done
}

# is_ok ANSWER ID: the daemon's answer is {"id": ID, "ok": true}.
is_ok() {
    "$venv/bin/python3" -c 'import json, sys
a = json.loads(sys.argv[1])
sys.exit(0 if a.get("ok") is True and a.get("id") == int(sys.argv[2]) else 1)' "$1" "$2" 2>/dev/null
}
# seconds FROM TO: elapsed time, one decimal.
seconds() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# --- boot ------------------------------------------------------------------------------------
log "booting the container"
mkdir "$cgroup"
(
    echo "$BASHPID" >"$cgroup/cgroup.procs"
    exec unshare --pid --mount --uts --net --ipc --cgroup --fork --propagation private \
        bash "$self" __stage2 "$host_dir" "$venv"
) </dev/null >>"$host_dir/console.log" 2>&1 &
unshare_pid=$!
for _ in $(seq 100); do
    ct_pid=$(cat "/proc/$unshare_pid/task/$unshare_pid/children" 2>/dev/null | awk '{print $1}')
    [[ -n $ct_pid ]] && break
    sleep 0.05
done
[[ -n $ct_pid ]] || die "container did not start: $(cat "$host_dir/console.log")"
# systemd is PID 1 once /proc/PID/exe is systemd.
is_systemd() {
    kill -0 "$ct_pid" 2>/dev/null || die "container exited: $(cat "$host_dir/console.log")"
    [[ $(readlink "/proc/$ct_pid/exe") == */systemd ]]
}
wait_until 10 is_systemd ||
    die "container did not exec systemd: $(cat "$host_dir/console.log")"
wait_until 10 ct test -S /run/systemd/private ||
    die "systemd did not come up: $(cat "$host_dir/console.log")"
boot_state=$(ct timeout 30 systemctl is-system-running --wait 2>&1)
booted=$(date +%s.%N)
printf 'container booted: %s in %s s (PID 1 = host pid %s)\n' \
    "$boot_state" "$(seconds "$started" "$booted")" "$ct_pid"
if [[ $boot_state != running ]]; then
    ct systemctl --failed --no-legend --no-pager
fi
[[ $boot_state == running || $boot_state == degraded ]] || die "container boot: $boot_state"

# --- the emulated cloud ----------------------------------------------------------------------
log "starting moto and mosquitto"
ct mkdir -p "$cloud"
ct_env bash -ec "cat >$cloud/provision.py" <"$repo/tests/support/provision.py" ||
    die "copy provision.py into the container"
# A test CA and a server certificate for 127.0.0.1 / localhost, as tests/harness/mod.rs.
ct_env bash -ec "
cd $cloud
ec='-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes'
openssl req -x509 \$ec -keyout ca.key -out ca.crt -days 2 -subj /CN=relay-test-ca \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
openssl req \$ec -keyout server.key -out server.csr -subj /CN=localhost
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n' >server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt \
    -days 2 -extfile server.ext
" >/dev/null 2>&1 || die "test certificates"
ct_env bash -ec "cat >$cloud/mosquitto.conf" <<EOF
per_listener_settings false
allow_anonymous true
user root
persistence false
max_queued_messages 0
log_dest file $cloud/mosquitto.log
log_type all
connection_messages true
listener 1883 127.0.0.1
protocol mqtt
listener 8443 127.0.0.1
protocol websockets
websockets_headers_size 8192
cafile $cloud/ca.crt
certfile $cloud/server.crt
keyfile $cloud/server.key
EOF
ct_env systemd-run --quiet --unit=icr-moto --property=StandardOutput=journal \
    "$venv/bin/moto_server" -H 127.0.0.1 -p 5000 || die "start moto"
ct_env systemd-run --quiet --unit=icr-mosquitto \
    /usr/sbin/mosquitto -c "$cloud/mosquitto.conf" || die "start mosquitto"
wait_until 30 ct grep -q ' running' "$cloud/mosquitto.log" 2>/dev/null ||
    die "mosquitto did not start: $(ct journalctl -u icr-mosquitto --no-pager)"

# Provision the account like the CloudFormation template (tests/support/provision.py).
provision() {
    ct_env AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1 \
        "$venv/bin/python3" "$cloud/provision.py" \
        --endpoint http://127.0.0.1:5000 --region us-east-1 --prefix relay-test \
        >"$host_dir/account.json" 2>"$host_dir/provision.err"
}
wait_until 30 provision ||
    die "provisioning: $(cat "$host_dir/provision.err"; ct journalctl -u icr-moto --no-pager | tail)"
account() { "$venv/bin/python3" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$host_dir/account.json" "$1"; }
pool_id=$(account identity_pool_id)
secret_id=$(account secret_id)
password=$(account password)

# A subscriber to everything on the plain listener, writing JSON lines to a file.
ct_env systemd-run --quiet --unit=icr-sub --property=StandardOutput="file:$cloud/received.jsonl" \
    /usr/bin/mosquitto_sub -h 127.0.0.1 -p 1883 -t '#' -q 1 -F %j || die "start mosquitto_sub"
probe() {
    ct mosquitto_pub -h 127.0.0.1 -p 1883 -t relay-test/probe -m probe 2>/dev/null
    ct grep -q '"relay-test/probe"' "$cloud/received.jsonl" 2>/dev/null
}
wait_until 15 probe || die "subscriber never became ready"
cloud_ready=$(date +%s.%N)
printf 'cloud ready in %s s (identity pool %s)\n' "$(seconds "$booted" "$cloud_ready")" "$pool_id"

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
# The AWS SDK's HTTPS client trusts the system's store (/etc/ssl/certs), so the package must
# bring it: without ca-certificates every AWS call fails TLS on a minimal image.
depends=$(dpkg-deb --field "$deb" Depends)
check "(0) Depends names ca-certificates ($depends)" grep -qw ca-certificates <<<"$depends"
check "(0) the unit is enabled ($(ct systemctl is-enabled "$unit" 2>&1))" \
    test "$(ct systemctl is-enabled "$unit" 2>&1)" = enabled
has_account() { ct id iot-cognito-relay >/dev/null 2>&1 && ct getent group iot-cognito-relay >/dev/null; }
check "(0) sysusers created the user and group ($(ct id iot-cognito-relay 2>&1))" has_account
check "(0) /etc/iot-cognito-relay/config.toml is a conffile" \
    ct grep -q '^ /etc/iot-cognito-relay/config.toml ' <(ct dpkg-query -W -f='${Conffiles}\n' iot-cognito-relay)
# The CA goes where the service user can read it (ProtectSystem=strict keeps /etc readable).
ct install -m 0644 "$cloud/ca.crt" /etc/ssl/icr-test-ca.pem
write_config() { # write_config [EXTRA TOML]
    ct_env bash -ec 'cat >/etc/iot-cognito-relay/config.toml' <<EOF
# Written by tests/system/run.sh
[aws]
endpoint_url = "http://127.0.0.1:5000"

[identity]
identity_pool_id = "$pool_id"
secret_id = "$secret_id"

[mqtt]
url = "wss://127.0.0.1:8443/mqtt"
ca_file = "/etc/ssl/icr-test-ca.pem"

[log]
level = "debug"
${1:-}
EOF
}
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
delivered() {
    local n=$1
    ct cat "$cloud/received.jsonl" | "$venv/bin/python3" -c '
import json, sys
n, suffix = int(sys.argv[1]), "/sensors/t"
for line in sys.stdin:
    m = json.loads(line)
    p = m.get("payload")
    if isinstance(p, str):
        try: p = json.loads(p)
        except ValueError: continue
    if m["topic"].endswith(suffix) and p == {"n": n}:
        print(m["topic"]); sys.exit(0)
sys.exit(1)' "$n"
}
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
