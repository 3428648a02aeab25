//! What an operator relies on: the systemd unit, live reload on SIGHUP, Prometheus metrics,
//! allowed cgroups that appear after the daemon started, man page and completions.
//!
//! Ports: 62400-62499.

use std::{process::Command, time::Duration};

use integration_tests::*;

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    if analyze.is_err() {
        panic!("systemd-analyze not found: cargo xtask test installs it (xtask/src/packages.rs)");
    }
    // verify checks that ExecStart exists: point it at the binary under test.
    let unit = std::fs::read_to_string(workspace_file("contrib/port-guard.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/sbin/port-guard daemon"));
    let tmp = TempDir::new("unit");
    let path = tmp.write(
        "port-guard.service",
        &unit.replace("/usr/sbin/port-guard", &bin().display().to_string()),
    );
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("port-guard.service"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {stderr}"
    );
    for needle in [
        "Type=notify",
        "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN",
        "Restart=on-failure",
        "ExecReload=",
    ] {
        assert!(unit.contains(needle), "{needle}");
    }
}

/// A daemon whose ranges come from a config file the test rewrites.
struct Reloadable {
    daemon: Daemon,
    pin: PinDir,
    tmp: TempDir,
    config: std::path::PathBuf,
    cg: TestCgroup,
}

fn config_text(range: &str, allow: &str, extra: &str) -> String {
    format!("errno = \"eaddrinuse\"\n{extra}\n[[reserve]]\nports = \"{range}\"\nprotocols = [\"tcp\"]\nallow = [\"{allow}\"]\n")
}

impl Reloadable {
    fn start(name: &str, range: &str, allow_child: &str, extra_args: &[&str]) -> Reloadable {
        let cg = TestCgroup::new(name);
        if allow_child != "svc" {
            cg.child(allow_child);
        }
        let pin = PinDir::new(name);
        let tmp = TempDir::new(name);
        let config = tmp.write(
            "config.toml",
            &config_text(range, &format!("{}/{allow_child}", cg.path()), ""),
        );
        let mut args = vec![
            "--attach".to_string(),
            cg.path().to_string(),
            "--spawn-parent".into(),
            format!("{}/spawn", cg.path()),
        ];
        if !kernel_features().set_retval && !kernel_features().sentinel {
            args.push("--allow-fallback".into());
        }
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let daemon = Daemon::start(pin.path(), &config, &args);
        daemon.wait_for("guard enforcing", START_TIMEOUT);
        Reloadable {
            daemon,
            pin,
            tmp,
            config,
            cg,
        }
    }
}

#[test]
fn sighup_applies_a_new_range_and_allowed_cgroup_live_and_keeps_the_old_config_on_error() {
    let mut r = Reloadable::start("reload", "62400-62409", "a", &[]);
    let (a, b, out) = (r.cg.child("a"), r.cg.child("b"), r.cg.child("out"));
    let refused = Err(expected_errno());
    assert_eq!(bind_in(&out, &BindSpec::tcp(ANY4, 62400)), refused);
    assert_eq!(bind_in(&a, &BindSpec::tcp(ANY4, 62400)), Ok(()));
    assert_eq!(bind_in(&out, &BindSpec::tcp(ANY4, 62420)), Ok(()));

    // New range, new allowed cgroup; no restart.
    std::fs::write(&r.config, config_text("62420-62429", b.path(), "")).unwrap();
    let skip = r.daemon.line_count();
    unsafe { libc::kill(r.daemon.pid(), libc::SIGHUP) };
    r.daemon
        .wait_for_after(skip, "SIGHUP: config reloaded", LOG_TIMEOUT);
    assert_eq!(
        bind_in(&out, &BindSpec::tcp(ANY4, 62400)),
        Ok(()),
        "old range released"
    );
    assert_eq!(
        bind_in(&out, &BindSpec::tcp(ANY4, 62420)),
        refused,
        "new range enforced"
    );
    assert_eq!(
        bind_in(&b, &BindSpec::tcp(ANY6, 62425)),
        Ok(()),
        "new allowed cgroup"
    );
    assert_eq!(
        bind_in(&a, &BindSpec::tcp(ANY4, 62425)),
        refused,
        "old allowed cgroup no longer"
    );
    let status = status_json(r.pin.path());
    assert_eq!(status["reserve"][0]["ports"], "62420-62429");
    assert_eq!(status["reserve"][0]["allow"][0], b.path());
    assert_eq!(status["attached"], true);

    // A bad config is refused with the reason; the old one keeps enforcing.
    std::fs::write(&r.config, config_text("0-10", b.path(), "")).unwrap();
    let skip = r.daemon.line_count();
    unsafe { libc::kill(r.daemon.pid(), libc::SIGHUP) };
    let line = r
        .daemon
        .wait_for_after(skip, "SIGHUP: new config refused", LOG_TIMEOUT);
    assert!(line.contains("\"0\""), "{line}");
    assert_eq!(bind_in(&out, &BindSpec::tcp(ANY4, 62420)), refused);
    assert_eq!(bind_in(&b, &BindSpec::tcp(ANY4, 62420)), Ok(()));
    assert!(r.daemon.running(), "a bad reload does not stop the daemon");
    let _ = &r.tmp;
}

