//! The processes the bench runs: `port-guard daemon`s, and the `port-guard-bench worker`s that
//! make the binds, each parked in a cgroup. Both are stopped on drop.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use port_guard::{
    guard,
    pin::{PinDir, PinError},
};

use super::{check_interrupted, in_cgroup, Cg};

/// A running `port-guard daemon`; stopped and unloaded on drop.
pub struct Daemon {
    child: Child,
    pub pin: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
    /// Load + attach as the daemon measures it (the "(N ms)" of its "guard enforcing" line).
    pub load_attach: Duration,
    /// From exec to the "guard enforcing" line.
    pub start_to_enforcing: Duration,
}

impl Daemon {
    /// Starts `port-guard --pin-dir PIN --config CONFIG daemon` and waits until it enforces.
    pub fn start(bin: &Path, pin: &Path, config: &Path, cg: &Cg) -> Result<Daemon> {
        Daemon::start_env(bin, pin, config, cg, &[])
    }

    /// [`Daemon::start`] with more environment variables (e.g. `PORT_GUARD_SENTINEL=force`).
    pub fn start_env(
        bin: &Path,
        pin: &Path,
        config: &Path,
        cg: &Cg,
        env: &[(&str, &str)],
    ) -> Result<Daemon> {
        Daemon::start_wrapped(bin, pin, config, cg, env, &[])
    }

    /// [`Daemon::start_env`] through a wrapper that execs the daemon in the same process (e.g.
    /// `setpriv --bounding-set=... --`): `wrap` is the wrapper and its arguments.
    pub fn start_wrapped(
        bin: &Path,
        pin: &Path,
        config: &Path,
        cg: &Cg,
        env: &[(&str, &str)],
        wrap: &[String],
    ) -> Result<Daemon> {
        let mut cmd = match wrap.split_first() {
            Some((w, args)) => {
                let mut c = Command::new(w);
                c.args(args).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.envs(env.iter().copied());
        cmd.arg("--pin-dir")
            .arg(pin)
            .arg("--config")
            .arg(config)
            .arg("daemon");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SIGTERM when the bench dies: the daemon exits and leaves its pins for the next run's
        // remove_stale().
        in_cgroup(&mut cmd, cg, libc::SIGTERM);
        let started = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        let stderr = child.stderr.take().expect("piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let lines = Arc::clone(&lines);
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("guard enforcing:") {
                        let _ = tx.send((Instant::now(), line.clone()));
                    }
                    lines.lock().expect("log lock").push(line);
                }
            });
        }
        let mut daemon = Daemon {
            child,
            pin: pin.to_owned(),
            lines,
            load_attach: Duration::ZERO,
            start_to_enforcing: Duration::ZERO,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            check_interrupted()?;
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok((at, line)) => {
                    daemon.start_to_enforcing = at - started;
                    daemon.load_attach = parse_ms(&line)
                        .with_context(|| format!("no \"(N ms)\" in the daemon's line {line:?}"))?;
                    return Ok(daemon);
                }
                Err(_) if Instant::now() > deadline => {
                    bail!("the daemon did not enforce within 60 s:\n{}", daemon.log())
                }
                Err(_) => {
                    if let Some(st) = daemon.child.try_wait()? {
                        thread::sleep(Duration::from_millis(100));
                        bail!(
                            "the daemon exited ({st}) before enforcing:\n{}",
                            daemon.log()
                        );
                    }
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        self.lines.lock().expect("log lock").join("\n")
    }

    /// How many lines the daemon logged so far.
    pub fn log_len(&self) -> usize {
        self.lines.lock().expect("log lock").len()
    }

    /// The lines the daemon logged after its first `from`.
    pub fn log_since(&self, from: usize) -> Vec<String> {
        let lines = self.lines.lock().expect("log lock");
        lines.get(from..).unwrap_or_default().to_vec()
    }

    /// (VmRSS, VmHWM) in KiB.
    pub fn memory_kib(&self) -> Result<(u64, u64)> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok((field("VmRSS:"), field("VmHWM:")))
    }

