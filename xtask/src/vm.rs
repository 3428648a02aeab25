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
//!    has no `netns`) and bpftool when installed, with their shared libraries, and [`INIT`]. Each
//!    kernel gets a second, small cpio with its modules appended.
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

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    io::{self, BufRead as _, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::{output, require_root, run};

/// The guest is x86_64; so are the static executables built for it.
const TARGET: &str = "x86_64-unknown-linux-gnu";

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

/// Host packages: qemu; a static busybox for the guest; iproute2, whose `ip` goes into the guest
/// for `ip netns`; xz-utils for trixie's compressed modules; the key that signs Debian's archive.
/// (dpkg-deb and ldd come with every Debian system.)
const HOST_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "iproute2",
    "xz-utils",
    "debian-archive-keyring",
];

/// Modules that Debian builds as modules, that a Debian host loads on demand (the guest has no
/// modprobe setup, so the init loads them up front), and that the suite uses: sock_diag for TCP
/// and UDP (`check` and the daemon's conflict scan list sockets through it; without it they fall
/// back to /proc/net, which does not show bound-only TCP sockets), and SCTP (a bind test checks
/// that SCTP's own port space passes the guard), whose libcrc32c needs the crc32c algorithm
/// (a soft dependency: listed here, before it). Hard dependencies are added from each module's
/// `.modinfo`; modules built into the kernel are left out.
const MODULES: &[&str] = &[
    "inet_diag",
    "tcp_diag",
    "udp_diag",
    "crc32c_generic",
    "sctp",
];

/// Dynamically linked host tools shipped into the guest with their libraries (found with ldd),
/// and whether the run needs them: iproute2's `ip` for the network-namespace tests (busybox's
/// `ip` has no `netns`); bpftool, which the suite uses when present to check that nothing was
/// left attached.
const HOST_TOOLS: &[(&str, bool)] = &[("ip", true), ("bpftool", false)];

/// Tests that do not depend on the kernel and need host tools the guest does not have: reported
/// as skipped, with the reason, without being run. The host suite (`cargo xtask test`) runs them.
const NOT_IN_VM: &[(&str, &str)] = &[(
    "operations::the_systemd_unit_passes_systemd_analyze_verify",
    "not run in VMs: it checks contrib/port-guard.service with systemd-analyze, which the guest does not have (kernel-independent; the host suite runs it)",
)];

/// Settings of the suite for a slow machine, exported to every test in the guest. A
/// `port-guard spawn` cycle takes about 140 ms under TCG: the churn test's 10,000 cycles would
/// take 23 minutes per kernel. 1,000 run the same kernel paths (cgroup creation and removal, lease
/// map updates, the reaper's inotify) in about 2.5 minutes; the host suite runs all 10,000.
const VM_ENV: &[(&str, &str)] = &[("PG_CHURN_CYCLES", "1000")];

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
    install_host_packages()?;
    let cache = root.join("target/vm-cache");
    let work = root.join("target/vm");

    let t = Instant::now();
    let mut apt = Apt::new(&cache.join("apt"))?;
    let kernels = series
        .iter()
        .map(|s| fetch_kernel(&cache, &mut apt, *s, opts.refresh_kernels))
        .collect::<Result<Vec<_>>>()?;
    let t_kernels = t.elapsed();

    let t = Instant::now();
    let art = build(root, &work)?;
    let t_build = t.elapsed();

    let t = Instant::now();
    let initramfs_dir = work.join("initramfs");
    fs::create_dir_all(&initramfs_dir)?;
    let base = initramfs_dir.join("base.cpio");
    write_base_initramfs(&base, &art, opts)?;
    let mut images = Vec::new();
    for k in &kernels {
        let img = initramfs_dir.join(format!("initramfs-{}.cpio", k.series.name));
        write_kernel_initramfs(&img, &base, k)?;
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
        outcomes.push(boot(k, img, &log, opts)?);
    }
    if opts.exec.is_some() {
        return Ok(());
    }
    report(&outcomes);
    eprintln!(
        "times: kernels {:.1} s (download and unpack, or cache), build {:.1} s, initramfs {:.1} s, VMs {:.1} s, total {:.1} s",
        t_kernels.as_secs_f64(),
        t_build.as_secs_f64(),
        t_initramfs.as_secs_f64(),
        outcomes.iter().map(|o| o.wall.as_secs_f64()).sum::<f64>(),
        t_all.elapsed().as_secs_f64()
    );
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

// ---------------------------------------------------------------------------------------------
// Host packages
// ---------------------------------------------------------------------------------------------

fn installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", package]))
        .is_some_and(|s| s.trim() == "installed")
}

