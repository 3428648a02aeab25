//! Leases and `spawn`, end to end: atomic allocation under concurrency, who may bind a leased
//! port, lease end when the VM's cgroup empties (daemon running, and reaped at daemon start),
//! and real qemu live migrations to ports handed out by `spawn` while a hostile process keeps
//! trying to take every port of the range, compared with the same race without the guard.
//!
//! Layout per test: `/pg-test-<test>-<pid>` is the attach cgroup with children `allowed`,
//! `outsider` and `spawn` (the spawn parent); its own pin dir, config file and ports in
//! 62000-62999. Needs root, the agent built, and (for migrations) qemu-system-x86_64.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{qemu, *};
use serde_json::Value;

struct Env {
    daemon: Option<Daemon>,
    pin: PinDir,
    tmp: TempDir,
    config: PathBuf,
    args: Vec<String>,
    first: u16,
    last: u16,
    allowed: Cgroup,
    outsider: Cgroup,
    spawn_parent: Cgroup,
    attach: TestCgroup,
}

impl Env {
    fn new(name: &str, first: u16, last: u16) -> Env {
        let attach = TestCgroup::new(name);
        let allowed = attach.child("allowed");
        let outsider = attach.child("outsider");
        let spawn_parent = attach.child("spawn");
        let pin = PinDir::new(name);
        let tmp = TempDir::new(name);
        let config = tmp.write(
            "config.toml",
            "mode = \"enforce\"\nerrno = \"eaddrinuse\"\n",
        );
        let mut args = vec![
            "--attach".into(),
            attach.path().to_string(),
            "--reserve".into(),
            format!("{first}-{last}/tcp"),
            "--allow".into(),
            allowed.path().to_string(),
            "--spawn-parent".into(),
            spawn_parent.path().to_string(),
        ];
        if !kernel_features().set_retval && !kernel_features().sentinel {
            // errno eaddrinuse cannot be enforced here (EPERM only): start anyway.
            args.push("--allow-fallback".into());
        }
        let mut e = Env {
            daemon: None,
            pin,
            tmp,
            config,
            args,
            first,
            last,
            allowed,
            outsider,
            spawn_parent,
            attach,
        };
        e.start_daemon();
        e
    }

    fn start_daemon(&mut self) {
        let d = Daemon::start(self.pin.path(), &self.config, &self.args);
        d.wait_for("guard enforcing", START_TIMEOUT);
        self.daemon = Some(d);
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon running")
    }

    fn pg(&self) -> Command {
        let mut c = Command::new(bin());
        c.arg("--pin-dir").arg(self.pin.path());
        c
    }

    /// Starts `port-guard spawn [extra] -- cmd...` and reads the port from its first line.
    fn spawn(
        &self,
        extra: &[&str],
        cmd: &[String],
    ) -> Result<(u16, Child, BufReader<ChildStdout>), String> {
        let mut c = self.pg();
        c.arg("spawn").args(extra).arg("--").args(cmd);
        c.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = c.spawn().expect("starting port-guard spawn");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line)
            .expect("reading spawn's first line");
        match line.trim().parse::<u16>() {
            Ok(port) => Ok((port, child, out)),
            Err(_) => {
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
                let st = child.wait().unwrap();
                Err(format!("spawn printed {line:?}, exit {st}, stderr {err:?}"))
            }
        }
    }

    fn leases(&self) -> Vec<Value> {
        status_json(self.pin.path())["leases"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn lease_of(&self, port: u16) -> Option<Value> {
        self.leases().into_iter().find(|l| l["port"] == port)
    }
}

fn sh(cmd: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), cmd.into()]
}

