# port-guard %postun ($1: 0 on erase, 1 on upgrade). What %systemd_postun_with_restart does: on
# upgrade the running daemon is restarted on the new binary and adopts the pinned guard (no
# unguarded instant).
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart port-guard.service >/dev/null 2>&1 || :
    fi
elif [ "$1" -ge 1 ]; then
    echo "port-guard: systemd is not running: nothing was restarted; a daemon started by hand keeps the old binary (the guard stays attached)" >&2
fi
