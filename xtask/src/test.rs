//! `cargo xtask test`: the unit tests, then, as root, the integration suite on this machine's
//! kernel and, without a filter, every fuzz target for a bounded time.

use std::{path::Path, process::Command};

use anyhow::Result;
use xtask::{cargo, require_root, run};

use crate::fuzz;

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
        ],
    )?;
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
        let seconds = std::env::var("PG_FUZZ_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30);
        fuzz::fuzz(root, seconds)?;
    }
    Ok(())
}
