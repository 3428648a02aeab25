//! The bench, phase by phase (see the crate docs), and the rows each phase adds to the table.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use port_guard::{
    guard::{Maps, PinDir},
    leases,
};
use serde_json::json;

use crate::{
    bind::{self, Kind, Scenario},
    bpfstats::Prog,
    env::{self, check_interrupted, Cg, Daemon, Pins, TempDir, Tree, Worker},
    report::{mib, ms, ratio, time_ns, Report},
    stats::{paired_ratios, summarize, Rng, Summary},
    Opts,
};

/// Ports (inside the bench's own network namespace).
const OUTSIDE: u16 = 63000;
const RESERVED: u16 = 62500;
const LEASED: u16 = 62501;
const REFUSED: u16 = 62502;
const SMALL_RANGE: &str = "62500-62509";
/// The large configuration's 10,000 leases.
const LEASES_FIRST: u16 = 40000;
const LEASES: u32 = 10_000;
/// The allocation range: 20,000 ports.
const ALLOC_FIRST: u16 = 40000;
const ALLOC_LAST: u16 = 59999;
const QEMU_BARE_PORT: u16 = 61000;
const ALLOWED_CGROUPS: usize = 1000;
const DENIALS: u64 = 10_000;
const FLOOR: &str = "a bind4 program that only returns 1 (floor)";
/// A second depth-8 worker under the small guard: the noise between two workers that differ in
/// nothing, against which the scale ratios can be read.
const SCALE_AA: &str = "reserved, allowed, depth 8, 2nd worker (A/A)";

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
    let free = tree.mkdir("free")?;
    let free2 = tree.mkdir("free2")?;
    let floor_cg = tree.mkdir("floor")?;
    let daemons = tree.mkdir("daemons")?;
    let small = Layout::new(&tree, &tmp, "small")?;
    let large = Layout::new(&tree, &tmp, "large")?;
    eprintln!("bench: creating {} allowed cgroups", ALLOWED_CGROUPS - 1);
    let many: Vec<Cg> = (0..ALLOWED_CGROUPS - 1)
        .map(|i| tree.mkdir(&format!("large/a{i:04}")))
        .collect::<Result<_>>()?;

    fs::write(
        &small.config,
        small.header() + &reserve(SMALL_RANGE, &[&small.allow.rel]),
    )?;
    let mut text = large.header();
    let mut range0: Vec<&str> = vec![&large.allow.rel];
    range0.extend(many.iter().map(|c| c.rel.as_str()));
    text += &reserve(SMALL_RANGE, &range0);
    text += &reserve(
        &format!("{LEASES_FIRST}-{}", u32::from(LEASES_FIRST) + LEASES - 1),
        &[],
    );
    for k in 0..62usize {
        let first = 50000 + 100 * k;
        let allow: Vec<&str> = (0..16)
            .map(|j| many[(k * 16 + j) % many.len()].rel.as_str())
            .collect();
        text += &reserve(&format!("{first}-{}", first + 99), &allow);
    }
    fs::write(&large.config, text)?;
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
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let mut rng = Rng::new(seed);

    // 1. Baseline before any guard of ours exists.
    eprintln!("bench: baseline, no guard loaded");
    let mut base_w = Worker::spawn("no guard", &free)?;
    let sizes = bind::calibrate(&mut base_w, OUTSIDE, p.batch_ns)?;
    let foreign = foreign_sock_addr_programs();
    let (mut base_hook, mut base_cycle) =
        bind::baseline_only(&mut base_w, OUTSIDE, sizes, p.base_rounds)?;

    // 2. Agent.
    eprintln!(
        "bench: agent load + attach ({} samples per configuration)",
        p.load_samples + 1
    );
    let mut load = [Vec::new(), Vec::new()];
    let mut wall = [Vec::new(), Vec::new()];
    for i in 0..p.load_samples {
        for (g, l) in [&small, &large].into_iter().enumerate() {
            check_interrupted()?;
            let d = Daemon::start(
                pg,
                &pins.dir(&format!("load-{}-{i}", l.name)),
                &l.config,
                &daemons,
            )?;
            load[g].push(d.load_attach.as_nanos() as f64);
            wall[g].push(d.start_to_enforcing.as_nanos() as f64);
        }
    }
    let small_d = Daemon::start(pg, &pins.dir("small"), &small.config, &daemons)?;
    let large_d = Daemon::start(pg, &pins.dir("large"), &large.config, &daemons)?;
    for (g, d) in [&small_d, &large_d].into_iter().enumerate() {
        load[g].push(d.load_attach.as_nanos() as f64);
        wall[g].push(d.start_to_enforcing.as_nanos() as f64);
    }
    env::sleep(p.settle)?;
    let rss_start = small_d.memory_kib()?;
    {
        let mut w = Worker::spawn("denials", &small.out)?;
        let r = w.call(&json!({ "op": "deny", "port": REFUSED, "n": DENIALS }))?;
        if r["refused"].as_u64() != Some(DENIALS) {
            bail!(
                "{} of {DENIALS} binds of a reserved port were refused",
                r["refused"]
            );
        }
    }
    env::sleep(p.settle + Duration::from_secs(1))?;
    let rss_denials = small_d.memory_kib()?;
    let seen = denials_seen(&small_d.log());

    // Leases: one to each lessee cgroup; the large configuration gets 10,000 more.
    {
        let mut m = Maps::open(&PinDir::new(pins.dir("small")))?;
        claim(&mut m, LEASED, &small.lessee)?;
        let mut m = Maps::open(&PinDir::new(pins.dir("large")))?;
        claim(&mut m, LEASED, &large.lessee)?;
        for i in 0..LEASES {
            claim(
                &mut m,
                (u32::from(LEASES_FIRST) + i) as u16,
                &many[i as usize % many.len()],
            )?;
        }
    }
    env::sleep(p.settle)?;
    let rss_large = large_d.memory_kib()?;
    let cpu0 = [small_d.cpu_time(), large_d.cpu_time()];
    env::sleep(p.idle)?;
    let cpu1 = [small_d.cpu_time(), large_d.cpu_time()];
    let idle_pct: Vec<f64> = (0..2)
        .map(|g| 100.0 * (cpu1[g] - cpu0[g]).as_secs_f64() / p.idle.as_secs_f64())
        .collect();

    // 3. bind().
    eprintln!(
        "bench: bind(), {} interleaved rounds of {} + {} binds per batch",
        p.rounds, sizes.0, sizes.1
    );
    let crate::bpfstats::Floor {
        link: floor_link,
        prog: floor_prog,
    } = crate::bpfstats::Floor::attach(&floor_cg.abs)?;
    let mut workers = vec![
        base_w,
        Worker::spawn("no guard (A/A)", &free2)?,
        Worker::spawn("floor", &floor_cg)?,
    ];
    let mut scenarios = vec![
        Scenario {
            label: "no guard",
            guard: None,
            worker: 0,
            port: OUTSIDE,
            hook_errno: libc::EINVAL,
            cycle_errno: 0,
        },
        Scenario {
            label: "no guard, 2nd worker (A/A)",
            guard: None,
            worker: 1,
            port: OUTSIDE,
            hook_errno: libc::EINVAL,
            cycle_errno: 0,
        },
        Scenario {
            label: FLOOR,
            guard: Some(2),
            worker: 2,
            port: OUTSIDE,
            hook_errno: libc::EINVAL,
            cycle_errno: 0,
        },
    ];
    const GUARDED: [&str; 5] = [
        "port outside every range",
        "reserved, allowed, depth 1",
        "reserved, allowed, depth 8",
        "leased to the caller",
        "refused (EADDRINUSE)",
    ];
    for (g, l) in [&small, &large].into_iter().enumerate() {
        let base = workers.len();
        for (label, cg) in [
            ("out", &l.out),
            ("d1", &l.d1),
            ("d8", &l.d8),
            ("lessee", &l.lessee),
        ] {
            workers.push(Worker::spawn(&format!("{}/{label}", l.name), cg)?);
        }
        if g == 0 {
            workers.push(Worker::spawn(&format!("{}/d8 (A/A)", l.name), &l.d8)?);
            scenarios.push(Scenario {
                label: SCALE_AA,
                guard: Some(0),
                worker: base + 4,
                port: RESERVED,
                hook_errno: libc::EINVAL,
                cycle_errno: 0,
            });
        }
        let e = libc::EINVAL;
        let r = libc::EADDRINUSE;
        scenarios.extend([
            Scenario {
                label: GUARDED[0],
                guard: Some(g),
                worker: base,
                port: OUTSIDE,
                hook_errno: e,
                cycle_errno: 0,
            },
            Scenario {
                label: GUARDED[1],
                guard: Some(g),
                worker: base + 1,
                port: RESERVED,
                hook_errno: e,
                cycle_errno: 0,
            },
            Scenario {
                label: GUARDED[2],
                guard: Some(g),
                worker: base + 2,
                port: RESERVED,
                hook_errno: e,
                cycle_errno: 0,
            },
            Scenario {
                label: GUARDED[3],
                guard: Some(g),
                worker: base + 3,
                port: LEASED,
                hook_errno: e,
                cycle_errno: 0,
            },
            Scenario {
                label: GUARDED[4],
                guard: Some(g),
                worker: base,
                port: REFUSED,
                hook_errno: r,
                cycle_errno: r,
            },
        ]);
    }
    let bind_cpu0 = [small_d.cpu_time(), large_d.cpu_time()];
    let t_bind = Instant::now();
    let samples = bind::measure(&mut workers, &scenarios, sizes, p.rounds, &mut rng)?;
    let bind_wall = t_bind.elapsed();
    let bind_cpu1 = [small_d.cpu_time(), large_d.cpu_time()];
    eprintln!(
        "bench: programs' own run time (bpf_stats), {} rounds",
        p.stats_rounds
    );
    let progs = [
        Prog::from_link_pin(&pins.dir("small").join("link_bind4"))?,
        Prog::from_link_pin(&pins.dir("large").join("link_bind4"))?,
        floor_prog,
    ];
    let (prog_ns, sysctl_before) = bind::program_time(
        &mut workers,
        &scenarios,
        &progs,
        sizes.0,
        p.stats_rounds,
        &mut rng,
    )?;
    let sysctl_after = crate::bpfstats::read_sysctl();

    // 4. Baseline again, guards gone.
    let mut base_w = workers.swap_remove(0);
    drop(workers);
    drop(progs);
    drop(small_d);
    drop(large_d);
    drop(floor_link);
    // Detached programs are freed after an RCU grace period: let them go before counting.
    env::sleep(Duration::from_millis(300))?;
    eprintln!("bench: baseline again, guards unloaded");
    let foreign = foreign.max(foreign_sock_addr_programs());
    let (h, c) = bind::baseline_only(&mut base_w, OUTSIDE, sizes, p.base_rounds)?;
    base_hook.extend(h);
    base_cycle.extend(c);
    drop(base_w);

    // Rows for phases 1-4.
    report.section(format!("bind() from a process in … (tcp/IPv4, medians of {} interleaved rounds; ratio per round, [95% CI])", p.rounds));
    for kind in [Kind::Hook, Kind::Cycle] {
        let what = match kind {
            Kind::Hook => "hook only: bind() on a bound socket",
            Kind::Cycle => "socket()+bind()+close()",
        };
        let s = samples.of(kind);
        let base = &s[0];
        let target = |label: &str| match (kind, label) {
            (_, l) if l == GUARDED[0] => Some(1.02),
            (_, l) if l == GUARDED[2] => Some(1.05),
            _ => None,
        };
        for (i, sc) in scenarios
            .iter()
            .enumerate()
            .filter(|(_, sc)| sc.guard != Some(1) && sc.label != SCALE_AA)
        {
            let r = summarize(&paired_ratios(&s[i], base));
            let t = target(sc.label);
            report.line(
                format!("{what}: {}", sc.label),
                time_ns(summarize(&s[i]).median),
                if i == 0 {
                    "1 (baseline)".into()
                } else {
                    format!("{} no guard", ratio(&r))
                },
                t.map(|t| format!("≤ {t:.2}× no guard")).unwrap_or_default(),
                t.map(|t| r.median <= t),
            );
            report.record(
                &format!("bind.{}.{}", kind.op(), key(sc)),
                json!({ "ns": summarize(&s[i]), "ratio_to_no_guard": r }),
            );
        }
        // What the guard adds over the cost of running any bind program there.
        let floor = index(&scenarios, FLOOR, Some(2));
        for (i, sc) in scenarios
            .iter()
            .enumerate()
            .filter(|(_, sc)| sc.guard == Some(0) && sc.label != SCALE_AA)
        {
            let r = summarize(&paired_ratios(&s[i], &s[floor]));
            report.line(
                format!("{what}: {}, over the floor", sc.label),
                "",
                format!("{} floor", ratio(&r)),
                "",
                None,
            );
            report.record(&format!("bind.{}.{}.ratio_to_floor", kind.op(), key(sc)), r);
        }
        let pre = match kind {
            Kind::Hook => &base_hook,
            Kind::Cycle => &base_cycle,
        };
        let pre_s = summarize(pre);
        report.line(
            format!(
                "{what}: no bind program of the bench loaded (before and after, not interleaved)"
            ),
            time_ns(pre_s.median),
            format!(
                "no guard = {:.3}× this",
                summarize(base).median / pre_s.median
            ),
            "",
            None,
        );
        report.record(&format!("bind.{}.no_program_loaded", kind.op()), pre_s);
    }
    report.section("scale: 64 ranges, 1,000 allowed cgroups, 10,000 leases vs 1 range, 1 allowed cgroup, 0 leases (ratio per round)");
    for kind in [Kind::Hook, Kind::Cycle] {
        let s = samples.of(kind);
        let what = if kind == Kind::Hook {
            "hook only"
        } else {
            "socket()+bind()+close()"
        };
        let (a, b) = (
            index(&scenarios, SCALE_AA, Some(0)),
            index(&scenarios, GUARDED[2], Some(0)),
        );
        let r = summarize(&paired_ratios(&s[a], &s[b]));
        report.line(
            format!("{what}: small, depth 8, a 2nd worker (A/A: the noise of this comparison)"),
            time_ns(summarize(&s[a]).median),
            format!("{} small", ratio(&r)),
            "",
            None,
        );
        report.record(&format!("scale.{}.aa", kind.op()), r);
        for label in GUARDED {
            let (si, li) = (
                index(&scenarios, label, Some(0)),
                index(&scenarios, label, Some(1)),
            );
            let r = summarize(&paired_ratios(&s[li], &s[si]));
            report.line(
                format!("{what}: {label}"),
                time_ns(summarize(&s[li]).median),
                format!("{} small", ratio(&r)),
                "≤ 1.02× small",
                Some(r.median <= 1.02),
            );
            report.record(
                &format!("scale.{}.{}", kind.op(), key(&scenarios[si])),
                json!({ "ns": summarize(&s[li]), "ratio_to_small": r }),
            );
        }
    }
    report.section(format!(
        "time inside the bind4 program (bpf_stats run_time_ns / run_cnt, {} rounds)",
        p.stats_rounds
    ));
    for label in GUARDED {
        let (si, li) = (
            index(&scenarios, label, Some(0)),
            index(&scenarios, label, Some(1)),
        );
        report.line(
            format!("{label}: small / large"),
            format!("{:.0} / {:.0} ns", prog_ns[si].median, prog_ns[li].median),
            format!(
                "large = {:.2}× small",
                prog_ns[li].median / prog_ns[si].median
            ),
            "",
            None,
        );
        report.record(
            &format!("program_ns.{}", key(&scenarios[si])),
            json!({ "small": prog_ns[si], "large": prog_ns[li] }),
        );
    }
    let fi = index(&scenarios, FLOOR, Some(2));
    report.line(
        FLOOR,
        format!("{:.0} ns", prog_ns[fi].median),
        "bpf_stats' own overhead, mostly",
        "",
        None,
    );
    report.record("program_ns.floor", prog_ns[fi]);
    report.note(format!(
        "bpf_stats were on only while the program run times were read (BPF_ENABLE_STATS fd); kernel.bpf_stats_enabled was {sysctl_before} before and {sysctl_after} after"
    ));
    if foreign > 0 {
        report.note(format!(
            "{foreign} cgroup sock_addr program(s) of others were loaded on the host during a baseline phase: while any bind4 \
             program is attached anywhere, every bind() on the host takes the kernel's cgroup-bpf path (lock_sock and the \
             effective-array walk), so the 'no bind program' rows may include that cost"
        ));
    }

    // 5. Lease allocation.
    let alloc_d = Daemon::start(pg, &pins.dir("alloc"), &alloc_config, &daemons)?;
    allocation(
        &mut report,
        &p,
        &pins.dir("alloc"),
        &alloc_lessee,
        &free2,
        &mut rng,
    )?;

    // 6. spawn.
    // spawn names its parent cgroup by walking the cgroup tree: once with the large
    // configuration's 999 cgroups still there, once without them.
    let n_cgroups = count_cgroups(&mount);
    let extra = spawn_true(&p, pg, &pins.dir("alloc"), &mut rng)?;
    for c in &many {
        fs::remove_dir(&c.abs).with_context(|| format!("rmdir {}", c.abs.display()))?;
    }
    let plain = spawn_true(&p, pg, &pins.dir("alloc"), &mut rng)?;
    report.section(format!(
        "spawn ({} interleaved rounds; overhead = paired difference, [95% CI])",
        p.spawn_reps
    ));
    report.line(
        "fork/exec of /bin/true, to exit",
        ms(plain.0.median),
        "",
        "",
        None,
    );
    for (what, (_, s, d)) in [
        (
            format!("{} cgroups on the host", count_cgroups(&mount)),
            &plain,
        ),
        (format!("{n_cgroups} cgroups on the host"), &extra),
    ] {
        report.line(
            format!("`port-guard spawn -- /bin/true`, to exit, {what}"),
            ms(s.median),
            format!("overhead {} [{}–{}]", ms(d.median), ms(d.lo), ms(d.hi)),
            "overhead ≤ 5 ms",
            Some(d.median <= 5e6),
        );
    }
    report.record("spawn", json!({ "bare_true_ns": plain.0, "spawn_true_ns": plain.1, "overhead_ns": plain.2,
        "with_extra_cgroups": { "cgroups": n_cgroups, "spawn_true_ns": extra.1, "overhead_ns": extra.2 } }));
    qemu(&mut report, &p, pg, &pins.dir("alloc"), &mut rng)?;
    drop(alloc_d);

    // Agent rows.
    report.section("agent");
    let ls = summarize(&load[0]);
    report.line(
        "load + attach, 1 range (daemon's own measure)",
        ms(ls.median),
        format!("{} starts", ls.n),
        "≤ 100 ms",
        Some(ls.median <= 100e6),
    );
    let ll = summarize(&load[1]);
    report.line(
        "load + attach, 64 ranges / 1,000 allowed",
        ms(ll.median),
        format!("{} starts", ll.n),
        "≤ 100 ms",
        Some(ll.median <= 100e6),
    );
    let ws = summarize(&wall[0]);
    let wl = summarize(&wall[1]);
    report.line(
        "exec to \"guard enforcing\", 1 range / 64 ranges",
        format!("{} / {}", ms(ws.median), ms(wl.median)),
        "",
        "",
        None,
    );
    report.line(
        "daemon RSS after start (peak while loading)",
        format!("{} ({})", mib(rss_start.0 as f64), mib(rss_start.1 as f64)),
        "",
        "≤ 16 MiB",
        Some(rss_start.0 <= 16 * 1024),
    );
    report.line(
        "daemon RSS after 10,000 denials (peak so far)",
        format!(
            "{} ({})",
            mib(rss_denials.0 as f64),
            mib(rss_denials.1 as f64)
        ),
        if seen < DENIALS {
            format!("{seen} of 10,000 events read: the rest overflowed the ring buffer")
        } else {
            "all 10,000 events read".to_owned()
        },
        "≤ 16 MiB",
        Some(rss_denials.0 <= 16 * 1024),
    );
    report.line(
        "daemon RSS, 64 ranges / 1,000 allowed / 10,000 leases",
        mib(rss_large.0 as f64),
        "",
        "≤ 16 MiB",
        Some(rss_large.0 <= 16 * 1024),
    );
    report.line(
        "daemon CPU when idle, small / large",
        format!("{:.2} / {:.2} %", idle_pct[0], idle_pct[1]),
        "of one CPU",
        "",
        None,
    );
    let bind_pct: Vec<f64> = (0..2)
        .map(|g| 100.0 * (bind_cpu1[g] - bind_cpu0[g]).as_secs_f64() / bind_wall.as_secs_f64())
        .collect();
    report.line(
        "daemon CPU during the bind() rounds, small / large",
        format!("{:.1} / {:.1} %", bind_pct[0], bind_pct[1]),
        "of one CPU (denial events included)",
        "",
        None,
    );
    report.record(
        "agent",
        json!({
            "load_attach_ns": { "small": ls, "large": ll }, "exec_to_enforcing_ns": { "small": ws, "large": wl },
            "rss_kib_after_start": rss_start, "rss_kib_after_denials": rss_denials, "rss_kib_large_with_leases": rss_large,
            "denial_events_read": seen, "idle_cpu_pct": idle_pct, "bind_phase_cpu_pct": bind_pct,
        }),
    );
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

