//! [`Daemon`]: a long-running `port-guard daemon` (or any command) whose stderr lines are
//! collected for the test to wait on; SIGKILLed and reaped on drop.

use std::{
    ffi::OsStr,
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Condvar, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::{
    cmd::{bin, run_cmd_timeout, wait_attached},
    CMD_TIMEOUT,
};

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    eof: bool,
}

type SharedLog = Arc<(Mutex<LogState>, Condvar)>;

static DAEMON_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A running `port-guard --pin-dir DIR --config FILE daemon ARGS...`. Its stderr lines are
/// collected (and echoed to the test's stderr, prefixed); stdout is echoed only. Drop SIGKILLs
/// and reaps it if it is still running.
pub struct Daemon {
    child: Child,
    name: String,
    log: SharedLog,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

fn spawn_reader<R: Read + Send + 'static>(
    src: R,
    prefix: String,
    store: Option<SharedLog>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut r = BufReader::new(src);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_string();
                    eprintln!("{prefix} {line}");
                    if let Some(s) = &store {
                        let (m, cv) = &**s;
                        m.lock().unwrap().lines.push(line);
                        cv.notify_all();
                    }
                }
            }
        }
        if let Some(s) = &store {
            let (m, cv) = &**s;
            m.lock().unwrap().eof = true;
            cv.notify_all();
        }
    })
}

impl Daemon {
    /// Spawns `port-guard --pin-dir PIN --config CONFIG daemon ARGS...`, in the host's network
    /// namespace. Its sysctls are not the test's to change: ephemeral protection (on by default)
    /// is turned off with `--no-protect-ephemeral` unless ARGS choose (tests of the protection
    /// run the daemon in a namespace of their own).
    pub fn start<S: AsRef<OsStr>>(
        pin_dir: impl AsRef<Path>,
        config: impl AsRef<Path>,
        args: &[S],
    ) -> Daemon {
        let mut cmd = Command::new(bin());
        cmd.arg("--pin-dir")
            .arg(pin_dir.as_ref())
            .arg("--config")
            .arg(config.as_ref())
            .arg("daemon")
            .args(args);
        let chosen = args.iter().any(|a| {
            let a = a.as_ref();
            a == "--protect-ephemeral" || a == "--no-protect-ephemeral"
        });
        if !chosen {
            cmd.arg("--no-protect-ephemeral");
        }
        Daemon::spawn(cmd)
    }

    /// Spawns an arbitrary command as a daemon (same log collection).
    pub fn spawn(mut cmd: Command) -> Daemon {
        let n = DAEMON_SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("daemon#{n}");
        eprintln!("[harness] starting {name}: {cmd:?}");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let log: SharedLog = Arc::new((Mutex::new(LogState::default()), Condvar::new()));
        let readers = vec![
            spawn_reader(
                child.stderr.take().unwrap(),
                format!("[{name} stderr]"),
                Some(Arc::clone(&log)),
            ),
            spawn_reader(
                child.stdout.take().unwrap(),
                format!("[{name} stdout]"),
                None,
            ),
        ];
        Daemon {
            child,
            name,
            log,
            readers,
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Every stderr line collected so far.
    pub fn lines(&self) -> Vec<String> {
        self.log.0.lock().unwrap().lines.clone()
    }

    /// Number of stderr lines collected so far (use with [`Daemon::wait_for_after`]).
    pub fn line_count(&self) -> usize {
        self.log.0.lock().unwrap().lines.len()
    }

    /// Waits until a stderr line contains `needle` and returns it (the first such line).
    /// Panics with every collected line on timeout or when stderr closes without a match.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_after(0, needle, timeout)
    }

    /// Like [`Daemon::wait_for`] but only looks at lines with index >= `skip`.
    pub fn wait_for_after(&self, skip: usize, needle: &str, timeout: Duration) -> String {
        self.wait_for_line(
            skip,
            timeout,
            &format!("a line containing {needle:?}"),
            |l| l.contains(needle),
        )
    }

    /// Waits for the first line (index >= `skip`) matching `pred`; `what` describes it in the
    /// panic message.
    pub fn wait_for_line(
        &self,
        skip: usize,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.log;
        let mut st = m.lock().unwrap();
        loop {
            if let Some(l) = st.lines.iter().skip(skip).find(|l| pred(l)) {
                return l.clone();
            }
            let now = Instant::now();
            if st.eof || now >= deadline {
                let why = if st.eof {
                    "stderr closed (daemon exited?)"
                } else {
                    "timed out"
                };
                let lines = st.lines.join("\n    ");
                drop(st);
                panic!(
                    "{}: waiting for {what} after line {skip}: {why} after {:?}; stderr so far:\n    {lines}",
                    self.name,
                    timeout - deadline.saturating_duration_since(now)
                );
            }
            st = cv.wait_timeout(st, deadline - now).unwrap().0;
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        if self.status.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(st)) => {
                self.status = Some(st);
                false
            }
            _ => true,
        }
    }

