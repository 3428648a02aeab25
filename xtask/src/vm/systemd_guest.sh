#!/bin/bash
# The guest side of `cargo xtask vm-systemd`: port-guard's .deb under a real systemd (PID 1),
# run once at boot by pg-test.service. Prints `PG-SYSTEMD: …` lines on the console, ends with
# `PG-SYSTEMD: PASS` or `PG-SYSTEMD: FAIL: why`, and powers off either way.
#
# contrib/ansible/port-guard.yml installs the package and switches it to enforce, run with a local
# connection as an operator runs it against a host (docs/fleet.md). Every ansible-playbook run
# costs 20 s to a minute or more under TCG, so `pg.flow=` on the kernel command line says which
# part of the roll-out goes through it on this kernel:
#   audit:   install (audit mode); an audited bind that also holds its port; enforce held by the
#            gate; enforce with the gate point moved, the conflict overridden and the metrics
#            settings; then the upgrade with dpkg.
#   upgrade: a host installed and switched to enforce by hand, which the play has not seen;
#            --check of an upgrade and a switch to audit; the upgrade through the playbook with
#            no mode given, and the same run again (it changes nothing).
#   full:    audit, then upgrade's --check, upgrade and run again.
# The upgrade runs under a hostile binder. Then dpkg removes and purges the package.
set -u
say() { echo "PG-SYSTEMD: $*"; }
finish() {
    systemctl poweroff --no-block
    exit "$1"
}
fail() {
    say "FAIL: $*"
    journalctl -u port-guard --no-pager | tail -40
    finish 1
}
hostile_ok() {
    # pg-hostile's summary: nothing grabbed, every refusal with errno $3 (98: EADDRINUSE).
    say "hostile binder $1: $(cat "$2")"
    grep -q '"grabbed":0' "$2" || fail "a hostile bind succeeded $1"
    grep -Eq "\"refused\":\\{\"$3\":[0-9]+\\}" "$2" || fail "a refusal $1 did not get errno $3"
}
t0=$(date +%s)

for m in $(cat /pg/modules/order); do /pg/busybox insmod "/pg/modules/$m.ko" 2>/dev/null; done
flow=$(sed -n 's/.*pg\.flow=\([a-z]*\).*/\1/p' /proc/cmdline)
case "$flow" in full | audit | upgrade) ;; *) fail "pg.flow= on the kernel command line is '$flow', not full, audit or upgrade" ;; esac
say "kernel $(uname -r), $(systemctl --version | head -1), $(ansible-playbook --version | head -1), flow $flow"
sysctl_before=$(cat /proc/sys/net/ipv4/ip_local_reserved_ports)

# The control node's side: the playbook with the packages beside it (as docs/fleet.md lays it
# out), and an inventory with the group it runs on by default and another one for
# port_guard_hosts.
old=$(dpkg-deb -f /pg/old.deb Version)
new=$(dpkg-deb -f /pg/new.deb Version)
# The versions as extended regular expressions (new has a "+").
old_re=$(sed 's/[].[\\*^$+?(){}|]/\\&/g' <<<"$old")
new_re=$(sed 's/[].[\\*^$+?(){}|]/\\&/g' <<<"$new")
mkdir -p /pg/ansible/packages
cp /pg/old.deb "/pg/ansible/packages/port-guard_${old}_amd64.deb"
cp /pg/new.deb "/pg/ansible/packages/port-guard_${new}_amd64.deb"
printf '%s\n' '[hypervisors]' 'localhost' '[canary]' 'localhost' '[all:vars]' \
    'ansible_connection=local' 'ansible_python_interpreter=/usr/bin/python3' >/pg/ansible/hosts
# Pipelining (one process a task, no module files) saves a second or so a task under TCG.
export HOME=/root ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 ANSIBLE_PIPELINING=1
CONFIG=/etc/port-guard/config.toml