/// Installs the missing [`HOST_PACKAGES`] with apt (CI runs on a fresh machine, as root).
fn install_host_packages() -> Result<()> {
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

// ---------------------------------------------------------------------------------------------
// Kernels: a private apt config, and the cache
// ---------------------------------------------------------------------------------------------

/// apt with its own sources.list, lists and cache under `dir`; the machine's apt sources,
/// preferences and lists are not used.
struct Apt {
    dir: PathBuf,
    updated: bool,
}

impl Apt {
    fn new(dir: &Path) -> Result<Apt> {
        for sub in ["lists/partial", "cache/archives/partial", "debs"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let key = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let mut sources = String::from(
            "# Written by `cargo xtask vm-test`: where Debian's kernels come from. Only the private\n\
             # apt config of target/vm-cache/apt reads it.\n",
        );
        for (uri, suite) in [
            ("http://deb.debian.org/debian", "bullseye"),
            ("http://deb.debian.org/debian-security", "bullseye-security"),
            ("http://deb.debian.org/debian", "bookworm"),
            ("http://deb.debian.org/debian", "trixie"),
        ] {
            // target=Packages: no translations, DEP-11 or Contents indexes.
            sources += &format!("deb [signed-by={key} target=Packages] {uri} {suite} main\n");
        }
        fs::write(dir.join("sources.list"), sources)?;
        Ok(Apt {
            dir: dir.to_owned(),
            updated: false,
        })
    }

    fn cmd(&self, tool: &str) -> Command {
        let d = self.dir.display();
        let mut c = Command::new(tool);
        for opt in [
            format!("Dir::Etc::SourceList={d}/sources.list"),
            "Dir::Etc::SourceParts=/dev/null".into(),
            format!("Dir::State::Lists={d}/lists"),
            format!("Dir::Cache={d}/cache"),
            "Dir::Etc::Preferences=/dev/null".into(),
            "Dir::Etc::PreferencesParts=/dev/null".into(),
            "Acquire::Languages=none".into(),
            // Downloads land in a root-owned dir that apt's `_apt` user cannot write.
            "APT::Sandbox::User=root".into(),
        ] {
            c.arg("-o").arg(opt);
        }
        c
    }

    fn update(&mut self) -> Result<()> {
        if !self.updated {
            run(self.cmd("apt-get").args(["update", "-qq"]))?;
            self.updated = true;
        }
        Ok(())
    }

    fn query(&self, tool: &str, args: &[&str]) -> Result<String> {
        let mut c = self.cmd(tool);
        c.args(args);
        output(&mut c).with_context(|| format!("{c:?} failed"))
    }

    /// The ABI package (`linux-image-6.1.0-50-amd64`) and its version that the newest
    /// `linux-image-amd64` of the series depends on.
    fn resolve(&mut self, series: Series) -> Result<(String, String)> {
        self.update()?;
        let prefix = format!("{}.", series.name);
        let mut best: Option<String> = None;
        for line in self
            .query("apt-cache", &["madison", "linux-image-amd64"])?
            .lines()
        {
            let Some(v) = line.split('|').nth(1).map(str::trim) else {
                continue;
            };
            if !v.starts_with(&prefix) {
                continue;
            }
            let newer = match &best {
                None => true,
                Some(b) => Command::new("dpkg")
                    .args(["--compare-versions", v, "gt", b])
                    .status()
                    .is_ok_and(|s| s.success()),
            };
            if newer {
                best = Some(v.to_owned());
            }
        }
        let meta = best.with_context(|| {
            format!(
                "no linux-image-amd64 {prefix}* in {} (after apt-get update)",
                series.suite
            )
        })?;
        let deps = self.query(
            "apt-cache",
            &["depends", &format!("linux-image-amd64={meta}")],
        )?;
        let package = deps
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
            .with_context(|| {
                format!("linux-image-amd64={meta} depends on no linux-image-*: {deps}")
            })?
            .to_owned();
        let version = self
            .query("apt-cache", &["madison", &package])?
            .lines()
            .find_map(|l| l.split('|').nth(1).map(|v| v.trim().to_owned()))
            .with_context(|| format!("no version of {package}"))?;
        Ok((package, version))
    }

    /// Downloads `package` into `<dir>/debs` (unless it is there) and returns the .deb.
    fn download(&mut self, package: &str) -> Result<PathBuf> {
        let debs = self.dir.join("debs");
        let find = || -> Result<Option<PathBuf>> {
            for e in fs::read_dir(&debs)? {
                let p = e?.path();
                let name = p
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                if name.starts_with(&format!("{package}_")) && name.ends_with(".deb") {
                    return Ok(Some(p));
                }
            }
            Ok(None)
        };
        if let Some(p) = find()? {
            return Ok(p);
        }
        self.update()?;
        run(self
            .cmd("apt-get")
            .current_dir(&debs)
            .args(["download", "-q", package]))?;
        find()?.with_context(|| {
            format!(
                "apt-get download {package} left no .deb in {}",
                debs.display()
            )
        })
    }
}

/// A kernel ready to boot.
struct Kernel {
    series: Series,
    package: String,
    version: String,
    /// `uname -r`
    release: String,
    vmlinuz: PathBuf,
    /// Uncompressed modules in load order (dependencies first).
    modules: Vec<PathBuf>,
}

/// What `target/vm-cache/kernels/<series>/manifest` records; written last, so a manifest means a
/// complete entry.
const MANIFEST: &str = "manifest";

impl Kernel {
    fn load(dir: &Path, series: Series) -> Option<Kernel> {
        let text = fs::read_to_string(dir.join(MANIFEST)).ok()?;
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(str::to_owned)
        };
        if field("wanted")? != MODULES.join(" ") {
            return None; // the module list changed: unpack again
        }
        let modules: Vec<PathBuf> = field("modules")?
            .split_whitespace()
            .map(|m| dir.join("modules").join(format!("{m}.ko")))
            .collect();
        let k = Kernel {
            series,
            package: field("package")?,
            version: field("version")?,
            release: field("release")?,
            vmlinuz: dir.join("vmlinuz"),
            modules,
        };
        (k.vmlinuz.is_file() && k.modules.iter().all(|m| m.is_file())).then_some(k)
    }
}

fn fetch_kernel(cache: &Path, apt: &mut Apt, series: Series, refresh: bool) -> Result<Kernel> {
    let dir = cache.join("kernels").join(series.name);
    if !refresh {
        if let Some(k) = Kernel::load(&dir, series) {
            eprintln!(
                "xtask: kernel {}: {} {} (cached)",
                series.name, k.package, k.version
            );
            return Ok(k);
        }
    }
    let (package, version) = apt.resolve(series)?;
    if let Some(k) =
        Kernel::load(&dir, series).filter(|k| k.package == package && k.version == version)
    {
        eprintln!(
            "xtask: kernel {}: {package} {version} (cached, still the newest)",
            series.name
        );
        return Ok(k);
    }
    eprintln!(
        "xtask: kernel {}: fetching {package} {version}",
        series.name
    );
    let deb = apt.download(&package)?;
    unpack_kernel(&deb, &dir, &package, &version)?;
    // The .deb is big and everything needed from it is now in the cache.
    let _ = fs::remove_file(&deb);
    Kernel::load(&dir, series).with_context(|| {
        format!(
            "unpacked {} but {} is incomplete",
            deb.display(),
            dir.display()
        )
    })
}

/// Extracts vmlinuz and [`MODULES`] (with their dependencies, uncompressed) from `deb` into `dir`.
fn unpack_kernel(deb: &Path, dir: &Path, package: &str, version: &str) -> Result<()> {
    // Not with_extension: "6.1" has one.
    let tmp = PathBuf::from(format!("{}.unpack", dir.display()));
    let _ = fs::remove_dir_all(&tmp);
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(&tmp)?;
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp))?;
    let release = fs::read_dir(tmp.join("boot"))
        .with_context(|| format!("{} has no /boot", deb.display()))?
        .filter_map(|e| e.ok())
        .find_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_owned)
        })
        .with_context(|| format!("{} has no /boot/vmlinuz-*", deb.display()))?;
    fs::create_dir_all(dir.join("modules"))?;
    fs::copy(
        tmp.join("boot").join(format!("vmlinuz-{release}")),
        dir.join("vmlinuz"),
    )?;
    // trixie ships modules under /usr/lib, older releases under /lib.
    let mod_root = ["usr/lib/modules", "lib/modules"]
        .iter()
        .map(|d| tmp.join(d).join(&release))
        .find(|p| p.is_dir())
        .with_context(|| format!("{} has no modules dir for {release}", deb.display()))?;
    let mut index = HashMap::new();
    index_modules(&mod_root, &mut index)?;
    let builtin: BTreeSet<String> = fs::read_to_string(mod_root.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.rsplit('/')
                .next()?
                .strip_suffix(".ko")
                .map(|m| m.replace('-', "_"))
        })
        .collect();
    let mut order = Vec::new();
    for m in MODULES {
        add_module(m, &index, &builtin, dir, &mut order, &mut Vec::new())?;
    }
    fs::write(
        dir.join(MANIFEST),
        format!(
            "package={package}\nversion={version}\nrelease={release}\nwanted={}\nmodules={}\n",
            MODULES.join(" "),
            order.join(" ")
        ),
    )?;
    fs::remove_dir_all(&tmp)?;
    Ok(())
}

