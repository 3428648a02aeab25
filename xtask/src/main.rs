//! `cargo xtask`: set up a fresh machine, build, run the agent, run the test suite (on this
//! machine's kernel, or inside VMs on Debian's kernels: [`vm`]).
//!
//! Every verb first makes sure the eBPF toolchain is there (the nightly's rust-src for
//! `-Z build-std=core`, and bpf-linker 0.10.1, the last one that uses the nightly's own LLVM) and
//! install what is missing.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod bench;
mod fuzz;
mod vm;

const BPF_LINKER_VERSION: &str = "0.10.1";
const NIGHTLY: &str = "nightly";

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing, build (release) and run `port-guard daemon` on its defaults,
    /// or with the arguments after `--` (e.g. `cargo xtask run -- --mode audit`).
    Run {
        /// Arguments for `port-guard daemon`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Install what is missing, then run the unit tests and, as root, the integration suite.
    Test {
        /// Only run integration tests whose name contains this.
        filter: Option<String>,
    },
    /// Run the integration suite inside qemu VMs booted on Debian's kernels (5.10 from bullseye,
    /// 6.1 from bookworm, 6.12 from trixie): one result line per test, a kernel × test table,
    /// exit status 1 when a test fails or a kernel does not finish. The kernels are fetched with
    /// apt the first time and cached under target/vm-cache; the console goes to target/vm/logs.
    VmTest {
        /// 5.10, 6.1, 6.12 or all; repeat, or separate with commas.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
        kernel: Vec<vm::KernelArg>,
        /// tcg, or kvm (which hangs booting Linux guests on the project's machines).
        #[arg(long, value_enum, default_value_t = vm::Accel::Tcg)]
        accel: vm::Accel,
        /// Only tests whose `<binary>::<test>` name contains this.
        filter: Option<String>,
        /// Kill a kernel's VM after this many minutes (boot and the whole suite).
        #[arg(long, default_value_t = 30, value_name = "MINUTES")]
        timeout: u64,
        /// Kill one test inside the VM after this many seconds.
        #[arg(long, default_value_t = 600, value_name = "SECONDS")]
        test_timeout: u64,
        /// Look up the newest kernel of each series again instead of using the cached one.
        #[arg(long)]
        refresh_kernels: bool,
        /// Echo the whole serial console, not just the results.
        #[arg(long, short)]
        verbose: bool,
        /// Run this shell command in the VM instead of the suite (for debugging), e.g.
        /// `--exec 'port-guard -vv daemon --attach / --allow-fallback'`.
        #[arg(long, value_name = "SHELL")]
        exec: Option<String>,
    },
    /// Build (release) and run the benchmarks as root: what the guard costs every bind(), lease
    /// allocation, spawn and the agent, as one table of medians and ratios. Arguments after `--`
    /// go to port-guard-bench (e.g. `-- --markdown --json bench.json`).
    Bench {
        /// A short run that only shows every phase works (CI): its timings mean nothing.
        #[arg(long)]
        quick: bool,
        /// Arguments for port-guard-bench.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Only install the prerequisites.
    Setup,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    setup()?;
    match cli.cmd {
        Cmd::Setup => Ok(()),
        Cmd::Bench { quick, args } => bench::bench(&root, quick, &args),
        Cmd::Run { args } => {
            require_root("port-guard daemon loads BPF programs")?;
            cargo(&root, &["build", "--release", "--package", "port-guard"])?;
            let bin = root.join("target/release/port-guard");
            let status = Command::new(&bin)
                .arg("daemon")
                .args(&args)
                .status()
                .with_context(|| format!("running {}", bin.display()))?;
            if !status.success() {
                bail!("port-guard daemon exited with {status}");
            }
            Ok(())
        }
        Cmd::Test { filter } => test(&root, filter.as_deref()),
        Cmd::VmTest {
            kernel,
            accel,
            filter,
            timeout,
            test_timeout,
            refresh_kernels,
            verbose,
            exec,
        } => vm::vm_test(
            &root,
            &vm::Options {
                kernels: kernel,
                accel,
                filter,
                timeout: Duration::from_secs(timeout * 60),
                test_timeout: Duration::from_secs(test_timeout),
                refresh_kernels,
                verbose,
                exec,
            },
        ),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("this needs root: {why}; run it with sudo");
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    run(Command::new(env!("CARGO")).current_dir(root).args(args))
}

/// Installs the nightly's rust-src and bpf-linker when missing.
fn setup() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF programs (with the nightly toolchain)")?;
    if !toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        run(Command::new("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    }
    let linker = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        run(Command::new(env!("CARGO")).args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
        ]))?;
    }
    Ok(())
}

fn test(root: &Path, filter: Option<&str>) -> Result<()> {
    // Unit tests: no root needed.
    cargo(root, &["test", "--package", "port-guard", "--package", "port-guard-common"])?;
    require_root("the integration tests load BPF programs and create cgroups")?;
    cargo(root, &["build", "--package", "port-guard"])?;
    let bin = root.join("target/debug/port-guard");
    let mut args = vec![
        "test",
        "--package",
        "integration-tests",
        "--",
        "--test-threads=1",
    ];
    if let Some(f) = filter {
        args.push(f);
    }
    run(Command::new(env!("CARGO"))
        .current_dir(root)
        .env("PORT_GUARD_BIN", &bin)
        .args(&args))?;
    if filter.is_none() {
        // Hostile input: every fuzz target for a bounded time (PG_FUZZ_SECONDS, default 30).
        let seconds = std::env::var("PG_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
        fuzz::fuzz(root, seconds)?;
    }
    Ok(())
}