# play NAME EXIT CHANGED FAILED [ansible-playbook args]: runs the playbook, prints its recap and
# the lines of its report, and checks its exit status and the recap's changed and failed counts.
# Its output is in /tmp/play-NAME.log, with times in /tmp/play-NAME.times (both on the console
# when a check fails).
play() {
    local name=$1 exit=$2 changed=$3 failed=$4 start rc recap
    shift 4
    start=$(date +%s)
    ANSIBLE_LOG_PATH="/tmp/play-$name.times" ansible-playbook -i /pg/ansible/hosts /pg/ansible/port-guard.yml \
        -e "port_guard_version=$old" "$@" >"/tmp/play-$name.log" 2>&1
    rc=$?
    recap=$(grep -E '^localhost +: ok=' "/tmp/play-$name.log" | tr -s ' ' | cut -d' ' -f3-)
    say "play $name ($*): exit $rc in $(($(date +%s) - start)) s, recap: ${recap:-none}"
    say "  slowest: $(slowest "/tmp/play-$name.times")"
    report_of "$name" | while read -r l; do say "  report: $l"; done
    if [ "$rc" != "$exit" ] || ! grep -q " changed=$changed " <<<" $recap " || ! grep -q " failed=$failed " <<<" $recap "; then
        grep -E 'TASK|HANDLER|fatal|changed:' "/tmp/play-$name.times"
        tail -40 "/tmp/play-$name.log"
        fail "play $name: expected exit $exit, changed=$changed, failed=$failed"
    fi
}
# The tasks of a play's log (ANSIBLE_LOG_PATH) that took a second or more, with their seconds
# (what ansible-playbook takes before its first line is not in the log).
slowest() {
    awk -F' [|] ' '
        /[|] (PLAY|TASK|RUNNING HANDLER)/ {
            split($1, w, " "); split(w[2], c, /[:,]/)
            t = c[1] * 3600 + c[2] * 60 + c[3] + c[4] / 1000
            if (name != "" && t - prev >= 1) printf "%s %.0fs, ", name, t - prev
            name = $2; sub(/^[A-Z ]* \[/, "", name); sub(/\].*/, "", name)
            prev = t
        }' "$1"
}
# The lines of play NAME's report (the debug task's msg list, one JSON string a line).
report_of() {
    sed -n '/^TASK \[Report\]/,/^}/p' "/tmp/play-$1.log" | sed -n 's/^        "\(.*\)",\{0,1\}$/\1/p' | sed 's/\\"/"/g'
}
# report NAME REGEX: a line of play NAME's report matches REGEX (grep -E, the whole line).
report() {
    report_of "$1" | grep -Eq "^$2\$" || fail "play $1: no report line matches '$2'"
}
no_report() {
    report_of "$1" | grep -Eq "$2" && fail "play $1: a report line matches '$2'"
}
kernel_mode() { port-guard status --json | tr -d ' \n' | grep -o '"mode":"[a-z]*"' | head -1 | cut -d'"' -f4; }
# What a play must leave nowhere: the package it copied.
no_copies() {
    local left
    left=$(find /tmp /var/tmp /var/cache /root \( -name '*.deb' -o -name '*.port-guard' \) 2>/dev/null)
    [ -z "$left" ] || fail "play $1 left $left"
}
mainpid() { systemctl show -p MainPID --value port-guard; }
GATE=/etc/ansible/facts.d/port_guard.fact
# What a first install leaves (through the playbook: play NAME did it).
installed() {
    systemctl is-enabled --quiet port-guard || fail "not enabled after install"
    systemctl is-active --quiet port-guard || fail "not active after install"
    port-guard status >/dev/null || fail "port-guard status exits $? after install"
    if [ -n "$1" ]; then
        [ -f $GATE ] || fail "no gate point recorded"
        no_copies "$1"
    fi
    reserved=$(cat /proc/sys/net/ipv4/ip_local_reserved_ports)
    case "$reserved" in *49152-49215* | *49151-49215*) ;; *) fail "ephemeral protection: ip_local_reserved_ports is '$reserved'" ;; esac
    say "installed: $(systemctl show -p ActiveState,SubState --value port-guard | tr '\n' ' '), reserved ports '$reserved'"
}

