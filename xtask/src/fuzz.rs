//! The cargo-fuzz targets, each for a bounded time: the last step of `cargo xtask test` (there is
//! no `fuzz` verb).

use std::{path::Path, process::Command};

use anyhow::{bail, Context as _, Result};
use xtask::cargo_install;

use crate::setup::NIGHTLY;

const CARGO_FUZZ_VERSION: &str = "0.13.2";
pub const TARGETS: [&str; 4] = ["reserve_spec", "config_file", "cgroup_path", "log_value"];

/// Installs cargo-fuzz when missing, then runs every target for `seconds`.
pub fn fuzz(root: &Path, seconds: u64) -> Result<()> {
    cargo_install(
        "cargo-fuzz",
        CARGO_FUZZ_VERSION,
        Command::new(env!("CARGO")).args(["fuzz", "--version"]),
    )?;
    let dir = root.join("fuzz");
    for target in TARGETS {
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let status = Command::new("rustup")
            .current_dir(&dir)
            .args(["run", NIGHTLY, "cargo", "fuzz", "run", target, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .arg("-print_final_stats=1")
            .status()
            .with_context(|| format!("running cargo fuzz run {target}"))?;
        if !status.success() {
            bail!("fuzz target {target} failed ({status}); the crashing input is under fuzz/artifacts/{target}");
        }
        eprintln!("xtask: fuzz target {target}: {seconds} s, no crash");
    }
    Ok(())
}
