//! `cargo xtask`: set up a fresh machine, build, run the agent, run the test suite.
//!
//! Both verbs first make sure the eBPF toolchain is there (the nightly's rust-src for
//! `-Z build-std=core`, and bpf-linker 0.10.1, the last one that uses the nightly's own LLVM) and
//! install what is missing.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

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
    /// Only install the prerequisites.
    Setup,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    setup()?;
    match cli.cmd {
        Cmd::Setup => Ok(()),
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
        .args(&args))
}
