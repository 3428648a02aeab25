//! End-to-end tests of the guard itself: a real `port-guard daemon` attached to a test cgroup,
//! real processes forked into sibling cgroups calling bind(2).
//!
//! Every test builds the same layout under the cgroup2 mount:
//!
//! ```text
//! /pg-test-<test>-<pid>            attach cgroup (--attach)
//!     allowed                      --allow
//!         grand                    descendant of an allowed cgroup
//!     outsider                     neither allowed nor leased
//!     spawn                        --spawn-parent (created by the daemon)
//! ```
//!
//! plus its own pin dir, config file and port range (all ranges are inside 61000-65000, above
//! the ephemeral range, and 20 apart so `first-1` / `last+1` never hit another test's range).
//!
//! Covered: refusal of outsiders on 0.0.0.0, [::], ::ffff:127.0.0.1 (and loopback) for TCP and
//! UDP; ports next to the range; protocol selection; allowed cgroups and their descendants;
//! leases (lessee and its descendants only); audit mode; the three errno choices; the denial log
//! line (also for cgroups created after the daemon started) and counters in `status --json`; kill -9 + restart (pins adopted); `unload`;
//! SIGTERM/SIGINT with and without `--unload-on-exit`; `status` with no daemon running.
//!
//! Needs root and the agent built (`cargo build -p port-guard`, or `PORT_GUARD_BIN`). Run with
//! `cargo test -p integration-tests -- --test-threads=1` (they are parallel-safe anyway).

use std::path::PathBuf;

use integration_tests::{
    common::{MAP_COUNTERS, MAP_LEASES},
    *,
};
use serde_json::Value;

/// Everything one test uses. Field order is drop order: the daemon dies first, then the pins
/// are unloaded, then the cgroups are removed.
struct Fixture {
    daemon: Option<Daemon>,
    pin: PinDir,
    _tmp: TempDir,
    config: PathBuf,
    daemon_args: Vec<String>,
    first: u16,
    last: u16,
    allowed: Cgroup,
    grand: Cgroup,
    outsider: Cgroup,
    attach: TestCgroup,
}

impl Fixture {
    /// Builds the layout and starts a daemon with
    /// `--attach <attach> --reserve <first>-<last><suffix> --allow <attach>/allowed
    ///  [--errno eaddrinuse] EXTRA...` and waits until it is attached.
    fn new(name: &str, first: u16, last: u16, proto_suffix: &str, extra: &[&str]) -> Fixture {
        let attach = TestCgroup::new(name);
        let allowed = attach.child("allowed");
        let grand = allowed.child("grand");
        let outsider = attach.child("outsider");
        let pin = PinDir::new(name);
        let tmp = TempDir::new(name);
        let config = tmp.write(
            "config.toml",
            &format!("# integration test {name}\nmode = \"enforce\"\n"),
        );
        let mut daemon_args = vec![
            "--attach".to_string(),
            attach.path().to_string(),
            "--reserve".to_string(),
            format!("{first}-{last}{proto_suffix}"),
            "--allow".to_string(),
            allowed.path().to_string(),
            // Keep the daemon from creating its default /port-guard at the cgroup2 root.
            "--spawn-parent".to_string(),
            format!("{}/spawn", attach.path()),
        ];
        let errno = extra
            .iter()
            .position(|a| *a == "--errno")
            .and_then(|i| extra.get(i + 1))
            .copied();
        if errno.is_none() {
            daemon_args.extend(["--errno".to_string(), "eaddrinuse".to_string()]);
        }
        // Before 6.1 only EADDRINUSE has a way (the sentinel); another errno is EPERM there, and
        // the daemon starts only with the fallback allowed.
        let sentinel_gives_it =
            kernel_features().sentinel && errno.is_none_or(|e| e == "eaddrinuse");
        if !kernel_features().set_retval && !sentinel_gives_it {
            daemon_args.push("--allow-fallback".to_string());
        }
        daemon_args.extend(extra.iter().map(|s| s.to_string()));
        let mut f = Fixture {
            daemon: None,
            pin,
            _tmp: tmp,
            config,
            daemon_args,
            first,
            last,
            allowed,
            grand,
            outsider,
            attach,
        };
        f.start_daemon();
        f
    }

