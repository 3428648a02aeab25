//! The per-child share (`per_child_limit`): a compromised VM cannot hold the range.
//!
//! The attacker is what a guest that escaped into its qemu would be: an unprivileged process
//! (`nobody`) inside one VM's cgroup, a child of the allowed cgroup. Each test runs it with
//! `pg-attack grab`, which binds every port of the range at once from many threads and holds
//! what it got.
//!
//! - a unit at its limit is refused its next bind: TCP and UDP, v4 and v6, SO_REUSEADDR and
//!   SO_REUSEPORT, from a sub-cgroup of the unit, from 32 threads at once; another unit still
//!   gets its share;
//! - closing a socket, or SIGKILL of the holder, gives the share back at once;
//! - a leased port is an explicit grant: bindable beyond the limit;
//! - the counts live in the kernel: a daemon killed and started again keeps them;
//! - a reload that changes the limit applies to the next bind;
//! - no limit configured: no limit.
//!
//! Ports 64400-64499.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::CommandExt as _,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

use integration_tests::*;
use serde_json::Value;

const NOBODY: u32 = 65534;
const ATTACK: &str = env!("CARGO_BIN_EXE_pg-attack");

/// A test's guard: `<attach>/machine` allowed (the `/machine.slice` of a libvirt host), the
/// daemon on a config file whose `[[reserve]]` has `limit` (None: no key).
struct Host {
    f: Fixture,
    machine: Cgroup,
    daemon: Option<Daemon>,
    range: (u16, u16),
}

impl Host {
    fn new(name: &str, range: (u16, u16), limit: Option<u32>) -> Host {
        let f = Fixture::new(name);
        let machine = f.attach.child("machine");
        let h = Host {
            f,
            machine,
            daemon: None,
            range,
        };
        h.write_config(limit);
        h
    }

    fn write_config(&self, limit: Option<u32>) {
        let limit = limit
            .map(|n| format!("per_child_limit = {n}\n"))
            .unwrap_or_default();
        std::fs::write(
            &self.f.config,
            format!(
                "attach = \"{a}\"\nspawn_parent = \"{a}/spawn\"\nerrno = \"eaddrinuse\"\nmode = \"enforce\"\n\
                 [[reserve]]\nports = \"{}-{}\"\nprotocols = [\"tcp\", \"udp\"]\nallow = [\"{}\"]\n{limit}",
                self.range.0,
                self.range.1,
                self.machine.path(),
                a = self.f.attach.path(),
            ),
        )
        .unwrap();
    }

    fn start(&mut self) {
        let mut args = vec!["--no-protect-ephemeral".to_string()];
        if !kernel_features().set_retval && !kernel_features().sentinel {
            args.push("--allow-fallback".to_string());
        }
        let d = Daemon::spawn(self.f.daemon_cmd(self.f.pin.path(), &args));
        d.wait_for("guard enforcing", START_TIMEOUT);
        self.daemon = Some(d);
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("started")
    }

    fn pg(&self, args: &[&str]) -> (i32, String, String) {
        let mut all = vec!["--pin-dir", self.f.pin.as_str()];
        all.extend_from_slice(args);
        run(&all)
    }

    /// A VM's cgroup below the allowed one.
    fn vm(&self, name: &str) -> Cgroup {
        self.machine.child(name)
    }
}

/// `pg-attack grab` as nobody in a cgroup: its first answer, and the process (holding what it
/// got until it is told to close, or killed).
struct Grabber {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
    first: Value,
}

impl Grabber {
    /// Binds `first..=last` on `addr` with `proto` and `opt` from `threads` threads.
    fn start(
        cg: &Cgroup,
        addr: &str,
        proto: &str,
        (first, last): (u16, u16),
        threads: usize,
        opt: &str,
    ) -> Grabber {
        let mut child = Command::new(ATTACK)
            .args(["--cgroup", cg.abs().to_str().unwrap(), "--uid"])
            .arg(NOBODY.to_string())
            .args(["grab", addr, proto])
            .args([first.to_string(), last.to_string(), threads.to_string()])
            .arg(opt)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .current_dir("/")
            .process_group(0)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let first = read_json(&mut out);
        Grabber {
            child,
            stdin,
            out,
            first,
        }
    }

    /// The ports it got.
    fn ok(&self) -> Vec<u16> {
        self.first["ok"]
            .as_array()
            .unwrap_or_else(|| panic!("{}", self.first))
            .iter()
            .map(|p| p.as_u64().unwrap() as u16)
            .collect()
    }

