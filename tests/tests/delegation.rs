//! A logged-in user against the daemon: every login session on a systemd host owns a delegated
//! cgroup subtree (`user@UID.service` is `Delegate=yes`), where it may make as many cgroups, as
//! deep and with names as long as it likes. Each attack runs as `nobody` in such a subtree (the
//! test chowns its directory and `cgroup.procs`, `cgroup.subtree_control` and `cgroup.threads`
//! to nobody, as systemd does), and the daemon runs where the attack depends on it with the
//! capabilities a unit gives it.
//!
//! - a chain of cgroups longer than PATH_MAX cannot blind the reaper: VMs that end are reaped,
//!   and other cgroups are named right;
//! - thousands of idle cgroups and new ones every second cost the daemon little CPU;
//! - 600 flooding cgroups of one user hide no single refusal of anyone else;
//! - idle connections cannot keep a scrape of the metrics out;
//! - the sentinel port taken before the daemon first started: another port, EADDRINUSE kept;
//! - `check` prints what processes chose (comm) escaped, and tells sentinels by cookie, not by
//!   name;
//! - a refusal from a thread in a netns of its own is named by that netns;
//! - short-lived cgroups with long names do not grow the daemon's memory.
//!
//! Ports 64500-64599.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use integration_tests::*;
use serde_json::Value;

const NOBODY: u32 = 65534;
const ATTACK: &str = env!("CARGO_BIN_EXE_pg-attack");