/// Module name (`-` read as `_`, as the kernel does) → file, for every module below `dir`.
fn index_modules(dir: &Path, index: &mut HashMap<String, PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            index_modules(&p, index)?;
        } else if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
            for ext in [".ko", ".ko.xz", ".ko.zst", ".ko.gz"] {
                if let Some(stem) = name.strip_suffix(ext) {
                    index.insert(stem.replace('-', "_"), p.clone());
                }
            }
        }
    }
    Ok(())
}

/// Writes `name` and, first, its dependencies into `<dir>/modules/<name>.ko`; `order` receives
/// load order.
fn add_module(
    name: &str,
    index: &HashMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    dir: &Path,
    order: &mut Vec<String>,
    stack: &mut Vec<String>,
) -> Result<()> {
    let name = name.replace('-', "_");
    if order.contains(&name) {
        return Ok(());
    }
    ensure!(
        !stack.contains(&name),
        "module dependency cycle: {stack:?} -> {name}"
    );
    let Some(src) = index.get(&name) else {
        ensure!(
            builtin.contains(&name),
            "module {name} is neither in the package nor built in"
        );
        return Ok(());
    };
    let data = decompress(src)?;
    let deps = elf::modinfo(&data, "depends")
        .with_context(|| format!("{} has no .modinfo section", src.display()))?;
    stack.push(name.clone());
    for dep in deps.split(',').filter(|d| !d.is_empty()) {
        add_module(dep, index, builtin, dir, order, stack)?;
    }
    stack.pop();
    fs::write(dir.join("modules").join(format!("{name}.ko")), data)?;
    order.push(name);
    Ok(())
}

