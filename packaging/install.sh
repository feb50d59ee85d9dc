#!/bin/sh
# Installs iot-cognito-relay from its release tarball, the way the Debian package does, under
# /usr/local. Run it as root from the unpacked tarball:
#
#   sh install.sh                      install, or upgrade an earlier install
#   sh install.sh --uninstall          remove it, keep the config and the spool
#   sh install.sh --uninstall --purge  remove those too, and the system user
#
# POSIX sh (dash, BusyBox ash). Under systemd it installs the unit and the sysusers snippet,
# creates the user with systemd-sysusers and enables the unit; elsewhere (OpenRC, BusyBox init)
# it creates the user and the directories itself and says how to run the daemon. What it
# installed is listed in /usr/local/share/iot-cognito-relay/installed-files, beside a copy of
# this script, so that an upgrade drops files a newer version no longer ships and --uninstall
# works without the tarball.
set -eu

VERSION='@VERSION@'
ARCH='@ARCH@'

NAME=iot-cognito-relay
PREFIX=/usr/local
BIN=$PREFIX/bin/$NAME
SHARE=$PREFIX/share/$NAME
MANIFEST=$SHARE/installed-files
DOC=$PREFIX/share/doc/$NAME
MAN=$PREFIX/share/man/man1
UNIT=/etc/systemd/system/$NAME.service
SYSUSERS=/etc/sysusers.d/$NAME.conf
TMPFILES=/etc/tmpfiles.d/$NAME.conf
CONF_DIR=/etc/$NAME
CONFIG=$CONF_DIR/config.toml
STATE_DIR=/var/lib/$NAME
RUN_DIR=/run/$NAME
USER_NAME=$NAME
GECOS="iot-cognito-relay daemon"

usage() {
    cat <<EOF
Usage: sh install.sh [--uninstall [--purge]]

Installs iot-cognito-relay $VERSION ($ARCH) into $PREFIX, as root:
  $BIN, the default config $CONFIG (only if there is none),
  man pages, shell completions and docs under $PREFIX/share;
  under systemd: $UNIT (enabled, not started) and $SYSUSERS;
  without systemd: the user $USER_NAME, $STATE_DIR and $RUN_DIR,
  $TMPFILES, and how to run the daemon under your supervisor.
Run again to upgrade: the config is kept, a running unit is restarted.

  --uninstall  stop and disable the unit, remove what was installed; keep $CONFIG
               and the spool in $STATE_DIR
  --purge      with --uninstall: also remove $CONF_DIR, $STATE_DIR and the user
  --help       this text
EOF
}

die() {
    printf 'install.sh: %s\n' "$*" >&2
    exit 1
}

uninstall=false
purge=false
for arg in "$@"; do
    case "$arg" in
        --uninstall) uninstall=true ;;
        --purge) purge=true ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
if $purge && ! $uninstall; then
    die "--purge goes with --uninstall"
fi
case "$VERSION$ARCH" in
    *@*) die "this is the template: run the install.sh of a release tarball (scripts/tarball.sh makes one)" ;;
esac

# need COMMAND...: every one must exist; names all that do not.
need() {
    missing=
    for command in "$@"; do
        command -v "$command" >/dev/null 2>&1 || missing="$missing $command"
    done
    [ -z "$missing" ] || die "missing command(s):$missing"
}
# first_of COMMAND...: the first that exists, or nothing (and still success: set -e).
first_of() {
    for command in "$@"; do
        if command -v "$command" >/dev/null 2>&1; then
            echo "$command"
            return 0
        fi
    done
    return 0
}

need id uname cat cp mv rm mkdir rmdir chmod chown sed grep sort readlink dirname mktemp
[ "$(id -u)" = 0 ] || die "must run as root (sudo sh install.sh $*)"

# systemd is the init when /run/systemd/system exists (what sd_booted(3) checks).
if [ -d /run/systemd/system ]; then
    systemd=true
    need systemctl systemd-sysusers
else
    systemd=false
fi

