//! Another port allocator on the host: pg-allocator, in a cgroup of the test's.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::CommandExt as _,
    process::{Child, ChildStdout, Command, Stdio},
    thread,
};

use super::cstring;
use crate::Cgroup;

/// How pg-allocator allocates: probe the lowest free port, bind it `moment_ms` later, hold it
/// `hold_ms` (0: for good, and allocate nothing more), wait `gap_ms` holding nothing, again; when
/// no port is free, probe again after `retry_ms`.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub moment_ms: u64,
    pub hold_ms: u64,
    pub gap_ms: u64,
    pub retry_ms: u64,
}

/// `pg-allocator FIRST LAST MOMENT_MS HOLD_MS GAP_MS RETRY_MS` running in a cgroup.
/// [`Allocator::stop`] returns its JSON summary; drop SIGKILLs it.
pub struct Allocator {
    child: Child,
    stdout: Option<ChildStdout>,
}

impl Allocator {
    /// Starts `bin` (the pg-allocator executable: `env!("CARGO_BIN_EXE_pg-allocator")` in a
    /// test) in `cg` and waits until its first scan is done.
    pub fn start(bin: &str, cg: &Cgroup, ports: (u16, u16), pace: Pace) -> Allocator {
        let procs = cstring(cg.abs().join("cgroup.procs"));
        let mut c = Command::new(bin);
        c.args([
            ports.0.to_string(),
            ports.1.to_string(),
            pace.moment_ms.to_string(),
            pace.hold_ms.to_string(),
            pace.gap_ms.to_string(),
            pace.retry_ms.to_string(),
        ]);
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            c.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
        let mut child = c.spawn().unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        let stdout = child.stdout.take();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let _ = err.read_line(&mut line);
        assert_eq!(line.trim(), "ready", "{bin} did not start");
        thread::spawn(move || for _ in err.lines() {});
        eprintln!(
            "[libvirt] pg-allocator pid {} in {}: ports {}-{}, {pace:?}",
            child.id(),
            cg.path(),
            ports.0,
            ports.1
        );
        Allocator { child, stdout }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGTERM; its summary: binds, refused (errno → count), scans, scans_without_free_port,
    /// grabbed, lost, ports.
    pub fn stop(mut self) -> serde_json::Value {
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let mut line = String::new();
        BufReader::new(self.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("reading pg-allocator's summary");
        let _ = self.child.wait();
        let v = serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("pg-allocator printed {line:?}: {e}"));
        eprintln!("[libvirt] pg-allocator: {v}");
        v
    }
}

impl Drop for Allocator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