fn decompress(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return fs::read(path).with_context(|| format!("reading {name}"));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running {tool} (for {name})"))?;
    ensure!(
        out.status.success(),
        "{tool} -dc {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

// ---------------------------------------------------------------------------------------------
// Static build
// ---------------------------------------------------------------------------------------------

/// The static executables for the guest.
struct Artifacts {
    agent: PathBuf,
    /// (name in results, executable): the integration test files and the harness's own tests.
    tests: Vec<(String, PathBuf)>,
    /// Helper binaries (pg-hostile, pg-sockets), found by the tests at these very paths.
    bins: Vec<PathBuf>,
}

/// Runs cargo with `args` for the guest target in `target_dir` and returns its JSON messages.
fn cargo_json(root: &Path, target_dir: &Path, args: &[&str]) -> Result<Vec<serde_json::Value>> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(root)
        .args(args)
        .args([
            "--target",
            TARGET,
            "--message-format=json-render-diagnostics",
            "--target-dir",
        ])
        .arg(target_dir)
        // With --target, RUSTFLAGS reach only the target's crates (not build scripts), and
        // aya-build sets its own flags for the eBPF object.
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        // Backtraces with lines, at a fraction of full debug info's size in the initramfs.
        .env("CARGO_PROFILE_DEV_DEBUG", "line-tables-only")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    eprintln!("xtask: {cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed: {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["executable"].is_string())
        .collect())
}

fn build(root: &Path, target_dir: &Path) -> Result<Artifacts> {
    let agent = cargo_json(
        root,
        target_dir,
        &["build", "--release", "--package", "port-guard"],
    )?
    .into_iter()
    .find(|a| a["target"]["name"] == "port-guard")
    .context("cargo built no port-guard executable")?;
    let agent = PathBuf::from(agent["executable"].as_str().unwrap_or_default());
    let mut tests = Vec::new();
    let mut bins = Vec::new();
    for a in cargo_json(
        root,
        target_dir,
        &["test", "--no-run", "--package", "integration-tests"],
    )? {
        let exe = PathBuf::from(a["executable"].as_str().unwrap_or_default());
        let name = a["target"]["name"].as_str().unwrap_or_default();
        if a["profile"]["test"] == true {
            let kinds = &a["target"]["kind"];
            let name = if kinds
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "lib"))
            {
                "harness".to_owned()
            } else {
                name.to_owned()
            };
            tests.push((name, exe));
        } else {
            bins.push(exe);
        }
    }
    tests.sort();
    ensure!(
        !tests.is_empty(),
        "cargo built no integration test executable"
    );
    for exe in std::iter::once(&agent)
        .chain(tests.iter().map(|t| &t.1))
        .chain(&bins)
    {
        let data = fs::read(exe).with_context(|| format!("reading {}", exe.display()))?;
        ensure!(
            elf::is_static(&data),
            "{} is not a static executable",
            exe.display()
        );
    }
    Ok(Artifacts { agent, tests, bins })
}

// ---------------------------------------------------------------------------------------------
// Initramfs
// ---------------------------------------------------------------------------------------------

/// The guest's /init (busybox sh). Per test: `PG-START <id>`, then `PG-RESULT <id> pass`,
/// `PG-RESULT <id> skip <reason>` or, after its output between `PG-OUTPUT-BEGIN <id>` and
/// `PG-OUTPUT-END <id>`, `PG-RESULT <id> fail <why>`.
const INIT: &str = r#"#!/bin/sh
# /init of the port-guard test VM, written by `cargo xtask vm-test`.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1 PORT_GUARD_BIN=/usr/local/bin/port-guard
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
. /pg/env

off() {
    sync
    poweroff -f
    sleep 5
    echo o >/proc/sysrq-trigger
}
abort() {
    echo "PG-ABORT $*"
    off
}

mount -t proc proc /proc || abort "mount proc"
mount -t sysfs sysfs /sys || abort "mount sysfs"
mount -t devtmpfs devtmpfs /dev || abort "mount devtmpfs"
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
# /tmp and /run stay directories of the initramfs, which is a RAM filesystem already: a tmpfs
# mounted over /tmp would hide the test executables of a checkout under /tmp (they sit at the
# absolute paths they were built at).
chmod 1777 /tmp
# The pure cgroup v2 layout (Debian 11 and later); the tests find the mount in mountinfo.
mount -t cgroup2 cgroup2 /sys/fs/cgroup || abort "mount cgroup2"
mount -t bpf bpf /sys/fs/bpf || abort "mount bpffs"
hostname pg-vm
ip link set lo up || abort "ip link set lo up"
for m in $(cat /lib/modules/pg/order 2>/dev/null); do
    insmod "/lib/modules/pg/$m.ko" || echo "PG-WARN insmod $m failed"
done
echo "PG-INIT kernel=$(uname -r) cgroup2=/sys/fs/cgroup bpffs=/sys/fs/bpf modules=$(cat /lib/modules/pg/order 2>/dev/null | tr '\n' ' ')"

if [ -s /pg/exec ]; then
    sh /pg/exec
    echo "PG-EXEC-EXIT $?"
    echo PG-DONE
    off
fi

