//! `port-guard man`: one page for the whole tool. clap's sections for the synopsis and
//! options, each verb's section, then the reference an operator looks for: configuration,
//! files, exit status, signals, examples.

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
    out.extend_from_slice(REFERENCE.as_bytes());
    man.render_version_section(&mut out)?;
    Ok(out)
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace("\n.", "\n\\&.")
}

const REFERENCE: &str = r#".SH CONFIGURATION
The config file (TOML, default /etc/port-guard/config.toml; absent means the defaults) holds:
.TP
\fBattach\fR = "/"
The cgroup the programs attach to: every process below it is checked.
.TP
\fBmode\fR = "enforce" | "audit"
audit logs what would be refused and refuses nothing.
.TP
\fBerrno\fR = "eaddrinuse" | "eacces" | "eperm"
What a refused bind() returns (kernels before 6.1 give EPERM; the daemon refuses to start there
unless \fBallow_fallback\fR = true).
.TP
\fBprotect_ephemeral\fR = true
Keep the kernel from auto-picking reserved ports (net.ipv4.ip_local_reserved_ports).
.TP
\fBspawn_parent\fR = "/port-guard"
Where \fBspawn\fR creates its cgroups.
.TP
\fBnetns\fR = ["host"]
Where the guard enforces: "host" (the daemon's own netns), "all", or paths such as
/run/netns/NAME.
.TP
\fB[[reserve]]\fR ports = "49152-49215", protocols = ["tcp"], allow = ["/machine.slice"]
A reserved range and the cgroups (with everything below them) allowed to bind its unleased
ports. An allowed cgroup that does not exist yet is allowed as soon as it appears.
.PP
Flags of \fBdaemon\fR override the file's keys; a reload (SIGHUP) re-reads the file and keeps
the flags. \fBcheck --config FILE\fR validates a file and shows what it would change.
.SH FILES
.TP
/etc/port-guard/config.toml
The default config file.
.TP
/sys/fs/bpf/port-guard/
The pin dir: the guard's maps and links (root's, mode 0700). They outlive the daemon.
.TP
/run/port-guard/
The agent's records (root's, mode 0700): what ephemeral protection changed in each netns,
the guarded namespaces, when the counters started, and the daemon's own record (pid, config,
last reload) that \fBstatus\fR and \fBreload\fR read.
.TP
/sys/fs/cgroup/port-guard/
The spawn parent: one cgroup per \fBspawn\fR.
.SH EXIT STATUS
.TP
0
Success.
.TP
1
A runtime failure (no guard loaded, a kernel or file error, a refused reload, a failed or
conflicting \fBcheck\fR).
.TP
2
A usage or config error: the line names the bad value.
.TP
3
\fBstatus\fR: the guard is loaded but its links are not attached: binds are not checked.
.TP
4
\fBstatus\fR: the guard is attached but no daemon runs: ended VMs' leases are not reaped and
allowed cgroups that appear are not allowed.
.TP
5
\fBstatus\fR: the daemon's last reload was refused; the previous config is in force.
.TP
126, 127
\fBspawn\fR: CMD was found but could not be executed, or was not found; the lease is released.
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
.fi
.SH SEE ALSO
systemctl(1), journalctl(1), libvirtd(8), qemu(1); docs/operations.md in the source tree.
"#;
