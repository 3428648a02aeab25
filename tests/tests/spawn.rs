//! `spawn`, end to end: who may bind a spawned VM's port, what `spawn` prints (`--json`,
//! `{port}`, `--count`), and the reaper: the lease and cgroup end when the VM exits while the
//! daemon runs, and are reaped at daemon start when it exited without one; cgroups a killed
//! spawn abandoned are removed, fresh or busy ones kept.
//!
//! Layout per test: `/pg-test-<test>-<pid>` is the attach cgroup with children `allowed`,
//! `outsider` and `spawn` (the spawn parent: see `integration_tests::LeaseEnv`); its own pin dir,
//! config file and ports in 62000-62999. Needs root and the agent built.

use std::time::{Duration, Instant};

use integration_tests::*;

fn sh(cmd: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), cmd.into()]
}

#[test]
fn a_spawned_port_is_refused_to_other_vms_allowed_cgroups_and_outsiders() {
    let e = LeaseEnv::new("lease-who", 62020, 62029);
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
    let (code, _, err) = e.run(&["spawn", "--port", &p, "--", "/bin/true"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("port {port} is already leased to {}", vm1.path())),
        "{err}"
    );
    let (code, _, err) = e.run(&["spawn", "--port", "61999", "--", "/bin/true"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("61999") && err.contains("62020-62029"),
        "{err}"
    );
    let (code, _, err) = e.run(&["spawn", "--name", "a/b", "--", "/bin/true"]);
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
fn spawn_json_names_port_pid_and_cgroup() {
    let e = LeaseEnv::new("lease-json", 62060, 62069);
    let (v, rest) = e.spawn_json_to_end(&["--name", "jvm"], "echo arg={port}");
    let port = v["port"].as_u64().unwrap();
    assert!((62060..=62069).contains(&port), "{v}");
    assert_eq!(v["cgroup"], format!("{}/jvm", e.spawn_parent.path()));
    assert!(v["pid"].as_u64().unwrap() > 1);
    assert_eq!(
        rest.lines().next(),
        Some(format!("arg={port}").as_str()),
        "{{port}} replaced in the command"
    );
}

#[test]
fn spawn_count_substitutes_each_port() {
    let e = LeaseEnv::new("lease-spawn2", 62220, 62229);
    let (v, rest) = e.spawn_json_to_end(
        &["--count", "2", "--name", "svm"],
        "echo first={port} a={port0} b={port1}",
    );
    let ports = ports_of(&v);
    assert_eq!(ports, vec![62220, 62221], "{v}");
    assert_eq!(v["port"], 62220);
    assert_eq!(rest.lines().next(), Some("first=62220 a=62220 b=62221"));
    // The VM exited: both end with its cgroup.
    let gone = wait_until(Duration::from_secs(10), || {
        e.leases().is_empty().then_some(())
    });
    assert!(gone.is_some(), "{:?}", e.leases());
}

#[test]
fn lease_and_cgroup_end_when_the_vm_exits_while_the_daemon_runs() {
    let e = LeaseEnv::new("lease-end", 62040, 62049);
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
fn leases_of_vms_that_ended_without_a_daemon_are_reaped_when_it_starts() {
    let mut e = LeaseEnv::new("lease-reap", 62080, 62089);
    assert!(e.stop_daemon().success());
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
    let port2 = e.lease(&doomed);
    std::fs::remove_dir(doomed.abs()).unwrap();
    // A lease to a live, empty cgroup that the orchestrator has not started qemu in yet stays.
    let pending = e.attach.child("pending");
    let port3 = e.lease(&pending);

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
    let mut e = LeaseEnv::new("lease-orphan", 62160, 62161);
    assert!(e.stop_daemon().success());
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
