//! `cargo xtask vm-systemd`: the .deb under a real systemd, PID 1 of a VM booted on Debian's
//! kernel: what no test on a host without systemd can show (the unit's sandbox and
//! capabilities, the maintainer scripts' deb-systemd-helper and deb-systemd-invoke, the fd
//! store keeping the sentinel sockets across the upgrade's restart).
//!
//! The guest is Debian 12 (`debootstrap --variant=minbase`, with systemd and ansible-core; cached
//! as a cpio under `target/vm-cache/systemd`), booted with systemd as its init straight from the
//! initramfs. A second cpio appended to it carries the package and a version-bumped build of it,
//! contrib/ansible/port-guard.yml, pg-hostile (static), busybox (for insmod and nc), the kernel's
//! modules and [`GUEST`], run once by a unit at boot: the roll-out through the playbook with a
//! local connection (install in audit mode, the enforce gate, enforce, --check, the upgrade under
//! a hostile binder: one kernel runs all of it, two or more share it out), a lease, remove,
//! purge.

use std::{
    collections::VecDeque,
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use xtask::run;

use super::{
    apt::Apt,
    cpio::write_cpio,
    kernel,
    qemu::{after, command, spawn_lines, stop, End},
    static_build, Accel, KernelArg,
};

/// The guest's script (bash).
const GUEST: &str = include_str!("systemd_guest.sh");
/// The roll-out playbook the guest runs against itself (docs/fleet.md).
const PLAYBOOK: &str = include_str!("../../../contrib/ansible/port-guard.yml");

const UNIT: &str = "[Unit]\nDescription=port-guard package test\n\n[Service]\nType=oneshot\n\
ExecStart=/pg/run.sh\nStandardOutput=tty\nStandardError=tty\nTTYPath=/dev/ttyS0\n\n\
[Install]\nWantedBy=multi-user.target\n";

/// The rootfs: Debian 12, its smallest variant plus systemd as init, and what running
/// contrib/ansible/port-guard.yml on it takes: Debian's ansible-core, python3-apt (its apt
/// module), sudo (the play's `become`). debootstrap does not resolve virtual packages:
/// python3-cffi-backend provides the python3-cffi-backend-api-* that python3-cryptography (an
/// ansible-core dependency) needs.
const SUITE: &str = "bookworm";
const INCLUDE: &str =
    "systemd,systemd-sysv,dbus,ansible-core,python3-cffi-backend,python3-apt,sudo";
/// Part of the cache key with SUITE and INCLUDE: bump it when [`rootfs_cpio`] makes another image.
const IMAGE: u32 = 2;

/// `target/vm-cache/systemd/rootfs-<suite>.cpio`, made once (about 70 s of debootstrap and 10 s
/// of cpio here), and again when its key (the stamp beside it) changes.
fn rootfs_cpio(cache: &Path) -> Result<PathBuf> {
    let dir = cache.join("systemd");
    let cpio = dir.join(format!("rootfs-{SUITE}.cpio"));
    let stamp = dir.join(format!("rootfs-{SUITE}.stamp"));
    let want = format!("{SUITE} minbase {INCLUDE} image {IMAGE}\n");
    if cpio.exists() && fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(cpio);
    }
    let started = Instant::now();
    let root = dir.join(format!("rootfs-{SUITE}"));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&dir)?;
    run(Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE])
        .arg(&root)
        .arg("http://deb.debian.org/debian"))?;
    // What the guest does not need: a smaller initramfs boots faster under TCG. apt's own
    // directories stay, empty (python3-apt opens its cache there).
    for sub in ["usr/share/doc", "usr/share/man", "usr/share/locale"] {
        let _ = fs::remove_dir_all(root.join(sub));
    }
    for sub in ["var/cache/apt", "var/lib/apt/lists"] {
        let _ = fs::remove_dir_all(root.join(sub));
        fs::create_dir_all(root.join(sub).join("partial"))?;
    }
    // No login prompt on the console the test reads.
    std::os::unix::fs::symlink(
        "/dev/null",
        root.join("etc/systemd/system/serial-getty@ttyS0.service"),
    )?;
    let out = fs::File::create(&cpio).with_context(|| format!("creating {}", cpio.display()))?;
    let st = Command::new("sh")
        .args(["-c", "find . | cpio -o -H newc --quiet"])
        .current_dir(&root)
        .stdout(out)
        .status()
        .context("running find | cpio")?;
    ensure!(st.success(), "find | cpio in {} failed", root.display());
    fs::remove_dir_all(&root)?;
    fs::write(&stamp, want)?;
    eprintln!(
        "xtask: the guest's rootfs made in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        cpio.display()
    );
    Ok(cpio)
}

