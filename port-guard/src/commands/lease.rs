//! `port-guard lease` and `release`: leases for orchestrators that start qemu themselves.

use anyhow::{bail, Result};
use log::info;

use crate::{
    cgroup::{self, Cgroup2, CgroupPath},
    commands::spawn::{enter, spawn_parent},
    error::UsageError,
    maps::Maps,
    netns::ProbeIn,
    pin::PinDir,
};

/// Leases a port to `cgroup`. This process claims and probes it from a scratch cgroup below the
/// spawn parent (the probe bind must come from the lessee), then hands the lease to `cgroup` in
/// one map update, and goes back where it was.
pub fn lease(pin: &PinDir, cgroup: &str, port: Option<u16>, json: bool) -> Result<()> {
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
    let result = (|| -> Result<u16> {
        enter(&cg, &scratch)?;
        let port = maps.allocate(scratch_id, scratch.level(), port, &probe_in)?;
        if let Err(e) = maps.leases_mut().hand_over(port, target_id, target.level()) {
            let _ = maps.leases_mut().release(port);
            return Err(e.into());
        }
        Ok(port)
    })();
    let back = enter(&cg, &original);
    let _ = std::fs::remove_dir(cg.dir(&scratch));
    let port = result?;
    back?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "port": port, "cgroup": target.as_str() })
        );
    } else {
        println!("{port}");
    }
    Ok(())
}

pub fn release(pin: &PinDir, port: Option<u16>, cgroup: Option<&str>) -> Result<()> {
    let mut maps = Maps::open(pin)?;
    match (port, cgroup) {
        (Some(port), None) => {
            maps.leases_mut().release(port)?;
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
            info!("released {} lease(s) of {path}: {ports:?}", ports.len());
        }
        _ => bail!(UsageError::new(
            "give exactly one of --port N and --cgroup CGROUP"
        )),
    }
    Ok(())
}
