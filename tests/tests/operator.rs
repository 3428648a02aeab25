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