/// `deb` with Version `<old>+upgrade1`: the build an upgrade installs.
fn bumped(deb: &Path, work: &Path) -> Result<PathBuf> {
    let tree = work.join("bump");
    let _ = fs::remove_dir_all(&tree);
    run(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree))?;
    let control = tree.join("DEBIAN/control");
    let text = fs::read_to_string(&control)?;
    let old = text
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .context("the .deb has no Version")?
        .to_owned();
    fs::write(
        &control,
        text.replace(
            &format!("Version: {old}\n"),
            &format!("Version: {old}+upgrade1\n"),
        ),
    )?;
    let out = work.join("new.deb");
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&tree)
        .arg(&out))?;
    Ok(out)
}

pub fn vm_systemd(root: &Path, kernels: &[KernelArg], timeout: Duration) -> Result<()> {
    let t_all = Instant::now();
    let packages = crate::package::package(root)?;
    let cache = root.join("target/vm-cache");
    let work = root.join("target/vm/systemd");
    fs::create_dir_all(&work)?;
    let base = rootfs_cpio(&cache)?;
    let new_deb = bumped(&packages.deb, &work)?;
    let art = static_build::build(root, &root.join("target/vm"))?;
    let hostile = art
        .bins
        .iter()
        .find(|b| b.file_name().is_some_and(|n| n == "pg-hostile"))
        .context("the static build has no pg-hostile")?;
    let mut apt = Apt::new(&cache.join("apt"))?;
    let mut failed = Vec::new();
    let mut series = Vec::new();
    for s in kernels.iter().flat_map(|k| k.series()) {
        if !series.contains(&s) {
            series.push(s);
        }
    }
    // Every ansible-playbook run costs 20 s to a minute under TCG: one kernel runs the whole
    // roll-out through the playbook; two or more share it out, the audit and enforce gate on
    // one, --check and the upgrade on the next (the guest script says what each part does).
    let single = series.len() == 1;
    for (i, s) in series.into_iter().enumerate() {
        let flow = match (single, i % 2) {
            (true, _) => "full",
            (false, 0) => "audit",
            (false, _) => "upgrade",
        };
        let k = kernel::fetch_kernel(&cache, &mut apt, s, false)?;
        let img = work.join(format!("initramfs-{}.cpio", s.name));
        fs::copy(&base, &img).with_context(|| format!("creating {}", img.display()))?;
        let file = fs::OpenOptions::new().append(true).open(&img)?;
        write_cpio(file, |c| {
            c.host_file("pg/old.deb", &packages.deb)?;
            c.host_file("pg/new.deb", &new_deb)?;
            c.host_file("pg/pg-hostile", hostile)?;
            c.host_file("pg/busybox", Path::new("/bin/busybox"))?;
            let mut order = String::new();
            for m in &k.modules {
                let name = m.file_name().unwrap_or_default().to_string_lossy();
                c.file(&format!("pg/modules/{name}"), 0o644, &fs::read(m)?)?;
                order += name.trim_end_matches(".ko");
                order += "\n";
            }
            c.file("pg/modules/order", 0o644, order.as_bytes())?;
            c.file("pg/run.sh", 0o755, GUEST.as_bytes())?;
            c.file("pg/ansible/port-guard.yml", 0o644, PLAYBOOK.as_bytes())?;
            c.file("etc/systemd/system/pg-test.service", 0o644, UNIT.as_bytes())?;
            c.symlink(
                "etc/systemd/system/multi-user.target.wants/pg-test.service",
                "/etc/systemd/system/pg-test.service",
            )?;
            Ok(())
        })?;
        let log = work.join(format!("{}.log", s.name));
        eprintln!(
            "\nxtask: booting {} ({}) with systemd as init, roll-out part {flow:?} through the playbook, console in {}",
            s.name,
            k.release,
            log.display()
        );
        // A boot that never reached the test (no `PG-SYSTEMD:` line: the guest died or hung in
        // the kernel or in systemd's early boot) is the harness's failure, not the package's:
        // it is shown and tried once more. A guest that reached the test is never retried.
        let mut attempt = 1;
        loop {
            let b = boot(&k.vmlinuz, &img, &log, flow, timeout)?;
            match b.result.as_deref() {
                Some("PASS") => eprintln!(
                    "xtask: vm-systemd {}: pass in {:.1} s (boot to power-off)",
                    s.name,
                    b.elapsed.as_secs_f64()
                ),
                Some(why) => failed.push(format!("{}: {why}", s.name)),
                None => {
                    eprintln!(
                        "xtask: {} gave no result after {:.1} s ({}); the console's last lines:",
                        s.name,
                        b.elapsed.as_secs_f64(),
                        b.end.describe()
                    );
                    for l in &b.tail {
                        eprintln!("  | {l}");
                    }
                    if !b.reached && attempt == 1 {
                        eprintln!(
                            "xtask: {}: the guest never reached the test: booting once more",
                            s.name
                        );
                        attempt += 1;
                        continue;
                    }
                    failed.push(format!("{}: no result (see {})", s.name, log.display()));
                }
            }
            break;
        }
    }
    eprintln!(
        "xtask: vm-systemd took {:.1} s",
        t_all.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        bail!("vm-systemd failed: {}", failed.join("; "));
    }
    Ok(())
}

