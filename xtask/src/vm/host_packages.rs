//! The host side's own needs: the Debian packages `vm-test` uses on this machine, installed with
//! apt when missing.

use std::process::Command;

use anyhow::Result;
use xtask::{output, require_root, run};

/// Host packages: qemu; a static busybox for the guest; iproute2, whose `ip` goes into the guest
/// for `ip netns`; xz-utils for trixie's compressed modules; the key that signs Debian's archive;
/// debootstrap and cpio for vm-systemd's Debian guest. (dpkg-deb and ldd come with every Debian
/// system.)
const HOST_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "iproute2",
    "xz-utils",
    "debian-archive-keyring",
    "debootstrap",
    "cpio",
];

fn installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", package]))
        .is_some_and(|s| s.trim() == "installed")
}

/// Installs the missing [`HOST_PACKAGES`] with apt (CI runs on a fresh machine, as root).
pub(super) fn install_host_packages() -> Result<()> {
    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    require_root(&format!("installing {}", missing.join(" ")))?;
    let install = || {
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing))
    };
    if install().is_err() {
        // A fresh machine may have no package lists yet.
        run(Command::new("apt-get").args(["update", "-q"]))?;
        install()?;
    }
    Ok(())
}
