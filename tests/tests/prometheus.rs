//! The shipped alert rules and Grafana dashboard against a real Prometheus (Debian's
//! `prometheus`, started here on loopback with a config and storage of its own, never as a
//! service) scraping a real daemon, and node_exporter's textfile collector (Debian's
//! `prometheus-node-exporter`) reading the file that port-guard-metrics.service writes, run
//! here on a short period instead of its timer.
//!
//! Everything runs in a network namespace of the test (its own loopback, so no port of the
//! host's is taken), on the test's cgroups and pin dir. Through Prometheus's HTTP API:
//!
//! - every rule of the shipped file loads and evaluates with no error, and every dashboard
//!   expression evaluates, with data, on a host with refusals of each reason, a lease and a VM
//!   at its per-child limit;
//! - a host seen through both the endpoint and the textfile gives one value per panel and one
//!   alert, not two;
//! - kill -9 of the daemon with no textfile: PortGuardDown goes pending (the shipped rules,
//!   `for:` untouched) and fires in a copy of the rules whose `for:` is cut to a few seconds;
//! - kill -9 with the textfile: the dashboard still shows the guard attached and its refusals,
//!   "Daemon up" goes to 0, PortGuardDaemonDown (a warning) goes pending and fires in the copy,
//!   and PortGuardDown stays quiet.
//!
//! Ports 64600-64699 (inside the namespace).

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use integration_tests::{
    netns::{TestNetns, UnloadInNetns},
    *,
};
use serde_json::Value;

const RANGE: (u16, u16) = (64600, 64609);
const SENTINEL: u16 = 64699;
const DAEMON_ADDR: &str = "127.0.0.1:64690";
const NODE_ADDR: &str = "127.0.0.1:64691";
const PROM_ADDR: &str = "127.0.0.1:64692";
/// The host both targets are, as the rules and the dashboard name it (instance less the port).
const HOST: &str = "127.0.0.1";
/// The rules' group as shipped, and the test's copy of it with every `for:` cut short.
const GROUP: &str = "port-guard";
const SHORT_GROUP: &str = "port-guard-short-for";
const SHORT_FOR: &str = "2s";

const RULES: &str = "contrib/prometheus/port-guard.rules.yml";
const DASHBOARD: &str = "contrib/grafana/port-guard.json";
const METRICS_UNIT: &str = "contrib/port-guard-metrics.service";

/// A program on PATH.
fn program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

/// `%XX` for every byte that is not unreserved (RFC 3986).
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET `path` from `addr` (HTTP/1.0: the server closes when done): (status, body).
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_owned()))
}

/// The test's Prometheus: its API, from inside the namespace.
struct Prom<'a> {
    ns: &'a TestNetns,
}

