//! Leases written straight into the pinned maps with aya: `PG_LEASES` (port -> cgroup) and the
//! allocators' bitmap in `PG_ALLOC`, behind the daemon's back.

use std::path::Path;

use aya::maps::{Array, HashMap, Map, MapData};
use port_guard_common::Lease;

use crate::{cgroup::Cgroup, common, util::now_secs};

fn leases_map(pin_dir: &Path) -> HashMap<MapData, u32, Lease> {
    let pin = pin_dir.join(common::MAP_LEASES);
    let data = MapData::from_pin(&pin)
        .unwrap_or_else(|e| panic!("open pinned map {}: {e}", pin.display()));
    let map =
        Map::from_map_data(data).unwrap_or_else(|e| panic!("pinned map {}: {e}", pin.display()));
    HashMap::<_, u32, Lease>::try_from(map).unwrap_or_else(|e| {
        panic!(
            "pinned map {} is not HashMap<u32, Lease>: {e}",
            pin.display()
        )
    })
}

/// The allocators' leased-port bitmap in `<pin_dir>/PG_ALLOC`: whether `port` is marked.
pub fn alloc_marked(pin_dir: impl AsRef<Path>, port: u16) -> bool {
    let m = alloc_map(pin_dir.as_ref());
    let word = m
        .get(&((common::ALLOC_BITMAP + usize::from(port) / 64) as u32), 0)
        .unwrap_or_else(|e| panic!("read PG_ALLOC: {e}"));
    word & (1u64 << (port % 64)) != 0
}

/// Sets or clears the mark of `port` in `<pin_dir>/PG_ALLOC` behind the allocators' back (a
/// stale mark, or a lease whose allocator died before marking it). Not atomic: only for tests
/// where nothing else allocates meanwhile.
pub fn set_alloc_mark(pin_dir: impl AsRef<Path>, port: u16, marked: bool) {
    let mut m = alloc_map(pin_dir.as_ref());
    let index = (common::ALLOC_BITMAP + usize::from(port) / 64) as u32;
    let word = m
        .get(&index, 0)
        .unwrap_or_else(|e| panic!("read PG_ALLOC: {e}"));
    let bit = 1u64 << (port % 64);
    let word = if marked { word | bit } else { word & !bit };
    m.set(index, word, 0)
        .unwrap_or_else(|e| panic!("write PG_ALLOC: {e}"));
    eprintln!(
        "[harness] port {port} {} in the bitmap",
        if marked { "marked" } else { "unmarked" }
    );
}

fn alloc_map(pin_dir: &Path) -> Array<MapData, u64> {
    let pin = pin_dir.join(common::MAP_ALLOC);
    let data = MapData::from_pin(&pin)
        .unwrap_or_else(|e| panic!("open pinned map {}: {e}", pin.display()));
    let map =
        Map::from_map_data(data).unwrap_or_else(|e| panic!("pinned map {}: {e}", pin.display()));
    Array::<_, u64>::try_from(map)
        .unwrap_or_else(|e| panic!("pinned map {} is not Array<u64>: {e}", pin.display()))
}

/// The lease for `cgroup` as the programs expect it (id, level, since = now).
pub fn lease_for(cgroup: &Cgroup) -> Lease {
    Lease {
        cgroup_id: cgroup.id(),
        level: cgroup.level(),
        flags: 0,
        since: now_secs(),
        expires: 0,
        cpu_usec: u64::MAX,
    }
}

/// Inserts (or replaces) the lease of `port` to `cgroup` in `<pin_dir>/PG_LEASES`.
pub fn insert_lease(pin_dir: impl AsRef<Path>, port: u16, cgroup: &Cgroup) {
    let mut m = leases_map(pin_dir.as_ref());
    let lease = lease_for(cgroup);
    m.insert(port as u32, lease, 0)
        .unwrap_or_else(|e| panic!("insert lease {port} -> {}: {e}", cgroup.path()));
    eprintln!(
        "[harness] leased port {port} to {} ({lease:?})",
        cgroup.path()
    );
}

/// Removes the lease of `port` from `<pin_dir>/PG_LEASES` (panics if it is not there).
pub fn remove_lease(pin_dir: impl AsRef<Path>, port: u16) {
    let mut m = leases_map(pin_dir.as_ref());
    m.remove(&(port as u32))
        .unwrap_or_else(|e| panic!("remove lease {port}: {e}"));
    eprintln!("[harness] removed lease of port {port}");
}

/// The lease of `port` in the pinned map, if any.
pub fn get_lease(pin_dir: impl AsRef<Path>, port: u16) -> Option<Lease> {
    leases_map(pin_dir.as_ref()).get(&(port as u32), 0).ok()
}
