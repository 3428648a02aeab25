//! The guard when things go wrong: kill -9 at random instants, spawn churn, every bind trick a
//! process might use, and unprivileged users.
//!
//! Ports: 62600-62699, plus 49152 and 192 (the byte-order pair) bound only inside a network
//! namespace the test creates.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::process::CommandExt as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{netns::TestNetns, *};

/// xorshift: reproducible "random" instants (the seed is printed).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn bpftool_has_progs(cg: &Cgroup) -> Option<bool> {
    bpftool_cgroup_progs(cg).map(|out| out.contains("bind4") || out.contains("bind6"))
}

#[test]
fn kill9_at_random_instants_leaves_the_guard_whole_or_absent_and_leases_survive() {
    // Kills (PG_KILLS, default 50; the VM runs fewer: each start there costs seconds under TCG).
    let kills: usize = std::env::var("PG_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let cg = TestCgroup::new("crash");
    let allowed = cg.child("allowed");
    let outsider = cg.child("outsider");
    let vm = cg.child("vm");
    let _vm_process = hold_in(&vm);
    let pin = PinDir::new("crash");
    let tmp = TempDir::new("crash");
    let config = tmp.write("config.toml", "errno = \"eperm\"\n");
    let args: Vec<String> = [
        "--attach",
        cg.path(),
        "--reserve",
        "62600-62609",
        "--allow",
        allowed.path(),
        "--spawn-parent",
        &format!("{}/spawn", cg.path()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let seed = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    eprintln!("[crash] seed {seed:#x}");
    let mut rng = Rng(seed);
    // Kill instants span a whole start, from before the load to after the attach: measured here,
    // not assumed (a debug build attaches in about 200 ms on the host, a release build under TCG
    // in a VM in about 600 ms).
    let window_us = {
        let t = Instant::now();
        let mut d = Daemon::start(pin.path(), &config, &args);
        d.wait_for("guard enforcing", START_TIMEOUT);
        let took = t.elapsed();
        d.kill9();
        let (code, _, err) = run(&["--pin-dir", pin.as_str(), "unload"]);
        assert_eq!(code, 0, "{err}");
        (took.as_micros() as u64 * 3 / 2).max(300_000)
    };
    eprintln!("[crash] kill instants in 0..{} ms", window_us / 1000);
    let mut ever_attached = false;
    let mut lease: Option<u16> = None;
    let (mut enforcing, mut absent, mut reload_kills) = (0, 0, 0);
    // The first kills hit first loads (whatever an earlier kill left is unloaded first); the
    // rest hit restarts that adopt the pins, and reloads.
    const FIRST_LOADS: usize = 15;
    for i in 0..kills {
        if i < FIRST_LOADS && pin.exists() {
            let (code, _, err) = run(&["--pin-dir", pin.as_str(), "unload"]);
            assert_eq!(code, 0, "{err}");
            ever_attached = false;
        }
        let mut d = Daemon::start(pin.path(), &config, &args);
        let reload = ever_attached && i >= FIRST_LOADS && i % 2 == 1;
        if reload {
            // Kill during a SIGHUP reload.
            d.wait_for("guard enforcing", START_TIMEOUT);
            unsafe { libc::kill(d.pid(), libc::SIGHUP) };
            std::thread::sleep(Duration::from_micros(rng.next() % 20_000));
            reload_kills += 1;
        } else {
            // Anywhere from before the load to after the attach.
            std::thread::sleep(Duration::from_micros(rng.next() % window_us));
        }
        d.kill9();
        let links = ["link_bind4", "link_bind6"].map(|l| pin.path().join(l).exists());
        let v4 = bind_in(&outsider, &BindSpec::tcp(ANY4, 62601));
        let v6 = bind_in(&outsider, &BindSpec::tcp(ANY6, 62602));
        match (links, v4, v6) {
            ([true, true], Err(libc::EPERM), Err(libc::EPERM)) => {
                enforcing += 1;
                ever_attached = true;
                assert_eq!(
                    bind_in(&allowed, &BindSpec::tcp(ANY4, 62601)),
                    Ok(()),
                    "kill {i}: allowed cgroup"
                );
            }
            ([false, false], Ok(()), Ok(())) if !ever_attached => {
                absent += 1;
                assert_ne!(
                    bpftool_has_progs(&cg),
                    Some(true),
                    "kill {i}: programs attached without pins"
                );
            }
            other => panic!(
                "kill {i} (reload: {reload}): partial state {other:?}; daemon said:\n{}",
                d.lines().join("\n")
            ),
        }
        if ever_attached && lease.is_none() && i >= FIRST_LOADS {
            let (code, out, err) =
                run(&["--pin-dir", pin.as_str(), "lease", "--cgroup", vm.path()]);
            assert_eq!(code, 0, "{err}");
            lease = Some(out.trim().parse().unwrap());
        }
        if let Some(port) = lease {
            let l = get_lease(pin.path(), port)
                .unwrap_or_else(|| panic!("kill {i}: the lease of a live cgroup is gone"));
            assert_eq!(l.cgroup_id, vm.id());
        }
    }
    // The next start succeeds and adopts.
    let d = Daemon::start(pin.path(), &config, &args);
    d.wait_for("guard enforcing", START_TIMEOUT);
    assert!(d.lines().iter().any(|l| l.contains("adopted")));
    eprintln!("[measure] crash safety: {kills} kills ({reload_kills} during reloads): {enforcing} left it enforcing, {absent} left nothing attached (first load), 0 partial");
    assert!(enforcing > 0 && absent + enforcing == kills);
}

/// `port-guard spawn -- /bin/true` on the pins of `pin`.
fn spawn_true(pin: &PinDir) -> std::process::Output {
    Command::new(bin())
        .args(["--pin-dir", pin.as_str(), "spawn", "--", "/bin/true"])
        .output()
        .unwrap()
}

#[test]
fn spawn_churn_leaves_no_lease_cgroup_pin_or_fd_behind_and_daemon_memory_flat() {
    let cycles: usize = std::env::var("PG_CHURN_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let cg = TestCgroup::new("churn");
    let pin = PinDir::new("churn");
    let tmp = TempDir::new("churn");
    let config = tmp.write("config.toml", "errno = \"eperm\"\n");
    let spawn_parent = format!("{}/spawn", cg.path());
    let d = Daemon::start(
        pin.path(),
        &config,
        &[
            "--attach",
            cg.path(),
            "--reserve",
            "62620-62629",
            "--spawn-parent",
            &spawn_parent,
        ],
    );
    d.wait_for("guard enforcing", START_TIMEOUT);
    let rss = |pid: i32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap())
            })
            .unwrap()
    };
    let fds = |pid: i32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let pins = || std::fs::read_dir(pin.path()).unwrap().count();
    let (rss0, fds0, pins0) = (rss(d.pid()), fds(d.pid()), pins());
    let t = Instant::now();
    let (mut rss_mid, mut fds_mid, mut rss_half) = (0, 0, 0);
    for i in 0..cycles {
        // Ten ports, and the daemon reaps each VM a moment after it exits: on a loaded machine
        // the next spawn may come first and find every port leased. It waits for the reaper
        // (what the test is about is that nothing leaks, not that the reaper outruns spawn).
        let mut out = spawn_true(&pin);
        let t0 = Instant::now();
        while !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("no free port")
            && t0.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(20));
            out = spawn_true(&pin);
        }
        assert!(
            out.status.success(),
            "cycle {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if i == cycles / 10 {
            rss_mid = rss(d.pid());
            fds_mid = fds(d.pid());
        }
        if i == cycles * 11 / 20 {
            rss_half = rss(d.pid());
        }
    }
    let elapsed = t.elapsed();
    let spawn_dir = cg.abs().join("spawn");
    let settled = wait_until(Duration::from_secs(15), || {
        let leases = status_json(pin.path())["leases"]
            .as_array()
            .map(|a| a.len())
            .unwrap_or(1);
        let cgroups = std::fs::read_dir(&spawn_dir)
            .unwrap()
            .flatten()
            .filter(|e| e.path().is_dir())
            .count();
        (leases == 0 && cgroups == 0).then_some(())
    });
    assert!(
        settled.is_some(),
        "leases or cgroups left: {}",
        status_json(pin.path())["leases"]
    );
    let (rss1, fds1, pins1) = (rss(d.pid()), fds(d.pid()), pins());
    eprintln!(
        "[measure] churn: {cycles} spawn/exit cycles in {:.1} s ({:.2} ms each); daemon RSS {rss0} kB at start, {rss_mid} kB after 10%, {rss_half} kB after 55%, {rss1} kB after all; fds {fds0} -> {fds_mid} -> {fds1}; pins {pins0} -> {pins1}",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1000.0 / cycles as f64
    );
    // The count at `guard enforcing` races with the daemon opening its watches right after that
    // line (seen on 5.10 in a VM: 22 then, 26 for good); a leak grows with the cycles.
    assert!(
        fds1 <= fds_mid,
        "daemon fds leaked: {fds0} at start, {fds_mid} after 10%, {fds1} after all"
    );
    assert_eq!(pins1, pins0, "pins left behind");
    // Flat after the first 10% of cycles. A leak grows with the cycles, so in both halves of
    // the rest; an allocator's one-time step (seen once in a while in the VMs: +1,040 kB, in one
    // half only) does not. Either half over 256 kB and the other too is a leak, and so is more
    // than 2 MiB in all.
    let (g1, g2) = (
        rss_half.saturating_sub(rss_mid.max(rss0)),
        rss1.saturating_sub(rss_half),
    );
    assert!(
        !(g1 > 256 && g2 > 256) && g1 + g2 <= 2048,
        "daemon memory grew: {rss0} -> {rss_mid} -> {rss_half} -> {rss1} kB"
    );
}