impl Prom<'_> {
    /// GET an API path; the JSON answer, whatever its status.
    fn get(&self, path: &str) -> Value {
        let (code, body) = self
            .ns
            .run(|| http_get(PROM_ADDR, path))
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {path}: HTTP {code}, not JSON ({e}): {body}"))
    }

    /// An instant query: Ok(result vector) or Err(the error Prometheus gave).
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let v = self.get(&format!("/api/v1/query?query={}", urlencode(expr)));
        if v["status"] == "success" {
            Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
        } else {
            Err(format!("{}: {}", v["errorType"], v["error"]))
        }
    }

    /// The one value of an instant query that must give one series.
    fn value(&self, expr: &str) -> f64 {
        let r = self.query(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
        assert_eq!(r.len(), 1, "{expr}: one series expected: {r:?}");
        r[0]["value"][1].as_str().unwrap().parse().unwrap()
    }

    /// Every rule of `group`, as Prometheus evaluates it (name, query, state, health, ...).
    fn rules(&self, group: &str) -> Vec<Value> {
        let v = self.get("/api/v1/rules");
        assert_eq!(v["status"], "success", "{v}");
        v["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == group)
            .unwrap_or_else(|| panic!("no rule group {group}: {v}"))["rules"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// `alert`'s state in `group`: inactive, pending or firing; with its alerts' labels.
    fn alert(&self, group: &str, alert: &str) -> (String, Vec<Value>) {
        let rules = self.rules(group);
        let r = rules
            .iter()
            .find(|r| r["name"] == alert)
            .unwrap_or_else(|| panic!("no alert {alert} in {group}"));
        let alerts = r["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["labels"].clone())
            .collect();
        (r["state"].as_str().unwrap().to_owned(), alerts)
    }

    /// Waits until `alert` of `group` is in `state`; the time it took.
    fn wait_alert(&self, group: &str, alert: &str, state: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        wait_until(timeout, || {
            (self.alert(group, alert).0 == state).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "{alert} ({group}) not {state} after {timeout:?}: {:?}",
                self.alert(group, alert)
            )
        });
        start.elapsed()
    }

    /// Waits until every target is up, each scraped at least once.
    fn wait_targets(&self, jobs: &[&str]) {
        wait_until(Duration::from_secs(60), || {
            let v = self.get("/api/v1/targets");
            let active = v["data"]["activeTargets"].as_array()?.clone();
            let up: BTreeSet<&str> = active
                .iter()
                .filter(|t| t["health"] == "up")
                .filter_map(|t| t["labels"]["job"].as_str())
                .collect();
            jobs.iter().all(|j| up.contains(j)).then_some(())
        })
        .unwrap_or_else(|| panic!("targets not up: {}", self.get("/api/v1/targets")));
    }
}

/// A process the test started, SIGKILLed and reaped on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What port-guard-metrics.timer does: runs the shipped unit's ExecStart (the test's binary, pin
/// dir and textfile in place of the packaged ones) every `period`, in the namespace, until
/// dropped.
struct Timer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Timer {
    fn start(
        ns: &TestNetns,
        pin: &PinDir,
        config: &Path,
        textfile: &Path,
        period: Duration,
    ) -> Timer {
        let unit = std::fs::read_to_string(workspace_file(METRICS_UNIT)).unwrap();
        let exec = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("the unit has an ExecStart=");
        let packaged = "/var/lib/prometheus/node-exporter/port-guard.prom";
        assert!(exec.contains(packaged), "{exec}");
        let argv: Vec<String> = exec
            .replace(packaged, textfile.to_str().unwrap())
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        assert_eq!(argv[0], "/usr/sbin/port-guard", "{exec}");
        let ns_path = ns.path();
        let (pin, config) = (pin.path().to_owned(), config.to_owned());
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let ns = std::fs::File::open(&ns_path).unwrap();
                let mut c = Command::new(bin());
                c.args(&argv[1..])
                    .env("PORT_GUARD_PIN_DIR", &pin)
                    .env("PORT_GUARD_CONFIG", &config);
                use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
                let fd = ns.as_raw_fd();
                // SAFETY: setns(2) between fork and exec, on an fd that stays open meanwhile.
                unsafe {
                    c.pre_exec(move || {
                        if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                let out = c.output().unwrap();
                if !out.status.success() {
                    eprintln!(
                        "[timer] {argv:?}: {}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                std::thread::sleep(period);
            }
        });
        Timer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Every query of the dashboard: (panel title, expression as Grafana has it).
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(workspace_file(DASHBOARD)).unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            out.push((
                p["title"].as_str().unwrap().to_owned(),
                t["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    assert!(out.len() >= 20, "{} queries", out.len());
    out
}

/// A dashboard expression as Grafana sends it: `$host` as one host picked (regex-escaped, in a
/// PromQL string) or All (`.*`), `$__rate_interval` as 30 s (Grafana's is at least four scrape
/// intervals: 8 s here).
fn as_grafana_sends(expr: &str, host: Option<&str>) -> String {
    let host = match host {
        Some(h) => h.replace('.', "\\\\."),
        None => ".*".to_owned(),
    };
    expr.replace("$__rate_interval", "30s")
        .replace("$host", &host)
}

/// The panel queries' results for one host: every one evaluates, and has data.
fn assert_every_panel_has_data(prom: &Prom<'_>, host: Option<&str>) {
    for (title, expr) in dashboard_queries() {
        let q = as_grafana_sends(&expr, host);
        let r = prom
            .query(&q)
            .unwrap_or_else(|e| panic!("panel {title:?}: {q}: {e}"));
        assert!(!r.is_empty(), "panel {title:?} has no data: {q}");
    }
}

/// Every rule of both groups was evaluated with no error, and its expression evaluates now.
fn assert_every_rule_evaluates(prom: &Prom<'_>) {
    for group in [GROUP, SHORT_GROUP] {
        for r in prom.rules(group) {
            assert_eq!(r["health"], "ok", "{group}: {r}");
            let q = r["query"].as_str().unwrap();
            prom.query(q).unwrap_or_else(|e| panic!("{q}: {e}"));
        }
    }
}

/// The dashboard's query of the panel titled `title` (its `n`th), as Grafana sends it for HOST.
fn panel_query(title: &str, n: usize) -> String {
    let exprs: Vec<String> = dashboard_queries()
        .into_iter()
        .filter(|(t, _)| t == title)
        .map(|(_, e)| e)
        .collect();
    assert!(n < exprs.len(), "no query {n} on panel {title:?}");
    as_grafana_sends(&exprs[n], Some(HOST))
}

/// The shipped rules with every `for:` cut to [`SHORT_FOR`], in a group of their own.
fn short_rules(shipped: &str) -> String {
    let mut out = String::new();
    for line in shipped.lines() {
        let t = line.trim_start();
        if t.starts_with("for: ") {
            out += &format!("{}for: {SHORT_FOR}\n", &line[..line.len() - t.len()]);
        } else if t == format!("- name: {GROUP}") {
            out += &line.replace(GROUP, SHORT_GROUP);
            out.push('\n');
        } else {
            out += line;
            out.push('\n');
        }
    }
    assert!(out.contains(&format!("for: {SHORT_FOR}")));
    out
}

/// `port-guard daemon` in the namespace, on the test's config (which names its metrics
/// address), with the sentinel forced so that its metrics are there on any kernel.
fn start_daemon(ns: &TestNetns, f: &Fixture) -> Daemon {
    let mut c = ns.command(bin());
    c.arg("--pin-dir")
        .arg(f.pin.path())
        .arg("--config")
        .arg(&f.config)
        .arg("daemon")
        .env("PORT_GUARD_SENTINEL", "force");
    if !kernel_features().set_retval && !kernel_features().sentinel {
        c.arg("--allow-fallback");
    }
    let d = Daemon::spawn(c);
    d.wait_for("guard enforcing", START_TIMEOUT);
    d
}

#[test]
fn prometheus_evaluates_the_shipped_alerts_and_dashboard_and_sees_the_daemon_die() {
    if !workspace_file(RULES).exists() {
        skip("the repository's contrib files are not here (a VM guest): the host suite runs this test");
        return;
    }
    let prometheus = program("prometheus").expect(
        "prometheus (Debian's prometheus package; cargo xtask test installs it: xtask/src/packages.rs)",
    );
    let node_exporter = program("prometheus-node-exporter");

    let f = Fixture::new("prom");
    let ns = TestNetns::new("prom");
    let _unload = UnloadInNetns {
        ns: &ns,
        pin: &f.pin,
    };
    let machine = f.attach.child("machine");
    let vm1 = machine.child("vm1");
    let vm2 = machine.child("vm2");
    let (first, last) = RANGE;
    std::fs::write(
        &f.config,
        format!(
            "attach = \"{a}\"\nmode = \"enforce\"\nerrno = \"eaddrinuse\"\nspawn_parent = \"{a}/spawn\"\n\
             sentinel_port = {SENTINEL}\nmetrics_listen = \"{DAEMON_ADDR}\"\n\n\
             [[reserve]]\nports = \"{first}-{last}\"\nprotocols = [\"tcp\"]\nallow = [\"{}\"]\nper_child_limit = 1\n",
            machine.path(),
            a = f.attach.path()
        ),
    )
    .unwrap();
    let mut daemon = start_daemon(&ns, &f);

    // node_exporter with nothing but the textfile collector, on a directory of the test's.
    let textdir = f.tmp.path().join("textfile");
    std::fs::create_dir(&textdir).unwrap();
    let textfile = textdir.join("port-guard.prom");
    let mut jobs = vec!["port-guard"];
    let _node = node_exporter.as_ref().map(|exe| {
        let mut c = ns.command(exe);
        c.arg(format!("--web.listen-address={NODE_ADDR}"))
            .arg("--collector.disable-defaults")
            .arg("--collector.textfile")
            .arg(format!(
                "--collector.textfile.directory={}",
                textdir.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        jobs.push("node");
        Killed(c.spawn().unwrap())
    });
    if node_exporter.is_none() {
        skip_part("prometheus-node-exporter is not installed (Debian's package of that name): the textfile half (dashboard and alerts while the daemon is down) is not checked");
    }

    // Prometheus: both targets every 2 s (a debug daemon on a loaded machine answers well within
    // that), rules every second; the shipped rules and the short copy.
    let prom_dir = f.tmp.path().join("prometheus");
    std::fs::create_dir(&prom_dir).unwrap();
    let shipped = workspace_file(RULES).canonicalize().unwrap();
    let shipped_text = std::fs::read_to_string(&shipped).unwrap();
    let short = f.tmp.write("short.rules.yml", &short_rules(&shipped_text));
    let node_job = if node_exporter.is_some() {
        format!("  - job_name: node\n    static_configs:\n      - targets: ['{NODE_ADDR}']\n")
    } else {
        String::new()
    };
    let config = f.tmp.write(
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 2s\n  scrape_timeout: 2s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n  - {}\n\
             scrape_configs:\n  - job_name: port-guard\n    static_configs:\n      - targets: ['{DAEMON_ADDR}']\n{node_job}",
            shipped.display(),
            short.display()
        ),
    );
    let mut c = ns.command(&prometheus);
    c.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            prom_dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={PROM_ADDR}"))
        .arg("--log.level=warn");
    let mut server = Daemon::spawn(c);
    let prom = Prom { ns: &ns };
    wait_until(Duration::from_secs(60), || {
        assert!(server.running(), "prometheus exited: {:?}", server.lines());
        ns.run(|| http_get(PROM_ADDR, "/-/ready").ok())
            .filter(|(code, _)| *code == 200)
    })
    .expect("prometheus ready");
    prom.wait_targets(&jobs);

    // The shipped rules load whole.
    let alerts: Vec<&str> = shipped_text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    let loaded: Vec<String> = prom
        .rules(GROUP)
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(loaded, alerts, "the rules Prometheus loaded");

    // A host with refusals of every reason, a lease, and a VM at its limit.
    std::thread::sleep(Duration::from_secs(2));
    let lease: Value = serde_json::from_str(&{
        let out = ns
            .command(bin())
            .arg("--pin-dir")
            .arg(f.pin.path())
            .args(["lease", "--cgroup", vm2.path(), "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    })
    .unwrap();
    let leased = lease["port"].as_u64().unwrap() as u16;
    let held = first + 5;
    let mut c = ns.command(env!("CARGO_BIN_EXE_pg-attack"));
    c.args(["--cgroup", vm1.abs().to_str().unwrap()])
        .args(["hold-port", "0.0.0.0", &held.to_string(), "600"])
        .stdout(Stdio::piped());
    let mut holder = Killed(c.spawn().unwrap());
    let mut line = String::new();
    let mut out = holder.0.stdout.take().unwrap();
    let mut b = [0u8; 1];
    while !line.ends_with('\n') && out.read(&mut b).unwrap() == 1 {
        line.push(b[0] as char);
    }
    assert!(line.contains("\"ready\""), "{line}");
    let refusals = |n: usize| {
        ns.run(|| {
            for _ in 0..n {
                let e = expected_errno();
                assert_eq!(
                    bind_in(&f.outsider, &BindSpec::tcp(ANY4, first + 7)),
                    Err(e)
                );
                assert_eq!(bind_in(&f.outsider, &BindSpec::tcp(ANY4, leased)), Err(e));
                assert_eq!(bind_in(&vm1, &BindSpec::tcp(ANY4, first + 8)), Err(e));
                assert_eq!(bind_in(&vm2, &BindSpec::tcp(ANY4, leased)), Ok(()));
            }
        })
    };
    refusals(3);
    let status = status_json(f.pin.path());
    println!("status: {status}");

    // Every rule evaluates with no error; every panel has data, for the host and for All.
    std::thread::sleep(Duration::from_secs(4));
    assert_every_rule_evaluates(&prom);
    assert_every_panel_has_data(&prom, Some(HOST));
    assert_every_panel_has_data(&prom, None);
    let reasons = prom
        .query(&panel_query("Refusals by reason", 0))
        .unwrap()
        .iter()
        .filter(|s| s["value"][1].as_str().unwrap().parse::<f64>().unwrap() > 0.0)
        .map(|s| s["metric"]["reason"].as_str().unwrap().to_owned())
        .collect::<BTreeSet<_>>();
    assert_eq!(
        reasons,
        ["leased", "limit", "not_allowed"].map(String::from).into(),
        "refusals by reason"
    );
    assert_eq!(prom.value(&panel_query("Guard attached", 0)), 1.0);
    assert_eq!(prom.value(&panel_query("Daemon up", 0)), 1.0);
    assert_eq!(
        prom.value(&panel_query("VMs at their per-child limit now", 0)),
        1.0
    );
    assert_eq!(prom.value(&panel_query("Leased ports now", 0)), 1.0);
    // The VM at its limit: pending under the shipped rules (5 minutes), firing in the copy.
    prom.wait_alert(
        GROUP,
        "PortGuardUnitAtLimit",
        "pending",
        Duration::from_secs(20),
    );
    prom.wait_alert(
        SHORT_GROUP,
        "PortGuardUnitAtLimit",
        "firing",
        Duration::from_secs(20),
    );
    for group in [GROUP, SHORT_GROUP] {
        assert_eq!(prom.alert(group, "PortGuardDown").0, "inactive");
        assert_eq!(prom.alert(group, "PortGuardNotAttached").0, "inactive");
    }

    // kill -9, with nothing else that shows the guard: PortGuardDown.
    daemon.kill9();
    let killed = Instant::now();
    let pending = prom.wait_alert(GROUP, "PortGuardDown", "pending", Duration::from_secs(30));
    prom.wait_alert(
        SHORT_GROUP,
        "PortGuardDown",
        "firing",
        Duration::from_secs(30),
    );
    println!(
        "after kill -9: PortGuardDown pending after {:.1} s (shipped rules), firing after {:.1} s (for: {SHORT_FOR})",
        pending.as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );
    let (_, labels) = prom.alert(GROUP, "PortGuardDown");
    assert_eq!(labels.len(), 1, "{labels:?}");
    assert_eq!(labels[0]["host"], HOST, "{labels:?}");

    // Started again, it adopts the pins; PortGuardDown ends.
    daemon = start_daemon(&ns, &f);
    prom.wait_alert(
        SHORT_GROUP,
        "PortGuardDown",
        "inactive",
        Duration::from_secs(30),
    );
    if node_exporter.is_none() {
        return;
    }

    // The timer's textfile beside the endpoint: one value per host, one alert per host.
    let _timer = Timer::start(&ns, &f.pin, &f.config, &textfile, Duration::from_secs(2));
    let sources = panel_query("Where each host's metrics come from", 0);
    wait_until(Duration::from_secs(30), || {
        (prom.query(&sources).unwrap().len() == 2).then_some(())
    })
    .unwrap_or_else(|| panic!("both sources: {:?}", prom.query(&sources)));
    let text = std::fs::read_to_string(&textfile).unwrap();
    assert!(text.contains("port_guard_attached 1"), "{text}");
    std::thread::sleep(Duration::from_secs(3));
    refusals(1);
    std::thread::sleep(Duration::from_secs(3));
    assert_every_rule_evaluates(&prom);
    assert_every_panel_has_data(&prom, Some(HOST));
    assert_eq!(
        prom.value(&panel_query("Leased ports now", 0)),
        1.0,
        "one lease, two sources"
    );
    assert_eq!(
        prom.value(&panel_query("VMs at their per-child limit now", 0)),
        1.0
    );
    assert_eq!(
        prom.query(&panel_query("Refused binds by host", 0))
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        prom.query("count by (job) (port_guard_units_at_limit)")
            .unwrap()
            .len(),
        2,
        "the limit is seen through both sources"
    );
    let (_, at_limit) = prom.alert(SHORT_GROUP, "PortGuardUnitAtLimit");
    assert_eq!(
        at_limit.len(),
        1,
        "one alert for a host seen twice: {at_limit:?}"
    );

    // kill -9 with the textfile: not blind. The guard stays on the dashboard, the daemon is
    // said to be down, PortGuardDaemonDown warns, PortGuardDown says nothing.
    daemon.kill9();
    let killed = Instant::now();
    let pending = prom.wait_alert(
        GROUP,
        "PortGuardDaemonDown",
        "pending",
        Duration::from_secs(30),
    );
    prom.wait_alert(
        SHORT_GROUP,
        "PortGuardDaemonDown",
        "firing",
        Duration::from_secs(30),
    );
    println!(
        "after kill -9 with the textfile: PortGuardDaemonDown pending after {:.1} s, firing (for: {SHORT_FOR}) after {:.1} s",
        pending.as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );
    let (_, labels) = prom.alert(GROUP, "PortGuardDaemonDown");
    assert_eq!(labels.len(), 1, "{labels:?}");
    assert_eq!(labels[0]["severity"], "warning");
    // Well past the short `for:`: still no PortGuardDown, in either group.
    std::thread::sleep(Duration::from_secs(5));
    for group in [GROUP, SHORT_GROUP] {
        assert_eq!(prom.alert(group, "PortGuardDown").0, "inactive", "{group}");
        assert_eq!(
            prom.alert(group, "PortGuardNotAttached").0,
            "inactive",
            "{group}"
        );
    }
    assert_eq!(prom.value(&panel_query("Guard attached", 0)), 1.0);
    assert_eq!(prom.value(&panel_query("Daemon up", 0)), 0.0);
    assert_eq!(prom.query(&sources).unwrap().len(), 1, "the textfile alone");
    refusals(1);
    std::thread::sleep(Duration::from_secs(3));
    assert_every_rule_evaluates(&prom);
    assert_every_panel_has_data(&prom, Some(HOST));
    let refused = prom.value(&panel_query("Refused binds by host", 0));
    assert!(
        refused > 0.0,
        "refusals while the daemon is down: {refused}"
    );
    drop(holder);
    assert!(server.running(), "prometheus ran throughout");
}