    /// How many binds failed with each errno.
    fn errnos(&self) -> Vec<(i32, u64)> {
        self.first["errnos"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(e, n)| (e.parse().unwrap(), n.as_u64().unwrap()))
            .collect()
    }

    fn ask(&mut self, line: &str) -> Value {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
        read_json(&mut self.out)
    }

    fn close(&mut self, port: u16) {
        let v = self.ask(&format!("close {port}"));
        assert_eq!(v["closed"], port, "{v}");
    }

    /// Binds `port` again: 0 or the errno.
    fn grab(&mut self, port: u16) -> i64 {
        let v = self.ask(&format!("grab {port}"));
        v["errno"].as_i64().unwrap_or_else(|| panic!("{v}"))
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Grabber {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_json(out: &mut BufReader<ChildStdout>) -> Value {
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("pg-attack printed {line:?}: {e}"))
}

/// The units `status --json` shows holding ports of the first range: (unit path, held, limit).
fn held(h: &Host) -> Vec<(String, u64, u64)> {
    let st = status_json(h.f.pin.path());
    st["reserve"][0]["shares"]
        .as_array()
        .unwrap_or_else(|| panic!("no shares in status: {st:#}"))
        .iter()
        .map(|s| {
            (
                s["unit"].as_str().unwrap().to_owned(),
                s["held"].as_u64().unwrap(),
                s["limit"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_vm_at_its_limit_is_refused_its_next_bind_whatever_the_trick_and_another_vm_keeps_its_share() {
    let mut h = Host::new("share-tricks", (64400, 64415), Some(2));
    h.start();
    let cases = [
        ("0.0.0.0", "tcp", "plain"),
        ("::", "tcp", "reuseaddr"),
        ("::", "udp", "plain"),
        ("127.0.0.1", "udp", "reuseport"),
        ("::1", "tcp", "reuseport"),
    ];
    for (i, (addr, proto, opt)) in cases.into_iter().enumerate() {
        let vm = h.vm(&format!("vm{i}"));
        // From the VM's own cgroup, 32 threads at the same instant over the 16 ports.
        let g = Grabber::start(&vm, addr, proto, h.range, 32, opt);
        assert_eq!(
            g.ok().len(),
            2,
            "{addr} {proto} {opt}: a unit with per_child_limit 2 got {:?}; errnos {:?}",
            g.ok(),
            g.errnos()
        );
        assert_eq!(
            g.errnos(),
            vec![(expected_errno(), 14)],
            "{addr} {proto} {opt}: every other bind is refused with the configured errno"
        );
        // A sub-cgroup of the unit (libvirt's `libvirt/emulator`) is the same unit.
        let sub = vm.child("emulator");
        let g2 = Grabber::start(&sub, addr, proto, h.range, 4, opt);
        assert!(
            g2.ok().is_empty(),
            "{addr} {proto} {opt}: a sub-cgroup of a unit at its limit got {:?}",
            g2.ok()
        );
        drop(g2);
        // Another VM still gets its two (ports the first one does not hold).
        let other = h.vm(&format!("other{i}"));
        let g3 = Grabber::start(&other, addr, proto, h.range, 8, opt);
        assert_eq!(g3.ok().len(), 2, "{addr} {proto} {opt}: {:?}", g3.errnos());
        let shares = held(&h);
        assert!(
            shares.contains(&(vm.path().to_owned(), 2, 2))
                && shares.contains(&(other.path().to_owned(), 2, 2)),
            "{shares:?}"
        );
    }
    // Each refusal for the limit is logged with the unit and the reason.
    let line = h.daemon().wait_for("reason=limit", LOG_TIMEOUT);
    assert!(line.contains("held=2 limit=2"), "{line}");
    assert!(
        line.contains(&format!("unit={}/vm0", h.machine.path())),
        "{line}"
    );
    let metrics_scrape = h.pg(&["status", "--json"]).1;
    let st: Value = serde_json::from_str(&metrics_scrape).unwrap();
    assert!(
        st["reserve"][0]["counters"]["limited"].as_u64().unwrap() > 0,
        "{st:#}"
    );
}

#[test]
fn closing_a_socket_or_killing_the_holder_gives_the_share_back_at_once() {
    let mut h = Host::new("share-close", (64420, 64429), Some(2));
    h.start();
    let vm = h.vm("vm");
    let mut g = Grabber::start(&vm, "::", "tcp", h.range, 4, "plain");
    let got = g.ok();
    assert_eq!(got.len(), 2, "{:?}", g.errnos());
    let free = (h.range.0..=h.range.1).find(|p| !got.contains(p)).unwrap();
    assert_eq!(g.grab(free), i64::from(expected_errno()), "at its limit");
    g.close(got[0]);
    assert_eq!(g.grab(free), 0, "one closed: one more may be bound");
    assert_eq!(g.grab(got[0]), i64::from(expected_errno()), "and no more");
    assert_eq!(held(&h), vec![(vm.path().to_owned(), 2, 2)]);
    // SIGKILL: the kernel releases the sockets, and the share with them.
    g.kill9();
    let freed = wait_until(Duration::from_secs(5), || held(&h).is_empty().then_some(()));
    assert!(
        freed.is_some(),
        "still held after the holder died: {:?}",
        held(&h)
    );
    let g = Grabber::start(&vm, "::", "tcp", h.range, 4, "plain");
    assert_eq!(g.ok().len(), 2, "{:?}", g.errnos());
}

#[test]
fn a_leased_port_is_bindable_beyond_the_limit_and_not_counted() {
    let mut h = Host::new("share-lease", (64430, 64439), Some(1));
    h.start();
    let vm = h.vm("vm");
    let (code, out, err) = h.pg(&["lease", "--cgroup", vm.path(), "--port", "64439"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "64439");
    let mut g = Grabber::start(&vm, "0.0.0.0", "tcp", (64430, 64431), 1, "plain");
    assert_eq!(g.ok(), vec![64430], "its one share: {:?}", g.errnos());
    assert_eq!(g.grab(64439), 0, "the leased port, beyond the limit");
    assert_eq!(
        held(&h),
        vec![(vm.path().to_owned(), 1, 1)],
        "the lease is not counted"
    );
}

#[test]
fn the_counts_outlive_a_daemon_killed_and_started_again() {
    let mut h = Host::new("share-restart", (64440, 64449), Some(2));
    h.start();
    let vm = h.vm("vm");
    let mut g = Grabber::start(&vm, "::", "udp", h.range, 8, "plain");
    assert_eq!(g.ok().len(), 2);
    h.daemon.as_mut().unwrap().kill9();
    // No daemon: the kernel keeps refusing (with EPERM before 6.1: no sentinel is held).
    assert_eq!(g.grab(64449), i64::from(expected_errno_without_sentinel()));
    h.start();
    assert_eq!(held(&h), vec![(vm.path().to_owned(), 2, 2)]);
    assert_eq!(
        g.grab(64449),
        i64::from(expected_errno()),
        "after the restart"
    );
    g.close(g.ok()[0]);
    assert_eq!(g.grab(64449), 0);
}

#[test]
fn a_reload_that_changes_the_limit_applies_to_the_next_bind() {
    let mut h = Host::new("share-reload", (64450, 64459), Some(2));
    h.start();
    let vm = h.vm("vm");
    let mut g = Grabber::start(&vm, "::", "tcp", (64450, 64453), 4, "plain");
    assert_eq!(g.ok().len(), 2);
    h.write_config(Some(3));
    let (code, _, err) = h.pg(&["reload"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(g.grab(64455), 0, "limit 3: a third");
    assert_eq!(g.grab(64456), i64::from(expected_errno()), "and no fourth");
    h.write_config(Some(1));
    assert_eq!(h.pg(&["reload"]).0, 0);
    // It holds 3, over the new limit: it keeps them, and gets nothing more until it holds 0.
    assert_eq!(held(&h), vec![(vm.path().to_owned(), 3, 1)]);
    g.close(64455);
    assert_eq!(
        g.grab(64455),
        i64::from(expected_errno()),
        "2 held, limit 1"
    );
    // No limit: today's behaviour.
    h.write_config(None);
    assert_eq!(h.pg(&["reload"]).0, 0);
    assert_eq!(g.grab(64455), 0);
    assert_eq!(g.grab(64456), 0);
    assert!(
        held(&h).is_empty(),
        "no limit, nothing counted: {:?}",
        held(&h)
    );
}

#[test]
fn without_a_limit_one_vm_may_hold_the_whole_range() {
    let mut h = Host::new("share-none", (64460, 64469), None);
    h.start();
    let g = Grabber::start(&h.vm("vm"), "::", "tcp", h.range, 8, "plain");
    assert_eq!(g.ok().len(), 10, "{:?}", g.errnos());
}
