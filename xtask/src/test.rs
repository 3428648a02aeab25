//! `cargo xtask test`: the unit tests, then, as root, the integration suite on this machine's
//! kernel and, without a filter, every fuzz target for a bounded time.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};
use xtask::{cargo, output, require_root, run};

use crate::{fuzz, package};

pub fn test(root: &Path, filter: Option<&str>) -> Result<()> {
    // Unit tests: no root needed.
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
    )?;
    require_root("the integration tests load BPF programs and create cgroups")?;
    cargo(root, &["build", "--package", "port-guard"])?;
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
        match abi2_binary(root)? {
            Some(old) => {
                cmd.env("PG_ABI2_BIN", old);
            }
            None => eprintln!("xtask: WARNING: commit {ABI2_COMMIT} (map layout 2) is not in this clone's history: the upgrade test across layouts is skipped"),
        }
    }
    // The package tests' names say "package" (the_deb_package_…); "deb" and "rpm" pick them too.
    if filter.is_none_or(|f| ["package", "deb", "rpm"].iter().any(|k| f.contains(k))) {
        // The packages' tests install the .deb on this machine and read both packages.
        let built = package::package(root)?;
        cmd.env(
            "PG_PACKAGE_DIR",
            built.deb.parent().context("the .deb is in a directory")?,
        );
    }
    run(&mut cmd)?;
    if filter.is_none() {
        // Hostile input: every fuzz target for a bounded time (PG_FUZZ_SECONDS, default 30).
        let seconds = std::env::var("PG_FUZZ_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30);
        fuzz::fuzz(root, seconds)?;
    }
    Ok(())
}

/// The last commit of map layout 2 (ABI_VERSION 2): the binary the upgrade test starts from.
/// Bump it with the next layout change.
const ABI2_COMMIT: &str = "826b3363a948f3eeb3924605856a1f64a05fd48d";

/// `target/abi2/target/debug/port-guard`, built from [`ABI2_COMMIT`] in a worktree of its own
/// (and a target dir of its own: about 2 minutes once, then reused). None when the clone lacks
/// that commit (a shallow clone, a tarball).
fn abi2_binary(root: &Path) -> Result<Option<PathBuf>> {
    let dir = root.join("target/abi2");
    let bin = dir.join("target/debug/port-guard");
    let stamp = dir.join("commit");
    if bin.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == ABI2_COMMIT) {
        return Ok(Some(bin));
    }
    let has = Command::new("git")
        .current_dir(root)
        .args(["cat-file", "-e", &format!("{ABI2_COMMIT}^{{commit}}")])
        .status()
        .is_ok_and(|s| s.success());
    if !has {
        return Ok(None);
    }
    let src = dir.join("src");
    if output(
        Command::new("git")
            .current_dir(&src)
            .args(["rev-parse", "HEAD"]),
    )
    .is_none_or(|h| h.trim() != ABI2_COMMIT)
    {
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
            ABI2_COMMIT,
        ]))?;
    }
    eprintln!("xtask: building the map-layout-2 binary ({ABI2_COMMIT}) for the upgrade test");
    run(Command::new(env!("CARGO")).current_dir(&src).args([
        "build",
        "--package",
        "port-guard",
        "--target-dir",
        "../target",
    ]))?;
    std::fs::write(&stamp, ABI2_COMMIT).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(Some(bin))
}
