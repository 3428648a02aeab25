//! Real qemu for migration tests: diskless q35 guests on loopback, driven over QMP.
//!
//! [`Qemu`] kills its process on drop. [`Qmp`] is a minimal QMP client (one command at a time,
//! events skipped).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

/// The qemu binary: `$QEMU` or qemu-system-x86_64 on PATH.
pub fn qemu_bin() -> String {
    std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

/// The arguments every test guest gets: no disk, no display, TCG, QMP on `qmp`.
pub fn guest_args(qmp: &Path) -> Vec<String> {
    [
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-m",
        "128",
        "-nodefaults",
        "-display",
        "none",
        "-qmp",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("unix:{},server=on,wait=off", qmp.display())])
    .collect()
}

/// A qemu process, killed on drop.
pub struct Qemu {
    pub child: Child,
    pub qmp_path: PathBuf,
}

impl Qemu {
    /// Starts `qemu_bin() guest_args(qmp) extra...`.
    pub fn start(qmp: &Path, extra: &[&str]) -> Qemu {
        let child = Command::new(qemu_bin())
            .args(guest_args(qmp))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", qemu_bin()));
        Qemu {
            child,
            qmp_path: qmp.to_owned(),
        }
    }

    /// Wraps a child started some other way (through `port-guard spawn`).
    pub fn adopt(child: Child, qmp: &Path) -> Qemu {
        Qemu {
            child,
            qmp_path: qmp.to_owned(),
        }
    }

    pub fn qmp(&self) -> Qmp {
        Qmp::connect(&self.qmp_path, Duration::from_secs(30))
    }

    /// Whether the process is still alive (its exit status if not).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.qmp_path);
    }
}

/// A QMP connection with capabilities negotiated.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path, timeout: Duration) -> Qmp {
        Qmp::try_connect(path, timeout).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Connects, retrying until `timeout` (qemu creates the socket a moment after it starts).
    pub fn try_connect(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(format!("QMP {}: {e}", path.display())),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let greeting = q.read();
        assert!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
        q.execute("qmp_capabilities", json!({}));
        Ok(q)
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("reading QMP");
        assert!(n > 0, "QMP connection closed");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent {line:?}: {e}"))
    }

    /// Runs a command and returns its `return` value; panics on `error`.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Value {
        match self.try_execute(cmd, args) {
            Ok(v) => v,
            Err(e) => panic!("QMP {cmd}: {e}"),
        }
    }

    /// Runs a command: `Ok(return)` or `Err(error)`.
    pub fn try_execute(&mut self, cmd: &str, args: Value) -> Result<Value, Value> {
        let msg = json!({ "execute": cmd, "arguments": args });
        writeln!(self.writer, "{msg}").expect("writing QMP");
        loop {
            let v = self.read();
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(e.clone());
            }
            // an event: skip
        }
    }

    /// `query-status` → status string ("running", "inmigrate", ...).
    pub fn status(&mut self) -> String {
        self.execute("query-status", json!({}))["status"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    /// Waits up to `timeout` for the status `wanted`; returns the last one seen. A destination
    /// still says "inmigrate" for a moment after its source says "completed".
    pub fn wait_status(&mut self, wanted: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status();
            if st == wanted || Instant::now() > deadline {
                return st;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a migration to `uri` and waits for it to end: its final status and the whole
    /// `query-migrate` answer.
    pub fn migrate(&mut self, uri: &str, timeout: Duration) -> (String, Value) {
        self.execute("migrate", json!({ "uri": uri }));
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.execute("query-migrate", json!({}));
            let status = info["status"].as_str().unwrap_or("").to_owned();
            if matches!(status.as_str(), "completed" | "failed" | "cancelled")
                || Instant::now() > deadline
            {
                return (status, info);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether a TCP socket listens on `port` (any address) in this network namespace, from
/// /proc/net/tcp and tcp6, without connecting (a connection would be taken as the migration).
pub fn listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3 && cols[1].ends_with(&want) && cols[3] == "0A"
            })
    })
}
