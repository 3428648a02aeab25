//! Real libvirt end to end (issue 9): two libvirtd 9.0 daemons on this machine live-migrate a
//! diskless domain back and forth under port-guard, configured the way docs/libvirt.md tells
//! operators to. No mock of libvirt anywhere.
//!
//! Layout per test: `/pg-test-<test>-<pid>` with children `libvirtd-a`, `libvirtd-b` (each
//! libvirtd + virtlogd pair, in its own mount and UTS namespace: see `integration_tests::libvirt`),
//! `outsider` (pg-allocator, another port allocator on the host) and `spawn` (the guard's spawn
//! parent, where `lease` makes its scratch cgroup). libvirt puts the VMs under `/machine` at the
//! cgroup2 root (no systemd), so the guard is attached at the cgroup2 root, as the docs' config
//! says: allowed here only because every test reserves a test-only range (below), outside the
//! ephemeral range 32768-60999. The guard is unloaded on every path: explicitly at the end (and
//! the test checks that `net.ipv4.ip_local_reserved_ports` is back to what it was), and by
//! `PinDir`'s drop when an assertion fails.
//!
//! The config is contrib/libvirt-host.toml (the file docs/libvirt.md shows and tells operators
//! to install) with only the test-specific values rewritten: see [`host_config`].
//!
//! Needs root, the agent built, and libvirt + qemu (installed from Debian when missing; skipped
//! where that is impossible, e.g. the busybox guests of `cargo xtask vm-test`). About 2 minutes
//! on a 2-core machine (plus the apt-get install the first time).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use integration_tests::{
    libvirt::{self, Allocator, Migration, Pace, Pair},
    *,
};
use serde_json::Value;

const ALLOCATOR: &str = env!("CARGO_BIN_EXE_pg-allocator");

/// pg-allocator's pace: probe the lowest free port, bind it 5 ms later, hold it 100 ms, wait
/// 100 ms with nothing held, again. When no port is free (the guard refuses every probe) it
/// probes the whole range again every 10 ms: one to two thousand refused binds a second. libvirt
/// picks its port about 400 ms before qemu binds it; when it picks during the allocator's gap,
/// the allocator's next probe finds the same port free and takes it (without the guard).
const PACE: Pace = Pace {
    moment_ms: 5,
    hold_ms: 100,
    gap_ms: 100,
    retry_ms: 10,
};

