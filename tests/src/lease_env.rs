//! The guard of the lease and spawn tests: an attach cgroup with children `allowed`, `outsider`
//! and `spawn` (the spawn parent), its own pin dir and config file (enforce, EADDRINUSE), one
//! reserved TCP range, and a daemon enforcing it. Field order is drop order: the daemon stops
//! and the pins are unloaded before the cgroups go.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::{
    bin, kernel_features, run, run_cmd, status_json, wait_until, Cgroup, Daemon, PinDir, TempDir,
    TestCgroup, START_TIMEOUT,
};

/// `/<prefix>-<name>-<pid>` with `allowed`, `outsider` and `spawn` below it, ports
/// `first..=last` reserved, and the daemon (started by [`LeaseEnv::new`]).
pub struct LeaseEnv {
    pub daemon: Option<Daemon>,
    pub pin: PinDir,
    pub tmp: TempDir,
    pub config: PathBuf,
    pub args: Vec<String>,
    pub first: u16,
    pub last: u16,
    pub allowed: Cgroup,
    pub outsider: Cgroup,
    pub spawn_parent: Cgroup,
    pub attach: TestCgroup,
}

impl LeaseEnv {
    pub fn new(name: &str, first: u16, last: u16) -> LeaseEnv {
        let attach = TestCgroup::new(name);
        let allowed = attach.child("allowed");
        let outsider = attach.child("outsider");
        let spawn_parent = attach.child("spawn");
        let pin = PinDir::new(name);
        let tmp = TempDir::new(name);
        let config = tmp.write(
            "config.toml",
            "mode = \"enforce\"\nerrno = \"eaddrinuse\"\n",
        );
        let mut args = vec![
            "--attach".into(),
            attach.path().to_string(),
            "--reserve".into(),
            format!("{first}-{last}/tcp"),
            "--allow".into(),
            allowed.path().to_string(),
            "--spawn-parent".into(),
            spawn_parent.path().to_string(),
        ];
        if !kernel_features().set_retval && !kernel_features().sentinel {
            // errno eaddrinuse cannot be enforced here (EPERM only): start anyway.
            args.push("--allow-fallback".into());
        }
        let mut e = LeaseEnv {
            daemon: None,
            pin,
            tmp,
            config,
            args,
            first,
            last,
            allowed,
            outsider,
            spawn_parent,
            attach,
        };
        e.start_daemon();
        e
    }

    pub fn start_daemon(&mut self) {
        let d = Daemon::start(self.pin.path(), &self.config, &self.args);
        d.wait_for("guard enforcing", START_TIMEOUT);
        self.daemon = Some(d);
    }

    /// SIGTERM to the daemon, which exits and leaves the guard pinned: its exit status.
    pub fn stop_daemon(&mut self) -> ExitStatus {
        let st = self.daemon.as_mut().expect("daemon running").terminate();
        self.daemon = None;
        st
    }

    /// The running daemon (panics between a stop and the next [`LeaseEnv::start_daemon`]).
    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon running")
    }

    /// `port-guard --pin-dir PIN`, to add a verb to.
    pub fn pg(&self) -> Command {
        let mut c = Command::new(bin());
        c.arg("--pin-dir").arg(self.pin.path());
        c
    }

    /// `port-guard --pin-dir PIN ARGS...`: (exit code, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        let mut all = vec!["--pin-dir", self.pin.as_str()];
        all.extend_from_slice(args);
        run(&all)
    }

    /// `port-guard lease --cgroup CG`, which must succeed: the port it leased.
    #[track_caller]
    pub fn lease(&self, cg: &Cgroup) -> u16 {
        let (code, out, err) = self.run(&["lease", "--cgroup", cg.path()]);
        assert_eq!(code, 0, "{err}");
        out.trim().parse().unwrap()
    }

    /// `port-guard lease --json ARGS...`: (exit code, the JSON on success, stderr).
    pub fn lease_json(&self, args: &[&str]) -> (i32, Value, String) {
        let mut c = self.pg();
        c.arg("lease").arg("--json").args(args);
        let (code, out, err) = run_cmd(c);
        let v = if code == 0 {
            serde_json::from_str(out.trim()).unwrap_or_else(|x| panic!("{x}: {out:?}"))
        } else {
            Value::Null
        };
        (code, v, err)
    }

    /// Starts `port-guard spawn [extra] -- cmd...` and reads the port from its first line.
    pub fn spawn(
        &self,
        extra: &[&str],
        cmd: &[String],
    ) -> Result<(u16, Child, BufReader<ChildStdout>), String> {
        let mut c = self.pg();
        c.arg("spawn").args(extra).arg("--").args(cmd);
        c.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = c.spawn().expect("starting port-guard spawn");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line)
            .expect("reading spawn's first line");
        match line.trim().parse::<u16>() {
            Ok(port) => Ok((port, child, out)),
            Err(_) => {
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
                let st = child.wait().unwrap();
                Err(format!("spawn printed {line:?}, exit {st}, stderr {err:?}"))
            }
        }
    }

    /// Runs `port-guard spawn FLAGS --json -- /bin/sh -c SCRIPT` to its end, which must be a
    /// success: the JSON line spawn printed first, and the rest of stdout (the script's).
    #[track_caller]
    pub fn spawn_json_to_end(&self, flags: &[&str], script: &str) -> (Value, String) {
        let mut c = self.pg();
        c.arg("spawn")
            .args(flags)
            .args(["--json", "--", "/bin/sh", "-c", script]);
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let (first, rest) = text.split_once('\n').unwrap_or((&text, ""));
        let v: Value = serde_json::from_str(first).unwrap();
        (v, rest.to_owned())
    }

    /// `status --json`'s leases.
    pub fn leases(&self) -> Vec<Value> {
        status_json(self.pin.path())["leases"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The lease of `port` in `status --json`, if any.
    pub fn lease_of(&self, port: u16) -> Option<Value> {
        self.leases().into_iter().find(|l| l["port"] == port)
    }

    /// Waits up to `timeout` for the lease of `port` to be gone from `status`: whether it went.
    pub fn wait_lease_ended(&self, port: u16, timeout: Duration) -> bool {
        wait_until(timeout, || self.lease_of(port).is_none().then_some(())).is_some()
    }
}

/// The `ports` of a `lease --json` or `spawn --json` answer.
pub fn ports_of(v: &Value) -> Vec<u16> {
    v["ports"]
        .as_array()
        .unwrap_or_else(|| panic!("no ports: {v}"))
        .iter()
        .map(|p| p.as_u64().unwrap() as u16)
        .collect()
}
