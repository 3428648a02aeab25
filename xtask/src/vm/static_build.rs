//! The guest's executables, built once for all kernels: the agent (release) and the
//! integration-test executables, static (`+crt-static`), in their own target dir `target/vm` so
//! the normal build is not invalidated.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{ensure, Context as _, Result};

use super::elf;

/// The guest is x86_64; so are the static executables built for it.
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// The static executables for the guest.
pub(super) struct Artifacts {
    pub(super) agent: PathBuf,
    /// (name in results, executable): the integration test files and the harness's own tests.
    pub(super) tests: Vec<(String, PathBuf)>,
    /// Helper binaries (pg-hostile, pg-sockets), found by the tests at these very paths.
    pub(super) bins: Vec<PathBuf>,
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
        // No debug info: the guest unpacks the initramfs into its memory, and with line tables
        // 24 test binaries of 14 MB each no longer fit a 1 GiB guest ("Initramfs unpacking
        // failed"). A panic still names its file and line; backtraces name the functions.
        .env("CARGO_PROFILE_DEV_DEBUG", "none")
        .env("CARGO_PROFILE_DEV_STRIP", "debuginfo")
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

pub(super) fn build(root: &Path, target_dir: &Path) -> Result<Artifacts> {
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
