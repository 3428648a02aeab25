//! EADDRINUSE on every kernel: where the bind programs cannot set an errno (before 6.1), a
//! refused bind is rewritten to the sentinel port, which the daemon holds, and the kernel answers
//! EADDRINUSE itself. `PORT_GUARD_SENTINEL=force` runs the same mechanism on kernels that have
//! `bpf_set_retval`, so every kernel of the matrix exercises it.
//!
//! Each test runs its daemon in a network namespace of its own (the sentinel port is per netns).
//! Ports 64100-64199; sentinel ports 64190-64199.

use std::{
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    process::{Command, Stdio},
    time::Duration,
};

use integration_tests::{netns::TestNetns, *};
use serde_json::Value;

/// A guard in a netns of its own, refusing through the sentinel port.
struct Env {
    ns: TestNetns,
    pin: PinDir,
    tmp: TempDir,
    config: std::path::PathBuf,
    outsider: Cgroup,
    allowed: Cgroup,
    other: Cgroup,
    cg: TestCgroup,
    range: String,
    sentinel: u16,
}

impl Env {
    fn new(name: &str, range: &str, sentinel: u16) -> Env {
        let cg = TestCgroup::new(name);
        let tmp = TempDir::new(name);
        let config = tmp.write("config.toml", "errno = \"eaddrinuse\"\n");
        Env {
            ns: TestNetns::new(name),
            pin: PinDir::new(name),
            outsider: cg.child("outsider"),
            allowed: cg.child("allowed"),
            other: cg.child("other"),
            cg,
            tmp,
            config,
            range: range.to_owned(),
            sentinel,
        }
    }

    /// `port-guard daemon` in the netns, forced onto the sentinel.
    fn daemon_cmd(&self) -> Command {
        self.daemon_cmd_with(true)
    }

    /// With `port_flag`, `--sentinel-port` on the command line (else from the config file).
    fn daemon_cmd_with(&self, port_flag: bool) -> Command {
        self.daemon_cmd_opts(port_flag, false)
    }

    /// With `protect_ephemeral`, the daemon also keeps the kernel from auto-picking the ports
    /// (the sysctl of the test's netns).
    fn daemon_cmd_opts(&self, port_flag: bool, protect_ephemeral: bool) -> Command {
        let mut c = self.ns.command(bin());
        c.env("PORT_GUARD_SENTINEL", "force")
            .arg("--pin-dir")
            .arg(self.pin.path())
            .arg("--config")
            .arg(&self.config)
            .args([
                "daemon",
                "--attach",
                self.cg.path(),
                "--reserve",
                &format!("{}/tcp+udp", self.range),
                "--allow",
                self.allowed.path(),
                "--spawn-parent",
                &format!("{}/spawn", self.cg.path()),
            ]);
        if !protect_ephemeral {
            // Bind tricks only: the sysctl is the ephemeral tests' subject.
            c.arg("--no-protect-ephemeral");
        }
        if port_flag {
            c.args(["--sentinel-port", &self.sentinel.to_string()]);
        }
        c
    }

    fn start(&self) -> Daemon {
        let d = Daemon::spawn(self.daemon_cmd());
        d.wait_for("guard enforcing", START_TIMEOUT);
        d
    }

    /// One `pg-bind` from `cg` in the netns.
    fn bind(
        &self,
        cg: &Cgroup,
        variant: &str,
        proto: &str,
        addr: &str,
        port: u16,
    ) -> Result<(), i32> {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pg-bind"));
        c.args([variant, proto, addr, &port.to_string()]);
        self.ns.enter(&mut c, Some(cg));
        let out = c.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            out.status.success(),
            "pg-bind: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        match text.strip_prefix("errno ") {
            Some(e) => Err(e.parse().unwrap()),
            None if text == "ok" => Ok(()),
            None => panic!("pg-bind printed {text:?}"),
        }
    }

    fn pg(&self, args: &[&str]) -> (i32, String, String) {
        let mut c = self.ns.command(bin());
        c.arg("--pin-dir").arg(self.pin.path()).args(args);
        run_cmd(c)
    }
}

