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
t0=$(date +%s.%N)
elapsed() { python3 -c "import time; print('$1=%.1f' % (time.time() - $t0))" >> "$R/timings"; }

# Install: postinst builds the venv from the bundled wheels, adds edge-infer, enables the unit.
check install dpkg -i /probe/edge-agent.deb
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
infer > "$R/infer_output.json" 2>&1
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

systemctl status edge-agent.service --no-pager > "$R/status.txt" 2>&1
journalctl -u edge-agent.service --no-pager > "$R/agent-journal.log" 2>&1

check purge dpkg --purge edge-agent
check purged sh -c '! [ -e /opt/edge-agent ] && ! [ -e /etc/edge-agent ] && ! [ -e /lib/systemd/system/edge-agent.service ] && ! [ -e /var/lib/private/edge-agent ] && ! [ -e /usr/bin/edge-agent ]'
check stopped sh -c '! systemctl is-active --quiet edge-agent.service'
elapsed purge_s
echo done > "$R/done"
systemctl poweroff --no-block
