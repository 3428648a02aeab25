//! `cargo xtask run`: builds the agent (release) and runs `port-guard daemon` in the foreground,
//! as root, with the arguments given after `--`.

use std::{path::Path, process::Command};

use anyhow::{bail, Context as _, Result};
use xtask::{cargo, require_root};

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    require_root("port-guard daemon loads BPF programs")?;
    cargo(root, &["build", "--release", "--package", "port-guard"])?;
    let bin = root.join("target/release/port-guard");
    let status = Command::new(&bin)
        .arg("daemon")
        .args(args)
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    if !status.success() {
        bail!("port-guard daemon exited with {status}");
    }
    Ok(())
}