    /// User + system CPU time of the daemon, all its threads (utime + stime of /proc/PID/stat).
    pub fn cpu_stat(&self) -> Result<Duration> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // Fields after the command name, which may hold spaces: state is field 3, utime 14.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .context("no ')' in /proc/PID/stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| -> Result<u64> {
            fields
                .get(i)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("field {} of /proc/PID/stat", i + 3))
        };
        let total = ticks(11)? + ticks(12)?;
        // SAFETY: sysconf has no memory preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Ok(Duration::from_nanos(total * 1_000_000_000 / hz))
    }

    /// CPU time of all the daemon's threads (/proc/PID/task/*/schedstat, ns).
    pub fn cpu_time(&self) -> Duration {
        let mut ns = 0u64;
        if let Ok(tasks) = fs::read_dir(format!("/proc/{}/task", self.pid())) {
            for t in tasks.flatten() {
                if let Ok(s) = fs::read_to_string(t.path().join("schedstat")) {
                    ns += s
                        .split_whitespace()
                        .next()
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
        }
        Duration::from_nanos(ns)
    }
}

fn parse_ms(line: &str) -> Option<Duration> {
    let open = line.rfind('(')?;
    let ms: u64 = line[open + 1..].strip_suffix(" ms)")?.trim().parse().ok()?;
    Some(Duration::from_millis(ms))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        match guard::unload(&PinDir::new(&self.pin)) {
            Ok(()) | Err(guard::GuardError::PinDir(PinError::NotLoaded(_))) => {}
            Err(e) => eprintln!("bench: unloading {}: {e}", self.pin.display()),
        }
    }
}

/// A `port-guard-bench worker` process parked in a cgroup, answering one JSON request per line.
pub struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub label: String,
}

impl Worker {
    pub fn spawn(label: &str, cg: &Cg) -> Result<Worker> {
        let exe = std::env::current_exe().context("finding the bench binary")?;
        let mut cmd = Command::new(exe);
        cmd.arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        in_cgroup(&mut cmd, cg, libc::SIGKILL);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting worker {label} in {}", cg.rel))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut w = Worker {
            child,
            stdin,
            stdout,
            label: label.to_owned(),
        };
        // Proves it runs where it should.
        let r = w.call(&serde_json::json!({ "op": "cgroup" }))?;
        let at = r["cgroup"].as_str().unwrap_or_default();
        if at != cg.rel {
            bail!("worker {label} runs in {at:?}, not {}", cg.rel);
        }
        Ok(w)
    }

    /// Sends one request and waits for its answer; `{"error": ...}` answers are errors.
    pub fn call(&mut self, req: &serde_json::Value) -> Result<serde_json::Value> {
        self.send(req)?;
        self.recv(req)
    }

    /// Sends one request without waiting: [`Worker::recv`] reads the answer.
    pub fn send(&mut self, req: &serde_json::Value) -> Result<()> {
        writeln!(self.stdin, "{req}")
            .and_then(|()| self.stdin.flush())
            .with_context(|| format!("writing to worker {}", self.label))
    }

    /// Waits for the answer to `req`, sent before.
    pub fn recv(&mut self, req: &serde_json::Value) -> Result<serde_json::Value> {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .with_context(|| format!("reading from worker {}", self.label))?;
        if line.is_empty() {
            bail!("worker {} exited", self.label);
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("worker {} answered {line:?}", self.label))?;
        if let Some(e) = v.get("error") {
            bail!(
                "worker {} ({req}): {}",
                self.label,
                e.as_str().unwrap_or_default()
            );
        }
        Ok(v)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_load_time() {
        let line = "[2025 INFO port_guard::commands::daemon] guard enforcing: attach=/x mode=enforce errno=EADDRINUSE ranges=62500-62509/tcp[allow:/x/a] leases=0 pin_dir=/sys/fs/bpf/x (37 ms)";
        assert_eq!(parse_ms(line), Some(Duration::from_millis(37)));
        assert_eq!(parse_ms("guard enforcing: (x ms)"), None);
    }
}
