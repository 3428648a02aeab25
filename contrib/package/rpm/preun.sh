# port-guard %preun ($1: 0 on erase, 1 on upgrade). rpm has no purge: erasing the package stops
# the daemon and port-guard-metrics.timer, removes the metrics textfile the timer kept, and
# unloads the guard (detach, remove the pins and the daemon's records, restore
# net.ipv4.ip_local_reserved_ports), while the binary is still there to do it. An upgrade stops
# nothing: the old package's %postun restarts the daemon, which adopts the pinned guard.
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl --no-reload disable --now port-guard-metrics.timer >/dev/null 2>&1 || :
        systemctl stop port-guard-metrics.service >/dev/null 2>&1 || :
        systemctl --no-reload disable --now port-guard.service >/dev/null 2>&1 || :
    else
        echo "port-guard: systemd is not running: nothing to stop; unload ends a daemon started by hand" >&2
    fi
    rm -f /var/lib/prometheus/node-exporter/port-guard.prom
    if [ -e "${PORT_GUARD_PIN_DIR:-/sys/fs/bpf/port-guard}" ]; then
        /usr/sbin/port-guard unload || echo "port-guard: could not unload the guard (see above): it stays attached" >&2
    fi
fi