/// The scenario with `label` under `guard` (None: no guard, Some(0) small, Some(1) large,
/// Some(2) the floor program).
fn index(scenarios: &[Scenario], label: &str, guard: Option<usize>) -> usize {
    scenarios
        .iter()
        .position(|x| x.label == label && x.guard == guard)
        .unwrap_or_else(|| panic!("no scenario {label:?} under guard {guard:?}"))
}

fn key(sc: &Scenario) -> String {
    sc.label
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join("_")
        .to_lowercase()
}

fn claim(maps: &mut Maps, port: u16, cg: &Cg) -> Result<()> {
    if !leases::claim(maps, port, cg.id, cg.level)? {
        bail!("port {port} is leased already");
    }
    Ok(())
}

/// Denial events the daemon read: logged lines plus the ones it counted as not logged.
fn denials_seen(log: &str) -> u64 {
    let mut n = 0;
    for l in log.lines() {
        if l.contains("denied bind") {
            n += 1;
        } else if let Some(i) = l.find(" more denials not logged") {
            n += l[..i]
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    n
}

/// cgroup sock_addr programs loaded on the host that are not the bench's (none of ours exists
/// when this runs).
fn foreign_sock_addr_programs() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| {
            p.program_type() == aya_obj::generated::bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR
        })
        .count()
}

