//! Booting one kernel under qemu and reading its serial console: the init's `PG-START`,
//! `PG-RESULT`, `PG-OUTPUT-*` and `PG-DONE` lines become results, the console is saved under
//! `target/vm/logs/`, and qemu is killed on a kernel panic or a timeout.

use std::{
    collections::HashMap,
    fs,
    io::{self, BufRead as _, BufReader, Read, Write},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{kernel::Kernel, Accel, Options, Series};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Status {
    Pass,
    Skip,
    Fail,
}

pub(super) struct TestResult {
    pub(super) id: String,
    pub(super) status: Status,
    /// Skip reason, failure summary, or a note on a pass.
    pub(super) note: String,
    pub(super) took: Option<Duration>,
}

pub(super) enum End {
    /// PG-DONE seen.
    Done,
    Panic(String),
    Timeout(Duration),
    /// qemu exited before PG-DONE.
    Exited(String),
    /// The init gave up (a mount failed).
    Aborted(String),
}

impl End {
    pub(super) fn describe(&self) -> String {
        match self {
            End::Done => "finished".into(),
            End::Panic(l) => format!("kernel panic: {l}"),
            End::Timeout(t) => format!("timed out after {} s", t.as_secs()),
            End::Exited(s) => format!("qemu exited early: {s}"),
            End::Aborted(m) => format!("init aborted: {m}"),
        }
    }
}

pub(super) struct Outcome {
    pub(super) series: Series,
    pub(super) package: String,
    pub(super) version: String,
    pub(super) results: Vec<TestResult>,
    /// qemu start → init running.
    pub(super) boot: Option<Duration>,
    /// init running → PG-DONE.
    pub(super) suite: Option<Duration>,
    pub(super) wall: Duration,
    pub(super) end: End,
}

/// The summary of a failed test's output: the panic message and where it happened.
fn panic_summary(out: &[String]) -> Option<String> {
    let i = out.iter().position(|l| l.contains("panicked at "))?;
    let place = out[i]
        .split("panicked at ")
        .nth(1)?
        .trim_end_matches(':')
        .to_owned();
    let msg: String = out[i + 1..]
        .iter()
        .take_while(|l| !l.starts_with("note:") && !l.starts_with("stack backtrace"))
        .take(3)
        .map(|l| l.trim())
        .collect::<Vec<_>>()
        .join(" ");
    let msg: String = msg.chars().take(400).collect();
    Some(format!("{msg} ({place})"))
}

/// qemu booting `vmlinuz` with `initrd` and the kernel command line `append`: 2 CPUs,
/// `memory_mb`, the serial port as the console on its stdout, which is piped (as is stderr).
/// `-nodefaults`: no NIC (the guest has loopback only), no VGA. `-no-reboot`: a reboot (and a
/// panic, with `panic=-1`) ends qemu.
pub(super) fn command(
    accel: Accel,
    memory_mb: u32,
    vmlinuz: &Path,
    initrd: &Path,
    append: &str,
) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    match accel {
        Accel::Tcg => cmd.args(["-accel", "tcg"]),
        Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
    };
    cmd.arg("-m")
        .arg(memory_mb.to_string())
        .args(["-smp", "2", "-nodefaults", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", append])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

pub(super) fn boot(k: &Kernel, initrd: &Path, log_path: &Path, opts: &Options) -> Result<Outcome> {
    let mut cmd = command(
        opts.accel,
        1024,
        &k.vmlinuz,
        initrd,
        "console=ttyS0 panic=-1 quiet",
    );
    eprintln!("xtask: {cmd:?}");
    let start = Instant::now();
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel::<String>();
    let readers = [
        spawn_lines(child.stdout.take().expect("piped"), "", tx.clone()),
        spawn_lines(child.stderr.take().expect("piped"), "[qemu] ", tx),
    ];
    let mut console = Console::new(start, log_path, opts)?;
    let end = console.read(&rx, &mut child)?;
    // Let it power off by itself for a moment, then make sure it is gone.
    let t = Instant::now();
    while matches!(child.try_wait(), Ok(None))
        && matches!(end, End::Done)
        && t.elapsed() < Duration::from_secs(30)
    {
        thread::sleep(Duration::from_millis(100));
    }
    stop(&mut child);
    for l in rx.try_iter() {
        console.log(&l)?;
    }
    console.file.flush()?;
    drop(readers);
    Ok(console.outcome(k, end))
}

/// What the console has told so far: the results, the tests running, the output being captured.
struct Console<'a> {
    start: Instant,
    file: io::LineWriter<fs::File>,
    opts: &'a Options,
    results: Vec<TestResult>,
    started: HashMap<String, Instant>,
    captured: Option<(String, Vec<String>)>,
    last_output: HashMap<String, Vec<String>>,
    boot_at: Option<Duration>,
    done_at: Option<Duration>,
}

impl<'a> Console<'a> {
    fn new(start: Instant, log_path: &Path, opts: &'a Options) -> Result<Console<'a>> {
        Ok(Console {
            start,
            file: io::LineWriter::new(fs::File::create(log_path)?),
            opts,
            results: Vec::new(),
            started: HashMap::new(),
            captured: None,
            last_output: HashMap::new(),
            boot_at: None,
            done_at: None,
        })
    }

    fn log(&mut self, line: &str) -> io::Result<()> {
        writeln!(
            self.file,
            "[{:8.3}] {line}",
            self.start.elapsed().as_secs_f64()
        )
    }

    /// Lines until the guest is done, panics, gives up, exits, or the timeout.
    fn read(&mut self, rx: &mpsc::Receiver<String>, child: &mut Child) -> Result<End> {
        let deadline = self.start + self.opts.timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(End::Timeout(self.opts.timeout));
            }
            let line = match rx.recv_timeout(deadline - now) {
                Ok(l) => l,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = child.wait().map(|s| s.to_string()).unwrap_or_default();
                    return Ok(End::Exited(st));
                }
            };
            self.log(&line)?;
            if self.opts.verbose || self.opts.exec.is_some() {
                eprintln!("  | {line}");
            }
            if line.contains("Kernel panic") {
                // A few more lines for the log (the panic's reason), then stop it.
                let t = Instant::now();
                while let Ok(l) = rx.recv_timeout(Duration::from_secs(2)) {
                    self.log(&l)?;
                    if t.elapsed() > Duration::from_secs(3) {
                        break;
                    }
                }
                return Ok(End::Panic(line));
            }
            if let Some(end) = self.line(line) {
                return Ok(end);
            }
        }
    }

    /// One console line (not a panic): the end it says, if it says one.
    fn line(&mut self, line: String) -> Option<End> {
        if let Some((id, buf)) = &mut self.captured {
            if line.contains(&format!("PG-OUTPUT-END {id}")) {
                let (id, buf) = self.captured.take().expect("capturing");
                self.last_output.insert(id, buf);
            } else {
                buf.push(line);
            }
            return None;
        }
        if let Some(rest) = after(&line, "PG-ABORT ") {
            return Some(End::Aborted(rest.to_owned()));
        }
        if line.contains("PG-INIT") && self.boot_at.is_none() {
            self.boot_at = Some(self.start.elapsed());
            eprintln!(
                "  booted in {:.1} s: {}",
                self.start.elapsed().as_secs_f64(),
                after(&line, "PG-INIT ").unwrap_or("")
            );
        } else if let Some(rest) = after(&line, "PG-START ") {
            self.started.insert(rest.trim().to_owned(), Instant::now());
        } else if let Some(rest) = after(&line, "PG-OUTPUT-BEGIN ") {
            self.captured = Some((rest.trim().to_owned(), Vec::new()));
        } else if let Some(rest) = after(&line, "PG-RESULT ") {
            self.result(rest);
        } else if line.contains("PG-DONE") {
            self.done_at = Some(self.start.elapsed());
            return Some(End::Done);
        }
        None
    }

    /// `PG-RESULT <id> pass|skip|fail [note]`: the result, printed (with the output of a
    /// failure) and kept.
    fn result(&mut self, rest: &str) {
        let mut parts = rest.splitn(3, ' ');
        let id = parts.next().unwrap_or_default().to_owned();
        let status = match parts.next() {
            Some("pass") => Status::Pass,
            Some("skip") => Status::Skip,
            _ => Status::Fail,
        };
        let mut note = parts.next().unwrap_or_default().trim().to_owned();
        let out = self.last_output.remove(&id).unwrap_or_default();
        if status == Status::Fail {
            if let Some(p) = panic_summary(&out) {
                note = format!("{note}: {p}");
            }
        }
        let took = self.started.remove(&id).map(|t| t.elapsed());
        let secs = took
            .map(|t| format!("{:6.1} s", t.as_secs_f64()))
            .unwrap_or_default();
        let tag = match status {
            Status::Pass => "pass",
            Status::Skip => "SKIP",
            Status::Fail => "FAIL",
        };
        let shown = if note.is_empty() {
            String::new()
        } else {
            format!("  ({note})")
        };
        eprintln!("  {tag} {secs}  {id}{shown}");
        if status == Status::Fail && !self.opts.verbose {
            let tail = out.len().saturating_sub(150);
            for l in &out[tail..] {
                eprintln!("    | {l}");
            }
        }
        self.results.push(TestResult {
            id,
            status,
            note,
            took,
        });
    }

    /// The run's outcome: tests that started but never reported fail with the way it ended.
    fn outcome(mut self, k: &Kernel, end: End) -> Outcome {
        for (id, t) in std::mem::take(&mut self.started) {
            self.results.push(TestResult {
                id,
                status: Status::Fail,
                note: format!("no result: {}", end.describe()),
                took: Some(t.elapsed()),
            });
        }
        let wall = self.start.elapsed();
        let suite = match (self.boot_at, self.done_at) {
            (Some(b), Some(d)) => Some(d - b),
            _ => None,
        };
        eprintln!(
            "  {}: {}; boot {}, suite {}, wall {:.1} s",
            k.series.name,
            end.describe(),
            fmt_secs(self.boot_at),
            fmt_secs(suite),
            wall.as_secs_f64()
        );
        Outcome {
            series: k.series,
            package: k.package.clone(),
            version: k.version.clone(),
            results: self.results,
            boot: self.boot_at,
            suite,
            wall,
            end,
        }
    }
}

/// The text after `marker` in `line` (kernel messages can land in the middle of a console line).
pub(super) fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|i| &line[i + marker.len()..])
}

pub(super) fn stop(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
    }
    let _ = child.wait();
}

pub(super) fn spawn_lines(
    src: impl Read + Send + 'static,
    prefix: &'static str,
    tx: mpsc::Sender<String>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut r = BufReader::new(src);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']).replace('\r', "");
                    if tx.send(format!("{prefix}{line}")).is_err() {
                        break;
                    }
                }
            }
        }
    })
}

pub(super) fn fmt_secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.1} s", d.as_secs_f64()))
        .unwrap_or_else(|| "-".into())
}
