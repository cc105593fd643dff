#!/usr/bin/env bash
# Runs every test of the workspace. This is the README's test command and the heart of .ci/run.
# It installs what the tests need and is missing (on Debian, as root or with sudo), so a new
# machine needs nothing but Rust.
set -euo pipefail
cd "$(dirname "$0")/.."

# Packages the tests need, installed only when missing:
#   postfix  tests/postfix.rs runs a private Postfix (own config and queue in a temp dir).
#   systemd  tests/systemd.rs checks contrib/greyhound.service with systemd-analyze (offline:
#            no running systemd is needed).
#   redis-server  tests/cluster.rs starts private Redis servers (own port and temp dir each).
#   openssl  tests/cluster.rs makes a private CA and certificate for Redis over TLS.
#   dnsmasq-base  tests/spf.rs starts private DNS servers (own port, records on the command line).
#   postgrey db5.3-util sqlgrey libdbd-sqlite3-perl greylistd  tests/import.rs runs the real
#            peers privately (own port or socket, data in a temp dir) and reads back their
#            files; db5.3-util's db5.3_dump prints postgrey's databases.
#   libsqlite3-dev  rusqlite (the sqlgrey importer) links the system SQLite.
# --no-install-recommends matters: greylistd recommends exim4, which would replace Postfix.
need_pkgs=()
for pkg in postfix systemd redis-server openssl dnsmasq-base \
    postgrey db5.3-util sqlgrey libdbd-sqlite3-perl greylistd libsqlite3-dev; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$' \
        || need_pkgs+=("$pkg")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    # "No configuration": the package writes no working /etc/postfix/main.cf, so it has no
    # reason to start a system Postfix; the test brings its own configuration.
    echo 'postfix postfix/main_mailer_type select No configuration' | $sudo debconf-set-selections
    $sudo apt-get update -q
    $sudo apt-get install -y -q --no-install-recommends "${need_pkgs[@]}"
    # Should the package have started the system instance anyway (an init script with an
    # old main.cf), stop it: the test's Postfix needs none, and a stray master on port 25
    # is nobody's business on a test machine. Our private instances use their own -c DIR.
    if $sudo postfix status >/dev/null 2>&1; then
        $sudo postfix stop || true
    fi
    # Likewise the package's own Redis on port 6379 (started by its postinst where services
    # may start): stopped and not started at boot; the cluster tests run their own.
    if [[ " ${need_pkgs[*]} " == *" redis-server "* ]]; then
        if [ -d /run/systemd/system ]; then
            $sudo systemctl disable --now redis-server.service >/dev/null 2>&1 || true
        else
            $sudo service redis-server stop >/dev/null 2>&1 || true
            $sudo update-rc.d redis-server disable >/dev/null 2>&1 || true
        fi
    fi
    # Likewise the greylisting peers' own services: the import tests run their own.
    for svc in postgrey sqlgrey greylistd; do
        [[ " ${need_pkgs[*]} " == *" $svc "* ]] || continue
        if [ -d /run/systemd/system ]; then
            $sudo systemctl disable --now "$svc.service" >/dev/null 2>&1 || true
            # greylistd is socket-activated too.
            $sudo systemctl disable --now "$svc.socket" >/dev/null 2>&1 || true
        else
            $sudo service "$svc" stop >/dev/null 2>&1 || true
            $sudo update-rc.d "$svc" disable >/dev/null 2>&1 || true
        fi
    done
fi

cargo test --workspace --locked "$@"