if [ "$flow" != upgrade ]; then
    # First install, through the playbook: enabled, started, in audit mode (the package's
    # config); the gate point recorded.
    play install 0 2 0
    report install "localhost: port-guard $old_re"
    report install 'mode: audit in /etc/port-guard/config.toml, audit in the kernel'
    report install 'guard: attached'
    report install 'daemon: running, the config on disk is the one in force'
    report install 'conflicts: 0 socket\(s\) on reserved ports that the guard would refuse'
    report install 'since the gate point \([-0-9]+ [0-9:]+ UTC, recorded on the first run\): 0 bind\(s\) audited, 0 refused'
    report install 'outcome: mode left as it is \(no port_guard_mode given\)'
    installed install
    grep -q '^mode = "audit"' $CONFIG || fail "the config is not in audit mode"

    # An audited bind: this unit's cgroup is allowed nothing; audit mode lets the bind through
    # and counts it, and the listener holding the port is a conflict for `port-guard check`.
    /pg/busybox nc -l -p 49160 </dev/null >/dev/null &
    listener=$!
    for _ in $(seq 50); do port-guard check --json | grep -q '"conflicts": 1' && break; sleep 0.2; done
    port-guard check --json | grep -q '"conflicts": 1' || fail "check does not see the listener on 49160 as a conflict"
    port-guard status --json | tr -d ' \n' | grep -q '"audited":[1-9]' || fail "the bind of 49160 was not audited"
    say "audited: a listener on 49160 in $(cut -d: -f3 /proc/$listener/cgroup)"

    # Enforce asked: the gate holds the host in audit (the audited bind, the conflict); a hold is
    # reported, not failed, and changes nothing.
    sum=$(sha256sum $CONFIG)
    play held 0 0 0 -e port_guard_mode=enforce
    report held 'mode: audit in /etc/port-guard/config.toml, audit in the kernel'
    report held 'conflicts: 1 socket\(s\) on reserved ports that the guard would refuse: 49160/tcp pid [0-9]+ [a-z]+ in /system.slice/pg-test.service'
    report held 'since the gate point \([^)]*, recorded on the first run\): 1 bind\(s\) audited, 0 refused'
    report held 'outcome: held in audit: 1 bind\(s\) audited since the gate point .*; 1 socket\(s\) on reserved ports .*'
    no_report held 'stays in audit|enforce: '
    [ "$(kernel_mode)" = audit ] || fail "the held host's kernel mode is $(kernel_mode)"
    [ "$(sha256sum $CONFIG)" = "$sum" ] || fail "the held play changed $CONFIG"

    # The operator moves the gate point (the audited bind is dealt with) and overrides the
    # conflict, with its own variable: enforce, with the metrics on a local address and in a
    # textfile (metrics_listen restarts the daemon, which takes it at start). (Moving the gate
    # point alone leaves the host held by the conflict: each a run of its own under TCG.)
    mkdir -p /var/lib/pg-test-textfile
    pid1=$(mainpid)
    play enforce 0 5 0 -e port_guard_mode=enforce -e port_guard_move_gate=true -e port_guard_ignore_conflicts=true \
        -e port_guard_metrics_listen=127.0.0.1:9469 -e port_guard_metrics_textfile=/var/lib/pg-test-textfile/port-guard.prom
    report enforce 'mode: enforce in /etc/port-guard/config.toml, enforce in the kernel'
    report enforce 'daemon: running, the config on disk is the one in force'
    report enforce 'conflicts: 1 socket\(s\) on reserved ports that the guard would refuse: 49160/tcp .*'
    report enforce 'since the gate point \([^)]*, moved by port_guard_move_gate\): 0 bind\(s\) audited, 0 refused; before it moved: 1 audited, 0 refused'
    report enforce 'outcome: enforce: switched from audit \(1 conflict\(s\) overridden by port_guard_ignore_conflicts\)'
    [ "$(mainpid)" != "$pid1" ] || fail "metrics_listen did not restart the daemon"
    grep -q '^metrics_listen = "127.0.0.1:9469"$' $CONFIG || fail "no metrics_listen in $CONFIG"
    grep -q '^metrics_textfile = "/var/lib/pg-test-textfile/port-guard.prom"$' $CONFIG || fail "no metrics_textfile in $CONFIG"
    python3 -c 'import urllib.request as u; print(u.urlopen("http://127.0.0.1:9469/metrics", timeout=10).read().decode())' >/tmp/metrics.txt ||
        fail "nothing serves metrics on 127.0.0.1:9469"
    grep -q '^port_guard_attached 1' /tmp/metrics.txt || fail "127.0.0.1:9469/metrics has no port_guard_attached 1"
    for _ in $(seq 50); do [ -s /var/lib/pg-test-textfile/port-guard.prom ] && break; sleep 0.2; done
    grep -q '^port_guard_attached 1' /var/lib/pg-test-textfile/port-guard.prom 2>/dev/null ||
        fail "the daemon wrote no metrics textfile"
    say "metrics on 127.0.0.1:9469 and in the textfile, $(grep -c '^port_guard_' /tmp/metrics.txt) samples"
    kill "$listener"
    wait "$listener" 2>/dev/null
