//! Upgrades: a daemon of this version started over the pins of an older one.
//! - across map layouts: the leases of layout 2 migrate in place, with no unguarded instant and
//!   no lease lost;
//! - from the last guard before the per-VM shares (a smaller event ring buffer, shorter event
//!   records, no share maps): the daemon takes it over, reads its ring buffer, keeps its leases
//!   and enforces the shares it brings.
//!
//! The old binaries are built from git by `cargo xtask test` (the commits named in xtask) and
//! passed as `PG_ABI2_BIN` and `PG_PREV_BIN`. Ports 64300-64319 and 64340-64349.

use std::{
    io::{BufRead as _, BufReader},
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

#[test]
fn an_upgrade_from_the_release_before_the_shares_keeps_its_guard_leases_and_events() {
    let Some(old) = std::env::var_os("PG_PREV_BIN") else {
        skip("PG_PREV_BIN is not set: `cargo xtask test` builds the previous release's binary and sets it");
        return;
    };
    let f = Fixture::new("prev");
    let machine = f.attach.child("machine");
    let vm1 = machine.child("vm1");
    let lessee = f.attach.child("vm-leased");
    let mut args = f.args(Some("64340-64349/tcp"), &["--no-protect-ephemeral"]);
    args.extend(["--allow".to_string(), machine.path().to_string()]);
    let daemon = |bin: &std::ffi::OsStr, extra: &[&str]| {
        let mut c = Command::new(bin);
        c.arg("--pin-dir")
            .arg(f.pin.path())
            .arg("--config")
            .arg(&f.config)
            .arg("daemon")
            .args(&args)
            .args(extra);
        c
    };
    let pg = |a: &[&str]| {
        let mut c = Command::new(bin());
        c.arg("--pin-dir").arg(f.pin.path()).args(a);
        run_cmd(c)
    };
    // The old guard: a lease held by a live cgroup, a refusal it logged.
    let mut d = Daemon::spawn(daemon(&old, &[]));
    d.wait_for("guard enforcing", START_TIMEOUT);
    let _kept_alive = hold_in(lessee.abs());
    let mut c = Command::new(&old);
    c.arg("--pin-dir")
        .arg(f.pin.path())
        .args(["lease", "--cgroup", lessee.path()]);
    let (code, out, err) = run_cmd(c);
    assert_eq!(code, 0, "old lease: {err}");
    let leased: u16 = out.trim().parse().unwrap();
    assert_eq!(
        bind_in(f.outsider.abs(), &BindSpec::tcp(ANY4, 64349)),
        Err(expected_errno())
    );
    d.wait_for("port=64349/tcp", LOG_TIMEOUT);
    d.signal(libc::SIGTERM);

    // This version takes it over, with a share of one port per VM.
    let mut new = Daemon::spawn(daemon(bin().as_os_str(), &["--per-child-limit", "1"]));
    new.wait_for("guard enforcing", START_TIMEOUT);
    new.wait_for("adopted the guard", LOG_TIMEOUT);
    new.wait_for("event ring buffer keeps its 256 KiB", LOG_TIMEOUT);
    // Its refusals are read from the old ring buffer.
    assert_eq!(
        bind_in(f.outsider.abs(), &BindSpec::tcp(ANY4, 64348)),
        Err(expected_errno())
    );
    let line = new.wait_for("port=64348/tcp", LOG_TIMEOUT);
    assert!(line.contains("denied bind"), "{line}");
    // The lease is there and enforced: only its cgroup binds the port.
    let (code, out, err) = pg(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let st: Value = serde_json::from_str(&out).unwrap();
    assert!(
        st["leases"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["port"] == leased && l["cgroup"] == lessee.path()),
        "{st:#}"
    );
    assert_eq!(
        bind_in(vm1.abs(), &BindSpec::tcp(ANY4, leased)),
        Err(expected_errno())
    );
    assert_eq!(bind_in(lessee.abs(), &BindSpec::tcp(ANY4, leased)), Ok(()));
    // The share: a VM holding one port is refused a second, and says why.
    let free: Vec<u16> = (64340..=64347).filter(|p| *p != leased).collect();
    let mut c = Command::new(env!("CARGO_BIN_EXE_pg-sockets"));
    c.args(["hold", &format!("listen4:{}", free[0])])
        .stdout(Stdio::piped());
    enter_cgroup(&mut c, &vm1);
    let mut holder = Reaped(c.spawn().unwrap());
    let mut ready = String::new();
    BufReader::new(holder.0.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready");
    assert_eq!(
        bind_in(vm1.abs(), &BindSpec::tcp(ANY4, free[1])),
        Err(expected_errno())
    );
    let line = new.wait_for(&format!("port={}/tcp", free[1]), LOG_TIMEOUT);
    assert!(line.contains("reason=limit"), "{line}");
    drop(holder);
    assert!(new.running(), "the daemon died: {:#?}", new.lines());
    assert!(
        new.lines().iter().all(|l| !l.contains("ERROR")),
        "{:#?}",
        new.lines()
    );
}

/// A child killed and reaped when dropped, even when an assert fails.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
