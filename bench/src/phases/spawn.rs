//! Phase 6, spawn: `port-guard spawn -- /bin/true` against a bare fork/exec (with and without the
//! large configuration's 999 cgroups on the host), and up to qemu listening on the leased port.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::json;

use super::{Params, QEMU_BARE_PORT};
use crate::{
    env::{check_interrupted, Cg},
    report::{ms, Report},
    stats::{summarize, Rng, Summary},
};

/// The "spawn" section. spawn names its parent cgroup by walking the cgroup tree: it runs once
/// with the large configuration's 999 cgroups (`many`) still there, once without them (they are
/// removed here).
pub(super) fn run(
    report: &mut Report,
    p: &Params,
    pg: &Path,
    pin: &Path,
    mount: &Path,
    many: &[Cg],
    rng: &mut Rng,
) -> Result<()> {
    let n_cgroups = count_cgroups(mount);
    let extra = spawn_true(p, pg, pin, rng)?;
    for c in many {
        fs::remove_dir(&c.abs).with_context(|| format!("rmdir {}", c.abs.display()))?;
    }
    let plain = spawn_true(p, pg, pin, rng)?;
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
            format!("{} cgroups on the host", count_cgroups(mount)),
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
    qemu(report, p, pg, pin, rng)
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
