//! Test harness for the `port-guard` integration tests.
//!
//! Everything here is RAII and panic-safe: whatever a test creates (cgroups, pin dirs, temp
//! dirs, daemons, helper processes) is torn down in `Drop`, even when an assertion fails half
//! way through the test.
//!
//! - [`cgroup2_mount`]: where cgroup2 is mounted (from /proc/self/mountinfo, never hard-coded).
//! - [`TestCgroup`] / [`Cgroup`]: a test's own cgroup subtree; binds and helper processes run in
//!   its children.
//! - [`PinDir`]: a test's own bpffs pin dir, unloaded and removed on drop.
//! - [`TempDir`]: a scratch dir (config files).
//! - [`Daemon`]: a running `port-guard daemon` whose stderr is collected line by line.
//! - [`bind_in`] / [`bind_in_pid`]: a real forked process that moves itself into a cgroup and
//!   calls bind(2); the errno is reported back.
//! - [`Holder`]: a forked process parked in a cgroup (keeps it populated).
//! - [`insert_lease`] / [`remove_lease`]: write the pinned `PG_LEASES` map directly with aya.
//! - [`run`], [`run_cmd`], [`status_json`]: one-shot invocations of the binary.
//!
//! Tests need root. The binary is `$PORT_GUARD_BIN` or `<dir of the test exe>/../port-guard`
//! (`target/debug/port-guard` when the test runs from `target/debug/deps/`).

