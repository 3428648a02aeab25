//! `cargo xtask setup`, which every verb runs first: the eBPF toolchain, installed where missing
//! (the nightly's rust-src for `-Z build-std=core`, and bpf-linker 0.10.1, the last one that uses
//! the nightly's own LLVM).

use std::process::Command;

use anyhow::{Context as _, Result};
use xtask::{cargo_install, output, run};

const BPF_LINKER_VERSION: &str = "0.10.1";

/// The toolchain that builds the eBPF programs; the fuzz targets run on it too.
pub const NIGHTLY: &str = "nightly";

/// Installs the nightly's rust-src and bpf-linker when missing.
pub fn setup() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF programs (with the nightly toolchain)")?;
    if !toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
        ]))?;
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
    cargo_install(
        "bpf-linker",
        BPF_LINKER_VERSION,
        Command::new("bpf-linker").arg("--version"),
    )
}