// ---------------------------------------------------------------------------------------------
// The config: contrib/libvirt-host.toml, tested
// ---------------------------------------------------------------------------------------------

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// contrib/libvirt-host.toml, the file docs/libvirt.md tells operators to install, with only the
/// values that must differ in a test rewritten (whole lines, found by key; each must be there
/// exactly once):
///
/// - `ports`: the test's range instead of libvirt's 49152-49215. The guard is attached at the
///   cgroup2 root of a shared machine: reserving the real range would refuse those ports to
///   every process on it (and, with protect_ephemeral, keep the kernel from picking them). The
///   test range is outside the ephemeral range, and each libvirtd's qemu.conf has it as
///   migration_port_min/max (the docs: keep both equal).
/// - `allow`: libvirtd runs without systemd (the harness starts it by hand and hides the system
///   bus from it), so it is not in /system.slice/libvirtd.service but in the test's own cgroups,
///   and libvirt puts its VMs in /machine (its partition without systemd, the docs' "Without
///   systemd" case), not /machine.slice.
/// - `spawn_parent`: `port-guard lease` makes its scratch cgroup there; a cgroup of the test's
///   keeps the test from creating (and leaving) /port-guard at the host's cgroup root.
/// - `extra`: string settings a test is about (`mode = "audit"`; `errno = "eperm"` to show
///   what the docs warn against).
///
/// Kept from the file: `attach = "/"` (the VMs live under /machine at the root: the guard must
/// see them; allowed here only because the range is test-only), `errno = "eaddrinuse"` (what
/// libvirt's allocator needs), `protect_ephemeral = true` (the tests check that unload restores
/// the sysctl exactly), and whatever else the file says.
fn host_config(
    ports: (u16, u16),
    allow: &[&str],
    spawn_parent: &str,
    extra: &[(&str, &str)],
) -> String {
    let path = repo_file("contrib/libvirt-host.toml");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(
        text.matches("[[reserve]]").count(),
        1,
        "{} should have one [[reserve]] table",
        path.display()
    );
    let quoted: Vec<String> = allow.iter().map(|a| format!("\"{a}\"")).collect();
    let mut replace = vec![
        ("ports", format!("ports = \"{}-{}\"", ports.0, ports.1)),
        ("allow", format!("allow = [{}]", quoted.join(", "))),
        ("spawn_parent", format!("spawn_parent = \"{spawn_parent}\"")),
    ];
    for (k, v) in extra {
        // A number is written as one; an empty value takes the key out (the file's default).
        let line = if v.is_empty() {
            format!("# {k}: left out by the test")
        } else if v.parse::<u64>().is_ok() {
            format!("{k} = {v}")
        } else {
            format!("{k} = \"{v}\"")
        };
        replace.push((k, line));
    }
    let mut seen = vec![0; replace.len()];
    let out: Vec<String> = text
        .lines()
        .map(|line| {
            let t = line.trim_start();
            if t.starts_with('#') {
                return line.to_owned();
            }
            let key = t.split('=').next().unwrap_or("").trim();
            match replace.iter().position(|(k, _)| *k == key) {
                Some(i) => {
                    seen[i] += 1;
                    replace[i].1.clone()
                }
                None => line.to_owned(),
            }
        })
        .collect();
    for ((k, _), n) in replace.iter().zip(&seen) {
        assert_eq!(*n, 1, "{} should set `{k}` exactly once", path.display());
    }
    out.join("\n") + "\n"
}

