//! The TOML config file and the daemon's flags, merged into a [`Policy`]. Flags override the file;
//! `--reserve` replaces the file's ranges, and `--allow` applies to every range in effect.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    cgroup::{Cgroup2, CgroupError, CgroupPath},
    error::{ExitStatus, EXIT_USAGE},
    policy::{
        check_ranges, Errno, Mode, NetnsScope, Policy, PolicyError, PortRange, Protocols,
        Reservation, ReserveSpec, DEFAULT_RESERVE,
    },
};

/// Where the config comes from when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/port-guard/config.toml";
/// The default parent of the cgroups `spawn` creates.
pub const DEFAULT_SPAWN_PARENT: &str = "/port-guard";

/// A config problem (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// TOML syntax, an unknown key or a value of the wrong type.
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A bad value.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A bad value in the file, with where it is.
    #[error("config {path}")]
    PolicyIn {
        path: PathBuf,
        #[source]
        source: PolicyError,
    },
    /// A bad cgroup path.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// A bad metrics address or file.
    #[error("{0}")]
    Metrics(String),
    /// A cgroup the policy names twice for one range.
    #[error("{what} {path} is named twice")]
    Duplicate {
        what: &'static str,
        path: CgroupPath,
    },
}

/// A config error is the operator's to mend (exit status 2); a cgroup's error says for itself (a
/// bad or missing cgroup is 2, no cgroup2 mount or a failed syscall 1).
impl ExitStatus for ConfigError {
    fn exit_status(&self) -> u8 {
        match self {
            ConfigError::Cgroup(e) => e.exit_status(),
            _ => EXIT_USAGE,
        }
    }
}

/// The file, as written. Unknown keys are errors: a typo in a security policy must not pass.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfigFile {
    pub attach: Option<String>,
    pub mode: Option<String>,
    pub errno: Option<String>,
    pub protect_ephemeral: Option<bool>,
    pub allow_fallback: Option<bool>,
    pub spawn_parent: Option<String>,
    pub reserve: Option<Vec<ReserveEntry>>,
    /// `["host"]` (default), `["all"]`, or netns paths (with or without "host").
    pub netns: Option<Vec<String>>,
    /// The sentinel port (0: none); default [`crate::policy::default_sentinel_port`].
    pub sentinel_port: Option<u16>,
    /// Serve metrics here: `IP:PORT` or `unix:/PATH` (as `--metrics-listen`).
    pub metrics_listen: Option<String>,
    /// Write the metrics into this file every few seconds, for node_exporter's textfile
    /// collector (as `--metrics-textfile`).
    pub metrics_textfile: Option<PathBuf>,
}

/// A `[[reserve]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveEntry {
    /// `A-B` or `A`.
    pub ports: String,
    /// Defaults to `["tcp"]`.
    #[serde(default)]
    pub protocols: Option<Vec<String>>,
    #[serde(default)]
    pub allow: Vec<String>,
    /// The most sockets on ports of this range that one child of an allowed cgroup (one VM's
    /// scope, with everything below it) may hold at once. Absent: no limit.
    #[serde(default)]
    pub per_child_limit: Option<u32>,
}

