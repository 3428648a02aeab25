//! A test's guard fixture: an attach cgroup with an `outsider` child, a pin dir, a config
//! file, and the daemon arguments for them. Field order is drop order: the pins are unloaded
//! before the cgroups go.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::{bin, kernel_features, Cgroup, Daemon, PinDir, TempDir, TestCgroup, START_TIMEOUT};

/// The cgroups, pin dir and config of one test.
pub struct Fixture {
    pub pin: PinDir,
    pub tmp: TempDir,
    pub config: PathBuf,
    pub outsider: Cgroup,
    pub attach: TestCgroup,
}

impl Fixture {
    /// `/<prefix>-<name>-<pid>` with `outsider` below it, pin dir and temp dir of that name, and
    /// a config file saying `mode = "enforce"`.
    pub fn new(name: &str) -> Fixture {
        let attach = TestCgroup::new(name);
        let outsider = attach.child("outsider");
        let tmp = TempDir::new(name);
        let config = tmp.write("config.toml", "mode = \"enforce\"\n");
        Fixture {
            pin: PinDir::new(name),
            tmp,
            config,
            outsider,
            attach,
        }
    }

    /// `--attach`, `--spawn-parent`, `--errno eaddrinuse` (and `--allow-fallback` where the
    /// kernel only has EPERM), `--reserve RANGE` when given, then `extra`.
    pub fn args(&self, range: Option<&str>, extra: &[&str]) -> Vec<String> {
        let mut a = vec![
            "--attach".to_string(),
            self.attach.path().to_string(),
            "--spawn-parent".to_string(),
            format!("{}/spawn", self.attach.path()),
            "--errno".to_string(),
            "eaddrinuse".to_string(),
        ];
        if let Some(r) = range {
            a.extend(["--reserve".to_string(), r.to_string()]);
        }
        if !kernel_features().set_retval && !kernel_features().sentinel {
            a.push("--allow-fallback".to_string());
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// `port-guard --pin-dir PIN --config CONFIG daemon ARGS...`.
    pub fn daemon_cmd(&self, pin: &Path, args: &[String]) -> Command {
        let mut c = Command::new(bin());
        c.arg("--pin-dir")
            .arg(pin)
            .arg("--config")
            .arg(&self.config)
            .arg("daemon")
            .args(args);
        c
    }

    /// A daemon on the test's pin dir, in the host's network namespace (so without ephemeral
    /// protection: the host's sysctl is not the test's to change), once it enforces.
    pub fn start(&self, range: &str, extra: &[&str]) -> Daemon {
        let mut extra = extra.to_vec();
        extra.push("--no-protect-ephemeral");
        let d = Daemon::spawn(self.daemon_cmd(self.pin.path(), &self.args(Some(range), &extra)));
        d.wait_for("guard enforcing", START_TIMEOUT);
        d
    }
}
