//! The bench, phase by phase (see the crate docs), and the rows each phase adds to the table.
//! [`run_all`] sets up the bench's corner of the machine and runs the phases in order; each module
//! measures one phase and writes its rows:
//!
//! - [`bind`]: the baseline before and after (phases 1 and 4), bind() per scenario and the
//!   programs' own run time (phase 3);
//! - [`agent`]: load + attach, memory and idle CPU of the daemons (phase 2), and the agent rows;
//! - [`scale`]: the large configuration, and its rows against the small one;
//! - [`alloc`]: lease allocation (phase 5);
//! - [`spawn`]: `port-guard spawn` and qemu (phase 6);
//! - [`flood`]: the daemon under a flood of refused binds (phase 7);
//! - [`limit`]: the per-child limit's rows (its bind() scenarios run in phase 3);
//! - [`users`]: the daemon while a user makes cgroups in a delegated subtree (phase 8).

mod agent;
mod alloc;
mod bind;
mod flood;
mod limit;
mod scale;
mod spawn;
mod users;

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Result};
use port_guard::maps::Maps;
use serde_json::json;

use crate::{
    env::{self, Cg, Pins, TempDir, Tree},
    report::Report,
    stats::Rng,
    Opts,
};

/// Ports (inside the bench's own network namespace).
const OUTSIDE: u16 = 63000;
const RESERVED: u16 = 62500;
const LEASED: u16 = 62501;
const REFUSED: u16 = 62502;
const SMALL_RANGE: &str = "62500-62509";
/// The sentinel port of the guard that refuses through it (phase 3's sentinel row).
const SENTINEL_PORT: u16 = 62510;
/// The large configuration's 10,000 leases.
const LEASES_FIRST: u16 = 40000;
const LEASES: u32 = 10_000;
/// The allocation range: 20,000 ports.
const ALLOC_FIRST: u16 = 40000;
const ALLOC_LAST: u16 = 59999;
const QEMU_BARE_PORT: u16 = 61000;
const ALLOWED_CGROUPS: usize = 1000;
/// The limited configuration's per_child_limit: far above the one socket a scenario holds at a
/// time, so that every bind of the range is charged (and every close uncharged) and none is
/// refused.
const LIMIT: u32 = 1000;
const DENIALS: u64 = 10_000;

struct Params {
    rounds: usize,
    base_rounds: usize,
    stats_rounds: usize,
    batch_ns: f64,
    load_samples: usize,
    settle: Duration,
    idle: Duration,
    alloc_levels: Vec<u64>,
    alloc_m: u64,
    alloc_reps: usize,
    spawn_reps: usize,
    qemu_reps: usize,
    /// How long one process makes refused binds for the flood rows.
    flood: Duration,
    /// How long a user makes new cgroups (150 a second) for each of the phase 8 rows, and how
    /// long the daemon runs before that.
    users: Duration,
    users_settle: Duration,
}

impl Params {
    fn new(o: &Opts) -> Params {
        if o.quick {
            Params {
                rounds: o.rounds.unwrap_or(5),
                base_rounds: 3,
                stats_rounds: 2,
                batch_ns: 1e6,
                load_samples: 1,
                settle: Duration::from_millis(500),
                idle: Duration::from_secs(1),
                alloc_levels: vec![0, 1000],
                alloc_m: 20,
                alloc_reps: 1,
                spawn_reps: 3,
                qemu_reps: 1,
                flood: Duration::from_millis(500),
                users: Duration::from_secs(3),
                users_settle: Duration::from_millis(500),
            }
        } else {
            Params {
                rounds: o.rounds.unwrap_or(200),
                base_rounds: 40,
                stats_rounds: 30,
                batch_ns: 2e6,
                load_samples: 7,
                settle: Duration::from_secs(2),
                idle: Duration::from_secs(5),
                alloc_levels: vec![0, 5000, 10000, 15000, 19000],
                alloc_m: 200,
                alloc_reps: 3,
                spawn_reps: 40,
                qemu_reps: 7,
                flood: Duration::from_secs(3),
                users: Duration::from_secs(30),
                users_settle: Duration::from_secs(2),
            }
        }
    }
}