limit=$(cat /pg/test-timeout)
filter=$(cat /pg/filter 2>/dev/null)
while read -r name exe; do
    if ! list=$("$exe" --list </dev/null 2>/tmp/pg-err); then
        echo "PG-RESULT $name::* fail cannot list its tests: $(head -c 300 /tmp/pg-err | tr '\n' ' ')"
        continue
    fi
    for t in $(echo "$list" | sed -n 's/: test$//p'); do
        id="$name::$t"
        case "$id" in *"$filter"*) ;; *) continue ;; esac
        why=$(awk -v id="$id" '$1 == id { $1 = ""; sub(/^ /, ""); print }' /pg/not-in-vm)
        if [ -n "$why" ]; then
            echo "PG-RESULT $id skip $why"
            continue
        fi
        echo "PG-START $id"
        timeout -s KILL "$limit" "$exe" --exact "$t" --nocapture --test-threads=1 </dev/null >/tmp/pg-out 2>&1
        rc=$?
        skip=$(grep -o 'PG-SKIP: .*' /tmp/pg-out | sed 's/^PG-SKIP: //' | head -n 5 | tr '\n' '|' | sed 's/|$//; s/|/; /g')
        part=$(grep -o 'PG-SKIP-PART: .*' /tmp/pg-out | sed 's/^PG-SKIP-PART: //' | head -n 5 | tr '\n' '|' | sed 's/|$//; s/|/; /g')
        if [ "$rc" -ne 0 ]; then
            echo "PG-OUTPUT-BEGIN $id"
            cat /tmp/pg-out
            echo "PG-OUTPUT-END $id"
            if [ "$rc" -eq 137 ]; then why="killed after ${limit} s"; else why="exit status $rc"; fi
            echo "PG-RESULT $id fail $why"
        elif [ -n "$skip" ]; then
            echo "PG-RESULT $id skip $skip"
        elif [ -n "$part" ]; then
            echo "PG-RESULT $id pass partly skipped: $part"
        else
            echo "PG-RESULT $id pass"
        fi
        rm -f /tmp/pg-out
    done
done </pg/tests
echo PG-DONE
off
"#;

/// Writes a newc ("070701") cpio archive: entries are added with their parent directories.
struct Cpio<W: Write> {
    out: W,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl<W: Write> Cpio<W> {
    fn new(out: W) -> Self {
        Cpio {
            out,
            ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    fn entry(&mut self, path: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.raw(path, mode, rdev, data)
    }

    fn raw(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let ino = if name == "TRAILER!!!" { 0 } else { self.ino };
        self.ino += 1;
        let header = format!(
            "070701{ino:08X}{mode:08X}{:08X}{:08X}{nlink:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            0, // uid
            0, // gid
            0, // mtime
            data.len(),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() + 1,
            0, // check
        );
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(header.len() + name.len() + 1)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    fn pad(&mut self, len: usize) -> io::Result<()> {
        self.out.write_all(&[0; 3][..(4 - len % 4) % 4])
    }

    fn dir(&mut self, path: &str) -> io::Result<()> {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.dirs.insert(path.to_owned());
        self.raw(path, 0o040755, (0, 0), &[])
    }

    fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, 0o100000 | perm, (0, 0), data)
    }

    fn host_file(&mut self, path: &str, src: &Path) -> Result<()> {
        let data = fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        self.file(path, 0o755, &data)?;
        Ok(())
    }

    fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, 0o120777, (0, 0), target.as_bytes())
    }

    fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, 0o020000 | perm, (major, minor), &[])
    }

    fn finish(mut self) -> io::Result<W> {
        self.raw("TRAILER!!!", 0, (0, 0), &[])?;
        Ok(self.out)
    }
}

/// Runs `fill` on a cpio archive written at the end of `file`.
fn write_cpio(
    file: fs::File,
    fill: impl FnOnce(&mut Cpio<io::BufWriter<fs::File>>) -> Result<()>,
) -> Result<()> {
    let mut cpio = Cpio::new(io::BufWriter::with_capacity(1 << 20, file));
    fill(&mut cpio)?;
    cpio.finish()?.flush()?;
    Ok(())
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The shared libraries `exe` loads, from ldd (the loader included).
fn libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out =
        output(Command::new("ldd").arg(exe)).with_context(|| format!("ldd {}", exe.display()))?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let p = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            p.starts_with('/').then(|| PathBuf::from(p))
        })
        .collect())
}

fn write_base_initramfs(out: &Path, art: &Artifacts, opts: &Options) -> Result<()> {
    let busybox = Path::new("/bin/busybox");
    let data = fs::read(busybox).context("reading /bin/busybox (package busybox-static)")?;
    ensure!(
        elf::is_static(&data),
        "/bin/busybox is not static: install busybox-static (it replaces busybox)"
    );
    let applets =
        output(Command::new(busybox).arg("--list-full")).context("busybox --list-full")?;
    let mut tools = Vec::new();
    for (name, required) in HOST_TOOLS {
        match find_tool(name) {
            Some(p) => tools.push((name, p)),
            None if *required => bail!("{name} is not installed on this host"),
            None => eprintln!("xtask: {name} is not installed: the guest runs without it"),
        }
    }
    let mut plan = String::new();
    for (name, exe) in &art.tests {
        plan += &format!("{name} {}\n", exe.display());
    }
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    write_cpio(file, |c| {
        for d in [
            "proc",
            "sys",
            "tmp",
            "run",
            "root",
            "etc",
            "usr/local/bin",
            "usr/local/sbin",
        ] {
            c.dir(d)?;
        }
        c.symlink("var/run", "/run")?;
        c.char_dev("dev/console", 0o600, 5, 1)?;
        c.char_dev("dev/null", 0o666, 1, 3)?;
        c.file("bin/busybox", 0o755, &data)?;
        for applet in applets
            .lines()
            .map(str::trim)
            .filter(|a| !a.is_empty() && *a != "bin/busybox")
        {
            c.symlink(applet, "/bin/busybox")?;
        }
        c.file("init", 0o755, INIT.as_bytes())?;
        c.file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        )?;
        c.file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")?;
        c.file("etc/hosts", 0o644, b"127.0.0.1 localhost\n::1 localhost\n")?;
        let mut libs = BTreeSet::new();
        for (name, path) in &tools {
            c.host_file(&format!("usr/local/sbin/{name}"), path)?;
            libs.extend(libraries(path)?);
        }
        for lib in &libs {
            c.host_file(&lib.to_string_lossy(), lib)?;
        }
        c.host_file("usr/local/bin/port-guard", &art.agent)?;
        for (_, exe) in &art.tests {
            c.host_file(&exe.to_string_lossy(), exe)?;
        }
        for exe in &art.bins {
            c.host_file(&exe.to_string_lossy(), exe)?;
        }
        c.file("pg/tests", 0o644, plan.as_bytes())?;
        c.file(
            "pg/test-timeout",
            0o644,
            opts.test_timeout.as_secs().to_string().as_bytes(),
        )?;
        c.file(
            "pg/filter",
            0o644,
            opts.filter.as_deref().unwrap_or("").as_bytes(),
        )?;
        let not_in_vm: String = NOT_IN_VM
            .iter()
            .map(|(id, why)| format!("{id} {why}\n"))
            .collect();
        c.file("pg/not-in-vm", 0o644, not_in_vm.as_bytes())?;
        let env: String = VM_ENV
            .iter()
            .map(|(k, v)| format!("export {k}={v}\n"))
            .collect();
        c.file("pg/env", 0o644, env.as_bytes())?;
        if let Some(cmd) = &opts.exec {
            c.file("pg/exec", 0o644, format!("{cmd}\n").as_bytes())?;
        }
        Ok(())
    })
}

