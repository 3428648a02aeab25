//! One-shot runs: where the `port-guard` binary is, running it (or any command) with a
//! timeout, and its `status --json`.

use std::{
    ffi::OsStr,
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{
    util::{exit_code, wait_until},
    CMD_TIMEOUT,
};

pub(crate) fn find_bin() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("PORT_GUARD_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "PORT_GUARD_BIN={} does not exist or is not a file",
                p.display()
            ))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let dir = exe.parent().ok_or("current_exe has no parent")?;
    let p = dir.join("..").join("port-guard");
    if p.is_file() {
        Ok(p.canonicalize().unwrap_or(p))
    } else {
        Err(format!(
            "port-guard binary not found at {} (test exe {}): build it first with \
             `cargo build -p port-guard`, or set PORT_GUARD_BIN to its path",
            p.display(),
            exe.display()
        ))
    }
}

/// Path of the `port-guard` binary under test. Panics with a clear message when it is missing.
pub fn bin() -> PathBuf {
    match find_bin() {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// Runs `cmd` (stdin null, stdout/stderr captured) and waits at most `timeout`; on timeout the
/// process is SIGKILLed and an error returned. Returns (exit code, stdout, stderr); the code is
/// 128 + signal for a killed process.
pub fn run_cmd_timeout(
    mut cmd: Command,
    timeout: Duration,
) -> Result<(i32, String, String), String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{cmd:?} did not exit within {timeout:?}; killed"));
            }
            Err(e) => return Err(format!("wait {cmd:?}: {e}")),
        }
    };
    // Output pipes may be held open by grandchildren; don't wait forever for EOF.
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
    Ok((exit_code(status), stdout, stderr))
}

/// Like [`run_cmd_timeout`] with [`CMD_TIMEOUT`], panicking on spawn failure or timeout.
pub fn run_cmd(cmd: Command) -> (i32, String, String) {
    match run_cmd_timeout(cmd, CMD_TIMEOUT) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    }
}

/// Runs `port-guard ARGS...` and returns (exit code, stdout, stderr).
pub fn run<S: AsRef<OsStr>>(args: &[S]) -> (i32, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    let r = run_cmd(cmd);
    eprintln!(
        "[harness] port-guard {:?} -> exit {}\n  stdout: {}\n  stderr: {}",
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>(),
        r.0,
        r.1.trim_end(),
        r.2.trim_end()
    );
    r
}

/// `port-guard --pin-dir DIR status --json`, parsing the JSON object; asserts that status
/// printed one (exit 0, or 3/4/5: not attached, no daemon, last reload refused).
pub fn status_json(pin_dir: impl AsRef<Path>) -> serde_json::Value {
    status_json_code(pin_dir).1
}

/// [`status_json`] with its exit status.
pub fn status_json_code(pin_dir: impl AsRef<Path>) -> (i32, serde_json::Value) {
    let dir = pin_dir.as_ref();
    let (code, out, err) = run(&[
        OsStr::new("--pin-dir"),
        dir.as_os_str(),
        OsStr::new("status"),
        OsStr::new("--json"),
    ]);
    assert!(
        [0, 3, 4, 5].contains(&code),
        "status --json failed (exit {code}); stderr:\n{err}\nstdout:\n{out}"
    );
    let v: serde_json::Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("status --json printed invalid JSON ({e}):\n{out}"));
    assert!(v.is_object(), "status --json is not an object:\n{out}");
    (code, v)
}

/// Polls `status --json` until it reports `"attached": true` (for modes that log no
/// `guard enforcing` line, e.g. audit). Panics after `timeout`.
pub fn wait_attached(pin_dir: impl AsRef<Path>, timeout: Duration) -> serde_json::Value {
    let dir = pin_dir.as_ref().to_path_buf();
    let mut last = String::new();
    let r = wait_until(timeout, || {
        if !dir.exists() {
            last = "pin dir does not exist yet".into();
            return None;
        }
        let mut cmd = Command::new(bin());
        cmd.arg("--pin-dir").arg(&dir).arg("status").arg("--json");
        match run_cmd_timeout(cmd, CMD_TIMEOUT) {
            // 4/5: attached, but no daemon (yet) or a refused reload: the guard is in force.
            Ok((0 | 3 | 4 | 5, out, _)) => {
                match serde_json::from_str::<serde_json::Value>(out.trim()) {
                    Ok(v) if v["attached"] == serde_json::Value::Bool(true) => Some(v),
                    Ok(v) => {
                        last = v.to_string();
                        None
                    }
                    Err(e) => {
                        last = format!("bad JSON ({e}): {out}");
                        None
                    }
                }
            }
            Ok((code, _, err)) => {
                last = format!("exit {code}: {err}");
                None
            }
            Err(e) => {
                last = e;
                None
            }
        }
    });
    r.unwrap_or_else(|| {
        panic!(
            "guard at {} not attached after {timeout:?}; last status: {last}",
            dir.display()
        )
    })
}

/// A file of the repository, by its path from the workspace root.
pub fn workspace_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// GET /metrics from a daemon's `--metrics-listen` address: the whole response, which must be
/// a 200.
pub fn scrape_metrics(addr: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_cmd_times_out() {
        let mut cmd = Command::new("sleep");
        cmd.arg("100");
        assert!(run_cmd_timeout(cmd, Duration::from_millis(200)).is_err());
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo a; echo b >&2; exit 3"]);
        assert_eq!(run_cmd(cmd), (3, "a\n".to_string(), "b\n".to_string()));
    }
}
