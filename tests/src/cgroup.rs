//! cgroup2: the mount point, [`Cgroup`] handles, the [`TestCgroup`] subtree guard, and what
//! bpftool says is attached to a cgroup.

use std::{
    ffi::OsStr,
    fs,
    os::unix::{ffi::OsStrExt, fs::MetadataExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::PREFIX;

/// Undoes the octal escapes (`\040` etc.) of /proc/self/mountinfo path fields.
pub(crate) fn unescape_mountinfo(s: &str) -> PathBuf {
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
pub(crate) fn cleanup_cgroup_tree(top: &Path) {
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
}