umask 022
here=$(cd "$(dirname "$0")" && pwd)
manifest_new=
cleanup() {
    if [ -n "$manifest_new" ]; then rm -f "$manifest_new"*; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The daemon's processes: every one running the installed binary (also after an upgrade
# replaced it: the kernel then shows it as deleted).
daemon_pids() {
    for proc in /proc/[0-9]*; do
        exe=$(readlink "$proc/exe" 2>/dev/null) || continue
        case "$exe" in
            "$BIN" | "$BIN (deleted)") printf '%s ' "${proc#/proc/}" ;;
        esac
    done
}

user_exists() { id -u "$USER_NAME" >/dev/null 2>&1; }
group_exists() { grep -q "^$USER_NAME:" /etc/group; }

remove_account() {
    if user_exists; then
        tool=$(first_of userdel deluser)
        [ -n "$tool" ] || die "cannot remove the user $USER_NAME: no userdel or deluser"
        "$tool" "$USER_NAME" || die "$tool $USER_NAME failed"
    fi
    # userdel and BusyBox deluser may leave the group behind.
    if group_exists; then
        tool=$(first_of groupdel delgroup)
        [ -n "$tool" ] || die "cannot remove the group $USER_NAME: no groupdel or delgroup"
        "$tool" "$USER_NAME" || die "$tool $USER_NAME failed"
    fi
}

# Removes the files the manifest lists, then the directories it made, deepest first, if
# empty (what else landed in them stays).
remove_listed() {
    [ -f "$MANIFEST" ] || return 0
    dirs=$(grep '^/.*/$' "$MANIFEST" | sort -r) || true
    grep '^/.*[^/]$' "$MANIFEST" | while IFS= read -r path; do
        rm -f "$path"
    done
    for dir in $dirs; do
        rmdir "$dir" 2>/dev/null || true
    done
}

# --- uninstall -------------------------------------------------------------------------------
if $uninstall; then
    if [ ! -f "$MANIFEST" ] && ! $purge; then
        die "nothing to uninstall: $MANIFEST does not exist"
    fi
    if $systemd && systemctl cat "$NAME.service" >/dev/null 2>&1; then
        out=$(systemctl disable --now "$NAME.service" 2>&1) ||
            die "systemctl disable --now $NAME.service failed: $out"
    fi
    pids=$(daemon_pids)
    pids=${pids% }
    [ -z "$pids" ] ||
        die "$NAME is still running (pid $pids): stop it under its supervisor first"
    if [ -f "$MANIFEST" ]; then
        installed=$(sed -n 's/^# version //p' "$MANIFEST")
        remove_listed
        echo "Removed $NAME $installed."
    fi
    rm -rf "$RUN_DIR"
    if $systemd; then systemctl daemon-reload; fi
    if $purge; then
        rm -rf "$CONF_DIR" "$STATE_DIR"
        remove_account
        echo "Purged $CONF_DIR, $STATE_DIR and the user $USER_NAME."
    else
        echo "Kept $CONFIG and $STATE_DIR (the spool, the identity cache): --uninstall --purge removes them."
    fi
    if [ -d "/etc/systemd/system/$NAME.service.d" ]; then
        echo "Kept your drop-ins in /etc/systemd/system/$NAME.service.d."
    fi
    exit 0
fi

# --- install ---------------------------------------------------------------------------------
# The architecture: this build runs on the machines uname -m names below (32-bit ARM builds
# also on a 64-bit ARM kernel that runs 32-bit programs; the test run below tells).
machine=$(uname -m)
case "$ARCH:$machine" in
    x86_64:x86_64 | aarch64:aarch64 | aarch64:arm64) ;;
    armv7:armv7* | armv7:armv8* | armv7:aarch64 | armv7:arm64) ;;
    armv6:armv6* | armv6:armv7* | armv6:armv8* | armv6:aarch64 | armv6:arm64) ;;
    armv7:armv6*)
        die "this is the armv7 build and this CPU is ARMv6 ($machine: Raspberry Pi Zero/1): use iot-cognito-relay-$VERSION-armv6.tar.gz" ;;
    *)
        die "this is the $ARCH build and this machine is $machine: use the tarball for it (x86_64, aarch64, armv7 for 32-bit ARMv7 and later, armv6 for the Raspberry Pi Zero/1)" ;;
esac
[ -f "$here/$NAME" ] || die "$here/$NAME is missing: unpack the whole tarball"
if ! ran=$("$here/$NAME" --version 2>&1) || [ "$ran" != "$NAME $VERSION" ]; then
    die "the $ARCH binary does not run on this $machine machine ($ran); unpacked on a noexec mount (/tmp often is)? Unpack it elsewhere"
