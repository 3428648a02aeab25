//! Bad input and runtime failures of `port-guard daemon`.
//!
//! For every case: the exit status (2 for usage/config errors, 1 for runtime failures), stderr
//! is exactly one non-empty line that names the bad value, and nothing is left behind: the pin
//! dir does not exist afterwards and (when bpftool is installed) no program is attached to the
//! test's cgroup.
//!
//! Usage/config cases: `--reserve 0`, `70000`, `5000-4000`, overlapping ranges, `61500/sctp`,
//! `--errno enoent`, `--mode block`, `--allow /a/../b`, `--allow` of a cgroup 16 levels deep,
//! `--attach` of a missing cgroup, an
//! explicit `--config` that does not exist, and config files with an unknown key or
//! `ports = "0"`.
//! Runtime cases: no cgroup2 mount (the binary runs in a private mount namespace where the
//! cgroup2 mount was lazily unmounted) and no permission to load BPF (run as `nobody`).
//!
//! A daemon that wrongly accepts the input would keep running: every invocation is killed after
//! a timeout and the test fails. `--attach` always points at the test's own cgroup (never the
//! host root) so such a daemon could not disturb the machine.

use std::{os::unix::process::CommandExt, process::Command, time::Duration};

use integration_tests::*;

/// A failing daemon must give up quickly.
const FAIL_TIMEOUT: Duration = Duration::from_secs(30);

/// One case's own cgroup, pin dir and temp dir. Field order is drop order: pins are unloaded
/// before the cgroup is removed.
struct Case {
    pin: PinDir,
    tmp: TempDir,
    cg: TestCgroup,
}

impl Case {
    fn new(name: &str) -> Case {
        let name = format!("cli-{name}");
        Case {
            cg: TestCgroup::new(&name),
            pin: PinDir::new(&name),
            tmp: TempDir::new(&name),
        }
    }

    fn config(&self, contents: &str) -> String {
        self.tmp
            .write("config.toml", contents)
            .to_str()
            .unwrap()
            .to_string()
    }

    /// `port-guard --pin-dir PIN --config CONFIG daemon ARGS...` as root.
    fn daemon_cmd(&self, config: &str, args: &[String]) -> Command {
        let mut cmd = Command::new(bin());
        cmd.arg("--pin-dir")
            .arg(self.pin.path())
            .arg("--config")
            .arg(config)
            .arg("daemon")
            .args(args);
        cmd
    }

    /// Runs `cmd`, then checks the exit code, that stderr is one line naming one of `bad` (as a
    /// token, or with `case_insensitive` as a substring in any case), and that nothing is left.
    #[track_caller]
    fn check(&self, cmd: Command, code: i32, bad: &[&str], case_insensitive: bool) -> String {
        let desc = format!("{cmd:?}");
        let (got, out, err) = match run_cmd_timeout(cmd, FAIL_TIMEOUT) {
            Ok(r) => r,
            Err(e) => panic!("{e} (the bad input was accepted?)"),
        };
        eprintln!(
            "[cli] {desc}\n  -> exit {got}\n  stdout: {}\n  stderr: {}",
            out.trim_end(),
            err.trim_end()
        );
        assert_eq!(got, code, "exit status of {desc}; stderr:\n{err}");
        let line = single_line(&err);
        let named = bad.iter().any(|b| {
            if case_insensitive {
                line.to_lowercase().contains(&b.to_lowercase())
            } else {
                contains_token(line, b)
            }
        });
        assert!(named, "stderr line {line:?} does not name any of {bad:?}");
        assert!(
            !self.pin.exists(),
            "pin dir {} left behind by {desc}",
            self.pin.path().display()
        );
        assert_nothing_attached(&self.cg);
        line.to_string()
    }

    /// A usage/config error: exit 2, the line names `bad`.
    #[track_caller]
    fn usage(&self, config: &str, args: &[String], bad: &[&str]) -> String {
        let cmd = self.daemon_cmd(config, args);
        self.check(cmd, 2, bad, false)
    }
}

