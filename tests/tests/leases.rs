//! Leases, end to end: atomic allocation under concurrency (one port or several at once, all or
//! nothing), the lease map deciding when the allocators' bitmap is wrong, and how a lease ends:
//! its cgroup removed, emptied (`--until-empty`), its TTL run out (also across a daemon restart),
//! renewed, or an orchestrator killed at every moment of `lease` and never releasing.
//!
//! Layout per test: `/pg-test-<test>-<pid>` is the attach cgroup with children `allowed`,
//! `outsider` and `spawn` (the spawn parent: see `integration_tests::LeaseEnv`); its own pin dir,
//! config file and ports in 62000-62999. Needs root and the agent built.

use std::{
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use integration_tests::*;
use serde_json::Value;

#[test]
fn concurrent_leases_are_distinct_and_the_extra_one_is_refused() {
    let e = LeaseEnv::new("lease-conc", 62000, 62007);
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
    let (code, _, err) = e.run(&["release", "--port", "62003"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(e.lease(&targets[0]), 62003);
}

#[test]
fn the_lease_map_decides_when_the_allocators_bitmap_is_wrong() {
    // The bitmap only proposes ports; the claim (BPF_NOEXIST on the lease map) decides. Both
    // ways the bitmap can be wrong after a crash are made by hand here.
    let mut e = LeaseEnv::new("lease-bits", 62140, 62143);
    let c: Vec<Cgroup> = (0..4).map(|i| e.attach.child(&format!("b{i}"))).collect();
    // Lowest port first, and marked.
    assert_eq!(e.lease(&c[0]), 62140);
    assert!(alloc_marked(e.pin.path(), 62140));
    // A lease the bitmap does not show (its allocator died between claim and mark): the next
    // allocation fails to claim it, marks it, and takes the next port.
    set_alloc_mark(e.pin.path(), 62140, false);
    assert_eq!(e.lease(&c[1]), 62141);
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
    assert_eq!(e.lease(&c[2]), 62143);
    let (code, _, err) = e.run(&["lease", "--cgroup", c[3].path()]);
    assert_eq!(code, 1, "every port marked: no free port ({err})");
    assert!(err.contains("no free port"), "{err}");
    assert!(get_lease(e.pin.path(), 62142).is_none());
    e.stop_daemon();
    e.start_daemon();
    let cleared = wait_until(Duration::from_secs(5), || {
        (!alloc_marked(e.pin.path(), 62142)).then_some(())
    });
    assert!(
        cleared.is_some(),
        "the daemon clears the stale mark when it starts"
    );
    assert_eq!(e.lease(&c[3]), 62142);
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
fn four_allocators_racing_fill_a_100_port_range_exactly_once() {
    // Four threads each run `port-guard lease` until it says "no free port": the shared bitmap
    // and the claims must hand every port out once, to nobody twice, and leave every port marked.
    let e = LeaseEnv::new("lease-race", 62500, 62599);
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
fn concurrent_two_port_leases_are_all_or_nothing() {
    // N leases of 2 ports at once on 2N+1 ports: all N succeed with distinct ports; the next
    // finds one port and takes none.
    const N: usize = 4;
    let e = LeaseEnv::new("lease-multi", 62200, 62200 + 2 * N as u16);
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
    let (code, _, err) = e.lease_json(&["--count", "2", "--cgroup", targets[N].path()]);
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
    let (code, table, err) = e.run(&["status"]);
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
    let (code, out, err) = e.run(&["release", "--cgroup", targets[0].path()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.is_empty());
    let (code, out, err) = e.run(&["lease", "--count", "3", "--cgroup", targets[N].path()]);
    assert_eq!(code, 0, "{err}");
    let got: Vec<u16> = out.split_whitespace().map(|p| p.parse().unwrap()).collect();
    assert_eq!(got.len(), 3, "{out:?}");
    assert_eq!(out.lines().count(), 1, "{out:?}");
}

#[test]
fn a_lease_ends_within_seconds_of_its_cgroup_being_removed() {
    // A lease made by `lease --cgroup` (not spawn): the daemon learns of it from the allocators'
    // generation counter on its next tick, and of the removal from inotify or that tick.
    let e = LeaseEnv::new("lease-rm", 62150, 62151);
    let target = e.attach.child("target");
    let port = e.lease(&target);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        e.lease_of(port).is_some(),
        "a live, empty lessee keeps its lease"
    );
    let t = Instant::now();
    std::fs::remove_dir(target.abs()).unwrap();
    assert!(
        e.wait_lease_ended(port, Duration::from_secs(10)),
        "lease not ended: {:?}",
        e.leases()
    );
    let ended = t.elapsed();
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
fn a_plain_lease_outlives_its_processes_and_until_empty_does_not() {
    let e = LeaseEnv::new("lease-life", 62240, 62249);
    let plain = e.attach.child("orch-plain");
    let ue = e.attach.child("orch-ue");
    let (code, v, err) = e.lease_json(&["--cgroup", plain.path()]);
    assert_eq!(code, 0, "{err}");
    let p_plain = v["port"].as_u64().unwrap() as u16;
    let (code, v, err) = e.lease_json(&["--cgroup", ue.path(), "--until-empty"]);
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
    assert!(
        e.wait_lease_ended(p_ue, Duration::from_secs(10)),
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
    assert!(
        e.wait_lease_ended(p_plain, Duration::from_secs(10)),
        "{:?}",
        e.leases()
    );
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
    let mut e = LeaseEnv::new("lease-ttl", 62260, 62269);
    let a = e.attach.child("ttl-a");
    let b = e.attach.child("ttl-b");
    let c = e.attach.child("ttl-c");
    let (code, v, err) = e.lease_json(&["--cgroup", a.path(), "--ttl", "2s"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(v["ttl_secs"], 2);
    let pa = v["port"].as_u64().unwrap() as u16;
    let left = e.lease_of(pa).unwrap()["expires_in_secs"].as_u64().unwrap();
    assert!(left <= 2, "{left}");
    let t = Instant::now();
    assert!(
        e.wait_lease_ended(pa, Duration::from_secs(10)),
        "TTL lease kept: {:?}",
        e.leases()
    );
    let took = t.elapsed();
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
    let (code, v, err) = e.lease_json(&["--cgroup", b.path(), "--ttl", "3s"]);
    assert_eq!(code, 0, "{err}");
    let pb = v["port"].as_u64().unwrap() as u16;
    std::thread::sleep(Duration::from_secs(2));
    let (code, v, err) = e.lease_json(&["--cgroup", b.path(), "--renew", "--ttl", "4s"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ports_of(&v), vec![pb]);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        e.lease_of(pb).is_some(),
        "renewed lease ended at its first TTL"
    );
    assert!(
        e.wait_lease_ended(pb, Duration::from_secs(8)),
        "{:?}",
        e.leases()
    );
    // Renewing what is not there, or another's lease: one line, exit 1.
    let (code, _, err) = e.lease_json(&["--cgroup", b.path(), "--renew", "--ttl", "4s"]);
    assert_eq!(code, 1);
    assert!(
        single_line(&err).contains("holds no lease to renew"),
        "{err}"
    );

    // Across a daemon stop: the expiry is in the kernel map, the next daemon ends it at start.
    let (code, v, err) = e.lease_json(&["--cgroup", c.path(), "--ttl", "2s"]);
    assert_eq!(code, 0, "{err}");
    let pc = v["port"].as_u64().unwrap() as u16;
    e.stop_daemon();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        e.lease_of(pc)
            .unwrap_or_else(|| panic!("{:#}", status_json(e.pin.path())))["expires_in_secs"],
        0,
        "run out, no daemon to end it"
    );
    assert_eq!(
        bind_in(&e.allowed, &BindSpec::tcp(ANY4, pc)),
        Err(expected_errno_without_sentinel())
    );
    e.start_daemon();
    assert!(
        e.wait_lease_ended(pc, Duration::from_secs(5)),
        "{:?}",
        e.leases()
    );
    let ended = &status_json(e.pin.path())["leases_ended"];
    assert_eq!(ended["expired"], 3, "{ended}");
    // Bad durations: one line naming the value, exit 2.
    for bad in ["0s", "10x", "366d", "m"] {
        let (code, _, err) = e.run(&["lease", "--cgroup", c.path(), "--ttl", bad]);
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
    let e = LeaseEnv::new("lease-leak", 62300, 62339);
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
    let port = e.lease(&lessees[0]);
    let one = t.elapsed();
    let (code, _, err) = e.run(&["release", "--port", &port.to_string()]);
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
