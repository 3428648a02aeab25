//! Real libvirt, configured the way docs/libvirt.md tells operators to (issue 9): the docs'
//! example is the file the tests load, who must be allowed (libvirtd probes, qemu listens), what
//! errno = "eperm" does to libvirt's allocator, and audit mode (nothing refused, every would-be
//! refusal logged). Two libvirtd 9.0 daemons on this machine live-migrate a diskless domain
//! back and forth; no mock of libvirt anywhere.
//!
//! Needs root, the agent built, and libvirt + qemu (installed from Debian when missing; skipped
//! where that is impossible, e.g. the busybox guests of `cargo xtask vm-test`). Layout, the
//! config and its rewriting: `integration_tests::libvirt::LibvirtEnv` and `host_config`.

use std::{fs, time::Duration};

use integration_tests::{
    libvirt::{
        assert_libvirt_layout, describe, guard_lines, host_config, Allocator, LibvirtEnv, Pace,
        PACE,
    },
    *,
};

const ALLOCATOR: &str = env!("CARGO_BIN_EXE_pg-allocator");

#[test]
fn the_docs_config_example_is_contrib_libvirt_host_toml() {
    // docs/libvirt.md says "the integration tests load this exact file": its example must be the
    // file (comments aside), so that what the docs show is what the tests below run.
    if !workspace_file("docs/libvirt.md").exists() {
        skip("the source tree is not here (e.g. a `cargo xtask vm-test` guest)");
        return;
    }
    let doc = fs::read_to_string(workspace_file("docs/libvirt.md")).unwrap();
    let block = doc
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a ```toml block in docs/libvirt.md");
    let file = fs::read_to_string(workspace_file("contrib/libvirt-host.toml")).unwrap();
    let settings = |s: &str| -> Vec<String> {
        s.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        settings(block),
        settings(&file),
        "docs/libvirt.md's example differs from contrib/libvirt-host.toml"
    );
    // And the rewriting the tests do changes nothing else.
    let cfg = host_config((62700, 62719), &["/x", "/machine"], "/s", &[]);
    let changed: Vec<(String, String)> = settings(&file)
        .into_iter()
        .zip(settings(&cfg))
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(changed.len(), 3, "{changed:#?}");
    assert!(
        cfg.contains("ports = \"62700-62719\"\n")
            && cfg.contains("allow = [\"/x\", \"/machine\"]\n"),
        "{cfg}"
    );
}

#[test]
fn libvirtd_probes_and_qemu_listens_and_both_must_be_allowed() {
    let Some(mut e) = LibvirtEnv::new("lv-who", (62760, 62779)) else {
        return;
    };
    let a = e.pair.a.cgroup.path().to_owned();
    let b = e.pair.b.cgroup.path().to_owned();

    // Audit mode, nothing allowed: the log names every bind of a migration.
    let text = e.config_text(&[], &[("mode", "audit")]);
    e.start_guard(&text, "audit", &[]);
    let dest = e.pair.dest().cgroup.path().to_owned();
    let m = e.pair.migrate("tcp://127.0.0.1");
    let port = m.result.clone().expect("migration in audit mode");
    let qemu_cg = m.qemu_cgroup.clone().unwrap();
    let lines: Vec<String> = guard_lines(e.guard.as_ref().unwrap(), "audit: would deny bind")
        .into_iter()
        .filter(|l| l.contains(&format!("port={port}/tcp")))
        .collect();
    eprintln!(
        "[who] the binds of migration {} to port {port}:\n  {}",
        m.direction,
        lines.join("\n  ")
    );
    let probe: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(&format!("cgroup={dest} ")))
        .collect();
    let listen: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(&format!("cgroup={qemu_cg} ")))
        .collect();
    assert!(
        probe.iter().any(|l| l.contains("family=ipv6"))
            && probe.iter().any(|l| l.contains("family=ipv4")),
        "libvirtd's probe: {lines:#?}"
    );
    assert!(
        !listen.is_empty(),
        "qemu's listen from {qemu_cg}: {lines:#?}"
    );
    assert_eq!(
        probe.len() + listen.len(),
        lines.len(),
        "binds from elsewhere: {lines:#?}"
    );

    // Enforce, only /machine allowed: libvirtd's probe is refused (EADDRINUSE: "in use") on
    // every port of the range, so libvirt finds none and the migration fails.
    let skip = e.guard().lines().len();
    let (path, text) = (e.config.clone(), e.config_text(&["/machine".into()], &[]));
    e.guard().reload(&path, &text);
    let m = e.pair.migrate("tcp://127.0.0.1");
    let err = m.result.expect_err("migration with libvirtd not allowed");
    eprintln!("[who] only /machine allowed: {err}");
    assert!(err.contains("Unable to find an unused port"), "{err}");
    let dest = e.pair.dest().cgroup.path().to_owned();
    let denied = e
        .guard()
        .wait_for_denial(skip, &format!("{dest} "), "EADDRINUSE", LOG_TIMEOUT);
    assert!(
        denied.contains("denied") && denied.contains("errno=EADDRINUSE"),
        "{denied}"
    );

    // The same with errno = "eperm", which the docs warn against: libvirt's allocator takes any
    // error but EADDRINUSE as fatal, at the first port it probes.
    let skip = e.guard().lines().len();
    let text = e.config_text(&["/machine".into()], &[("errno", "eperm")]);
    e.guard().reload(&path, &text);
    let m = e.pair.migrate("tcp://127.0.0.1");
    let err = m.result.expect_err("migration with EPERM probes");
    eprintln!("[who] only /machine allowed, errno eperm: {err}");
    assert!(
        err.contains(&format!("Unable to bind to port {}", e.ports.0)),
        "{err}"
    );
    let denied = e
        .guard()
        .wait_for_denial(skip, &format!("{dest} "), "EPERM", LOG_TIMEOUT);
    assert!(denied.contains("errno=EPERM"), "{denied}");

    // Enforce, only the libvirtd cgroups allowed: libvirt gets its port, qemu cannot listen.
    let skip = e.guard().lines().len();
    let text = e.config_text(&[a, b], &[]);
    e.guard().reload(&path, &text);
    let m = e.pair.migrate("tcp://127.0.0.1");
    let err = m.result.expect_err("migration with /machine not allowed");
    eprintln!("[who] only the libvirtd cgroups allowed: {err}");
    let denied = e
        .guard()
        .wait_for_denial(skip, "/machine/", "EADDRINUSE", LOG_TIMEOUT);
    assert!(
        denied.contains("denied") && denied.contains("errno=EADDRINUSE"),
        "{denied}"
    );
    eprintln!("[who] {denied}");

    // The docs' config: both.
    let allow = e.docs_allow();
    let text = e.config_text(&allow, &[]);
    e.guard().reload(&path, &text);
    let m = e.pair.migrate("tcp://127.0.0.1");
    assert!(m.result.is_ok(), "{m:?}");
    e.unload();
}

#[test]
fn audit_mode_refuses_nothing_and_logs_what_enforce_would_refuse() {
    let Some(mut e) = LibvirtEnv::new("lv-audit", (62740, 62759)) else {
        return;
    };
    let allow = e.docs_allow();
    let text = e.config_text(&allow, &[("mode", "audit")]);
    e.start_guard(&text, "audit", &allow);
    // An allocator that is not refused races libvirt exactly as with no guard at all (the last
    // phase of libvirt_races' first test shows what that does): here it takes the lowest port and
    // keeps it, so that every migration can complete. libvirt's probe of that port then fails for real
    // (EADDRINUSE) and libvirt takes the next one.
    e.allocator = Some(Allocator::start(
        ALLOCATOR,
        &e.outsider,
        e.ports,
        Pace { hold_ms: 0, ..PACE },
    ));
    let held = e.ports.0;
    assert!(
        wait_until(Duration::from_secs(10), || {
            integration_tests::qemu::listening(held).then_some(())
        })
        .is_some(),
        "the allocator did not get {held}"
    );
    let migrations = e.migrations("audit", 4);
    assert!(
        migrations.iter().all(|m| m.result.is_ok()),
        "{migrations:#?}"
    );
    assert_libvirt_layout(&migrations, e.ports);
    assert!(
        migrations.iter().all(|m| m.result != Ok(held)),
        "libvirt used the allocator's port"
    );
    let alloc = e.allocator.take().unwrap().stop();
    assert_eq!(alloc["grabbed"], 1, "{alloc}");
    assert_eq!(
        alloc["refused"],
        serde_json::json!({}),
        "the allocator was refused a bind in audit mode: {alloc}"
    );
    let (_, denied, audited) = e.counters();
    assert_eq!(denied, 0);
    assert_eq!(
        audited,
        alloc["binds"].as_u64().unwrap(),
        "audited binds vs the allocator's binds"
    );
    let g = e.guard.as_ref().unwrap();
    assert!(guard_lines(g, "denied bind").is_empty());
    let audit = guard_lines(g, "audit: would deny bind");
    let who = format!("cgroup={} ", e.outsider.path());
    assert!(
        audit.iter().any(|l| l.contains(&format!("port={held}/tcp"))
            && l.contains("comm=pg-allocator")
            && l.contains(&who)
            && l.contains(" would_errno=EADDRINUSE")),
        "{audit:#?}"
    );
    assert!(
        audit.iter().all(|l| l.contains(&who)),
        "audit lines for someone else: {audit:#?}"
    );
    eprintln!(
        "[measure] audit: {}; {audited} binds audited, 0 denied, e.g. {}",
        describe(&migrations),
        audit[0]
    );
    e.unload();
}
