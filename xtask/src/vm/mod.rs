//! `cargo xtask vm-test`: the integration suite inside qemu VMs booted on Debian's own kernels.
//!
//! 1. Kernels: for each series (5.10 from bullseye, 6.1 from bookworm, 6.12 from trixie) the
//!    `linux-image-<abi>-amd64` package that the suite's newest `linux-image-amd64` depends on is
//!    fetched with apt through a private apt config under `target/vm-cache/apt` (its own
//!    sources.list, lists and cache; the machine's apt sources and state are not read or
//!    changed). vmlinuz and the few modules the suite needs are kept under
//!    `target/vm-cache/kernels/<series>/`, so a second run downloads nothing.
//! 2. Build, once for all kernels: the agent (release) and the integration-test executables,
//!    static (`+crt-static`), in their own target dir `target/vm` so the normal build is not
//!    invalidated.
//! 3. Initramfs, written here as a newc cpio, uncompressed (under TCG, unpacking it gzip'd took
//!    4 s longer per boot than loading it 3.5 times larger): busybox-static and its applet links,
//!    the agent, the test executables at the absolute paths they were built at (the tests find
//!    pg-hostile and pg-sockets through `env!("CARGO_BIN_EXE_...")`), iproute2's `ip` (busybox's
//!    has no `netns`) and bpftool when installed, with their shared libraries, and
//!    [`INIT`](initramfs::INIT). Each kernel gets a second, small cpio with its modules appended.
//! 4. qemu boots it (TCG by default: KVM hangs booting Linux guests on the project's machines).
//!    The init mounts proc, sysfs, devtmpfs, cgroup2 and bpffs, runs every test on its own
//!    and prints `PG-RESULT <binary>::<test> pass|fail|skip <reason>` on the serial console, then
//!    `PG-DONE`, and powers off. This side reads the console (saved under `target/vm/logs/`),
//!    kills qemu on a kernel panic or a timeout, prints kernel × test, and fails when a test
//!    failed or a kernel did not finish.
//!
//! A test skips by printing `PG-SKIP: <reason>` (the harness's `skip()`), e.g. where the kernel
//! lacks a feature it is about; `PG-SKIP-PART: <reason>` marks a part of a passing test that could
//! not run.
//!
//! Where each step lives:
//!
//! - this module: what `--kernel` and `--accel` accept, [`Options`], and [`vm_test`], the whole
//!   run from start to exit status;
//! - [`apt`]: the private apt config that finds and downloads Debian's kernel packages;
//! - [`kernel`]: the kernel cache (vmlinuz and the suite's modules, unpacked from the .deb);
//! - [`static_build`]: the static agent and test executables;
//! - [`initramfs`]: the guest's /init and the initramfs around it, written with [`cpio`];
//! - [`qemu`]: booting one kernel and turning its console into test results;
//! - [`report`]: the kernel × test table and the summary after it;
//! - [`elf`]: the little ELF reading the build checks and the module unpacking need;
//! - [`systemd`]: `cargo xtask vm-systemd`, the .deb under a real systemd in a Debian 12 guest.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Result};

mod apt;
mod cpio;
mod elf;
mod initramfs;
mod kernel;
mod qemu;
mod report;
mod static_build;
mod systemd;

pub use systemd::vm_systemd;

use self::{
    apt::Apt,
    qemu::{End, Status},
};

/// Kernel series, as `--kernel` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelArg {
    #[value(name = "5.10")]
    V5_10,
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.12")]
    V6_12,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    Tcg,
    Kvm,
}

/// A Debian kernel series and the suite whose `linux-image-amd64` provides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Series {
    pub name: &'static str,
    suite: &'static str,
}

const SERIES: [Series; 3] = [
    Series {
        name: "5.10",
        suite: "bullseye",
    },
    Series {
        name: "6.1",
        suite: "bookworm",
    },
    Series {
        name: "6.12",
        suite: "trixie",
    },
];

impl KernelArg {
    fn series(self) -> Vec<Series> {
        match self {
            KernelArg::V5_10 => vec![SERIES[0]],
            KernelArg::V6_1 => vec![SERIES[1]],
            KernelArg::V6_12 => vec![SERIES[2]],
            KernelArg::All => SERIES.to_vec(),
        }
    }
}

/// What `cargo xtask vm-test` was asked for.
pub struct Options {
    pub kernels: Vec<KernelArg>,
    pub accel: Accel,
    pub filter: Option<String>,
    /// For one kernel: boot and the whole suite.
    pub timeout: Duration,
    /// For one test inside the guest.
    pub test_timeout: Duration,
    pub refresh_kernels: bool,
    pub verbose: bool,
    /// A shell command to run in the guest instead of the suite.
    pub exec: Option<String>,
}