#[test]
fn an_allowed_cgroup_created_after_start_is_allowed_at_once_and_followed_when_recreated() {
    let r = Reloadable::start("late", "62440-62449", "svc", &[]);
    let svc_path = r.cg.abs().join("svc");
    assert!(!svc_path.exists());
    r.daemon.wait_for("allowed cgroup", LOG_TIMEOUT); // "... does not exist yet"
                                                      // The service starts: its cgroup appears and the daemon, told by inotify, allows it (within
                                                      // milliseconds: the window between mkdir and the map update is the daemon's reaction time).
    let skip = r.daemon.line_count();
    let svc = r.cg.child("svc");
    let line = r.daemon.wait_for_after(skip, "appeared", LOG_TIMEOUT); // logged once in force
    assert!(line.contains(&format!("{}/svc", r.cg.path())), "{line}");
    assert_eq!(
        bind_in(&svc, &BindSpec::tcp(ANY4, 62440)),
        Ok(()),
        "allowed once it appeared"
    );
    // Restarted by its service manager: removed and created again, with a new id.
    let old_id = svc.id();
    std::fs::remove_dir(svc.abs()).unwrap();
    let skip = r.daemon.line_count();
    let svc = r.cg.child("svc");
    assert_ne!(svc.id(), old_id);
    r.daemon.wait_for_after(skip, "was re-created", LOG_TIMEOUT); // logged once in force
    assert_eq!(
        bind_in(&svc, &BindSpec::tcp(ANY4, 62441)),
        Ok(()),
        "followed by path"
    );
    assert_eq!(
        bind_in(r.cg.child("other"), &BindSpec::tcp(ANY4, 62441)),
        Err(expected_errno())
    );
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|rest| rest.trim().parse::<f64>().ok())
        })
        .unwrap_or_else(|| panic!("{name_and_labels} not in:\n{text}"))
}

