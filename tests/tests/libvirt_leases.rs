//! Real libvirt migrating to ports leased to its VM partition (issue 9): a port leased to
//! /machine carries the migration and nothing else binds it, not even libvirtd; a storage
//! migration takes two leased ports at once (memory and NBD). Two libvirtd 9.0 daemons on this
//! machine live-migrate a diskless domain back and forth; no mock of libvirt anywhere.
//!
//! Needs root, the agent built, and libvirt + qemu (installed from Debian when missing; skipped
//! where that is impossible, e.g. the busybox guests of `cargo xtask vm-test`). Layout, the
//! config and its rewriting: `integration_tests::libvirt::LibvirtEnv` and `host_config`.

use integration_tests::{
    libvirt::{self, guard_lines, Allocator, LibvirtEnv, PACE},
    *,
};
use serde_json::Value;

const ALLOCATOR: &str = env!("CARGO_BIN_EXE_pg-allocator");

#[test]
fn a_port_leased_to_machine_carries_the_migration_and_nothing_else_binds_it() {
    let Some(mut e) = LibvirtEnv::new("lv-lease", (62720, 62739)) else {
        return;
    };
    let allow = e.docs_allow();
    let text = e.config_text(&allow, &[]);
    e.start_guard(&text, "enforce", &allow);
    e.allocator = Some(Allocator::start(ALLOCATOR, &e.outsider, e.ports, PACE));
    let errno = libc::EADDRINUSE;
    for i in 0..2 {
        // On the destination: lease a port to libvirt's VM partition.
        let (code, out, err) = e.run(&["lease", "--cgroup", "/machine"]);
        assert_eq!(code, 0, "lease: {err}");
        let port: u16 = out
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("lease printed {out:?}"));
        assert!((e.ports.0..=e.ports.1).contains(&port));
        let st = status_json(e.pin.path());
        let leases = st["leases"].as_array().unwrap();
        assert!(
            leases
                .iter()
                .any(|l| l["port"] == port && l["cgroup"] == "/machine"),
            "{st:#}"
        );
        // From the lease on, nobody outside /machine binds it: not the outsider, and not even
        // libvirtd, which the range allows.
        let dest_cg = e.pair.dest().cgroup.clone();
        assert_eq!(bind_in(&e.outsider, &BindSpec::tcp(ANY4, port)), Err(errno));
        assert_eq!(
            bind_in(&dest_cg, &BindSpec::tcp(ANY6, port).reuseaddr()),
            Err(errno)
        );
        // While the migration runs, keep trying to take the port from both.
        let tries = e.keep_binding(&[port]);
        let m = e.pair.migrate(&format!("tcp://127.0.0.1:{port}"));
        let results = tries.stop();
        eprintln!(
            "[migration] lease #{i} {} to port {port}: {:?} in {} ms",
            m.direction,
            m.result,
            m.took.as_millis()
        );
        assert_eq!(
            m.result,
            Ok(port),
            "the migration did not complete on the leased port"
        );
        assert!(
            m.qemu_cgroup
                .as_deref()
                .is_some_and(|c| c.starts_with("/machine/")),
            "{m:?}"
        );
        assert!(
            results.len() >= 2 && results.iter().all(|r| *r == Err(errno)),
            "binds of the leased port: {results:?}"
        );
        eprintln!("[measure] lease #{i}: {} binds of port {port} from outside /machine during the migration, all EADDRINUSE", results.len());
        // On the destination, once done.
        let (code, _, err) = e.run(&["release", "--port", &port.to_string()]);
        assert_eq!(code, 0, "release: {err}");
        assert_eq!(
            status_json(e.pin.path())["leases"]
                .as_array()
                .unwrap()
                .len(),
            0
        );
    }
    let alloc = e.allocator.take().unwrap().stop();
    assert_eq!(alloc["grabbed"], 0, "{alloc}");
    // libvirt does not probe a port given in --migrateuri (the lease refuses libvirtd, and the
    // migrations completed): only qemu, in /machine, binds it. No refusal of libvirtd's is
    // logged either (the log is rate-limited, so this half is only as good as the log).
    let libvirtd = guard_lines(e.guard.as_ref().unwrap(), "denied bind")
        .into_iter()
        .filter(|l| l.contains("comm=rpc-libvirtd"))
        .collect::<Vec<_>>();
    assert!(libvirtd.is_empty(), "libvirtd was refused: {libvirtd:#?}");
    e.unload();
}

#[test]
fn a_storage_migration_takes_two_leased_ports_and_nothing_else_binds_them() {
    let Some(mut e) = LibvirtEnv::new_with("lv-storage", (62760, 62779), Some(32)) else {
        return;
    };
    let allow = e.docs_allow();
    let text = e.config_text(&allow, &[]);
    e.start_guard(&text, "enforce", &allow);
    e.allocator = Some(Allocator::start(ALLOCATOR, &e.outsider, e.ports, PACE));
    // On the destination: both ports at once, to libvirt's VM partition, with a TTL as the
    // safety net.
    let (code, out, err) = e.run(&[
        "lease", "--cgroup", "/machine", "--count", "2", "--ttl", "10m", "--json",
    ]);
    assert_eq!(code, 0, "lease: {err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let ports = ports_of(&v);
    let (p0, p1) = (ports[0], ports[1]);
    let errno = libc::EADDRINUSE;
    let denied_before = e.counters().1;
    let tries = e.keep_binding(&[p0, p1]);
    let m = e.pair.migrate_with(
        &format!("tcp://127.0.0.1:{p0}"),
        &["--copy-storage-all", "--disks-port", &p1.to_string()],
    );
    let results = tries.stop();
    let denied = e.counters().1 - denied_before;
    let alloc = e.allocator.take().unwrap().stop();
    eprintln!(
        "[measure] storage migration {} (32 MiB raw disk) to ports {p0} (migration) + {p1} (NBD): {:?} in {} ms; {} binds of them from outside /machine meanwhile, all refused; {denied} refusals counted in the range (the hostile allocator's included); allocator: {alloc}",
        m.direction,
        m.result,
        m.took.as_millis(),
        results.len()
    );
    if m.result.is_err() {
        e.pair.source().dump_logs();
        e.pair.dest().dump_logs();
    }
    assert_eq!(
        m.result,
        Ok(p0),
        "the storage migration did not complete on the leased port"
    );
    assert!(
        results.len() >= 4 && results.iter().all(|r| *r == Err(errno)),
        "binds of the leased ports: {results:?}"
    );
    assert!(
        denied >= results.len() as u64,
        "{denied} < {}",
        results.len()
    );
    assert_eq!(alloc["grabbed"], 0, "{alloc}");
    // The disk came along: the destination's file starts with the source's pattern.
    assert!(
        e.pair.disk_head(1024 * 1024) == libvirt::disk_pattern(),
        "the destination's disk does not hold the source's data"
    );
    // The NBD server listened on the second leased port (qemu, in /machine).
    let nbd = guard_lines(e.guard(), "denied bind")
        .iter()
        .filter(|l| l.contains(&format!("port={p1}/")))
        .count();
    eprintln!("[measure] {nbd} denial lines name the NBD port {p1}");
    let (code, _, err) = e.run(&["release", "--cgroup", "/machine"]);
    assert_eq!(code, 0, "release: {err}");
    assert_eq!(
        status_json(e.pin.path())["leases_ended"]["released"],
        2,
        "both leases released"
    );
    e.unload();
}
