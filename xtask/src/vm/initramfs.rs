//! The guest's initramfs, a newc cpio, uncompressed (under TCG, unpacking it gzip'd took 4 s
//! longer per boot than loading it 3.5 times larger): busybox-static and its applet links, the
//! agent, the test executables at the absolute paths they were built at, the host tools with
//! their shared libraries, the settings of the run under `/pg/`, and [`INIT`], the guest's /init
//! that runs the suite. Each kernel gets a second, small cpio with its modules appended.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context as _, Result};
use xtask::output;

use super::{
    cpio::{write_cpio, Cpio},
    elf,
    kernel::Kernel,
    static_build::Artifacts,
    Options,
};

/// Dynamically linked host tools shipped into the guest with their libraries (found with ldd),
/// and whether the run needs them: iproute2's `ip` for the network-namespace tests (busybox's
/// `ip` has no `netns`); bpftool, which the suite uses when present to check that nothing was
/// left attached.
const HOST_TOOLS: &[(&str, bool)] = &[("ip", true), ("bpftool", false)];

/// Tests that do not depend on the kernel and need host tools the guest does not have: reported
/// as skipped, with the reason, without being run. The host suite (`cargo xtask test`) runs them.
const NOT_IN_VM: &[(&str, &str)] = &[
    (
        "upgrade::a_daemon_migrates_the_leases_of_layout_2_in_place_with_no_unguarded_instant",
        "not run in VMs: it needs the map-layout-2 binary, which `cargo xtask test` builds from git on the host (kernel-independent: the migration is map copies and link replacement)",
    ),
    (
        "operations::the_systemd_unit_passes_systemd_analyze_verify",
        "not run in VMs: it checks contrib/port-guard.service with systemd-analyze, which the guest does not have (kernel-independent; the host suite runs it)",
    ),
    (
        "delegation::a_chain_longer_than_path_max_keeps_no_dead_vm_port_and_blinds_no_name",
        "not run in VMs: it runs the daemon under the unit's capability set with setpriv and reads contrib/port-guard.service, neither of which the guest has (the reaper's fds and the walk are the same on every kernel; the host suite runs it)",
    ),
    (
        "hardening::idle_connections_to_the_metrics_port_end_no_lease",
        "not run in VMs: 36 s of idle connections against the daemon's metrics server and its reaper's full pass, all in user space (kernel-independent; the host suite runs it)",
    ),
    (
        "delegation::thousands_of_a_users_cgroups_cost_the_daemon_little_cpu",
        "not run in VMs: a CPU figure under TCG measures the emulator, and it needs setpriv and the unit file (the host suite and the bench run it)",
    ),
    (
        "delegation::short_lived_cgroups_with_long_names_do_not_grow_the_daemon",
        "not run in VMs: 10,000 cgroup cycles take about 40 s on the host and ten times that under TCG, for a figure (the daemon's memory) that does not depend on the kernel",
    ),
    (
        "package::the_deb_package_holds_what_the_docs_say_and_lintian_reports_no_error",
        PACKAGES_ON_THE_HOST,
    ),
    (
        "package::the_rpm_package_holds_the_same_files_and_installs_upgrades_and_erases_in_a_scratch_root",
        PACKAGES_ON_THE_HOST,
    ),
    (
        "package::the_deb_package_installs_upgrades_with_no_unguarded_instant_and_purge_leaves_nothing",
        PACKAGES_ON_THE_HOST,
    ),
    (
        "package::promtool_checks_the_rules_and_their_unit_tests_pass",
        PACKAGES_ON_THE_HOST,
    ),
    (
        "package::the_ansible_playbook_passes_its_syntax_check",
        PACKAGES_ON_THE_HOST,
    ),
    (
        "package::the_alerts_and_the_dashboard_name_only_metrics_a_running_daemon_serves",
        PACKAGES_ON_THE_HOST,
    ),
];

