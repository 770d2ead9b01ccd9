#!/usr/bin/env bash
# Builds the Debian package from the already-built binary, installs it with dpkg on this machine,
# and checks the installed files: the unit verifies, check-config passes from the installed
# paths as the sealpost user, the queue key and directories have the right owners and modes.
# Needs root (CI runs as root). Usage: tests/package/deb-install.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

fail() { echo "deb-install: FAIL: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "must run as root (dpkg -i)"
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --version 3.8.0
cargo build -p sealpost --bin sealpost
deb=$(mktemp -d)/sealpost.deb
# --profile dev reuses the test build (a release build would double CI time); stripped, fast compression.
cargo deb -p sealpost --profile dev --no-build --fast -o "$deb" 2>&1 | grep -v 'dev profile\|^ ' || true
[ -s "$deb" ] || fail "no package built"
dpkg -i "$deb"

test -x /usr/bin/sealpost || fail "/usr/bin/sealpost missing"
test -f /usr/lib/systemd/system/sealpost.service || fail "unit missing"
getent passwd sealpost >/dev/null || fail "user sealpost not created"
[ "$(stat -c '%a %U' /etc/sealpost/queue.key)" = "600 root" ] || fail "queue.key mode/owner: $(stat -c '%a %U' /etc/sealpost/queue.key)"
[ "$(stat -c '%a %U' /var/lib/sealpost)" = "700 sealpost" ] || fail "state dir mode/owner: $(stat -c '%a %U' /var/lib/sealpost)"
dpkg-query -W -f='${Conffiles}\n' sealpost | grep -q '/etc/sealpost/sealpost.toml' || fail "sealpost.toml is not a conffile"

systemd-analyze verify /usr/lib/systemd/system/sealpost.service || fail "systemd-analyze verify"
echo "== systemd-analyze security (offline)"
systemd-analyze security --offline=true /usr/lib/systemd/system/sealpost.service | tail -n 1

runuser -u sealpost -- /usr/bin/sealpost check-config --config /etc/sealpost/sealpost.toml \
  || fail "check-config from the installed paths"
echo "deb-install: OK (package installs, unit verifies, check-config passes as sealpost)"
