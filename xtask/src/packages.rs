//! Every Debian package that a `cargo xtask` verb or a test of the suite runs, in one list, and
//! the apt install of those a verb needs that are missing. `.ci/run` holds no list of its own: a
//! fresh machine gets everything from the verb it runs.
//!
//! Installing needs root and Debian's archive (apt's own sources). No package's service is
//! started by the install: while apt runs, a `policy-rc.d` that refuses every start is in place
//! (an existing one is left alone), so that e.g. Debian's `prometheus` does not start its server
//! on port 9090 and `libvirt-daemon` does not start libvirtd.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result};
use xtask::{output, require_root, run};

/// Which verb needs a package.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Verb {
    /// `cargo xtask test`: the unit tests, the integration suite on this kernel, the package
    /// tests (which build, read, install and purge the .deb and the .rpm).
    Test,
    /// `cargo xtask vm-test` and `vm-systemd`: the guests, their kernels and initramfs.
    Vm,
    /// `cargo xtask bench`.
    Bench,
}

struct Package {
    name: &'static str,
    /// What runs it: a test or a verb looks for these programs.
    why: &'static str,
    verbs: &'static [Verb],
}

use Verb::{Bench, Test, Vm};

/// The one list.
const PACKAGES: &[Package] = &[
    Package {
        name: "util-linux",
        why: "unshare, nsenter, umount: the no-cgroup2 and mount-namespace tests",
        verbs: &[Test, Bench],
    },
    Package {
        name: "iproute2",
        why: "ip netns: every test that changes a sysctl does it in a netns of its own; `ip` goes into the VM guest",
        verbs: &[Test, Vm, Bench],
    },
    Package {
        name: "bpftool",
        why: "inspecting what is attached (a test, and the VM guest when installed)",
        verbs: &[Test, Vm],
    },
    Package {
        name: "qemu-system-x86",
        why: "the live-migration tests, the bench's qemu rows, the VM guests",
        verbs: &[Test, Vm, Bench],
    },
    Package {
        name: "systemd",
        why: "systemd-analyze verify of the unit",
        verbs: &[Test],
    },
    Package {
        name: "libvirt-daemon",
        why: "libvirtd and virtlogd: the real-libvirt migration tests",
        verbs: &[Test],
    },
    Package {
        name: "libvirt-daemon-driver-qemu",
        why: "libvirt's qemu driver: the real-libvirt migration tests",
        verbs: &[Test],
    },
    Package {
        name: "libvirt-clients",
        why: "virsh: the real-libvirt migration tests",
        verbs: &[Test],
    },
    Package {
        name: "lintian",
        why: "the .deb test checks the package with lintian",
        verbs: &[Test],
    },
    Package {
        name: "rpm",
        why: "the .rpm test reads the package and installs it into a scratch root",
        verbs: &[Test],
    },
    Package {
        name: "prometheus",
        why: "promtool checks and unit-tests the alert rules; the Prometheus server evaluates the dashboard and the alerts against a daemon",
        verbs: &[Test],
    },
    Package {
        name: "prometheus-node-exporter",
        why: "the Prometheus test reads the metrics timer's textfile through node_exporter, as a host without its daemon is seen",
        verbs: &[Test],
    },
    Package {
        name: "ansible-core",
        why: "ansible-playbook: the playbook's syntax check",
        verbs: &[Test],
    },
    Package {
        name: "busybox-static",
        why: "the shell of the rpm's scratch root; the VM guests' userland",
        verbs: &[Test, Vm],
    },
    Package {
        name: "xz-utils",
        why: "unpacking trixie's compressed kernel modules for the VM guests",
        verbs: &[Vm],
    },
    Package {
        name: "debian-archive-keyring",
        why: "the key that signs Debian's archive: the VM kernels and the vm-systemd guest",
        verbs: &[Vm],
    },
    Package {
        name: "debootstrap",
        why: "vm-systemd's Debian 12 guest",
        verbs: &[Vm],
    },
    Package {
        name: "cpio",
        why: "vm-systemd's guest image",
        verbs: &[Vm],
    },
];

fn installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", package]))
        .is_some_and(|s| s.trim() == "installed")
}

/// The packages `verb` needs, whether installed or not, with why (for the README and `--help`).
pub fn needed_by(verb: Verb) -> impl Iterator<Item = (&'static str, &'static str)> {
    PACKAGES
        .iter()
        .filter(move |p| p.verbs.contains(&verb))
        .map(|p| (p.name, p.why))
}

/// Installs the packages `verb` needs that are missing, with apt, without starting any service.
pub fn install(verb: Verb) -> Result<()> {
    let missing: Vec<&str> = needed_by(verb)
        .map(|(name, _)| name)
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    require_root(&format!(
        "installing the Debian packages {} (apt, from Debian's archive)",
        missing.join(" ")
    ))?;
    eprintln!("xtask: installing {}", missing.join(" "));
    let _no_starts = NoServiceStarts::new()?;
    let install = || {
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing))
    };
    if install().is_err() {
        // A fresh machine may have no package lists yet.
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["update", "-q"]))?;
        install()?;
    }
    let still: Vec<&str> = missing.iter().copied().filter(|p| !installed(p)).collect();
    anyhow::ensure!(
        still.is_empty(),
        "apt-get install left {} not installed",
        still.join(" ")
    );
    Ok(())
}

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// A `policy-rc.d` that refuses every service start (exit 101), made only where there is none,
/// and removed again on drop.
struct NoServiceStarts {
    made: bool,
}

impl NoServiceStarts {
    fn new() -> Result<Self> {
        let path = Path::new(POLICY_RC_D);
        if path.symlink_metadata().is_ok() {
            return Ok(Self { made: false });
        }
        std::fs::write(
            path,
            "#!/bin/sh\n# made by cargo xtask while apt installs: start nothing\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {POLICY_RC_D}"))?;
        Ok(Self { made: true })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.made {
            let _ = std::fs::remove_file(POLICY_RC_D);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_package_is_listed_once_and_needed_by_some_verb() {
        let mut names: Vec<&str> = PACKAGES.iter().map(|p| p.name).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "a package is listed twice");
        assert!(PACKAGES
            .iter()
            .all(|p| !p.verbs.is_empty() && !p.why.is_empty()));
    }
}