/// Tests whose kernel side the rest of the suite covers on every kernel, and whose own cost is
/// time (TTLs, idle connections, a user-space server): run on the first kernel of a run only,
/// reported as skipped on the others with the reason (the host suite runs them too).
const ONCE_IN_VM: &[&str] = &[
    // The metrics server is user space; the idle connections cost 12 s.
    "delegation::idle_connections_cannot_keep_a_scrape_out",
    // TTLs are the reaper's clock; the kernel keeps the expiry like any lease field.
    "leases::a_ttl_ends_a_lease_also_across_a_daemon_restart_and_renew_keeps_it",
    "leases::an_orchestrator_that_never_releases_leaves_nothing_after_the_ttl",
    // The status text and the record files; every kernel reads the same maps in other tests.
    "operator::status_shows_every_configured_allowed_cgroup_the_daemon_and_when_counters_started",
];

const PACKAGES_ON_THE_HOST: &str = "not run in VMs: the guest has no dpkg, lintian, rpm, promtool or ansible, nor the repository's contrib files (the host suite runs it)";

/// Settings of the suite for a slow machine, exported to every test in the guest, so that the
/// three kernels fit CI's hour. A `port-guard spawn` cycle takes 140-300 ms under TCG: the churn
/// test's 10,000 cycles would take 23 minutes or more per kernel; 150 run the same kernel paths
/// (cgroup creation and removal, lease map updates, the reaper's inotify, sock_release of charged
/// sockets) in about 25 s. The orchestrator's lease cycles and the kill -9 instants are cut
/// the same way (a daemon start is over a second there). The host suite runs the full counts.
const VM_ENV: &[(&str, &str)] = &[
    ("PG_CHURN_CYCLES", "150"),
    ("PG_LEASE_CYCLES", "100"),
    ("PG_KILLS", "22"),
];

/// The guest's /init (busybox sh). Per test: `PG-START <id>`, then `PG-RESULT <id> pass`,
/// `PG-RESULT <id> skip <reason>` or, after its output between `PG-OUTPUT-BEGIN <id>` and
/// `PG-OUTPUT-END <id>`, `PG-RESULT <id> fail <why>`.
pub(super) const INIT: &str = r#"#!/bin/sh
# /init of the port-guard test VM, written by `cargo xtask vm-test`.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1 PORT_GUARD_BIN=/usr/local/bin/port-guard
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
. /pg/env

off() {
    sync
    poweroff -f
    sleep 5
    echo o >/proc/sysrq-trigger
}
abort() {
    echo "PG-ABORT $*"
    off
}

mount -t proc proc /proc || abort "mount proc"
mount -t sysfs sysfs /sys || abort "mount sysfs"
mount -t devtmpfs devtmpfs /dev || abort "mount devtmpfs"
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
# /tmp and /run stay directories of the initramfs, which is a RAM filesystem already: a tmpfs
# mounted over /tmp would hide the test executables of a checkout under /tmp (they sit at the
# absolute paths they were built at).
chmod 1777 /tmp
# The pure cgroup v2 layout (Debian 11 and later); the tests find the mount in mountinfo.
mount -t cgroup2 cgroup2 /sys/fs/cgroup || abort "mount cgroup2"
mount -t bpf bpf /sys/fs/bpf || abort "mount bpffs"
hostname pg-vm
ip link set lo up || abort "ip link set lo up"
for m in $(cat /lib/modules/pg/order 2>/dev/null); do
    insmod "/lib/modules/pg/$m.ko" || echo "PG-WARN insmod $m failed"
done
echo "PG-INIT kernel=$(uname -r) cgroup2=/sys/fs/cgroup bpffs=/sys/fs/bpf modules=$(cat /lib/modules/pg/order 2>/dev/null | tr '\n' ' ')"

if [ -s /pg/exec ]; then
    sh /pg/exec
    echo "PG-EXEC-EXIT $?"
    echo PG-DONE
    off
fi

