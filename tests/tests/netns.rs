//! Network namespaces: the guard enforces in the host's port space (the daemon's netns) by
//! default, not in every container's; `all` brings back the old behaviour; named namespaces are
//! followed by path; ephemeral protection and allocation probes go to the guarded namespaces.
//!
//! Ports 63800-63899. Every namespace is one the test creates.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use integration_tests::{
    netns::{daemon_in, TestNetns, UnloadInNetns},
    *,
};

/// One bind from `cg` inside `ns` (pg-bind): Ok, or the errno.
fn bind_in_ns(ns: &TestNetns, cg: &Cgroup, proto: &str, addr: &str, port: u16) -> Result<(), i32> {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pg-bind"));
    c.args(["plain", proto, addr, &port.to_string()]);
    ns.enter(&mut c, Some(cg));
    let out = c.output().expect("running pg-bind");
    let text = String::from_utf8_lossy(&out.stdout);
    match text.trim() {
        "ok" => Ok(()),
        t => Err(t
            .strip_prefix("errno ")
            .and_then(|e| e.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "pg-bind said {t:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })),
    }
}

fn unguarded(pin: &PinDir) -> u64 {
    status_json(pin.path())["netns"]["unguarded_binds"]
        .as_u64()
        .expect("status has netns.unguarded_binds")
}

const CASES: [(&str, &str); 4] = [
    ("tcp", "0.0.0.0"),
    ("tcp", "::"),
    ("udp", "0.0.0.0"),
    ("udp", "::"),
];

#[test]
fn the_host_is_guarded_and_a_containers_netns_is_not_by_default() {
    let s = Fixture::new("nsdefault");
    let fresh = TestNetns::new("nsdefault");
    let d = Daemon::start(&s.pin, &s.config, &s.args(Some("63800-63809/tcp+udp"), &[]));
    d.wait_for("guarded network namespaces: host", LOG_TIMEOUT);
    let st = status_json(s.pin.path());
    assert_eq!(st["netns"]["scoped"], true, "{st:#}");
    assert_eq!(st["netns"]["guarded"][0]["name"], "host", "{st:#}");
    for (i, (proto, addr)) in CASES.iter().enumerate() {
        let port = 63800 + i as u16;
        // The host's port space: refused, and the line says where.
        let spec = if *proto == "tcp" {
            BindSpec::tcp(addr.parse().unwrap(), port)
        } else {
            BindSpec::udp(addr.parse().unwrap(), port)
        };
        assert_eq!(
            bind_in(s.outsider.abs(), &spec),
            Err(expected_errno()),
            "{proto} {addr}"
        );
        // A container's netns takes nothing from the host: allowed, counted apart, not logged.
        let before = unguarded(&s.pin);
        assert_eq!(
            bind_in_ns(&fresh, &s.outsider, proto, addr, port),
            Ok(()),
            "{proto} {addr} in a fresh netns"
        );
        assert_eq!(unguarded(&s.pin), before + 1);
    }
    let line = d.wait_for("denied bind port=63800/tcp", LOG_TIMEOUT);
    assert!(line.contains(" netns=host "), "{line}");
    assert!(
        !d.lines()
            .iter()
            .any(|l| l.contains("denied bind") && !l.contains("netns=host")),
        "only the host's binds are refused: {:#?}",
        d.lines()
    );
}

#[test]
fn netns_all_guards_every_namespace() {
    let s = Fixture::new("nsall");
    let fresh = TestNetns::new("nsall");
    let d = Daemon::start(
        &s.pin,
        &s.config,
        &s.args(Some("63820-63829"), &["--netns", "all"]),
    );
    d.wait_for("guarded network namespaces: all", LOG_TIMEOUT);
    assert_eq!(status_json(s.pin.path())["netns"]["scoped"], false);
    // An unlisted netns has no sentinel: EPERM where the kernel cannot set the errno.
    assert_eq!(
        bind_in_ns(&fresh, &s.outsider, "tcp", "0.0.0.0", 63820),
        Err(expected_errno_without_sentinel())
    );
    assert_eq!(
        bind_in(s.outsider.abs(), &BindSpec::tcp(ANY4, 63821)),
        Err(expected_errno())
    );
}

#[test]
fn a_named_netns_is_guarded_from_its_creation_and_followed_when_created_anew() {
    let s = Fixture::new("nsnamed");
    let name = format!("{PREFIX}-nsnamed-late-{}", std::process::id());
    let path = format!("/run/netns/{name}");
    let _ = Command::new("ip").args(["netns", "del", &name]).output();
    let mut d = Daemon::start(
        &s.pin,
        &s.config,
        &s.args(Some("63840-63849"), &["--netns", "host", "--netns", &path]),
    );
    d.wait_for(&format!("{name}(not yet)"), LOG_TIMEOUT);

    // Created, deleted, created again (another netns of the same name): followed each time.
    for round in ["first", "again"] {
        let skip = d.line_count();
        let ns = TestNetns::named(&name);
        d.wait_for_after(skip, &format!("guarded netns {name} appeared"), LOG_TIMEOUT);
        // From the instant the daemon said so: refused there, and named.
        assert_eq!(
            bind_in_ns(&ns, &s.outsider, "tcp", "0.0.0.0", 63840),
            Err(expected_errno()),
            "{round}"
        );
        let line = d.wait_for_after(skip, "denied bind port=63840/tcp", LOG_TIMEOUT);
        assert!(line.contains(&format!(" netns={name} ")), "{line}");
        // `ip netns del`: no longer guarded (a new netns of the same name is another one).
        let skip = d.line_count();
        drop(ns);
        d.wait_for_after(skip, &format!("guarded netns {name} is gone"), LOG_TIMEOUT);
    }
    let st = status_json(s.pin.path());
    assert_eq!(
        st["netns"]["guarded"].as_array().unwrap().len(),
        1,
        "host only: {st:#}"
    );
    assert!(d.running());
}

#[test]
fn ephemeral_protection_goes_to_every_guarded_netns_and_unload_restores_each() {
    let a = TestNetns::new("nseph-a");
    let b = TestNetns::new("nseph-b");
    let s = Fixture::new("nseph");
    let key = "net.ipv4.ip_local_reserved_ports";
    a.set_sysctl(key, "1111");
    b.set_sysctl(key, "2222");
    let _unload = UnloadInNetns {
        ns: &a,
        pin: &s.pin,
    };
    // The daemon runs in A: A is its host; B is listed by path.
    let b_path = b.path();
    let _d = daemon_in(
        &a,
        &s.pin,
        &s.config,
        &s.args(
            Some("63860-63869"),
            &["--netns", "host", "--netns", b_path.to_str().unwrap()],
        ),
    );
    // The sentinel port, where refusals go through it, is held and protected in both.
    let sentinel = default_sentinel_reserved();
    assert_eq!(a.sysctl(key), format!("1111,{sentinel}63860-63869"));
    assert_eq!(b.sysctl(key), format!("2222,{sentinel}63860-63869"));
    let out = a
        .command(bin())
        .arg("--pin-dir")
        .arg(s.pin.path())
        .arg("unload")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(a.sysctl(key), "1111");
    assert_eq!(b.sysctl(key), "2222");
}

#[test]
fn spawn_outside_the_guarded_netns_gets_a_port_free_there() {
    let x = TestNetns::new("nsspawn");
    let s = Fixture::new("nsspawn");
    // In X, before the guard: a listener on the range's first port.
    let mut holder = Command::new(env!("CARGO_BIN_EXE_pg-sockets"));
    holder
        .args(["hold", "listen4:63880"])
        .stdout(Stdio::piped());
    x.enter(&mut holder, Some(&s.outsider));
    let mut holder = holder.spawn().unwrap();
    let mut ready = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _holder = Kill(holder);

    let _unload = UnloadInNetns {
        ns: &x,
        pin: &s.pin,
    };
    let _d = daemon_in(
        &x,
        &s.pin,
        &s.config,
        &s.args(Some("63880-63889"), &["--no-protect-ephemeral"]),
    );
    // spawn runs in the host's netns, where 63880 is free; the guard's port space is X's.
    let (code, out, err) = run(&["--pin-dir", s.pin.as_str(), "spawn", "--", "true"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().next(), Some("63881"), "{out}");
    let (code, out, err) = run(&[
        "--pin-dir",
        s.pin.as_str(),
        "lease",
        "--cgroup",
        s.outsider.path(),
        "--port",
        "63880",
    ]);
    assert_ne!(code, 0, "63880 is held in the guarded netns: {out}");
    assert!(err.contains("port 63880 is already bound"), "{err}");
    // Let the reaper see the spawned cgroup empty before the fixture goes.
    std::thread::sleep(Duration::from_millis(200));
}