/// One guard configuration's cgroups.
struct Layout {
    name: &'static str,
    attach: Cg,
    allow: Cg,
    d1: Cg,
    d8: Cg,
    lessee: Cg,
    out: Cg,
    config: PathBuf,
}

impl Layout {
    fn new(tree: &Tree, tmp: &TempDir, name: &'static str) -> Result<Layout> {
        let attach = tree.mkdir(name)?;
        tree.mkdir(&format!("{name}/spawn"))?;
        Ok(Layout {
            name,
            allow: tree.mkdir(&format!("{name}/allow"))?,
            d1: tree.mkdir(&format!("{name}/allow/d1"))?,
            d8: tree.mkdir(&format!("{name}/allow/c1/c2/c3/c4/c5/c6/c7/c8"))?,
            lessee: tree.mkdir(&format!("{name}/lessee"))?,
            out: tree.mkdir(&format!("{name}/out"))?,
            config: tmp.0.join(format!("{name}.toml")),
            attach,
        })
    }

    fn header(&self) -> String {
        format!(
            "attach = \"{a}\"\nmode = \"enforce\"\nerrno = \"eaddrinuse\"\n\
             # The bench measures bind(); the sysctl is not part of that.\nprotect_ephemeral = false\n\
             spawn_parent = \"{a}/spawn\"\n",
            a = self.attach.rel
        )
    }
}

fn reserve(ports: &str, allow: &[&str]) -> String {
    let allow: Vec<String> = allow.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "\n[[reserve]]\nports = \"{ports}\"\nprotocols = [\"tcp\"]\nallow = [{}]\n",
        allow.join(", ")
    )
}

/// The cgroups and configuration files every phase up to the spawn one uses.
struct Cgroups {
    free: Cg,
    free2: Cg,
    floor: Cg,
    daemons: Cg,
    small: Layout,
    large: Layout,
    /// The small configuration, refusing through the sentinel port (forced where the kernel
    /// has bpf_set_retval).
    sentinel: Layout,
    /// The small configuration with `per_child_limit = LIMIT` on its range.
    limited: Layout,
    /// The large configuration's other 999 allowed cgroups.
    many: Vec<Cg>,
    alloc_lessee: Cg,
    alloc_config: PathBuf,
}

impl Cgroups {
    fn new(tree: &Tree, tmp: &TempDir) -> Result<Cgroups> {
        let free = tree.mkdir("free")?;
        let free2 = tree.mkdir("free2")?;
        let floor = tree.mkdir("floor")?;
        let daemons = tree.mkdir("daemons")?;
        let small = Layout::new(tree, tmp, "small")?;
        let large = Layout::new(tree, tmp, "large")?;
        let sentinel = Layout::new(tree, tmp, "sentinel")?;
        let limited = Layout::new(tree, tmp, "limited")?;
        eprintln!("bench: creating {} allowed cgroups", ALLOWED_CGROUPS - 1);
        let many: Vec<Cg> = (0..ALLOWED_CGROUPS - 1)
            .map(|i| tree.mkdir(&format!("large/a{i:04}")))
            .collect::<Result<_>>()?;

        fs::write(
            &small.config,
            small.header() + &reserve(SMALL_RANGE, &[&small.allow.rel]),
        )?;
        scale::write_large_config(&large, &many)?;
        fs::write(
            &sentinel.config,
            sentinel.header()
                + &format!("sentinel_port = {SENTINEL_PORT}\n")
                + &reserve(SMALL_RANGE, &[&sentinel.allow.rel]),
        )?;
        fs::write(
            &limited.config,
            limited.header()
                + &reserve(SMALL_RANGE, &[&limited.allow.rel])
                + &format!("per_child_limit = {LIMIT}\n"),
        )?;
        let alloc = tree.mkdir("alloc")?;
        let alloc_lessee = tree.mkdir("alloc/lessee")?;
        tree.mkdir("alloc/spawn")?;
        let alloc_config = tmp.0.join("alloc.toml");
        fs::write(
            &alloc_config,
            format!(
                "attach = \"{a}\"\nerrno = \"eaddrinuse\"\nprotect_ephemeral = false\nspawn_parent = \"{a}/spawn\"\n{}",
                reserve(&format!("{ALLOC_FIRST}-{ALLOC_LAST}"), &[]),
                a = alloc.rel
            ),
        )?;
        Ok(Cgroups {
            sentinel,
            limited,
            free,
            free2,
            floor,
            daemons,
            small,
            large,
            many,
            alloc_lessee,
            alloc_config,
        })
    }
}