/// Gives `cg` to `uid` the way systemd delegates a subtree.
fn delegate(cg: &Cgroup, uid: u32) {
    for f in [
        "",
        "cgroup.procs",
        "cgroup.subtree_control",
        "cgroup.threads",
    ] {
        let p = if f.is_empty() {
            cg.abs().to_owned()
        } else {
            cg.abs().join(f)
        };
        std::os::unix::fs::chown(&p, Some(uid), Some(uid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
    }
}

/// `pg-attack ARGS` as `uid` (None: root), from the cgroup `cg` when given.
fn attack(uid: Option<u32>, cg: Option<&Cgroup>, args: &[&str]) -> Value {
    let mut c = Command::new(ATTACK);
    if let Some(cg) = cg {
        c.arg("--cgroup").arg(cg.abs());
    }
    if let Some(uid) = uid {
        c.args(["--uid", &uid.to_string()]);
    }
    let out = c.args(args).current_dir("/").output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "pg-attack {args:?}: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A chain of nested cgroups below `top`, longer than PATH_MAX, made by nobody; removed on drop
/// (deepest first, through directory fds: the test harness's cleanup goes by path).
struct Chain<'a> {
    top: &'a Cgroup,
    levels: usize,
    namelen: usize,
}

impl<'a> Chain<'a> {
    fn new(
        top: &'a Cgroup,
        levels: usize,
        namelen: usize,
        bind: Option<u16>,
    ) -> (Chain<'a>, Value) {
        let (l, n) = (levels.to_string(), namelen.to_string());
        let dir = top.abs().to_str().unwrap().to_owned();
        let port = bind.map(|p| p.to_string());
        let mut args = vec!["chain", dir.as_str(), &l, &n];
        if let Some(p) = &port {
            args.push(p);
        }
        let v = attack(Some(NOBODY), Some(top), &args);
        (
            Chain {
                top,
                levels,
                namelen,
            },
            v,
        )
    }
}

impl Drop for Chain<'_> {
    fn drop(&mut self) {
        let dir = self.top.abs().to_str().unwrap().to_owned();
        let _ = Command::new(ATTACK)
            .args([
                "unchain",
                &dir,
                &self.levels.to_string(),
                &self.namelen.to_string(),
            ])
            .output();
    }
}

/// The unit's capability bounding set (contrib/port-guard.service), without what `drop` names.
fn unit_caps_without(drop: &[&str]) -> String {
    let unit = fs::read_to_string(workspace_file("contrib/port-guard.service")).unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit names its capabilities");
    let caps: Vec<String> = line
        .split_whitespace()
        .filter(|c| !drop.contains(c))
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    format!("-all,{}", caps.join(","))
}

/// A daemon run under a capability bounding set (`setpriv`), as systemd runs the unit.
fn start_with_caps(f: &Fixture, range: &str, bset: &str, extra: &[&str]) -> Daemon {
    let mut args = f.args(Some(range), extra);
    args.push("--no-protect-ephemeral".into());
    let inner = f.daemon_cmd(f.pin.path(), &args);
    let mut c = Command::new("setpriv");
    c.arg(format!("--bounding-set={bset}"))
        .arg("--inh-caps=-all")
        .arg("--")
        .arg(inner.get_program())
        .args(inner.get_args());
    let d = Daemon::spawn(c);
    d.wait_for("guard enforcing", START_TIMEOUT);
    d
}

/// The daemon's CPU time so far (user + system), in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the comm.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn rss_kib(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// `spawn -- /bin/true` `n` times: each VM's lease ends with it.
fn spawn_vms_that_exit(f: &Fixture, n: usize) {
    for i in 0..n {
        let out = Command::new(bin())
            .args(["--pin-dir", f.pin.as_str(), "spawn", "--", "/bin/true"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "VM {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn leases(f: &Fixture) -> usize {
    status_json(f.pin.path())["leases"]
        .as_array()
        .unwrap()
        .len()
}

/// The PATH_MAX chain, then 64 VMs exit: with the unit's capabilities (file handles), and
/// without CAP_DAC_READ_SEARCH (the tree is walked instead).
#[test]
fn a_chain_longer_than_path_max_keeps_no_dead_vm_port_and_blinds_no_name() {
    for (what, bset) in [
        ("the unit's capabilities", unit_caps_without(&[])),
        (
            "without CAP_DAC_READ_SEARCH",
            unit_caps_without(&["CAP_DAC_READ_SEARCH"]),
        ),
    ] {
        let f = Fixture::new("pathmax");
        let user = f.attach.child("user-65534");
        delegate(&user, NOBODY);
        // 17 levels of names as long as makes the chain's path 4,086 bytes below the mount (a
        // valid cgroup path, at most 4,096 bytes) and longer than PATH_MAX with the mount
        // before it: open() and stat() of it fail with ENAMETOOLONG.
        let namelen = (4086 - user.path().len()) / 17 - 1;
        let (chain, made) = Chain::new(&user, 17, namelen, Some(64500));
        let rel = user.path().len() + 17 * (namelen + 1);
        assert!(
            rel <= 4096 && cgroup2_mount().as_os_str().len() + rel >= 4096,
            "{rel} bytes below the mount: {made}"
        );
        let d = start_with_caps(&f, "64500-64563", &bset, &[]);
        // A refusal from the deepest cgroup of the chain, now that the daemon runs: naming it
        // meets ENAMETOOLONG.
        let (_same_chain, again) = Chain::new(&user, 17, namelen, Some(64501));
        assert_ne!(again["bind"], 0, "{again}");
        // Its line is out (whatever it names) before the VMs come, and the daemon had a tick.
        d.wait_for("port=64501/tcp", LOG_TIMEOUT);
        let t = Instant::now();
        spawn_vms_that_exit(&f, 64);
        let reaped = wait_until(Duration::from_secs(20), || (leases(&f) == 0).then_some(()));
        assert!(
            reaped.is_some(),
            "{what}: {} of 64 ended VMs still hold their port after {:?}",
            leases(&f),
            t.elapsed()
        );
        eprintln!(
            "[measure] {what}: 64 ended VMs reaped within {:?} of the first spawn, a {}-byte cgroup path in the tree",
            t.elapsed(),
            made["bytes"]
        );
        // The range is whole again: a new VM gets a port.
        spawn_vms_that_exit(&f, 1);
        // Another cgroup's refusal is named right.
        let skip = d.line_count();
        assert_eq!(
            bind_in(
                f.outsider.abs(),
                &BindSpec::tcp(ANY4, 64560).comm("pg-other")
            ),
            Err(expected_errno())
        );
        let line = d.wait_for_after(skip, "comm=pg-other", LOG_TIMEOUT);
        let named = format!("cgroup={} ", f.outsider.path());
        if !line.contains(&named) {
            // Without file handles a line does not wait for the walk: it says the id, and the
            // name follows as soon as the background walk found it.
            let id = line
                .split("cgroup_id=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or_else(|| panic!("{what}: neither a name nor an id: {line}"));
            let later = d.wait_for_after(skip, &format!("cgroup_id={id} is "), LOG_TIMEOUT);
            assert!(
                later.ends_with(&format!(" is {}", f.outsider.path())),
                "{what}: {later}"
            );
        }
        drop(_same_chain);
        drop(chain);
    }
}

#[test]
fn thousands_of_a_users_cgroups_cost_the_daemon_little_cpu() {
    let f = Fixture::new("cgcpu");
    let user = f.attach.child("user-65534");
    delegate(&user, NOBODY);
    // 3,000 idle cgroups of the user.
    for i in 0..3000 {
        fs::create_dir(user.abs().join(format!("idle{i}"))).unwrap();
    }
    let bset = unit_caps_without(&["CAP_DAC_READ_SEARCH"]);
    let d = start_with_caps(&f, "64510-64519", &bset, &[]);
    thread::sleep(Duration::from_secs(2));
    // 150 new cgroups a second for 30 s, each with one refused bind from it, as nobody.
    let before = cpu_ticks(d.pid());
    let t = Instant::now();
    let mut made = 0;
    for second in 0..30 {
        let batch = user.child(&format!("b{second}"));
        delegate(&batch, NOBODY);
        for i in 0..150 {
            let c = batch.child(&i.to_string());
            delegate(&c, NOBODY);
        }
        // Started in the user's own subtree (as a login session's processes are), nobody may
        // move between its cgroups.
        let v = attack(
            Some(NOBODY),
            Some(&user),
            &[
                "hop-flood",
                batch.abs().to_str().unwrap(),
                "150",
                "0.0.0.0",
                "64510",
            ],
        );
        assert_eq!(v["ok"], 0, "{v}");
        made += 150;
        let next = Duration::from_secs(second + 1);
        if let Some(wait) = next.checked_sub(t.elapsed()) {
            thread::sleep(wait);
        }
    }
    let spent = cpu_ticks(d.pid()) - before;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let share = spent as f64 / hz / t.elapsed().as_secs_f64();
    eprintln!(
        "[measure] daemon CPU over {:?} with 3,000 idle cgroups and {made} new ones with a refused bind each: {:.1} % of a core",
        t.elapsed(),
        share * 100.0
    );
    assert!(
        share <= 0.05,
        "the daemon used {:.1} % of a core",
        share * 100.0
    );
    // Making cgroups bought no lines: the user's refusals are summarised by uid.
    let lines = d
        .lines()
        .iter()
        .filter(|l| l.contains("denied bind") && l.contains("uid=65534"))
        .count();
    assert!(lines <= 4 + 2 * 35, "{lines} lines for {made} refusals");
    assert!(d
        .wait_for("more denials by uid=65534", LOG_TIMEOUT)
        .contains("cgroup1="));
}

#[test]
fn six_hundred_flooding_cgroups_of_one_user_hide_no_other_refusal() {
    let f = Fixture::new("cgflood");
    let user = f.attach.child("user-65534");
    delegate(&user, NOBODY);
    for i in 0..600 {
        let c = user.child(&i.to_string());
        delegate(&c, NOBODY);
    }
    let other_user = f.attach.child("user-65533");
    delegate(&other_user, 65533);
    let d = f.start("64520-64529", &[]);
    let flood = Command::new(ATTACK)
        .arg("--cgroup")
        .arg(user.abs())
        .args(["--uid", &NOBODY.to_string(), "many-flood"])
        .arg(user.abs())
        .args(["600", "0.0.0.0", "64520", "8"])
        .current_dir("/")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_secs(2));
    // Three single refusals elsewhere during the flood: two root services, another user.
    let svc1 = f.attach.child("svc1");
    let svc2 = f.attach.child("svc2");
    assert_eq!(
        bind_in(svc1.abs(), &BindSpec::tcp(ANY4, 64521).comm("pg-single1")),
        Err(expected_errno())
    );
    thread::sleep(Duration::from_millis(700));
    let v = attack(
        Some(65533),
        Some(&other_user),
        &["bind-flood", "0.0.0.0", "64522", "0.001"],
    );
    assert_eq!(v["ok"], 0, "{v}");
    assert!(v["binds"].as_u64().unwrap() > 0, "{v}");
    thread::sleep(Duration::from_millis(700));
    assert_eq!(
        bind_in(svc2.abs(), &BindSpec::tcp(ANY4, 64523).comm("pg-single3")),
        Err(expected_errno())
    );
    let out = flood.wait_with_output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let binds = v["binds"].as_u64().unwrap();
    assert!(binds >= 5000, "a flood: {v}");
    for needle in ["comm=pg-single1", "port=64522/tcp", "comm=pg-single3"] {
        let line = d.wait_for(needle, LOG_TIMEOUT);
        assert!(line.contains("denied bind"), "{line}");
    }
    let other = d.wait_for("port=64522/tcp", LOG_TIMEOUT);
    assert!(other.contains("uid=65533"), "{other}");
    eprintln!(
        "[measure] {binds} refused binds from 600 cgroups of nobody in 8 s; the three single refusals elsewhere each got a line"
    );
}

#[test]
fn idle_connections_cannot_keep_a_scrape_out() {
    let f = Fixture::new("scrape");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let d = f.start("64530-64539", &["--metrics-listen", &addr]);
    let a2 = addr.clone();
    let attack = thread::spawn(move || {
        Command::new(ATTACK)
            .args(["--uid", "65534", "hold-connections", &a2, "300", "12"])
            .current_dir("/")
            .output()
            .unwrap()
    });
    thread::sleep(Duration::from_secs(3));
    let mut worst = Duration::ZERO;
    for _ in 0..3 {
        let t = Instant::now();
        let body = scrape_within(&addr, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("a scrape during the attack: {e}"));
        worst = worst.max(t.elapsed());
        assert!(body.contains("port_guard_attached 1"), "{body}");
        thread::sleep(Duration::from_secs(1));
    }
    let out = attack.join().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["max_open"].as_u64().unwrap() >= 100,
        "the attack ran: {v}"
    );
    let evicted = scrape_within(&addr, Duration::from_secs(2)).unwrap();
    eprintln!(
        "[measure] 300 idle connections: 3 scrapes answered, the slowest in {worst:?}; {}",
        evicted
            .lines()
            .find(|l| l.starts_with("port_guard_metrics_connections_evicted_total"))
            .unwrap_or("")
    );
    assert!(d.lines().iter().all(|l| !l.contains("ERROR")));
}

/// GET /metrics with a deadline for the whole answer.
fn scrape_within(addr: &str, limit: Duration) -> Result<String, String> {
    use std::io::{Read as _, Write as _};
    let t = Instant::now();
    let mut s = std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), limit)
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(limit)).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("{e} after {:?}", t.elapsed()))?;
    if t.elapsed() > limit || !out.starts_with("HTTP/1.1 200") {
        return Err(format!("{:?}: {out:.80}", t.elapsed()));
    }
    Ok(out)
}

