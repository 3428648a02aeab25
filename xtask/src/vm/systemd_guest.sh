#!/bin/bash
# The guest side of `cargo xtask vm-systemd`: port-guard's .deb under a real systemd (PID 1),
# run once at boot by pg-test.service. Prints `PG-SYSTEMD: …` lines on the console, ends with
# `PG-SYSTEMD: PASS` or `PG-SYSTEMD: FAIL: why`, and powers off either way.
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

for m in $(cat /pg/modules/order); do /pg/busybox insmod "/pg/modules/$m.ko" 2>/dev/null; done
say "kernel $(uname -r), $(systemctl --version | head -1)"
sysctl_before=$(cat /proc/sys/net/ipv4/ip_local_reserved_ports)

# Install: enabled, started (no policy-rc.d here), in audit mode.
dpkg -i /pg/old.deb || fail "dpkg -i"
systemctl is-enabled --quiet port-guard || fail "not enabled after install"
systemctl is-active --quiet port-guard || fail "not active after install"
port-guard status >/dev/null || fail "port-guard status exits $? after install"
grep -q '^mode = "audit"' /etc/port-guard/config.toml || fail "the config is not in audit mode"
reserved=$(cat /proc/sys/net/ipv4/ip_local_reserved_ports)
case "$reserved" in *49152-49215* | *49151-49215*) ;; *) fail "ephemeral protection: ip_local_reserved_ports is '$reserved'" ;; esac
say "installed: $(systemctl show -p ActiveState,SubState --value port-guard | tr '\n' ' '), reserved ports '$reserved'"

# Enforce, through the unit's reload (ExecReload=port-guard reload waits for the answer).
sed -i 's/^mode = "audit"/mode = "enforce"/' /etc/port-guard/config.toml
systemctl reload port-guard || fail "systemctl reload"
mkdir -p /sys/fs/cgroup/pgvm
port=$(port-guard lease --cgroup /pgvm) || fail "port-guard lease"
say "leased $port to /pgvm"

# Upgrade under a hostile binder (this unit's cgroup is allowed nothing).
pid1=$(systemctl show -p MainPID --value port-guard)
/pg/pg-hostile 49152 49215 600000 5 >/tmp/upgrade.json &
h=$!
sleep 2
dpkg -i /pg/new.deb || fail "dpkg -i (upgrade)"
pid2=$(systemctl show -p MainPID --value port-guard)
[ "$pid1" != "$pid2" ] || fail "the upgrade did not restart the daemon (MainPID $pid1)"
systemctl is-active --quiet port-guard || fail "not active after the upgrade"
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
say "upgraded: MainPID $pid1 -> $pid2, lease of $port kept"

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