    fn audit(&self) -> bool {
        self.daemon_args
            .windows(2)
            .any(|w| w[0] == "--mode" && w[1] == "audit")
    }

    /// Starts a (new) daemon with the fixture's arguments and waits until it guards: the
    /// `guard enforcing` line in enforce mode, `status --json` saying attached in audit mode.
    fn start_daemon(&mut self) -> &Daemon {
        let mut d = Daemon::start(&self.pin, &self.config, &self.daemon_args);
        if self.audit() {
            d.wait_attached(&self.pin, START_TIMEOUT);
            self.daemon = Some(d);
        } else {
            d.wait_for("guard enforcing", START_TIMEOUT);
            self.daemon = Some(d);
        }
        self.daemon.as_ref().unwrap()
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon running")
    }

    fn daemon_mut(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("daemon running")
    }

    fn mid(&self) -> u16 {
        self.first + (self.last - self.first) / 2
    }
}

#[track_caller]
fn expect_ok(cg: &Cgroup, spec: &BindSpec) {
    let r = bind_in(cg, spec);
    assert!(
        r.is_ok(),
        "bind {}:{}/{} from {} should succeed, got {}",
        spec.addr,
        spec.port,
        spec.proto.name(),
        cg.path(),
        errno_name(r.unwrap_err())
    );
}

#[track_caller]
fn expect_refused(cg: &Cgroup, spec: &BindSpec, errno: i32) -> i32 {
    let (pid, r) = bind_in_pid(cg, spec);
    match r {
        Err(e) if e == errno => pid,
        other => panic!(
            "bind {}:{}/{} from {} should be refused with {}, got {}",
            spec.addr,
            spec.port,
            spec.proto.name(),
            cg.path(),
            errno_name(errno),
            match other {
                Ok(()) => "success".to_string(),
                Err(e) => errno_name(e),
            }
        ),
    }
}

/// The denial line the daemon must print, from `denied bind` to the end of the line.
fn denial_text(
    port: u16,
    proto: &str,
    family: &str,
    pid: i32,
    comm: &str,
    cg: &Cgroup,
    errno: &str,
) -> String {
    format!(
        "denied bind port={port}/{proto} family={family} pid={pid} comm={comm} cgroup={} netns=host errno={errno}",
        cg.path()
    )
}

/// Waits for a line that ends with `text` (a log prefix such as a timestamp is tolerated).
fn wait_line_ending(d: &Daemon, skip: usize, text: &str) -> String {
    d.wait_for_line(
        skip,
        LOG_TIMEOUT,
        &format!("a line ending with {text:?}"),
        |l| l.trim_end().ends_with(text),
    )
}

fn u64_at(v: &Value, ptr: &str) -> u64 {
    v.pointer(ptr)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("status JSON has no unsigned integer at {ptr}: {v:#}"))
}

fn str_at<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("status JSON has no string at {ptr}: {v:#}"))
}

const ADDRS: [std::net::IpAddr; 5] = [ANY4, ANY6, MAPPED_LO4, LO4, LO6];

#[test]
fn outsider_refused_on_all_addresses_tcp_and_udp_but_neighbours_bind() {
    let f = Fixture::new("refuse-all", 61100, 61109, "/tcp+udp", &[]);
    for proto in [Proto::Tcp, Proto::Udp] {
        for addr in ADDRS {
            for port in [f.first, f.mid(), f.last] {
                expect_refused(
                    &f.outsider,
                    &BindSpec::new(addr, port, proto),
                    expected_errno(),
                );
            }
            // Just outside the range: untouched.
            expect_ok(&f.outsider, &BindSpec::new(addr, f.first - 1, proto));
            expect_ok(&f.outsider, &BindSpec::new(addr, f.last + 1, proto));
        }
    }
    // The attach cgroup itself is not allowed either, and SO_REUSEADDR changes nothing.
    expect_refused(&f.attach, &BindSpec::tcp(ANY4, f.first), expected_errno());
    expect_refused(
        &f.outsider,
        &BindSpec::tcp(ANY6, f.first).reuseaddr(),
        expected_errno(),
    );
}

