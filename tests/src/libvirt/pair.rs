//! Two libvirt hosts and one domain that live-migrates between them.

use std::{
    fs,
    path::Path,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use super::{
    caps::{caps_known, keep_caps, seed_caps},
    cgroup_of,
    cleanup::{MachineCleanup, MountPoints},
    disk_path, disk_pattern, LibvirtHost, LIBVIRTD_START_TIMEOUT, MIGRATE_TIMEOUT,
};
use crate::{Cgroup, TempDir, PREFIX};

static PAIR_SEQ: AtomicUsize = AtomicUsize::new(0);

/// One migration as [`Pair::migrate`] saw it.
#[derive(Clone, Debug)]
pub struct Migration {
    /// "a->b" or "b->a".
    pub direction: &'static str,
    /// `virsh migrate`'s wall time.
    pub took: Duration,
    /// `Ok(port qemu listened on)`, or why it failed (virsh's error).
    pub result: Result<u16, String>,
    /// The destination qemu's cgroup2 path (after a success).
    pub qemu_cgroup: Option<String>,
    /// From the destination libvirtd's log: from its Prepare phase to its Finish phase (qemu
    /// started, port picked, RAM streamed), i.e. the migration without virsh's round trips and
    /// without stopping the source's qemu (which takes 1.5 s and more here).
    pub prepare_to_finish: Option<Duration>,
    /// From the destination libvirtd's log: from libvirt picking the port to qemu being told to
    /// listen on it (`migrate-incoming`): the window another allocator can take the port in.
    pub pick_to_listen: Option<Duration>,
}

/// Seconds since midnight of a libvirt log line ("2026-11-25 23:28:46.082+0000: ...").
fn log_time(line: &str) -> Option<f64> {
    let t = line.get(11..23)?;
    let mut it = t.split(':');
    let (h, m, s): (f64, f64, f64) = (
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    );
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Time from the first line containing `from` to the first later line containing `to`.
fn span(log: &str, from: &str, to: &str) -> Option<Duration> {
    let mut lines = log.lines();
    let start = lines.find(|l| l.contains(from)).and_then(log_time)?;
    let end = lines.find(|l| l.contains(to)).and_then(log_time)?;
    Some(Duration::from_secs_f64((end - start).rem_euclid(86400.0)))
}

/// Two libvirt hosts (A, B) and one diskless domain, started on A. Drop order: the hosts
/// (domains destroyed, daemons killed, namespaces gone), then `/machine` leftovers, then the
/// mount-point dirs, then the temp dir.
pub struct Pair {
    pub a: LibvirtHost,
    pub b: LibvirtHost,
    pub machine: MachineCleanup,
    _mounts: MountPoints,
    pub tmp: TempDir,
    /// Domain names: `<token>a` while on A, `<token>b` while on B.
    pub token: String,
    on_a: bool,
    pub memory_mib: u32,
}

impl Pair {
    /// Starts A in `cg_a` and B in `cg_b` (qemu.conf's migration range = `ports`) and the domain
    /// on A.
    pub fn start(test: &str, cg_a: Cgroup, cg_b: Cgroup, ports: (u16, u16)) -> Pair {
        Pair::start_with(test, cg_a, cg_b, ports, None)
    }

    /// [`Pair::start`], the domain with a raw disk of `disk_mib` MiB when given: on A it starts
    /// with [`disk_pattern`], on B an empty file of the same size waits for a storage migration
    /// (libvirt copies into an existing file; it creates one only in a storage pool).
    pub fn start_with(
        test: &str,
        cg_a: Cgroup,
        cg_b: Cgroup,
        ports: (u16, u16),
        disk_mib: Option<u64>,
    ) -> Pair {
        let seq = PAIR_SEQ.fetch_add(1, Ordering::Relaxed);
        // Letters and digits only: it ends up in cgroup names and hostnames unchanged.
        let token = format!("pgt{}n{seq}", std::process::id());
        let machine = MachineCleanup::new(&token);
        let mounts = MountPoints::new();
        let tmp = TempDir::new(&format!("libvirt-{test}"));
        // The first libvirtd of the process probes qemu's capabilities; the others reuse them.
        let t = Instant::now();
        let probe_first = !caps_known();
        seed_caps(&tmp.path().join("a"));
        let mut a = LibvirtHost::launch(
            "a",
            &format!("{PREFIX}-{token}-a"),
            tmp.path().join("a"),
            cg_a,
            ports,
        );
        if probe_first {
            a.wait_ready(t, LIBVIRTD_START_TIMEOUT);
            keep_caps(&a.root);
        }
        seed_caps(&tmp.path().join("b"));
        let b = LibvirtHost::launch(
            "b",
            &format!("{PREFIX}-{token}-b"),
            tmp.path().join("b"),
            cg_b,
            ports,
        );
        let mut p = Pair {
            a,
            b,
            machine,
            _mounts: mounts,
            tmp,
            token,
            on_a: true,
            memory_mib: 64,
        };
        if !probe_first {
            p.a.wait_ready(t, LIBVIRTD_START_TIMEOUT);
        }
        p.b.wait_ready(t, LIBVIRTD_START_TIMEOUT);
        let dom = p.domain();
        let disk = disk_mib.map(|mib| {
            for (host, pattern) in [(&p.a, true), (&p.b, false)] {
                let dir = host.dir("lib/images");
                fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
                let file = dir.join(format!("{}.img", p.token));
                let f = fs::File::create(&file)
                    .unwrap_or_else(|e| panic!("create {}: {e}", file.display()));
                f.set_len(mib * 1024 * 1024).unwrap();
                if pattern {
                    use std::os::unix::fs::FileExt as _;
                    f.write_all_at(&disk_pattern(), 0).unwrap();
                }
            }
            disk_path(&p.token)
        });
        if let Err(e) = p.a.create_domain(&dom, p.memory_mib, disk.as_deref()) {
            panic!("creating domain {dom} on A: {e}");
        }
        assert_eq!(p.a.domstate(&dom).as_deref(), Ok("running"));
        eprintln!(
            "[libvirt] domain {dom} running on A (qemu pid {:?})",
            p.a.qemu_pid(&dom)
        );
        p
    }

    /// The domain's current name.
    pub fn domain(&self) -> String {
        format!("{}{}", self.token, if self.on_a { "a" } else { "b" })
    }

    /// The host the domain runs on now.
    pub fn source(&self) -> &LibvirtHost {
        if self.on_a {
            &self.a
        } else {
            &self.b
        }
    }

    /// The other host.
    pub fn dest(&self) -> &LibvirtHost {
        if self.on_a {
            &self.b
        } else {
            &self.a
        }
    }

    /// `virsh migrate --live DOM DEST_URI --migrateuri MIGRATEURI --dname NEW` from wherever the
    /// domain is to the other host. On success the domain must be running on the destination
    /// and gone from the source; on failure it must still run on the source (libvirt rolls
    /// back), or this panics.
    pub fn migrate(&mut self, migrateuri: &str) -> Migration {
        self.migrate_with(migrateuri, &[])
    }

    /// The first `len` bytes of the disk file as the host that holds the domain now sees it.
    pub fn disk_head(&self, len: usize) -> Vec<u8> {
        let file = self
            .source()
            .dir("lib/images")
            .join(format!("{}.img", self.token));
        let mut data = fs::read(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        data.truncate(len);
        data
    }

    /// [`Pair::migrate`] with more `virsh migrate` arguments (e.g. `--copy-storage-all
    /// --disks-port P`).
    pub fn migrate_with(&mut self, migrateuri: &str, extra: &[&str]) -> Migration {
        let (src, dst) = (self.source(), self.dest());
        let direction = if self.on_a { "a->b" } else { "b->a" };
        let dom = self.domain();
        let dname = format!("{}{}", self.token, if self.on_a { "b" } else { "a" });
        let before = dst.incoming_ports().len();
        let log_at = dst.log().len();
        let t = Instant::now();
        let r = src.virsh(
            &[
                "migrate",
                "--live",
                &dom,
                &dst.uri,
                "--migrateuri",
                migrateuri,
                "--dname",
                &dname,
            ]
            .into_iter()
            .chain(extra.iter().copied())
            .collect::<Vec<_>>(),
            MIGRATE_TIMEOUT,
        );
        let took = t.elapsed();
        match r {
            Ok(_) => {
                let state = dst.domstate(&dname);
                assert_eq!(
                    state.as_deref(),
                    Ok("running"),
                    "{dname} after migrating {direction}"
                );
                assert!(
                    src.domstate(&dom).is_err(),
                    "{dom} still on the source after migrating {direction}"
                );
                let port = *dst.incoming_ports()[before..].last().unwrap_or_else(|| {
                    panic!("{direction}: no \"Setting up incoming migration\" line in the destination's log")
                });
                let qemu_cgroup = dst.qemu_pid(&dname).and_then(cgroup_of);
                let log = dst.log();
                let log = log.get(log_at..).unwrap_or("");
                let prepare_to_finish = span(
                    log,
                    "qemuMigrationDstPrepareDirect",
                    "qemuMigrationDstFinish",
                );
                let pick_to_listen = span(
                    log,
                    "Generated uri_out=",
                    "Setting up incoming migration with URI",
                );
                self.on_a = !self.on_a;
                Migration {
                    direction,
                    took,
                    result: Ok(port),
                    qemu_cgroup,
                    prepare_to_finish,
                    pick_to_listen,
                }
            }
            Err(e) => {
                let state = src.domstate(&dom);
                if state.as_deref() != Ok("running") {
                    src.dump_logs();
                    dst.dump_logs();
                    panic!("{dom} is {state:?} on the source after a failed migration {direction} ({e})");
                }
                Migration {
                    direction,
                    took,
                    result: Err(e),
                    qemu_cgroup: None,
                    prepare_to_finish: None,
                    pick_to_listen: None,
                }
            }
        }
    }
}

/// With `PG_LIBVIRT_LOGS=DIR` set, both hosts' log directories (libvirtd.log, virtlogd.log, the
/// qemu logs) are copied to `DIR/<token>/{a,b}` when the pair ends, pass or fail.
impl Drop for Pair {
    fn drop(&mut self) {
        let Some(dir) = std::env::var_os("PG_LIBVIRT_LOGS") else {
            return;
        };
        for h in [&self.a, &self.b] {
            let to = Path::new(&dir).join(&self.token).join(&h.name);
            let r = fs::create_dir_all(to.join("qemu")).and_then(|()| {
                for f in fs::read_dir(h.dir("log"))?
                    .chain(fs::read_dir(h.dir("log/qemu"))?)
                    .flatten()
                {
                    if f.path().is_file() {
                        let rel = f.path().strip_prefix(h.dir("log")).unwrap().to_owned();
                        fs::copy(f.path(), to.join(rel))?;
                    }
                }
                Ok(())
            });
            match r {
                Ok(()) => eprintln!("[libvirt] logs of {} kept in {}", h.name, to.display()),
                Err(e) => eprintln!(
                    "[libvirt] keeping the logs of {} in {}: {e}",
                    h.name,
                    to.display()
                ),
            }
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// "mean M, median D, max X" of `v`.
fn stats(mut v: Vec<Duration>) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort();
    let mean = v.iter().sum::<Duration>() / v.len() as u32;
    format!(
        "mean {}, median {}, max {}",
        ms(mean),
        ms(v[v.len() / 2]),
        ms(*v.last().unwrap())
    )
}

/// Completed/run, virsh's wall time, and libvirt's prepare-to-finish and pick-to-listen times
/// of the completed migrations.
pub fn describe(ms_: &[Migration]) -> String {
    let ok: Vec<&Migration> = ms_.iter().filter(|m| m.result.is_ok()).collect();
    format!(
        "{}/{} completed; virsh migrate: {}; libvirt prepare->finish: {}; port pick->listen: {}",
        ok.len(),
        ms_.len(),
        stats(ok.iter().map(|m| m.took).collect()),
        stats(ok.iter().filter_map(|m| m.prepare_to_finish).collect()),
        stats(ok.iter().filter_map(|m| m.pick_to_listen).collect()),
    )
}

/// Every completed migration's port is in the range and its qemu runs below /machine.
#[track_caller]
pub fn assert_libvirt_layout(ms_: &[Migration], ports: (u16, u16)) {
    for m in ms_ {
        if let Ok(p) = m.result {
            assert!((ports.0..=ports.1).contains(&p), "{m:?}");
            let cg = m.qemu_cgroup.as_deref().unwrap_or("");
            assert!(
                cg.starts_with("/machine/qemu-"),
                "destination qemu is in {cg:?}, not below /machine"
            );
        }
    }
}
