#!/bin/sh
# Install edge-agent on a systemd distribution without dpkg (Fedora, Arch, Yocto, ...),
# from the release tarball this script ships in (wheels/, edge-agent.service).
#
#   sudo ./install.sh              install or upgrade, enable the service
#   sudo ./install.sh --uninstall  stop and remove it (keeps /etc/edge-agent and state)
#   sudo ./install.sh --purge      also remove the enrollment and the agent's state
#
# Needs: python3 3.11 with the venv module (the wheels are built for it), systemd >= 247,
# groupadd. Then: edge-agent enroll enroll.tar && systemctl restart edge-agent
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
OPT=/opt/edge-agent
UNIT_DIR=/etc/systemd/system
UNIT=edge-agent.service

die() { echo "install.sh: $*" >&2; exit 1; }

uninstall() {
    systemctl disable --now "$UNIT" 2>/dev/null || true
    rm -f "$UNIT_DIR/$UNIT" /usr/local/bin/edge-agent
    rm -rf "$OPT"
    systemctl daemon-reload
    if [ "${1:-}" = purge ]; then
        rm -rf /etc/edge-agent /var/lib/edge-agent /var/lib/private/edge-agent
    fi
    echo "edge-agent removed"
}

[ "$(id -u)" = 0 ] || die "run as root"
case "${1:-}" in
--uninstall) uninstall; exit 0 ;;
--purge) uninstall purge; exit 0 ;;
"") ;;
*) die "unknown option $1 (--uninstall, --purge)" ;;
esac

command -v systemctl >/dev/null || die "systemd is required"
python3 -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null \
    || die "python3 3.11 with the venv module is required (the bundled wheels are for it)"
[ -d "$HERE/wheels" ] || die "no wheels/ beside this script: run it from the release tarball"

getent group edge-infer >/dev/null || groupadd --system edge-infer
install -d -m 0755 "$OPT" "$OPT/share/doc" /etc/edge-agent
rm -rf "$OPT/wheels" && cp -r "$HERE/wheels" "$OPT/wheels"
for var in $(env | sed -n 's/^\(PIP_[A-Za-z0-9_]*\)=.*/\1/p'); do unset "$var"; done
rm -rf "$OPT/venv"
python3 -m venv "$OPT/venv"
"$OPT/venv/bin/pip" install --quiet --no-index --no-cache-dir --disable-pip-version-check \
    --find-links "$OPT/wheels" edgefleet
install -m 0644 "$HERE/operations.md" "$OPT/share/doc/operations.md"
install -m 0644 "$HERE/agent.toml.example" /etc/edge-agent/agent.toml.example
install -m 0644 "$HERE/edge-agent.service" "$UNIT_DIR/$UNIT"
ln -sf "$OPT/venv/bin/edge-agent" /usr/local/bin/edge-agent
systemctl daemon-reload
systemctl enable "$UNIT"
systemctl restart "$UNIT" || true
[ -e /etc/edge-agent/agent.toml ] \
    || echo "enroll this device: edge-agent enroll enroll.tar && systemctl restart edge-agent"
echo "edge-agent installed in $OPT"