/// Every way to bind the suite knows, on port `port` of a tcp+udp range.
const TRICKS: [(&str, &str, &str); 13] = [
    ("plain", "tcp", "0.0.0.0"),
    ("reuseaddr", "tcp", "0.0.0.0"),
    ("reuseport", "tcp", "::"),
    ("freebind", "tcp", "192.0.2.1"),
    ("freebind", "tcp", "2001:db8::1"),
    ("plain", "tcp", "127.0.0.1"),
    ("plain", "tcp", "::1"),
    ("freebind", "tcp", "fe80::1%lo"),
    ("plain", "tcp", "::ffff:127.0.0.1"),
    ("thread", "tcp", "::"),
    ("plain", "udp", "0.0.0.0"),
    ("reuseport", "udp", "::"),
    ("plain", "udp", "::ffff:127.0.0.1"),
];

#[test]
fn every_bind_trick_gets_eaddrinuse_through_the_sentinel_and_nothing_else_binds_it() {
    let e = Env::new("sent-tricks", "64100-64109", 64190);
    let d = e.start();
    assert!(
        d.lines().iter().any(|l| l.contains(
            "refused binds get EADDRINUSE through the sentinel port 64190 (held in: host)"
        )),
        "{:#?}",
        d.lines()
    );
    for (variant, proto, addr) in TRICKS {
        assert_eq!(
            e.bind(&e.outsider, variant, proto, addr, 64100),
            Err(libc::EADDRINUSE),
            "{variant} {proto} {addr}"
        );
        // The allowed cgroup still binds: nothing was rewritten for it.
        assert_eq!(
            e.bind(&e.allowed, variant, proto, addr, 64101),
            Ok(()),
            "{variant} {proto} {addr}"
        );
    }
    // The sentinel port itself is taken for everyone, whatever the options.
    for (variant, proto, addr) in TRICKS {
        assert_eq!(
            e.bind(&e.outsider, variant, proto, addr, 64190),
            Err(libc::EADDRINUSE),
            "{variant} {proto} {addr} on the sentinel port"
        );
    }
    // The log says EADDRINUSE, as the caller saw it; status says how.
    d.wait_for("denied bind port=64100/tcp", LOG_TIMEOUT);
    assert!(
        d.lines()
            .iter()
            .filter(|l| l.contains("denied bind port=64100"))
            .all(|l| l.ends_with("errno=EADDRINUSE")),
        "{:#?}",
        d.lines()
    );
    let (code, out, err) = e.pg(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let st: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["sentinel"]["port"], 64190, "{st:#}");
    assert_eq!(
        st["sentinel"]["held_in"],
        serde_json::json!(["host"]),
        "{st:#}"
    );
    assert_eq!(st["effective_errno"], "eaddrinuse", "{st:#}");
    let (_, table, _) = e.pg(&["status"]);
    assert!(
        table.contains("through the sentinel port 64190 in host;"),
        "{table}"
    );
}

#[test]
fn nobody_cannot_pass_for_the_sentinel() {
    let e = Env::new("sent-mark", "64180-64185", 64196);
    let _d = e.start();
    // `pg-attack [--uid U] mark-bind ADDR PORT MARK` from the refused cgroup, in the netns.
    let try_as = |uid: Option<&str>, port: u16| -> Value {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pg-attack"));
        if let Some(u) = uid {
            c.args(["--uid", u]);
        }
        c.args([
            "mark-bind",
            "0.0.0.0",
            &port.to_string(),
            &integration_tests::common::SENTINEL_MARK.to_string(),
        ]);
        e.ns.enter(&mut c, Some(&e.outsider));
        let out = c.output().unwrap();
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|x| panic!("{x}: {}", String::from_utf8_lossy(&out.stderr)))
    };
    // nobody cannot open a connection to the listening TCP sentinel either: its socket filter
    // drops every SYN, so nothing fills an accept queue or reaches the daemon.
    let mut c = Command::new(env!("CARGO_BIN_EXE_pg-attack"));
    c.args([
        "--uid",
        "65534",
        "hold-connections",
        "127.0.0.1:64196",
        "16",
        "1",
    ]);
    e.ns.enter(&mut c, Some(&e.outsider));
    let out = c.output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|x| panic!("{x}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v["connects"], 0, "nobody connected to the sentinel: {v}");
    assert!(v["errors"].as_u64().unwrap() > 0, "{v}");
    // nobody cannot set the mark (SO_MARK needs CAP_NET_ADMIN), so neither the sentinel port
    // nor a reserved port opens for it.
    for port in [64196, 64180] {
        let v = try_as(Some("65534"), port);
        assert_eq!(v["mark"], libc::EPERM, "{v}");
        assert_eq!(v["bind"], libc::EADDRINUSE, "port {port}: {v}");
    }
    // Even root with the mark, in the refused cgroup, does not get the sentinel port: the
    // sentinel holds it, and post_bind refuses any socket that is not a registered sentinel.
    let v = try_as(None, 64196);
    assert_eq!(v["mark"], 0, "{v}");
    assert_ne!(v["bind"], 0, "{v}");
}