/// Holds the configured sentinel port before the daemon first starts, as nobody.
struct Squatter(Child);

impl Squatter {
    fn new(port: u16, comm: &str) -> Squatter {
        let mut c = Command::new(ATTACK)
            .args(["--uid", "65534", "--comm", comm, "hold-port", "::"])
            .args([port.to_string(), "600".to_string()])
            .current_dir("/")
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(c.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("ready"), "{line}");
        Squatter(c)
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_sentinel_port_taken_before_the_daemon_started_is_replaced_and_eaddrinuse_kept() {
    let f = Fixture::new("presquat");
    let squat = Squatter::new(64549, "port-guard");
    let mut cmd = f.daemon_cmd(
        f.pin.path(),
        &f.args(
            Some("64550-64559/tcp+udp"),
            &["--no-protect-ephemeral", "--sentinel-port", "64549"],
        ),
    );
    if kernel_features().set_retval {
        // The sentinel is what kernels before 6.1 need; forced here to be tested on this one.
        cmd.env("PORT_GUARD_SENTINEL", "force");
    }
    let d = Daemon::spawn(cmd);
    d.wait_for("guard enforcing", START_TIMEOUT);
    let line = d.wait_for("took port", LOG_TIMEOUT);
    assert!(line.contains("64549") && line.contains("64548"), "{line}");
    // Refused binds keep getting EADDRINUSE: through port 64548 now.
    for spec in [BindSpec::tcp(ANY4, 64550), BindSpec::udp(ANY6, 64551)] {
        assert_eq!(
            bind_in(f.outsider.abs(), &spec),
            Err(libc::EADDRINUSE),
            "{spec:?}"
        );
    }
    // Nobody else may take the port that stands in for it.
    assert_eq!(
        bind_in(f.outsider.abs(), &BindSpec::tcp(ANY4, 64548)),
        Err(libc::EADDRINUSE)
    );
    let st = status_json(f.pin.path());
    assert_eq!(st["sentinel"]["ports"][0]["port"], 64548, "{st:#}");
    // check tells the squatter from the sentinel by socket cookie, not by its name.
    let out = Command::new(bin())
        .args(["--pin-dir", f.pin.as_str(), "--config"])
        .arg(&f.config)
        .arg("check")
        .env("PORT_GUARD_SENTINEL", "force")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let item = text
        .lines()
        .find(|l| l.contains("sentinel"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        item.starts_with("WARN") && item.contains("by pid") && item.contains("(port-guard)"),
        "{item}"
    );
    assert!(item.contains("holds port 64548 in its place"), "{item}");
    drop(squat);
}

#[test]
fn check_escapes_what_a_process_chose_and_tells_sentinels_by_cookie() {
    let f = Fixture::new("checkesc");
    // A process holding a reserved port, whose comm would erase the line above it.
    let evil = "\u{1b}[1A\u{1b}[2K\rok";
    let holder = Squatter::new(64570, evil);
    fs::write(
        &f.config,
        format!(
            "attach = \"{}\"\n[[reserve]]\nports = \"64570-64579\"\n",
            f.attach.path()
        ),
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["--pin-dir", f.pin.as_str(), "--config"])
        .arg(&f.config)
        .arg("check")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains('\u{1b}'),
        "a raw escape reached the terminal: {text:?}"
    );
    assert!(text.contains("\\u{1b}[1A"), "{text}");
    let json = Command::new(bin())
        .args(["--pin-dir", f.pin.as_str(), "--config"])
        .arg(&f.config)
        .args(["check", "--json"])
        .output()
        .unwrap();
    assert!(!json.stdout.contains(&0x1b), "raw escape in JSON");
    let v: Value = serde_json::from_slice(&json.stdout).unwrap();
    let s = v["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["port"] == 64570)
        .unwrap_or_else(|| panic!("{v:#}"));
    assert_eq!(
        s["command"], evil,
        "JSON keeps the name, escaped by JSON itself"
    );
    drop(holder);
    // A squatter of the sentinel port named port-guard, no daemon running: a squatter.
    let _squat = Squatter::new(64569, "port-guard");
    let mut c = Command::new(bin());
    c.args(["--pin-dir", f.pin.as_str(), "--config"])
        .arg(&f.config)
        .args(["check"]);
    fs::write(
        &f.config,
        format!(
            "attach = \"{}\"\nsentinel_port = 64569\n[[reserve]]\nports = \"64570-64579\"\n",
            f.attach.path()
        ),
    )
    .unwrap();
    c.env("PORT_GUARD_SENTINEL", "force");
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let item = text
        .lines()
        .find(|l| l.contains("sentinel"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        item.starts_with("WARN") && item.contains("by pid"),
        "a process named port-guard is not the daemon's sentinel: {item}"
    );
}

#[test]
fn a_refusal_from_a_thread_in_its_own_netns_is_named_by_that_netns() {
    let f = Fixture::new("threadns");
    let d = f.start("64580-64589", &["--netns", "all"]);
    let skip = d.line_count();
    let v = attack(
        None,
        Some(&f.outsider),
        &["thread-netns-bind", "0.0.0.0", "64580"],
    );
    assert_eq!(v["bind"], expected_errno_without_sentinel(), "{v}");
    let line = d.wait_for_after(skip, "port=64580/tcp", LOG_TIMEOUT);
    assert!(
        line.contains("netns=cookie:") && !line.contains("netns=host"),
        "the thread's netns, not its process's: {line}"
    );
}

#[test]
fn short_lived_cgroups_with_long_names_do_not_grow_the_daemon() {
    let f = Fixture::new("cgrss");
    // A base 14 levels deep of 240-byte names: each cgroup below it has a path of ~3.4 KiB.
    let mut base = f.attach.child("b");
    let name = "n".repeat(240);
    for _ in 0..14 {
        base = base.child(&name);
    }
    assert!(base.path().len() > 3300, "{}", base.path().len());
    let d = f.start("64590-64599", &[]);
    let rss0 = rss_kib(d.pid());
    let t = Instant::now();
    for i in 0..10_000 {
        let c = base.abs().join(format!("x{i}"));
        fs::create_dir(&c).unwrap();
        // Root's cgroups are budgeted one by one: each one's refusal gets a line, and a name.
        let _ = bind_in(&c, &BindSpec::tcp(ANY4, 64590));
        fs::remove_dir(&c).unwrap();
    }
    thread::sleep(Duration::from_secs(6));
    let rss1 = rss_kib(d.pid());
    eprintln!(
        "[measure] 10,000 short-lived cgroups with 3.4 KiB paths in {:?}: daemon RSS {rss0} KiB -> {rss1} KiB",
        t.elapsed()
    );
    assert!(
        rss1 <= rss0 + 8 * 1024,
        "RSS grew from {rss0} KiB to {rss1} KiB"
    );
}