#[test]
fn tcp_only_range_refuses_tcp_and_lets_udp_bind() {
    // No suffix means tcp.
    let f = Fixture::new("tcp-only", 61120, 61129, "", &[]);
    for addr in [ANY4, ANY6, MAPPED_LO4] {
        expect_refused(&f.outsider, &BindSpec::tcp(addr, f.mid()), expected_errno());
        expect_ok(&f.outsider, &BindSpec::udp(addr, f.mid()));
        expect_ok(&f.outsider, &BindSpec::udp(addr, f.first));
        expect_ok(&f.outsider, &BindSpec::udp(addr, f.last));
    }
    let st = status_json(f.pin.path());
    assert_eq!(
        st["reserve"][0]["protocols"],
        serde_json::json!(["tcp"]),
        "{st:#}"
    );
}

#[test]
fn allowed_cgroup_and_its_descendants_bind_reserved_ports() {
    let f = Fixture::new("allowed", 61140, 61149, "/tcp+udp", &[]);
    for cg in [&f.allowed, &f.grand] {
        for proto in [Proto::Tcp, Proto::Udp] {
            for addr in ADDRS {
                expect_ok(cg, &BindSpec::new(addr, f.mid(), proto).comm("pg-allowed"));
            }
            expect_ok(cg, &BindSpec::new(ANY4, f.first, proto).comm("pg-allowed"));
            expect_ok(cg, &BindSpec::new(ANY6, f.last, proto).comm("pg-allowed"));
        }
    }
    // Deeper still.
    let deep = f.grand.child("deeper/deepest");
    expect_ok(&deep, &BindSpec::tcp(ANY6, f.mid()).comm("pg-allowed"));
    // Control: the guard is really active.
    expect_refused(&f.outsider, &BindSpec::tcp(ANY4, f.mid()), expected_errno());
    let st = status_json(f.pin.path());
    assert!(
        u64_at(&st, "/counters/allowed") >= 1,
        "allowed binds not counted: {st:#}"
    );
}

#[test]
fn lease_limits_port_to_lessee_cgroup_and_its_descendants() {
    let f = Fixture::new("lease", 61160, 61169, "/tcp", &[]);
    let vm1 = f.attach.child("vm1");
    let vm1_sub = vm1.child("sub");
    let vm2 = f.attach.child("vm2");
    // Keep vm1 populated so the daemon does not reap the lease as belonging to an empty cgroup.
    let _holder = hold_in(&vm1);
    let p = f.first + 3;
    let other = f.first + 4;

    // Before the lease: allowed may bind p.
    expect_ok(&f.allowed, &BindSpec::tcp(ANY4, p).comm("pg-allowed"));

    insert_lease(f.pin.path(), p, &vm1);
    for addr in [ANY4, ANY6, MAPPED_LO4] {
        expect_ok(&vm1, &BindSpec::tcp(addr, p).comm("pg-vm1"));
        expect_ok(&vm1_sub, &BindSpec::tcp(addr, p).comm("pg-vm1-sub"));
        expect_refused(
            &f.allowed,
            &BindSpec::tcp(addr, p).comm("pg-allowed"),
            expected_errno(),
        );
        expect_refused(
            &f.grand,
            &BindSpec::tcp(addr, p).comm("pg-allowed"),
            expected_errno(),
        );
        expect_refused(&f.outsider, &BindSpec::tcp(addr, p), expected_errno());
        expect_refused(
            &vm2,
            &BindSpec::tcp(addr, p).comm("pg-vm2"),
            expected_errno(),
        );
    }
    // The lease covers only p: the rest of the range is as before.
    expect_ok(&f.allowed, &BindSpec::tcp(ANY4, other).comm("pg-allowed"));
    expect_refused(
        &vm1,
        &BindSpec::tcp(ANY4, other).comm("pg-vm1"),
        expected_errno(),
    );
    expect_refused(&f.outsider, &BindSpec::tcp(ANY4, other), expected_errno());

    // status lists it.
    let st = status_json(f.pin.path());
    let leases = st["leases"]
        .as_array()
        .unwrap_or_else(|| panic!("no leases list: {st:#}"));
    assert!(
        leases
            .iter()
            .any(|l| l["port"].as_u64() == Some(p as u64)
                && l["cgroup"].as_str() == Some(vm1.path())),
        "lease {p} -> {} not in status: {st:#}",
        vm1.path()
    );
    assert!(
        get_lease(f.pin.path(), p).is_some(),
        "lease was reaped although vm1 is populated"
    );

    remove_lease(f.pin.path(), p);
    expect_ok(&f.allowed, &BindSpec::tcp(ANY4, p).comm("pg-allowed"));
    expect_ok(&f.grand, &BindSpec::tcp(ANY6, p).comm("pg-allowed"));
    // vm1 is neither allowed nor leased any more.
    expect_refused(
        &vm1,
        &BindSpec::tcp(ANY4, p).comm("pg-vm1"),
        expected_errno(),
    );
    expect_refused(&f.outsider, &BindSpec::tcp(ANY4, p), expected_errno());
}