/// `base` followed by a cpio of the kernel's modules (the kernel unpacks concatenated archives).
fn write_kernel_initramfs(out: &Path, base: &Path, k: &Kernel) -> Result<()> {
    fs::copy(base, out).with_context(|| format!("creating {}", out.display()))?;
    let file = fs::OpenOptions::new().append(true).open(out)?;
    write_cpio(file, |c| {
        let mut order = String::new();
        for m in &k.modules {
            let name = m
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            c.file(&format!("lib/modules/pg/{name}"), 0o644, &fs::read(m)?)?;
            order += name.trim_end_matches(".ko");
            order += "\n";
        }
        c.file("lib/modules/pg/order", 0o644, order.as_bytes())?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Booting and reading the console
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Pass,
    Skip,
    Fail,
}

struct TestResult {
    id: String,
    status: Status,
    /// Skip reason, failure summary, or a note on a pass.
    note: String,
    took: Option<Duration>,
}

enum End {
    /// PG-DONE seen.
    Done,
    Panic(String),
    Timeout(Duration),
    /// qemu exited before PG-DONE.
    Exited(String),
    /// The init gave up (a mount failed).
    Aborted(String),
}

impl End {
    fn describe(&self) -> String {
        match self {
            End::Done => "finished".into(),
            End::Panic(l) => format!("kernel panic: {l}"),
            End::Timeout(t) => format!("timed out after {} s", t.as_secs()),
            End::Exited(s) => format!("qemu exited early: {s}"),
            End::Aborted(m) => format!("init aborted: {m}"),
        }
    }
}

struct Outcome {
    series: Series,
    package: String,
    version: String,
    results: Vec<TestResult>,
    /// qemu start → init running.
    boot: Option<Duration>,
    /// init running → PG-DONE.
    suite: Option<Duration>,
    wall: Duration,
    end: End,
}

/// The summary of a failed test's output: the panic message and where it happened.
fn panic_summary(out: &[String]) -> Option<String> {
    let i = out.iter().position(|l| l.contains("panicked at "))?;
    let place = out[i]
        .split("panicked at ")
        .nth(1)?
        .trim_end_matches(':')
        .to_owned();
    let msg: String = out[i + 1..]
        .iter()
        .take_while(|l| !l.starts_with("note:") && !l.starts_with("stack backtrace"))
        .take(3)
        .map(|l| l.trim())
        .collect::<Vec<_>>()
        .join(" ");
    let msg: String = msg.chars().take(400).collect();
    Some(format!("{msg} ({place})"))
}

fn boot(k: &Kernel, initrd: &Path, log_path: &Path, opts: &Options) -> Result<Outcome> {
    let mut cmd = Command::new("qemu-system-x86_64");
    match opts.accel {
        Accel::Tcg => cmd.args(["-accel", "tcg"]),
        Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
    };
    // -nodefaults: no NIC (the guest has loopback only), no VGA; the serial port is the console.
    cmd.args([
        "-m",
        "1024",
        "-smp",
        "2",
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(&k.vmlinuz)
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", "console=ttyS0 panic=-1 quiet"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    eprintln!("xtask: {cmd:?}");
    let start = Instant::now();
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel::<String>();
    let readers = [
        spawn_lines(child.stdout.take().expect("piped"), "", tx.clone()),
        spawn_lines(child.stderr.take().expect("piped"), "[qemu] ", tx),
    ];
    let mut log = io::LineWriter::new(fs::File::create(log_path)?);
    let exec = opts.exec.is_some();
    let mut results: Vec<TestResult> = Vec::new();
    let mut started: HashMap<String, Instant> = HashMap::new();
    let mut captured: Option<(String, Vec<String>)> = None;
    let mut last_output: HashMap<String, Vec<String>> = HashMap::new();
    let (mut boot_at, mut done_at) = (None, None);
    let deadline = start + opts.timeout;
    let end = loop {
        let now = Instant::now();
        if now >= deadline {
            break End::Timeout(opts.timeout);
        }
        let line = match rx.recv_timeout(deadline - now) {
            Ok(l) => l,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let st = child.wait().map(|s| s.to_string()).unwrap_or_default();
                break End::Exited(st);
            }
        };
        writeln!(log, "[{:8.3}] {line}", start.elapsed().as_secs_f64())?;
        if opts.verbose || exec {
            eprintln!("  | {line}");
        }
        if let Some((id, buf)) = &mut captured {
            if line.contains(&format!("PG-OUTPUT-END {id}")) {
                let (id, buf) = captured.take().expect("capturing");
                last_output.insert(id, buf);
            } else {
                buf.push(line);
            }
            continue;
        }
        if line.contains("Kernel panic") {
            // A few more lines for the log (the panic's reason), then stop it.
            let t = Instant::now();
            while let Ok(l) = rx.recv_timeout(Duration::from_secs(2)) {
                writeln!(log, "[{:8.3}] {l}", start.elapsed().as_secs_f64())?;
                if t.elapsed() > Duration::from_secs(3) {
                    break;
                }
            }
            break End::Panic(line);
        }
        if let Some(rest) = after(&line, "PG-ABORT ") {
            break End::Aborted(rest.to_owned());
        }
        if line.contains("PG-INIT") && boot_at.is_none() {
            boot_at = Some(start.elapsed());
            eprintln!(
                "  booted in {:.1} s: {}",
                start.elapsed().as_secs_f64(),
                after(&line, "PG-INIT ").unwrap_or("")
            );
        } else if let Some(rest) = after(&line, "PG-START ") {
            started.insert(rest.trim().to_owned(), Instant::now());
        } else if let Some(rest) = after(&line, "PG-OUTPUT-BEGIN ") {
            captured = Some((rest.trim().to_owned(), Vec::new()));
        } else if let Some(rest) = after(&line, "PG-RESULT ") {
            let mut parts = rest.splitn(3, ' ');
            let id = parts.next().unwrap_or_default().to_owned();
            let status = match parts.next() {
                Some("pass") => Status::Pass,
                Some("skip") => Status::Skip,
                _ => Status::Fail,
            };
            let mut note = parts.next().unwrap_or_default().trim().to_owned();
            let out = last_output.remove(&id).unwrap_or_default();
            if status == Status::Fail {
                if let Some(p) = panic_summary(&out) {
                    note = format!("{note}: {p}");
                }
            }
            let took = started.remove(&id).map(|t| t.elapsed());
            let secs = took
                .map(|t| format!("{:6.1} s", t.as_secs_f64()))
                .unwrap_or_default();
            let tag = match status {
                Status::Pass => "pass",
                Status::Skip => "SKIP",
                Status::Fail => "FAIL",
            };
            eprintln!(
                "  {tag} {secs}  {id}{}",
                if note.is_empty() {
                    String::new()
                } else {
                    format!("  ({note})")
                }
            );
            if status == Status::Fail && !opts.verbose {
                let tail = out.len().saturating_sub(150);
                for l in &out[tail..] {
                    eprintln!("    | {l}");
                }
            }
            results.push(TestResult {
                id,
                status,
                note,
                took,
            });
        } else if line.contains("PG-DONE") {
            done_at = Some(start.elapsed());
            break End::Done;
        }
    };
    // Let it power off by itself for a moment, then make sure it is gone.
    let t = Instant::now();
    while matches!(child.try_wait(), Ok(None))
        && matches!(end, End::Done)
        && t.elapsed() < Duration::from_secs(30)
    {
        thread::sleep(Duration::from_millis(100));
    }
    stop(&mut child);
    for l in rx.try_iter() {
        writeln!(log, "[{:8.3}] {l}", start.elapsed().as_secs_f64())?;
    }
    log.flush()?;
    drop(readers);
    // Tests that started but never reported.
    for (id, t) in started {
        results.push(TestResult {
            id,
            status: Status::Fail,
            note: format!("no result: {}", end.describe()),
            took: Some(t.elapsed()),
        });
    }
    let wall = start.elapsed();
    let suite = match (boot_at, done_at) {
        (Some(b), Some(d)) => Some(d - b),
        _ => None,
    };
    eprintln!(
        "  {}: {}; boot {}, suite {}, wall {:.1} s",
        k.series.name,
        end.describe(),
        fmt_secs(boot_at),
        fmt_secs(suite),
        wall.as_secs_f64()
    );
    Ok(Outcome {
        series: k.series,
        package: k.package.clone(),
        version: k.version.clone(),
        results,
        boot: boot_at,
        suite,
        wall,
        end,
    })
}

/// The text after `marker` in `line` (kernel messages can land in the middle of a console line).
fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|i| &line[i + marker.len()..])
}

fn stop(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
    }
    let _ = child.wait();
}