/// What one boot showed.
struct Booted {
    /// The last `PG-SYSTEMD:` line if it is `PASS` or `FAIL: …`.
    result: Option<String>,
    /// Whether the guest printed any `PG-SYSTEMD:` line (the test ran).
    reached: bool,
    /// How the guest ended: qemu's exit, or the timeout.
    end: End,
    elapsed: Duration,
    /// The console's last lines.
    tail: VecDeque<String>,
}

/// Boots the image; echoes the guest's `PG-SYSTEMD:` lines.
fn boot(
    vmlinuz: &Path,
    initrd: &Path,
    log: &Path,
    flow: &str,
    timeout: Duration,
) -> Result<Booted> {
    let start = Instant::now();
    let mut child = command(
        Accel::Tcg,
        2048,
        vmlinuz,
        initrd,
        &format!(
            "console=ttyS0 rdinit=/lib/systemd/systemd panic=-1 systemd.show_status=0 quiet pg.flow={flow}"
        ),
    )
    .spawn()
    .context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel();
    let readers = [
        spawn_lines(child.stdout.take().expect("piped"), "", tx.clone()),
        spawn_lines(child.stderr.take().expect("piped"), "[qemu] ", tx),
    ];
    let mut out = io::LineWriter::new(fs::File::create(log)?);
    let mut last = None;
    let mut tail = VecDeque::new();
    let deadline = Instant::now() + timeout;
    let end = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                writeln!(out, "{line}")?;
                if let Some(rest) = after(&line, "PG-SYSTEMD: ") {
                    eprintln!("  {rest}");
                    last = Some(rest.to_owned());
                }
                if tail.len() == TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            // qemu closed its output: it is exiting (as vm-test's boot reads it).
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let st = child.wait().map(|s| s.to_string()).unwrap_or_default();
                break End::Exited(st);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => break End::Timeout(timeout),
        }
    };
    stop(&mut child);
    for r in readers {
        let _ = r.join();
    }
    Ok(Booted {
        reached: last.is_some(),
        result: last.filter(|l| l == "PASS" || l.starts_with("FAIL")),
        end,
        elapsed: start.elapsed(),
        tail,
    })
}

/// How many console lines a boot with no result shows.
const TAIL: usize = 30;