/// Lease allocation at several fill levels of the 20,000-port range: the library (`allocate`, run
/// in the lessee cgroup as spawn runs it) against libvirt's way (bitmap + probe bind), interleaved.
fn allocation(
    report: &mut Report,
    p: &Params,
    pin: &Path,
    lessee: &Cg,
    free: &Cg,
    rng: &mut Rng,
) -> Result<()> {
    eprintln!(
        "bench: lease allocation at fill levels {:?}, {} allocations each",
        p.alloc_levels, p.alloc_m
    );
    let mut lib_w = Worker::spawn("allocator (library)", lessee)?;
    let mut bare_w = Worker::spawn("allocator (bare probe-bind)", free)?;
    let mut maps = Maps::open(&PinDir::new(pin))?;
    let methods: Vec<Option<&'static str>> = vec![None, Some("bare")];
    // per method, per level: every allocation's ns
    let mut ns: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); p.alloc_levels.len()]; methods.len()];
    for _ in 0..p.alloc_reps {
        let mut order: Vec<(usize, usize)> = (0..methods.len())
            .flat_map(|m| (0..p.alloc_levels.len()).map(move |l| (m, l)))
            .collect();
        rng.shuffle(&mut order);
        for (m, l) in order {
            check_interrupted()?;
            let level = p.alloc_levels[l];
            let r = match methods[m] {
                Some("bare") => bare_w.call(&json!({
                    "op": "alloc_bare", "first": ALLOC_FIRST, "last": ALLOC_LAST, "prefill": level, "m": p.alloc_m,
                }))?,
                _ => {
                    // The range is filled up to `level` with leases (claims only: the allocator
                    // skips them whoever holds them) on the lowest ports, the layout a
                    // lowest-first allocator makes, like the bare one's.
                    let filled: Vec<u16> = (ALLOC_FIRST..).take(level as usize).collect();
                    for &port in &filled {
                        claim(&mut maps, port, lessee)?;
                    }
                    let r = lib_w.call(&json!({
                        "op": "alloc_lib", "pin": pin, "cgroup_id": lessee.id, "level": lessee.level, "m": p.alloc_m,
                    }));
                    for &port in &filled {
                        let _ = leases::release(&mut maps, port);
                    }
                    let r = r?;
                    if r["first_port"].as_u64() != Some(u64::from(ALLOC_FIRST) + level) {
                        bail!("the library allocated {} first, expected {}", r["first_port"], u64::from(ALLOC_FIRST) + level);
                    }
                    r
                }
            };
            ns[m][l].extend(
                r["ns"]
                    .as_array()
                    .context("no ns")?
                    .iter()
                    .filter_map(|v| v.as_f64()),
            );
        }
    }
    let med: Vec<Vec<Summary>> = ns
        .iter()
        .map(|per| per.iter().map(|v| summarize(v)).collect())
        .collect();
    report.section(format!(
        "lease allocation, {}-{} ({} ports), {} allocations per fill level × {}: median per allocation (rate)",
        ALLOC_FIRST,
        ALLOC_LAST,
        u32::from(ALLOC_LAST - ALLOC_FIRST) + 1,
        p.alloc_m,
        p.alloc_reps
    ));
    let bare = 1;
    for (m, method) in methods.iter().enumerate().filter(|(m, _)| *m != bare) {
        let name = match method {
            None => "library allocate()".to_owned(),
            Some(c) => format!("candidate {c}"),
        };
        for (l, level) in p.alloc_levels.iter().enumerate() {
            let lib = med[m][l].median;
            let b = med[bare][l].median;
            let rate = 1e9 / lib;
            let r = lib / b;
            report.line(
                format!(
                    "{name}, range {:.0}% leased",
                    100.0 * *level as f64 / 20000.0
                ),
                format!("{} ({:.0}/s)", time_ns(lib), rate),
                format!("{r:.2}× bare probe-bind ({})", time_ns(b)),
                "≥ 20,000/s, ≤ 1.5× bare",
                Some(rate >= 20_000.0 && r <= 1.5),
            );
        }
        if let Some((rate, ratio)) = fill_rate(&p.alloc_levels, &med[m], &med[bare]) {
            report.line(
                format!("{name}: filling the whole range (from the levels above)"),
                format!("{rate:.0}/s"),
                format!("{ratio:.2}× bare probe-bind"),
                "≥ 20,000/s, ≤ 1.5× bare",
                Some(rate >= 20_000.0 && ratio <= 1.5),
            );
        }
    }
    report.record(
        "allocation",
        json!({
            "levels": p.alloc_levels,
            "methods": methods.iter().map(|m| m.unwrap_or("library")).collect::<Vec<_>>(),
            "ns_per_allocation": med,
        }),
    );
    Ok(())
}

