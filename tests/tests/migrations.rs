//! Real qemu live migrations to ports handed out by `spawn` while a hostile process keeps trying
//! to take every port of the range, compared with the same race without the guard (libvirt's
//! way: probe a free port, then start qemu on it).
//!
//! Layout: `/pg-test-migrate-<pid>` is the attach cgroup with children `allowed`, `outsider`
//! (the hostile binder) and `spawn` (the spawn parent: see `integration_tests::LeaseEnv`); its
//! own pin dir, config file and ports 62100-62115. Needs root, the agent built and
//! qemu-system-x86_64 (skipped without).

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{qemu, *};
use serde_json::Value;

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
    let mut e = LeaseEnv::new("migrate", 62100, 62115);
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
    e.stop_daemon();
    let (code, _, err) = e.run(&["unload"]);
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