#[test]
fn audit_mode_logs_would_be_denials_and_denies_nothing() {
    let f = Fixture::new("audit", 61180, 61189, "/tcp", &["--mode", "audit"]);
    let p = f.mid();
    // An allowed bind first: it must not be reported.
    let (allowed_pid, r) = bind_in_pid(&f.allowed, &BindSpec::tcp(ANY4, p).comm("pg-allowed"));
    assert_eq!(r, Ok(()), "allowed bind failed in audit mode");
    let (pid, r) = bind_in_pid(&f.outsider, &BindSpec::tcp(ANY4, p));
    assert_eq!(
        r,
        Ok(()),
        "audit mode must not refuse the outsider, got {:?}",
        r.map_err(errno_name)
    );
    let needle = format!("audit: would deny bind port={p}/tcp");
    let want_comm = "comm=pg-outsider".to_string();
    let want_cg = format!("cgroup={}", f.outsider.path());
    let want_pid = format!("pid={pid} ");
    let line = f.daemon().wait_for_line(
        0,
        LOG_TIMEOUT,
        &format!("{needle:?} with {want_pid}{want_comm} {want_cg}"),
        |l| {
            l.contains(&needle)
                && l.contains(&want_pid)
                && l.contains(&want_comm)
                && l.contains(&want_cg)
        },
    );
    assert!(line.contains("family=ipv4"), "no family=ipv4 in {line:?}");
    assert!(
        !f.daemon()
            .lines()
            .iter()
            .any(|l| l.contains(&format!("pid={allowed_pid} "))),
        "the allowed bind (pid {allowed_pid}) was reported: {:#?}",
        f.daemon().lines()
    );
    assert!(
        !f.daemon().lines().iter().any(|l| l.contains("denied bind")),
        "audit mode printed a denial: {:#?}",
        f.daemon().lines()
    );
    let st = status_json(f.pin.path());
    assert_eq!(str_at(&st, "/mode"), "audit", "{st:#}");
    assert!(u64_at(&st, "/counters/audited") >= 1, "{st:#}");
    assert_eq!(u64_at(&st, "/counters/denied"), 0, "{st:#}");
    assert!(u64_at(&st, "/reserve/0/counters/audited") >= 1, "{st:#}");
}

fn errno_case(name: &str, first: u16, flag: &str, errno: i32, log_name: &str) {
    let k = kernel_features();
    // Without bpf_set_retval, EADDRINUSE still comes through the sentinel port; EACCES cannot.
    if errno != libc::EPERM && !k.set_retval && !(errno == libc::EADDRINUSE && k.sentinel) {
        skip(&format!(
            "{log_name} needs bpf_set_retval in cgroup bind programs (6.1+): this kernel refuses with EPERM only (or EADDRINUSE through the sentinel port)"
        ));
        return;
    }
    let f = Fixture::new(name, first, first + 9, "/tcp+udp", &["--errno", flag]);
    let p = f.mid();
    let pid = expect_refused(&f.outsider, &BindSpec::tcp(ANY4, p), errno);
    expect_refused(&f.outsider, &BindSpec::udp(ANY6, p), errno);
    expect_refused(&f.outsider, &BindSpec::tcp(MAPPED_LO4, p), errno);
    let text = denial_text(p, "tcp", "ipv4", pid, "pg-outsider", &f.outsider, log_name);
    wait_line_ending(f.daemon(), 0, &text);
    let st = status_json(f.pin.path());
    assert_eq!(str_at(&st, "/errno"), flag, "{st:#}");
}