limit=$(cat /pg/test-timeout)
filter=$(cat /pg/filter 2>/dev/null)
while read -r name exe; do
    if ! list=$("$exe" --list </dev/null 2>/tmp/pg-err); then
        echo "PG-RESULT $name::* fail cannot list its tests: $(head -c 300 /tmp/pg-err | tr '\n' ' ')"
        continue
    fi
    for t in $(echo "$list" | sed -n 's/: test$//p'); do
        id="$name::$t"
        case "$id" in *"$filter"*) ;; *) continue ;; esac
        why=$(awk -v id="$id" '$1 == id { $1 = ""; sub(/^ /, ""); print; exit }' /pg/not-in-vm /pg/not-on-this-kernel)
        if [ -n "$why" ]; then
            echo "PG-RESULT $id skip $why"
            continue
        fi
        echo "PG-START $id"
        timeout -s KILL "$limit" "$exe" --exact "$t" --nocapture --test-threads=1 </dev/null >/tmp/pg-out 2>&1
        rc=$?
        skip=$(grep -o 'PG-SKIP: .*' /tmp/pg-out | sed 's/^PG-SKIP: //' | head -n 5 | tr '\n' '|' | sed 's/|$//; s/|/; /g')
        part=$(grep -o 'PG-SKIP-PART: .*' /tmp/pg-out | sed 's/^PG-SKIP-PART: //' | head -n 5 | tr '\n' '|' | sed 's/|$//; s/|/; /g')
        if [ "$rc" -ne 0 ]; then
            echo "PG-OUTPUT-BEGIN $id"
            cat /tmp/pg-out
            echo "PG-OUTPUT-END $id"
            if [ "$rc" -eq 137 ]; then why="killed after ${limit} s"; else why="exit status $rc"; fi
            echo "PG-RESULT $id fail $why"
        elif [ -n "$skip" ]; then
            echo "PG-RESULT $id skip $skip"
        elif [ -n "$part" ]; then
            echo "PG-RESULT $id pass partly skipped: $part"
        else
            echo "PG-RESULT $id pass"
        fi
        rm -f /tmp/pg-out
    done
done </pg/tests
echo PG-DONE
off
"#;

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The shared libraries `exe` loads, from ldd (the loader included).
fn libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out =
        output(Command::new("ldd").arg(exe)).with_context(|| format!("ldd {}", exe.display()))?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let p = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            p.starts_with('/').then(|| PathBuf::from(p))
        })
        .collect())
}

pub(super) fn write_base_initramfs(out: &Path, art: &Artifacts, opts: &Options) -> Result<()> {
    let busybox = Path::new("/bin/busybox");
    let data = fs::read(busybox).context("reading /bin/busybox (package busybox-static)")?;
    ensure!(
        elf::is_static(&data),
        "/bin/busybox is not static: install busybox-static (it replaces busybox)"
    );
    let applets =
        output(Command::new(busybox).arg("--list-full")).context("busybox --list-full")?;
    let mut tools = Vec::new();
    for (name, required) in HOST_TOOLS {
        match find_tool(name) {
            Some(p) => tools.push((*name, p)),
            None if *required => bail!("{name} is not installed on this host"),
            None => eprintln!("xtask: {name} is not installed: the guest runs without it"),
        }
    }
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    write_cpio(file, |c| {
        skeleton(c, &data, &applets)?;
        host_tools(c, &tools)?;
        c.host_file("usr/local/bin/port-guard", &art.agent)?;
        for (_, exe) in &art.tests {
            c.host_file(&exe.to_string_lossy(), exe)?;
        }
        for exe in &art.bins {
            c.host_file(&exe.to_string_lossy(), exe)?;
        }
        suite_files(c, art, opts)
    })
}

