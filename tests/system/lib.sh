#!/bin/bash
# The throwaway container and the emulated cloud of the system tests, sourced by run.sh (the
# .deb) and tarball.sh (the release tarball).
#
# The container: new pid/mount/uts/net/ipc/cgroup namespaces; its root is an overlay of the
# host's / with a tmpfs upper layer, entered with pivot_root; tmpfs /run, /tmp and /dev (with
# a few device nodes bound in), its own proc, a read-only sysfs and its own cgroup2 subtree.
# Its PID 1 is systemd (units that would touch the host are masked), or, for a system without
# systemd, a plain process that only waits. Every mount lives in the container's private
# mount namespace, so nothing is written to the host, and killing the namespace's PID 1 ends
# everything: the EXIT trap does that, removes the cgroup and the temp dir.
#
# The cloud (systemd containers): moto (AWS) and mosquitto (IoT Core) as transient units, an
# account provisioned like the CloudFormation template, and a subscriber to everything.
#
# Needs root, util-linux (unshare, nsenter), iproute2, openssl, mosquitto + mosquitto-clients,
# and the repo's .venv with moto[server] and boto3 (RELAY_TEST_VENV overrides its path).

# ---------------------------------------------------------------------------------------------
# Stage 2: runs as PID 1 of the new namespaces, builds the root and becomes its init.
#   bash lib.sh __stage2 HOST_DIR VENV systemd|none
if [[ ${BASH_SOURCE[0]} == "$0" && ${1:-} == __stage2 ]]; then
    set -e
    host_dir=$2
    venv=$3
    init=$4
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
    if [[ $init == systemd ]]; then
        command=(/lib/systemd/systemd --show-status=no)
    else
        # No init system at all: loopback up (systemd would do it), then wait to be killed.
        ip link set lo up
        command=(sleep infinity)
    fi
    exec setpriv --bounding-set \
        -sys_module,-sys_rawio,-sys_time,-syslog,-wake_alarm,-mac_admin,-mac_override,-block_suspend,-sys_pacct,-audit_read \
        -- env -i container=icr-system-test TERM=dumb "${command[@]}" </dev/null
fi

# ---------------------------------------------------------------------------------------------
# Stage 1: what the tests use. Set before sourcing: repo (the checkout) and venv (the
# checked venv's real path).
system_lib=$(readlink -f "${BASH_SOURCE[0]}")
cloud=/root/icr-cloud           # inside the container
host_dir=$(mktemp -d /tmp/icr-system.XXXXXX)
if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
    cgroup_root=/sys/fs/cgroup
else
    cgroup_root=/sys/fs/cgroup/unified # hybrid hierarchy
fi
cgroup=
unshare_pid=
ct_pid=
failures=0

# Ends the running container: its PID 1, its cgroup.
container_stop() {
    if [[ -n $ct_pid ]] && kill -0 "$ct_pid" 2>/dev/null; then
        # SIGKILL to a PID namespace's init kills every process in it; the mount namespace
        # (the overlay, the tmpfs mounts) goes with the last of them.
        kill -KILL "$ct_pid" 2>/dev/null
    fi
    if [[ -n $unshare_pid ]]; then
        kill -KILL "$unshare_pid" 2>/dev/null
        wait "$unshare_pid" 2>/dev/null
    fi
    if [[ -n $cgroup && -d $cgroup ]]; then
        [[ -f $cgroup/cgroup.kill ]] && echo 1 >"$cgroup/cgroup.kill" 2>/dev/null
        for _ in $(seq 100); do
            # Child cgroups (systemd's slices) first, deepest first.
            find "$cgroup" -mindepth 1 -depth -type d -exec rmdir {} + 2>/dev/null
            rmdir "$cgroup" 2>/dev/null && break
            sleep 0.05
        done
        [[ -d $cgroup ]] && echo "warning: could not remove $cgroup" >&2
    fi
    ct_pid=
    unshare_pid=
    cgroup=
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    container_stop
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

# container_boot systemd|none: a fresh container; with systemd, once it is up.
container_boot() {
    local init=$1 started booted boot_state
    started=$(date +%s.%N)
    log "booting a container (init: $init)"
    : >"$host_dir/console.log"
    cgroup=$cgroup_root/icr-system-$$-$init
    mkdir "$cgroup"
    (
        echo "$BASHPID" >"$cgroup/cgroup.procs"
        exec unshare --pid --mount --uts --net --ipc --cgroup --fork --propagation private \
            bash "$system_lib" __stage2 "$host_dir" "$venv" "$init"
    ) </dev/null >>"$host_dir/console.log" 2>&1 &
    unshare_pid=$!
    for _ in $(seq 100); do
        ct_pid=$(cat "/proc/$unshare_pid/task/$unshare_pid/children" 2>/dev/null | awk '{print $1}')
        [[ -n $ct_pid ]] && break
        sleep 0.05
    done
    [[ -n $ct_pid ]] || die "container did not start: $(cat "$host_dir/console.log")"
    local want=systemd
    [[ $init == systemd ]] || want="sleep"
    # The root is ready once PID 1 has exec'd its init.
    is_init() {
        kill -0 "$ct_pid" 2>/dev/null || die "container exited: $(cat "$host_dir/console.log")"
        [[ $(readlink "/proc/$ct_pid/exe") == */"$want" ]]
    }
    wait_until 10 is_init ||
        die "container did not exec $want: $(cat "$host_dir/console.log")"
    if [[ $init != systemd ]]; then
        printf 'container ready in %s s, no init system (PID 1 = host pid %s)\n' \
            "$(seconds "$started" "$(date +%s.%N)")" "$ct_pid"
        return
    fi
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
}

# cloud_start: moto, mosquitto (plain MQTT on 1883, WSS on 8443 with a test CA), the account
# (sets pool_id, secret_id, password), and a subscriber writing $cloud/received.jsonl. The
# test CA is installed as /etc/ssl/icr-test-ca.pem, where the service user can read it.
cloud_start() {
    local started
    started=$(date +%s.%N)
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
    ct install -m 0644 "$cloud/ca.crt" /etc/ssl/icr-test-ca.pem
    printf 'cloud ready in %s s (identity pool %s)\n' "$(seconds "$started" "$(date +%s.%N)")" "$pool_id"
}

# write_config [EXTRA TOML]: the daemon's config against the emulated cloud.
write_config() {
    ct_env bash -ec 'cat >/etc/iot-cognito-relay/config.toml' <<EOF
# Written by tests/system/lib.sh
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

# delivered N: the subscriber received {"n": N} on <prefix>/sensors/t; prints the topic.
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