fi
if [ -e /usr/bin/$NAME ] || [ -e /lib/systemd/system/$NAME.service ] || [ -e /usr/lib/systemd/system/$NAME.service ]; then
    die "the Debian package is installed (/usr/bin/$NAME): upgrade it with the .deb, or remove it (apt remove $NAME) before installing this"
fi

previous=
if [ -f "$MANIFEST" ]; then
    previous=$(sed -n 's/^# version //p' "$MANIFEST")
fi

# The manifest: "# key value" lines, then one path a line, directories with a trailing slash.
manifest_new=$(mktemp)
printf '# version %s\n# arch %s\n' "$VERSION" "$ARCH" >"$manifest_new"
# Directories an earlier install made are still ours.
if [ -f "$MANIFEST" ]; then grep '^/.*/$' "$MANIFEST" >>"$manifest_new" || true; fi

# make_dir DIR: mkdir -p, listing each directory it makes.
make_dir() {
    [ -d "$1" ] && return 0
    make_dir "$(dirname "$1")"
    mkdir "$1"
    echo "$1/" >>"$manifest_new"
}
# put MODE SOURCE DEST: a root-owned copy, swapped in by rename (a running binary stays
# intact), listed in the manifest.
put() {
    make_dir "$(dirname "$3")"
    cp "$2" "$3.new"
    chown 0:0 "$3.new"
    chmod "$1" "$3.new"
    mv -f "$3.new" "$3"
    echo "$3" >>"$manifest_new"
}

put 0755 "$here/$NAME" "$BIN"
for page in "$here"/man/*.1; do
    put 0644 "$page" "$MAN/${page##*/}"
done
put 0644 "$here/completions/iot-cognito-relay.bash" "$PREFIX/share/bash-completion/completions/$NAME"
put 0644 "$here/completions/_iot-cognito-relay" "$PREFIX/share/zsh/site-functions/_$NAME"
put 0644 "$here/completions/iot-cognito-relay.fish" "$PREFIX/share/fish/vendor_completions.d/$NAME.fish"
for doc in "$here/README.md" "$here/LICENSE" "$here"/docs/*.md; do
    put 0644 "$doc" "$DOC/${doc##*/}"
done
put 0755 "$0" "$SHARE/install.sh"

if $systemd; then
    # The packaged unit names /usr/bin and the package's doc dir.
    sed -e "s|^ExecStart=/usr/bin/$NAME |ExecStart=$BIN |" \
        -e "s|file:///usr/share/doc/$NAME/|file://$DOC/|" \
        "$here/$NAME.service" >"$manifest_new.unit"
    grep -q "^ExecStart=$BIN run " "$manifest_new.unit" ||
        die "$here/$NAME.service has no ExecStart=/usr/bin/$NAME"
    put 0644 "$manifest_new.unit" "$UNIT"
    put 0644 "$here/$NAME.sysusers" "$SYSUSERS"
    systemd-sysusers "$SYSUSERS" || die "systemd-sysusers $SYSUSERS failed"
else
    put 0644 "$here/$NAME.tmpfiles" "$TMPFILES"
    put 0644 "$here/$NAME.openrc" "$SHARE/openrc-init.d"
    if ! group_exists; then
        tool=$(first_of groupadd addgroup)
        case "$tool" in
            groupadd) groupadd --system "$USER_NAME" ;;
            addgroup) addgroup -S "$USER_NAME" ;;
            *) die "cannot create the group $USER_NAME: no groupadd or addgroup" ;;
        esac || die "$tool $USER_NAME failed"
    fi
    if ! user_exists; then
        nologin=$(first_of /usr/sbin/nologin /sbin/nologin)
        tool=$(first_of useradd adduser)
        case "$tool" in
            useradd) useradd --system --gid "$USER_NAME" --home-dir "$STATE_DIR" --no-create-home \
                --shell "${nologin:-/bin/false}" --comment "$GECOS" "$USER_NAME" ;;
            adduser) adduser -S -D -H -h "$STATE_DIR" -s "${nologin:-/bin/false}" \
                -G "$USER_NAME" -g "$GECOS" "$USER_NAME" ;;
            *) die "cannot create the user $USER_NAME: no useradd or adduser" ;;
        esac || die "$tool $USER_NAME failed"
    fi
    # What the unit's StateDirectory= and RuntimeDirectory= would make (RUN_DIR again at each
    # boot: the supervisor's job, see below).
    mkdir -p "$STATE_DIR" "$RUN_DIR"
    chown "$USER_NAME:$USER_NAME" "$STATE_DIR" "$RUN_DIR"
    chmod 0700 "$STATE_DIR"
    chmod 0750 "$RUN_DIR"