#[test]
fn the_docs_config_example_is_contrib_libvirt_host_toml() {
    // docs/libvirt.md says "the integration tests load this exact file": its example must be the
    // file (comments aside), so that what the docs show is what the tests below run.
    if !repo_file("docs/libvirt.md").exists() {
        skip("the source tree is not here (e.g. a `cargo xtask vm-test` guest)");
        return;
    }
    let doc = fs::read_to_string(repo_file("docs/libvirt.md")).unwrap();
    let block = doc
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a ```toml block in docs/libvirt.md");
    let file = fs::read_to_string(repo_file("contrib/libvirt-host.toml")).unwrap();
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

// ---------------------------------------------------------------------------------------------
// The guard daemon, its stderr in a file (denials come by the thousand)
// ---------------------------------------------------------------------------------------------

struct Guard {
    child: Child,
    log: PathBuf,
}

/// A wait long enough for the daemon's "more denials by" summary, which comes every 5 s.
fn summary_timeout(t: Duration) -> Duration {
    t.max(Duration::from_secs(5) + LOG_TIMEOUT)
}

impl Guard {
    fn start(pin: &PinDir, config: &Path, log: PathBuf) -> Guard {
        let file = fs::File::create(&log).unwrap();
        let mut c = Command::new(bin());
        c.arg("--pin-dir")
            .arg(pin.path())
            .arg("--config")
            .arg(config)
            .arg("daemon");
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file);
        eprintln!("[guard] {c:?} (stderr in {})", log.display());
        let child = c.spawn().expect("starting port-guard daemon");
        let mut g = Guard { child, log };
        // "guard enforcing: …", or in audit mode "guard auditing (nothing is refused): …".
        g.wait_line(0, "the start-up line", START_TIMEOUT, |l| {
            l.contains("guard enforcing:") || l.contains("guard auditing")
        });
        g
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn lines(&self) -> Vec<String> {
        self.log().lines().map(str::to_owned).collect()
    }

    /// The first line at index >= `skip` that contains `needle`.
    fn wait_for(&mut self, skip: usize, needle: &str, timeout: Duration) -> String {
        self.wait_line(skip, &format!("{needle:?}"), timeout, |l| {
            l.contains(needle)
        })
    }

    /// The first report of a denial with `errno` from `cgroup` or below it: its own line, or,
    /// when the cgroup had used its budget of lines (libvirt probes every port of the range in
    /// a burst), the "more denials by" summary whose last denial it is.
    fn wait_for_denial(
        &mut self,
        skip: usize,
        cgroup: &str,
        errno: &str,
        timeout: Duration,
    ) -> String {
        let who = format!("cgroup={cgroup}");
        let errno = format!("errno={errno}");
        self.wait_line(
            skip,
            &format!("a denial with {errno} from {cgroup}"),
            summary_timeout(timeout),
            |l| {
                (l.contains("denied bind") || l.contains("more denials by"))
                    && l.contains(&who)
                    && l.contains(&errno)
            },
        )
    }

    fn wait_line(
        &mut self,
        skip: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let t = Instant::now();
        loop {
            if let Some(l) = self.lines().into_iter().skip(skip).find(|l| pred(l)) {
                return l;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "port-guard daemon exited ({st}) before logging {what}:\n{}",
                    self.log()
                );
            }
            if t.elapsed() > timeout {
                panic!(
                    "port-guard daemon: no {what} within {timeout:?}:\n{}",
                    libvirt::tail(&self.log(), 100)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Rewrites `config` with `text`, sends SIGHUP and waits for the reload.
    fn reload(&mut self, config: &Path, text: &str) {
        fs::write(config, text).unwrap();
        let skip = self.lines().len();
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
        self.wait_for(skip, "SIGHUP: config reloaded", LOG_TIMEOUT);
    }

    /// SIGTERM: the daemon exits, the guard stays attached (pinned).
    fn terminate(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let ok = wait_until(Duration::from_secs(30), || {
            self.child.try_wait().ok().flatten()
        });
        assert!(
            ok.is_some_and(|s| s.success()),
            "port-guard daemon after SIGTERM: {ok:?}"
        );
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "===== port-guard daemon log (tail) =====\n{}",
                libvirt::tail(&self.log(), 80)
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// A test's world
// ---------------------------------------------------------------------------------------------

/// Drop order is field order: the allocator, the guard daemon, the guard itself (PinDir:
/// unload), libvirt (domains destroyed, daemons killed, /machine leftovers removed), and the
/// test's cgroups last.
struct Env {
    allocator: Option<Allocator>,
    guard: Option<Guard>,
    pin: PinDir,
    pair: Pair,
    outsider: Cgroup,
    spawn_parent: Cgroup,
    ports: (u16, u16),
    config: PathBuf,
    /// net.ipv4.ip_local_reserved_ports before the guard (protect_ephemeral changes it).
    sysctl_before: String,
    /// Owns (and on drop empties and removes) every cgroup above.
    _cg: TestCgroup,
}

impl Env {
    /// `None` (the test is skipped, reason printed) where libvirt cannot run.
    fn new(test: &str, ports: (u16, u16)) -> Option<Env> {
        Env::new_with(test, ports, None)
    }

    /// [`Env::new`], the domain with a disk of `disk_mib` MiB (for storage migrations).
    fn new_with(test: &str, ports: (u16, u16), disk_mib: Option<u64>) -> Option<Env> {
        if let Err(why) = libvirt::ensure_installed() {
            skip(&format!("real libvirt is not available here: {why}"));
            return None;
        }
        if !kernel_features().set_retval && !kernel_features().sentinel {
            skip("kernel without bpf_set_retval (before 6.1) and the sentinel off: refused binds get EPERM, which fails libvirt's allocator (docs/libvirt.md)");
            return None;
        }
        libvirt::sweep_dead_runs("lv-");
        let cg = TestCgroup::new(test);
        let (a, b) = (cg.child("libvirtd-a"), cg.child("libvirtd-b"));
        let outsider = cg.child("outsider");
        let spawn_parent = cg.child("spawn");
        let pin = PinDir::new(test);
        let pair = Pair::start_with(test, a, b, ports, disk_mib);
        let config = pair.tmp.path().join("port-guard.toml");
        Some(Env {
            allocator: None,
            guard: None,
            pin,
            pair,
            outsider,
            spawn_parent,
            ports,
            config,
            sysctl_before: libvirt::reserved_ports(),
            _cg: cg,
        })
    }

    /// The docs' allow list, made concrete: both libvirtd cgroups, and libvirt's VM partition.
    fn docs_allow(&self) -> Vec<String> {
        vec![
            self.pair.a.cgroup.path().to_owned(),
            self.pair.b.cgroup.path().to_owned(),
            "/machine".to_owned(),
        ]
    }

    fn config_text(&self, allow: &[String], extra: &[(&str, &str)]) -> String {
        let allow: Vec<&str> = allow.iter().map(String::as_str).collect();
        host_config(self.ports, &allow, self.spawn_parent.path(), extra)
    }

    /// Starts the guard with `text` as its config and checks that `status` shows it.
    fn start_guard(&mut self, text: &str, mode: &str, allow: &[String]) {
        fs::write(&self.config, text).unwrap();
        eprintln!("[guard] config:\n{text}");
        let g = Guard::start(
            &self.pin,
            &self.config,
            self.pair.tmp.path().join("port-guard.log"),
        );
        self.guard = Some(g);
        let st = status_json(self.pin.path());
        assert_eq!(st["attached"], true, "{st:#}");
        assert_eq!(st["attach"], "/", "{st:#}");
        assert_eq!(st["mode"], mode, "{st:#}");
        assert_eq!(st["errno"], "eaddrinuse", "{st:#}");
        assert_eq!(st["effective_errno"], "eaddrinuse", "{st:#}");
        assert_eq!(st["protect_ephemeral"], true, "{st:#}");
        assert_eq!(
            st["reserve"][0]["ports"],
            format!("{}-{}", self.ports.0, self.ports.1),
            "{st:#}"
        );
        // (status lists them sorted)
        let mut got: Vec<&str> = st["reserve"][0]["allow"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let mut want: Vec<&str> = allow.iter().map(String::as_str).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{st:#}");
        // protect_ephemeral: the range is in the host's reserved ports while the guard is loaded.
        let now = libvirt::reserved_ports();
        assert!(
            now.contains(&format!("{}-{}", self.ports.0, self.ports.1)),
            "ip_local_reserved_ports = {now:?}"
        );
    }

    fn guard(&mut self) -> &mut Guard {
        self.guard.as_mut().expect("guard daemon running")
    }

    /// (allowed, denied, audited) of the range, from the kernel's counters.
    fn counters(&self) -> (u64, u64, u64) {
        let st = status_json(self.pin.path());
        let c = &st["reserve"][0]["counters"];
        let n = |k: &str| {
            c[k].as_u64()
                .unwrap_or_else(|| panic!("counter {k}: {st:#}"))
        };
        (n("allowed"), n("denied"), n("audited"))
    }

    /// Stops the daemon (the guard stays), unloads the guard, and checks that everything is
    /// gone and the sysctl is exactly what it was before the guard.
    fn unload(&mut self) {
        if let Some(mut g) = self.guard.take() {
            g.terminate();
        }
        let (code, _, err) = run(&["--pin-dir", self.pin.as_str(), "unload"]);
        assert_eq!(code, 0, "unload: {err}");
        assert!(!self.pin.exists(), "pin dir left after unload");
        assert_eq!(
            libvirt::reserved_ports(),
            self.sysctl_before,
            "net.ipv4.ip_local_reserved_ports is not back to its value before the guard"
        );
    }

    /// `n` migrations, alternating direction, libvirt choosing the port.
    fn migrations(&mut self, phase: &str, n: usize) -> Vec<Migration> {
        (0..n)
            .map(|i| {
                let m = self.pair.migrate("tcp://127.0.0.1");
                eprintln!(
                    "[migration] {phase} #{i} {}: {} in {} ms (libvirt prepare->finish {:?}, port pick->listen {:?}; destination qemu in {})",
                    m.direction,
                    match &m.result {
                        Ok(p) => format!("completed, port {p}"),
                        Err(e) => format!("FAILED: {e}"),
                    },
                    m.took.as_millis(),
                    m.prepare_to_finish.map(|d| d.as_millis()),
                    m.pick_to_listen.map(|d| d.as_millis()),
                    m.qemu_cgroup.as_deref().unwrap_or("-")
                );
                m
            })
            .collect()
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
fn describe(ms_: &[Migration]) -> String {
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
fn assert_libvirt_layout(ms_: &[Migration], ports: (u16, u16)) {
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

/// "denied"/"audit" lines of the guard's log.
fn guard_lines(g: &Guard, what: &str) -> Vec<String> {
    g.lines().into_iter().filter(|l| l.contains(what)).collect()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn migrations_under_the_guard_while_another_allocator_races_for_the_range() {
    const BASELINE: usize = 6;
    const GUARD_ONLY: usize = 6;
    const GUARDED: usize = 20;
    const UNGUARDED: usize = 12;
    let Some(mut e) = Env::new("lv-enforce", (62700, 62719)) else {
        return;
    };

    // 1. Baseline: no guard, no other allocator.
    let baseline = e.migrations("baseline", BASELINE);
    assert!(
        baseline.iter().all(|m| m.result.is_ok()),
        "baseline migrations failed: {baseline:#?}"
    );

    // 2. The guard as the docs configure it.
    let allow = e.docs_allow();
    let text = e.config_text(&allow, &[]);
    e.start_guard(&text, "enforce", &allow);
    let guard_only = e.migrations("guard", GUARD_ONLY);
    assert!(
        guard_only.iter().all(|m| m.result.is_ok()),
        "migrations under the guard failed: {guard_only:#?}"
    );

    // 3. The guard, and another allocator in a cgroup the guard does not allow.
    let (allowed0, denied0, _) = e.counters();
    let skip = e.guard().lines().len();
    e.allocator = Some(Allocator::start(ALLOCATOR, &e.outsider, e.ports, PACE));
    let guarded = e.migrations("guard+allocator", GUARDED);
    let alloc = e.allocator.take().unwrap().stop();
    let (allowed1, denied1, audited1) = e.counters();
    let failed: Vec<_> = guarded.iter().filter(|m| m.result.is_err()).collect();
    assert!(
        failed.is_empty(),
        "migrations failed under the guard: {failed:#?}"
    );
    assert_libvirt_layout(&guarded, e.ports);
    // Every bind the allocator made was refused, with EADDRINUSE, and the kernel counted exactly
    // those: nothing else on the host was refused a port of the range meanwhile.
    let binds = alloc["binds"].as_u64().unwrap();
    let refused = alloc["refused"][libc::EADDRINUSE.to_string()]
        .as_u64()
        .unwrap_or(0);
    assert!(binds > 100, "the allocator hardly tried: {alloc}");
    assert_eq!(
        refused, binds,
        "not every bind of the allocator was refused with EADDRINUSE: {alloc}"
    );
    assert_eq!(
        alloc["refused"].as_object().unwrap().len(),
        1,
        "other errnos: {alloc}"
    );
    assert_eq!(alloc["grabbed"], 0, "{alloc}");
    assert_eq!(
        denied1 - denied0,
        binds,
        "kernel's denied counter vs the allocator's refused binds"
    );
    assert_eq!(audited1, 0);
    // libvirt's own allocator probes by binding (v6 and v4 wildcards) and qemu binds the port:
    // at least three allowed binds of the range per migration, none of them refused.
    assert!(
        allowed1 - allowed0 >= 3 * GUARDED as u64,
        "allowed binds {} for {GUARDED} migrations",
        allowed1 - allowed0
    );
    let denials: Vec<String> = e
        .guard()
        .lines()
        .into_iter()
        .skip(skip)
        .filter(|l| l.contains("denied bind"))
        .collect();
    assert!(!denials.is_empty(), "no denial logged");
    let who = format!("cgroup={} ", e.outsider.path());
    for l in &denials {
        assert!(
            l.contains("comm=pg-allocator") && l.contains(&who) && l.contains("errno=EADDRINUSE"),
            "a denial of someone else: {l}"
        );
    }
    eprintln!("[guard] e.g. {}", denials[0]);

    // 4. Unload: everything restored.
    e.unload();

    // 5. The same race without the guard.
    e.allocator = Some(Allocator::start(ALLOCATOR, &e.outsider, e.ports, PACE));
    let unguarded = e.migrations("allocator, no guard", UNGUARDED);
    let alloc_unguarded = e.allocator.take().unwrap().stop();
    let unguarded_failures: Vec<&String> = unguarded
        .iter()
        .filter_map(|m| m.result.as_ref().err())
        .collect();

    let ports_used: std::collections::BTreeSet<u16> = guarded
        .iter()
        .filter_map(|m| m.result.as_ref().ok().copied())
        .collect();
    eprintln!(
        "[measure] libvirt baseline (no guard, no allocator): {}",
        describe(&baseline)
    );
    eprintln!(
        "[measure] libvirt with the guard, no allocator:       {}",
        describe(&guard_only)
    );
    eprintln!("[measure] libvirt with the guard and the allocator:   {}; ports libvirt used {ports_used:?}", describe(&guarded));
    eprintln!(
        "[measure] allocator under the guard: {binds} binds, {refused} refused with EADDRINUSE (kernel: {} denied), 0 grabbed; \
         libvirt's binds allowed: {}",
        denied1 - denied0,
        allowed1 - allowed0
    );
    eprintln!(
        "[measure] libvirt with the allocator and no guard:    {}; allocator {alloc_unguarded}",
        describe(&unguarded)
    );
    for f in &unguarded_failures {
        eprintln!("[measure]   unguarded failure: {f}");
    }
    // Without the guard the allocator gets ports of the range (and may take libvirt's).
    assert!(
        alloc_unguarded["grabbed"].as_u64().unwrap() > 0,
        "{alloc_unguarded}"
    );
    if unguarded_failures.is_empty() {
        skip_part(
            "the allocator happened not to beat libvirt in any unguarded migration this time",
        );
    }
}

#[test]
fn a_port_leased_to_machine_carries_the_migration_and_nothing_else_binds_it() {
    let Some(mut e) = Env::new("lv-lease", (62720, 62739)) else {
        return;
    };
    let allow = e.docs_allow();
    let text = e.config_text(&allow, &[]);
    e.start_guard(&text, "enforce", &allow);
    e.allocator = Some(Allocator::start(ALLOCATOR, &e.outsider, e.ports, PACE));
    let errno = libc::EADDRINUSE;
    for i in 0..2 {
        // On the destination: lease a port to libvirt's VM partition.
        let (code, out, err) = run(&["--pin-dir", e.pin.as_str(), "lease", "--cgroup", "/machine"]);
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
        let stop = Arc::new(AtomicBool::new(false));
        let tries = {
            let (stop, outsider) = (Arc::clone(&stop), e.outsider.clone());
            thread::spawn(move || {
                let mut results = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    results.push(bind_in(&outsider, &BindSpec::tcp(ANY6, port).reuseaddr()));
                    results.push(bind_in(&dest_cg, &BindSpec::tcp(ANY4, port)));
                    thread::sleep(Duration::from_millis(50));
                }
                results
            })
        };
        let m = e.pair.migrate(&format!("tcp://127.0.0.1:{port}"));
        stop.store(true, Ordering::Relaxed);
        let results = tries.join().unwrap();
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
        let (code, _, err) = run(&[
            "--pin-dir",
            e.pin.as_str(),
            "release",
            "--port",
            &port.to_string(),
        ]);
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
    let Some(mut e) = Env::new_with("lv-storage", (62760, 62779), Some(32)) else {
        return;
    };
    let allow = e.docs_allow();
    let text = e.config_text(&allow, &[]);
    e.start_guard(&text, "enforce", &allow);
    e.allocator = Some(Allocator::start(ALLOCATOR, &e.outsider, e.ports, PACE));
    // On the destination: both ports at once, to libvirt's VM partition, with a TTL as the
    // safety net.
    let (code, out, err) = run(&[
        "--pin-dir",
        e.pin.as_str(),
        "lease",
        "--cgroup",
        "/machine",
        "--count",
        "2",
        "--ttl",
        "10m",
        "--json",
    ]);
    assert_eq!(code, 0, "lease: {err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let ports: Vec<u16> = v["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap() as u16)
        .collect();
    let (p0, p1) = (ports[0], ports[1]);
    let errno = libc::EADDRINUSE;
    let denied_before = e.counters().1;
    let stop = Arc::new(AtomicBool::new(false));
    let tries = {
        let (stop, outsider) = (Arc::clone(&stop), e.outsider.clone());
        let dest_cg = e.pair.dest().cgroup.clone();
        thread::spawn(move || {
            let mut results = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for p in [p0, p1] {
                    results.push(bind_in(&outsider, &BindSpec::tcp(ANY6, p).reuseaddr()));
                    results.push(bind_in(&dest_cg, &BindSpec::tcp(ANY4, p)));
                }
                thread::sleep(Duration::from_millis(50));
            }
            results
        })
    };
    let m = e.pair.migrate_with(
        &format!("tcp://127.0.0.1:{p0}"),
        &["--copy-storage-all", "--disks-port", &p1.to_string()],
    );
    stop.store(true, Ordering::Relaxed);
    let results = tries.join().unwrap();
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
    let nbd = e
        .guard()
        .lines()
        .into_iter()
        .filter(|l| l.contains("denied bind") && l.contains(&format!("port={p1}/")))
        .count();
    eprintln!("[measure] {nbd} denial lines name the NBD port {p1}");
    let (code, _, err) = run(&[
        "--pin-dir",
        e.pin.as_str(),
        "release",
        "--cgroup",
        "/machine",
    ]);
    assert_eq!(code, 0, "release: {err}");
    assert_eq!(
        status_json(e.pin.path())["leases_ended"]["released"],
        2,
        "both leases released"
    );
    e.unload();
}

/// A qemu that a guest escaped into (an unprivileged process in another VM's cgroup on the
/// destination) tries to hold the whole range. Without a per-child limit it does, and libvirt
/// fails the migration ("Unable to find an unused port in range 'migration'"); with the docs'
/// `per_child_limit = 2` it gets two ports, and plain and storage migrations go on, libvirt's own
/// probes never refused.
#[test]
fn a_vm_that_holds_the_range_fails_migrations_without_a_limit_and_none_with_the_docs_limit() {
    let Some(mut e) = Env::new_with("lv-share", (62780, 62799), Some(32)) else {
        return;
    };
    let allow = e.docs_allow();
    let unlimited = e.config_text(&allow, &[("per_child_limit", "")]);
    e.start_guard(&unlimited, "enforce", &allow);
    // Another VM on the destination, and the attacker in its qemu's cgroup.
    let dest = e.pair.dest();
    let evil_dom = format!("{}evil", e.pair.domain());
    dest.create_domain(&evil_dom, 64, None)
        .unwrap_or_else(|err| panic!("a second VM: {err}"));
    let evil_cg = dest
        .qemu_pid(&evil_dom)
        .and_then(libvirt::cgroup_of)
        .expect("the second VM's qemu cgroup");
    assert!(evil_cg.starts_with("/machine/"), "{evil_cg}");
    let evil_dir = cgroup2_mount().join(evil_cg.trim_start_matches('/'));
    let grab = |e: &Env| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pg-attack"));
        c.arg("--cgroup")
            .arg(&evil_dir)
            .args(["--uid", "65534", "grab", "0.0.0.0", "tcp"])
            .args([e.ports.0.to_string(), e.ports.1.to_string()])
            .args(["8", "plain"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .current_dir("/");
        let mut child = c.spawn().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        (child, v["ok"].as_array().unwrap().len())
    };

    // Before: no limit. The attacker holds every port and the migration fails.
    let (mut attacker, held) = grab(&e);
    assert_eq!(held, 20, "without a limit one VM holds the whole range");
    let before = e.migrations("one VM holds the range, no limit", 1);
    let _ = attacker.kill();
    let _ = attacker.wait();
    let err = before[0]
        .result
        .as_ref()
        .expect_err("a migration with every port held");
    assert!(
        err.contains("Unable to find an unused port in range 'migration'"),
        "{err}"
    );

    // After: the docs' config, per_child_limit = 2.
    let docs = e.config_text(&allow, &[]);
    assert!(docs.contains("\nper_child_limit = 2\n"), "{docs}");
    let config = e.config.clone();
    e.guard().reload(&config, &docs);
    let (mut attacker, held) = grab(&e);
    assert_eq!(held, 2, "with per_child_limit 2 the VM holds 2 ports");
    let skip = e.guard().lines().len();
    let plain = e.migrations("one VM holds its 2 ports, limit 2", 4);
    let storage = e
        .pair
        .migrate_with("tcp://127.0.0.1", &["--copy-storage-all"]);
    let _ = attacker.kill();
    let _ = attacker.wait();
    eprintln!(
        "[measure] one VM's attacker: 20 of 20 ports held and the migration failed without a limit; 2 of 20 with per_child_limit 2: {}; storage migration {:?} in {} ms",
        describe(&plain),
        storage.result,
        storage.took.as_millis()
    );
    assert!(
        plain.iter().all(|m| m.result.is_ok()),
        "migrations failed with the limit: {plain:#?}"
    );
    assert!(storage.result.is_ok(), "the storage migration: {storage:?}");
    assert!(
        e.pair.disk_head(1024 * 1024) == libvirt::disk_pattern(),
        "the destination's disk does not hold the source's data"
    );
    let limited: Vec<String> = e
        .guard()
        .lines()
        .into_iter()
        .skip(skip)
        .filter(|l| l.contains("reason=limit"))
        .collect();
    for l in &limited {
        assert!(
            l.contains(&format!("unit={}", evil_cg.trim_end_matches("/emulator"))),
            "a refusal for the limit of another unit than the attacker's VM: {l}"
        );
    }
    assert!(
        limited.iter().all(|l| !l.contains("libvirtd")),
        "libvirtd was refused for a limit: {limited:#?}"
    );
    e.unload();
}

#[test]
fn audit_mode_refuses_nothing_and_logs_what_enforce_would_refuse() {
    let Some(mut e) = Env::new("lv-audit", (62740, 62759)) else {
        return;
    };
    let allow = e.docs_allow();
    let text = e.config_text(&allow, &[("mode", "audit")]);
    e.start_guard(&text, "audit", &allow);
    // An allocator that is not refused races libvirt exactly as with no guard at all (the first
    // test's last phase shows what that does): here it takes the lowest port and keeps it, so
    // that every migration can complete. libvirt's probe of that port then fails for real
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

#[test]
fn libvirtd_probes_and_qemu_listens_and_both_must_be_allowed() {
    let Some(mut e) = Env::new("lv-who", (62760, 62779)) else {
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