/// Leases per second over a fill of the whole range, integrating the per-allocation medians over
/// the fill levels (trapezoids; the last level's cost up to the end), and the ratio to bare.
fn fill_rate(levels: &[u64], lib: &[Summary], bare: &[Summary]) -> Option<(f64, f64)> {
    if levels.len() < 3 || levels[0] != 0 {
        return None;
    }
    let total = |s: &[Summary]| {
        let mut t = 0.0;
        for i in 0..levels.len() {
            let next = levels.get(i + 1).copied().unwrap_or(20_000);
            let end = s.get(i + 1).map(|x| x.median).unwrap_or(s[i].median);
            t += (next - levels[i]) as f64 * (s[i].median + end) / 2.0;
        }
        t
    };
    let (tl, tb) = (total(lib), total(bare));
    Some((20_000.0 / (tl / 1e9), tl / tb))
}

fn count_cgroups(mount: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![mount.to_owned()];
    while let Some(d) = stack.pop() {
        n += 1;
        if let Ok(entries) = fs::read_dir(&d) {
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                    .map(|e| e.path()),
            );
        }
    }
    n
}

/// `port-guard spawn -- /bin/true` against a bare fork/exec of /bin/true, interleaved: (bare,
/// spawn, paired difference).
fn spawn_true(
    p: &Params,
    pg: &Path,
    pin: &Path,
    rng: &mut Rng,
) -> Result<(Summary, Summary, Summary)> {
    eprintln!("bench: spawn, {} rounds", p.spawn_reps);
    let mut bare = Vec::new();
    let mut spawned = Vec::new();
    for round in 0..=p.spawn_reps {
        let mut order = [false, true];
        rng.shuffle(&mut order);
        for via_spawn in order {
            check_interrupted()?;
            let mut cmd = if via_spawn {
                let mut c = Command::new(pg);
                c.arg("--pin-dir")
                    .arg(pin)
                    .args(["spawn", "--", "/bin/true"]);
                c
            } else {
                Command::new("/bin/true")
            };
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let t = Instant::now();
            let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
            let d = t.elapsed().as_nanos() as f64;
            if !out.status.success() {
                bail!(
                    "{cmd:?} failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            if round > 0 {
                if via_spawn {
                    spawned.push(d)
                } else {
                    bare.push(d)
                }
            }
        }
    }
    let diffs: Vec<f64> = spawned.iter().zip(&bare).map(|(x, y)| x - y).collect();
    Ok((summarize(&bare), summarize(&spawned), summarize(&diffs)))
}

/// `port-guard spawn -- qemu … -incoming tcp:[::]:{port}` up to qemu listening, against qemu alone.
fn qemu(report: &mut Report, p: &Params, pg: &Path, pin: &Path, rng: &mut Rng) -> Result<()> {
    eprintln!("bench: qemu, {} rounds", p.qemu_reps);
    let Some(qemu) = which("qemu-system-x86_64") else {
        report.note("qemu-system-x86_64 is not installed: the qemu rows are missing (apt-get install qemu-system-x86)");
        return Ok(());
    };
    let qemu_args = |port: &str| -> Vec<String> {
        [
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-m",
            "128",
            "-nodefaults",
            "-display",
            "none",
            "-incoming",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("tcp:[::]:{port}")])
        .collect()
    };
    let (mut q_bare, mut q_spawn) = (Vec::new(), Vec::new());
    for round in 0..=p.qemu_reps {
        let mut order = [false, true];
        rng.shuffle(&mut order);
        for via_spawn in order {
            check_interrupted()?;
            let t = Instant::now();
            let (mut child, port) = if via_spawn {
                let mut c = Command::new(pg);
                c.arg("--pin-dir")
                    .arg(pin)
                    .args(["spawn", "--", qemu.to_str().unwrap_or("qemu-system-x86_64")])
                    .args(qemu_args("{port}"));
                c.stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .process_group(0);
                die_with_bench(&mut c);
                let mut child = c.spawn().context("starting port-guard spawn -- qemu")?;
                let mut line = String::new();
                BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
                let port: u16 = line
                    .trim()
                    .parse()
                    .with_context(|| format!("spawn printed {line:?}, not a port"))?;
                (child, port)
            } else {
                let mut c = Command::new(&qemu);
                c.args(qemu_args(&QEMU_BARE_PORT.to_string()));
                // Started like spawn is, from the bench's own cgroup: moving it into a cgroup first
                // would add a cgroup migration (an RCU grace period) to the baseline.
                c.stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .process_group(0);
                die_with_bench(&mut c);
                (c.spawn().context("starting qemu")?, QEMU_BARE_PORT)
            };
            let deadline = Instant::now() + Duration::from_secs(60);
            let result = loop {
                if listening(port) {
                    break Ok(t.elapsed().as_nanos() as f64);
                }
                if let Ok(Some(st)) = child.try_wait() {
                    break Err(anyhow::anyhow!(
                        "qemu exited ({st}) before listening on {port}"
                    ));
                }
                if Instant::now() > deadline {
                    break Err(anyhow::anyhow!("qemu did not listen on {port} within 60 s"));
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            let _ = child.kill();
            let _ = child.wait();
            let d = result?;
            if round > 0 {
                if via_spawn {
                    q_spawn.push(d)
                } else {
                    q_bare.push(d)
                }
            }
        }
    }
    let (qb, qs) = (summarize(&q_bare), summarize(&q_spawn));
    let qd = summarize(
        &q_spawn
            .iter()
            .zip(&q_bare)
            .map(|(x, y)| x - y)
            .collect::<Vec<_>>(),
    );
    report.line(
        format!(
            "qemu -incoming, start to listening ({} rounds)",
            p.qemu_reps
        ),
        ms(qb.median),
        "",
        "",
        None,
    );
    report.line(
        "`port-guard spawn -- qemu …`, start to listening on the leased port",
        ms(qs.median),
        format!("overhead {}", ms(qd.median)),
        "",
        None,
    );
    report.record(
        "qemu",
        json!({ "bare_ns": qb, "spawn_ns": qs, "overhead_ns": qd }),
    );
    Ok(())
}

fn die_with_bench(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Whether a TCP socket listens on `port` in this network namespace.
fn listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp6", "/proc/net/tcp"].iter().any(|f| {
        fs::read_to_string(f)
            .map(|t| {
                t.lines().skip(1).any(|l| {
                    let mut it = l.split_whitespace();
                    let local = it.nth(1).unwrap_or_default();
                    let state = it.nth(1).unwrap_or_default();
                    local.ends_with(&want) && state == "0A"
                })
            })
            .unwrap_or(false)
    })
}
