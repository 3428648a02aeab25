//! What every `cargo xtask` verb shares: where the workspace is, running commands (echoed,
//! failing on a non-zero exit), running cargo, and the root check.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

/// The workspace's root: the directory above xtask.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Fails, saying `why`, unless this runs as root.
pub fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("this needs root: {why}; run it with sudo");
    }
    Ok(())
}

/// Echoes `cmd` and runs it; fails when it cannot start or exits unsuccessfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// What `cmd` printed on stdout, when it ran and succeeded.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs the cargo that runs xtask, in `root`, with `args`.
pub fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    run(Command::new(env!("CARGO")).current_dir(root).args(args))
}

/// `cargo install <krate>@<version> --locked` unless `probe` (the tool's own version command)
/// already prints that version.
pub fn cargo_install(krate: &str, version: &str, probe: &mut Command) -> Result<()> {
    if output(probe).is_some_and(|v| v.contains(version)) {
        return Ok(());
    }
    run(Command::new(env!("CARGO")).args(["install", &format!("{krate}@{version}"), "--locked"]))
}