#[test]
fn a_libvirt_style_allocator_skips_refused_ports_and_takes_the_first_allowed_one() {
    let e = Env::new("sent-alloc", "64110-64119", 64191);
    let _d = e.start();
    // Three ports leased to another VM: refused to libvirt too.
    for p in ["64110", "64111", "64112"] {
        let (code, _, err) = e.pg(&["lease", "--cgroup", e.other.path(), "--port", p]);
        assert_eq!(code, 0, "{err}");
    }
    // libvirt's allocator: v6 wildcard with V6ONLY, then v4, SO_REUSEADDR; EADDRINUSE means
    // "next port", any other errno fails the allocation. It holds the first port it gets.
    let mut c = Command::new(env!("CARGO_BIN_EXE_pg-allocator"));
    c.args(["64110", "64119", "0", "0", "100"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    e.ns.enter(&mut c, Some(&e.allowed));
    let child = c.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|err| panic!("{err}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v["ports"], serde_json::json!([64113]), "{v}");
    let refused = v["refused"].as_object().unwrap();
    assert_eq!(
        refused.keys().collect::<Vec<_>>(),
        vec![&libc::EADDRINUSE.to_string()],
        "every refusal was EADDRINUSE, which libvirt skips: {v}"
    );
}

#[test]
fn without_a_sentinel_refused_binds_get_what_the_kernel_can_give_and_none_succeeds() {
    let e = Env::new("sent-gone", "64120-64129", 64192);
    let mut d = e.start();
    assert_eq!(
        e.bind(&e.outsider, "plain", "tcp", "0.0.0.0", 64120),
        Err(libc::EADDRINUSE)
    );
    // Killed: its sentinel sockets close with it (no fd store), the guard stays. Refused binds
    // get what the kernel can give without it: EPERM before 6.1, the errno itself after.
    d.kill9();
    let without = expected_errno_without_sentinel();
    for (variant, proto, addr) in TRICKS {
        assert_eq!(
            e.bind(&e.outsider, variant, proto, addr, 64120),
            Err(without),
            "{variant} {proto} {addr} with the sentinel gone"
        );
        // Nor can anyone in the guarded cgroup take the free sentinel port meanwhile.
        assert_eq!(
            e.bind(&e.outsider, variant, proto, addr, 64192),
            Err(without),
            "{variant} {proto} {addr} on the free sentinel port"
        );
    }
    // A new daemon takes the port again.
    let _d = e.start();
    assert_eq!(
        e.bind(&e.outsider, "plain", "udp", "::", 64121),
        Err(libc::EADDRINUSE)
    );
}

#[test]
fn a_kill9_loop_never_lets_a_refused_bind_succeed() {
    let e = Env::new("sent-kill", "64130-64139", 64193);
    let mut d = e.start();
    // One process binds 64130 over and over for the whole loop, from the refused cgroup, a fresh
    // socket each time.
    let mut c = Command::new(env!("CARGO_BIN_EXE_pg-attack"));
    c.args(["bind-flood-fresh", "0.0.0.0", "64130", "8"])
        .stdout(Stdio::piped());
    e.ns.enter(&mut c, Some(&e.outsider));
    let flood = c.spawn().unwrap();
    let mut seed = std::process::id() as u64;
    let mut next = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        seed >> 33
    };
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(100 + next() % 400));
        d.kill9();
        std::thread::sleep(Duration::from_millis(next() % 300));
        d = e.start();
    }
    let out = flood.wait_with_output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], 0, "a refused bind succeeded: {v}");
    let errnos: Vec<i32> = v["errnos"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.parse().unwrap())
        .collect();
    assert!(
        errnos
            .iter()
            .all(|e| [libc::EADDRINUSE, libc::EPERM].contains(e)),
        "{v}"
    );
    assert!(
        errnos.contains(&libc::EADDRINUSE),
        "the sentinel answered while it ran: {v}"
    );
    // And the last daemon holds the port again: nothing was left on it.
    assert_eq!(
        e.bind(&e.outsider, "plain", "tcp", "0.0.0.0", 64131),
        Err(libc::EADDRINUSE)
    );
    drop(d);
}