/// `--spawn-parent` inside the case's cgroup, so no failing daemon creates the default
/// `/port-guard` at the cgroup2 root.
fn spawn_parent(c: &Case) -> Vec<String> {
    vec![
        "--spawn-parent".to_string(),
        format!("{}/spawn", c.cg.path()),
    ]
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

const OK_CONFIG: &str = "mode = \"enforce\"\n";

/// `--attach <case cgroup> --spawn-parent <case cgroup>/spawn` plus `extra`.
fn attach_args(c: &Case, extra: &[&str]) -> Vec<String> {
    let mut v = s(&["--attach", c.cg.path()]);
    v.extend(spawn_parent(c));
    v.extend(s(extra));
    v
}

#[test]
fn reserve_zero_is_rejected() {
    let c = Case::new("reserve-zero");
    let cfg = c.config(OK_CONFIG);
    c.usage(&cfg, &attach_args(&c, &["--reserve", "0"]), &["0"]);
}

#[test]
fn reserve_above_65535_is_rejected() {
    let c = Case::new("reserve-70000");
    let cfg = c.config(OK_CONFIG);
    c.usage(&cfg, &attach_args(&c, &["--reserve", "70000"]), &["70000"]);
}

#[test]
fn reserve_reversed_range_is_rejected() {
    let c = Case::new("reserve-reversed");
    let cfg = c.config(OK_CONFIG);
    c.usage(
        &cfg,
        &attach_args(&c, &["--reserve", "5000-4000"]),
        &["5000-4000"],
    );
}

#[test]
fn overlapping_ranges_are_rejected() {
    let c = Case::new("reserve-overlap");
    let cfg = c.config(OK_CONFIG);
    c.usage(
        &cfg,
        &attach_args(
            &c,
            &["--reserve", "61500-61510", "--reserve", "61505-61520"],
        ),
        &["61505-61520", "61500-61510"],
    );
}

#[test]
fn unknown_protocol_is_rejected() {
    let c = Case::new("reserve-sctp");
    let cfg = c.config(OK_CONFIG);
    c.usage(
        &cfg,
        &attach_args(&c, &["--reserve", "61500/sctp"]),
        &["sctp"],
    );
}

#[test]
fn unknown_errno_is_rejected() {
    let c = Case::new("errno-enoent");
    let cfg = c.config(OK_CONFIG);
    c.usage(
        &cfg,
        &attach_args(&c, &["--reserve", "61540-61549", "--errno", "enoent"]),
        &["enoent"],
    );
}

#[test]
fn unknown_mode_is_rejected() {
    let c = Case::new("mode-block");
    let cfg = c.config(OK_CONFIG);
    c.usage(
        &cfg,
        &attach_args(&c, &["--reserve", "61560-61569", "--mode", "block"]),
        &["block"],
    );
}

#[test]
fn cgroup_path_with_dotdot_is_rejected() {
    let c = Case::new("allow-dotdot");
    let cfg = c.config(OK_CONFIG);
    c.usage(
        &cfg,
        &attach_args(&c, &["--reserve", "61580-61589", "--allow", "/a/../b"]),
        &["/a/../b"],
    );
}

#[test]
fn an_allowed_cgroup_deeper_than_the_walk_is_rejected() {
    // Level 16: one deeper than the programs' walk of allowed cgroups reaches. It need not
    // exist: an allowed cgroup may appear later, and its depth is in its path.
    let c = Case::new("allow-deep");
    let cfg = c.config(OK_CONFIG);
    let deep: String = (1..=16).map(|i| format!("/l{i}")).collect();
    c.usage(
        &cfg,
        &attach_args(&c, &["--reserve", "61590-61599", "--allow", &deep]),
        &[&deep, "level 15"],
    );
}

#[test]
fn missing_attach_cgroup_is_rejected() {
    let c = Case::new("attach-missing");
    let cfg = c.config(OK_CONFIG);
    let missing = format!("/does-not-exist-{}", std::process::id());
    assert!(!cgroup2_mount().join(&missing[1..]).exists());
    let mut args = s(&["--attach", &missing, "--reserve", "61600-61609"]);
    args.extend(spawn_parent(&c));
    c.usage(&cfg, &args, &[&missing]);
}

#[test]
fn missing_explicit_config_file_is_rejected() {
    let c = Case::new("config-missing");
    let cfg = c.tmp.path().join("no-such-config.toml");
    let cfg = cfg.to_str().unwrap();
    c.usage(cfg, &attach_args(&c, &["--reserve", "61620-61629"]), &[cfg]);
}

#[test]
fn config_with_unknown_key_is_rejected() {
    let c = Case::new("config-colour");
    let cfg = c.config("mode = \"enforce\"\ncolour = \"red\"\n");
    c.usage(&cfg, &attach_args(&c, &[]), &["colour"]);
}

#[test]
fn config_with_port_zero_is_rejected() {
    let c = Case::new("config-port-zero");
    let cfg = c.config(
        "mode = \"enforce\"\n\n[[reserve]]\nports = \"0\"\nprotocols = [\"tcp\"]\nallow = []\n",
    );
    c.usage(&cfg, &attach_args(&c, &[]), &["0"]);
}

#[test]
fn no_cgroup2_mount_is_a_runtime_error() {
    let c = Case::new("no-cgroup2");
    let cfg = c.config(OK_CONFIG);
    let mount = cgroup2_mount();
    // In a private mount namespace, lazily unmount cgroup2, then exec the agent. No --attach:
    // the default "/" cannot be resolved without the mount.
    let mut cmd = Command::new("unshare");
    cmd.env("PG_TEST_CGROUP2_MOUNT", &mount)
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"umount -l "$PG_TEST_CGROUP2_MOUNT" && exec "$0" "$@""#)
        .arg(bin())
        .arg("--pin-dir")
        .arg(c.pin.path())
        .arg("--config")
        .arg(&cfg)
        .args(["daemon", "--reserve", "61640-61649"])
        .args(spawn_parent(&c));
    c.check(cmd, 1, &["cgroup2"], true);
}

#[test]
fn no_permission_to_load_bpf_is_a_runtime_error() {
    let c = Case::new("nobody");
    let cfg = c.config(OK_CONFIG);
    let mut cmd = c.daemon_cmd(&cfg, &attach_args(&c, &["--reserve", "61660-61669"]));
    cmd.uid(65534).gid(65534).current_dir("/");
    c.check(cmd, 1, &["permission"], true);
}
