//! What a test leaves behind, removed: the leftovers of runs killed outright, the mount-point
//! directories the namespaces needed, and the VM cgroups libvirt made below `/machine`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use super::{cgroup_mounts, child_dirs};
use crate::{run_cmd_timeout, PREFIX};

/// The pid at the end of `<PREFIX>-<test>-<pid>` if `name` is one of a run of tests whose names
/// start with `tests`, and that run's process is gone.
fn dead_run(name: &str, tests: &str) -> bool {
    let Some(rest) = name.strip_prefix(&format!("{PREFIX}-{tests}")) else {
        return false;
    };
    let Some(pid) = rest.rsplit('-').next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
}

/// What a run of these tests that was killed outright (SIGKILL, a CI timeout: no unwinding, no
/// Drop) left behind: its guards (pin dirs `/sys/fs/bpf/<PREFIX>-<tests>*-<pid>`, unloaded), its
/// cgroups (`<PREFIX>-<tests>*-<pid>` at the cgroup2 root: libvirtd, virtlogd, the allocator,
/// all killed) and its VMs' cgroups below `/machine` (qemu killed). Only runs whose process no
/// longer exists are touched.
pub fn sweep_dead_runs(tests: &str) {
    for e in fs::read_dir("/sys/fs/bpf").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if dead_run(&name, tests) {
            eprintln!(
                "[libvirt] unloading the guard of a dead run: {}",
                e.path().display()
            );
            let mut c = Command::new(crate::bin());
            c.arg("--pin-dir").arg(e.path()).arg("unload");
            let _ = run_cmd_timeout(c, crate::CMD_TIMEOUT);
            let _ = fs::remove_dir_all(e.path());
        }
    }
    for d in child_dirs(&crate::cgroup2_mount()) {
        let name = d.file_name().unwrap().to_string_lossy().into_owned();
        if dead_run(&name, tests) {
            eprintln!(
                "[libvirt] removing the cgroups of a dead run: {}",
                d.display()
            );
            crate::cgroup::cleanup_cgroup_tree(&d);
        }
    }
    // Pair's temp dirs: <tmp>/<PREFIX>-libvirt-<test>-<pid>-<n>
    for d in child_dirs(&std::env::temp_dir()) {
        let name = d.file_name().unwrap().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix(&format!("{PREFIX}-libvirt-")) {
            let without_n = rest.rsplit_once('-').map(|(r, _)| r).unwrap_or("");
            if dead_run(&format!("{PREFIX}-{without_n}"), tests) {
                eprintln!(
                    "[libvirt] removing the temp dir of a dead run: {}",
                    d.display()
                );
                let _ = fs::remove_dir_all(&d);
            }
        }
    }
    for m in cgroup_mounts() {
        for vm in child_dirs(&m.join("machine")) {
            // qemu-N-pgt<pid>n<seq><a|b>.libvirt-qemu
            let name = vm.file_name().unwrap().to_string_lossy().into_owned();
            let pid = name
                .split("-pgt")
                .nth(1)
                .and_then(|r| r.split('n').next())
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                    eprintln!(
                        "[libvirt] removing a VM cgroup of a dead run: {}",
                        vm.display()
                    );
                    crate::cgroup::cleanup_cgroup_tree(&vm);
                }
            }
        }
    }
}

/// The host directories the namespaces bind-mount over. The package creates only /etc/libvirt;
/// the others are made here when missing and removed (if still empty) on drop, after every
/// namespace that used them is gone.
pub(super) struct MountPoints {
    created: Vec<PathBuf>,
}

const MOUNT_POINTS: &[&str] = &[
    "/etc/libvirt",
    "/run/libvirt",
    "/var/lib/libvirt",
    "/var/log/libvirt",
    "/var/cache/libvirt",
];

impl MountPoints {
    pub(super) fn new() -> MountPoints {
        let mut created = Vec::new();
        for d in MOUNT_POINTS {
            let p = PathBuf::from(d);
            if !p.exists() {
                fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {d}: {e}"));
                created.push(p);
            }
        }
        MountPoints { created }
    }
}

impl Drop for MountPoints {
    fn drop(&mut self) {
        for p in self.created.iter().rev() {
            let _ = fs::remove_dir(p);
        }
    }
}

/// What libvirt creates below `/machine` (every cgroup hierarchy): on drop, the VM cgroups of
/// this test's domains (names containing `-<token>`) are emptied (SIGKILL) and removed, and
/// `/machine` too where it did not exist before and is empty now.
pub struct MachineCleanup {
    token: String,
    existed: Vec<(PathBuf, bool)>,
}

impl MachineCleanup {
    pub fn new(token: &str) -> MachineCleanup {
        let existed = cgroup_mounts()
            .into_iter()
            .map(|m| {
                let d = m.join("machine");
                let e = d.exists();
                (d, e)
            })
            .collect();
        MachineCleanup {
            token: token.to_owned(),
            existed,
        }
    }

    /// VM cgroups of this test's domains that still exist (any hierarchy).
    pub fn leftovers(&self) -> Vec<PathBuf> {
        let mark = format!("-{}", self.token);
        self.existed
            .iter()
            .flat_map(|(d, _)| child_dirs(d))
            .filter(|c| {
                c.file_name()
                    .is_some_and(|n| n.to_string_lossy().contains(&mark))
            })
            .collect()
    }
}

impl Drop for MachineCleanup {
    fn drop(&mut self) {
        for vm in self.leftovers() {
            eprintln!("[libvirt] removing VM cgroup left behind: {}", vm.display());
            crate::cgroup::cleanup_cgroup_tree(&vm);
        }
        for (dir, existed) in &self.existed {
            if !existed && dir.exists() && child_dirs(dir).is_empty() {
                for _ in 0..50 {
                    if fs::remove_dir(dir).is_ok() || !dir.exists() {
                        break;
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}