else
    # A host installed and switched to enforce by hand (as one would before the roll-out): the
    # play has not recorded a gate point on it.
    dpkg -i /pg/old.deb >/tmp/dpkg-install.log 2>&1 || { cat /tmp/dpkg-install.log; fail "dpkg -i"; }
    installed ""
    sed -i 's/^mode = "audit"$/mode = "enforce"/' $CONFIG
    systemctl reload port-guard || fail "systemctl reload port-guard (enforce)"
fi
[ "$(kernel_mode)" = enforce ] || fail "the kernel mode is $(kernel_mode) after the enforce play"
port-guard status >/dev/null || fail "port-guard status exits $? after the enforce play"
grep -q '^mode = "enforce"' $CONFIG || fail "the config is not in enforce mode"
timeout -s TERM 2 /pg/pg-hostile 49152 49215 1000 5 >/tmp/enforced.json
hostile_ok "after the enforce play" /tmp/enforced.json 98
mkdir -p /sys/fs/cgroup/pgvm
port=$(port-guard lease --cgroup /pgvm) || fail "port-guard lease"
say "leased $port to /pgvm"

pid1=$(mainpid)
sum=$(sha256sum $CONFIG)
if [ "$flow" != audit ]; then
    # --check, for the canary group, of an upgrade and a switch to audit: both reported as what
    # would be done, neither done.
    # A gate point is recorded by the first run that is not --check.
    fact=$(sha256sum $GATE 2>&1)
    first=0
    [ -e $GATE ] || first=1
    play check 0 $((3 + first)) 0 --check -e port_guard_hosts=canary -e "port_guard_version=$new" -e port_guard_mode=audit
    report check "localhost: port-guard $old_re \\(--check: $new_re would be installed\\)"
    report check 'mode: enforce in /etc/port-guard/config.toml, enforce in the kernel'
    report check 'outcome: audit: would be switched from enforce'
    [ "$(dpkg-query -W -f='${Version}' port-guard)" = "$old" ] || fail "--check installed $(dpkg-query -W -f='${Version}' port-guard)"
    [ "$(sha256sum $CONFIG)" = "$sum" ] || fail "--check changed $CONFIG"
    [ "$(sha256sum $GATE 2>&1)" = "$fact" ] || fail "--check recorded or moved the gate point"
    [ "$(kernel_mode)" = enforce ] || fail "--check left the kernel in $(kernel_mode)"
    [ "$(mainpid)" = "$pid1" ] || fail "--check restarted the daemon"
    no_copies check

    # The upgrade through the playbook, run again with no mode given: a hostile binder (this
    # unit's cgroup is allowed nothing) from the install task's start until the daemon is back.
    (
        until grep -q '^TASK \[Install the .deb' /tmp/play-upgrade.log 2>/dev/null; do sleep 0.2; done
        exec /pg/pg-hostile 49152 49215 600000 5 >/tmp/upgrade.json
    ) &
    h=$!
    play upgrade 0 $((1 + first)) 0 -e "port_guard_version=$new"
    report upgrade "localhost: port-guard $new_re"
    report upgrade 'mode: enforce in /etc/port-guard/config.toml, enforce in the kernel'
    report upgrade 'daemon: running, the config on disk is the one in force'
    if [ $first = 1 ]; then
        report upgrade 'since the gate point \([^)]*, recorded on the first run\): 0 bind\(s\) audited, 0 refused'
    else
        report upgrade 'since the gate point \([^)]*, moved by port_guard_move_gate\): 0 bind\(s\) audited, [1-9][0-9]* refused'
    fi
    report upgrade 'outcome: mode left as it is \(no port_guard_mode given\)'
    no_report upgrade 'held in audit|stays in audit'
    [ "$(sha256sum $CONFIG)" = "$sum" ] || fail "a play without port_guard_mode changed $CONFIG"
    no_copies upgrade
