//! `cargo xtask bench`: builds the agent and the bench (release) and runs the bench, which prints
//! one table of medians and ratios (see bench/src/main.rs for what it measures and how).

use std::{path::Path, process::Command};

use anyhow::Result;

pub fn bench(root: &Path, quick: bool, args: &[String]) -> Result<()> {
    xtask::require_root(
        "the bench loads BPF programs and creates cgroups and a network namespace",
    )?;
    xtask::cargo(
        root,
        &[
            "build",
            "--release",
            "--package",
            "port-guard",
            "--package",
            "port-guard-bench",
        ],
    )?;
    let mut cmd = Command::new(root.join("target/release/port-guard-bench"));
    cmd.arg("--port-guard")
        .arg(root.join("target/release/port-guard"));
    if quick {
        cmd.arg("--quick");
    }
    xtask::run(cmd.args(args))
}
