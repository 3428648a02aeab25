//! An unprivileged local user against the guard: each attack that once undid, hid, blinded or
//! outwaited it, run for real (as `nobody` where the attacker is one), and what must hold.
//!
//! - the pin dir created first by `nobody` on a world-writable bpffs, or below a directory of
//!   theirs: refused, nothing attached; a pin dir root made there cannot be touched by them;
//! - a symbolic link at the pin path: refused, nothing mounted over /sys/fs/bpf;
//! - a daemon in a private mount namespace: refuses a bpffs the host does not see;
//! - idle connections to the metrics port while the daemon's fd limit is low: no lease ends;
//! - a flood of refused binds: bounded lines, exact counts in the summaries and the counters,
//!   and another offender's single refusal logged during it;
//! - cgroup and command names made to look like log fields: quoted;
//! - every way to get a kernel-chosen port, under the default config: none is reserved;
//! - the sysctl rewritten while the daemon runs: put back, and unload removes only its ports;
//! - a reload whose map writes fail half way: the old policy stays whole in the kernel;
//! - pins removed or links detached under a running daemon.
//!
//! Ports 63000-63999. The sysctl tests run in network namespaces of their own.

use std::{
    collections::BTreeSet,
    ffi::CString,
    fs,
    io::{BufRead as _, BufReader},
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use integration_tests::{
    netns::{self, TestNetns, UnloadInNetns},
    *,
};
use serde_json::Value;

const NOBODY: u32 = 65534;
const ATTACK: &str = env!("CARGO_BIN_EXE_pg-attack");

/// A bpffs of the test's own at `/tmp/pg-test-bpffs-<name>-<pid>`, mounted as hosts that mount it
/// by hand do (no `mode=`: world-writable and sticky, 1777). Unmounted and removed on drop.
struct TestBpffs {
    dir: PathBuf,
}

impl TestBpffs {
    fn new(name: &str) -> TestBpffs {
        let dir =
            std::env::temp_dir().join(format!("{PREFIX}-bpffs-{name}-{}", std::process::id()));
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&dir)
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir(&dir);
        fs::create_dir(&dir).unwrap();
        let c = CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid C strings, no data.
        let r = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(
            r,
            0,
            "mount bpffs on {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
        let mode = fs::metadata(&dir).unwrap().mode() & 0o7777;
        assert_eq!(
            mode, 0o1777,
            "a bpffs mounted without mode= is world-writable"
        );
        TestBpffs { dir }
    }
}

impl Drop for TestBpffs {
    fn drop(&mut self) {
        // The pins under it go with the superblock; the links they held detach.
        let c = CString::new(self.dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        let _ = fs::remove_dir(&self.dir);
        // The records daemons kept about pin dirs below it.
        remove_state_files(&self.dir);
    }
}

/// Runs `program args` as nobody; returns whether it succeeded.
fn as_nobody(program: &str, args: &[&Path]) -> bool {
    Command::new(program)
        .args(args)
        .uid(NOBODY)
        .gid(NOBODY)
        .current_dir("/")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn expect_refused(cg: &Cgroup, port: u16) {
    assert_eq!(
        bind_in(cg.abs(), &BindSpec::tcp(ANY4, port)),
        Err(expected_errno()),
        "a bind of {port} from {} must be refused",
        cg.path()
    );
}

#[test]
fn a_pin_dir_an_unprivileged_user_made_first_is_refused_and_roots_own_is_theirs_to_keep() {
    let s = Fixture::new("pintake");
    let fs = TestBpffs::new("pintake");

    // nobody makes the pin dir before the daemon starts.
    let pins = fs.dir.join("pins");
    assert!(
        as_nobody("mkdir", &[&pins]),
        "nobody can mkdir on a 1777 bpffs"
    );
    let (code, _, err) = run_cmd(s.daemon_cmd(
        &pins,
        &s.args(Some("63000-63009"), &["--no-protect-ephemeral"]),
    ));
    assert_eq!(code, 1, "{err}");
    let line = single_line(&err);
    assert!(
        line.contains(&format!("{} is owned by uid {NOBODY}", pins.display())),
        "{line}"
    );
    assert_eq!(
        fs::read_dir(&pins).unwrap().count(),
        0,
        "nothing pinned in nobody's dir"
    );
    assert_nothing_attached(&s.attach);

    // Or a directory of theirs above it.
    let theirs = fs.dir.join("theirs");
    assert!(as_nobody("mkdir", &[&theirs]));
    let (code, _, err) = run_cmd(s.daemon_cmd(
        &theirs.join("pins"),
        &s.args(Some("63000-63009"), &["--no-protect-ephemeral"]),
    ));
    assert_eq!(code, 1, "{err}");
    assert!(
        single_line(&err).contains(&format!("{} is owned by uid {NOBODY}", theirs.display())),
        "{err}"
    );
    assert!(
        !theirs.join("pins").exists(),
        "nothing created below nobody's dir"
    );
    assert_nothing_attached(&s.attach);

    // A pin dir root makes there is root's alone: nobody cannot remove the link pins.
    let ours = fs.dir.join("ours");
    let mut d = Daemon::spawn(s.daemon_cmd(
        &ours,
        &s.args(Some("63000-63009"), &["--no-protect-ephemeral"]),
    ));
    d.wait_for("guard enforcing", START_TIMEOUT);
    let m = fs::metadata(&ours).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o700));
    for link in ["link_bind4", "link_bind6"] {
        assert!(
            !as_nobody("rm", &[&ours.join(link)]),
            "nobody removed {link}"
        );
        assert!(ours.join(link).exists());
    }
    expect_refused(&s.outsider, 63000);
    assert!(d.running());
    d.terminate();
    let (code, _, err) = run(&["--pin-dir", ours.to_str().unwrap(), "unload"]);
    assert_eq!(code, 0, "{err}");
}

/// Runs `script` with `sh -c` in a private mount namespace (`unshare -m`), with `env`; returns
/// its stdout.
fn in_private_mount_ns(script: &str, env: &[(&str, String)]) -> String {
    let mut c = Command::new("unshare");
    c.args(["-m", "--propagation", "private", "sh", "-c", script]);
    for (k, v) in env {
        c.env(k, v);
    }
    let (code, out, err) = run_cmd(c);
    assert_eq!(code, 0, "script failed ({code}): {out}\n{err}");
    out
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {out}"))
}

#[test]
fn a_symlink_at_the_pin_path_is_refused_and_nothing_is_mounted_over_bpffs() {
    let s = Fixture::new("pinlink");
    let err = s.tmp.path().join("stderr");
    let link = format!("/sys/fs/bpf/{PREFIX}-link-{}", std::process::id());
    // A fresh bpffs on /sys/fs/bpf, as a host that mounts it by hand has: world-writable, with
    // something of someone else's in it. nobody's link points the pin path elsewhere.
    let out = in_private_mount_ns(
        r#"
        mount -t bpf bpf /sys/fs/bpf || exit 90
        mkdir /sys/fs/bpf/marker || exit 91
        ln -s /tmp "$LINK" && chown -h 65534:65534 "$LINK" || exit 92
        count() { awk '$5 == "/sys/fs/bpf"' /proc/self/mountinfo | wc -l; }
        echo "before=$(count)"
        timeout 20 "$BIN" --pin-dir "$LINK" --config "$CFG" daemon $ARGS 2>"$ERR"
        echo "rc=$?"
        echo "after=$(count)"
        [ -d /sys/fs/bpf/marker ] && echo "marker=visible" || echo "marker=hidden"
        "#,
        &[
            ("LINK", link.clone()),
            ("BIN", bin().display().to_string()),
            ("CFG", s.config.display().to_string()),
            ("ERR", err.display().to_string()),
            (
                "ARGS",
                s.args(Some("63020-63029"), &["--no-protect-ephemeral"])
                    .join(" "),
            ),
        ],
    );
    let err = fs::read_to_string(&err).unwrap();
    assert_eq!(field(&out, "rc"), "1", "{out}\n{err}");
    assert_eq!(
        field(&out, "after"),
        field(&out, "before"),
        "nothing mounted: {out}"
    );
    assert_eq!(field(&out, "marker"), "visible", "the bpffs stays visible");
    let line = single_line(&err);
    assert!(
        line.contains(&format!("{link} is a symbolic link")),
        "{line}"
    );
    assert_nothing_attached(&s.attach);
}

#[test]
fn a_daemon_in_a_private_mount_namespace_refuses_a_bpffs_the_host_does_not_see() {
    let s = Fixture::new("privns");
    let pin = format!("/sys/fs/bpf/{PREFIX}-privns-{}", std::process::id());
    let (err1, err2) = (s.tmp.path().join("err1"), s.tmp.path().join("err2"));
    let out = in_private_mount_ns(
        r#"
        count() { awk '$5 == "/sys/fs/bpf"' /proc/self/mountinfo | wc -l; }
        while [ "$(count)" -gt 0 ]; do umount -l /sys/fs/bpf || exit 90; done
        timeout 20 "$BIN" --pin-dir "$PIN" --config "$CFG" daemon $ARGS 2>"$ERR1"
        echo "rc1=$?"
        echo "mounts=$(count)"
        mount -t bpf bpf /sys/fs/bpf || exit 91
        timeout 20 "$BIN" --pin-dir "$PIN" --config "$CFG" daemon $ARGS 2>"$ERR2"
        echo "rc2=$?"
        [ -e "$PIN" ] && echo "pinned=yes" || echo "pinned=no"
        "#,
        &[
            ("PIN", pin),
            ("BIN", bin().display().to_string()),
            ("CFG", s.config.display().to_string()),
            ("ERR1", err1.display().to_string()),
            ("ERR2", err2.display().to_string()),
            (
                "ARGS",
                s.args(Some("63040-63049"), &["--no-protect-ephemeral"])
                    .join(" "),
            ),
        ],
    );
    let (err1, err2) = (
        fs::read_to_string(&err1).unwrap(),
        fs::read_to_string(&err2).unwrap(),
    );
    // Nothing mounted on /sys/fs/bpf in its namespace: the daemon does not mount one there.
    assert_eq!(field(&out, "rc1"), "1", "{out}\n{err1}");
    assert_eq!(field(&out, "mounts"), "0", "{out}");
    assert!(
        single_line(&err1).contains("host's initial mount namespace does not see"),
        "{err1}"
    );
    // A bpffs mounted in the private namespace only: refused too.
    assert_eq!(field(&out, "rc2"), "1", "{out}\n{err2}");
    assert!(
        single_line(&err2).contains("host's initial mount namespace does not see"),
        "{err2}"
    );
    assert_eq!(field(&out, "pinned"), "no");
    assert_nothing_attached(&s.attach);

    // Where the host's init can be compared with (not every sandbox lets root read
    // /proc/1/ns/mnt): a namespace that sees the host's bpffs through propagation is fine.
    if fs::metadata("/proc/1/ns/mnt").is_err() {
        skip_part("cannot read /proc/1/ns/mnt here: the visible-through-propagation case is checked where it can be");
        return;
    }
    let pin_ok = PinDir::new("privns-ok");
    let mut c = Command::new("unshare");
    c.args(["-m", "--propagation", "slave"]).arg(bin());
    c.arg("--pin-dir")
        .arg(pin_ok.path())
        .arg("--config")
        .arg(&s.config)
        .arg("daemon")
        .args(s.args(Some("63040-63049"), &["--no-protect-ephemeral"]));
    let mut d = Daemon::spawn(c);
    d.wait_for("guard enforcing", START_TIMEOUT);
    // The host sees the pins.
    assert!(pin_ok.path().join("link_bind4").exists());
    expect_refused(&s.outsider, 63040);
    d.terminate();
}

/// The daemon's open fds.
fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn idle_connections_to_the_metrics_port_end_no_lease() {
    const LIMIT: u64 = 160;
    // port-guard's metrics::MAX_CONNECTIONS: the connections it serves at once.
    const SLOTS: usize = 64;
    let s = Fixture::new("fds");
    let metrics = "127.0.0.1:63190";
    let mut cmd = s.daemon_cmd(
        s.pin.path(),
        &s.args(
            Some("63100-63109"),
            &["--no-protect-ephemeral", "--metrics-listen", metrics],
        ),
    );
    // A low fd limit, hard and soft, so the attack needs few connections.
    // SAFETY: setrlimit between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: LIMIT,
                rlim_max: LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut d = Daemon::spawn(cmd);
    d.wait_for("guard enforcing", START_TIMEOUT);

    // A VM with a lease, as libvirt would start it.
    let mut vm = Command::new(bin())
        .arg("--pin-dir")
        .arg(s.pin.path())
        .args(["spawn", "--", "sleep", "600"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(vm.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let port: u16 = first
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("spawn printed {first:?}"));
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let vm = Kill(vm);
    // At rest, with the VM's lease watched (the reaper holds its cgroup open, and its parent).
    let base = wait_until(Duration::from_secs(5), || {
        let n = fd_count(d.pid());
        (n >= 2).then_some(n)
    })
    .unwrap();
    thread::sleep(Duration::from_millis(1500));
    let base = base.max(fd_count(d.pid()));
    assert!(
        base < LIMIT as usize / 2,
        "the daemon needs {base} fds at rest"
    );

    // nobody holds 300 idle connections for longer than the reaper's full pass (30 s).
    let attack = thread::spawn(move || {
        Command::new(ATTACK)
            .args(["--uid", "65534", "hold-connections", metrics, "300", "36"])
            .output()
            .unwrap()
    });
    let mut most = 0;
    while !attack.is_finished() {
        most = most.max(fd_count(d.pid()));
        thread::sleep(Duration::from_millis(200));
    }
    let out = attack.join().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    // The kernel's listen backlog holds what the daemon does not accept: far more connections
    // than its fd limit leaves room for were open at once.
    assert!(
        v["max_open"].as_u64().unwrap() >= 100,
        "the attack ran: {v}"
    );
    assert!(
        most <= base + SLOTS + 4,
        "the daemon held {most} fds under the attack ({base} at rest)"
    );

    // The lease is still there, and its VM can bind its port.
    let st = status_json(s.pin.path());
    let lease = st["leases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["port"] == port)
        .unwrap_or_else(|| panic!("the lease of {port} ended: {st:#}"));
    assert!(
        !d.lines()
            .iter()
            .any(|l| l.contains(&format!("lease ended: port={port}"))),
        "{:#?}",
        d.lines()
    );
    let vm_cg = cgroup2_mount().join(lease["cgroup"].as_str().unwrap().trim_start_matches('/'));
    assert_eq!(bind_in(&vm_cg, &BindSpec::tcp(ANY4, port)), Ok(()));
    // And metrics still answer.
    let body = scrape_metrics(metrics);
    assert!(body.contains("port_guard_leases 1"), "{body}");
    assert!(d.running());
    drop(vm);
}

fn scrape_metrics(addr: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    s
}

/// The keys of a log line outside quoted values, in order.
fn keys_outside_quotes(line: &str) -> Vec<String> {
    let (mut plain, mut quoted, mut escaped) = (String::new(), false, false);
    for c in line.chars() {
        if quoted {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                quoted = false;
            }
        } else if c == '"' {
            quoted = true;
        } else {
            plain.push(c);
        }
    }
    plain
        .split_whitespace()
        .filter_map(|w| w.split_once('=').map(|(k, _)| k.to_owned()))
        .collect()
}

#[test]
fn a_flood_costs_a_few_lines_with_exact_summaries_and_hides_no_other_offender() {
    let s = Fixture::new("flood");
    let d = s.start("63200-63209", &[]);
    let flooder = s.attach.child("flooder");
    let second = s.attach.child("second");

    // nobody, from its own cgroup, binds a reserved port as fast as one process can, 3 s.
    let flood = Command::new(ATTACK)
        .arg("--cgroup")
        .arg(flooder.abs())
        .args([
            "--uid",
            "65534",
            "--comm",
            "pg-flooder",
            "bind-flood",
            "0.0.0.0",
            "63200",
            "3",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_secs(1));
    // Another offender's one refusal, in the middle of the flood, gets its line.
    let skip = d.line_count();
    assert_eq!(
        bind_in(second.abs(), &BindSpec::tcp(ANY4, 63201).comm("pg-second")),
        Err(expected_errno())
    );
    let line = d.wait_for_after(skip, "comm=pg-second", LOG_TIMEOUT);
    assert!(
        line.contains(&format!("cgroup={} ", second.path())),
        "{line}"
    );

    let out = flood.wait_with_output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let binds = v["binds"].as_u64().unwrap();
    assert_eq!(v["ok"], 0, "{v}");
    assert!(binds >= 10_000, "a flood: {v}");

    // Its own lines are few; the rest are summarised, exactly.
    let flooder_lines = |d: &Daemon| {
        d.lines()
            .iter()
            .filter(|l| l.contains("denied bind") && l.contains("comm=pg-flooder"))
            .count() as u64
    };
    // nobody's refusals share one budget (every cgroup of a user together): its summaries are
    // by uid, and name the flooder's cgroup.
    let summarised = |d: &Daemon| -> u64 {
        d.lines()
            .iter()
            .filter(|l| l.contains("more denials by uid=65534 "))
            .inspect(|l| {
                assert!(
                    l.contains(&format!("cgroup1={} ", flooder.path())),
                    "the summary names the flooding cgroup: {l}"
                )
            })
            .map(|l| {
                l.split("denials summarised: ")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or_else(|| panic!("a summary line: {l}"))
            })
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while flooder_lines(&d) + summarised(&d) < binds && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
    }
    let (lines, summed) = (flooder_lines(&d), summarised(&d));
    let cpus = thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    assert_eq!(lines + summed, binds, "{lines} lines + {summed} summarised");
    // A burst of 4, then 2 a second over the flood's ~3 s (and its summary's wait), with room
    // for the extra event two CPUs refusing at the same instant may let through.
    assert!(
        lines <= cpus * (4 + 2 * 5),
        "{lines} lines for {binds} denials"
    );
    let summary = d.wait_for("more denials by uid=65534 ", LOG_TIMEOUT);
    assert!(summary.contains("comm=pg-flooder"), "{summary}");

    // The counters count every one.
    let st = status_json(s.pin.path());
    assert_eq!(st["counters"]["denied"], binds + 1, "{st:#}");
}

#[test]
fn cgroup_and_command_names_cannot_forge_log_fields() {
    let s = Fixture::new("forge");
    let d = s.start("63250-63259", &[]);
    let evil = s.attach.child("x comm=libvirtd pid=1 errno=EPERM");
    assert_eq!(
        bind_in(evil.abs(), &BindSpec::tcp(ANY4, 63250).comm("a=b c\"d")),
        Err(expected_errno())
    );
    let line = d.wait_for("denied bind port=63250/", LOG_TIMEOUT);
    assert!(
        line.contains(&format!("cgroup=\"{}\"", evil.path())),
        "{line}"
    );
    assert!(line.contains(r#"comm="a=b c\"d""#), "{line}");
    let keys = keys_outside_quotes(line.split("denied bind ").nth(1).unwrap());
    assert_eq!(
        keys,
        ["port", "family", "pid", "comm", "cgroup", "netns", "errno"],
        "{line}"
    );

    // Control characters (cgroupfs refuses a newline, not a tab or an escape sequence) are
    // written escaped: nothing reaches the terminal or the journal raw.
    let ctl = s.attach.child("y\tz\u{1b}[31mred");
    assert_eq!(
        bind_in(ctl.abs(), &BindSpec::tcp(ANY4, 63251)),
        Err(expected_errno())
    );
    let line = d.wait_for("denied bind port=63251/", LOG_TIMEOUT);
    assert!(line.contains(r#"y\tz\u{1b}[31mred""#), "{line}");
    assert!(!line.contains('\u{1b}') && !line.contains('\t'), "{line:?}");
}

/// The daemon in `ns` on the test's pin dir, with the default ephemeral protection.
fn daemon_in(ns: &TestNetns, s: &Fixture, range: &str) -> Daemon {
    netns::daemon_in(ns, &s.pin, &s.config, &s.args(Some(range), &[]))
}

/// One way of letting the kernel pick a port, from `cg` in `ns`, as nobody.
fn autopick(ns: &TestNetns, cg: &Cgroup, trick: &str, port: u16) -> Value {
    let out = ns
        .command(ATTACK)
        .arg("--cgroup")
        .arg(cg.abs())
        .args(["--uid", "65534", "autopick", trick, &port.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{trick}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

const TRICKS: [&str; 6] = [
    "port-range",
    "bind-no-port",
    "connect",
    "fastopen",
    "sendto",
    "bind0",
];
const ENOPROTOOPT: i64 = 92;

#[test]
fn no_trick_gets_a_kernel_chosen_reserved_port_under_the_default_config() {
    let ns = TestNetns::new("autopick");
    let s = Fixture::new("autopick");
    let reserved = 63300..=63309u16;
    // Every port the kernel may choose is reserved: whatever it picks is a reserved port.
    ns.set_sysctl("net.ipv4.ip_local_port_range", "63300 63309");

    // Without the guard (the same tricks the test then expects to fail), they get one.
    let mut got = BTreeSet::new();
    for trick in TRICKS {
        let v = autopick(
            &ns,
            &s.outsider,
            trick,
            if trick == "port-range" { 63305 } else { 63390 },
        );
        if let Some(p) = v["port"].as_u64() {
            assert!(reserved.contains(&(p as u16)), "{v}");
            got.insert(trick);
        }
    }
    for trick in ["bind-no-port", "connect", "sendto", "bind0"] {
        assert!(
            got.contains(trick),
            "{trick} gets a reserved port without the guard: {got:?}"
        );
    }

    // Under the default config (no protect_ephemeral in it): none does.
    let _unload = UnloadInNetns {
        ns: &ns,
        pin: &s.pin,
    };
    let _d = daemon_in(&ns, &s, "63300-63309");
    assert_eq!(
        ns.sysctl("net.ipv4.ip_local_reserved_ports"),
        format!("{}63300-63309", default_sentinel_reserved())
    );
    for trick in TRICKS {
        let v = autopick(
            &ns,
            &s.outsider,
            trick,
            if trick == "port-range" { 63305 } else { 63390 },
        );
        if trick == "port-range" && v["errno"] == ENOPROTOOPT {
            skip_part("IP_LOCAL_PORT_RANGE needs kernel 6.3");
            continue;
        }
        assert!(v["port"].is_null(), "{trick} got a reserved port: {v}");
        assert!(v["errno"].as_i64().unwrap() > 0, "{v}");
    }
    // `check` says so when a config turns it off.
    let off = s.tmp.write("off.toml", "protect_ephemeral = false\n");
    let out = ns
        .command(bin())
        .arg("--pin-dir")
        .arg(s.pin.path())
        .arg("--config")
        .arg(&off)
        .arg("check")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("WARN") && l.contains("protect_ephemeral = false")),
        "{text}"
    );
}

#[test]
fn a_rewritten_sysctl_is_put_back_and_unload_removes_only_what_the_daemon_added() {
    let ns = TestNetns::new("sysctl");
    let s = Fixture::new("sysctl");
    let key = "net.ipv4.ip_local_reserved_ports";
    ns.set_sysctl(key, "1234,63405");
    let _unload = UnloadInNetns {
        ns: &ns,
        pin: &s.pin,
    };
    let d = daemon_in(&ns, &s, "63400-63409");
    // Where refusals go through the sentinel port (49151 by default), it is protected too.
    let sentinel = default_sentinel_reserved();
    assert_eq!(ns.sysctl(key), format!("1234,{sentinel}63400-63409"));

    // `sysctl --system` writes the file's value: the reserved ranges are gone.
    let skip = d.line_count();
    ns.set_sysctl(key, "1234");
    d.wait_for_after(
        skip,
        &format!("{key} lost {sentinel}63400-63409"),
        LOG_TIMEOUT,
    );
    assert_eq!(ns.sysctl(key), format!("1234,{sentinel}63400-63409"));

    // Someone else reserves a port meanwhile; unload keeps it, and 63405, which was there
    // before the daemon.
    ns.set_sysctl(key, "1234,2345,63400-63409");
    let out = ns
        .command(bin())
        .arg("--pin-dir")
        .arg(s.pin.path())
        .arg("unload")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ns.sysctl(key), "1234,2345,63405");
}

#[test]
fn a_reload_that_fails_half_way_leaves_the_old_policy_whole_in_the_kernel() {
    let s = Fixture::new("halfway");
    // Two sets of allowed cgroups that together do not fit the allowed-cgroup map (4,096): the
    // switch from one to the other fails when the map is full, half way through.
    const N: usize = 2100;
    let a: Vec<Cgroup> = (0..N).map(|i| s.attach.child(&format!("a/{i}"))).collect();
    let b: Vec<Cgroup> = (0..N).map(|i| s.attach.child(&format!("b/{i}"))).collect();
    let config = |mode: &str, allow: &[Cgroup]| {
        let list: Vec<String> = allow.iter().map(|c| format!("\"{}\"", c.path())).collect();
        format!(
            "mode = \"{mode}\"\nprotect_ephemeral = false\n[[reserve]]\nports = \"63500-63509\"\nallow = [{}]\n",
            list.join(", ")
        )
    };
    fs::write(&s.config, config("enforce", &a)).unwrap();
    let mut d = Daemon::spawn(s.daemon_cmd(s.pin.path(), &s.args(None, &[])));
    d.wait_for("guard enforcing", START_TIMEOUT);
    assert_eq!(bind_in(a[7].abs(), &BindSpec::tcp(ANY4, 63500)), Ok(()));
    expect_refused(&b[7], 63500);

    fs::write(&s.config, config("audit", &b)).unwrap();
    let skip = d.line_count();
    // SAFETY: kill(2) on the daemon's pid.
    unsafe { libc::kill(d.pid(), libc::SIGHUP) };
    let line = d.wait_for_after(skip, "SIGHUP:", LOG_TIMEOUT);
    assert!(
        line.contains("new config refused, the old one stays in force"),
        "{line}"
    );

    // The old policy, whole: enforce, A allowed, B and outsiders refused.
    expect_refused(&s.outsider, 63501);
    expect_refused(&b[0], 63501);
    expect_refused(&b[N - 1], 63501);
    assert_eq!(bind_in(a[0].abs(), &BindSpec::tcp(ANY4, 63501)), Ok(()));
    assert_eq!(bind_in(a[N - 1].abs(), &BindSpec::tcp(ANY4, 63501)), Ok(()));
    let st = status_json(s.pin.path());
    assert_eq!(st["mode"], "enforce");
    let allow = st["reserve"][0]["allow"].as_array().unwrap();
    assert_eq!(allow.len(), N);
    assert!(
        allow.iter().all(|p| p.as_str().unwrap().contains("/a/")),
        "{allow:?}"
    );
    assert!(d.running());
}

/// Detaches the link pinned at `path` (BPF_LINK_DETACH), leaving the pin.
fn detach_pinned_link(path: &Path) {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut attr = [0u64; 8];
    attr[0] = c.as_ptr() as u64;
    // SAFETY: a BPF_OBJ_GET attr (pathname first, the rest zero).
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 7, attr.as_ptr(), 64) };
    assert!(
        fd >= 0,
        "BPF_OBJ_GET {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    let attr = [fd as u64, 0, 0, 0, 0, 0, 0, 0];
    // SAFETY: a BPF_LINK_DETACH attr (link_fd first).
    let r = unsafe { libc::syscall(libc::SYS_bpf, 34, attr.as_ptr(), 64) };
    let e = std::io::Error::last_os_error();
    // SAFETY: the fd BPF_OBJ_GET returned.
    unsafe { libc::close(fd as i32) };
    assert_eq!(r, 0, "BPF_LINK_DETACH: {e}");
}

#[test]
fn pins_removed_under_a_running_daemon_come_back_and_detached_links_end_it_for_a_restart() {
    let s = Fixture::new("pinsgone");
    let mut d = s.start("63600-63609", &[]);
    let link4 = s.pin.path().join("link_bind4");

    // Pins removed (only root can, now): the links stay attached, the daemon pins them again.
    let skip = d.line_count();
    for name in ["link_bind4", "link_bind6", "PG_LEASES"] {
        fs::remove_file(s.pin.path().join(name)).unwrap();
    }
    expect_refused(&s.outsider, 63600);
    let line = d.wait_for_after(
        skip,
        "were removed while its links were attached",
        LOG_TIMEOUT,
    );
    assert!(
        line.contains("link_bind4") && line.contains("PG_LEASES"),
        "{line}"
    );
    assert!(link4.exists() && s.pin.path().join("PG_LEASES").exists());
    assert_eq!(status_json(s.pin.path())["attached"], true);
    let (code, _, err) = run(&["--pin-dir", s.pin.as_str(), "spawn", "--", "true"]);
    assert_eq!(code, 0, "leases work on the pinned-again map: {err}");

    // A link detached while its pin stays: status says so, the daemon ends non-zero so that
    // the service manager starts it again, and a new daemon attaches anew.
    detach_pinned_link(&link4);
    let st = status_json(s.pin.path());
    assert_eq!(st["attached"], false, "{st:#}");
    assert!(
        st["disagreements"].as_array().unwrap().iter().any(|x| x
            .as_str()
            .unwrap()
            .contains("bind4: the pinned link is detached")),
        "{st:#}"
    );
    let (_, table, _) = run(&["--pin-dir", s.pin.as_str(), "status"]);
    assert!(
        table.contains("NOT ATTACHED") && table.contains("detached"),
        "{table}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while d.running() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    assert!(!d.running(), "the daemon kept running with a detached link");
    assert_eq!(exit_code(d.signal(0)), 1);
    assert!(d
        .lines()
        .iter()
        .any(|l| l.contains("were detached while their pins")));
    let mut d = s.start("63600-63609", &[]);
    assert_eq!(status_json(s.pin.path())["attached"], true);
    expect_refused(&s.outsider, 63600);

    // `unload` while it runs: it says so and exits 0.
    let (code, _, err) = run(&["--pin-dir", s.pin.as_str(), "unload"]);
    assert_eq!(code, 0, "{err}");
    d.wait_for("was unloaded", LOG_TIMEOUT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.running() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(exit_code(d.signal(0)), 0);
}