#[test]
fn errno_eperm_gives_eperm() {
    errno_case("errno-eperm", 61200, "eperm", libc::EPERM, "EPERM");
}

#[test]
fn errno_eacces_gives_eacces() {
    errno_case("errno-eacces", 61220, "eacces", libc::EACCES, "EACCES");
}

#[test]
fn errno_eaddrinuse_gives_eaddrinuse() {
    errno_case(
        "errno-eaddrinuse",
        61240,
        "eaddrinuse",
        libc::EADDRINUSE,
        "EADDRINUSE",
    );
}

#[test]
fn denial_is_logged_with_pid_comm_cgroup_and_counted_in_status() {
    let f = Fixture::new("denial-log", 61260, 61269, "/tcp", &[]);
    let p = f.first + 2;
    let pid4 = expect_refused(&f.outsider, &BindSpec::tcp(ANY4, p), expected_errno());
    let t4 = denial_text(
        p,
        "tcp",
        "ipv4",
        pid4,
        "pg-outsider",
        &f.outsider,
        &errno_name(expected_errno()),
    );
    wait_line_ending(f.daemon(), 0, &t4);

    // IPv6, another comm.
    let pid6 = expect_refused(
        &f.outsider,
        &BindSpec::tcp(ANY6, p + 1).comm("pg-intruder6"),
        expected_errno(),
    );
    let t6 = denial_text(
        p + 1,
        "tcp",
        "ipv6",
        pid6,
        "pg-intruder6",
        &f.outsider,
        &errno_name(expected_errno()),
    );
    wait_line_ending(f.daemon(), 0, &t6);

    // A v4-mapped bind arrives at the IPv6 hook.
    let pidm = expect_refused(&f.outsider, &BindSpec::tcp(MAPPED_LO4, p), expected_errno());
    let tm = denial_text(
        p,
        "tcp",
        "ipv6",
        pidm,
        "pg-outsider",
        &f.outsider,
        &errno_name(expected_errno()),
    );
    wait_line_ending(f.daemon(), 0, &tm);

    let st = status_json(f.pin.path());
    assert_eq!(str_at(&st, "/attach"), f.attach.path(), "{st:#}");
    assert_eq!(str_at(&st, "/mode"), "enforce", "{st:#}");
    assert_eq!(str_at(&st, "/errno"), "eaddrinuse", "{st:#}");
    let effective = if kernel_features().set_retval || kernel_features().sentinel {
        "eaddrinuse"
    } else {
        "eperm"
    };
    assert_eq!(str_at(&st, "/effective_errno"), effective, "{st:#}");
    assert_eq!(st["attached"], Value::Bool(true), "{st:#}");
    assert!(u64_at(&st, "/counters/denied") >= 3, "{st:#}");
    let reserve = st["reserve"]
        .as_array()
        .unwrap_or_else(|| panic!("no reserve list: {st:#}"));
    assert_eq!(reserve.len(), 1, "{st:#}");
    assert_eq!(str_at(&st, "/reserve/0/ports"), "61260-61269", "{st:#}");
    assert_eq!(u64_at(&st, "/reserve/0/first"), 61260, "{st:#}");
    assert_eq!(u64_at(&st, "/reserve/0/last"), 61269, "{st:#}");
    assert_eq!(
        st["reserve"][0]["protocols"],
        serde_json::json!(["tcp"]),
        "{st:#}"
    );
    let allow: Vec<&str> = st["reserve"][0]["allow"]
        .as_array()
        .unwrap_or_else(|| panic!("no reserve[0].allow: {st:#}"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        allow.contains(&f.allowed.path()),
        "{} not in allow {allow:?}",
        f.allowed.path()
    );
    assert!(u64_at(&st, "/reserve/0/counters/denied") >= 3, "{st:#}");
    assert!(st["leases"].is_array(), "{st:#}");
}

#[test]
fn denial_names_cgroups_created_after_the_daemon_started() {
    // Services and VMs get their cgroups long after the daemon started: the log must still
    // name them by path.
    let f = Fixture::new("denial-new-cgroup", 61380, 61389, "/tcp+udp", &[]);
    let late = f.outsider.child("late/nested");
    let p = f.mid();
    let pid = expect_refused(
        &late,
        &BindSpec::tcp(ANY6, p).comm("pg-late"),
        expected_errno(),
    );
    let text = denial_text(
        p,
        "tcp",
        "ipv6",
        pid,
        "pg-late",
        &late,
        &errno_name(expected_errno()),
    );
    wait_line_ending(f.daemon(), 0, &text);
    let sibling = f.attach.child("late-sibling");
    let pid = expect_refused(
        &sibling,
        &BindSpec::udp(ANY4, p).comm("pg-late"),
        expected_errno(),
    );
    let text = denial_text(
        p,
        "udp",
        "ipv4",
        pid,
        "pg-late",
        &sibling,
        &errno_name(expected_errno()),
    );
    wait_line_ending(f.daemon(), 0, &text);
}

#[test]
fn restart_after_kill9_adopts_pins_and_unload_removes_everything() {
    let mut f = Fixture::new("restart", 61280, 61289, "/tcp", &[]);
    let p = f.mid();
    expect_refused(&f.outsider, &BindSpec::tcp(ANY4, p), expected_errno());

    f.daemon_mut().kill9();
    // Nobody is watching, and the kernel still refuses (with EPERM where EADDRINUSE came through
    // the daemon's sentinel: no fd store kept it here).
    expect_refused(
        &f.outsider,
        &BindSpec::tcp(ANY4, p),
        expected_errno_without_sentinel(),
    );
    expect_refused(
        &f.outsider,
        &BindSpec::tcp(ANY6, p),
        expected_errno_without_sentinel(),
    );
    expect_ok(&f.allowed, &BindSpec::tcp(ANY4, p).comm("pg-allowed"));
    for m in [MAP_LEASES, MAP_COUNTERS] {
        assert!(
            f.pin.map(m).exists(),
            "pin {} gone after kill -9",
            f.pin.map(m).display()
        );
    }

    // A new daemon with the same arguments adopts what is pinned.
    f.start_daemon();
    let lines = f.daemon().lines();
    let adopted = lines.iter().position(|l| l.contains("adopted"));
    let enforcing = lines.iter().position(|l| l.contains("guard enforcing"));
    match (adopted, enforcing) {
        (Some(a), Some(e)) => assert!(
            a < e,
            "`adopted` must come before `guard enforcing`: {lines:#?}"
        ),
        _ => panic!("restarted daemon did not log `adopted` then `guard enforcing`: {lines:#?}"),
    }
    let skip = f.daemon().line_count();
    let pid = expect_refused(&f.outsider, &BindSpec::tcp(ANY4, p), expected_errno());
    let text = denial_text(
        p,
        "tcp",
        "ipv4",
        pid,
        "pg-outsider",
        &f.outsider,
        &errno_name(expected_errno()),
    );
    wait_line_ending(f.daemon(), skip, &text);

    let st = f.daemon_mut().terminate();
    assert_eq!(exit_code(st), 0, "restarted daemon exit status on SIGTERM");

    let (code, _out, err) = run(&["--pin-dir", f.pin.as_str(), "unload"]);
    assert_eq!(code, 0, "unload failed: {err}");
    assert!(
        !f.pin.exists(),
        "pin dir {} still exists after unload",
        f.pin.path().display()
    );
    for addr in [ANY4, ANY6, MAPPED_LO4] {
        expect_ok(&f.outsider, &BindSpec::tcp(addr, p));
    }
}

fn stop_keeps_guard(name: &str, first: u16, sig: i32) {
    let mut f = Fixture::new(name, first, first + 9, "/tcp", &[]);
    let p = f.mid();
    expect_refused(&f.outsider, &BindSpec::tcp(ANY4, p), expected_errno());
    let st = f.daemon_mut().signal(sig);
    assert_eq!(
        exit_code(st),
        0,
        "daemon exit status on signal {sig}: {:#?}",
        f.daemon().lines()
    );
    // The sentinel, if there was one, closed with the daemon (no fd store here).
    expect_refused(
        &f.outsider,
        &BindSpec::tcp(ANY4, p),
        expected_errno_without_sentinel(),
    );
    expect_refused(
        &f.outsider,
        &BindSpec::tcp(ANY6, p),
        expected_errno_without_sentinel(),
    );
    expect_ok(&f.allowed, &BindSpec::tcp(ANY4, p).comm("pg-allowed"));
    assert!(
        f.pin.map(MAP_LEASES).exists(),
        "pins removed although --unload-on-exit was not given"
    );
    let st = status_json(f.pin.path());
    assert_eq!(st["attached"], Value::Bool(true), "{st:#}");
}

#[test]
fn sigterm_exits_zero_and_guard_keeps_enforcing() {
    stop_keeps_guard("sigterm", 61300, libc::SIGTERM);
}

#[test]
fn sigint_exits_zero_and_guard_keeps_enforcing() {
    stop_keeps_guard("sigint", 61360, libc::SIGINT);
}

#[test]
fn sigterm_with_unload_on_exit_removes_guard_and_pins() {
    let mut f = Fixture::new(
        "unload-on-exit",
        61320,
        61329,
        "/tcp+udp",
        &["--unload-on-exit"],
    );
    let p = f.mid();
    expect_refused(&f.outsider, &BindSpec::tcp(ANY4, p), expected_errno());
    let st = f.daemon_mut().terminate();
    assert_eq!(
        exit_code(st),
        0,
        "daemon exit status on SIGTERM: {:#?}",
        f.daemon().lines()
    );
    assert!(
        !f.pin.exists(),
        "pin dir {} still exists after --unload-on-exit",
        f.pin.path().display()
    );
    for addr in [ANY4, ANY6, MAPPED_LO4] {
        expect_ok(&f.outsider, &BindSpec::tcp(addr, p));
        expect_ok(&f.outsider, &BindSpec::udp(addr, p));
    }
}

#[test]
fn status_works_without_daemon_and_reports_the_same_settings() {
    let mut f = Fixture::new(
        "status-offline",
        61340,
        61349,
        "/tcp",
        &["--mode", "audit", "--errno", "eacces"],
    );
    let (code, live) = status_json_code(f.pin.path());
    assert_eq!(code, 0, "{live:#}");
    f.daemon_mut().kill9();
    let (code, st) = status_json_code(f.pin.path());
    assert_eq!(code, 4, "status exits 4 when no daemon runs: {st:#}");
    assert_eq!(st["daemon"]["running"], Value::Bool(false), "{st:#}");
    for key in ["mode", "attach", "errno", "attached"] {
        assert_eq!(
            st[key], live[key],
            "{key} differs without the daemon: live {live:#} offline {st:#}"
        );
    }
    assert_eq!(str_at(&st, "/mode"), "audit", "{st:#}");
    assert_eq!(str_at(&st, "/attach"), f.attach.path(), "{st:#}");
    assert_eq!(str_at(&st, "/errno"), "eacces", "{st:#}");
    assert_eq!(st["attached"], Value::Bool(true), "{st:#}");
    assert_eq!(str_at(&st, "/reserve/0/ports"), "61340-61349", "{st:#}");
    assert!(st["leases"].is_array(), "{st:#}");
    assert!(st["counters"].is_object(), "{st:#}");
    // Audit mode is still in force in the kernel: the outsider binds and is counted.
    expect_ok(&f.outsider, &BindSpec::tcp(ANY4, f.mid()));
    let st2 = status_json(f.pin.path());
    assert!(
        u64_at(&st2, "/counters/audited") > u64_at(&st, "/counters/audited"),
        "audited counter did not move without the daemon: before {st:#} after {st2:#}"
    );
}