fn machine(report: &mut Report) {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_default();
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let desc = format!(
        "{nproc} CPUs ({cpu}), {:.0} GiB, Linux {kernel}, load average at start {}",
        mem / 1048576.0,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    report.note(format!("machine: {desc}"));
    report.record("machine", json!({ "nproc": nproc, "cpu": cpu, "kernel": kernel, "mem_kib": mem, "loadavg_start": load.trim() }));
}

pub fn run_all(opts: &Opts, pg: &Path) -> Result<Report> {
    let p = Params::new(opts);
    let mut report = Report::default();
    machine(&mut report);
    if opts.quick {
        report.note(
            "--quick: few rounds; the figures show that every phase runs, not what anything costs",
        );
    }
    let mount = port_guard::cgroup::Cgroup2::find()?.mount().to_owned();
    for stale in env::remove_stale(&mount) {
        eprintln!("bench: removed {stale}, left by a bench that was killed");
    }
    let tree = Tree::new()?;
    let pins = Pins::new();
    let tmp = TempDir::new()?;
    let cg = Cgroups::new(&tree, &tmp)?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let mut rng = Rng::new(seed);

    // 1. Baseline before any guard of ours exists.
    let (mut base, base_w) = bind::baseline_before(&p, &cg.free)?;
    // 2. Agent.
    let (agent, daemons) = agent::measure(&p, pg, &pins, &cg)?;
    // 3. bind(), then 4. the baseline again, guards gone.
    let binds = bind::measure(&p, &pins, &cg, &mut base, base_w, daemons, &mut rng)?;
    // Rows for phases 1-4.
    bind::rows(&mut report, &p, &binds, &base);
    scale::rows(&mut report, &binds);
    limit::rows(&mut report, &binds);
    bind::program_rows(&mut report, &p, &binds, base.foreign);
    limit::program_rows(&mut report, &p, &binds);

    // 5. Lease allocation.
    let alloc_d = env::Daemon::start(pg, &pins.dir("alloc"), &cg.alloc_config, &cg.daemons)?;
    alloc::allocation(
        &mut report,
        &p,
        &pins.dir("alloc"),
        &cg.alloc_lessee,
        &cg.free2,
        &mut rng,
    )?;

    // 6. spawn.
    spawn::run(
        &mut report,
        &p,
        pg,
        &pins.dir("alloc"),
        &mount,
        &cg.many,
        &mut rng,
    )?;
    drop(alloc_d);

    // 7. A flood of refused binds, with the other daemons gone.
    let flooded = flood::measure(&p, pg, &pins, &tree, &tmp, &cg.daemons)?;
    // 8. A user who makes cgroups, the daemon under the unit's capabilities and without one.
    let users = users::measure(&p, pg, &pins, &tree, &tmp, &cg.daemons)?;

    // Agent rows.
    agent::rows(&mut report, &agent, &binds.daemon_cpu_pct);
    flood::rows(&mut report, &flooded);
    users::rows(&mut report, &p, &users);
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    report.note(format!(
        "load average at the end: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    ));
    drop(tree);
    drop(pins);
    Ok(report)
}

fn claim(maps: &mut Maps, port: u16, cg: &Cg) -> Result<()> {
    if !maps.leases_mut().claim(
        port,
        port_guard::leases::Holder::until_empty(cg.id, cg.level),
    )? {
        bail!("port {port} is leased already");
    }
    Ok(())
}

/// Denials the daemon's log accounts for: (lines of their own, denials summarised as "N more
/// denials by" an offender).
fn denials_seen(log: &str) -> (u64, u64) {
    let (mut lines, mut summarised) = (0, 0);
    for l in log.lines() {
        if l.contains("denied bind") {
            lines += 1;
        } else if let Some(rest) = l.split("denials summarised: ").nth(1) {
            if rest.contains(" more denials by ") {
                summarised += rest
                    .split(' ')
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    (lines, summarised)
}