/// A service manager's fd store, as far as the daemon can tell: a NOTIFY_SOCKET that keeps the
/// fds sent with FDSTORE=1, and, as systemd does, closes every stored fd that reports POLLHUP or
/// POLLERR (systemd watches them with no events asked for: a TCP socket that is bound but not
/// listening is in TCP_CLOSE, which polls as POLLHUP, and is dropped at once).
struct FdStore {
    sock: std::os::unix::net::UnixDatagram,
    path: std::path::PathBuf,
}

impl FdStore {
    fn new(tmp: &TempDir) -> FdStore {
        let path = tmp.path().join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        FdStore { sock, path }
    }

    /// Waits for FDSTORE=1 datagrams until `n` fds arrived: (name, fd).
    fn take(&self, n: usize) -> Vec<(String, OwnedFd)> {
        let mut got = Vec::new();
        let found = wait_until(LOG_TIMEOUT, || {
            let mut buf = [0u8; 4096];
            let mut control = [0u8; 256];
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: a zeroed msghdr pointing at buffers that outlive the call.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = control.len();
            // SAFETY: recvmsg into the buffers above.
            let r = unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut msg, 0) };
            if r > 0 {
                let text = String::from_utf8_lossy(&buf[..r as usize]).into_owned();
                let name = text
                    .lines()
                    .find_map(|l| l.strip_prefix("FDNAME="))
                    .unwrap_or("")
                    .to_owned();
                // SAFETY: walking the control messages recvmsg filled in.
                unsafe {
                    let mut c = libc::CMSG_FIRSTHDR(&msg);
                    while !c.is_null() {
                        if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS
                        {
                            let n = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / 4;
                            let data = libc::CMSG_DATA(c).cast::<i32>();
                            for i in 0..n {
                                got.push((name.clone(), OwnedFd::from_raw_fd(*data.add(i))));
                            }
                        }
                        c = libc::CMSG_NXTHDR(&msg, c);
                    }
                }
            }
            (got.len() >= n).then_some(())
        });
        assert!(
            found.is_some(),
            "the daemon handed over {} fds, not {n}",
            got.len()
        );
        got.into_iter()
            .filter(|(name, fd)| {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: 0,
                    revents: 0,
                };
                // SAFETY: poll(2) on one valid fd, no wait.
                let r = unsafe { libc::poll(&mut p, 1, 0) };
                let hup = r > 0 && p.revents & (libc::POLLHUP | libc::POLLERR) != 0;
                if hup {
                    println!(
                        "fd store: {name} polls {:#x}: closed, as systemd does",
                        p.revents
                    );
                }
                !hup
            })
            .collect()
    }
}

