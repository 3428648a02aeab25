//! The guard daemon of the libvirt tests, its stderr in a file (denials come by the thousand).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::tail;
use crate::{bin, wait_until, PinDir, LOG_TIMEOUT, START_TIMEOUT};

/// `port-guard daemon` with its stderr in a file; killed on drop (the guard stays pinned).
pub struct Guard {
    child: Child,
    log: PathBuf,
}

/// A wait long enough for the daemon's "more denials by" summary, which comes every 5 s.
fn summary_timeout(t: Duration) -> Duration {
    t.max(Duration::from_secs(5) + LOG_TIMEOUT)
}

impl Guard {
    pub fn start(pin: &PinDir, config: &Path, log: PathBuf) -> Guard {
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

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn lines(&self) -> Vec<String> {
        self.log().lines().map(str::to_owned).collect()
    }

    /// The lines at index >= `skip` that contain `what` ("denied bind", "reason=limit", ...).
    pub fn lines_after(&self, skip: usize, what: &str) -> Vec<String> {
        self.lines()
            .into_iter()
            .skip(skip)
            .filter(|l| l.contains(what))
            .collect()
    }

    /// The first line at index >= `skip` that contains `needle`.
    pub fn wait_for(&mut self, skip: usize, needle: &str, timeout: Duration) -> String {
        self.wait_line(skip, &format!("{needle:?}"), timeout, |l| {
            l.contains(needle)
        })
    }

    /// The first report of a denial with `errno` from `cgroup` or below it: its own line, or,
    /// when the cgroup had used its budget of lines (libvirt probes every port of the range in
    /// a burst), the "more denials by" summary whose last denial it is.
    pub fn wait_for_denial(
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
                    tail(&self.log(), 100)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Rewrites `config` with `text`, sends SIGHUP and waits for the reload.
    pub fn reload(&mut self, config: &Path, text: &str) {
        fs::write(config, text).unwrap();
        let skip = self.lines().len();
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
        self.wait_for(skip, "SIGHUP: config reloaded", LOG_TIMEOUT);
    }

    /// SIGTERM: the daemon exits, the guard stays attached (pinned).
    pub fn terminate(&mut self) {
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
                tail(&self.log(), 80)
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// "denied"/"audit" lines of the guard's log.
pub fn guard_lines(g: &Guard, what: &str) -> Vec<String> {
    g.lines_after(0, what)
}
