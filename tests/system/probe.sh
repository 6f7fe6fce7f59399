#!/bin/sh
# Runs inside the booted container as a Type=simple unit (tests/system/test_device_install.py).
# Writes NAME=ok|FAIL lines to /probe/results/results, logs beside it, then powers off.
R=/probe/results
mkdir -p "$R"
: > "$R/results"
result() { echo "$1=$2" >> "$R/results"; }
check() { name=$1; shift; if "$@" >> "$R/$name.log" 2>&1; then result "$name" ok; else result "$name" FAIL; fi; }
show() { systemctl show -P "$1" edge-agent.service; }
wait_for() {  # wait_for SECONDS CMD...: poll CMD until it succeeds
    limit=$1; shift; i=0
    while [ "$i" -lt "$((limit * 2))" ]; do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; i=$((i + 1)); done
    return 1
}
infer() { edge-agent infer linear --input /probe/input.npy --socket /run/edge-agent/infer.sock; }
served() { systemctl show -P StatusText edge-agent.service | grep -q "serving linear 1.0.0"; }
STATE=/var/lib/private/edge-agent/models/linear
committed() { python3 -c "import json, sys; d = json.load(open('$STATE/journal.json')); sys.exit((d['phase'], d['version']) != ('committed', '1.0.0'))"; }
t0=$(date +%s.%N)
elapsed() { python3 -c "import time; print('$1=%.1f' % (time.time() - $t0))" >> "$R/timings"; }

# Install the previous release first: postinst builds the venv from the bundled wheels,
# adds edge-infer, enables the unit. This tree's package is installed over it below.
check install_previous dpkg -i /probe/edge-agent-previous.deb
check previous_version sh -c 'edge-agent --version | grep -q "edge-agent 0.0.9"'
elapsed install_s
check enabled systemctl is-enabled edge-agent.service
check group getent group edge-infer
# Not enrolled yet: the unit's condition keeps it inactive, not failed.
check not_failed_before_enroll sh -c '! systemctl is-failed --quiet edge-agent.service'

check enroll edge-agent enroll /probe/enroll.tar
check key_mode sh -c '[ "$(stat -c "%a %U:%G" /etc/edge-agent/device.key)" = "600 root:root" ]'
check config_mode sh -c '[ "$(stat -c "%a %U:%G" /etc/edge-agent/agent.toml)" = "644 root:root" ]'

# A short watchdog so the SIGSTOP check is quick (a drop-in, as an operator would).
mkdir -p /etc/systemd/system/edge-agent.service.d
printf '[Service]\nWatchdogSec=4s\n' > /etc/systemd/system/edge-agent.service.d/test-watchdog.conf
systemctl daemon-reload
# Type=notify: `start` returns once the agent sent READY=1.
check ready systemctl start edge-agent.service
elapsed ready_s
show StatusText > "$R/status_at_ready.txt"
check socket_mode sh -c '[ "$(stat -c "%a %G" /run/edge-agent/infer.sock)" = "660 edge-infer" ]'
# The release arrives from the repository on the host (the first poll runs at start).
check served wait_for 120 served
check infer wait_for 30 infer
elapsed inference_s
infer > "$R/infer_before_upgrade.json" 2>&1

# Upgrade while it serves: the same version keeps serving from the same state, with no
# reinstall (the journal stays committed, the version folder is the same folder).
wait_for 60 committed
touch "$STATE/1.0.0/.probe-marker"
upgrade_at=$(date +%s)
check upgrade dpkg -i /probe/edge-agent.deb
check upgraded_version sh -c 'edge-agent --version | grep -q "edge-agent 0.1.0"'
check active_after_upgrade wait_for 60 systemctl is-active --quiet edge-agent.service
check served_after_upgrade wait_for 60 served
check same_answer_after_upgrade wait_for 30 infer
infer > "$R/infer_output.json" 2>&1
check journal_kept committed
check version_folder_kept test -e "$STATE/1.0.0/.probe-marker"
check not_reinstalled sh -c "! journalctl -u edge-agent.service --since @$upgrade_at --no-pager | grep -q 'installing linear'"
elapsed upgrade_s
check runs_unprivileged sh -c '[ "$(stat -c %u /proc/$(systemctl show -P MainPID edge-agent)/)" != 0 ]'

# The watchdog: a stopped agent misses its pings, systemd kills it and starts it again.
pid=$(show MainPID)
restarts=$(show NRestarts)
kill -STOP "$pid"
restarted() { [ "$(show NRestarts)" -gt "$restarts" ] && [ "$(show MainPID)" != "$pid" ] && [ "$(show ActiveState)" = active ] && [ "$(show SubState)" = running ]; }
check watchdog_restart wait_for 60 restarted
elapsed watchdog_s
check watchdog_logged sh -c 'journalctl -u edge-agent.service --no-pager | grep -q "Watchdog timeout"'
# After the restart the last good version serves again, restored from the state directory.
check served_after_restart wait_for 60 infer
elapsed restored_s

# A loop that dies while the process lives: the agent stops feeding the watchdog, so
# systemd restarts it (a test-only hook ends the update loop after its first check).
printf '[Service]\nEnvironment=EDGEFLEET_TEST_STOP_LOOP=update\n' > /etc/systemd/system/edge-agent.service.d/test-dead-loop.conf
systemctl daemon-reload
systemctl restart edge-agent.service
pid=$(show MainPID)
restarts=$(show NRestarts)
check dead_loop_restart wait_for 90 restarted
check dead_loop_logged sh -c 'journalctl -u edge-agent.service --no-pager | grep -q "not feeding the systemd watchdog"'
rm /etc/systemd/system/edge-agent.service.d/test-dead-loop.conf
systemctl daemon-reload
systemctl restart edge-agent.service
check served_after_dead_loop wait_for 60 infer
elapsed dead_loop_s

systemctl status edge-agent.service --no-pager > "$R/status.txt" 2>&1
journalctl -u edge-agent.service --no-pager > "$R/agent-journal.log" 2>&1

check purge dpkg --purge edge-agent
check purged sh -c '! [ -e /opt/edge-agent ] && ! [ -e /etc/edge-agent ] && ! [ -e /lib/systemd/system/edge-agent.service ] && ! [ -e /var/lib/private/edge-agent ] && ! [ -e /usr/bin/edge-agent ]'
check stopped sh -c '! systemctl is-active --quiet edge-agent.service'
elapsed purge_s
echo done > "$R/done"
systemctl poweroff --no-block