    fn finish_readers(&mut self) {
        // Wait (bounded) for stderr EOF so the last lines are collected.
        let (m, cv) = &*self.log;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut st = m.lock().unwrap();
        while !st.eof {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = cv.wait_timeout(st, deadline - now).unwrap().0;
        }
        let eof = st.eof;
        drop(st);
        if eof {
            for h in self.readers.drain(..) {
                let _ = h.join();
            }
        }
    }

    fn signal_and_wait(&mut self, sig: i32, timeout: Duration) -> Option<ExitStatus> {
        if let Some(st) = self.status {
            return Some(st);
        }
        unsafe { libc::kill(self.pid(), sig) };
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => {
                    self.status = Some(st);
                    self.finish_readers();
                    return Some(st);
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => return None,
            }
        }
    }

    /// SIGKILL and reap; returns the exit status.
    pub fn kill9(&mut self) -> ExitStatus {
        self.signal_and_wait(libc::SIGKILL, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("{}: did not die after SIGKILL", self.name))
    }

    /// SIGTERM and wait (up to 30 s; then SIGKILL and panic); returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM)
    }

    /// Sends `sig` and waits up to 30 s for the exit (then SIGKILL and panic).
    pub fn signal(&mut self, sig: i32) -> ExitStatus {
        match self.signal_and_wait(sig, Duration::from_secs(30)) {
            Some(st) => st,
            None => {
                self.kill9();
                panic!(
                    "{}: did not exit within 30 s of signal {sig}; stderr:\n    {}",
                    self.name,
                    self.lines().join("\n    ")
                );
            }
        }
    }
}

impl Daemon {
    /// Polls `status --json` on `pin_dir` until it reports `"attached": true`, panicking early
    /// (with the collected stderr) if this daemon exits first.
    pub fn wait_attached(
        &mut self,
        pin_dir: impl AsRef<Path>,
        timeout: Duration,
    ) -> serde_json::Value {
        let dir = pin_dir.as_ref().to_path_buf();
        let deadline = Instant::now() + timeout;
        loop {
            if !self.running() {
                self.finish_readers();
                panic!(
                    "{} exited ({:?}) before the guard was attached; stderr:\n    {}",
                    self.name,
                    self.status,
                    self.lines().join("\n    ")
                );
            }
            if dir.exists() {
                let mut cmd = Command::new(bin());
                cmd.arg("--pin-dir").arg(&dir).arg("status").arg("--json");
                if let Ok((0, out, _)) = run_cmd_timeout(cmd, CMD_TIMEOUT) {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(out.trim()) {
                        if v["attached"] == serde_json::Value::Bool(true) {
                            return v;
                        }
                    }
                }
            }
            if Instant::now() >= deadline {
                // Let the free function produce the detailed message.
                return wait_attached(&dir, Duration::from_millis(1));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.signal_and_wait(libc::SIGKILL, Duration::from_secs(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::exit_code;

    #[test]
    fn daemon_log_collection() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo one >&2; echo out; echo 'two three' >&2; exec sleep 100",
        ]);
        let mut d = Daemon::spawn(cmd);
        assert_eq!(d.wait_for("three", Duration::from_secs(10)), "two three");
        assert_eq!(
            d.wait_for_after(1, "t", Duration::from_secs(10)),
            "two three"
        );
        assert!(d.running());
        let st = d.terminate();
        assert_eq!(exit_code(st), 128 + libc::SIGTERM);
        assert_eq!(d.lines(), vec!["one".to_string(), "two three".to_string()]);
    }

    #[test]
    #[should_panic(expected = "stderr closed")]
    fn daemon_wait_for_panics_on_exit() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo bye >&2"]);
        let d = Daemon::spawn(cmd);
        d.wait_for("never", Duration::from_secs(10));
    }
}
