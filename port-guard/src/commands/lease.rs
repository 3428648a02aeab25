//! `port-guard lease` and `release`: leases for orchestrators that start qemu themselves.

use anyhow::{bail, Result};
use log::info;

use crate::{
    cgroup::{self, Cgroup2, CgroupNames, CgroupPath},
    commands::spawn::{enter, spawn_parent},
    error::UsageError,
    leases::{now_boot_secs, Ended, Holder},
    maps::Maps,
    netns::ProbeIn,
    pin::PinDir,
};

/// How long a `lease --cgroup` lease lasts besides `release` and the removal of its cgroup.
#[derive(Clone, Copy, Debug, Default)]
pub struct Terms {
    pub ttl_secs: Option<u64>,
    pub until_empty: bool,
}

impl Terms {
    /// `cpu_usec`: the lessee's CPU time now (an until-empty lease ends once a process ran in
    /// it since and it is empty).
    fn holder(self, cgroup_id: u64, level: u32, cpu_usec: Option<u64>) -> Holder {
        let base = if self.until_empty {
            Holder::until_empty(cgroup_id, level)
        } else {
            Holder::plain(cgroup_id, level)
        };
        Holder {
            expires: self.expires(),
            cpu_usec: cpu_usec.unwrap_or(u64::MAX),
            ..base
        }
    }

    /// When a lease made now runs out (CLOCK_BOOTTIME seconds), 0: no TTL.
    fn expires(self) -> u64 {
        self.ttl_secs.map_or(0, |t| now_boot_secs() + t)
    }
}

/// Leases `count` ports (or `port`) to `cgroup`, all or nothing. This process claims and probes
/// them from a scratch cgroup below the spawn parent (the probe bind must come from the lessee),
/// then hands each lease to `cgroup` in one map update, and goes back where it was. A failure
/// part way releases every port it claimed.
pub fn lease(
    pin: &PinDir,
    cgroup: &str,
    port: Option<u16>,
    count: usize,
    terms: Terms,
    json: bool,
) -> Result<()> {
    let target: CgroupPath = cgroup.parse()?;
    let cg = Cgroup2::find()?;
    let target_id = cg.id(&target)?;
    let mut maps = Maps::open(pin)?;
    let parent = spawn_parent(&maps, &cg)?;
    let probe_in = ProbeIn::guarded(pin.path())?;
    let pid = std::process::id();
    let scratch = parent.join(&format!("lease-{pid}"))?;
    let scratch_id = cg.create(&scratch)?;
    let original = cgroup::of_pid(pid).unwrap_or_else(CgroupPath::root);
    let result = (|| -> Result<Vec<u16>> {
        enter(&cg, &scratch)?;
        let scratch_holder = Holder::plain(scratch_id, scratch.level());
        let ports = match port {
            Some(p) => vec![maps.allocate(scratch_holder, Some(p), &probe_in)?],
            None => maps.allocate_many(scratch_holder, count, &probe_in)?,
        };
        let holder = terms.holder(target_id, target.level(), cg.cpu_usec(&target).ok());
        hand_over(&mut maps, &ports, holder, scratch_id)?;
        Ok(ports)
    })();
    let back = enter(&cg, &original);
    let _ = std::fs::remove_dir(cg.dir(&scratch));
    let ports = result?;
    back?;
    print_ports(&ports, &target, terms, json);
    Ok(())
}

/// Hands each of `ports`, claimed by the scratch cgroup, to `holder`; all or nothing: on a
/// failure every port is released, handed over already or still claimed.
fn hand_over(maps: &mut Maps, ports: &[u16], holder: Holder, scratch_id: u64) -> Result<()> {
    for (i, p) in ports.iter().enumerate() {
        if let Err(e) = maps.leases_mut().hand_over(*p, holder) {
            for q in &ports[..=i] {
                let _ = maps.leases_mut().release_if_held_by(*q, holder.cgroup_id);
            }
            for q in &ports[i..] {
                let _ = maps.leases_mut().release_if_held_by(*q, scratch_id);
            }
            return Err(e.into());
        }
    }
    Ok(())
}

fn print_ports(ports: &[u16], target: &CgroupPath, terms: Terms, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "port": ports[0],
                "ports": ports,
                "cgroup": target.as_str(),
                "ttl_secs": terms.ttl_secs,
                "until_empty": terms.until_empty,
            })
        );
    } else {
        println!(
            "{}",
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
}

/// Restarts the TTL of `cgroup`'s leases (or of `port`, which must be one of them) from now.
pub fn renew(
    pin: &PinDir,
    cgroup: &str,
    port: Option<u16>,
    terms: Terms,
    json: bool,
) -> Result<()> {
    let target: CgroupPath = cgroup.parse()?;
    let cg = Cgroup2::find()?;
    let target_id = cg.id(&target)?;
    let mut maps = Maps::open(pin)?;
    let expires = terms.expires();
    let ports: Vec<u16> = match port {
        Some(p) => vec![p],
        None => maps
            .leases()
            .all()?
            .into_iter()
            .filter(|(_, l)| l.cgroup_id == target_id)
            .map(|(p, _)| p)
            .collect(),
    };
    if ports.is_empty() {
        bail!("cgroup {target} holds no lease to renew");
    }
    let mut names = CgroupNames::new(&cg);
    for p in &ports {
        maps.leases_mut()
            .renew(*p, target_id, expires, |id| names.name(id))?;
    }
    info!(
        "renewed {} lease(s) of {target} for {} s: {ports:?}",
        ports.len(),
        terms.ttl_secs.unwrap_or(0)
    );
    print_ports(&ports, &target, terms, json);
    Ok(())
}

pub fn release(pin: &PinDir, port: Option<u16>, cgroup: Option<&str>) -> Result<()> {
    let mut maps = Maps::open(pin)?;
    match (port, cgroup) {
        (Some(port), None) => {
            maps.leases_mut().release(port)?;
            maps.leases().count_end(Ended::Released);
            info!("released port {port}");
        }
        (None, Some(c)) => {
            let path: CgroupPath = c.parse()?;
            let cg = Cgroup2::find()?;
            let id = cg.id(&path)?;
            let ports = maps.leases_mut().release_cgroup(id)?;
            if ports.is_empty() {
                bail!("cgroup {path} holds no lease");
            }
            for _ in &ports {
                maps.leases().count_end(Ended::Released);
            }
            info!("released {} lease(s) of {path}: {ports:?}", ports.len());
        }
        _ => bail!(UsageError::new(
            "give exactly one of --port N and --cgroup CGROUP"
        )),
    }
    Ok(())
}
