//! `port-guard spawn`: lease a port to a fresh cgroup, move into it, exec the command.

use std::{io::Write as _, os::unix::process::CommandExt as _, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::{
    cgroup::{self, Cgroup2, CgroupNames, CgroupPath},
    error::{ExecError, UsageError},
    maps::Maps,
    netns::ProbeIn,
    pin::PinDir,
};

pub struct SpawnArgs {
    pub name: Option<String>,
    pub port: Option<u16>,
    /// Ports to lease, all or nothing (1 unless --count).
    pub count: usize,
    pub json: bool,
    pub cmd: Vec<String>,
}

/// The spawn parent recorded by the daemon.
pub fn spawn_parent(maps: &Maps, cg: &Cgroup2) -> Result<CgroupPath> {
    let id = maps.settings()?.spawn_parent_id;
    if id == 0 {
        bail!("the guard has no spawn parent cgroup; start the daemon with --spawn-parent");
    }
    let name = CgroupNames::new(cg).name(id);
    name.parse::<CgroupPath>().map_err(|_| {
        anyhow::anyhow!(
            "the spawn parent cgroup (id {id}) no longer exists; restart the daemon to create it"
        )
    })
}

/// Moves this process into `path`.
pub fn enter(cg: &Cgroup2, path: &CgroupPath) -> Result<()> {
    let procs = cg.dir(path).join("cgroup.procs");
    std::fs::write(&procs, "0")
        .with_context(|| format!("moving into cgroup {path} ({})", procs.display()))
}

/// Replaces every `{port}` (the first port) and `{port0}`..`{portN-1}` in `args`.
pub fn substitute(args: &[String], ports: &[u16]) -> Vec<String> {
    args.iter()
        .map(|a| {
            let mut a = a.replace("{port}", &ports[0].to_string());
            // Highest index first: {port1} must not eat the start of {port10}.
            for (i, p) in ports.iter().enumerate().rev() {
                a = a.replace(&format!("{{port{i}}}"), &p.to_string());
            }
            a
        })
        .collect()
}

/// Leases the ports to a new cgroup below the spawn parent, moves there and execs the command;
/// returns only when it could not (leases released, cgroup left and removed).
pub fn run(pin: &PinDir, args: SpawnArgs) -> Result<()> {
    let cg = Cgroup2::find()?;
    let mut maps = Maps::open(pin)?;
    let parent = spawn_parent(&maps, &cg)?;
    // The port must be free in the guarded namespaces, whichever this process is in.
    let probe_in = ProbeIn::guarded(pin.path())?;
    let pid = std::process::id();
    let path = child(&parent, args.name.as_deref(), pid)?;
    create(&cg, &path)?;
    let original = cgroup::of_pid(pid).unwrap_or_else(CgroupPath::root);
    let undo = |cg: &Cgroup2| {
        let _ = enter(cg, &original);
        let _ = std::fs::remove_dir(cg.dir(&path));
    };
    match lease_and_exec(&cg, &path, &mut maps, &probe_in, &args) {
        Ok((ports, err)) => {
            // The leases must not outlive the command that never ran.
            for port in ports {
                let _ = maps.leases_mut().release(port);
            }
            undo(&cg);
            Err(ExecError {
                command: args.cmd[0].clone(),
                source: err,
            }
            .into())
        }
        Err(e) => {
            undo(&cg);
            Err(e)
        }
    }
}

/// The cgroup to make: `--name` (one name) or `vm-PID`, below the spawn parent.
fn child(parent: &CgroupPath, name: Option<&str>, pid: u32) -> Result<CgroupPath> {
    let Some(n) = name else {
        return Ok(parent.join(&format!("vm-{pid}"))?);
    };
    let p = parent.join(n)?;
    if p.level() != parent.level() + 1 {
        bail!(UsageError::new(format!(
            "--name {n:?} must be one cgroup name, without '/'"
        )));
    }
    Ok(p)
}

/// Makes the cgroup; one that exists already is another's, and refused.
fn create(cg: &Cgroup2, path: &CgroupPath) -> Result<()> {
    std::fs::create_dir(cg.dir(path)).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => anyhow::anyhow!(UsageError::new(
            "cgroup already exists; choose another --name"
        ))
        .context(format!("cgroup {path}")),
        _ => anyhow::Error::new(e).context(format!("creating cgroup {path}")),
    })
}

/// Moves into `path`, leases the ports to it, says them on stdout and execs the command: returns
/// only when the exec failed, with the ports leased and why.
fn lease_and_exec(
    cg: &Cgroup2,
    path: &CgroupPath,
    maps: &mut Maps,
    probe_in: &ProbeIn,
    args: &SpawnArgs,
) -> Result<(Vec<u16>, std::io::Error)> {
    enter(cg, path)?;
    let id = cg.id(path)?;
    let holder = crate::leases::Holder::until_empty(id, path.level());
    let ports = match args.port {
        Some(p) => vec![maps.allocate(holder, Some(p), probe_in)?],
        None => maps.allocate_many(holder, args.count.max(1), probe_in)?,
    };
    let argv = substitute(&args.cmd, &ports);
    announce(&ports, path, args.json)?;
    // Only returns on failure.
    let err = Command::new(&argv[0]).args(&argv[1..]).exec();
    Ok((ports, err))
}

/// The leased ports on stdout, before the exec: one line, the ports or (`--json`) an object.
fn announce(ports: &[u16], path: &CgroupPath, json: bool) -> Result<()> {
    let line = if json {
        serde_json::json!({
            "port": ports[0],
            "ports": ports,
            "pid": std::process::id(),
            "cgroup": path.as_str(),
        })
        .to_string()
    } else {
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("writing the port to stdout")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutes_every_placeholder() {
        let args: Vec<String> = ["-incoming", "tcp:[::]:{port}", "x{port}y{port}", "plain"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            substitute(&args, &[49153]),
            ["-incoming", "tcp:[::]:49153", "x49153y49153", "plain"]
        );
    }

    #[test]
    fn substitutes_each_port_of_a_multi_port_lease() {
        let ports: Vec<u16> = (49152..49164).collect();
        let args: Vec<String> = ["{port}", "{port0}:{port1}", "{port10}/{port11}", "{port12}"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            substitute(&args, &ports),
            ["49152", "49152:49153", "49162/49163", "{port12}"]
        );
    }
}