use std::{
    ffi::{CString, OsStr},
    fs,
    io::{BufRead, BufReader, Read},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::{
        ffi::OsStrExt,
        fs::{MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Condvar, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

pub use port_guard_common as common;
use port_guard_common::Lease;

/// Prefix of every cgroup, pin dir and temp dir the tests create.
pub const PREFIX: &str = "pg-test";

/// How long to wait for a daemon to start (load + attach), for log lines and for exits.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for a denial line to show up after the bind.
pub const LOG_TIMEOUT: Duration = Duration::from_secs(15);
/// Upper bound for one-shot commands (`status`, `unload`, failing `daemon` invocations).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Binary location
// ---------------------------------------------------------------------------------------------

fn find_bin() -> Result<PathBuf, String> {
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

// ---------------------------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------------------------

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Name of an errno value ("EADDRINUSE"), for readable assertion messages.
pub fn errno_name(e: i32) -> String {
    match e {
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        libc::EADDRINUSE => "EADDRINUSE".into(),
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL".into(),
        libc::EINVAL => "EINVAL".into(),
        _ => format!("errno {e} ({})", std::io::Error::from_raw_os_error(e)),
    }
}

/// Maps an exit status to a single code: the exit code, or 128 + signal when killed.
pub fn exit_code(st: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

// ---------------------------------------------------------------------------------------------
// cgroup2
// ---------------------------------------------------------------------------------------------

/// Undoes the octal escapes (`\040` etc.) of /proc/self/mountinfo path fields.
fn unescape_mountinfo(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// The cgroup2 mount point, from /proc/self/mountinfo (the fstype after " - " is "cgroup2").
/// Panics when there is none.
pub fn cgroup2_mount() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    for line in info.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        if post.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        if let Some(mp) = pre.split_whitespace().nth(4) {
            return unescape_mountinfo(mp);
        }
    }
    panic!("no cgroup2 mount in /proc/self/mountinfo");
}

/// A cgroup somewhere below the cgroup2 mount: a plain handle (no cleanup; the owning
/// [`TestCgroup`] removes the whole subtree).
#[derive(Clone, Debug)]
pub struct Cgroup {
    abs: PathBuf,
    rel: String,
}

impl Cgroup {
    /// Absolute directory on the cgroup2 mount.
    pub fn abs(&self) -> &Path {
        &self.abs
    }

    /// Path relative to the cgroup2 mount, as port-guard takes it: `/pg-test-x-12/allowed`.
    pub fn path(&self) -> &str {
        &self.rel
    }

    /// The cgroup id (inode number of its directory).
    pub fn id(&self) -> u64 {
        fs::metadata(&self.abs)
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.abs.display()))
            .ino()
    }

    /// The cgroup's level: number of path components (the root is 0).
    pub fn level(&self) -> u32 {
        self.rel.split('/').filter(|c| !c.is_empty()).count() as u32
    }

    /// Creates (if needed) the sub-cgroup `name` (may contain `/` for nested ones; every
    /// missing component is created).
    pub fn child(&self, name: &str) -> Cgroup {
        assert!(
            !name.is_empty()
                && !name
                    .split('/')
                    .any(|c| c.is_empty() || c == ".." || c == "."),
            "bad child cgroup name {name:?}"
        );
        let abs = self.abs.join(name);
        fs::create_dir_all(&abs).unwrap_or_else(|e| panic!("mkdir {}: {e}", abs.display()));
        Cgroup {
            abs,
            rel: format!("{}/{}", self.rel, name),
        }
    }

    /// Pids in this cgroup only (cgroup.procs).
    pub fn procs(&self) -> Vec<i32> {
        read_procs(&self.abs)
    }

    /// Whether any process is in this cgroup or below (cgroup.events "populated").
    pub fn populated(&self) -> bool {
        match fs::read_to_string(self.abs.join("cgroup.events")) {
            Ok(s) => s.lines().any(|l| l.trim() == "populated 1"),
            Err(_) => subtree_dirs(&self.abs)
                .iter()
                .any(|d| !read_procs(d).is_empty()),
        }
    }
}

impl AsRef<Path> for Cgroup {
    fn as_ref(&self) -> &Path {
        &self.abs
    }
}

fn read_procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// `dir` and every directory below it, parents before children.
fn subtree_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(rd) = fs::read_dir(&out[i]) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

/// A test's own top-level cgroup `/<PREFIX>-<name>-<pid>` under the cgroup2 mount. Derefs to
/// [`Cgroup`]. Drop kills every process of the subtree, waits for it to empty and removes every
/// directory of it, deepest first.
pub struct TestCgroup {
    cg: Cgroup,
}

impl TestCgroup {
    pub fn new(name: &str) -> TestCgroup {
        let mount = cgroup2_mount();
        let dirname = format!("{PREFIX}-{name}-{}", std::process::id());
        let abs = mount.join(&dirname);
        if abs.exists() {
            // Left over from a crashed run with the same pid: clean it first.
            cleanup_cgroup_tree(&abs);
        }
        fs::create_dir(&abs).unwrap_or_else(|e| panic!("mkdir {}: {e}", abs.display()));
        TestCgroup {
            cg: Cgroup {
                abs,
                rel: format!("/{dirname}"),
            },
        }
    }
}

impl std::ops::Deref for TestCgroup {
    type Target = Cgroup;
    fn deref(&self) -> &Cgroup {
        &self.cg
    }
}

impl AsRef<Path> for TestCgroup {
    fn as_ref(&self) -> &Path {
        &self.cg.abs
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        cleanup_cgroup_tree(&self.cg.abs);
    }
}

/// Kills everything in the subtree at `top`, waits for it to empty, rmdirs deepest first.
/// Never panics (it runs from Drop).
fn cleanup_cgroup_tree(top: &Path) {
    let kill_file = top.join("cgroup.kill");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dirs = subtree_dirs(top);
        let pids: Vec<i32> = dirs.iter().flat_map(|d| read_procs(d)).collect();
        if pids.is_empty() {
            break;
        }
        if kill_file.exists() && fs::write(&kill_file, "1").is_ok() {
            // cgroup.kill covers the whole subtree
        } else {
            for pid in &pids {
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
        }
        if Instant::now() >= deadline {
            eprintln!(
                "[harness] cgroup {} still has processes {pids:?}",
                top.display()
            );
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let mut dirs = subtree_dirs(top);
    dirs.reverse(); // children after parents in subtree_dirs: reversed = deepest first
    for d in dirs {
        let mut tries = 0;
        loop {
            match fs::remove_dir(&d) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) => {
                    tries += 1;
                    if tries > 100 {
                        eprintln!("[harness] rmdir {}: {e}", d.display());
                        break;
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pin dir and temp dir
// ---------------------------------------------------------------------------------------------

/// A test's own pin dir `/sys/fs/bpf/<PREFIX>-<name>-<pid>` (not created here: the daemon
/// creates it). Drop runs `port-guard --pin-dir DIR unload` (failure ignored) and then removes
/// the dir if it is still there.
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new(name: &str) -> PinDir {
        let path = PathBuf::from(format!(
            "/sys/fs/bpf/{PREFIX}-{name}-{}",
            std::process::id()
        ));
        let pd = PinDir { path };
        if pd.path.exists() {
            // Left over from an earlier run with the same pid.
            pd.cleanup();
        }
        pd
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as a `&str` (for argument lists).
    pub fn as_str(&self) -> &str {
        self.path.to_str().expect("pin dir path is UTF-8")
    }

    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Path of the pin of map `name` (e.g. [`common::MAP_LEASES`]).
    pub fn map(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn cleanup(&self) {
        if let Ok(bin) = find_bin() {
            let mut cmd = Command::new(bin);
            cmd.arg("--pin-dir").arg(&self.path).arg("unload");
            match run_cmd_timeout(cmd, CMD_TIMEOUT) {
                Ok((code, _, err)) if code != 0 && self.path.exists() => {
                    eprintln!(
                        "[harness] unload of {} exited {code}: {err}",
                        self.path.display()
                    )
                }
                Err(e) => eprintln!("[harness] unload of {}: {e}", self.path.display()),
                _ => {}
            }
        }
        if self.path.exists() {
            // Pins are files (unlink) and maybe sub dirs; bpffs allows both.
            if let Err(e) = fs::remove_dir_all(&self.path) {
                eprintln!("[harness] remove {}: {e}", self.path.display());
            }
        }
    }
}

impl AsRef<Path> for PinDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        self.cleanup();
    }
}

static TEMP_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A scratch directory `$TMPDIR/<PREFIX>-<name>-<pid>-<n>` (mode 0755, so `nobody` can read
/// config files in it), removed recursively on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let n = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{PREFIX}-{name}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o755));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `file` (relative) with `contents` (mode 0644) and returns its path.
    pub fn write(&self, file: &str, contents: &str) -> PathBuf {
        let p = self.path.join(file);
        fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        let _ = fs::set_permissions(&p, fs::Permissions::from_mode(0o644));
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// One-shot commands
// ---------------------------------------------------------------------------------------------

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

/// `port-guard --pin-dir DIR status --json`, asserting exit 0 and parsing the JSON object.
pub fn status_json(pin_dir: impl AsRef<Path>) -> serde_json::Value {
    let dir = pin_dir.as_ref();
    let (code, out, err) = run(&[
        OsStr::new("--pin-dir"),
        dir.as_os_str(),
        OsStr::new("status"),
        OsStr::new("--json"),
    ]);
    assert_eq!(
        code, 0,
        "status --json failed (exit {code}); stderr:\n{err}\nstdout:\n{out}"
    );
    let v: serde_json::Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("status --json printed invalid JSON ({e}):\n{out}"));
    assert!(v.is_object(), "status --json is not an object:\n{out}");
    v
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
            Ok((0, out, _)) => match serde_json::from_str::<serde_json::Value>(out.trim()) {
                Ok(v) if v["attached"] == serde_json::Value::Bool(true) => Some(v),
                Ok(v) => {
                    last = v.to_string();
                    None
                }
                Err(e) => {
                    last = format!("bad JSON ({e}): {out}");
                    None
                }
            },
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

// ---------------------------------------------------------------------------------------------
// Daemon
// ---------------------------------------------------------------------------------------------

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
    /// Spawns `port-guard --pin-dir PIN --config CONFIG daemon ARGS...`.
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
                Some(log.clone()),
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

// ---------------------------------------------------------------------------------------------
// bind() from a real process in a cgroup
// ---------------------------------------------------------------------------------------------

/// Address family of a bind, derived from the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// `0.0.0.0`
pub const ANY4: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
/// `[::]` (IPV6_V6ONLY left at the system default)
pub const ANY6: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
/// `127.0.0.1`
pub const LO4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// `::1`
pub const LO6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
/// `::ffff:127.0.0.1` (v4-mapped, on an AF_INET6 socket)
pub const MAPPED_LO4: IpAddr = IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x7f00, 0x0001));

/// What the child process binds.
#[derive(Clone, Debug)]
pub struct BindSpec {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Proto,
    /// The child's comm (prctl PR_SET_NAME); at most 15 bytes are kept.
    pub comm: String,
    pub reuseaddr: bool,
}

impl BindSpec {
    pub fn new(addr: IpAddr, port: u16, proto: Proto) -> BindSpec {
        BindSpec {
            addr,
            port,
            proto,
            comm: "pg-outsider".into(),
            reuseaddr: false,
        }
    }
    pub fn tcp(addr: IpAddr, port: u16) -> BindSpec {
        BindSpec::new(addr, port, Proto::Tcp)
    }
    pub fn udp(addr: IpAddr, port: u16) -> BindSpec {
        BindSpec::new(addr, port, Proto::Udp)
    }
    pub fn comm(mut self, comm: &str) -> BindSpec {
        self.comm = comm.into();
        self
    }
    pub fn reuseaddr(mut self) -> BindSpec {
        self.reuseaddr = true;
        self
    }
    pub fn family(&self) -> Family {
        match self.addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

// Stages reported by the child: which step failed.
const STAGE_OK: i32 = 0;
const STAGE_CGROUP_OPEN: i32 = 1;
const STAGE_CGROUP_WRITE: i32 = 2;
const STAGE_PRCTL: i32 = 3;
const STAGE_SOCKET: i32 = 4;
const STAGE_SETSOCKOPT: i32 = 5;
const STAGE_BIND: i32 = 6;
const STAGE_PAUSE: i32 = 7;

fn stage_name(s: i32) -> &'static str {
    match s {
        STAGE_OK => "ok",
        STAGE_CGROUP_OPEN => "open cgroup.procs",
        STAGE_CGROUP_WRITE => "write cgroup.procs",
        STAGE_PRCTL => "prctl(PR_SET_NAME)",
        STAGE_SOCKET => "socket",
        STAGE_SETSOCKOPT => "setsockopt(SO_REUSEADDR)",
        STAGE_BIND => "bind",
        STAGE_PAUSE => "parked",
        _ => "unknown stage",
    }
}

/// Everything the child needs, allocated before fork.
struct Prepared {
    procs: CString,
    comm: CString,
    domain: i32,
    ty: i32,
    addr: libc::sockaddr_storage,
    addrlen: libc::socklen_t,
    reuseaddr: bool,
}

fn prepare(cgroup: &Path, spec: &BindSpec) -> Prepared {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())
        .expect("cgroup path has no NUL");
    let mut comm_bytes: Vec<u8> = spec
        .comm
        .as_bytes()
        .iter()
        .copied()
        .filter(|&b| b != 0)
        .collect();
    comm_bytes.truncate(15);
    let comm = CString::new(comm_bytes).unwrap();
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let (domain, addrlen) = match spec.addr {
        IpAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: spec.port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.octets()),
                },
                sin_zero: [0; 8],
            };
            unsafe { std::ptr::write(&mut addr as *mut _ as *mut libc::sockaddr_in, sin) };
            (libc::AF_INET, std::mem::size_of::<libc::sockaddr_in>())
        }
        IpAddr::V6(a) => {
            let mut sin6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = spec.port.to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.octets(),
            };
            unsafe { std::ptr::write(&mut addr as *mut _ as *mut libc::sockaddr_in6, sin6) };
            (libc::AF_INET6, std::mem::size_of::<libc::sockaddr_in6>())
        }
    };
    let ty = match spec.proto {
        Proto::Tcp => libc::SOCK_STREAM,
        Proto::Udp => libc::SOCK_DGRAM,
    } | libc::SOCK_CLOEXEC;
    Prepared {
        procs,
        comm,
        domain,
        ty,
        addr,
        addrlen: addrlen as libc::socklen_t,
        reuseaddr: spec.reuseaddr,
    }
}

fn errno() -> i32 {
    unsafe { *libc::__errno_location() }
}

/// Child side: async-signal-safe calls only. Reports (stage, errno) and either exits or, with
/// `park`, pauses forever after a successful move.
unsafe fn child_main(p: &Prepared, wfd: i32, do_bind: bool, park: bool) -> ! {
    let report = |stage: i32, err: i32| {
        let msg: [i32; 2] = [stage, err];
        libc::write(
            wfd,
            msg.as_ptr() as *const libc::c_void,
            std::mem::size_of_val(&msg),
        );
    };
    let fd = libc::open(p.procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
    if fd < 0 {
        report(STAGE_CGROUP_OPEN, errno());
        libc::_exit(101);
    }
    if libc::write(fd, b"0".as_ptr() as *const libc::c_void, 1) != 1 {
        report(STAGE_CGROUP_WRITE, errno());
        libc::_exit(102);
    }
    libc::close(fd);
    if libc::prctl(libc::PR_SET_NAME, p.comm.as_ptr() as libc::c_ulong, 0, 0, 0) != 0 {
        report(STAGE_PRCTL, errno());
        libc::_exit(103);
    }
    if park {
        report(STAGE_PAUSE, 0);
        libc::close(wfd);
        loop {
            libc::pause();
        }
    }
    if !do_bind {
        report(STAGE_OK, 0);
        libc::_exit(0);
    }
    let s = libc::socket(p.domain, p.ty, 0);
    if s < 0 {
        report(STAGE_SOCKET, errno());
        libc::_exit(104);
    }
    if p.reuseaddr {
        let one: libc::c_int = 1;
        if libc::setsockopt(
            s,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) != 0
        {
            report(STAGE_SETSOCKOPT, errno());
            libc::_exit(105);
        }
    }
    let r = libc::bind(s, &p.addr as *const _ as *const libc::sockaddr, p.addrlen);
    if r != 0 {
        report(STAGE_BIND, errno());
        libc::_exit(1);
    }
    report(STAGE_OK, 0);
    libc::_exit(0);
}

/// Forks; the child runs [`child_main`]. Returns (child pid, stage, errno) as reported through
/// a pipe. With `park` the child is left running (caller owns the pid); otherwise it is reaped.
fn fork_child(cgroup: &Path, spec: &BindSpec, do_bind: bool, park: bool) -> (i32, i32, i32) {
    let p = prepare(cgroup, spec);
    let mut fds = [0i32; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        panic!("pipe2: {}", std::io::Error::last_os_error());
    }
    let (rfd, wfd) = (fds[0], fds[1]);
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let e = std::io::Error::last_os_error();
        unsafe {
            libc::close(rfd);
            libc::close(wfd);
        }
        panic!("fork: {e}");
    }
    if pid == 0 {
        unsafe {
            libc::close(rfd);
            child_main(&p, wfd, do_bind, park)
        }
    }
    unsafe { libc::close(wfd) };
    let mut msg = [0i32; 2];
    let want = std::mem::size_of_val(&msg);
    let mut got = 0usize;
    while got < want {
        let n = unsafe {
            libc::read(
                rfd,
                (msg.as_mut_ptr() as *mut u8).add(got) as *mut libc::c_void,
                want - got,
            )
        };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            break;
        }
        got += n as usize;
    }
    unsafe { libc::close(rfd) };
    if !park || got < want {
        let mut wst = 0;
        unsafe { libc::waitpid(pid, &mut wst, 0) };
    }
    if got < want {
        panic!(
            "child {pid} for {spec:?} in {} died without reporting",
            cgroup.display()
        );
    }
    (pid, msg[0], msg[1])
}

/// Forks a real process that moves itself into `cgroup` (absolute dir on the cgroup2 mount),
/// sets its comm, creates the socket and binds; returns the child's pid and `Ok` or the bind
/// errno. Panics when any step other than bind() fails (e.g. the move into the cgroup), so a
/// broken setup never passes for an allowed bind.
pub fn bind_in_pid(cgroup: impl AsRef<Path>, spec: &BindSpec) -> (i32, Result<(), i32>) {
    let cgroup = cgroup.as_ref();
    let (pid, stage, err) = fork_child(cgroup, spec, true, false);
    let r = match stage {
        STAGE_OK => Ok(()),
        STAGE_BIND => Err(err),
        s => panic!(
            "bind child {pid} for {spec:?} in {}: {} failed: {}",
            cgroup.display(),
            stage_name(s),
            std::io::Error::from_raw_os_error(err)
        ),
    };
    eprintln!(
        "[harness] pid {pid} comm={} in {}: bind {}:{} ({}) -> {}",
        spec.comm,
        cgroup.display(),
        spec.addr,
        spec.port,
        spec.proto.name(),
        match r {
            Ok(()) => "ok".to_string(),
            Err(e) => errno_name(e),
        }
    );
    (pid, r)
}

/// [`bind_in_pid`] without the pid.
pub fn bind_in(cgroup: impl AsRef<Path>, spec: &BindSpec) -> Result<(), i32> {
    bind_in_pid(cgroup, spec).1
}

/// A forked process parked (pause()) in a cgroup, e.g. to keep a leased cgroup populated so the
/// daemon does not reap its lease. Drop SIGKILLs and reaps it.
pub struct Holder {
    pid: i32,
}

impl Holder {
    pub fn pid(&self) -> i32 {
        self.pid
    }
}

/// Parks a process in `cgroup` (absolute dir); panics when it cannot move there.
pub fn hold_in(cgroup: impl AsRef<Path>) -> Holder {
    let cgroup = cgroup.as_ref();
    let spec = BindSpec::tcp(ANY4, 0).comm("pg-holder");
    let (pid, stage, err) = fork_child(cgroup, &spec, false, true);
    if stage != STAGE_PAUSE {
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        panic!(
            "holder {pid} in {}: {} failed: {}",
            cgroup.display(),
            stage_name(stage),
            std::io::Error::from_raw_os_error(err)
        );
    }
    Holder { pid }
}

impl Drop for Holder {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Leases, written straight into the pinned map
// ---------------------------------------------------------------------------------------------

fn leases_map(pin_dir: &Path) -> aya::maps::HashMap<aya::maps::MapData, u32, Lease> {
    use aya::maps::{HashMap, Map, MapData};
    let pin = pin_dir.join(common::MAP_LEASES);
    let data = MapData::from_pin(&pin)
        .unwrap_or_else(|e| panic!("open pinned map {}: {e}", pin.display()));
    let map =
        Map::from_map_data(data).unwrap_or_else(|e| panic!("pinned map {}: {e}", pin.display()));
    HashMap::<_, u32, Lease>::try_from(map).unwrap_or_else(|e| {
        panic!(
            "pinned map {} is not HashMap<u32, Lease>: {e}",
            pin.display()
        )
    })
}

/// The allocators' leased-port bitmap in `<pin_dir>/PG_ALLOC`: whether `port` is marked.
pub fn alloc_marked(pin_dir: impl AsRef<Path>, port: u16) -> bool {
    let m = alloc_map(pin_dir.as_ref());
    let word = m
        .get(&((common::ALLOC_BITMAP + usize::from(port) / 64) as u32), 0)
        .unwrap_or_else(|e| panic!("read PG_ALLOC: {e}"));
    word & (1u64 << (port % 64)) != 0
}

/// Sets or clears the mark of `port` in `<pin_dir>/PG_ALLOC` behind the allocators' back (a
/// stale mark, or a lease whose allocator died before marking it). Not atomic: only for tests
/// where nothing else allocates meanwhile.
pub fn set_alloc_mark(pin_dir: impl AsRef<Path>, port: u16, marked: bool) {
    let mut m = alloc_map(pin_dir.as_ref());
    let index = (common::ALLOC_BITMAP + usize::from(port) / 64) as u32;
    let word = m
        .get(&index, 0)
        .unwrap_or_else(|e| panic!("read PG_ALLOC: {e}"));
    let bit = 1u64 << (port % 64);
    let word = if marked { word | bit } else { word & !bit };
    m.set(index, word, 0)
        .unwrap_or_else(|e| panic!("write PG_ALLOC: {e}"));
    eprintln!(
        "[harness] port {port} {} in the bitmap",
        if marked { "marked" } else { "unmarked" }
    );
}

fn alloc_map(pin_dir: &Path) -> aya::maps::Array<aya::maps::MapData, u64> {
    use aya::maps::{Array, Map, MapData};
    let pin = pin_dir.join(common::MAP_ALLOC);
    let data = MapData::from_pin(&pin)
        .unwrap_or_else(|e| panic!("open pinned map {}: {e}", pin.display()));
    let map =
        Map::from_map_data(data).unwrap_or_else(|e| panic!("pinned map {}: {e}", pin.display()));
    Array::<_, u64>::try_from(map)
        .unwrap_or_else(|e| panic!("pinned map {} is not Array<u64>: {e}", pin.display()))
}

/// The lease for `cgroup` as the programs expect it (id, level, since = now).
pub fn lease_for(cgroup: &Cgroup) -> Lease {
    Lease {
        cgroup_id: cgroup.id(),
        level: cgroup.level(),
        _pad: 0,
        since: now_secs(),
    }
}

/// Inserts (or replaces) the lease of `port` to `cgroup` in `<pin_dir>/PG_LEASES`.
pub fn insert_lease(pin_dir: impl AsRef<Path>, port: u16, cgroup: &Cgroup) {
    let mut m = leases_map(pin_dir.as_ref());
    let lease = lease_for(cgroup);
    m.insert(port as u32, lease, 0)
        .unwrap_or_else(|e| panic!("insert lease {port} -> {}: {e}", cgroup.path()));
    eprintln!(
        "[harness] leased port {port} to {} ({lease:?})",
        cgroup.path()
    );
}

/// Removes the lease of `port` from `<pin_dir>/PG_LEASES` (panics if it is not there).
pub fn remove_lease(pin_dir: impl AsRef<Path>, port: u16) {
    let mut m = leases_map(pin_dir.as_ref());
    m.remove(&(port as u32))
        .unwrap_or_else(|e| panic!("remove lease {port}: {e}"));
    eprintln!("[harness] removed lease of port {port}");
}

/// The lease of `port` in the pinned map, if any.
pub fn get_lease(pin_dir: impl AsRef<Path>, port: u16) -> Option<Lease> {
    leases_map(pin_dir.as_ref()).get(&(port as u32), 0).ok()
}

/// What `bpftool -j cgroup show <cgroup>` prints (trimmed), or `None` when bpftool is not
/// installed. Empty output or `[]` means nothing is attached there.
pub fn bpftool_cgroup_progs(cgroup: &Cgroup) -> Option<String> {
    let out = Command::new("bpftool")
        .arg("-j")
        .arg("cgroup")
        .arg("show")
        .arg(cgroup.abs())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Panics if bpftool (when installed) shows any program attached to `cgroup`.
#[track_caller]
pub fn assert_nothing_attached(cgroup: &Cgroup) {
    if let Some(s) = bpftool_cgroup_progs(cgroup) {
        assert!(
            s.is_empty() || s == "[]",
            "programs left attached to {}: {s}",
            cgroup.path()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Assertions on stderr
// ---------------------------------------------------------------------------------------------

/// Whether `hay` contains `needle` as a token: not preceded or followed by a letter or digit
/// (so "0" in `"0"` or `0:` matches but the 0 in "61500" does not).
pub fn contains_token(hay: &str, needle: &str) -> bool {
    let is_word = |c: char| c.is_ascii_alphanumeric();
    hay.match_indices(needle).any(|(i, _)| {
        let before = hay[..i].chars().next_back();
        let after = hay[i + needle.len()..].chars().next();
        !before.is_some_and(is_word) && !after.is_some_and(is_word)
    })
}

/// The only line of `stderr`; panics unless it is exactly one non-empty line (a single trailing
/// newline is fine).
pub fn single_line(stderr: &str) -> &str {
    let body = stderr.strip_suffix('\n').unwrap_or(stderr);
    let lines: Vec<&str> = body.split('\n').collect();
    assert!(
        lines.len() == 1 && !lines[0].trim().is_empty(),
        "expected exactly one non-empty line on stderr, got {} line(s):\n{stderr}",
        lines.len()
    );
    lines[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(
            unescape_mountinfo("/sys/fs/cgroup"),
            PathBuf::from("/sys/fs/cgroup")
        );
    }

    #[test]
    fn tokens() {
        assert!(contains_token("bad range \"0\": expected", "0"));
        assert!(!contains_token("61500-61510", "0"));
        assert!(contains_token("bad path /a/../b (no ..)", "/a/../b"));
        assert!(contains_token("x 5000-4000: first > last", "5000-4000"));
    }

    #[test]
    fn single_line_checks() {
        assert_eq!(single_line("oops\n"), "oops");
        assert_eq!(single_line("oops"), "oops");
    }

    #[test]
    #[should_panic]
    fn single_line_rejects_two() {
        single_line("a\nb\n");
    }

    #[test]
    #[should_panic]
    fn single_line_rejects_empty() {
        single_line("");
    }

    // Self-tests of the harness (root and cgroup2 needed, no port-guard binary).

    #[test]
    fn cgroup_tree_bind_and_cleanup() {
        let abs;
        {
            let cg = TestCgroup::new("selftest-cg");
            abs = cg.abs().to_path_buf();
            let a = cg.child("a");
            let deep = a.child("b/c");
            assert_eq!(deep.path(), format!("{}/a/b/c", cg.path()));
            assert_eq!(deep.level(), 4);
            assert_eq!(cg.level(), 1);
            assert_ne!(a.id(), cg.id());
            assert!(!cg.populated());

            let h = hold_in(&deep);
            let own = fs::read_to_string(format!("/proc/{}/cgroup", h.pid())).unwrap();
            assert!(
                own.lines().any(|l| l == format!("0::{}", deep.path())),
                "{own}"
            );
            let comm = fs::read_to_string(format!("/proc/{}/comm", h.pid())).unwrap();
            assert_eq!(comm.trim(), "pg-holder");
            assert!(cg.populated());
            assert_eq!(deep.procs(), vec![h.pid()]);
            // Leave a second holder for Drop to kill.
            let h2 = hold_in(&a);
            std::mem::forget(h2);

            assert_eq!(bind_in(&deep, &BindSpec::tcp(LO4, 0)), Ok(()));
            assert_eq!(bind_in(&a, &BindSpec::udp(ANY6, 0)), Ok(()));
            assert_eq!(bind_in(&a, &BindSpec::tcp(MAPPED_LO4, 0)), Ok(()));

            // A port held by the test process: the child sees the real errno.
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            assert_eq!(
                bind_in(&a, &BindSpec::tcp(LO4, port)),
                Err(libc::EADDRINUSE)
            );
            assert_eq!(
                bind_in(&a, &BindSpec::tcp(ANY6, port)),
                Err(libc::EADDRINUSE)
            );
            assert_eq!(bind_in(&a, &BindSpec::tcp(LO6, port)), Ok(()));
            drop(h);
        }
        assert!(!abs.exists(), "{} not removed", abs.display());
    }

    #[test]
    #[should_panic(expected = "cgroup.procs")]
    fn bind_in_missing_cgroup_panics() {
        let _ = bind_in(
            cgroup2_mount().join("pg-test-no-such-cgroup"),
            &BindSpec::tcp(LO4, 0),
        );
    }

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
pub mod netns;
pub mod qemu;
pub mod sock;

/// What the running kernel lets the guard do, from `port-guard check --json` (cached).
#[derive(Clone, Copy, Debug)]
pub struct Features {
    /// Refused binds get the configured errno (bpf_set_retval, 6.1+); EPERM otherwise.
    pub set_retval: bool,
}

pub fn kernel_features() -> Features {
    static CACHE: std::sync::OnceLock<Features> = std::sync::OnceLock::new();
    *CACHE.get_or_init(|| {
        let (_, out, err) = run(&[
            "--pin-dir",
            "/nonexistent-pg-test-pin",
            "--config",
            "/dev/null",
            "check",
            "--json",
        ]);
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("check --json: {e}: {out} {err}"));
        Features {
            set_retval: v["features"]["set_retval"]
                .as_bool()
                .expect("features.set_retval in check --json"),
        }
    })
}

/// The errno a refused bind gets with `errno = "eaddrinuse"`: EADDRINUSE, or EPERM on kernels
/// without bpf_set_retval.
pub fn expected_errno() -> i32 {
    if kernel_features().set_retval {
        libc::EADDRINUSE
    } else {
        libc::EPERM
    }
}

/// Prints why a test does not run on this machine (`PG-SKIP: <reason>`); the test returns right
/// after. `cargo xtask vm-test` reports the test as skipped, with the reason.
pub fn skip(reason: &str) {
    println!("PG-SKIP: {reason}");
}

/// Prints why a part of a test does not run on this machine while the rest does
/// (`PG-SKIP-PART: <reason>`). `cargo xtask vm-test` reports the test as passed, with the note.
pub fn skip_part(reason: &str) {
    println!("PG-SKIP-PART: {reason}");
}
pub mod libvirt;
