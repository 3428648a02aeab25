//! What an operator meets first: usage errors printed whole, journald priorities, exit codes
//! that mean what they say, and `check` not crying wolf over a TIME-WAIT.
//!
//! Ports 64000-64099.

use std::{
    io::Read as _,
    net::{TcpListener, TcpStream},
    process::Command,
    time::Duration,
};

use integration_tests::{netns::TestNetns, *};
use serde_json::Value;

#[test]
fn usage_errors_are_printed_whole_with_what_is_missing_and_what_was_meant() {
    let (code, _, err) = run(&["--pin-dir", "/nonexistent-pg-test-pin", "release"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("required arguments were not provided") && err.contains("--port <PORT>"),
        "the missing argument is named: {err}"
    );
    assert!(err.contains("Usage: port-guard release"), "{err}");
    let (code, _, err) = run(&["statsu"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("'status'"),
        "clap's hint names the subcommand meant: {err}"
    );
}

#[test]
fn a_relative_pin_dir_is_a_usage_error() {
    for args in [
        vec!["--pin-dir", "pins", "status"],
        vec!["--pin-dir", "pins", "unload"],
    ] {
        let (code, _, err) = run(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            single_line(&err).contains("pin dir pins must be an absolute path"),
            "{err}"
        );
    }
}

#[test]
fn under_the_journal_lines_carry_their_priority() {
    let f = Fixture::new("journal");
    let args = f.args(Some("64000-64009"), &["--no-protect-ephemeral"]);
    // What systemd does: JOURNAL_STREAM names the stream stderr is.
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(r#"JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec "$@""#)
        .arg("sh")
        .arg(bin())
        .arg("--pin-dir")
        .arg(f.pin.path())
        .arg("--config")
        .arg(&f.config)
        .arg("daemon")
        .args(&args);
    let d = Daemon::spawn(c);
    let line = d.wait_for("guard enforcing", START_TIMEOUT);
    assert!(line.starts_with("<6>guard enforcing"), "{line}");
    assert_eq!(
        bind_in(f.outsider.abs(), &BindSpec::tcp(ANY4, 64000)),
        Err(expected_errno())
    );
    let line = d.wait_for("denied bind port=64000", LOG_TIMEOUT);
    assert!(line.starts_with("<4>denied bind"), "{line}");
    // A refused reload is an error.
    std::fs::write(&f.config, "mode = \"block\"\n").unwrap();
    let skip = d.line_count();
    // SAFETY: kill(2) on the daemon's pid.
    unsafe { libc::kill(d.pid(), libc::SIGHUP) };
    let line = d.wait_for_after(skip, "SIGHUP: new config refused", LOG_TIMEOUT);
    assert!(line.starts_with("<3>"), "{line}");
}

#[test]
fn spawn_of_a_command_that_does_not_exist_exits_127_and_leaves_no_lease() {
    let f = Fixture::new("exec127");
    let _d = f.start("64020-64029", &[]);
    let (code, out, err) = run(&[
        "--pin-dir",
        f.pin.as_str(),
        "spawn",
        "--",
        "/nonexistent-pg-test-command",
    ]);
    assert_eq!(code, 127, "{out}{err}");
    assert!(
        single_line(&err).contains("/nonexistent-pg-test-command"),
        "{err}"
    );
    let st = status_json(f.pin.path());
    assert_eq!(st["leases"], Value::Array(vec![]), "{st:#}");
}

#[test]
fn check_shows_a_time_wait_on_a_reserved_port_but_does_not_count_it() {
    let ns = TestNetns::new("timewait");
    let tmp = TempDir::new("timewait");
    let config = tmp.write(
        "config.toml",
        "protect_ephemeral = false\n[[reserve]]\nports = \"64040-64049\"\n",
    );
    // In the namespace: a connection on 64040 that the listening side closes first, so that
    // its socket lingers in TIME-WAIT with local port 64040 and no process.
    let path = ns.path();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on a valid netns fd; it moves this thread only.
        assert_eq!(
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) },
            0
        );
        let l = TcpListener::bind("127.0.0.1:64040").unwrap();
        let mut c = TcpStream::connect("127.0.0.1:64040").unwrap();
        let (s, _) = l.accept().unwrap();
        drop(s);
        drop(l);
        // The listening side's FIN first; then the other side's: the listening side's socket is
        // the one in TIME-WAIT.
        let mut buf = [0u8; 1];
        let _ = c.read(&mut buf);
        drop(c);
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let out = ns
        .command(bin())
        .arg("--pin-dir")
        .arg("/nonexistent-pg-test-pin")
        .arg("--config")
        .arg(&config)
        .args(["check", "--json"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let tw: Vec<&Value> = v["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["port"] == 64040 && s["state"] == "time-wait")
        .collect();
    assert!(!tw.is_empty(), "the TIME-WAIT is shown: {v:#}");
    assert!(tw.iter().all(|s| s["would_refuse"] == false), "{v:#}");
    assert_eq!(v["conflicts"], 0, "{v:#}");
}

/// A config file for `f` with its attach cgroup, spawn parent and errno, then `extra` and
/// `reserve` (the `[[reserve]]` tables).
fn file_config(f: &Fixture, extra: &str, reserve: &str) -> String {
    format!(
        "attach = \"{0}\"\nspawn_parent = \"{0}/spawn\"\nerrno = \"eaddrinuse\"\n{extra}\n{reserve}",
        f.attach.path()
    )
}

/// One `[[reserve]]` table.
fn reserve(ports: &str, allow: &[&str]) -> String {
    let allow: Vec<String> = allow.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[[reserve]]\nports = \"{ports}\"\nallow = [{}]\n",
        allow.join(", ")
    )
}

/// The daemon on `f`'s config file (no policy flags but `flags`), once it enforces.
fn daemon_cmd_from_file(f: &Fixture, flags: &[&str]) -> Command {
    let mut args = vec!["--no-protect-ephemeral".to_string()];
    if !kernel_features().set_retval && !kernel_features().sentinel {
        args.push("--allow-fallback".to_string());
    }
    args.extend(flags.iter().map(|s| s.to_string()));
    f.daemon_cmd(f.pin.path(), &args)
}

fn start_from_file(f: &Fixture, flags: &[&str]) -> Daemon {
    let d = Daemon::spawn(daemon_cmd_from_file(f, flags));
    d.wait_for("guard enforcing", START_TIMEOUT);
    d
}

fn pg(f: &Fixture, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["--pin-dir", f.pin.as_str()];
    all.extend_from_slice(args);
    run(&all)
}

fn lease(f: &Fixture, cg: &Cgroup, port: Option<u16>) -> u16 {
    let port = port.map(|p| p.to_string());
    let mut args = vec!["lease", "--cgroup", cg.path()];
    if let Some(p) = &port {
        args.extend(["--port", p]);
    }
    let (code, out, err) = pg(f, &args);
    assert_eq!(code, 0, "lease: {err}");
    out.trim()
        .parse()
        .unwrap_or_else(|e| panic!("lease printed {out:?}: {e}"))
}

fn allowed_state<'a>(st: &'a Value, path: &str) -> &'a Value {
    st["reserve"][0]["allow_configured"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["path"] == path)
        .map(|a| &a["state"])
        .unwrap_or_else(|| panic!("{path} is not listed: {st:#}"))
}

#[test]
fn status_shows_every_configured_allowed_cgroup_the_daemon_and_when_counters_started() {
    let f = Fixture::new("truth");
    let svc = f.attach.child("svc");
    let typo = format!("{}/svcc", f.attach.path());
    std::fs::write(
        &f.config,
        file_config(&f, "", &reserve("64050-64059", &[svc.path(), &typo])),
    )
    .unwrap();
    let t0 = now_secs();
    let mut d = start_from_file(&f, &[]);

    // A typo'd allow path is there, said to be missing; the daemon runs.
    let (code, st) = status_json_code(f.pin.path());
    assert_eq!(code, 0, "{st:#}");
    assert_eq!(allowed_state(&st, &typo), "not present", "{st:#}");
    assert_eq!(allowed_state(&st, svc.path()), "allowed", "{st:#}");
    assert_eq!(st["daemon"]["running"], true, "{st:#}");
    assert_eq!(st["daemon"]["pid"], d.pid(), "{st:#}");
    let since = st["reserve"][0]["counters_since"].as_u64().unwrap();
    assert!(t0 <= since && since <= now_secs(), "{st:#}");
    let (_, table, _) = pg(&f, &["status"]);
    assert!(table.contains(&format!("{typo} (NOT PRESENT)")), "{table}");
    assert!(
        table.contains(&format!("running (pid {}", d.pid())),
        "{table}"
    );

    // Leases probe their ports, but only a real bind counts as allowed.
    let vm = f.attach.child("vm");
    let ports: Vec<u16> = (0..5).map(|_| lease(&f, &vm, None)).collect();
    let st = status_json(f.pin.path());
    assert_eq!(st["reserve"][0]["counters"]["allowed"], 0, "{st:#}");
    assert_eq!(bind_in(vm.abs(), &BindSpec::tcp(ANY4, ports[0])), Ok(()));
    let st = status_json(f.pin.path());
    assert_eq!(st["reserve"][0]["counters"]["allowed"], 1, "{st:#}");

    // The typo'd cgroup, once it exists, is allowed (the daemon follows it).
    let _fixed = f.attach.child("svcc");
    let allowed = wait_until(LOG_TIMEOUT, || {
        let st = status_json(f.pin.path());
        (allowed_state(&st, &typo) == "allowed").then_some(())
    });
    assert!(allowed.is_some(), "{:#}", status_json(f.pin.path()));

    // A second daemon names the first.
    let (code, _, err) = run_cmd(daemon_cmd_from_file(&f, &[]));
    assert_eq!(code, 1, "{err}");
    let want = format!("another port-guard daemon (pid {}) is running", d.pid());
    assert!(
        err.lines().last().is_some_and(|l| l.contains(&want)),
        "{err}"
    );

    // Stopped: the guard stays, status says nobody reaps or follows, and exits 4.
    let pid = d.pid();
    assert!(d.terminate().success());
    let (code, st) = status_json_code(f.pin.path());
    assert_eq!(code, 4, "{st:#}");
    assert_eq!(st["attached"], true, "{st:#}");
    assert_eq!(st["daemon"]["running"], false, "{st:#}");
    assert!(st["daemon"]["stopped"].is_u64(), "{st:#}");
    let (code, table, _) = pg(&f, &["status"]);
    assert_eq!(code, 4);
    assert!(
        table.contains(&format!("NOT RUNNING (pid {pid} stopped")),
        "{table}"
    );

    // Killed: the same, without a clean stop.
    let mut d = start_from_file(&f, &[]);
    assert_eq!(status_json_code(f.pin.path()).0, 0);
    let pid = d.pid();
    d.kill9();
    let (code, table, _) = pg(&f, &["status"]);
    assert_eq!(code, 4, "{table}");
    assert!(
        table.contains(&format!(
            "NOT RUNNING (pid {pid} ended without stopping cleanly)"
        )),
        "{table}"
    );
}

/// Datagrams sent to a NOTIFY_SOCKET of the test's own.
struct Notify {
    sock: std::os::unix::net::UnixDatagram,
    path: std::path::PathBuf,
}

impl Notify {
    fn new(tmp: &TempDir) -> Notify {
        let path = tmp.path().join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Notify { sock, path }
    }

    /// Waits for a datagram containing `needle`.
    fn wait_for(&self, needle: &str) -> String {
        let mut seen = Vec::new();
        let found = wait_until(LOG_TIMEOUT, || {
            let mut buf = [0u8; 4096];
            let n = self.sock.recv(&mut buf).ok()?;
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.push(msg.clone());
            msg.contains(needle).then_some(msg)
        });
        found.unwrap_or_else(|| panic!("no notification with {needle:?}: {seen:?}"))
    }
}

fn scrape(addr: &str) -> String {
    use std::io::Write as _;
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn a_refused_reload_fails_port_guard_reload_and_shows_in_status_metrics_and_systemd() {
    let f = Fixture::new("reload-truth");
    let svc = f.attach.child("svc");
    let vm = f.attach.child("vm");
    let write = |extra: &str, ports: &str| {
        std::fs::write(
            &f.config,
            file_config(&f, extra, &reserve(ports, &[svc.path()])),
        )
        .unwrap()
    };
    write("mode = \"enforce\"", "64060-64069");
    let notify = Notify::new(&f.tmp);
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut cmd = daemon_cmd_from_file(&f, &["--mode", "audit", "--metrics-listen", &addr]);
    cmd.env("NOTIFY_SOCKET", &notify.path);
    let d = Daemon::spawn(cmd);
    d.wait_for("guard auditing", START_TIMEOUT);
    notify.wait_for("READY=1");

    // A good reload: `reload` says so, and the log names the flag that overrides the file.
    let skip = d.line_count();
    let (code, out, err) = pg(&f, &["reload"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("config reloaded"), "{out}");
    let line = d.wait_for_after(skip, "SIGHUP: config reloaded", LOG_TIMEOUT);
    assert!(line.contains("--mode (file: mode)"), "{line}");

    // A reload that takes a leased port out of every range: the lease is flagged.
    assert_eq!(lease(&f, &vm, Some(64060)), 64060);
    write("mode = \"enforce\"", "64062-64069");
    assert_eq!(pg(&f, &["reload"]).0, 0);
    let st = status_json(f.pin.path());
    let l = st["leases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["port"] == 64060)
        .unwrap_or_else(|| panic!("{st:#}"));
    assert_eq!(l["in_range"], false, "{st:#}");
    let (_, table, _) = pg(&f, &["status"]);
    assert!(
        table.contains("NO RANGE COVERS 64060: not enforced"),
        "{table}"
    );

    // A refused reload: `reload` fails naming the cause, status exits 5 and says why, the
    // metric counts it, systemd hears it.
    write("mode = \"block\"", "64062-64069");
    let (code, _, err) = pg(&f, &["reload"]);
    assert_eq!(code, 1, "{err}");
    let err = single_line(&err);
    assert!(
        err.contains("refused") && err.contains("block") && err.contains("stays in force"),
        "{err}"
    );
    let (code, st) = status_json_code(f.pin.path());
    assert_eq!(code, 5, "{st:#}");
    assert_eq!(st["daemon"]["last_reload"]["ok"], false, "{st:#}");
    assert!(
        st["daemon"]["last_reload"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("block")),
        "{st:#}"
    );
    assert_eq!(st["mode"], "audit", "the old config stays in force: {st:#}");
    let (_, table, _) = pg(&f, &["status"]);
    assert!(
        table.contains("REFUSED, the previous config stays in force"),
        "{table}"
    );
    let text = scrape(&addr);
    assert!(
        text.contains("port_guard_config_reloads_total{result=\"error\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("port_guard_config_reloads_total{result=\"ok\"} 2"),
        "{text}"
    );
    let msg = notify.wait_for("REFUSED");
    assert!(msg.contains("READY=1") && msg.contains("STATUS="), "{msg}");
}

#[test]
fn check_config_judges_the_file_against_the_running_guard_without_touching_it() {
    let f = Fixture::new("dryrun");
    let svc = f.attach.child("svc");
    let vm = f.attach.child("vm");
    std::fs::write(
        &f.config,
        file_config(&f, "", &reserve("64070-64079", &[svc.path()])),
    )
    .unwrap();
    let _d = start_from_file(&f, &[]);
    assert_eq!(lease(&f, &vm, Some(64070)), 64070);

    let nosuch = format!("{}/nosuch", f.attach.path());
    let new = f.tmp.write(
        "new.toml",
        &file_config(&f, "", &reserve("64072-64079", &[svc.path(), &nosuch])),
    );
    let new_s = new.to_str().unwrap();
    let (code, out, err) = pg(&f, &["--config", new_s, "check", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    assert_eq!(code, 0, "warnings only: {v:#}");
    assert_eq!(v["policy_source"], "config", "{v:#}");
    assert_eq!(v["config"], new_s, "{v:#}");
    let changes: Vec<&str> = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(
        changes.contains(&"range 64070-64079/tcp removed (its counters end)")
            && changes
                .iter()
                .any(|c| c.starts_with("range 64072-64079/tcp added") && c.contains(&nosuch)),
        "{v:#}"
    );
    let items = v["preflight"].as_array().unwrap();
    let item = |name: &str, needle: &str| {
        items
            .iter()
            .find(|i| i["name"] == name && i["detail"].as_str().unwrap().contains(needle))
            .unwrap_or_else(|| panic!("no {name} item about {needle}: {v:#}"))
    };
    assert_eq!(item("config", &nosuch)["warning"], true);
    assert_eq!(item("reload", "port 64070")["warning"], true);
    // Nothing changed in the guard.
    let st = status_json(f.pin.path());
    assert_eq!(st["reserve"][0]["ports"], "64070-64079", "{st:#}");
    // The sockets are judged against the file's ranges.
    let (_, text, _) = pg(&f, &["--config", new_s, "check"]);
    assert!(
        text.contains("64072-64079/tcp; ranges from config"),
        "{text}"
    );

    // An attach cgroup that does not exist fails, named.
    let bad = f.tmp.write(
        "bad.toml",
        "attach = \"/pg-test-no-such-attach\"\n[[reserve]]\nports = \"64070-64079\"\n",
    );
    let (code, out, _) = pg(&f, &["--config", bad.to_str().unwrap(), "check"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("/pg-test-no-such-attach")),
        "{out}"
    );
    // A file that does not parse is a config error, named.
    let broken = f.tmp.write("broken.toml", "mode = \n");
    let (code, _, err) = pg(&f, &["--config", broken.to_str().unwrap(), "check"]);
    assert_eq!(code, 2, "{err}");
    assert!(single_line(&err).contains("broken.toml"), "{err}");
    // Without --config, the loaded guard's ranges.
    let (_, out, _) = pg(&f, &["check", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["policy_source"], "pins", "{v:#}");
}

#[test]
fn unload_restores_through_any_path_and_forgets_an_unreachable_netns_only_when_told() {
    let attach = TestCgroup::new("forget");
    let tmp = TempDir::new("forget");
    let config = tmp.write("config.toml", "[[reserve]]\nports = \"64080-64089\"\n");
    let spawn = format!("{}/spawn", attach.path());
    let mut args = vec![
        "--attach",
        attach.path(),
        "--spawn-parent",
        &spawn,
        "--errno",
        "eaddrinuse",
    ];
    if !kernel_features().set_retval && !kernel_features().sentinel {
        args.push("--allow-fallback");
    }
    let key = "net.ipv4.ip_local_reserved_ports";
    let pin = PinDir::new("forget");

    // The daemon ran inside ns1 (its "host"), so its sysctl change was recorded without a
    // path; `unload` from here still reaches ns1, through its ip netns file.
    let ns1 = TestNetns::new("forget1");
    let before = ns1.sysctl(key);
    let mut d = integration_tests::netns::daemon_in(&ns1, &pin, &config, &args);
    assert!(ns1.sysctl(key).contains("64080-64089"));
    d.kill9();
    let (code, _, err) = run(&["--pin-dir", pin.as_str(), "unload"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ns1.sysctl(key), before, "restored in ns1 from outside it");
    assert!(!pin.exists());

    // ns2 is deleted after its daemon: no path and no process reaches it any more.
    let ns2 = TestNetns::new("forget2");
    let mut d = integration_tests::netns::daemon_in(&ns2, &pin, &config, &args);
    d.kill9();
    drop(d);
    drop(ns2);
    let (code, _, err) = run(&["--pin-dir", pin.as_str(), "unload"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        single_line(&err).contains("--forget-unreachable"),
        "the way out is named: {err}"
    );
    assert!(pin.exists(), "a refused unload leaves the guard whole");
    let (code, _, err) = run(&["--pin-dir", pin.as_str(), "unload", "--forget-unreachable"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("forgotten"), "{err}");
    assert!(!pin.exists());
}