impl ConfigFile {
    /// Reads `path`. A missing file is the defaults only when it is the default path; a config
    /// the operator named must exist.
    pub fn load(path: Option<&Path>) -> Result<(ConfigFile, Option<PathBuf>), ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_owned(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        match fs::read_to_string(&path) {
            Ok(text) => Ok((ConfigFile::parse(&path, &text)?, Some(path))),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !explicit => {
                Ok((ConfigFile::default(), None))
            }
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }

    pub fn parse(path: &Path, text: &str) -> Result<ConfigFile, ConfigError> {
        toml::from_str(text).map_err(|e| {
            // toml's Display spans several lines (a source excerpt): keep its message and name
            // the line it points at instead.
            let at = e
                .span()
                .map(|span| {
                    let start = span.start.min(text.len());
                    let line_no = text[..start].matches('\n').count() + 1;
                    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
                    format!(" at line {line_no} `{line}`")
                })
                .unwrap_or_default();
            ConfigError::Parse {
                path: path.to_owned(),
                // Some of toml's messages span lines themselves ("invalid table header\nexpected
                // ..."): one line, always.
                message: format!(
                    "{}{at}",
                    e.message()
                        .trim_end()
                        .lines()
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            }
        })
    }
}

/// The daemon flags that shape the policy (recorded by the daemon, so that `check --config`
/// merges a file with them as a reload would).
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Overrides {
    pub attach: Option<String>,
    pub reserve: Vec<String>,
    pub allow: Vec<String>,
    pub mode: Option<String>,
    pub errno: Option<String>,
    /// `--protect-ephemeral` (Some(true)) or `--no-protect-ephemeral` (Some(false)).
    pub protect_ephemeral: Option<bool>,
    pub allow_fallback: bool,
    pub spawn_parent: Option<String>,
    /// `--netns`, repeated: replaces the file's list.
    pub netns: Vec<String>,
    /// `--sentinel-port N` (0: none).
    pub sentinel_port: Option<u16>,
    /// `--per-child-limit N`: the limit of the ranges the flags give (`--reserve`, or the
    /// default range when neither the flags nor the file name one).
    pub per_child_limit: Option<u32>,
    /// `--metrics-listen`.
    pub metrics_listen: Option<String>,
    /// `--metrics-textfile`.
    pub metrics_textfile: Option<PathBuf>,
}

impl Overrides {
    /// The flags that set a key the file sets too (the flag wins), as `--flag (file: key)`.
    pub fn overriding(&self, file: &ConfigFile) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |flag: bool, in_file: bool, name: &str, key: &str| {
            if flag && in_file {
                out.push(format!("--{name} (file: {key})"));
            }
        };
        check(
            self.attach.is_some(),
            file.attach.is_some(),
            "attach",
            "attach",
        );
        check(
            !self.reserve.is_empty(),
            file.reserve.is_some(),
            "reserve",
            "[[reserve]]",
        );
        check(self.mode.is_some(), file.mode.is_some(), "mode", "mode");
        check(self.errno.is_some(), file.errno.is_some(), "errno", "errno");
        check(
            self.protect_ephemeral.is_some(),
            file.protect_ephemeral.is_some(),
            "protect-ephemeral",
            "protect_ephemeral",
        );
        check(
            self.allow_fallback,
            file.allow_fallback.is_some(),
            "allow-fallback",
            "allow_fallback",
        );
        check(
            self.spawn_parent.is_some(),
            file.spawn_parent.is_some(),
            "spawn-parent",
            "spawn_parent",
        );
        check(
            !self.netns.is_empty(),
            file.netns.is_some(),
            "netns",
            "netns",
        );
        check(
            self.sentinel_port.is_some(),
            file.sentinel_port.is_some(),
            "sentinel-port",
            "sentinel_port",
        );
        check(
            self.per_child_limit.is_some() && !self.reserve.is_empty(),
            file.reserve
                .as_ref()
                .is_some_and(|r| r.iter().any(|e| e.per_child_limit.is_some())),
            "per-child-limit",
            "per_child_limit",
        );
        check(
            self.metrics_listen.is_some(),
            file.metrics_listen.is_some(),
            "metrics-listen",
            "metrics_listen",
        );
        check(
            self.metrics_textfile.is_some(),
            file.metrics_textfile.is_some(),
            "metrics-textfile",
            "metrics_textfile",
        );
        out
    }
}

/// Merges the file and the flags into a policy, checking syntax only (no cgroup needs to exist).
pub fn build_policy(
    file: &ConfigFile,
    file_path: Option<&Path>,
    flags: &Overrides,
) -> Result<Policy, ConfigError> {
    let in_file = |source: PolicyError| match file_path {
        Some(path) => ConfigError::PolicyIn {
            path: path.to_owned(),
            source,
        },
        None => ConfigError::Policy(source),
    };
    // The file's values are checked even where a flag overrides them: a file that only works
    // with the flags would fail the day the daemon starts without them.
    if let Some(a) = &file.attach {
        a.parse::<CgroupPath>()?;
    }
    if let Some(p) = &file.spawn_parent {
        p.parse::<CgroupPath>()?;
    }
    let attach = cgroup(flags.attach.as_deref(), file.attach.as_deref(), "/")?;
    let mode = flag_or_file::<Mode>(flags.mode.as_deref(), file.mode.as_deref(), &in_file)?;
    let errno = flag_or_file::<Errno>(flags.errno.as_deref(), file.errno.as_deref(), &in_file)?;
    let spawn_parent = cgroup(
        flags.spawn_parent.as_deref(),
        file.spawn_parent.as_deref(),
        DEFAULT_SPAWN_PARENT,
    )?;
    let reserve = reserve(file, flags, &in_file)?;
    let netns = netns(file, flags, &in_file)?;
    let sentinel_port = sentinel_port(file, flags, &reserve, &in_file)?;
    Ok(Policy {
        netns,
        sentinel_port,
        attach,
        mode,
        errno,
        // On unless turned off: a refused process must not get a reserved port by letting the
        // kernel pick it.
        protect_ephemeral: flags
            .protect_ephemeral
            .or(file.protect_ephemeral)
            .unwrap_or(true),
        allow_fallback: flags.allow_fallback || file.allow_fallback.unwrap_or(false),
        spawn_parent,
        reserve,
    })
}

/// Names the config file in the error of a bad value it holds (when there is a file).
type InFile<'a> = &'a dyn Fn(PolicyError) -> ConfigError;

/// A cgroup the flag or the file names (the flag wins), else `default`.
fn cgroup(
    flag: Option<&str>,
    file: Option<&str>,
    default: &str,
) -> Result<CgroupPath, ConfigError> {
    Ok(flag.or(file).unwrap_or(default).parse()?)
}

/// A value the flag or the file gives (the flag wins), else the default; the file's is checked
/// even where the flag wins.
fn flag_or_file<T>(
    flag: Option<&str>,
    file: Option<&str>,
    in_file: InFile<'_>,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr<Err = PolicyError> + Default,
{
    let from_file = file.map(str::parse::<T>).transpose().map_err(in_file)?;
    match flag {
        Some(v) => Ok(v.parse::<T>()?),
        None => Ok(from_file.unwrap_or_default()),
    }
}

/// The reserved ranges: `--reserve`'s, else the file's, else the default range; each with the
/// `--allow` cgroups added, and none overlapping another.
fn reserve(
    file: &ConfigFile,
    flags: &Overrides,
    in_file: InFile<'_>,
) -> Result<Vec<Reservation>, ConfigError> {
    let flag_allow = cgroups(&flags.allow)?;
    let flag_limit = flags.per_child_limit.map(check_limit).transpose()?;
    if let Some(entries) = &file.reserve {
        for e in entries {
            if let Some(l) = e.per_child_limit {
                check_limit(l).map_err(in_file)?;
            }
        }
    }
    let mut reserve = if !flags.reserve.is_empty() {
        flags
            .reserve
            .iter()
            .map(|s| {
                Ok(Reservation {
                    spec: s.parse::<ReserveSpec>()?,
                    allow: Vec::new(),
                    per_child_limit: flag_limit.unwrap_or(0),
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?
    } else if let Some(entries) = &file.reserve {
        entries
            .iter()
            .map(|e| file_range(e, in_file))
            .collect::<Result<Vec<_>, ConfigError>>()?
    } else {
        vec![Reservation {
            spec: DEFAULT_RESERVE,
            allow: Vec::new(),
            per_child_limit: flag_limit.unwrap_or(0),
        }]
    };
    if flag_limit.is_some() && flags.reserve.is_empty() && file.reserve.is_some() {
        return Err(PolicyError::LimitFlagWithFileRanges.into());
    }
    for r in &mut reserve {
        allow_too(r, &flag_allow)?;
    }
    check_ranges(&reserve).map_err(|e| {
        if flags.reserve.is_empty() {
            in_file(e)
        } else {
            e.into()
        }
    })?;
    Ok(reserve)
}

/// Allowed cgroups: valid paths, none deeper than the programs' walk reaches (checked here, at
/// the config, so the one line comes before any probe; maps::write checks again as it writes).
fn cgroups(paths: &[String]) -> Result<Vec<CgroupPath>, ConfigError> {
    let mut out = Vec::with_capacity(paths.len());
    for a in paths {
        let path = a.parse::<CgroupPath>()?;
        if path.level() > port_guard_common::MAX_CGROUP_LEVEL {
            return Err(CgroupError::TooDeep(path).into());
        }
        out.push(path);
    }
    Ok(out)
}

/// A `[[reserve]]` table of the file (its per_child_limit checked already).
fn file_range(e: &ReserveEntry, in_file: InFile<'_>) -> Result<Reservation, ConfigError> {
    let range = e.ports.parse::<PortRange>().map_err(in_file)?;
    let protocols = match &e.protocols {
        None => Protocols::TCP,
        Some(list) => {
            Protocols::parse_list(&e.ports, list.iter().map(String::as_str)).map_err(in_file)?
        }
    };
    Ok(Reservation {
        spec: ReserveSpec { range, protocols },
        allow: cgroups(&e.allow)?,
        per_child_limit: e.per_child_limit.unwrap_or(0),
    })
}

/// Adds the `--allow` cgroups to a range; a cgroup the range then names twice is refused.
fn allow_too(r: &mut Reservation, flag_allow: &[CgroupPath]) -> Result<(), ConfigError> {
    for a in flag_allow {
        if !r.allow.contains(a) {
            r.allow.push(a.clone());
        }
    }
    let mut seen = r.allow.clone();
    seen.sort();
    if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
        return Err(ConfigError::Duplicate {
            what: "allowed cgroup",
            path: w[0].clone(),
        });
    }
    Ok(())
}

/// Where the guard enforces: `--netns`'s list, else the file's, else the host's.
fn netns(
    file: &ConfigFile,
    flags: &Overrides,
    in_file: InFile<'_>,
) -> Result<NetnsScope, ConfigError> {
    Ok(if !flags.netns.is_empty() {
        NetnsScope::parse_list(flags.netns.iter().map(String::as_str))?
    } else if let Some(list) = &file.netns {
        NetnsScope::parse_list(list.iter().map(String::as_str)).map_err(in_file)?
    } else {
        NetnsScope::default()
    })
}

/// The sentinel port: the flag's, else the file's (checked even where the flag wins), else the
/// default for these ranges.
fn sentinel_port(
    file: &ConfigFile,
    flags: &Overrides,
    reserve: &[Reservation],
    in_file: InFile<'_>,
) -> Result<u16, ConfigError> {
    if let Some(p) = file.sentinel_port {
        crate::policy::check_sentinel(p, reserve).map_err(in_file)?;
    }
    Ok(match flags.sentinel_port.or(file.sentinel_port) {
        Some(p) => {
            crate::policy::check_sentinel(p, reserve)?;
            p
        }
        None => crate::policy::default_sentinel_port(reserve),
    })
}

/// Where the daemon's metrics go, from the file and the flags (flags win).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSettings {
    pub listen: Option<crate::metrics::Endpoint>,
    pub textfile: Option<PathBuf>,
}

/// The metrics settings of `file` and `flags`, checked (the file's even where a flag wins).
pub fn build_metrics(
    file: &ConfigFile,
    file_path: Option<&Path>,
    flags: &Overrides,
) -> Result<MetricsSettings, ConfigError> {
    let in_file = |message: String| match file_path {
        Some(path) => ConfigError::Parse {
            path: path.to_owned(),
            message,
        },
        None => ConfigError::Metrics(message),
    };
    let file_listen = file
        .metrics_listen
        .as_deref()
        .map(str::parse::<crate::metrics::Endpoint>)
        .transpose()
        .map_err(in_file)?;
    if let Some(p) = &file.metrics_textfile {
        crate::metrics::textfile::check_path(p).map_err(in_file)?;
    }
    let listen = match &flags.metrics_listen {
        Some(s) => Some(s.parse().map_err(ConfigError::Metrics)?),
        None => file_listen,
    };
    let textfile = match &flags.metrics_textfile {
        Some(p) => {
            crate::metrics::textfile::check_path(p).map_err(ConfigError::Metrics)?;
            Some(p.clone())
        }
        None => file.metrics_textfile.clone(),
    };
    Ok(MetricsSettings { listen, textfile })
}

/// A per-child limit: at least 1 (leave it out for no limit).
fn check_limit(limit: u32) -> Result<u32, PolicyError> {
    if limit == 0 || limit > u32::from(u16::MAX) {
        return Err(PolicyError::Limit(limit));
    }
    Ok(limit)
}

/// Checks that the attach cgroup exists (the spawn parent is created later). Returns the allowed
/// cgroups that do not exist yet: a service's cgroup appears when the service starts, and the
/// daemon allows it from that instant on.
pub fn check_cgroups(policy: &Policy, cg: &Cgroup2) -> Result<Vec<CgroupPath>, ConfigError> {
    cg.id(&policy.attach)?;
    let mut missing = Vec::new();
    for r in &policy.reserve {
        for a in &r.allow {
            match cg.id(a) {
                Ok(_) => {}
                Err(CgroupError::Missing { .. }) => {
                    if !missing.contains(a) {
                        missing.push(a.clone());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests;
