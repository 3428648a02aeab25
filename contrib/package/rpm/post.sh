# port-guard %post ($1: 1 on install, 2 or more on upgrade). What %systemd_post does, and a start:
# on install the preset (50-port-guard.preset enables the daemon and port-guard-metrics.timer)
# decides, and an enabled unit is started. Upgrades are restarted by the old package's %postun.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -eq 1 ]; then
        systemctl --no-reload preset port-guard.service port-guard-metrics.timer >/dev/null 2>&1 || :
        if systemctl -q is-enabled port-guard.service; then
            systemctl start port-guard.service || echo "port-guard: the unit did not start: journalctl -u port-guard" >&2
        fi
        if systemctl -q is-enabled port-guard-metrics.timer; then
            systemctl start port-guard-metrics.timer || :
        fi
    fi
elif [ "$1" -eq 1 ]; then
    echo "port-guard: systemd is not running (no /run/systemd/system): nothing was enabled or started; start the daemon with: port-guard daemon" >&2
fi