fi

if [ ! -e "$CONFIG" ]; then
    mkdir -p "$CONF_DIR"
    cp "$here/config.toml" "$CONFIG.new"
    chown 0:0 "$CONFIG.new"
    chmod 0644 "$CONFIG.new"
    mv "$CONFIG.new" "$CONFIG"
    config_note="$CONFIG: the default, to be filled in"
else
    config_note="$CONFIG: yours, kept"
fi

# Files an earlier version installed and this one does not.
echo "$MANIFEST" >>"$manifest_new"
if [ -f "$MANIFEST" ]; then
    grep '^/.*[^/]$' "$MANIFEST" | while IFS= read -r path; do
        grep -qxF "$path" "$manifest_new" || rm -f "$path"
    done
fi
cp "$manifest_new" "$MANIFEST.new"
chmod 0644 "$MANIFEST.new"
mv -f "$MANIFEST.new" "$MANIFEST"

if [ -n "$previous" ]; then
    echo "Upgraded $NAME $previous to $VERSION ($ARCH) in $PREFIX; $config_note."
else
    echo "Installed $NAME $VERSION ($ARCH) in $PREFIX; $config_note."
fi

if $systemd; then
    systemctl daemon-reload
    if [ -n "$previous" ]; then
        # As the package's upgrade: restarted if it runs; enabled or not as the admin left it.
        if systemctl is-active --quiet "$NAME.service"; then
            systemctl restart "$NAME.service"
            echo "Restarted $NAME.service."
        fi
    else
        systemctl enable "$NAME.service" ||
            die "systemctl enable $NAME.service failed"
        cat <<EOF
$NAME.service is enabled, not started: the default config has no identity yet.
Next:
  1. Write $CONFIG from your stack's outputs:
       $NAME config-from-stack stack.json > $CONFIG
       $NAME check-config
  2. Let the local apps in:  usermod -aG $USER_NAME APPUSER
  3. systemctl start $NAME
  4. $NAME status; if it does not connect: $NAME doctor
Docs: $DOC/operations.md. Remove: sh $SHARE/install.sh --uninstall [--purge]
EOF
    fi
    exit 0
fi

if [ -n "$previous" ]; then
    pids=$(daemon_pids)
    pids=${pids% }
    if [ -n "$pids" ]; then
        echo "The daemon runs (pid $pids) with the previous binary: restart it under its supervisor."
    fi
    exit 0
fi
cat <<EOF
No systemd here: the user $USER_NAME, $STATE_DIR and $RUN_DIR are made.
Next:
  1. Write $CONFIG from your stack's outputs ($NAME config-from-stack stack.json),
     then: $NAME check-config
  2. Let the local apps in: add them to the group $USER_NAME (usermod -aG, or BusyBox
     addgroup APPUSER $USER_NAME)
  3. Run the daemon as $USER_NAME under your supervisor:
     OpenRC:  install -m 0755 $SHARE/openrc-init.d /etc/init.d/$NAME
              rc-update add $NAME default && rc-service $NAME start
     others:  at each boot, before it starts (unless tmpfiles.d runs):
                mkdir -p $RUN_DIR && chown $USER_NAME:$USER_NAME $RUN_DIR && chmod 0750 $RUN_DIR
              then run, restarted when it exits, e.g. a BusyBox /etc/inittab line:
                ::respawn:/bin/su -s /bin/sh $USER_NAME -c 'exec $BIN run --config $CONFIG'
     It logs to stderr; SIGHUP reloads, SIGTERM stops (it drains for up to 15 s); exit
     status 2 is a config error that a restart does not fix.
Docs: $DOC/operations.md. Remove: sh $SHARE/install.sh --uninstall [--purge]
EOF