#[test]
fn concurrent_leases_are_distinct_and_the_extra_one_is_refused() {
    let e = Env::new("lease-conc", 62000, 62007);
    let n = usize::from(e.last - e.first) + 2; // every port, plus one
    let targets: Vec<Cgroup> = (0..n).map(|i| e.attach.child(&format!("c{i}"))).collect();
    let children: Vec<Child> = targets
        .iter()
        .map(|t| {
            let mut c = e.pg();
            c.args(["lease", "--cgroup", t.path()]);
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
            c.spawn().expect("starting port-guard lease")
        })
        .collect();
    let mut ports = Vec::new();
    let mut failures = Vec::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        match out.status.code() {
            Some(0) => ports.push(
                stdout
                    .parse::<u16>()
                    .unwrap_or_else(|_| panic!("lease printed {stdout:?}")),
            ),
            code => failures.push((code, stderr)),
        }
    }
    ports.sort();
    let expected: Vec<u16> = (e.first..=e.last).collect();
    assert_eq!(
        ports, expected,
        "every port leased exactly once; failures: {failures:?}"
    );
    assert_eq!(failures.len(), 1, "{failures:?}");
    let (code, msg) = &failures[0];
    assert_eq!(*code, Some(1), "{msg}");
    assert!(
        msg.contains("no free port") && msg.contains("62000-62007"),
        "{msg}"
    );
    assert_eq!(single_line(msg), msg.as_str());
    // Each lease belongs to the cgroup it was made for, and the scratch cgroups are gone.
    let leases = e.leases();
    assert_eq!(leases.len(), expected.len());
    for l in &leases {
        assert!(targets.iter().any(|t| l["cgroup"] == t.path()), "{l}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(e.spawn_parent.abs())
        .unwrap()
        .flatten()
        .filter(|d| d.path().is_dir())
        .collect();
    assert!(leftovers.is_empty(), "scratch cgroups left: {leftovers:?}");
    // release frees a port for the next lease.
    let (code, _, err) = run(&["--pin-dir", e.pin.as_str(), "release", "--port", "62003"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run(&[
        "--pin-dir",
        e.pin.as_str(),
        "lease",
        "--cgroup",
        targets[0].path(),
    ]);
    assert_eq!((code, out.trim()), (0, "62003"), "{err}");
}

#[test]
fn the_lease_map_decides_when_the_allocators_bitmap_is_wrong() {
    // The bitmap only proposes ports; the claim (BPF_NOEXIST on the lease map) decides. Both
    // ways the bitmap can be wrong after a crash are made by hand here.
    let mut e = Env::new("lease-bits", 62140, 62143);
    let pin = e.pin.as_str().to_owned();
    let lease = |cg: &Cgroup| -> u16 {
        let (code, out, err) = run(&["--pin-dir", &pin, "lease", "--cgroup", cg.path()]);
        assert_eq!(code, 0, "{err}");
        out.trim().parse().unwrap()
    };
    let c: Vec<Cgroup> = (0..4).map(|i| e.attach.child(&format!("b{i}"))).collect();
    // Lowest port first, and marked.
    assert_eq!(lease(&c[0]), 62140);
    assert!(alloc_marked(e.pin.path(), 62140));
    // A lease the bitmap does not show (its allocator died between claim and mark): the next
    // allocation fails to claim it, marks it, and takes the next port.
    set_alloc_mark(e.pin.path(), 62140, false);
    assert_eq!(lease(&c[1]), 62141);
    assert!(
        alloc_marked(e.pin.path(), 62140),
        "the failed claim marks the port"
    );
    assert_eq!(
        get_lease(e.pin.path(), 62140).map(|l| l.cgroup_id),
        Some(c[0].id()),
        "the first lease is untouched"
    );
    // A mark without a lease (its releaser died between the two): skipped until the daemon
    // reconciles, which it does when it starts.
    set_alloc_mark(e.pin.path(), 62142, true);
    assert_eq!(lease(&c[2]), 62143);
    let (code, _, err) = run(&[
        "--pin-dir",
        e.pin.as_str(),
        "lease",
        "--cgroup",
        c[3].path(),
    ]);
    assert_eq!(code, 1, "every port marked: no free port ({err})");
    assert!(err.contains("no free port"), "{err}");
    assert!(get_lease(e.pin.path(), 62142).is_none());
    e.daemon.as_mut().unwrap().terminate();
    e.start_daemon();
    let cleared = wait_until(Duration::from_secs(5), || {
        (!alloc_marked(e.pin.path(), 62142)).then_some(())
    });
    assert!(
        cleared.is_some(),
        "the daemon clears the stale mark when it starts"
    );
    assert_eq!(lease(&c[3]), 62142);
    let mut owners: Vec<(u64, u64)> = e
        .leases()
        .iter()
        .map(|l| {
            (
                l["port"].as_u64().unwrap(),
                l["cgroup_id"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    owners.sort();
    let mut want: Vec<(u64, u64)> = [
        (62140, &c[0]),
        (62141, &c[1]),
        (62142, &c[3]),
        (62143, &c[2]),
    ]
    .iter()
    .map(|(p, cg)| (*p, cg.id()))
    .collect();
    want.sort();
    assert_eq!(owners, want, "{:?}", e.leases());
}

#[test]
fn a_lease_ends_within_seconds_of_its_cgroup_being_removed() {
    // A lease made by `lease --cgroup` (not spawn): the daemon learns of it from the allocators'
    // generation counter on its next tick, and of the removal from inotify or that tick.
    let e = Env::new("lease-rm", 62150, 62151);
    let target = e.attach.child("target");
    let (code, out, err) = run(&[
        "--pin-dir",
        e.pin.as_str(),
        "lease",
        "--cgroup",
        target.path(),
    ]);
    assert_eq!(code, 0, "{err}");
    let port: u16 = out.trim().parse().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        e.lease_of(port).is_some(),
        "a live, empty lessee keeps its lease"
    );
    let t = Instant::now();
    std::fs::remove_dir(target.abs()).unwrap();
    let ended = wait_until(Duration::from_secs(10), || {
        e.lease_of(port).is_none().then_some(t.elapsed())
    });
    let ended = ended.unwrap_or_else(|| panic!("lease not ended: {:?}", e.leases()));
    eprintln!(
        "lease ended {} ms after its cgroup was removed",
        ended.as_millis()
    );
    assert!(ended < Duration::from_secs(3), "{ended:?}");
    assert!(
        !alloc_marked(e.pin.path(), port),
        "a reaped lease is unmarked"
    );
}

#[test]
fn four_allocators_racing_fill_a_100_port_range_exactly_once() {
    // Four threads each run `port-guard lease` until it says "no free port": the shared bitmap
    // and the claims must hand every port out once, to nobody twice, and leave every port marked.
    let e = Env::new("lease-race", 62500, 62599);
    let targets: Vec<Cgroup> = (0..4).map(|i| e.attach.child(&format!("r{i}"))).collect();
    let pin = e.pin.as_str().to_owned();
    let results: Vec<(Vec<u16>, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = targets
            .iter()
            .map(|t| {
                let pin = pin.clone();
                s.spawn(move || {
                    let mut got = Vec::new();
                    loop {
                        let (code, out, err) =
                            run(&["--pin-dir", &pin, "lease", "--cgroup", t.path()]);
                        match code {
                            0 => got.push(out.trim().parse::<u16>().unwrap()),
                            _ => return (got, err),
                        }
                        assert!(got.len() <= 100, "more leases than ports");
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all: Vec<u16> = results
        .iter()
        .flat_map(|(g, _)| g.iter().copied())
        .collect();
    all.sort();
    let expected: Vec<u16> = (62500..=62599).collect();
    assert_eq!(all, expected, "every port leased exactly once");
    for (got, err) in &results {
        assert!(
            err.contains("no free port"),
            "each allocator ends on exhaustion: {err}"
        );
        eprintln!("allocator leased {} ports", got.len());
    }
    for (t, (got, _)) in targets.iter().zip(&results) {
        for p in got {
            assert_eq!(
                get_lease(e.pin.path(), *p).map(|l| l.cgroup_id),
                Some(t.id()),
                "port {p}"
            );
        }
    }
    assert!(
        (62500..=62599).all(|p| alloc_marked(e.pin.path(), p)),
        "every leased port is marked"
    );
}

#[test]
fn a_spawned_port_is_refused_to_other_vms_allowed_cgroups_and_outsiders() {
    let e = Env::new("lease-who", 62020, 62029);
    let (port, _vm1, _o1) = e.spawn(&["--name", "vm1"], &sh("exec sleep 60")).unwrap();
    let (port2, _vm2, _o2) = e.spawn(&["--name", "vm2"], &sh("exec sleep 60")).unwrap();
    assert_ne!(port, port2);
    let vm1 = e.spawn_parent.child("vm1");
    let vm2 = e.spawn_parent.child("vm2");
    let lease = e.lease_of(port).expect("lease listed in status");
    assert_eq!(lease["cgroup"], vm1.path());
    for (who, cg) in [
        ("vm2", &vm2),
        ("allowed", &e.allowed),
        ("outsider", &e.outsider),
    ] {
        assert_eq!(
            bind_in(cg, &BindSpec::tcp(ANY4, port)),
            Err(expected_errno()),
            "{who} on v4"
        );
        assert_eq!(
            bind_in(cg, &BindSpec::tcp(ANY6, port)),
            Err(expected_errno()),
            "{who} on v6"
        );
    }
    assert_eq!(
        bind_in(&vm1, &BindSpec::tcp(ANY6, port)),
        Ok(()),
        "the lessee binds its port"
    );
    assert_eq!(
        bind_in(vm1.child("sub"), &BindSpec::tcp(ANY4, port)),
        Ok(()),
        "and below it"
    );
    // An unleased port of the range is still the allowed cgroup's.
    let free = (e.first..=e.last)
        .find(|p| *p != port && *p != port2)
        .unwrap();
    assert_eq!(bind_in(&e.allowed, &BindSpec::tcp(ANY4, free)), Ok(()));
    // Asking for a leased port, or one outside the range, fails with a clear line.
    let p = port.to_string();
    let (code, _, err) = run(&[
        "--pin-dir",
        e.pin.as_str(),
        "spawn",
        "--port",
        &p,
        "--",
        "/bin/true",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("port {port} is already leased to {}", vm1.path())),
        "{err}"
    );
    let (code, _, err) = run(&[
        "--pin-dir",
        e.pin.as_str(),
        "spawn",
        "--port",
        "61999",
        "--",
        "/bin/true",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("61999") && err.contains("62020-62029"),
        "{err}"
    );
    let (code, _, err) = run(&[
        "--pin-dir",
        e.pin.as_str(),
        "spawn",
        "--name",
        "a/b",
        "--",
        "/bin/true",
    ]);
    assert_eq!(code, 2, "{err}");
    // Failed spawns leave no cgroup and no lease behind.
    assert_eq!(e.leases().len(), 2);
    let dirs: Vec<String> = std::fs::read_dir(e.spawn_parent.abs())
        .unwrap()
        .flatten()
        .filter(|d| d.path().is_dir())
        .map(|d| d.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(dirs.len(), 2, "{dirs:?}");
}

#[test]
fn lease_and_cgroup_end_when_the_vm_exits_while_the_daemon_runs() {
    let e = Env::new("lease-end", 62040, 62049);
    let (port, mut child, _out) = e
        .spawn(&["--name", "shortvm"], &sh("sleep 0.5"))
        .unwrap_or_else(|m| panic!("{m}"));
    assert_eq!(
        e.lease_of(port).expect("leased while the VM runs")["cgroup"],
        format!("{}/shortvm", e.spawn_parent.path())
    );
    let cg = e.spawn_parent.child("shortvm");
    let status = child.wait().unwrap();
    assert!(status.success());
    let exited = Instant::now();
    let gone = wait_until(Duration::from_secs(10), || {
        (e.leases().is_empty() && !cg.abs().exists()).then_some(())
    });
    let took = exited.elapsed();
    assert!(
        gone.is_some(),
        "lease or cgroup still there: {:?}",
        e.leases()
    );
    eprintln!(
        "[measure] lease and cgroup gone {} ms after the VM exited",
        took.as_millis()
    );
    e.daemon().wait_for("lease ended", LOG_TIMEOUT);
}

#[test]
fn spawn_json_names_port_pid_and_cgroup() {
    let e = Env::new("lease-json", 62060, 62069);
    let mut c = e.pg();
    c.args([
        "spawn",
        "--json",
        "--name",
        "jvm",
        "--",
        "/bin/sh",
        "-c",
        "echo arg={port}",
    ]);
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let v: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    let port = v["port"].as_u64().unwrap();
    assert!((62060..=62069).contains(&port), "{v}");
    assert_eq!(v["cgroup"], format!("{}/jvm", e.spawn_parent.path()));
    assert!(v["pid"].as_u64().unwrap() > 1);
    assert_eq!(
        lines.next(),
        Some(format!("arg={port}").as_str()),
        "{{port}} replaced in the command"
    );
}

#[test]
fn leases_of_vms_that_ended_without_a_daemon_are_reaped_when_it_starts() {
    let mut e = Env::new("lease-reap", 62080, 62089);
    let st = e.daemon.as_mut().unwrap().terminate();
    assert!(st.success());
    e.daemon = None;
    // spawn works from the pins alone; the VM exits at once.
    let (port, mut child, _o) = e
        .spawn(&["--name", "gone"], &["/bin/true".to_string()])
        .unwrap();
    assert!(child.wait().unwrap().success());
    let lease = e
        .lease_of(port)
        .expect("the lease outlives the VM while no daemon runs");
    assert_eq!(lease["cgroup"], format!("{}/gone", e.spawn_parent.path()));
    // A lease to a cgroup that no longer exists at all.
    let doomed = e.attach.child("doomed");
    let (code, out, err) = run(&[
        "--pin-dir",
        e.pin.as_str(),
        "lease",
        "--cgroup",
        doomed.path(),
    ]);
    assert_eq!(code, 0, "{err}");
    let port2: u16 = out.trim().parse().unwrap();
    std::fs::remove_dir(doomed.abs()).unwrap();
    // A lease to a live, empty cgroup that the orchestrator has not started qemu in yet stays.
    let pending = e.attach.child("pending");
    let (code, out, err) = run(&[
        "--pin-dir",
        e.pin.as_str(),
        "lease",
        "--cgroup",
        pending.path(),
    ]);
    assert_eq!(code, 0, "{err}");
    let port3: u16 = out.trim().parse().unwrap();

    e.start_daemon();
    let ok = wait_until(Duration::from_secs(10), || {
        (e.lease_of(port).is_none() && e.lease_of(port2).is_none()).then_some(())
    });
    assert!(ok.is_some(), "not reaped: {:?}", e.leases());
    assert!(
        !e.spawn_parent.abs().join("gone").exists(),
        "spawned cgroup removed"
    );
    assert!(e.lease_of(port3).is_some(), "a pending lease is kept");
    let lines = e.daemon().lines().join("\n");
    assert!(
        lines.contains(&format!("lease ended: port={port}")),
        "{lines}"
    );
}

#[test]
fn cgroups_abandoned_by_a_killed_spawn_are_removed_and_fresh_or_busy_ones_kept() {
    // spawn makes its cgroup, moves in, then claims: killed in between, it leaves an empty
    // cgroup with no lease. The daemon removes such cgroups once they are a minute old (a leaf
    // cgroup's mtime is when it was made), here at its start.
    let mut e = Env::new("lease-orphan", 62160, 62161);
    let st = e.daemon.as_mut().unwrap().terminate();
    assert!(st.success());
    e.daemon = None;
    let old = e.spawn_parent.child("vm-killed");
    let fresh = e.spawn_parent.child("vm-starting");
    let busy = e.spawn_parent.child("vm-busy");
    // Made five minutes ago, as far as the directory's mtime says (utimensat: busybox's touch
    // in the VM guests has no relative dates).
    for cg in [&old, &busy] {
        let path = std::ffi::CString::new(cg.abs().as_os_str().as_encoded_bytes()).unwrap();
        let then = libc::timespec {
            tv_sec: now_secs() as libc::time_t - 300,
            tv_nsec: 0,
        };
        let times = [then, then];
        // SAFETY: a valid C path and two timespecs.
        let r = unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) };
        assert_eq!(
            r,
            0,
            "utimensat {}: {}",
            cg.abs().display(),
            std::io::Error::last_os_error()
        );
    }
    let _holder = hold_in(&busy);
    e.start_daemon();
    let gone = wait_until(Duration::from_secs(10), || {
        (!old.abs().exists()).then_some(())
    });
    assert!(gone.is_some(), "the abandoned cgroup is removed");
    assert!(
        fresh.abs().exists(),
        "a cgroup made moments ago is kept (its spawn may be about to move in)"
    );
    assert!(busy.abs().exists(), "a cgroup with a process is kept");
    // The directory goes before its line is written: wait for the line.
    e.daemon().wait_for(
        &format!("removed cgroup {}/vm-killed", e.spawn_parent.path()),
        LOG_TIMEOUT,
    );
}

/// Starts pg-hostile in `cg` over the range: hold what it gets for `hold_ms`, then pause
/// `gap_ms` with nothing held.
fn hostile(cg: &Cgroup, first: u16, last: u16, hold_ms: u64, gap_ms: u64) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pg-hostile"));
    c.args([
        first.to_string(),
        last.to_string(),
        "600000".into(),
        hold_ms.to_string(),
        gap_ms.to_string(),
    ]);
    c.stdout(Stdio::piped());
    integration_tests::netns::enter_cgroup(&mut c, cg);
    c.spawn().expect("starting pg-hostile")
}

fn stop_hostile(mut h: Child) -> Value {
    unsafe { libc::kill(h.id() as i32, libc::SIGTERM) };
    let out = std::mem::take(&mut h.stdout).unwrap();
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).unwrap();
    h.wait().unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("pg-hostile printed {line:?}: {e}"))
}

fn wait_listening(port: u16, child: &mut Child, timeout: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    loop {
        if qemu::listening(port) {
            return Ok(t.elapsed());
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("qemu exited before listening on {port}: {st}"));
        }
        if t.elapsed() > timeout {
            return Err(format!("qemu not listening on {port} after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

#[test]
fn live_migrations_through_spawn_survive_a_hostile_binder_and_fail_without_the_guard() {
    const MIGRATIONS: usize = 20;
    const CONCURRENT_SPAWNS: usize = 8;
    const UNGUARDED: usize = 10;
    match Command::new(qemu::qemu_bin()).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        other => {
            let why = match other {
                Ok(out) => format!("exited with {}", out.status),
                Err(e) => e.to_string(),
            };
            skip(&format!(
                "{} cannot run here ({why}): live migrations need qemu",
                qemu::qemu_bin()
            ));
            return;
        }
    }
    let mut e = Env::new("migrate", 62100, 62115);
    let qmp_dir = e.tmp.path().to_owned();
    let hostile_cg = e.outsider.clone();
    let h = hostile(&hostile_cg, e.first, e.last, 50, 0);

    // The first source: a running guest anywhere.
    let mut source = qemu::Qemu::start(&qmp_dir.join("src0.qmp"), &[]);
    assert_eq!(source.qmp().status(), "running");
    let mut failures = Vec::new();
    let mut to_listen = Vec::new();
    let mut per_migration = Vec::new();
    let mut sleepers = Vec::new();
    let mut pipes = Vec::new();
    for i in 0..MIGRATIONS {
        if i == MIGRATIONS / 2 {
            // Eight spawns at once, while the hostile binder runs: all get distinct ports.
            let started: Vec<Child> = (0..CONCURRENT_SPAWNS)
                .map(|_| {
                    let mut c = e.pg();
                    c.args(["spawn", "--", "sleep", "30"])
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped());
                    c.spawn().unwrap()
                })
                .collect();
            let mut ports = Vec::new();
            for mut c in started {
                let mut line = String::new();
                BufReader::new(c.stdout.take().unwrap())
                    .read_line(&mut line)
                    .unwrap();
                match line.trim().parse::<u16>() {
                    Ok(p) => ports.push(p),
                    Err(_) => failures.push(format!("concurrent spawn printed {line:?}")),
                }
                sleepers.push(c);
            }
            let mut uniq = ports.clone();
            uniq.sort();
            uniq.dedup();
            assert_eq!(
                uniq.len(),
                ports.len(),
                "concurrent spawns got the same port: {ports:?}"
            );
        }
        let qmp = qmp_dir.join(format!("dst{i}.qmp"));
        let mut cmd = vec![qemu::qemu_bin()];
        cmd.extend(qemu::guest_args(&qmp));
        cmd.extend(["-incoming".to_string(), "tcp:[::]:{port}".to_string()]);
        let t0 = Instant::now();
        let (port, mut child, out) = match e.spawn(&[], &cmd) {
            Ok(x) => x,
            Err(m) => {
                failures.push(format!("migration {i}: spawn: {m}"));
                continue;
            }
        };
        match wait_listening(port, &mut child, Duration::from_secs(30)) {
            Ok(_) => to_listen.push(t0.elapsed()),
            Err(m) => {
                failures.push(format!("migration {i}: {m}"));
                continue;
            }
        }
        // Keep qemu's stdout open: a closed pipe could kill it with SIGPIPE.
        pipes.push(out);
        let dest = qemu::Qemu::adopt(child, &qmp);
        let t1 = Instant::now();
        let (status, info) = source
            .qmp()
            .migrate(&format!("tcp:127.0.0.1:{port}"), Duration::from_secs(120));
        per_migration.push(t1.elapsed());
        if status != "completed" {
            failures.push(format!("migration {i} to {port}: {status}: {info}"));
            continue;
        }
        let mut dq = dest.qmp();
        let st = dq.wait_status("running", Duration::from_secs(10));
        if st != "running" {
            failures.push(format!("migration {i}: destination is {st}"));
        }
        source = dest;
    }
    drop(source);
    for mut s in sleepers {
        let _ = s.kill();
        let _ = s.wait();
    }
    let guarded = stop_hostile(h);
    eprintln!(
        "[measure] guarded: {MIGRATIONS} migrations, {} failures; spawn->listening median {} ms; migration median {} ms; hostile {guarded}",
        failures.len(),
        median(to_listen).as_millis(),
        median(per_migration).as_millis()
    );
    assert!(
        failures.is_empty(),
        "failures under the guard: {failures:#?}"
    );
    assert_eq!(
        guarded["grabbed"], 0,
        "the hostile binder got a reserved port: {guarded}"
    );
    assert!(
        guarded["refused"][expected_errno().to_string()]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{guarded}"
    );

    // Without the guard, the same race: libvirt's way (probe a free port, start qemu on it).
    e.daemon.as_mut().unwrap().terminate();
    e.daemon = None;
    let (code, _, err) = run(&["--pin-dir", e.pin.as_str(), "unload"]);
    assert_eq!(code, 0, "{err}");
    // Here the hostile binder leaves gaps, so the allocator does see free ports, and loses them.
    let h = hostile(&hostile_cg, e.first, e.last, 30, 30);
    std::thread::sleep(Duration::from_millis(200));
    let mut unguarded_failures = Vec::new();
    let mut source = qemu::Qemu::start(&qmp_dir.join("usrc.qmp"), &[]);
    for i in 0..UNGUARDED {
        // libvirt's way: the lowest port that a probe bind finds free (retrying for a while,
        // as an orchestrator would), then qemu is started on it.
        let free = wait_until(Duration::from_secs(2), || {
            (e.first..=e.last).find(|p| {
                std::net::TcpListener::bind(("::", *p)).is_ok()
                    && std::net::TcpListener::bind(("0.0.0.0", *p)).is_ok()
            })
        });
        let Some(port) = free else {
            unguarded_failures.push(format!("attempt {i}: no free port in the range"));
            continue;
        };
        let qmp = qmp_dir.join(format!("u{i}.qmp"));
        let incoming = format!("tcp:[::]:{port}");
        let mut dest = qemu::Qemu::start(&qmp, &["-incoming", &incoming]);
        if let Err(m) = wait_listening(port, &mut dest.child, Duration::from_secs(30)) {
            unguarded_failures.push(format!("attempt {i}: {m}"));
            continue;
        }
        // Unguarded, the source may stream into the hostile process, which resets the connection
        // (and can take qemu or its QMP socket down with it): any of that is a failed attempt.
        let status = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            source
                .qmp()
                .migrate(&format!("tcp:127.0.0.1:{port}"), Duration::from_secs(120))
                .0
        }))
        .unwrap_or_else(|_| "source lost (connection reset)".to_string());
        let dest_status = std::panic::catch_unwind(|| {
            qemu::Qmp::try_connect(&qmp, Duration::from_secs(5)).map(|mut q| q.status())
        })
        .unwrap_or_else(|_| Err("destination QMP reset".to_string()));
        match (status.as_str(), dest_status.as_deref()) {
            ("completed", Ok("running")) => source = dest,
            (s, d) => {
                // "completed" with the destination still "inmigrate": the source's stream went
                // to whoever held the port's other listener, the worst outcome of all.
                unguarded_failures.push(format!(
                    "attempt {i}: port {port}: migration {s}, destination {d:?}"
                ));
                source = qemu::Qemu::start(&qmp_dir.join(format!("usrc{i}.qmp")), &[]);
            }
        }
    }
    drop(source);
    let unguarded = stop_hostile(h);
    eprintln!(
        "[measure] unguarded: {} of {UNGUARDED} attempts failed; hostile {unguarded}; first failures {:?}",
        unguarded_failures.len(),
        unguarded_failures.iter().take(3).collect::<Vec<_>>()
    );
    assert!(
        !unguarded_failures.is_empty(),
        "the hostile binder never beat an unguarded migration"
    );
    assert!(unguarded["grabbed"].as_u64().unwrap() > 0, "{unguarded}");
}

// ---------------------------------------------------------------------------------------------
// Leases v2: several ports at once, and lifetimes an orchestrator can rely on
// ---------------------------------------------------------------------------------------------

/// `port-guard lease --json ARGS...`: (exit code, the JSON on success, stderr).
fn lease_json(e: &Env, args: &[&str]) -> (i32, Value, String) {
    let mut c = e.pg();
    c.arg("lease").arg("--json").args(args);
    let (code, out, err) = run_cmd(c);
    let v = if code == 0 {
        serde_json::from_str(out.trim()).unwrap_or_else(|x| panic!("{x}: {out:?}"))
    } else {
        Value::Null
    };
    (code, v, err)
}

fn ports_of(v: &Value) -> Vec<u16> {
    v["ports"]
        .as_array()
        .unwrap_or_else(|| panic!("no ports: {v}"))
        .iter()
        .map(|p| p.as_u64().unwrap() as u16)
        .collect()
}

#[test]
fn concurrent_two_port_leases_are_all_or_nothing() {
    // N leases of 2 ports at once on 2N+1 ports: all N succeed with distinct ports; the next
    // finds one port and takes none.
    const N: usize = 4;
    let e = Env::new("lease-multi", 62200, 62200 + 2 * N as u16);
    let targets: Vec<Cgroup> = (0..=N).map(|i| e.attach.child(&format!("m{i}"))).collect();
    let children: Vec<Child> = targets[..N]
        .iter()
        .map(|t| {
            let mut c = e.pg();
            c.args(["lease", "--count", "2", "--json", "--cgroup", t.path()]);
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    let mut all = Vec::new();
    for (c, t) in children.into_iter().zip(&targets) {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let ports = ports_of(&v);
        assert_eq!(ports.len(), 2, "{v}");
        assert_eq!(v["port"], ports[0], "{v}");
        for p in &ports {
            assert_eq!(
                e.lease_of(*p).unwrap()["cgroup"],
                t.path(),
                "port {p} leased to its lessee"
            );
        }
        all.extend(ports);
    }
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 2 * N, "distinct ports: {all:?}");
    let free: Vec<u16> = (e.first..=e.last).filter(|p| !all.contains(p)).collect();
    assert_eq!(free.len(), 1);
    // The next one: one port free, two asked for. Nothing stays claimed.
    let (code, _, err) = lease_json(&e, &["--count", "2", "--cgroup", targets[N].path()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        single_line(&err)
            .contains("2 ports asked for, only 1 free in 62200-62208/tcp (none was leased)"),
        "{err}"
    );
    assert_eq!(e.leases().len(), 2 * N);
    assert!(e.lease_of(free[0]).is_none());
    assert!(
        !alloc_marked(e.pin.path(), free[0]),
        "the rolled-back port is unmarked"
    );
    for p in &all {
        assert!(alloc_marked(e.pin.path(), *p), "{p} marked");
    }
    // The status table: one line per lessee, its ports together.
    let (code, table, err) = run(&["--pin-dir", e.pin.as_str(), "status"]);
    assert_eq!(code, 0, "{err}");
    assert!(table.contains("LEASED PORTS"), "{table}");
    for t in &targets[..N] {
        let st = status_json(e.pin.path());
        let g = st["lessees"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["cgroup"] == t.path())
            .cloned()
            .unwrap_or_else(|| panic!("{st:#}"));
        let ports: Vec<String> = g["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(ports.len(), 2, "{g}");
        let line = table
            .lines()
            .find(|l| l.ends_with(t.path()))
            .unwrap_or_else(|| panic!("no line for {}: {table}", t.path()));
        assert!(
            line.starts_with(&ports.join(" ")) && line.contains("release/rmdir"),
            "{line}"
        );
    }
    // Plain output: the ports space-separated on one line.
    let (code, out, err) = run(&[
        "--pin-dir",
        e.pin.as_str(),
        "release",
        "--cgroup",
        targets[0].path(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.is_empty());
    let (code, out, err) = run(&[
        "--pin-dir",
        e.pin.as_str(),
        "lease",
        "--count",
        "3",
        "--cgroup",
        targets[N].path(),
    ]);
    assert_eq!(code, 0, "{err}");
    let got: Vec<u16> = out.split_whitespace().map(|p| p.parse().unwrap()).collect();
    assert_eq!(got.len(), 3, "{out:?}");
    assert_eq!(out.lines().count(), 1, "{out:?}");
}

#[test]
fn spawn_count_substitutes_each_port() {
    let e = Env::new("lease-spawn2", 62220, 62229);
    let mut c = e.pg();
    c.args([
        "spawn",
        "--count",
        "2",
        "--json",
        "--name",
        "svm",
        "--",
        "/bin/sh",
        "-c",
        "echo first={port} a={port0} b={port1}",
    ]);
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let v: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    let ports = ports_of(&v);
    assert_eq!(ports, vec![62220, 62221], "{v}");
    assert_eq!(v["port"], 62220);
    assert_eq!(lines.next(), Some("first=62220 a=62220 b=62221"));
    // The VM exited: both end with its cgroup.
    let gone = wait_until(Duration::from_secs(10), || {
        e.leases().is_empty().then_some(())
    });
    assert!(gone.is_some(), "{:?}", e.leases());
}

#[test]
fn a_plain_lease_outlives_its_processes_and_until_empty_does_not() {
    let e = Env::new("lease-life", 62240, 62249);
    let plain = e.attach.child("orch-plain");
    let ue = e.attach.child("orch-ue");
    let (code, v, err) = lease_json(&e, &["--cgroup", plain.path()]);
    assert_eq!(code, 0, "{err}");
    let p_plain = v["port"].as_u64().unwrap() as u16;
    let (code, v, err) = lease_json(&e, &["--cgroup", ue.path(), "--until-empty"]);
    assert_eq!(code, 0, "{err}");
    let p_ue = v["port"].as_u64().unwrap() as u16;
    assert_eq!(v["until_empty"], true);
    assert_eq!(e.lease_of(p_ue).unwrap()["until_empty"], true);
    assert_eq!(e.lease_of(p_plain).unwrap()["until_empty"], false);
    // A short-lived process in each lessee's subtree binds its port and exits (a probe, a qemu
    // restarted for a retry).
    for (cg, port) in [(&plain, p_plain), (&ue, p_ue)] {
        let child = cg.child("qemu");
        assert_eq!(bind_in(&child, &BindSpec::tcp(ANY4, port)), Ok(()));
    }
    // --until-empty: over within seconds of the exit. Plain: still leased, still refused to
    // others, for as long as we look.
    let ended = wait_until(Duration::from_secs(10), || {
        e.lease_of(p_ue).is_none().then_some(())
    });
    assert!(
        ended.is_some(),
        "--until-empty lease kept: {:?}",
        e.leases()
    );
    e.daemon().wait_for(
        &format!(
            "lease ended: port={p_ue} cgroup={}/orch-ue ({}/orch-ue has no process left)",
            e.attach.path(),
            e.attach.path()
        ),
        LOG_TIMEOUT,
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        e.lease_of(p_plain)
            .expect("the plain lease outlives its processes")["cgroup"],
        plain.path()
    );
    assert_eq!(
        bind_in(&e.allowed, &BindSpec::tcp(ANY4, p_plain)),
        Err(expected_errno()),
        "still refused to the allowed cgroup"
    );
    // And the lessee binds it again (the retry).
    assert_eq!(
        bind_in(plain.child("qemu"), &BindSpec::tcp(ANY6, p_plain)),
        Ok(())
    );
    // rmdir of the lessee ends it.
    let _ = std::fs::remove_dir(plain.child("qemu").abs());
    std::fs::remove_dir(plain.abs()).unwrap();
    let ended = wait_until(Duration::from_secs(10), || {
        e.lease_of(p_plain).is_none().then_some(())
    });
    assert!(ended.is_some(), "{:?}", e.leases());
    let ended = &status_json(e.pin.path())["leases_ended"];
    assert_eq!(
        (
            &ended["emptied"],
            &ended["cgroup_removed"],
            &ended["expired"]
        ),
        (&Value::from(1), &Value::from(1), &Value::from(0)),
        "{ended}"
    );
}

#[test]
fn a_ttl_ends_a_lease_also_across_a_daemon_restart_and_renew_keeps_it() {
    let mut e = Env::new("lease-ttl", 62260, 62269);
    let a = e.attach.child("ttl-a");
    let b = e.attach.child("ttl-b");
    let c = e.attach.child("ttl-c");
    let (code, v, err) = lease_json(&e, &["--cgroup", a.path(), "--ttl", "2s"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(v["ttl_secs"], 2);
    let pa = v["port"].as_u64().unwrap() as u16;
    let left = e.lease_of(pa).unwrap()["expires_in_secs"].as_u64().unwrap();
    assert!(left <= 2, "{left}");
    let t = Instant::now();
    let ended = wait_until(Duration::from_secs(10), || {
        e.lease_of(pa).is_none().then_some(t.elapsed())
    });
    let took = ended.unwrap_or_else(|| panic!("TTL lease kept: {:?}", e.leases()));
    eprintln!(
        "[measure] a 2 s TTL lease ended {} ms after it was made",
        took.as_millis()
    );
    assert!(took >= Duration::from_millis(1000), "{took:?}");
    e.daemon().wait_for(
        &format!(
            "lease ended: port={pa} cgroup={}/ttl-a (its TTL ran out)",
            e.attach.path()
        ),
        LOG_TIMEOUT,
    );

    // Renewed before it runs out: kept past the first TTL, ended after the second.
    let (code, v, err) = lease_json(&e, &["--cgroup", b.path(), "--ttl", "3s"]);
    assert_eq!(code, 0, "{err}");
    let pb = v["port"].as_u64().unwrap() as u16;
    std::thread::sleep(Duration::from_secs(2));
    let (code, v, err) = lease_json(&e, &["--cgroup", b.path(), "--renew", "--ttl", "4s"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ports_of(&v), vec![pb]);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        e.lease_of(pb).is_some(),
        "renewed lease ended at its first TTL"
    );
    let ended = wait_until(Duration::from_secs(8), || {
        e.lease_of(pb).is_none().then_some(())
    });
    assert!(ended.is_some(), "{:?}", e.leases());
    // Renewing what is not there, or another's lease: one line, exit 1.
    let (code, _, err) = lease_json(&e, &["--cgroup", b.path(), "--renew", "--ttl", "4s"]);
    assert_eq!(code, 1);
    assert!(
        single_line(&err).contains("holds no lease to renew"),
        "{err}"
    );

    // Across a daemon stop: the expiry is in the kernel map, the next daemon ends it at start.
    let (code, v, err) = lease_json(&e, &["--cgroup", c.path(), "--ttl", "2s"]);
    assert_eq!(code, 0, "{err}");
    let pc = v["port"].as_u64().unwrap() as u16;
    e.daemon.as_mut().unwrap().signal(libc::SIGTERM);
    e.daemon = None;
    std::thread::sleep(Duration::from_secs(3));
    let st = status_json(e.pin.path());
    let l = st["leases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["port"] == pc)
        .cloned();
    assert_eq!(
        l.unwrap_or_else(|| panic!("{st:#}"))["expires_in_secs"],
        0,
        "run out, no daemon to end it"
    );
    assert_eq!(
        bind_in(&e.allowed, &BindSpec::tcp(ANY4, pc)),
        Err(expected_errno_without_sentinel())
    );
    e.start_daemon();
    let ended = wait_until(Duration::from_secs(5), || {
        e.lease_of(pc).is_none().then_some(())
    });
    assert!(ended.is_some(), "{:?}", e.leases());
    let ended = &status_json(e.pin.path())["leases_ended"];
    assert_eq!(ended["expired"], 3, "{ended}");
    // Bad durations: one line naming the value, exit 2.
    for bad in ["0s", "10x", "366d", "m"] {
        let (code, _, err) = run(&[
            "--pin-dir",
            e.pin.as_str(),
            "lease",
            "--cgroup",
            c.path(),
            "--ttl",
            bad,
        ]);
        assert_eq!(code, 2, "{bad}: {err}");
        assert!(err.contains(&format!("\"{bad}\"")), "{err}");
    }
}

/// Lease/kill cycles of an orchestrator that never releases (PG_LEASE_CYCLES, default 1,000).
#[test]
fn an_orchestrator_that_never_releases_leaves_nothing_after_the_ttl() {
    let cycles: usize = std::env::var("PG_LEASE_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let e = Env::new("lease-leak", 62300, 62339);
    let lessees: Vec<Cgroup> = (0..8)
        .map(|i| e.attach.child(&format!("orch{i}")))
        .collect();
    let mut seed = u64::from(std::process::id());
    let mut rnd = move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    // How long one `lease` takes here (a VM under TCG is ~10x slower): the kills land anywhere
    // from before its claim to after its exit.
    let t = Instant::now();
    let (code, out, err) = run(&[
        "--pin-dir",
        e.pin.as_str(),
        "lease",
        "--cgroup",
        lessees[0].path(),
    ]);
    assert_eq!(code, 0, "{err}");
    let one = t.elapsed();
    let (code, _, err) = run(&["--pin-dir", e.pin.as_str(), "release", "--port", out.trim()]);
    assert_eq!(code, 0, "{err}");
    let window_us = (2 * one.as_micros()).max(1000) as u64;
    let (mut made, mut killed, mut refused) = (0, 0, 0);
    let t = Instant::now();
    for i in 0..cycles {
        let mut c = e.pg();
        c.args([
            "lease",
            "--ttl",
            "3s",
            "--cgroup",
            lessees[i % lessees.len()].path(),
        ]);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = c.spawn().unwrap();
        // Killed at a random moment: before, during or after its claim.
        std::thread::sleep(Duration::from_micros(rnd(window_us)));
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let out = child.wait_with_output().unwrap();
        match out.status.code() {
            Some(0) => made += 1,
            Some(_) => {
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(err.contains("no free port"), "cycle {i}: {err}");
                refused += 1;
            }
            None => killed += 1,
        }
    }
    eprintln!(
        "[measure] {cycles} lease/kill cycles in {} s (one lease: {} ms, kills within {} ms): {made} completed, {killed} killed, {refused} refused (range full)",
        t.elapsed().as_secs(),
        one.as_millis(),
        window_us / 1000
    );
    // After the TTL (and the reaping of the scratch claims of killed ones): nothing left.
    let clean = wait_until(Duration::from_secs(15), || {
        let leases = e.leases();
        let marked: Vec<u16> = (e.first..=e.last)
            .filter(|p| alloc_marked(e.pin.path(), *p))
            .collect();
        (leases.is_empty() && marked.is_empty()).then_some(())
    });
    assert!(
        clean.is_some(),
        "left: leases {:?}, marked {:?}",
        e.leases(),
        (e.first..=e.last)
            .filter(|p| alloc_marked(e.pin.path(), *p))
            .collect::<Vec<_>>()
    );
    assert!(
        made > 0,
        "no lease completed: the kill came too soon every time"
    );
}
