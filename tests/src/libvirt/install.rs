//! Installing libvirt and qemu from Debian where they are missing, and the user and groups
//! libvirt's qemu driver needs.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Mutex, OnceLock},
    time::Duration,
};

use super::{tail, LIBVIRT_PACKAGES, QEMU};
use crate::run_cmd_timeout;

/// `name` on PATH or in the sbin directories (cargo's PATH may lack /usr/sbin).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .filter(|d| !d.is_empty())
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

pub(super) fn program(name: &str) -> PathBuf {
    find_program(name).unwrap_or_else(|| panic!("{name} is not installed"))
}

fn run_logged(mut cmd: Command, timeout: Duration) -> Result<String, String> {
    eprintln!("[libvirt] running {cmd:?}");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    match run_cmd_timeout(cmd, timeout) {
        Ok((0, out, _)) => Ok(out),
        Ok((code, out, err)) => Err(format!(
            "exit {code}\n{}\n{}",
            tail(&out, 30),
            tail(&err, 30)
        )),
        Err(e) => Err(e),
    }
}

fn getent(db: &str, key: &str) -> bool {
    Command::new("getent")
        .args([db, key])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn do_install() -> Result<(), String> {
    let mut missing: Vec<&str> = ["libvirtd", "virtlogd", "virsh"]
        .into_iter()
        .filter(|p| find_program(p).is_none())
        .collect();
    let mut packages: Vec<&str> = if missing.is_empty() {
        vec![]
    } else {
        LIBVIRT_PACKAGES.to_vec()
    };
    if !Path::new(QEMU).is_file() {
        missing.push(QEMU);
        packages.push("qemu-system-x86");
    }
    if !packages.is_empty() {
        let Some(apt) = find_program("apt-get") else {
            return Err(format!(
                "{} not installed, and no apt-get here to install them",
                missing.join(", ")
            ));
        };
        eprintln!(
            "[libvirt] {} missing: installing {}",
            missing.join(", "),
            packages.join(" ")
        );
        let install = || {
            let mut c = Command::new(&apt);
            c.args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&packages);
            run_logged(c, Duration::from_secs(900))
        };
        if let Err(first) = install() {
            // A fresh machine may have no package lists yet.
            eprintln!("[libvirt] apt-get install failed ({first}); apt-get update and retry");
            let mut c = Command::new(&apt);
            c.args(["update", "-q"]);
            run_logged(c, Duration::from_secs(600)).map_err(|e| format!("apt-get update: {e}"))?;
            // Installing was possible but failed: that is a broken CI machine, not a skip.
            install().unwrap_or_else(|e| panic!("apt-get install {}: {e}", packages.join(" ")));
        }
        for p in ["libvirtd", "virtlogd", "virsh"] {
            assert!(
                find_program(p).is_some(),
                "{p} still missing after installing {packages:?}"
            );
        }
    }
    // libvirt's qemu driver resolves its built-in user and group (libvirt-qemu:libvirt-qemu on
    // Debian) at start-up even when qemu.conf says root, and fails without them; Debian creates
    // them in libvirt-daemon-system, which is not installed (it wants systemd).
    for group in ["kvm", "libvirt-qemu"] {
        if !getent("group", group) {
            let mut c = Command::new("groupadd");
            c.args(["--system", group]);
            run_logged(c, crate::CMD_TIMEOUT).map_err(|e| format!("groupadd {group}: {e}"))?;
        }
    }
    if !getent("passwd", "libvirt-qemu") {
        let mut c = Command::new("useradd");
        c.args([
            "--system",
            "--gid",
            "libvirt-qemu",
            "--groups",
            "kvm",
            "--home-dir",
            "/var/lib/libvirt",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "libvirt-qemu",
        ]);
        run_logged(c, crate::CMD_TIMEOUT).map_err(|e| format!("useradd libvirt-qemu: {e}"))?;
    }
    Ok(())
}

/// Makes sure libvirtd, virtlogd, virsh and qemu are installed (apt-get when missing) and the
/// user and groups libvirt's qemu driver needs exist. `Err(reason)` when they cannot be had
/// here (no apt-get): the caller skips. Panics when apt-get exists but fails (CI must see it).
pub fn ensure_installed() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    DONE.get_or_init(do_install).clone()
}