pub fn vm_test(root: &Path, opts: &Options) -> Result<()> {
    ensure!(
        cfg!(target_arch = "x86_64"),
        "vm-test builds x86_64 guests and runs them on an x86_64 host"
    );
    let mut series: Vec<Series> = Vec::new();
    for s in opts.kernels.iter().flat_map(|k| k.series()) {
        if !series.contains(&s) {
            series.push(s);
        }
    }
    let t_all = Instant::now();
    let work = root.join("target/vm");
    let (kernels, images, times) = prepare(root, &work, &series, opts)?;
    let logs = work.join("logs");
    fs::create_dir_all(&logs)?;
    let mut outcomes = Vec::new();
    for (k, img) in kernels.iter().zip(&images) {
        let log = logs.join(format!("{}.log", k.series.name));
        eprintln!(
            "\nxtask: booting {} ({}: {} {}), console in {}",
            k.series.name,
            k.release,
            k.package,
            k.version,
            log.display()
        );
        outcomes.push(qemu::boot(k, img, &log, opts)?);
    }
    if opts.exec.is_some() {
        return Ok(());
    }
    report::report(&outcomes);
    let [kernels_s, build_s, initramfs_s] = times.map(|t| t.as_secs_f64());
    eprintln!(
        "times: kernels {kernels_s:.1} s (download and unpack, or cache), build {build_s:.1} s, initramfs {initramfs_s:.1} s, VMs {:.1} s, total {:.1} s",
        outcomes.iter().map(|o| o.wall.as_secs_f64()).sum::<f64>(),
        t_all.elapsed().as_secs_f64()
    );
    verdict(&outcomes)
}

/// The kernels (fetched or cached), the static build, and an initramfs per kernel; with the time
/// each of the three took.
fn prepare(
    root: &Path,
    work: &Path,
    series: &[Series],
    opts: &Options,
) -> Result<(Vec<kernel::Kernel>, Vec<PathBuf>, [Duration; 3])> {
    let cache = root.join("target/vm-cache");
    let t = Instant::now();
    let mut apt = Apt::new(&cache.join("apt"))?;
    let kernels = series
        .iter()
        .map(|s| kernel::fetch_kernel(&cache, &mut apt, *s, opts.refresh_kernels))
        .collect::<Result<Vec<_>>>()?;
    let t_kernels = t.elapsed();

    let t = Instant::now();
    let art = static_build::build(root, work)?;
    let t_build = t.elapsed();

    let t = Instant::now();
    let initramfs_dir = work.join("initramfs");
    fs::create_dir_all(&initramfs_dir)?;
    let base = initramfs_dir.join("base.cpio");
    initramfs::write_base_initramfs(&base, &art, opts)?;
    let mut images = Vec::new();
    for k in &kernels {
        let img = initramfs_dir.join(format!("initramfs-{}.cpio", k.series.name));
        initramfs::write_kernel_initramfs(&img, &base, k, kernels[0].series.name)?;
        images.push(img);
    }
    let t_initramfs = t.elapsed();
    eprintln!(
        "xtask: kernels ready in {:.1} s, build {:.1} s, initramfs {:.1} s ({} MiB)",
        t_kernels.as_secs_f64(),
        t_build.as_secs_f64(),
        t_initramfs.as_secs_f64(),
        fs::metadata(&base)?.len() >> 20
    );
    Ok((kernels, images, [t_kernels, t_build, t_initramfs]))
}

/// An error naming what failed: tests, kernels that did not finish, kernels that ran no test.
fn verdict(outcomes: &[qemu::Outcome]) -> Result<()> {
    let failed: usize = outcomes
        .iter()
        .map(|o| {
            o.results
                .iter()
                .filter(|r| r.status == Status::Fail)
                .count()
        })
        .sum();
    let unfinished: Vec<String> = outcomes
        .iter()
        .filter(|o| !matches!(o.end, End::Done))
        .map(|o| format!("{} ({})", o.series.name, o.end.describe()))
        .collect();
    let empty: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.results.is_empty())
        .map(|o| o.series.name)
        .collect();
    if failed > 0 || !unfinished.is_empty() || !empty.is_empty() {
        bail!(
            "vm-test failed: {failed} test failure(s); kernels that did not finish: {}; kernels that ran no test: {}",
            if unfinished.is_empty() { "none".into() } else { unfinished.join(", ") },
            if empty.is_empty() { "none".into() } else { empty.join(", ") }
        );
    }
    Ok(())
}
