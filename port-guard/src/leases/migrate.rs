//! Moving the leases of pins of map layout 2 to layout 3 in place, without an unguarded instant
//! and without losing a lease.
//!
//! The guard of layout 2 stays attached and enforcing throughout: its programs hold their own
//! reference to the old lease map. [`Migration::prepare`] renames the old map's pin aside
//! (`PG_LEASES_v2`), so that loading the new object creates a new `PG_LEASES`;
//! [`Migration::copy`] fills it before the new programs attach (every lease of layout 2 becomes
//! an until-empty lease: the only lifetime layout 2 had). Once the new links are in place (they
//! replace the old ones, the old programs go), [`Migration::finish`] copies whatever a command
//! that had opened the old map wrote meanwhile and removes the aside pin. A start that fails
//! before that puts the old pin back ([`Migration::abort`]); a start that dies half way is
//! picked up by the next one (the aside pin is found again).

use std::{fs, path::PathBuf};

use aya::maps::{HashMap, Map, MapData};
use log::{info, warn};
use port_guard_common::{Lease, LeaseV2, LEASE_UNTIL_EMPTY, MAP_LEASES};

use super::{LeaseError, LeaseTable};
use crate::{
    error::{IoContext as _, IoError},
    pin::PinDir,
};

/// The pin name the old lease map waits under while the new one is filled.
pub const ASIDE: &str = "PG_LEASES_v2";

/// The old lease map, set aside.
pub struct Migration {
    old: HashMap<MapData, u32, LeaseV2>,
    aside: PathBuf,
    cur: PathBuf,
    copied: usize,
}

fn open(path: &PathBuf) -> Result<HashMap<MapData, u32, LeaseV2>, IoError> {
    let data = MapData::from_pin(path)
        .map_err(|e| IoError::new("open pinned map", path.clone(), std::io::Error::other(e)))?;
    HashMap::try_from(Map::HashMap(data)).map_err(|e| {
        IoError::new(
            "open pinned map",
            path.clone(),
            std::io::Error::other(format!("not the lease map of layout 2: {e}")),
        )
    })
}

impl Migration {
    /// Sets the layout-2 lease map aside (or finds it there, after an interrupted start).
    pub fn prepare(pin: &PinDir) -> Result<Migration, IoError> {
        let cur = pin.file(MAP_LEASES);
        let aside = pin.file(ASIDE);
        if fs::symlink_metadata(&aside).is_ok() {
            // An earlier start set it aside and died: whatever PG_LEASES it left is the new map
            // of a load that never attached; the old one stays the source.
            if fs::symlink_metadata(&cur).is_ok() {
                fs::remove_file(&cur).at("remove pin", &cur)?;
            }
        } else {
            fs::rename(&cur, &aside).at("rename pin to", &aside)?;
        }
        let old = match open(&aside) {
            Ok(m) => m,
            Err(e) => {
                let _ = fs::rename(&aside, &cur);
                return Err(e);
            }
        };
        Ok(Migration {
            old,
            aside,
            cur,
            copied: 0,
        })
    }

    fn entries(&self) -> Result<Vec<(u32, LeaseV2)>, LeaseError> {
        self.old
            .iter()
            .map(|r| r.map_err(|e| LeaseError::Map(Box::new(e))))
            .collect()
    }

    /// Copies every lease of the old map into `table` (the new map) as an until-empty lease.
    pub fn copy(&mut self, table: &mut LeaseTable) -> Result<usize, LeaseError> {
        let mut n = 0;
        for (port, l) in self.entries()? {
            let lease = Lease {
                cgroup_id: l.cgroup_id,
                level: l.level,
                flags: LEASE_UNTIL_EMPTY,
                since: l.since,
                expires: 0,
                // Layout 2 ended these once seen populated then empty: any CPU time counts.
                cpu_usec: 0,
            };
            if table.insert_migrated(port as u16, lease)? {
                n += 1;
            }
        }
        self.copied += n;
        Ok(n)
    }

    /// After the new links are in place: the late writes, then the aside pin goes.
    pub fn finish(mut self, table: &mut LeaseTable) {
        match self.copy(table) {
            Ok(0) => {}
            Ok(late) => {
                info!("{late} lease(s) made in the old map during the migration copied too")
            }
            Err(e) => warn!("copying late leases from the old map: {e}"),
        }
        info!(
            "migrated {} lease(s) from map layout 2 in place: no lease lost, the guard enforced throughout; they keep the lifetime layout 2 gave them (they end when their cgroup, once populated, empties)",
            self.copied
        );
        if let Err(e) = fs::remove_file(&self.aside) {
            warn!("removing {}: {e}", self.aside.display());
        }
    }

    /// The start failed: the old map goes back under its name (the old guard never stopped).
    pub fn abort(self) {
        if let Err(e) = fs::rename(&self.aside, &self.cur) {
            warn!(
                "putting the lease map of layout 2 back at {}: {e}",
                self.cur.display()
            );
        }
    }
}

/// An aside pin left by a start that completed the copy but died before removing it.
pub fn remove_leftover(pin: &PinDir) {
    let aside = pin.file(ASIDE);
    if fs::symlink_metadata(&aside).is_ok() {
        match fs::remove_file(&aside) {
            Ok(()) => info!("removed {ASIDE}, left by an interrupted migration of the leases"),
            Err(e) => warn!("removing {}: {e}", aside.display()),
        }
    }
}
