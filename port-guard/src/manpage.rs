//! `port-guard man`: one page for the whole tool. clap's sections for the synopsis and
//! options, each verb's section, then the reference an operator looks for: configuration,
//! kernels, metrics, files, exit status, signals, examples.
//!
//! The reference is written from the same facts as docs/design.md and the code: the values that
//! live in the code (default paths, limits, exit codes, the metrics endpoint's bounds) are put
//! in from there, and the tests below check the page against the config file's keys (as serde
//! knows them), the status exit codes and docs/design.md's config example.

use std::io::Write as _;

use clap::CommandFactory as _;

use crate::cli::Cli;

/// The page, in roff.
pub fn render() -> std::io::Result<Vec<u8>> {
    let cmd = Cli::command();
    // Section 8: a system administration command (it lives in /usr/sbin).
    let man = clap_mangen::Man::new(cmd.clone()).section("8");
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    // Each verb's description and options (no separate pages: clap's subcommand section would
    // point at port-guard-daemon(1) and the like, which do not exist).
    for sub in cmd.get_subcommands() {
        let about = sub
            .get_long_about()
            .or(sub.get_about())
            .map(|a| a.to_string())
            .unwrap_or_default();
        write!(
            out,
            ".SH \"PORT-GUARD {}\"\n{}\n",
            sub.get_name().to_uppercase(),
            escape(&about)
        )?;
        clap_mangen::Man::new(sub.clone()).render_options_section(&mut out)?;
    }
    out.extend_from_slice(reference().as_bytes());
    man.render_version_section(&mut out)?;
    Ok(out)
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace("\n.", "\n\\&.")
}

/// Where port-guard-metrics.service writes the metrics (contrib/port-guard-metrics.service).
pub const METRICS_TEXTFILE: &str = "/var/lib/prometheus/node-exporter/port-guard.prom";

/// The reference sections, with the code's values put in.
fn reference() -> String {
    use port_guard_common::{MAX_ALLOWED, MAX_CGROUP_LEVEL, MAX_LEASES, MAX_RANGES};

    use crate::commands::status::{
        EXIT_CONFIG_DRIFT, EXIT_NOT_ATTACHED, EXIT_NO_DAEMON, EXIT_RELOAD_FAILED,
    };
    let sentinel = crate::policy::default_sentinel_port(&[]);
    REFERENCE
        .replace("@CONFIG@", crate::config::DEFAULT_CONFIG)
        .replace("@PIN_DIR@", crate::pin::DEFAULT_PIN_DIR)
        .replace("@STATE_DIR@", crate::state::STATE_DIR)
        .replace("@SPAWN_PARENT@", crate::config::DEFAULT_SPAWN_PARENT)
        .replace("@SENTINEL@", &sentinel.to_string())
        .replace("@TEXTFILE@", METRICS_TEXTFILE)
        .replace(
            "@CONNECTIONS@",
            &crate::metrics::MAX_CONNECTIONS.to_string(),
        )
        .replace(
            "@TIMEOUT@",
            &crate::metrics::REQUEST_TIMEOUT.as_secs().to_string(),
        )
        .replace("@MAX_RANGES@", &MAX_RANGES.to_string())
        .replace("@MAX_ALLOWED@", &MAX_ALLOWED.to_string())
        .replace("@MAX_LEASES@", &MAX_LEASES.to_string())
        .replace("@MAX_LEVEL@", &MAX_CGROUP_LEVEL.to_string())
        .replace("@EXIT_NOT_ATTACHED@", &EXIT_NOT_ATTACHED.to_string())
        .replace("@EXIT_NO_DAEMON@", &EXIT_NO_DAEMON.to_string())
        .replace("@EXIT_RELOAD_FAILED@", &EXIT_RELOAD_FAILED.to_string())
        .replace("@EXIT_CONFIG_DRIFT@", &EXIT_CONFIG_DRIFT.to_string())
}

