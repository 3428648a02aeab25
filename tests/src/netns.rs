//! Network namespaces the tests create (`ip netns add`), and running commands inside them with
//! setns(2) only, so that mounts (/sys/fs/bpf, the cgroup2 mount) stay as they are — unlike
//! `ip netns exec`, which remounts /sys.

use std::{ffi::CString, os::unix::process::CommandExt as _, path::PathBuf, process::Command};

use crate::{bin, Cgroup, Daemon, PinDir, START_TIMEOUT};

/// `/run/netns/<PREFIX>-<name>-<pid>` with `lo` up; deleted on drop.
pub struct TestNetns {
    pub name: String,
}

impl TestNetns {
    pub fn new(name: &str) -> TestNetns {
        TestNetns::named(&format!("{}-{name}-{}", crate::PREFIX, std::process::id()))
    }

    /// `/run/netns/<name>` exactly (the caller makes the name its own), with `lo` up.
    pub fn named(name: &str) -> TestNetns {
        let name = name.to_owned();
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("running ip (iproute2)");
        assert!(st.success(), "ip netns add {name}");
        let ns = TestNetns { name };
        let st = Command::new("ip")
            .args(["-n", &ns.name, "link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(st.success(), "ip -n {} link set lo up", ns.name);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Reads a sysctl file under /proc/sys inside the namespace.
    pub fn sysctl(&self, key: &str) -> String {
        let out = self
            .command("cat")
            .arg(format!("/proc/sys/{}", key.replace('.', "/")))
            .output()
            .unwrap();
        assert!(out.status.success(), "reading {key} in {}", self.name);
        String::from_utf8_lossy(&out.stdout)
            .trim_end_matches('\n')
            .to_owned()
    }

    /// Writes a sysctl inside the namespace.
    pub fn set_sysctl(&self, key: &str, value: &str) {
        let st = self
            .command("sh")
            .args([
                "-c",
                &format!("echo '{value}' > /proc/sys/{}", key.replace('.', "/")),
            ])
            .status()
            .unwrap();
        assert!(st.success(), "setting {key}={value} in {}", self.name);
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        self.enter(&mut c, None);
        c
    }

    /// Runs `f` on a thread of its own inside the namespace (setns(2) moves only that thread).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = std::fs::File::open(self.path()).unwrap();
        std::thread::scope(|s| {
            s.spawn(move || {
                use std::os::fd::AsRawFd as _;
                // SAFETY: setns(2) on an open netns file, for this thread only.
                let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// Makes `cmd` enter the namespace (and `cgroup`, if given) before exec.
    pub fn enter(&self, cmd: &mut Command, cgroup: Option<&Cgroup>) {
        if let Some(cg) = cgroup {
            enter_cgroup(cmd, cg);
        }
        let ns = CString::new(self.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(ns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
    }
}

/// Makes `cmd` move itself into `cg` before exec (a failed move fails the spawn).
pub fn enter_cgroup(cmd: &mut Command, cg: &Cgroup) {
    let procs = CString::new(cg.abs().join("cgroup.procs").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        });
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs `port-guard unload` inside the namespace on drop, so the sysctl is restored where it was
/// changed even when an assert fails. Declare it after the PinDir it guards (it drops first).
pub struct UnloadInNetns<'a> {
    pub ns: &'a TestNetns,
    pub pin: &'a PinDir,
}

impl Drop for UnloadInNetns<'_> {
    fn drop(&mut self) {
        if self.pin.exists() {
            let _ = self
                .ns
                .command(bin())
                .arg("--pin-dir")
                .arg(self.pin.path())
                .arg("unload")
                .output();
        }
    }
}

/// `port-guard --pin-dir PIN --config CONFIG daemon ARGS...` inside the namespace, once it
/// enforces.
pub fn daemon_in<S: AsRef<std::ffi::OsStr>>(
    ns: &TestNetns,
    pin: &PinDir,
    config: &std::path::Path,
    args: &[S],
) -> Daemon {
    let mut c = ns.command(bin());
    c.arg("--pin-dir")
        .arg(pin.path())
        .arg("--config")
        .arg(config)
        .arg("daemon")
        .args(args);
    let d = Daemon::spawn(c);
    d.wait_for("guard enforcing", START_TIMEOUT);
    d
}