else
    /pg/pg-hostile 49152 49215 600000 5 >/tmp/upgrade.json &
    h=$!
    sleep 2
    dpkg -i /pg/new.deb || fail "dpkg -i (upgrade)"
fi
pid2=$(mainpid)
[ "$pid1" != "$pid2" ] || fail "the upgrade did not restart the daemon (MainPID $pid1)"
systemctl is-active --quiet port-guard || fail "not active after the upgrade"
[ "$(dpkg-query -W -f='${Version}' port-guard)" = "$new" ] || fail "$(dpkg-query -W -f='${Version}' port-guard) installed, not $new"
[ "$(kernel_mode)" = enforce ] || fail "the kernel mode is $(kernel_mode) after the upgrade"
sleep 2
kill -TERM "$h"
wait "$h"
hostile_ok "during the upgrade" /tmp/upgrade.json 98
# Before 6.1 EADDRINUSE comes through the sentinel port, whose sockets the daemon holds.
sentinel=no
journalctl -u port-guard --no-pager | grep -q "bpf_set_retval missing" && sentinel=yes
if [ $sentinel = yes ]; then
    journalctl -u port-guard --no-pager | grep -q "took over 2 sentinel sockets" ||
        fail "the restarted daemon did not get both sentinel sockets back from the fd store"
    say "sentinel sockets kept by systemd's fd store across the restart"
fi
port-guard status --json | tr -d ' \n' | grep -q "\"port\":$port,\"cgroup\":\"/pgvm\"" ||
    fail "the lease of $port did not survive the upgrade"
say "upgraded: MainPID $pid1 -> $pid2, lease of $port kept; $(($(date +%s) - t0)) s since the test started"

if [ "$flow" != audit ]; then
    # The same run again: nothing to install or change, nothing restarted; the hostile binder's
    # refusals after the gate point are counted.
    sum=$(sha256sum $CONFIG)
    play again 0 0 0 -e "port_guard_version=$new"
    report again "localhost: port-guard $new_re"
    report again 'mode: enforce in /etc/port-guard/config.toml, enforce in the kernel'
    report again 'since the gate point \([^)]*\): 0 bind\(s\) audited, [1-9][0-9]* refused'
    report again 'outcome: mode left as it is \(no port_guard_mode given\)'
    [ "$(mainpid)" = "$pid2" ] || fail "the second run restarted the daemon"
    [ "$(sha256sum $CONFIG)" = "$sum" ] || fail "the second run changed $CONFIG"
    no_copies again
fi

# Remove: stopped, the guard stays and refuses.
dpkg -r port-guard || fail "dpkg -r"
systemctl is-active --quiet port-guard && fail "still active after remove"
[ -d /sys/fs/bpf/port-guard ] || fail "remove unloaded the guard"
timeout -s TERM 3 /pg/pg-hostile 49152 49215 2000 5 >/tmp/removed.json
# With the unit stopped systemd empties its fd store: where refusals need the sentinel they get
# EPERM until a daemon runs again (docs/fleet.md says so); none succeeds either way.
if [ $sentinel = yes ]; then errno=1; else errno=98; fi
hostile_ok "after remove" /tmp/removed.json $errno

# Purge: nothing left.
dpkg -P port-guard || fail "dpkg -P"
[ -e /sys/fs/bpf/port-guard ] && fail "pins left after purge"
for f in /lib/systemd/system/port-guard.service /etc/systemd/system/port-guard.service \
    /etc/systemd/system/multi-user.target.wants/port-guard.service /etc/port-guard /var/lib/port-guard; do
    [ -e "$f" ] || [ -L "$f" ] && fail "$f left after purge"
done
[ "$(cat /proc/sys/net/ipv4/ip_local_reserved_ports)" = "$sysctl_before" ] ||
    fail "ip_local_reserved_ports is '$(cat /proc/sys/net/ipv4/ip_local_reserved_ports)', was '$sysctl_before'"
say "purged: no pin, no unit, sysctl back to '$sysctl_before'"
say "PASS"
finish 0