const REFERENCE: &str = r#".SH CONFIGURATION
The config file (TOML) is @CONFIG@, or the file \fB--config\fR (or PORT_GUARD_CONFIG) names,
which must then exist; the default one may be absent (the defaults apply). Unknown keys are
errors. Flags of \fBdaemon\fR override the file's keys: \fB--reserve\fR replaces its ranges,
\fB--allow\fR and \fB--per-child-limit\fR apply to every range in effect. A reload (SIGHUP)
re-reads the file and keeps the flags; \fBcheck --config FILE\fR validates a file and shows
what it would change.
.TP
\fBattach\fR = "/"
The cgroup the programs attach to: every process below it is checked. It must exist.
.TP
\fBmode\fR = "enforce" | "audit"
audit logs and counts what would be refused (\fBaudit: would deny bind\fR lines) and refuses
nothing.
.TP
\fBerrno\fR = "eaddrinuse" | "eacces" | "eperm"
What a refused bind() returns; default eaddrinuse (libvirt's allocator skips a port whose
probe bind fails with EADDRINUSE, and fails on anything else). What each kernel can give:
KERNELS below.
.TP
\fBallow_fallback\fR = false
Start even where the kernel cannot give refused binds the configured errno. Before 6.1 the
daemon refuses \fBerrno\fR = "eacces", and "eaddrinuse" with \fBsentinel_port\fR = 0, unless
this is true; such binds then get EPERM.
.TP
\fBsentinel_port\fR = @SENTINEL@
Before 6.1: the port refused binds are rewritten to, held by the daemon in every guarded
network namespace, so that they fail with EADDRINUSE. Default @SENTINEL@, or the nearest free port
below the lowest range when a range covers it; it must be 1024 or above and outside every
range; 0: none (refused binds get EPERM). Unused on 6.1 and later.
.TP
\fBprotect_ephemeral\fR = true
Keep the kernel from auto-picking reserved ports (connect() without bind(), UDP sendto(),
bind() to port 0): the ranges (and the sentinel port) are merged into
net.ipv4.ip_local_reserved_ports of every guarded network namespace, checked every 3 s and
put back when something rewrites it; \fBunload\fR removes only what it added.
.TP
\fBnetns\fR = ["host"]
Where the guard enforces: "host" (the daemon's own network namespace), "all", or netns files
such as /run/netns/NAME (guarded from the moment they exist). Binds in other namespaces pass,
counted as unguarded.
.TP
\fBspawn_parent\fR = "@SPAWN_PARENT@"
Where \fBspawn\fR creates its cgroups.
.TP
\fBmetrics_listen\fR = "127.0.0.1:9469"
Serve Prometheus metrics (GET /metrics) on IP:PORT, or on a unix socket only root may connect
to ("unix:/run/port-guard/metrics.sock"). Absent: no endpoint. @CONNECTIONS@ connections at once,
each closed after @TIMEOUT@ s.
.TP
\fBmetrics_textfile\fR = "@TEXTFILE@"
Write the same metrics into this file (an absolute path ending in .prom), replaced whole every
5 s, for node_exporter's textfile collector. Absent: no file.
.TP
\fB[[reserve]]\fR
One table per reserved range:
\fBports\fR = "49152-49215" (a range or one port),
\fBprotocols\fR = ["tcp"] (tcp, udp or both; default tcp),
\fBallow\fR = ["/machine.slice"] (the cgroups, with everything below them, that may bind its
unleased ports; one that does not exist yet is allowed as soon as it appears), and
\fBper_child_limit\fR = N (optional): the most sockets bound to ports of the range that one
unit may hold at once, where a unit is the child of an allowed cgroup on the caller's path
(one VM's scope with everything below it), or the allowed cgroup itself for a process directly
in it. The unit's next bind is refused like any other (log line \fBreason=limit unit=\fR...);
leased ports do not count. Absent: no limit.
.PP
With no file and no flags: one range 49152-49215/tcp, nothing allowed (leases only), errno
EADDRINUSE, ephemeral ports protected, the daemon's network namespace guarded, no per-child
limit, no metrics. Limits: @MAX_RANGES@ ranges, @MAX_ALLOWED@ allowed cgroups, @MAX_LEASES@ leases, allowed cgroups at level @MAX_LEVEL@ or above (the root is 0); a config
over a limit is refused whole.
.SH KERNELS
What a refused bind gets, by kernel (\fBcheck\fR shows the features found; \fBstatus\fR what
refused binds get now). None lets a refused bind succeed.
.TP
5.8 to 6.0 (Debian 11's 5.10, RHEL 9's 5.14, Ubuntu 22.04's 5.15)
EADDRINUSE (the default) through the sentinel port: the program rewrites a refused bind to
\fBsentinel_port\fR, which the daemon holds (a TCP socket listening and a UDP socket, on [::],
in every guarded network namespace), and the kernel's own conflict check fails it with
EADDRINUSE. Under systemd the daemon keeps these sockets in the unit's fd store, so a restart
or a crash keeps EADDRINUSE; with no daemon holding them (the unit stopped or removed, a daemon
run by hand and killed) refused binds get EPERM until the next daemon starts. errno "eperm"
gives EPERM; "eacces" needs \fBallow_fallback\fR = true and gives EPERM.
.TP
6.1 and later
The configured errno, set by the program itself (bpf_set_retval); no sentinel port.
.SH METRICS
The daemon serves Prometheus metrics with \fBmetrics_listen\fR and writes them with
\fBmetrics_textfile\fR. \fBstatus --prometheus\fR renders the same families from the pins alone,
with the daemon's last recorded counts and port_guard_daemon_up 0 when no daemon runs;
\fB--textfile FILE\fR writes them into FILE, replaced whole. The packages' port-guard-metrics.timer
runs \fBport-guard status --prometheus --textfile @TEXTFILE@\fR every 30 s
(skipped where that directory does not exist), so that the guard stays visible while its
daemon is down. The alert rules and the dashboard read both sources, one value per host:
/usr/share/doc/port-guard/fleet.md.
.SH FILES
.TP
/usr/sbin/port-guard
The agent and CLI.
.TP
@CONFIG@
The default config file.
.TP
@PIN_DIR@/
The pin dir: the guard's maps and links (root's, mode 0700), on bpffs (the daemon mounts it on
/sys/fs/bpf when nothing is mounted there). They outlive the daemon.
.TP
@STATE_DIR@/
The agent's records (root's, mode 0700), named after the pin dir (every character other
than a letter, a digit, - and _ as _: _sys_fs_bpf_port-guard for the default one):
\fI.daemon\fR, the daemon's pid, config and last reload, which \fBstatus\fR and \fBreload\fR read;
\fI.stats\fR, its counts, for \fBstatus --prometheus\fR while it is down;
\fI.counters\fR, when the counters started; \fI.netns\fR, the guarded namespaces;
\fI.reserved_ports.*\fR, what ephemeral protection added to each namespace's sysctl.
\fBunload\fR removes those of its pin dir.
.TP
\fICGROUP2\fR@SPAWN_PARENT@/
The spawn parent: one cgroup per \fBspawn\fR. \fICGROUP2\fR is the cgroup2 mount, which port-guard
finds in /proc/self/mountinfo (/sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a
hybrid one); every cgroup path port-guard takes or prints is relative to it.
.TP
/usr/lib/systemd/system/port-guard.service
The daemon's unit (Type=notify; \fBsystemctl reload\fR runs \fBport-guard reload\fR).
.TP
/usr/lib/systemd/system/port-guard-metrics.service, port-guard-metrics.timer
The metrics textfile, every 30 s.
.TP
@TEXTFILE@
What port-guard-metrics.service writes for node_exporter's textfile collector; removed when a
run fails and with the package.
.TP
/var/lib/port-guard/
\&.deb only, between removal and purge: a copy of the binary, for purge's unload.
.TP
/usr/share/doc/port-guard/
README.md (what it is, install, use), design.md (how it works, the configuration in full, the
threat model), operations.md (install, upgrade, roll back, every start-up error), libvirt.md (a
libvirt host), fleet.md (packages, roll-out, alerts, dashboard), benchmarks.md (what it costs);
examples/: a libvirt host's config, the Prometheus alert rules, the Grafana
dashboard, an Ansible playbook.
.SH EXIT STATUS
.TP
0
Success. For \fBstatus\fR: the guard is attached, a daemon runs, its last reload (if any) was
taken, and the config file on disk is the one in force.
.TP
1
A runtime failure (no guard loaded, a kernel or file error, a refused reload, a failed or
conflicting \fBcheck\fR).
.TP
2
A usage or config error: the line names the bad value.
.TP
@EXIT_NOT_ATTACHED@
\fBstatus\fR: the guard is loaded but its links are not attached: binds are not checked.
.TP
@EXIT_NO_DAEMON@
\fBstatus\fR: the guard is attached but no daemon runs: ended VMs' leases are not reaped and
allowed cgroups that appear are not allowed.
.TP
@EXIT_RELOAD_FAILED@
\fBstatus\fR: the daemon's last reload was refused; the previous config is in force.
.TP
@EXIT_CONFIG_DRIFT@
\fBstatus\fR: the config file on disk is not the one in force (edited and not reloaded, or a
reload would refuse it); \fBstatus\fR says how (config_drift in \fB--json\fR).
.TP
126, 127
\fBspawn\fR: CMD was found but could not be executed, or was not found; the lease is released.
.PP
\fBstatus --prometheus\fR exits 0 whenever it could read the guard: its output is for a
collector, and port_guard_attached and port_guard_daemon_up carry what the codes above say.
.SH SIGNALS
.TP
SIGHUP
\fBdaemon\fR reloads the config, all or nothing: a refused config leaves the old one in force,
logged, shown by \fBstatus\fR, counted in port_guard_config_reloads_total{result="error"} and
reported to systemd (STATUS=). \fBport-guard reload\fR sends it and waits for the answer.
.TP
SIGTERM, SIGINT
\fBdaemon\fR exits; the guard stays attached and enforcing (its links are pinned), unless
\fB--unload-on-exit\fR.
.SH EXAMPLES
.nf
# Is the host ready, and does anything hold a migration port already?
port-guard check
# Validate a new config against the running guard, then apply it:
port-guard check --config /etc/port-guard/config.toml.new
mv /etc/port-guard/config.toml.new /etc/port-guard/config.toml
systemctl reload port-guard
# Start qemu on a leased port; the lease ends when qemu exits:
port-guard spawn -- qemu-system-x86_64 ... -incoming tcp:[::]:{port}
# Lease a port to a cgroup you manage yourself:
port-guard lease --cgroup /machine.slice/machine-qemu\\x2d1\\x2dvm.scope
# What is enforced, who is allowed, which ports are leased:
port-guard status
# The same as Prometheus metrics, from the pins alone:
port-guard status --prometheus
.fi
.SH SEE ALSO
systemctl(1), journalctl(1), systemd.timer(5), libvirtd(8), qemu(1);
/usr/share/doc/port-guard/README.md, design.md, operations.md, libvirt.md, fleet.md and
benchmarks.md.
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> String {
        String::from_utf8(render().unwrap()).unwrap()
    }

    /// The section of the page from `.SH NAME` to the next `.SH`.
    fn section(page: &str, name: &str) -> String {
        let start = page
            .find(&format!(".SH {name}\n"))
            .unwrap_or_else(|| panic!("no section {name}"));
        let rest = &page[start + 4..];
        rest[..rest.find("\n.SH ").unwrap_or(rest.len())].to_owned()
    }

    /// The keys serde accepts in a table: its error for an unknown key lists them.
    fn keys_of(toml: &str) -> Vec<String> {
        let err = toml::from_str::<crate::config::ConfigFile>(toml)
            .expect_err("an unknown key is refused")
            .to_string();
        let list = &err[err.find("expected one of").expect(&err)..];
        list.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn every_config_key_the_parser_takes_is_documented() {
        let config = section(&page(), "CONFIGURATION");
        let top = keys_of("no_such_key = 1\n");
        let reserve = keys_of("[[reserve]]\nports = \"1\"\nno_such_key = 1\n");
        assert!(top.contains(&"sentinel_port".to_owned()), "{top:?}");
        assert!(
            reserve.contains(&"per_child_limit".to_owned()),
            "{reserve:?}"
        );
        // Each top-level key is an item of its own; the [[reserve]] keys are in its item.
        for key in top.iter().filter(|k| *k != "reserve") {
            assert!(
                config.contains(&format!(".TP\n\\fB{key}\\fR = ")),
                "the man page does not document config key {key}"
            );
        }
        let table = &config[config.find(".TP\n\\fB[[reserve]]\\fR\n").unwrap()..];
        let table = &table[..table.find("\n.PP\n").unwrap()];
        for key in &reserve {
            assert!(
                table.contains(&format!("\\fB{key}\\fR = ")),
                "the man page does not document [[reserve]] key {key}"
            );
        }
    }

    #[test]
    fn every_key_of_the_design_config_is_documented() {
        let design =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/design.md"))
                .unwrap();
        let config = section(&page(), "CONFIGURATION");
        let mut seen = 0;
        for block in design.split("```toml\n").skip(1) {
            let block = &block[..block.find("```").unwrap()];
            for line in block.lines() {
                let key = line.trim_start_matches('#').trim();
                let Some((key, _)) = key.split_once(" = ") else {
                    continue;
                };
                if key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    seen += 1;
                    assert!(
                        config.contains(&format!("\\fB{key}\\fR = ")),
                        "docs/design.md's config has {key}, the man page does not"
                    );
                }
            }
        }
        assert!(seen >= 10, "{seen} keys in docs/design.md's config blocks");
    }

    #[test]
    fn the_exit_codes_kernels_and_paths_are_the_ones_in_force() {
        use crate::commands::status::{
            EXIT_CONFIG_DRIFT, EXIT_NOT_ATTACHED, EXIT_NO_DAEMON, EXIT_RELOAD_FAILED,
        };
        let page = page();
        let exit = section(&page, "EXIT STATUS");
        for code in [
            EXIT_NOT_ATTACHED,
            EXIT_NO_DAEMON,
            EXIT_RELOAD_FAILED,
            EXIT_CONFIG_DRIFT,
        ] {
            assert!(
                exit.contains(&format!(".TP\n{code}\n\\fBstatus\\fR")),
                "{exit}"
            );
        }
        let kernels = section(&page, "KERNELS");
        for fact in [
            "5.8 to 6.0",
            "6.1 and later",
            "sentinel_port",
            "EPERM",
            "allow_fallback",
        ] {
            assert!(kernels.contains(fact), "KERNELS lacks {fact}: {kernels}");
        }
        assert!(!page.contains('@'), "a placeholder is left");
        assert!(!page.contains("source tree"));
        assert!(!page.contains("/sys/fs/cgroup/port-guard"));
        assert!(page.contains("/usr/share/doc/port-guard/"));
        assert!(page.contains(METRICS_TEXTFILE));
        let unit = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../contrib/port-guard-metrics.service"
        ))
        .unwrap();
        assert!(
            unit.contains(&format!("--textfile {METRICS_TEXTFILE}\n")),
            "{unit}"
        );
    }
}