#[test]
fn metrics_count_what_a_scripted_set_of_binds_and_leases_produces() {
    // A free loopback port for the endpoint.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let r = Reloadable::start("metrics", "62460-62463", "a", &["--metrics-listen", &addr]);
    let (a, out, vm) = (r.cg.child("a"), r.cg.child("out"), r.cg.child("vm"));
    for p in [62460, 62461, 62462] {
        assert!(bind_in(&out, &BindSpec::tcp(ANY4, p)).is_err());
    }
    for p in [62460, 62461] {
        assert_eq!(bind_in(&a, &BindSpec::tcp(ANY6, p)), Ok(()));
    }
    let labels = "{range=\"62460-62463\",protocol=\"tcp\"}";
    let text = scrape_metrics(&addr);
    assert_eq!(
        metric(&text, &format!("port_guard_denied_binds_total{labels}")),
        3.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            &format!("port_guard_allowed_reserved_binds_total{labels}")
        ),
        2.0
    );
    assert_eq!(
        metric(&text, &format!("port_guard_audited_binds_total{labels}")),
        0.0
    );
    assert_eq!(metric(&text, "port_guard_leases"), 0.0);
    // Four ports: four leases, then one exhaustion.
    for i in 0..5 {
        let (code, _, err) = run(&["--pin-dir", r.pin.as_str(), "lease", "--cgroup", vm.path()]);
        assert_eq!(code, if i < 4 { 0 } else { 1 }, "{err}");
    }
    let text = wait_until(Duration::from_secs(10), || {
        let t = scrape_metrics(&addr);
        (metric(&t, "port_guard_lease_exhaustions_total") >= 1.0).then_some(t)
    })
    .expect("exhaustion counted");
    assert_eq!(
        metric(&text, &format!("port_guard_denied_binds_total{labels}")),
        3.0,
        "{text}"
    );
    // The allocator's probe binds (as the lessee) are not binds of a VM: not counted.
    assert_eq!(
        metric(
            &text,
            &format!("port_guard_allowed_reserved_binds_total{labels}")
        ),
        2.0,
        "{text}"
    );
    assert_eq!(metric(&text, "port_guard_leases"), 4.0);
    assert_eq!(metric(&text, "port_guard_lease_allocations_total"), 4.0);
    assert_eq!(metric(&text, "port_guard_lease_exhaustions_total"), 1.0);
    assert_eq!(metric(&text, "port_guard_attached"), 1.0);
    assert_eq!(
        metric(&text, "port_guard_config_reloads_total{result=\"ok\"}"),
        0.0
    );
    // The lessee cgroup goes away: the lease is reaped and counted.
    drop(vm);
    std::fs::remove_dir(r.cg.abs().join("vm")).unwrap();
    let text = wait_until(Duration::from_secs(10), || {
        let t = scrape_metrics(&addr);
        (metric(&t, "port_guard_leases") == 0.0).then_some(t)
    })
    .expect("leases reaped");
    assert_eq!(metric(&text, "port_guard_leases_reaped_total"), 4.0);
    for (cause, n) in [
        ("cgroup_removed", 4.0),
        ("released", 0.0),
        ("emptied", 0.0),
        ("expired", 0.0),
    ] {
        assert_eq!(
            metric(
                &text,
                &format!("port_guard_leases_ended_total{{cause=\"{cause}\"}}")
            ),
            n,
            "{text}"
        );
    }
}