#[test]
fn the_sentinel_survives_a_restart_through_the_fd_store() {
    let e = Env::new("sent-store", "64140-64149", 64194);
    let store = FdStore::new(&e.tmp);
    let mut c = e.daemon_cmd();
    c.env("NOTIFY_SOCKET", &store.path).env("FDSTORE", "16");
    let mut d = Daemon::spawn(c);
    d.wait_for("guard enforcing", START_TIMEOUT);
    // The TCP sentinel listens (a bound, idle TCP socket would be closed by the fd store) but
    // answers nothing: its socket filter drops every packet, so a connect() times out.
    let connected = e.ns.run(|| {
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], 64194)),
            Duration::from_millis(500),
        )
        .map(|_| ())
        .map_err(|err| err.kind())
    });
    assert_eq!(
        connected,
        Err(std::io::ErrorKind::TimedOut),
        "connect() to the sentinel"
    );
    let fds = store.take(2);
    assert_eq!(
        fds.len(),
        2,
        "systemd would keep both sockets of the sentinel"
    );
    assert!(
        fds.iter().all(|(n, _)| n.starts_with("pg-sentinel-")),
        "{:?}",
        fds.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    // Killed: the "service manager" still holds the sockets, so refusals stay EADDRINUSE.
    d.kill9();
    for (variant, proto, addr) in TRICKS {
        assert_eq!(
            e.bind(&e.outsider, variant, proto, addr, 64140),
            Err(libc::EADDRINUSE),
            "{variant} {proto} {addr} between two daemons"
        );
    }
    // Started again with them, as systemd would: LISTEN_FDS, fds from 3, LISTEN_PID its own.
    let names: Vec<&str> = fds.iter().map(|(n, _)| n.as_str()).collect();
    let raw: Vec<i32> = fds.iter().map(|(_, f)| f.as_raw_fd()).collect();
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(r#"LISTEN_PID=$$ exec "$@""#)
        .arg("sh")
        .arg(e.daemon_cmd().get_program());
    c.args(e.daemon_cmd().get_args());
    c.env("PORT_GUARD_SENTINEL", "force")
        .env("NOTIFY_SOCKET", &store.path)
        .env("FDSTORE", "16")
        .env("LISTEN_FDS", raw.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"));
    e.ns.enter(&mut c, None);
    // SAFETY: only dup2 between fork and exec.
    unsafe {
        c.pre_exec(move || {
            for (i, fd) in raw.iter().enumerate() {
                if libc::dup2(*fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let d = Daemon::spawn(c);
    d.wait_for("guard enforcing", START_TIMEOUT);
    assert!(
        d.lines()
            .iter()
            .any(|l| l.contains("took over 2 sentinel sockets from the service manager")),
        "{:#?}",
        d.lines()
    );
    assert_eq!(
        e.bind(&e.outsider, "plain", "tcp", "::", 64141),
        Err(libc::EADDRINUSE)
    );
    drop(fds);
    // The kept sockets are the daemon's now: with the store's copies closed, the port stays
    // held.
    assert_eq!(
        e.bind(&e.outsider, "plain", "udp", "0.0.0.0", 64142),
        Err(libc::EADDRINUSE)
    );
}

#[test]
fn a_sentinel_port_in_a_range_or_below_1024_is_refused_and_changing_it_needs_a_restart() {
    for (port, want) in [
        (
            "64155",
            "sentinel_port 64155 is inside the reserved range 64150-64159/tcp",
        ),
        ("80", "sentinel_port 80 is below 1024"),
    ] {
        let (code, _, err) = run(&[
            "--pin-dir",
            "/nonexistent-pg-test-pin",
            "daemon",
            "--reserve",
            "64150-64159",
            "--sentinel-port",
            port,
        ]);
        assert_eq!(code, 2, "{err}");
        assert!(single_line(&err).contains(want), "{err}");
    }
    // From the config file: a reload that moves it is refused, the old sentinel keeps answering.
    let e = Env::new("sent-reload", "64160-64169", 64195);
    std::fs::write(&e.config, "errno = \"eaddrinuse\"\nsentinel_port = 64195\n").unwrap();
    let d = Daemon::spawn(e.daemon_cmd_with(false));
    d.wait_for("guard enforcing", START_TIMEOUT);
    std::fs::write(&e.config, "errno = \"eaddrinuse\"\nsentinel_port = 64196\n").unwrap();
    let (code, _, err) = e.pg(&["reload"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        single_line(&err).contains("sentinel_port changed from 64195 to 64196: restart the daemon"),
        "{err}"
    );
    assert_eq!(
        e.bind(&e.outsider, "plain", "tcp", "0.0.0.0", 64160),
        Err(libc::EADDRINUSE)
    );
}

/// Kills and reaps a child on drop.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn check_names_who_holds_the_sentinel_port_and_the_kernel_never_auto_picks_it() {
    use std::io::BufRead as _;
    let e = Env::new("sent-check", "64170-64179", 64197);
    // Before any guard: another process takes the sentinel port.
    let mut c = Command::new(env!("CARGO_BIN_EXE_pg-sockets"));
    c.args(["hold", "listen4:64197", "udp6:64197"])
        .stdout(Stdio::piped());
    e.ns.enter(&mut c, Some(&e.outsider));
    let mut squatter = Reaped(c.spawn().unwrap());
    let mut line = String::new();
    std::io::BufReader::new(squatter.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let check_config = e.tmp.write(
        "check.toml",
        &format!(
            "attach = \"{}\"\nerrno = \"eaddrinuse\"\nsentinel_port = 64197\nspawn_parent = \"{}/spawn\"\n[[reserve]]\nports = \"64170-64179\"\nprotocols = [\"tcp\", \"udp\"]\nallow = [\"{}\"]\n",
            e.cg.path(),
            e.cg.path(),
            e.allowed.path()
        ),
    );
    let check = |e: &Env| {
        let mut c = e.ns.command(bin());
        c.env("PORT_GUARD_SENTINEL", "force")
            .arg("--pin-dir")
            .arg(e.pin.path())
            .args(["check", "--json", "--config"])
            .arg(&check_config);
        let (_, out, err) = run_cmd(c);
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|x| panic!("{x}: {out} {err}"));
        let item = v["preflight"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == "sentinel")
            .unwrap_or_else(|| panic!("no sentinel item: {v:#}"))
            .clone();
        (v["features"]["sentinel"].clone(), item)
    };
    let (uses, item) = check(&e);
    assert_eq!(uses, true);
    assert_eq!(item["warning"], true, "{item}");
    let detail = item["detail"].as_str().unwrap();
    let pid = squatter.0.id();
    assert!(
        detail.contains("the sentinel port 64197 is held by")
            && detail.contains(&format!("64197/tcp by pid {pid} (pg-sockets)"))
            && detail.contains(&format!("64197/udp by pid {pid} (pg-sockets)")),
        "{detail}"
    );
    // The daemon starts anyway: its sentinel takes the nearest free port below, outside the
    // ranges, so refused binds still get EADDRINUSE, and it says which port it took.
    let mut c = e.daemon_cmd_opts(true, true);
    c.args(["--metrics-listen", "127.0.0.1:64198"]);
    let d = Daemon::spawn(c);
    d.wait_for("guard enforcing", START_TIMEOUT);
    d.wait_for(
        "the sentinel port 64197 is held by another socket in netns host: its sentinel took port 64196 instead",
        LOG_TIMEOUT,
    );
    assert_eq!(
        e.bind(&e.outsider, "plain", "tcp", "0.0.0.0", 64170),
        Err(libc::EADDRINUSE)
    );
    let sentinel_metrics = || {
        let text = e.ns.run(|| {
            use std::io::{Read as _, Write as _};
            let mut s = std::net::TcpStream::connect("127.0.0.1:64198").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        });
        ["held", "missing"].map(|state| {
            let key = format!("port_guard_sentinel_netns{{state=\"{state}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&key))
                .unwrap_or_else(|| panic!("{key} not in:\n{text}"))
                .to_owned()
        })
    };
    assert_eq!(sentinel_metrics(), ["1", "0"]);
    // Ephemeral protection covers the port taken in its place as well as the configured one:
    // no connect() or bind(0) is handed either.
    assert_eq!(
        e.ns.sysctl("net.ipv4.ip_local_reserved_ports"),
        "64170-64179,64196-64197"
    );
    let (_, item) = check(&e);
    assert_eq!(item["warning"], true, "{item}");
    assert!(
        item["detail"]
            .as_str()
            .unwrap()
            .contains("the daemon's sentinel holds port 64196 in its place"),
        "{item}"
    );
    // The squatter leaves: the sentinel keeps the port it holds (moving would open a gap),
    // and check says so without a warning.
    drop(squatter);
    assert_eq!(
        e.bind(&e.outsider, "plain", "udp", "::", 64171),
        Err(libc::EADDRINUSE)
    );
    let (_, item) = check(&e);
    assert_eq!(item["warning"], Value::Null, "{item}");
    assert!(
        item["detail"]
            .as_str()
            .unwrap()
            .contains("port 64197 is free; the daemon's sentinel holds port 64196 in its place"),
        "{item}"
    );
    assert_eq!(sentinel_metrics(), ["1", "0"]);
}
