//! `cargo xtask`: set up a fresh machine, build, run the agent, run the test suite (on this
//! machine's kernel, or inside VMs on Debian's kernels: [`vm`]).
//!
//! Every verb first makes sure the eBPF toolchain is there (the nightly's rust-src for
//! `-Z build-std=core`, and bpf-linker 0.10.1, the last one that uses the nightly's own LLVM) and
//! install what is missing ([`setup`]).
//!
//! This file only parses the command line and dispatches: each verb lives in its own module
//! ([`run`], [`mod@test`], [`vm`], [`mod@bench`], [`package`], [`setup`]; [`fuzz`] is part of
//! `test`), and
//! what they share (running commands and cargo, the root check) is in the library, `lib.rs`.

use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod fuzz;
mod package;
mod packages;
mod run;
mod setup;
mod test;
mod vm;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing, build (release) and run `port-guard daemon` on its defaults,
    /// or with the arguments after `--` (e.g. `cargo xtask run -- --mode audit`).
    Run {
        /// Arguments for `port-guard daemon`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Install what is missing, then run the unit tests and, as root, the integration suite.
    Test {
        /// Only run integration tests whose name contains this.
        filter: Option<String>,
    },
    /// Run the integration suite inside qemu VMs booted on Debian's kernels (5.10 from bullseye,
    /// 6.1 from bookworm, 6.12 from trixie): one result line per test, a kernel × test table,
    /// exit status 1 when a test fails or a kernel does not finish. The kernels are fetched with
    /// apt the first time and cached under target/vm-cache; the console goes to target/vm/logs.
    VmTest {
        /// 5.10, 6.1, 6.12 or all; repeat, or separate with commas.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
        kernel: Vec<vm::KernelArg>,
        /// tcg, or kvm (which hangs booting Linux guests on the project's machines).
        #[arg(long, value_enum, default_value_t = vm::Accel::Tcg)]
        accel: vm::Accel,
        /// Only tests whose `<binary>::<test>` name contains this.
        filter: Option<String>,
        /// Kill a kernel's VM after this many minutes (boot and the whole suite).
        #[arg(long, default_value_t = 30, value_name = "MINUTES")]
        timeout: u64,
        /// Kill one test inside the VM after this many seconds.
        #[arg(long, default_value_t = 600, value_name = "SECONDS")]
        test_timeout: u64,
        /// Look up the newest kernel of each series again instead of using the cached one.
        #[arg(long)]
        refresh_kernels: bool,
        /// Echo the whole serial console, not just the results.
        #[arg(long, short)]
        verbose: bool,
        /// Run this shell command in the VM instead of the suite (for debugging), e.g.
        /// `--exec 'port-guard -vv daemon --attach / --allow-fallback'`.
        #[arg(long, value_name = "SHELL")]
        exec: Option<String>,
    },
    /// The .deb under a real systemd: a Debian 12 guest (debootstrap, cached) booted with systemd
    /// as init on Debian's kernel installs the package (enabled, started), enforces, leases,
    /// upgrades to a version-bumped build under a hostile binder (restarted by the scripts, the
    /// sentinel sockets kept by the fd store), removes and purges it.
    VmSystemd {
        /// 5.10, 6.1, 6.12 or all; repeat, or separate with commas.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "5.10")]
        kernel: Vec<vm::KernelArg>,
        /// Kill a kernel's VM after this many minutes.
        #[arg(long, default_value_t = 10, value_name = "MINUTES")]
        timeout: u64,
    },
    /// Build (release) and run the benchmarks as root: what the guard costs every bind(), lease
    /// allocation, spawn and the agent, as one table of medians and ratios. Arguments after `--`
    /// go to port-guard-bench (e.g. `-- --markdown --json bench.json`).
    Bench {
        /// A short run that only shows every phase works (CI): its timings mean nothing.
        #[arg(long)]
        quick: bool,
        /// Arguments for port-guard-bench.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build the .deb and the .rpm (release binary, systemd unit, config in audit mode, man page,
    /// completions, docs) into target/package, installing cargo-deb and cargo-generate-rpm (pinned
    /// versions) when missing.
    Package,
    /// Only install the prerequisites: the eBPF toolchain and every Debian package any verb or
    /// test needs (xtask/src/packages.rs).
    Setup,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = xtask::workspace_root();
    let t = std::time::Instant::now();
    setup::setup()?;
    // The Debian packages the verb (and the tests it runs) needs: one list, in packages.rs.
    match &cli.cmd {
        Cmd::Test { .. } => packages::install(packages::Verb::Test)?,
        Cmd::VmTest { .. } | Cmd::VmSystemd { .. } => packages::install(packages::Verb::Vm)?,
        Cmd::Bench { .. } => packages::install(packages::Verb::Bench)?,
        Cmd::Setup => {
            for verb in [
                packages::Verb::Test,
                packages::Verb::Vm,
                packages::Verb::Bench,
            ] {
                packages::install(verb)?;
            }
        }
        Cmd::Run { .. } | Cmd::Package => {}
    }
    eprintln!(
        "xtask: set-up (eBPF toolchain, cargo tools, Debian packages: what was missing) took {:.0} s",
        t.elapsed().as_secs_f64()
    );
    match cli.cmd {
        Cmd::Setup => Ok(()),
        Cmd::Package => package::package(&root).map(|_| ()),
        Cmd::VmSystemd { kernel, timeout } => {
            vm::vm_systemd(&root, &kernel, Duration::from_secs(timeout * 60))
        }
        Cmd::Bench { quick, args } => bench::bench(&root, quick, &args),
        Cmd::Run { args } => run::run(&root, &args),
        Cmd::Test { filter } => test::test(&root, filter.as_deref()),
        Cmd::VmTest {
            kernel,
            accel,
            filter,
            timeout,
            test_timeout,
            refresh_kernels,
            verbose,
            exec,
        } => vm::vm_test(
            &root,
            &vm::Options {
                kernels: kernel,
                accel,
                filter,
                timeout: Duration::from_secs(timeout * 60),
                test_timeout: Duration::from_secs(test_timeout),
                refresh_kernels,
                verbose,
                exec,
            },
        ),
    }
}
