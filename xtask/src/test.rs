//! `cargo xtask test`: the unit tests, then, as root, the integration suite on this machine's
//! kernel and, without a filter, every fuzz target for a bounded time.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result};
use xtask::{cargo, output, require_root, run};

use crate::{fuzz, package};

/// Runs `step` and says how long `what` took: CI's hour is spent in these parts.
fn timed<T>(what: &str, step: impl FnOnce() -> Result<T>) -> Result<T> {
    let t = Instant::now();
    let r = step();
    eprintln!(
        "xtask: test: {what} took {:.0} s",
        t.elapsed().as_secs_f64()
    );
    r
}

pub fn test(root: &Path, filter: Option<&str>) -> Result<()> {
    // Unit tests: no root needed.
    timed("the unit tests (with their build)", || unit_tests(root))?;
    require_root("the integration tests load BPF programs and create cgroups")?;
    timed("the agent's build", || {
        cargo(root, &["build", "--package", "port-guard"])
    })?;
    let bin = root.join("target/debug/port-guard");
    let mut args = vec![
        "test",
        "--package",
        "integration-tests",
        // Every test file runs, whatever failed before it: one report of all that fails.
        "--no-fail-fast",
        "--",
        "--test-threads=1",
    ];
    if let Some(f) = filter {
        args.push(f);
    }
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(root)
        .env("PORT_GUARD_BIN", &bin)
        .args(&args);
    if filter.is_none_or(|f| f.contains("upgrade") || f.contains("layout")) {
        timed("the earlier releases' builds", || {
            old_builds(root, &mut cmd)
        })?;
    }
    // The package tests' names say "package" (the_deb_package_…); "deb" and "rpm" pick them too.
    if filter.is_none_or(|f| ["package", "deb", "rpm"].iter().any(|k| f.contains(k))) {
        // The packages' tests install the .deb on this machine and read both packages.
        let built = timed("the packages", || package::package(root))?;
        cmd.env(
            "PG_PACKAGE_DIR",
            built.deb.parent().context("the .deb is in a directory")?,
        );
    }
    timed("the integration suite (with its build)", || run(&mut cmd))?;
    if filter.is_none() {
        // Hostile input: every fuzz target for a bounded time (PG_FUZZ_SECONDS, default 30).
        let seconds = std::env::var("PG_FUZZ_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30);
        timed("the fuzz targets (with their build)", || {
            fuzz::fuzz(root, seconds)
        })?;
    }
    Ok(())
}

fn unit_tests(root: &Path) -> Result<()> {
    cargo(
        root,
        &[
            "test",
            "--package",
            "port-guard",
            "--package",
            "port-guard-common",
            "--package",
            "xtask",
        ],
    )
}

/// The earlier releases the upgrade tests start from, built (or reused) and passed to `cmd`.
fn old_builds(root: &Path, cmd: &mut Command) -> Result<()> {
    for old in OLD_BUILDS {
        match old_binary(root, old.commit)? {
            Some(bin) => {
                cmd.env(old.env, bin);
            }
            None => eprintln!(
                "xtask: WARNING: commit {} ({}) is not in this clone's history: its upgrade test is skipped",
                old.commit, old.what
            ),
        }
    }
    Ok(())
}

/// A binary of an earlier commit an upgrade test starts from, passed in `env`.
struct OldBuild {
    env: &'static str,
    commit: &'static str,
    what: &'static str,
}

/// The upgrade tests' starting points: the last commit of map layout 2 (ABI_VERSION 2; bump it
/// with the next layout change), and the last commit before the per-VM shares (event records of
/// 56 bytes, a 256 KiB ring buffer, no share maps), the guard every host of that layout runs.
const OLD_BUILDS: [OldBuild; 2] = [
    OldBuild {
        env: "PG_ABI2_BIN",
        commit: "826b3363a948f3eeb3924605856a1f64a05fd48d",
        what: "map layout 2",
    },
    OldBuild {
        env: "PG_PREV_BIN",
        commit: "aec61c9fe08621047b63880dadd0024a2c1d389d",
        what: "layout 3 before the per-VM shares",
    },
];

/// `target/old/port-guard-<commit>`, built from `commit` in a worktree and a target dir shared
/// by every old build (about 2 minutes for the first, less for the next, then reused). None
/// when the clone lacks that commit (a shallow clone, a tarball).
fn old_binary(root: &Path, commit: &str) -> Result<Option<PathBuf>> {
    let dir = root.join("target/old");
    let bin = dir.join(format!("port-guard-{commit}"));
    if bin.exists() {
        return Ok(Some(bin));
    }
    let has = Command::new("git")
        .current_dir(root)
        .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
        .status()
        .is_ok_and(|s| s.success());
    if !has {
        return Ok(None);
    }
    let src = dir.join("src");
    let head = output(
        Command::new("git")
            .current_dir(&src)
            .args(["rev-parse", "HEAD"]),
    );
    match head {
        Some(h) if h.trim() == commit => {}
        Some(_) => run(Command::new("git")
            .current_dir(&src)
            .args(["checkout", "--force", "--detach", commit]))?,
        None => {
            let _ = std::fs::remove_dir_all(&src);
            let _ = Command::new("git")
                .current_dir(root)
                .args(["worktree", "prune"])
                .status();
            std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
            run(Command::new("git").current_dir(root).args([
                "worktree",
                "add",
                "--force",
                "--detach",
                src.to_str().context("target path is UTF-8")?,
                commit,
            ]))?;
        }
    }
    eprintln!("xtask: building the binary of {commit} for an upgrade test");
    run(Command::new(env!("CARGO")).current_dir(&src).args([
        "build",
        "--package",
        "port-guard",
        "--target-dir",
        "../target",
    ]))?;
    let built = dir.join("target/debug/port-guard");
    // Whole or not at all: a copy cut short must not pass for the binary next time.
    let part = dir.join(format!("port-guard-{commit}.part"));
    std::fs::copy(&built, &part)
        .and_then(|_| std::fs::rename(&part, &bin))
        .with_context(|| format!("copying {} to {}", built.display(), bin.display()))?;
    Ok(Some(bin))
}
