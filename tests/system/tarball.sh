#!/bin/bash
# System test of the release tarball's install.sh, in throwaway containers (tests/system/lib.sh):
#
#   sudo bash tests/system/tarball.sh target/dist/iot-cognito-relay-VERSION-x86_64.tar.gz
#
# Under systemd as PID 1 (with moto and mosquitto as the cloud): refusals (not root, another
# architecture), the install (enabled, not started, user from sysusers, ExecStart in
# /usr/local/bin), delivery once configured, `status`, a second run as an upgrade that keeps
# the operator's config and restarts the unit, --uninstall (nothing installed left, config and
# spool kept) and --uninstall --purge (those and the user gone too).
# Without an init system (no /run/systemd/system): the install makes the user and the
# directories and prints the supervisor hint; the daemon runs by hand as that user (check-config,
# run, a reading spooled through the socket by a group member); --uninstall refuses while it
# runs; then again under BusyBox ash with BusyBox's tools, and --uninstall --purge.
# The tarball's binary must run on this machine.
#
# Needs what lib.sh needs, plus busybox and setarch (util-linux).
set -uo pipefail
if [[ $# -ne 1 || ! -f ${1:-} ]]; then
    echo "usage: $0 path/to/iot-cognito-relay-VERSION-ARCH.tar.gz" >&2
    exit 2
fi
if [[ $EUID -ne 0 ]]; then
    echo "$0: needs root (namespaces, mounts, cgroups)" >&2
    exit 2
fi
command -v busybox >/dev/null || { echo "$0: busybox is missing (scripts/install-test-deps.sh)" >&2; exit 2; }
tarball=$(readlink -f "$1")
top=$(basename "$tarball" .tar.gz)
arch=${top##*-}
self=$(readlink -f "$0")
repo=$(cd "$(dirname "$self")/../.." && pwd)
venv=${RELAY_TEST_VENV:-$repo/.venv}
[[ -x $venv/bin/moto_server ]] || { echo "$0: no moto_server in $venv (see README)" >&2; exit 2; }
venv=$(readlink -f "$venv")
started=$(date +%s.%N)

name=iot-cognito-relay
unit=$name.service
bin=/usr/local/bin/$name
installed_script=/usr/local/share/$name/install.sh
# shellcheck source=tests/system/lib.sh
source "$repo/tests/system/lib.sh"

# unpack: the tarball into the container's /tmp/dist (where others may read it); sets dir.
unpack() {
    ct mkdir -p /tmp/dist
    ct bash -c 'cat >/tmp/dist/relay.tar.gz' <"$tarball"
    ct tar -C /tmp/dist -xzf /tmp/dist/relay.tar.gz || die "unpack $tarball"
    dir=/tmp/dist/$top
}
# run_install NAME ARGS...: install.sh (or, with INSTALL_SCRIPT set, that copy) under dash,
# output in $host_dir/NAME.out; its exit status.
run_install() {
    local out=$host_dir/$1.out
    shift
    ct_env sh "${INSTALL_SCRIPT:-$dir/install.sh}" "$@" >"$out" 2>&1
}
# output NAME: what run_install NAME printed.
output() { cat "$host_dir/$1.out"; }
# Every path under /usr/local and /etc, but the account files (users come and go in the test).
snapshot() {
    ct find /usr/local /etc -xdev 2>/dev/null |
        grep -vE '^/etc/(passwd|group|shadow|gshadow)-?$|^/etc/\.pwd\.lock$' | sort
}
# left_over NAME: the paths the last snapshot has beyond $host_dir/before (none: empty).
left_over() { snapshot | comm -13 "$host_dir/before" -; }
has_account() { ct grep -q "^$name:" /etc/passwd && ct grep -q "^$name:" /etc/group; }
no_account() {
    ! ct grep -q "^$name:" /etc/passwd /etc/group /etc/shadow /etc/gshadow 2>/dev/null
}
modes() { ct stat -c '%a %U:%G' "$@" | tr '\n' ' ' | sed 's/ $//'; }

# =============================================================================================
# Under systemd.
container_boot systemd
cloud_start
unpack
snapshot >"$host_dir/before"

# --- refusals --------------------------------------------------------------------------------
ct_env runuser -u nobody -- sh "$dir/install.sh" >"$host_dir/nonroot.out" 2>&1
rc=$?
check "(0) not root: refused (exit $rc: $(head -c 120 "$host_dir/nonroot.out"))" \
    bash -c "[[ $rc -ne 0 ]] && grep -q 'must run as root' '$host_dir/nonroot.out'"
if [[ $arch == x86_64 ]]; then
    # A 32-bit personality: uname -m says i686.
    ct_env setarch linux32 sh "$dir/install.sh" >"$host_dir/arch.out" 2>&1
    rc=$?
    check "(0) another architecture: refused (exit $rc: $(head -c 160 "$host_dir/arch.out"))" \
        bash -c "[[ $rc -ne 0 ]] && grep -q 'this is the x86_64 build and this machine is i686' '$host_dir/arch.out'"
fi
help_ok() { ct_env sh "$dir/install.sh" --help | grep -q '^Usage: sh install.sh'; }
check "(0) --help prints the usage" help_ok
check "(0) nothing was installed by the refused runs" test -z "$(left_over)"

# --- install ---------------------------------------------------------------------------------
log "installing $top with install.sh"
if run_install install; then
    pass "(1) install.sh: exit 0"
else
    output install
    die "(1) install.sh failed"
fi
check "(1) it prints the next steps ($(grep -m1 'enabled, not started' "$host_dir/install.out"))" \
    grep -q "enabled, not started" "$host_dir/install.out"
check "(1) the unit is enabled ($(ct systemctl is-enabled "$unit" 2>&1))" \
    test "$(ct systemctl is-enabled "$unit" 2>&1)" = enabled
check "(1) the unit is not started ($(ct systemctl is-active "$unit" 2>&1))" \
    test "$(ct systemctl is-active "$unit" 2>&1)" = inactive
exec_start=$(ct systemctl show -p ExecStart --value "$unit")
check "(1) ExecStart runs $bin" grep -q "path=$bin ; argv\[\]=$bin run " <<<"$exec_start"
check "(1) sysusers created the user and group ($(ct id "$name" 2>&1))" has_account
check "(1) the default config is in place" ct cmp -s "$dir/config.toml" /etc/$name/config.toml
for path in $bin /etc/systemd/system/$unit /etc/sysusers.d/$name.conf \
    /usr/local/share/man/man1/$name-run.1 /usr/local/share/bash-completion/completions/$name \
    /usr/local/share/doc/$name/operations.md $installed_script; do
    check "(1) installed: $path" ct test -f "$path"
done
check "(1) no tmpfiles snippet under systemd (the unit makes its directories)" \
    ct test ! -e /etc/tmpfiles.d/$name.conf
verify=$(ct systemd-analyze verify /etc/systemd/system/$unit 2>&1)
check "(1) systemd-analyze verify of the installed unit prints nothing${verify:+: $verify}" test -z "$verify"
page=$(ct man -w $name-run 2>&1) && page=$(ct readlink -f "$page")
check "(1) man finds the pages ($page)" test "$page" = /usr/local/share/man/man1/$name-run.1

# --- configured: delivery and status ----------------------------------------------------------
write_config
ct systemctl start "$unit"
show() { ct systemctl show --value -p "$1" "$unit"; }
status_json() { ct $bin status --json 2>/dev/null; }
connected() { status_json | grep -q '"state": *"connected"'; }
if wait_until 30 connected; then
    pass "(2) configured, started: active ($(show SubState)) and connected"
else
    fail "(2) started and connected: $(show ActiveState)/$(show SubState); status: $(status_json)"
    ct journalctl -u "$unit" --no-pager -n 20
fi
ct useradd --system --no-create-home --shell /usr/sbin/nologin --groups "$name" appuser
sent=$(ct_env runuser -u appuser -- $bin send --topic sensors/t '{"n":1}' 2>&1)
check "(2) a group member sends a reading${sent:+ ($sent)}" test $? -eq 0
identity_id=$(status_json | "$venv/bin/python3" -c 'import json, sys; print(json.load(sys.stdin).get("identity_id") or "")' 2>/dev/null)
if wait_until 15 delivered 1 >/dev/null; then
    topic=$(delivered 1)
    check "(2) delivered on $topic" test "$topic" = "$pool_id/$identity_id/sensors/t"
else
    fail "(2) the reading reached the broker"
    ct journalctl -u "$unit" --no-pager -n 20
fi
status_text=$(ct $bin status 2>&1)
check "(2) status: $(head -n 1 <<<"$status_text")" grep -q connected <<<"$status_text"

# --- upgrade ---------------------------------------------------------------------------------
ct_env bash -ec "echo '# the operator was here' >>/etc/$name/config.toml"
# As if the earlier version had shipped a file this one does not.
dropped=/usr/local/share/doc/$name/dropped.md
ct_env bash -ec "echo old >$dropped && echo $dropped >>/usr/local/share/$name/installed-files"
config_before=$(ct sha256sum /etc/$name/config.toml)
pid_before=$(show MainPID)
if run_install upgrade; then
    pass "(3) second install.sh: exit 0 ($(grep -m1 Upgraded "$host_dir/upgrade.out"))"
else
    fail "(3) second install.sh"
    output upgrade
fi
check "(3) it says upgrade and restart" \
    bash -c "grep -q '^Upgraded $name' '$host_dir/upgrade.out' && grep -q '^Restarted $unit' '$host_dir/upgrade.out'"
check "(3) the operator's config is kept" test "$(ct sha256sum /etc/$name/config.toml)" = "$config_before"
check "(3) a file the earlier version installed and this one does not is removed" ct test ! -e $dropped
restarted() { [[ $(show MainPID) != 0 && $(show MainPID) != "$pid_before" ]] && connected; }
check "(3) the unit was restarted (MainPID $pid_before -> $(show MainPID)) and connects" wait_until 30 restarted
check "(3) still enabled" test "$(ct systemctl is-enabled "$unit" 2>&1)" = enabled
ct_env runuser -u appuser -- $bin send --topic sensors/t '{"n":2}' >/dev/null 2>&1
delivered_quietly() { delivered "$1" >/dev/null; }
check "(3) a reading after the upgrade is delivered" wait_until 15 delivered_quietly 2

# --- uninstall, purge ------------------------------------------------------------------------
# The installed copy of install.sh: no tarball needed to remove it.
if INSTALL_SCRIPT=$installed_script run_install uninstall --uninstall; then
    pass "(4) $installed_script --uninstall: exit 0"
else
    fail "(4) --uninstall"
    output uninstall
fi
check "(4) the unit is stopped" test "$(ct systemctl is-active "$unit" 2>&1)" != active
check "(4) systemd no longer knows the unit" \
    test -z "$(ct systemctl list-unit-files --no-legend "$unit")"
left=$(left_over | tr '\n' ' ')
check "(4) left under /usr/local and /etc: only the config (${left:-nothing})" \
    test "$left" = "/etc/$name /etc/$name/config.toml "
check "(4) the operator's config is kept" test "$(ct sha256sum /etc/$name/config.toml)" = "$config_before"
check "(4) the spool is kept" ct test -f /var/lib/$name/spool.db
check "(4) the user is kept" has_account

if run_install purge --uninstall --purge; then
    pass "(5) install.sh --uninstall --purge: exit 0"
else
    fail "(5) --uninstall --purge"
    output purge
fi
left=$(left_over | tr '\n' ' ')
check "(5) nothing left under /usr/local and /etc${left:+: $left}" test -z "$left"
check "(5) /var/lib/$name is gone" ct test ! -e /var/lib/$name
check "(5) the user and the group are gone" no_account

# =============================================================================================
# Without an init system.
container_stop
container_boot none
unpack
snapshot >"$host_dir/before"
check "(6) no /run/systemd/system here" ct test ! -e /run/systemd/system
if run_install plain; then
    pass "(6) install.sh without systemd: exit 0"
else
    output plain
    die "(6) install.sh without systemd"
fi
check "(6) it prints the supervisor hint" \
    bash -c "grep -q 'No systemd here' '$host_dir/plain.out' && grep -q 'OpenRC:' '$host_dir/plain.out' && grep -q '::respawn:' '$host_dir/plain.out'"
check "(6) useradd created the user and group ($(ct id "$name" 2>&1))" has_account
passwd_line=$(ct grep "^$name:" /etc/passwd)
IFS=: read -r _ _ uid _ _ home shell <<<"$passwd_line"
system_user() { ((uid < 1000)) && [[ $home == /var/lib/$name && $shell == */nologin ]]; }
check "(6) a system user: uid $uid, home $home, shell $shell" system_user
got=$(modes /var/lib/$name /run/$name)
check "(6) modes of /var/lib/$name, /run/$name: $got" \
    test "$got" = "700 $name:$name 750 $name:$name"
check "(6) tmpfiles snippet and OpenRC example installed" \
    ct test -f /etc/tmpfiles.d/$name.conf -a -f /usr/local/share/$name/openrc-init.d
check "(6) no unit, no sysusers snippet" \
    ct test ! -e /etc/systemd/system/$unit -a ! -e /etc/sysusers.d/$name.conf

# The daemon by hand, as its user: offline here (no cloud, nothing listens), so it spools.
ct_env bash -ec "cat >/etc/$name/config.toml" <<EOF
[aws]
endpoint_url = "http://127.0.0.1:5000"

[identity]
identity_pool_id = "us-east-1:0b7c5a57-6a4f-4a62-9d36-3f1c0e3b6a11"
secret_id = "relay-test/none"
EOF
# As the hint's inittab line runs it: su to the user (its shell is nologin), in BusyBox su's
# argument order (Debian's busybox has no su applet: util-linux su takes the same line).
as_user() { ct_env su -s /bin/sh $name -c "$1"; }
as_user "$bin check-config" >"$host_dir/check-config.out" 2>&1
rc=$?
check "(7) check-config as $name: exit $rc $(grep -m1 -i error "$host_dir/check-config.out")" test $rc -eq 0
as_user "exec $bin run --config /etc/$name/config.toml" >"$host_dir/daemon.log" 2>&1 &
daemon=$!
answers() { ct $bin status --json >/dev/null 2>&1; }
if wait_until 15 answers; then
    pass "(7) run as $name: status answers (state $(ct $bin status --json 2>/dev/null | "$venv/bin/python3" -c 'import json, sys; print(json.load(sys.stdin)["state"])'))"
else
    fail "(7) run as $name: status does not answer"
    cat "$host_dir/daemon.log"
fi
ct useradd --system --no-create-home --shell /usr/sbin/nologin --groups "$name" appuser
sent=$(ct_env runuser -u appuser -- $bin send --topic sensors/t '{"n":1}' 2>&1)
check "(7) a group member's reading is accepted (spooled)${sent:+: $sent}" test $? -eq 0
check "(7) the socket: $(modes /run/$name/relay.sock)" \
    test "$(modes /run/$name/relay.sock)" = "660 $name:$name"
run_install refused --uninstall
rc=$?
check "(8) --uninstall while it runs: refused (exit $rc: $(head -c 120 "$host_dir/refused.out"))" \
    bash -c "[[ $rc -ne 0 ]] && grep -q 'still running' '$host_dir/refused.out'"
# Its pid in the container: the process whose executable is the installed binary.
ct_daemon_pid() {
    ct sh -c 'for p in /proc/[0-9]*; do [ "$(readlink $p/exe)" = "$1" ] && echo ${p#/proc/}; done; true' sh "$bin"
}
ct kill -TERM "$(ct_daemon_pid)"
wait "$daemon"
rc=$?
check "(8) the daemon stopped on SIGTERM, exit $rc" test $rc -eq 0
if run_install plain-uninstall --uninstall; then
    pass "(8) --uninstall: exit 0"
else
    fail "(8) --uninstall"
    output plain-uninstall
fi
left=$(left_over | tr '\n' ' ')
check "(8) left under /usr/local and /etc: only the config (${left:-nothing})" \
    test "$left" = "/etc/$name /etc/$name/config.toml "
check "(8) /run/$name is gone, the spool is kept" \
    ct test ! -e /run/$name -a -f /var/lib/$name/spool.db

# Again under BusyBox: its ash runs install.sh, its applets are the tools (shadow's useradd
# family stays, as Debian's BusyBox has no adduser).
ct mkdir /bb
ct busybox --install -s /bb
for tool in useradd groupadd userdel groupdel; do ct ln -s /usr/sbin/$tool /bb/$tool; done
bb_run() { # bb_run NAME ARGS...
    local out=$host_dir/$1.out
    shift
    ct env -i PATH=/bb HOME=/root /bb/sh "$dir/install.sh" "$@" >"$out" 2>&1
}
if bb_run busybox; then
    pass "(9) BusyBox ash with BusyBox's tools: install.sh exit 0"
else
    fail "(9) BusyBox install"
    output busybox
fi
check "(9) the operator's config is kept ($(grep -o '/etc/[^ ]*: yours, kept' "$host_dir/busybox.out"))" \
    grep -q 'yours, kept' "$host_dir/busybox.out"
check "(9) binary and dirs in place" ct test -x $bin -a -d /run/$name -a -d /var/lib/$name
if bb_run busybox-purge --uninstall --purge; then
    pass "(9) BusyBox: --uninstall --purge exit 0"
else
    fail "(9) BusyBox --uninstall --purge"
    output busybox-purge
fi
left=$(left_over | tr '\n' ' ')
check "(9) nothing left under /usr/local and /etc${left:+: $left}" test -z "$left"
check "(9) the user and the group are gone" no_account
check "(9) /var/lib/$name is gone" ct test ! -e /var/lib/$name

finished=$(date +%s.%N)
printf '\n%s: %d failure(s), %s s in all\n' "$([[ $failures == 0 ]] && echo PASS || echo FAIL)" \
    "$failures" "$(seconds "$started" "$finished")"
((failures == 0))
