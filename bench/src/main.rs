//! `port-guard-bench`: what the guard costs every bind() on the host, and how fast leases are.
//!
//! Run as root (through `cargo xtask bench`). Everything is measured in one run, in a network
//! namespace, cgroup subtree and pin dir of the bench's own, on the real kernel:
//!
//! 1. baseline with no bind program loaded by the bench;
//! 2. agent: load + attach time, daemon memory after start and after 10,000 denials, idle CPU;
//! 3. bind(): a small (1 range, 1 allowed cgroup) and a large (64 ranges, 1,000 allowed cgroups,
//!    10,000 leases) guard side by side, and the small one with a per-child limit (every bind of
//!    its range charged, every close uncharged), each scenario a worker process parked in its
//!    cgroup, rounds interleaved; then the programs' own run time from bpf_stats (bind4, and
//!    sock_release per close);
//! 4. the baseline again, with the guards gone;
//! 5. lease allocation through the library against a bare probe-bind allocator (libvirt's way);
//! 6. `port-guard spawn` against a bare fork/exec, and up to qemu listening;
//! 7. a flood of refused binds from one process: the daemon's CPU meanwhile, and whether one
//!    refused bind of a second process in another cgroup still reaches its log;
//! 8. a user (nobody) with 3,000 idle cgroups in a delegated subtree who makes 150 new ones a
//!    second, each with one refused bind: the daemon's CPU, under the shipped unit's capability
//!    bounding set and without CAP_DAC_READ_SEARCH.
//!
//! Why not criterion or divan: the code under test runs in other processes (each in its own
//! cgroup), and the targets are ratios of 2 to 5 %, which on a shared two-core machine drift more
//! than that between two benchmarks run one after the other. Interleaved rounds with per-round
//! ratios are what makes them measurable; see the A/A row of the table for the noise floor.

mod bind;
mod bpfstats;
mod env;
mod phases;
mod report;
mod stats;
mod worker;

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "port-guard-bench",
    about = "What port-guard costs every bind(), and how fast leases are (root)"
)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    opts: Opts,
}

#[derive(clap::Args, Clone, Debug)]
pub struct Opts {
    /// A short run that only shows the bench works (CI): few rounds, timings not meaningful.
    #[arg(long)]
    pub quick: bool,
    /// The agent binary (default: `port-guard` next to this one).
    #[arg(long, value_name = "PATH")]
    pub port_guard: Option<PathBuf>,
    /// Interleaved rounds of bind() batches (default 200, quick 5).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Also print the table as Markdown (for docs/benchmarks.md).
    #[arg(long)]
    pub markdown: bool,
    /// Write every summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// (internal) The measuring process: reads JSON requests on stdin.
    #[command(hide = true)]
    Worker,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Some(Cmd::Worker) => worker::run(),
        None => run(cli.opts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("port-guard-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(opts: Opts) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!(
            "the bench needs root: it loads BPF programs, creates cgroups and a network namespace"
        );
    }
    // Before any thread exists: unshare(CLONE_NEWNET) changes the calling thread only.
    env::enter_netns()?;
    env::install_signal_handlers();
    let pg = match &opts.port_guard {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("port-guard"),
    };
    if !pg.is_file() {
        anyhow::bail!(
            "no agent binary at {} (build it: cargo build --release -p port-guard)",
            pg.display()
        );
    }
    let report = phases::run_all(&opts, &pg)?;
    println!("{}", report.text());
    if opts.markdown {
        println!("{}", report.markdown());
    }
    if let Some(path) = &opts.json {
        let mut j = report.json.clone();
        j.insert("markdown".into(), report.markdown().into());
        std::fs::write(path, serde_json::to_string_pretty(&j)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
