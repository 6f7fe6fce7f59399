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
served() { systemctl show -P StatusText edge-agent.service | grep -q "serving linear ${1:-1.0.0}"; }
STATE=/var/lib/private/edge-agent/models/linear
journal_says() {  # journal_says PHASE VERSION: the model's journal is in PHASE on VERSION
    python3 -c "import json, sys; d = json.load(open('$STATE/journal.json')); sys.exit((d['phase'], d['version']) != ('$1', '$2'))"
}
committed() { journal_says committed "${1:-1.0.0}"; }
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

wait_for 60 committed
touch "$STATE/1.0.0/.probe-marker"

# The host releases 2.0.0 as a format 2 bundle (zstd members): this previous agent reads
# manifest /1 only, so it refuses it by its schema check, keeps serving 1.0.0, and its
# journal says 2.0.0 failed for that rollout.
touch "$R/release-format-2"
check format_2_released wait_for 120 test -e "$R/format-2-released"
# The host's serve announces nothing (it has no broker link) and the poll is minutes
# apart: a restart makes the agent check at once (its first check runs at start).
systemctl restart edge-agent.service
check previous_refuses_format_2 wait_for 120 journal_says failed 2.0.0
check previous_refusal_is_the_schema grep -q "schema expected 'edgefleet.manifest/1', got 'edgefleet.manifest/2'" "$STATE/journal.json"
check previous_keeps_serving served 1.0.0
check previous_still_answers infer
journalctl -u edge-agent.service --no-pager > "$R/previous-agent-journal.log" 2>&1

# Upgrade while it serves: what the previous agent left is read, not forgotten (1.0.0
# serves again from the same folder, no reinstall), and the format 2 release it refused
# is tried again by this agent, installed and served, with no new release.
upgrade_at=$(date +%s)
check upgrade dpkg -i /probe/edge-agent.deb
check upgraded_version sh -c 'edge-agent --version | grep -q "edge-agent 0.1.0"'
check active_after_upgrade wait_for 60 systemctl is-active --quiet edge-agent.service
check restored_after_upgrade wait_for 60 sh -c "journalctl -u edge-agent.service --since @$upgrade_at --no-pager | grep -q 'serving linear 1.0.0 (restored from disk)'"
check served_after_upgrade wait_for 120 served 2.0.0
check format_2_committed wait_for 60 committed 2.0.0
check format_2_retried sh -c "journalctl -u edge-agent.service --since @$upgrade_at --no-pager | grep -q 'linear: 2.0.0 was refused here by .* for a contract it lacked'"
check same_answer_after_upgrade wait_for 30 infer
infer > "$R/infer_output.json" 2>&1
check version_folder_kept test -e "$STATE/1.0.0/.probe-marker"
check not_reinstalled sh -c "! journalctl -u edge-agent.service --since @$upgrade_at --no-pager | grep -q 'installing linear 1.0.0'"
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

