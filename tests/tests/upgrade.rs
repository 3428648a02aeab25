//! An upgrade across map layouts: a daemon of this version started over the pins of the
//! previous layout (2) with live leases migrates them in place, with no unguarded instant and no
//! lease lost.
//!
//! The previous layout's binary is built from git by `cargo xtask test` (the commit named in
//! xtask) and passed as `PG_ABI2_BIN`. Ports 64300-64319.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use integration_tests::{netns::enter_cgroup, *};
use serde_json::Value;

const RANGE: &str = "64300-64319";

#[test]
fn a_daemon_migrates_the_leases_of_layout_2_in_place_with_no_unguarded_instant() {
    let Some(old) = std::env::var_os("PG_ABI2_BIN") else {
        skip("PG_ABI2_BIN is not set: `cargo xtask test` builds the layout-2 binary and sets it");
        return;
    };
    let f = Fixture::new("abi2");
    let allowed = f.attach.child("allowed");
    let vm_a = f.attach.child("vm-a");
    let vm_b = f.attach.child("vm-b");
    let mut args = f.args(Some(&format!("{RANGE}/tcp")), &["--no-protect-ephemeral"]);
    args.extend(["--allow".to_string(), allowed.path().to_string()]);
    let daemon = |bin: &std::ffi::OsStr| {
        let mut c = Command::new(bin);
        c.arg("--pin-dir")
            .arg(f.pin.path())
            .arg("--config")
            .arg(&f.config)
            .arg("daemon")
            .args(&args);
        c
    };
    let pg = |bin: &std::ffi::OsStr, a: &[&str]| {
        let mut c = Command::new(bin);
        c.arg("--pin-dir").arg(f.pin.path()).args(a);
        run_cmd(c)
    };
    // The old daemon, and leases made by the old binary: two to A, one to B.
    let mut d = Daemon::spawn(daemon(&old));
    d.wait_for("guard enforcing", START_TIMEOUT);
    let mut leased = Vec::new();
    for cg in [&vm_a, &vm_a, &vm_b] {
        let (code, out, err) = pg(&old, &["lease", "--cgroup", cg.path()]);
        assert_eq!(code, 0, "old lease: {err}");
        leased.push((out.trim().parse::<u16>().unwrap(), cg.path().to_owned()));
    }
    let (code, out, _) = pg(bin().as_os_str(), &["status", "--json"]);
    assert_ne!(code, 0, "this binary reads layout-2 pins as its own: {out}");

    // Throughout the upgrade: the allowed cgroup binds a leased port (refused: it is A's), and
    // binds an unleased reserved port (allowed) as a control, each from a fresh socket in a
    // tight loop.
    let flood = |cg: &Cgroup, port: u16| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pg-attack"));
        c.args(["bind-flood-fresh", "0.0.0.0", &port.to_string(), "4"])
            .stdout(Stdio::piped());
        enter_cgroup(&mut c, cg);
        c.spawn().unwrap()
    };
    let leased_port = leased[0].0;
    let free_port = (64300..=64319)
        .find(|p| !leased.iter().any(|(l, _)| l == p))
        .unwrap();
    let against_lease = flood(&allowed, leased_port);
    let control = flood(&allowed, free_port);
    std::thread::sleep(Duration::from_millis(500));
    d.signal(libc::SIGTERM);
    let new = Daemon::spawn(daemon(bin().as_os_str()));
    new.wait_for("guard enforcing", START_TIMEOUT);
    let line = new.wait_for(
        "migrated 3 lease(s) from map layout 2 in place",
        LOG_TIMEOUT,
    );
    eprintln!("[measure] {line}");
    let v: Value =
        serde_json::from_slice(&against_lease.wait_with_output().unwrap().stdout).unwrap();
    let c: Value = serde_json::from_slice(&control.wait_with_output().unwrap().stdout).unwrap();
    eprintln!("[measure] binds of leased port {leased_port} from an allowed cgroup during the upgrade: {v}; control on unleased {free_port}: {c}");
    assert_eq!(
        v["ok"], 0,
        "a leased port was bindable during the upgrade: {v}"
    );
    assert!(
        v["errnos"].as_object().is_some_and(|e| !e.is_empty()),
        "{v}"
    );
    assert!(
        c["ok"].as_u64().unwrap() > 0,
        "the control never bound: {c}"
    );

    // Every lease is there, with its lessee, as an until-empty lease (layout 2's lifetime).
    let st = status_json(f.pin.path());
    let leases = st["leases"].as_array().unwrap();
    assert_eq!(leases.len(), 3, "{st:#}");
    for (port, cg) in &leased {
        let l = leases
            .iter()
            .find(|l| l["port"] == *port)
            .unwrap_or_else(|| panic!("lease {port} lost: {st:#}"));
        assert_eq!(l["cgroup"], *cg, "{l}");
        assert_eq!(l["until_empty"], true, "{l}");
    }
    assert!(
        !f.pin.map("PG_LEASES_v2").exists(),
        "the old map's pin stays"
    );
    // Enforced by the new programs: the allowed cgroup does not bind A's port, A does.
    assert_eq!(
        bind_in(&allowed, &BindSpec::tcp(ANY4, leased_port)),
        Err(expected_errno())
    );
    assert_eq!(bind_in(&vm_a, &BindSpec::tcp(ANY4, leased_port)), Ok(()));
    // Layout 2's lifetime, kept: A had a process and has none now, so both its leases end.
    let ended = wait_until(Duration::from_secs(10), || {
        let st = status_json(f.pin.path());
        let left: Vec<Value> = st["leases"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["cgroup"] == vm_a.path())
            .cloned()
            .collect();
        left.is_empty().then_some(())
    });
    assert!(
        ended.is_some(),
        "the migrated leases of an emptied cgroup stay"
    );
    // New leases and releases work on the migrated map; the old binary now refuses the pins.
    let (code, _, err) = pg(
        bin().as_os_str(),
        &["release", "--port", &leased[2].0.to_string()],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = pg(
        bin().as_os_str(),
        &["lease", "--cgroup", vm_b.path(), "--ttl", "1h"],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = pg(&old, &["status"]);
    assert_ne!(code, 0);
    assert!(err.contains("uses map layout 3"), "{err}");
    drop(new);
}