fn spawn_lines(
    src: impl Read + Send + 'static,
    prefix: &'static str,
    tx: mpsc::Sender<String>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut r = BufReader::new(src);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']).replace('\r', "");
                    if tx.send(format!("{prefix}{line}")).is_err() {
                        break;
                    }
                }
            }
        }
    })
}

fn fmt_secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.1} s", d.as_secs_f64()))
        .unwrap_or_else(|| "-".into())
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn report(outcomes: &[Outcome]) {
    let mut ids: Vec<&str> = Vec::new();
    for o in outcomes {
        for r in &o.results {
            if !ids.contains(&r.id.as_str()) {
                ids.push(&r.id);
            }
        }
    }
    let width = ids.iter().map(|i| i.len()).max().unwrap_or(4).max(4);
    eprintln!("\nkernel × test (the reasons follow the table)\n");
    let mut head = format!("{:width$}", "test");
    for o in outcomes {
        head += &format!("  {:>6}", o.series.name);
    }
    eprintln!("{head}");
    for id in &ids {
        let mut row = format!("{id:width$}");
        for o in outcomes {
            let cell = match o.results.iter().find(|r| r.id == *id) {
                None => "-",
                Some(r) => match r.status {
                    Status::Pass if r.note.is_empty() => "pass",
                    Status::Pass => "pass*",
                    Status::Skip => "skip",
                    Status::Fail => "FAIL",
                },
            };
            row += &format!("  {cell:>6}");
        }
        eprintln!("{row}");
    }
    let notes: Vec<String> = outcomes
        .iter()
        .flat_map(|o| {
            o.results
                .iter()
                .filter(|r| !r.note.is_empty())
                .map(move |r| {
                    let what = match r.status {
                        Status::Pass => "pass*",
                        Status::Skip => "skip",
                        Status::Fail => "FAIL",
                    };
                    format!("  {:5} {what:5} {}: {}", o.series.name, r.id, r.note)
                })
        })
        .collect();
    if !notes.is_empty() {
        eprintln!("\nreasons (pass* = passed, a part skipped):");
        for n in notes {
            eprintln!("{n}");
        }
    }
    eprintln!("\nkernel  package                                      boot     suite    pass  skip  fail  end");
    for o in outcomes {
        let count = |s: Status| o.results.iter().filter(|r| r.status == s).count();
        eprintln!(
            "{:7} {:44} {:>8} {:>8} {:>5} {:>5} {:>5}  {}",
            o.series.name,
            format!("{} {}", o.package, o.version),
            fmt_secs(o.boot),
            fmt_secs(o.suite),
            count(Status::Pass),
            count(Status::Skip),
            count(Status::Fail),
            o.end.describe()
        );
    }
    let slow: Vec<String> = {
        let mut all: Vec<(&str, &TestResult)> = outcomes
            .iter()
            .flat_map(|o| o.results.iter().map(move |r| (o.series.name, r)))
            .collect();
        all.sort_by_key(|(_, r)| std::cmp::Reverse(r.took.unwrap_or_default()));
        all.iter()
            .take(5)
            .map(|(k, r)| format!("{k} {} {}", r.id, fmt_secs(r.took)))
            .collect()
    };
    if !slow.is_empty() {
        eprintln!("\nslowest: {}", slow.join(", "));
    }
}

