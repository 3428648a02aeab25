//! A libvirt test's world: two libvirt hosts and their domain ([`Pair`]), the guard configured
//! the docs' way ([`host_config`]) and its daemon ([`Guard`]), another allocator's cgroup.
//!
//! Layout per test: `/pg-test-<test>-<pid>` with children `libvirtd-a`, `libvirtd-b` (each
//! libvirtd + virtlogd pair, in its own mount and UTS namespace: see [`super`]), `outsider`
//! (pg-allocator, another port allocator on the host) and `spawn` (the guard's spawn parent,
//! where `lease` makes its scratch cgroup). libvirt puts the VMs under `/machine` at the cgroup2
//! root (no systemd), so the guard is attached at the cgroup2 root, as the docs' config says:
//! allowed here only because every test reserves a test-only range, outside the ephemeral range
//! 32768-60999. The guard is unloaded on every path: explicitly at the end ([`LibvirtEnv::unload`]
//! checks that `net.ipv4.ip_local_reserved_ports` is back to what it was), and by `PinDir`'s drop
//! when an assertion fails.

use std::{
    fs,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use serde_json::Value;

use super::{
    ensure_installed, host_config, reserved_ports, sweep_dead_runs, Allocator, Guard, Migration,
    Pace, Pair,
};
use crate::{
    bind_in, kernel_features, run, skip, status_json, BindSpec, Cgroup, PinDir, TestCgroup, ANY4,
    ANY6,
};

/// pg-allocator's pace: probe the lowest free port, bind it 5 ms later, hold it 100 ms, wait
/// 100 ms with nothing held, again. When no port is free (the guard refuses every probe) it
/// probes the whole range again every 10 ms: one to two thousand refused binds a second. libvirt
/// picks its port about 400 ms before qemu binds it; when it picks during the allocator's gap,
/// the allocator's next probe finds the same port free and takes it (without the guard).
pub const PACE: Pace = Pace {
    moment_ms: 5,
    hold_ms: 100,
    gap_ms: 100,
    retry_ms: 10,
};

/// Drop order is field order: the allocator, the guard daemon, the guard itself (PinDir:
/// unload), libvirt (domains destroyed, daemons killed, /machine leftovers removed), and the
/// test's cgroups last.
pub struct LibvirtEnv {
    pub allocator: Option<Allocator>,
    pub guard: Option<Guard>,
    pub pin: PinDir,
    pub pair: Pair,
    pub outsider: Cgroup,
    pub spawn_parent: Cgroup,
    pub ports: (u16, u16),
    pub config: PathBuf,
    /// net.ipv4.ip_local_reserved_ports before the guard (protect_ephemeral changes it).
    pub sysctl_before: String,
    /// Owns (and on drop empties and removes) every cgroup above.
    _cg: TestCgroup,
}

impl LibvirtEnv {
    /// `None` (the test is skipped, reason printed) where libvirt cannot run.
    pub fn new(test: &str, ports: (u16, u16)) -> Option<LibvirtEnv> {
        LibvirtEnv::new_with(test, ports, None)
    }

    /// [`LibvirtEnv::new`], the domain with a disk of `disk_mib` MiB (for storage migrations).
    pub fn new_with(test: &str, ports: (u16, u16), disk_mib: Option<u64>) -> Option<LibvirtEnv> {
        if let Err(why) = ensure_installed() {
            skip(&format!("real libvirt is not available here: {why}"));
            return None;
        }
        if !kernel_features().set_retval && !kernel_features().sentinel {
            skip("kernel without bpf_set_retval (before 6.1) and the sentinel off: refused binds get EPERM, which fails libvirt's allocator (docs/libvirt.md)");
            return None;
        }
        sweep_dead_runs("lv-");
        let cg = TestCgroup::new(test);
        let (a, b) = (cg.child("libvirtd-a"), cg.child("libvirtd-b"));
        let outsider = cg.child("outsider");
        let spawn_parent = cg.child("spawn");
        let pin = PinDir::new(test);
        let pair = Pair::start_with(test, a, b, ports, disk_mib);
        let config = pair.tmp.path().join("port-guard.toml");
        Some(LibvirtEnv {
            allocator: None,
            guard: None,
            pin,
            pair,
            outsider,
            spawn_parent,
            ports,
            config,
            sysctl_before: reserved_ports(),
            _cg: cg,
        })
    }

    /// The docs' allow list, made concrete: both libvirtd cgroups, and libvirt's VM partition.
    pub fn docs_allow(&self) -> Vec<String> {
        vec![
            self.pair.a.cgroup.path().to_owned(),
            self.pair.b.cgroup.path().to_owned(),
            "/machine".to_owned(),
        ]
    }

    pub fn config_text(&self, allow: &[String], extra: &[(&str, &str)]) -> String {
        let allow: Vec<&str> = allow.iter().map(String::as_str).collect();
        host_config(self.ports, &allow, self.spawn_parent.path(), extra)
    }

    /// Starts the guard with `text` as its config and checks that `status` shows it.
    pub fn start_guard(&mut self, text: &str, mode: &str, allow: &[String]) {
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
        let now = reserved_ports();
        assert!(
            now.contains(&format!("{}-{}", self.ports.0, self.ports.1)),
            "ip_local_reserved_ports = {now:?}"
        );
    }

    /// `port-guard --pin-dir PIN ARGS...`: (exit code, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        let mut all = vec!["--pin-dir", self.pin.as_str()];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Keeps trying, every 50 ms until [`BindAttempts::stop`], to take each of `ports` from
    /// outside /machine: from the outsider (v6 wildcard, SO_REUSEADDR) and from the destination's
    /// libvirtd, which the range allows (v4 wildcard).
    pub fn keep_binding(&self, ports: &[u16]) -> BindAttempts {
        let stop = Arc::new(AtomicBool::new(false));
        let (outsider, dest_cg) = (self.outsider.clone(), self.pair.dest().cgroup.clone());
        let ports = ports.to_vec();
        let thread = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut results = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    for &p in &ports {
                        results.push(bind_in(&outsider, &BindSpec::tcp(ANY6, p).reuseaddr()));
                        results.push(bind_in(&dest_cg, &BindSpec::tcp(ANY4, p)));
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                results
            })
        };
        BindAttempts { stop, thread }
    }

    pub fn guard(&mut self) -> &mut Guard {
        self.guard.as_mut().expect("guard daemon running")
    }

    /// (allowed, denied, audited) of the range, from the kernel's counters.
    pub fn counters(&self) -> (u64, u64, u64) {
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
    pub fn unload(&mut self) {
        if let Some(mut g) = self.guard.take() {
            g.terminate();
        }
        let (code, _, err) = run(&["--pin-dir", self.pin.as_str(), "unload"]);
        assert_eq!(code, 0, "unload: {err}");
        assert!(!self.pin.exists(), "pin dir left after unload");
        assert_eq!(
            reserved_ports(),
            self.sysctl_before,
            "net.ipv4.ip_local_reserved_ports is not back to its value before the guard"
        );
    }

    /// `n` migrations, alternating direction, libvirt choosing the port.
    pub fn migrations(&mut self, phase: &str, n: usize) -> Vec<Migration> {
        self.migrations_with(phase, n, &[])
    }

    /// [`LibvirtEnv::migrations`] with more `virsh migrate` arguments.
    pub fn migrations_with(&mut self, phase: &str, n: usize, extra: &[&str]) -> Vec<Migration> {
        (0..n)
            .map(|i| {
                let m = self.pair.migrate_with("tcp://127.0.0.1", extra);
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

/// The binds [`LibvirtEnv::keep_binding`] keeps making in a thread.
pub struct BindAttempts {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Result<(), i32>>>,
}

impl BindAttempts {
    /// Stops them: every result, in order (`Err(errno)` for a refused bind).
    pub fn stop(self) -> Vec<Result<(), i32>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}