/// `pg-bind VARIANT PROTO ADDR PORT` in `cg` (and `ns`): Ok or the errno.
fn pg_bind(
    cg: &Cgroup,
    ns: Option<&TestNetns>,
    variant: &str,
    proto: &str,
    addr: &str,
    port: u16,
) -> Result<(), i32> {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pg-bind"));
    c.args([variant, proto, addr, &port.to_string()]);
    match ns {
        Some(ns) => ns.enter(&mut c, Some(cg)),
        None => integration_tests::netns::enter_cgroup(&mut c, cg),
    }
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success(),
        "pg-bind {variant}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match text.strip_prefix("errno ") {
        Some(e) => Err(e.parse().unwrap()),
        None if text == "ok" => Ok(()),
        None => panic!("pg-bind printed {text:?}"),
    }
}

#[test]
fn every_bind_trick_from_an_outsider_is_refused() {
    let ns = TestNetns::new("tricks");
    let cg = TestCgroup::new("tricks");
    let outsider = cg.child("outsider");
    let allowed = cg.child("allowed");
    // A process of the outsider cgroup that exists before the guard does.
    let mut early = Command::new(env!("CARGO_BIN_EXE_pg-bind"));
    early
        .args(["wait", "tcp", "0.0.0.0", "62641"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    ns.enter(&mut early, Some(&outsider));
    let mut early = early.spawn().unwrap();

    let pin = PinDir::new("tricks");
    let tmp = TempDir::new("tricks");
    let config = tmp.write("config.toml", "errno = \"eperm\"\n");
    let mut c = ns.command(bin());
    c.arg("--pin-dir")
        .arg(pin.path())
        .arg("--config")
        .arg(&config)
        .args([
            "daemon",
            "--attach",
            cg.path(),
            "--reserve",
            "62640-62649/tcp+udp",
            "--reserve",
            "49152",
            "--allow",
            allowed.path(),
            "--spawn-parent",
            &format!("{}/spawn", cg.path()),
            // Bind tricks only: the sysctl is the ephemeral tests' subject.
            "--no-protect-ephemeral",
        ]);
    let d = Daemon::spawn(c);
    d.wait_for("guard enforcing", START_TIMEOUT);

    let b = |variant: &str, proto: &str, addr: &str, port: u16| {
        pg_bind(&outsider, Some(&ns), variant, proto, addr, port)
    };
    let refused = Err(libc::EPERM);
    for (variant, proto, addr) in [
        ("plain", "tcp", "0.0.0.0"),
        ("reuseaddr", "tcp", "0.0.0.0"),
        ("reuseport", "tcp", "::"),
        ("freebind", "tcp", "192.0.2.1"),
        ("freebind", "tcp", "2001:db8::1"),
        ("plain", "tcp", "127.0.0.1"),
        ("plain", "tcp", "::1"),
        ("freebind", "tcp", "fe80::1%lo"),
        ("plain", "tcp", "::ffff:127.0.0.1"),
        ("thread", "tcp", "::"),
        ("plain", "udp", "0.0.0.0"),
        ("reuseport", "udp", "::"),
        ("plain", "udp", "::ffff:127.0.0.1"),
    ] {
        assert_eq!(
            b(variant, proto, addr, 62640),
            refused,
            "{variant} {proto} {addr}"
        );
    }
    // Forked before the guard loaded, binding after: refused too.
    writeln!(early.stdin.take().unwrap()).unwrap();
    let mut line = String::new();
    BufReader::new(early.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    early.wait().unwrap();
    assert_eq!(
        line.trim(),
        format!("errno {}", libc::EPERM),
        "a process older than the guard"
    );
    // Byte order: 49152 is 0xC000; byte-swapped it is 192. The guard must refuse the one and
    // leave the other alone.
    assert_eq!(b("plain", "tcp", "0.0.0.0", 49152), refused);
    assert_eq!(b("plain", "tcp", "0.0.0.0", 192), Ok(()));
    // Controls: the allowed cgroup binds the same way, and ports outside the range are free.
    assert_eq!(
        pg_bind(&allowed, Some(&ns), "reuseport", "udp", "::", 62640),
        Ok(())
    );
    assert_eq!(b("plain", "tcp", "0.0.0.0", 62650), Ok(()));
    // SCTP has a port space of its own: a reserved TCP/UDP port bound over SCTP conflicts with
    // neither, and the guard (which checks tcp, mptcp and udp) lets it through.
    match b("plain", "sctp", "0.0.0.0", 62640) {
        Err(e) if e == libc::EPROTONOSUPPORT || e == libc::ESOCKTNOSUPPORT => {
            skip_part("SCTP is not available on this kernel (no sctp module)")
        }
        other => assert_eq!(other, Ok(()), "SCTP binds pass the guard (own port space)"),
    }
}

#[test]
fn unprivileged_users_cannot_lease_release_unload_read_pins_or_join_allowed_cgroups() {
    let cg = TestCgroup::new("nonroot");
    let allowed = cg.child("allowed");
    let pin = PinDir::new("nonroot");
    let tmp = TempDir::new("nonroot");
    let config = tmp.write("config.toml", "errno = \"eperm\"\n");
    let d = Daemon::start(
        pin.path(),
        &config,
        &[
            "--attach",
            cg.path(),
            "--reserve",
            "62660-62669",
            "--allow",
            allowed.path(),
            "--spawn-parent",
            &format!("{}/spawn", cg.path()),
        ],
    );
    d.wait_for("guard enforcing", START_TIMEOUT);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(pin.path()).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o700, "pin dir mode");
    let as_nobody = |args: &[&str]| {
        let mut c = Command::new(bin());
        c.arg("--pin-dir")
            .arg(pin.path())
            .args(args)
            .uid(65534)
            .gid(65534);
        run_cmd(c)
    };
    for args in [
        vec!["spawn", "--", "/bin/true"],
        vec!["lease", "--cgroup", allowed.path()],
        vec!["release", "--port", "62660"],
        vec!["unload"],
        vec!["status"],
    ] {
        let (code, _, err) = as_nobody(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        let line = single_line(&err);
        assert!(
            line.to_lowercase().contains("permission denied"),
            "{args:?}: {line}"
        );
    }
    assert!(
        pin.exists() && status_json(pin.path())["attached"] == true,
        "the guard is untouched"
    );
    // Joining an allowed cgroup needs write access to its cgroup.procs: root's.
    let mut c = Command::new("sh");
    c.args([
        "-c",
        &format!("echo $$ > {}/cgroup.procs", allowed.abs().display()),
    ])
    .uid(65534)
    .gid(65534);
    let (code, _, err) = run_cmd(c);
    assert_ne!(code, 0, "nobody moved itself into an allowed cgroup: {err}");
}