# --- Local users under the shipped unit (issue #18, defects 3 and 5) ---
# alice and bob may call the socket (group edge-infer); alice is also in cams, a group an
# allow-list names below; eve is in neither. The agent runs as the unit's dynamic user,
# so a client grants it its shared-memory object with an ACL (docs/inference-api.md).
DROPINS=/etc/systemd/system/edge-agent.service.d
client() { user=$1; shift; runuser -u "$user" -- python3 /probe/probe_client.py "$@"; }
answers() {  # answers USER STATUS TEXT ARGS...: `client USER ARGS` gets STATUS, TEXT in its body
    user=$1 status=$2 text=$3; shift 3
    out=$(client "$user" "$@"); echo "$user: $*: $out"
    case "$out" in "$status "*"$text"*) return 0 ;; esac
    return 1
}
region_doc() { printf '{"key":"/%s","offset":0,"byte_size":4096}' "$1"; }
register() { client "$1" call POST "/v2/systemsharedmemory/region/$2/register" "$(region_doc "$3")"; }
agent_uid() { stat -c %u "/proc/$(show MainPID)"; }
grant() { runuser -u "$1" -- setfacl -m "u:$(agent_uid):rw" "/dev/shm/$2"; }
reconfigure() {  # reconfigure NAME [LINE...]: drop-in NAME.conf holds [Service] LINEs (none: gone)
    name=$1; shift
    rm -f "$DROPINS/$name.conf"
    [ $# -eq 0 ] || printf '[Service]\n%s\n' "$@" > "$DROPINS/$name.conf"
    systemctl daemon-reload && systemctl restart edge-agent.service
}
own_region() {  # own_region USER NAME KEY: USER makes /dev/shm/KEY, grants it, registers it as NAME
    client "$1" region "$3" && grant "$1" "$3" && register "$1" "$2" "$3" | grep "^200 "
}
lists() {  # lists USER MINE THEIRS: USER's status lists key MINE and not key THEIRS
    out=$(client "$1" call GET /v2/systemsharedmemory/status); echo "$out"
    case "$out" in *"$3"*) return 1 ;; "200 "*"$2"*) return 0 ;; esac
    return 1
}
unregisters() {  # unregisters USER NAME: unregistering NAME, then all, answers 200
    client "$1" call POST "/v2/systemsharedmemory/region/$2/unregister" | grep "^200 " &&
        client "$1" call POST /v2/systemsharedmemory/unregister | grep "^200 "
}
memory() {  # the unit's MemoryCurrent, else (no memory controller here) the agent's RSS, bytes
    current=$(show MemoryCurrent)
    case "$current" in
        *[!0-9]* | "") awk '/^VmRSS:/ { print $2 * 1024 }' "/proc/$(show MainPID)/status" ;;
        *) echo "$current" ;;
    esac
}
cli_shm_infer() {  # cli_shm_infer USER: `edge-agent infer --shm` as USER answers as `infer` did
    out=$(runuser -u "$1" -- edge-agent infer linear --input /probe/input.npy --socket /run/edge-agent/infer.sock --shm 2>&1)
    echo "$out"; [ "$out" = "$(cat "$R/infer_output.json")" ]
}
grew_less_than() {  # grew_less_than BEFORE AFTER BYTES (numbers, else it fails)
    echo "from $1 to $2 bytes"
    python3 -c 'import sys; b, a, n = map(int, sys.argv[1:]); sys.exit(a - b >= n)' "$@"
}

check local_users sh -c 'groupadd cams && useradd -M -G edge-infer,cams alice && useradd -M -G edge-infer bob && useradd -M eve'
alice=$(id -u alice)
check unit_not_private_users sh -c '[ "$(systemctl show -P PrivateUsers edge-agent)" = no ]'
check unit_memory_max sh -c '[ "$(systemctl show -P MemoryMax edge-agent)" = 1073741824 ]'
check outsider_refused_by_socket answers eve refused "Permission denied" call GET /v2/health/ready

# Shared memory is its owner's: alice's cam0 is invisible and untouchable to bob.
client alice region alice-raw
check shm_needs_grant answers alice 400 "Permission denied" call POST /v2/systemsharedmemory/region/raw/register "$(region_doc alice-raw)"
check alice_registers own_region alice cam0 alice-cam
check alice_shm_infer answers alice 200 '"shared_memory_region":"cam0"' infer cam0 cam0
client alice read alice-cam > "$R/alice_shm_output.json"
check bob_sees_no_regions answers bob 200 '[]' call GET /v2/systemsharedmemory/status
check bob_cannot_read_cam0 answers bob 400 "'cam0' is not registered" infer cam0 -
check bob_cannot_write_cam0 answers bob 400 "'cam0' is not registered" infer - cam0
check bob_unregisters_his_own unregisters bob cam0
check bob_cannot_take_key answers bob 403 "belongs to uid $alice" call POST /v2/systemsharedmemory/region/mine/register "$(region_doc alice-cam)"
check bob_registers_own_cam0 own_region bob cam0 bob-cam
check bob_own_cam0_serves answers bob 200 '"shared_memory_region":"cam0"' infer cam0 cam0
check bob_lists_his_own lists bob bob-cam alice-cam
check alice_region_kept lists alice alice-cam bob-cam
check alice_still_served answers alice 200 '"shared_memory_region":"cam0"' infer cam0 cam0
# The project's own client grants the agent its region (an ACL for the socket's peer uid).
check cli_shm_infer cli_shm_infer alice
elapsed shm_s