/// The guest's root: directories, the two device nodes, busybox and its applets, the init, the
/// users and hosts files.
fn skeleton<W: std::io::Write>(c: &mut Cpio<W>, busybox: &[u8], applets: &str) -> Result<()> {
    for d in [
        "proc",
        "sys",
        "tmp",
        "run",
        "root",
        "etc",
        "usr/local/bin",
        "usr/local/sbin",
    ] {
        c.dir(d)?;
    }
    c.symlink("var/run", "/run")?;
    c.char_dev("dev/console", 0o600, 5, 1)?;
    c.char_dev("dev/null", 0o666, 1, 3)?;
    c.file("bin/busybox", 0o755, busybox)?;
    for applet in applets
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "bin/busybox")
    {
        c.symlink(applet, "/bin/busybox")?;
    }
    c.file("init", 0o755, INIT.as_bytes())?;
    c.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    c.file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")?;
    c.file("etc/hosts", 0o644, b"127.0.0.1 localhost\n::1 localhost\n")?;
    Ok(())
}

/// The host's tools under /usr/local/sbin, with the shared libraries they load.
fn host_tools<W: std::io::Write>(c: &mut Cpio<W>, tools: &[(&str, PathBuf)]) -> Result<()> {
    let mut libs = BTreeSet::new();
    for (name, path) in tools {
        c.host_file(&format!("usr/local/sbin/{name}"), path)?;
        libs.extend(libraries(path)?);
    }
    for lib in &libs {
        c.host_file(&lib.to_string_lossy(), lib)?;
    }
    Ok(())
}

/// What the init reads under /pg: the test binaries, the timeout, the filter, the tests not run
/// in VMs and why, the environment, and the command to run instead of the suite.
fn suite_files<W: std::io::Write>(c: &mut Cpio<W>, art: &Artifacts, opts: &Options) -> Result<()> {
    let plan: String = art
        .tests
        .iter()
        .map(|(name, exe)| format!("{name} {}\n", exe.display()))
        .collect();
    c.file("pg/tests", 0o644, plan.as_bytes())?;
    c.file(
        "pg/test-timeout",
        0o644,
        opts.test_timeout.as_secs().to_string().as_bytes(),
    )?;
    c.file(
        "pg/filter",
        0o644,
        opts.filter.as_deref().unwrap_or("").as_bytes(),
    )?;
    let not_in_vm: String = NOT_IN_VM
        .iter()
        .map(|(id, why)| format!("{id} {why}\n"))
        .collect();
    c.file("pg/not-in-vm", 0o644, not_in_vm.as_bytes())?;
    let env: String = VM_ENV
        .iter()
        .map(|(k, v)| format!("export {k}={v}\n"))
        .collect();
    c.file("pg/env", 0o644, env.as_bytes())?;
    if let Some(cmd) = &opts.exec {
        c.file("pg/exec", 0o644, format!("{cmd}\n").as_bytes())?;
    }
    Ok(())
}

/// `base` followed by a cpio of the kernel's modules and of the tests not run on this kernel
/// ([`ONCE_IN_VM`], on every kernel but `first`; the kernel unpacks concatenated archives).
pub(super) fn write_kernel_initramfs(
    out: &Path,
    base: &Path,
    k: &Kernel,
    first: &str,
) -> Result<()> {
    fs::copy(base, out).with_context(|| format!("creating {}", out.display()))?;
    let file = fs::OpenOptions::new().append(true).open(out)?;
    let not_here: String = if k.series.name == first {
        String::new()
    } else {
        ONCE_IN_VM
            .iter()
            .map(|id| format!("{id} kernel-independent and slow: run once, on {first}, in this run (and on the host)\n"))
            .collect()
    };
    write_cpio(file, |c| {
        c.file("pg/not-on-this-kernel", 0o644, not_here.as_bytes())?;
        let mut order = String::new();
        for m in &k.modules {
            let name = m
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            c.file(&format!("lib/modules/pg/{name}"), 0o644, &fs::read(m)?)?;
            order += name.trim_end_matches(".ko");
            order += "\n";
        }
        c.file("lib/modules/pg/order", 0o644, order.as_bytes())?;
        Ok(())
    })
}