#[test]
fn denial_events_the_ring_buffer_had_no_room_for_are_counted_and_reported() {
    // The daemon is stopped (SIGSTOP) while 9,000 outsiders make one refused bind each: each
    // offender's first denial always gets an event, and the 512 KiB ring buffer holds ~5,950
    // (88 bytes a record), so the rest cannot be reported. (One process flooding gets a few events a second: the
    // hardening tests show that.) The denials are counted in full all the same, and the loss is
    // counted, logged and exported.
    const OFFENDERS: usize = 9000;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let r = Reloadable::start("lost", "62470-62479", "a", &["--metrics-listen", &addr]);
    let out = r.cg.child("out");
    for i in 0..OFFENDERS {
        out.child(&i.to_string());
    }
    let text = scrape_metrics(&addr);
    assert_eq!(
        metric(&text, "port_guard_denial_events_lost_total"),
        0.0,
        "{text}"
    );
    unsafe { libc::kill(r.daemon.pid(), libc::SIGSTOP) };
    let flood = Command::new(env!("CARGO_BIN_EXE_pg-attack"))
        .arg("hop-flood")
        .arg(out.abs())
        .args([&OFFENDERS.to_string(), "0.0.0.0", "62470"])
        .output()
        .expect("running pg-attack");
    unsafe { libc::kill(r.daemon.pid(), libc::SIGCONT) };
    let v: serde_json::Value = serde_json::from_slice(&flood.stdout).expect("pg-attack's JSON");
    assert_eq!(v["ok"], 0, "{v}");
    let refused: u64 = v["errnos"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(refused, OFFENDERS as u64, "{v}");
    let line = r
        .daemon
        .wait_for("denial events were lost", Duration::from_secs(10));
    let text = scrape_metrics(&addr);
    let lost = metric(&text, "port_guard_denial_events_lost_total");
    let labels = "{range=\"62470-62479\",protocol=\"tcp\"}";
    let denied = metric(&text, &format!("port_guard_denied_binds_total{labels}"));
    assert_eq!(denied, refused as f64, "every denial counted: {text}");
    assert!(lost > 0.0 && lost < denied, "lost {lost} of {denied}");
    // What the ring buffer held was delivered: lost + delivered = denied, and the log line
    // names the loss.
    assert!(
        lost <= denied - 5500.0,
        "a 512 KiB ring holds ~5,950 events: lost {lost} of {denied}"
    );
    assert!(
        line.contains(&format!("{} denial events were lost", lost as u64)),
        "{line}"
    );
}

#[test]
fn pins_of_another_map_layout_are_refused_by_name_and_unload_removes_them() {
    // An upgrade across a map layout change: the new binary must not misread the old maps.
    let mut r = Reloadable::start("abi", "62480-62481", "a", &[]);
    assert!(r.daemon.terminate().success());
    let pin = r.pin.map(port_guard_common::MAP_CONFIG);
    let map = aya::maps::Map::from_map_data(aya::maps::MapData::from_pin(&pin).unwrap()).unwrap();
    let mut config: aya::maps::Array<_, port_guard_common::GuardConfig> = map.try_into().unwrap();
    let mut c = config.get(&0, 0).unwrap();
    let ours = c.abi;
    c.abi = ours + 100;
    config.set(0, c, 0).unwrap();
    drop(config);
    for args in [vec!["status"], vec!["lease", "--cgroup", r.cg.path()]] {
        let mut full = vec!["--pin-dir", r.pin.as_str()];
        full.extend(args.iter().copied());
        let (code, _, err) = run(&full);
        assert_ne!(code, 0, "{args:?}: {err}");
        let want = format!("uses map layout {}, this binary uses {ours}", ours + 100);
        assert!(single_line(&err).contains(&want), "{args:?}: {err}");
    }
    let (code, _, err) = run(&["--pin-dir", r.pin.as_str(), "unload"]);
    assert_eq!(code, 0, "{err}");
    assert!(!r.pin.exists(), "unload removed the foreign pins");
}

#[test]
fn man_page_and_completions_are_generated() {
    let (code, out, err) = run(&["man"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(".ie") || out.contains(".TH port-guard"),
        "{}",
        &out[..out.len().min(200)]
    );
    for verb in ["DAEMON", "SPAWN", "LEASE", "CHECK", "RELOAD", "UNLOAD"] {
        assert!(out.contains(&format!("PORT-GUARD {verb}")), "{verb}");
    }
    for section in [
        "CONFIGURATION",
        "FILES",
        "EXIT STATUS",
        "SIGNALS",
        "EXAMPLES",
        "SEE ALSO",
    ] {
        assert!(out.contains(&format!(".SH {section}")), "{section}");
    }
    assert!(
        !out.contains("port-guard-daemon") && !out.contains(r"port\-guard\-daemon"),
        "no page for a verb exists: the man page must not point at one"
    );
    let (code, out, _) = run(&["completions", "bash"]);
    assert_eq!(code, 0);
    assert!(out.contains("port-guard") && out.contains("spawn"), "{out}");
    // A usage error: clap's message whole, with the values it accepts.
    let (code, _, err) = run(&["completions", "tcsh"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("invalid value 'tcsh'") && err.contains("possible values: bash"),
        "{err}"
    );
}