# bob hoards: 16 bodies of 64 MiB announced and never sent, then 140 idle connections.
# He holds his share (peer_share ½ of 256 MiB, of 256 connections), no more, and the
# announced gigabyte is never allocated; alice, meanwhile, sends a 1 MiB body.
echo "MemoryCurrent=$(show MemoryCurrent) (not a number: the agent's RSS is measured)" > "$R/memory.txt"
before=$(memory)
rm -f /run/probe-stop-hoard
client bob hoard 16 140 /run/probe-stop-hoard > "$R/hoard.log" 2>&1 &
hoarder=$!
wait_for 30 grep -q "bodies held" "$R/hoard.log"
during=$(memory)
check bob_bodies_past_share_refused grep -q "bodies held=2 refused=14;.*refused now: this client" "$R/hoard.log"
idle_held=$(sed -n 's/.*idle held=\([0-9]*\) .*/\1/p' "$R/hoard.log")
idle_refused=$(sed -n 's/.*idle held=[0-9]* refused=\([0-9]*\) .*/\1/p' "$R/hoard.log")
check bob_connections_past_share_refused sh -c "[ '$idle_held' -le 126 ] && [ '$idle_refused' -ge 14 ]"
check hoard_not_allocated grew_less_than "$before" "$during" 67108864
check alice_served_during_hoard answers alice 200 "" large-infer 65536
touch /run/probe-stop-hoard
wait "$hoarder"
elapsed hoard_s

# Allow-lists by user and by a supplementary group, checked on real uids and groups.
reconfigure test-allow 'Environment=EDGE_AGENT_INFERENCE_ALLOWED_USERS=alice'
check allowed_user_served answers alice 200 '"outputs"' infer - -
check other_user_refused answers bob 403 "not in the allow-list" infer - -
reconfigure test-allow 'Environment=EDGE_AGENT_INFERENCE_ALLOWED_GROUPS=cams'
check allowed_group_served answers alice 200 '"outputs"' infer - -
check other_group_refused answers bob 403 "not in the allow-list" infer - -
reconfigure test-allow
elapsed allow_s

# Negative control: PrivateUsers= back in a drop-in. Every other user then reads as 65534,
# and the agent says so and fails closed instead of trusting that id.
since=$(date +%s)
reconfigure test-private-users 'PrivateUsers=yes'
check private_users_warned sh -c "journalctl -u edge-agent.service --since @$since --no-pager | grep -q 'does not map every user'"
check private_users_shm_refused answers bob 403 "cannot tell uid 65534" call POST /v2/systemsharedmemory/region/cam0/register "$(region_doc bob-cam)"
reconfigure test-private-users 'PrivateUsers=yes' 'Environment=EDGE_AGENT_INFERENCE_ALLOWED_USERS=alice'
check private_users_allow_list_refused answers alice 403 "matches no allow-list entry" infer - -
reconfigure test-private-users
check served_after_private_users answers alice 200 '"outputs"' infer - -
elapsed private_users_s

systemctl status edge-agent.service --no-pager > "$R/status.txt" 2>&1
journalctl -u edge-agent.service --no-pager > "$R/agent-journal.log" 2>&1

check purge dpkg --purge edge-agent
check purged sh -c '! [ -e /opt/edge-agent ] && ! [ -e /etc/edge-agent ] && ! [ -e /lib/systemd/system/edge-agent.service ] && ! [ -e /var/lib/private/edge-agent ] && ! [ -e /usr/bin/edge-agent ]'
check stopped sh -c '! systemctl is-active --quiet edge-agent.service'
elapsed purge_s
echo done > "$R/done"
systemctl poweroff --no-block