// ---------------------------------------------------------------------------------------------
// ELF
// ---------------------------------------------------------------------------------------------

/// Just enough ELF64 (little endian) reading to tell a static executable and to read a kernel
/// module's `.modinfo`.
mod elf {
    fn uint(b: &[u8], off: usize, len: usize) -> Option<u64> {
        let s = b.get(off..off + len)?;
        Some(
            s.iter()
                .rev()
                .fold(0u64, |acc, &x| (acc << 8) | u64::from(x)),
        )
    }

    fn is_elf64(b: &[u8]) -> bool {
        b.starts_with(b"\x7fELF\x02\x01")
    }

    /// No PT_INTERP program header: the kernel runs it without a dynamic loader.
    pub fn is_static(b: &[u8]) -> bool {
        const PT_INTERP: u64 = 3;
        if !is_elf64(b) {
            return false;
        }
        let (Some(phoff), Some(phentsize), Some(phnum)) =
            (uint(b, 0x20, 8), uint(b, 0x36, 2), uint(b, 0x38, 2))
        else {
            return false;
        };
        (0..phnum).all(|i| uint(b, (phoff + i * phentsize) as usize, 4) != Some(PT_INTERP))
    }

    fn section<'a>(b: &'a [u8], want: &str) -> Option<&'a [u8]> {
        if !is_elf64(b) {
            return None;
        }
        let shoff = uint(b, 0x28, 8)? as usize;
        let shentsize = uint(b, 0x3A, 2)? as usize;
        let shnum = uint(b, 0x3C, 2)? as usize;
        let shstrndx = uint(b, 0x3E, 2)? as usize;
        let hdr = |i: usize| shoff + i * shentsize;
        let strtab = uint(b, hdr(shstrndx) + 0x18, 8)? as usize;
        for i in 0..shnum {
            let name_off = strtab + uint(b, hdr(i), 4)? as usize;
            let name = b.get(name_off..)?.split(|&c| c == 0).next()?;
            if name == want.as_bytes() {
                let off = uint(b, hdr(i) + 0x18, 8)? as usize;
                let size = uint(b, hdr(i) + 0x20, 8)? as usize;
                return b.get(off..off + size);
            }
        }
        None
    }

    /// The value of `key` in a module's `.modinfo` (`""` when the key is absent); `None` when
    /// there is no `.modinfo`.
    pub fn modinfo(b: &[u8], key: &str) -> Option<String> {
        let info = section(b, ".modinfo")?;
        let prefix = format!("{key}=");
        Some(
            info.split(|&c| c == 0)
                .find_map(|e| e.strip_prefix(prefix.as_bytes()))
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default(),
        )
    }
}
