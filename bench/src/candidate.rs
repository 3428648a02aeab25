//! Design prototypes for the lease allocator, measured next to the library's `allocate()` with
//! `--candidates`. port-guard does not use them: they show what a change in
//! port-guard/src/leases.rs would buy before anyone makes it. Both keep what makes a lease safe
//! (claim with BPF_NOEXIST first, the kernel settles races; probe-bind from inside the lessee
//! cgroup; drop the claim when the probe finds the port held) and change only how a candidate
//! port is found:
//!
//! - `claim-scan`: the ranges in one BPF_MAP_LOOKUP_BATCH instead of 64 lookups, and no read of
//!   the whole lease map: claim in port order and take EEXIST as "leased". Same order as today
//!   (the lowest free port), one syscall per leased port below it.
//! - `random-start`: as `claim-scan`, but from a random port of the ranges, wrapping around.
//!   Expected claims per allocation 1/(1 − fill) when leases are scattered (which is the layout
//!   this allocator produces), whatever the range size. Gives up "lowest free port first".

use std::os::fd::{AsFd as _, AsRawFd as _};

use anyhow::{bail, Result};
use aya::maps::{IterableMap, MapData};
use port_guard::{guard::Maps, leases, policy::Protocols};
use port_guard_common::{RangeDef, MAX_RANGES};

pub const NAMES: &[&str] = &["claim-scan", "random-start"];

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The configured ranges in port order, read with one BPF_MAP_LOOKUP_BATCH (kernel 5.6+).
fn ranges(maps: &Maps) -> Result<Vec<RangeDef>> {
    let map: &MapData = IterableMap::map(&maps.ranges);
    let mut keys = [0u32; MAX_RANGES];
    let mut values = [RangeDef::default(); MAX_RANGES];
    let mut out_batch = 0u32;
    let mut attr = [0u64; 16];
    attr[1] = (&mut out_batch as *mut u32) as u64;
    attr[2] = keys.as_mut_ptr() as u64;
    attr[3] = values.as_mut_ptr() as u64;
    attr[4] = MAX_RANGES as u64 | ((map.fd().as_fd().as_raw_fd() as u64) << 32);
    // SAFETY: buffers sized for `count` keys and values; attr zero-padded.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT) {
        bail!(
            "BPF_MAP_LOOKUP_BATCH on PG_RANGES: {}",
            std::io::Error::last_os_error()
        );
    }
    let count = (attr[4] & 0xffff_ffff) as usize;
    let mut v: Vec<RangeDef> = values[..count.min(MAX_RANGES)]
        .iter()
        .copied()
        .filter(|d| d.in_use != 0)
        .collect();
    v.sort_by_key(|d| d.first);
    Ok(v)
}

fn random() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: writes at most 8 bytes into b.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    u64::from_ne_bytes(b)
}

pub fn allocate(name: &str, maps: &mut Maps, cgroup_id: u64, level: u32) -> Result<u16> {
    let ranges = ranges(maps)?;
    let total: usize = ranges
        .iter()
        .map(|d| usize::from(d.last - d.first) + 1)
        .sum();
    if total == 0 {
        bail!("no reserved range");
    }
    let start = match name {
        "claim-scan" => 0,
        "random-start" => (random() % total as u64) as usize,
        other => bail!("unknown candidate allocator {other:?}"),
    };
    // The i-th port of the ranges, in port order.
    let nth = |mut i: usize| {
        for d in &ranges {
            let len = usize::from(d.last - d.first) + 1;
            if i < len {
                return (d.first + i as u16, d.protocols);
            }
            i -= len;
        }
        unreachable!("i < total")
    };
    for i in 0..total {
        let (port, protocols) = nth((start + i) % total);
        if !leases::claim(maps, port, cgroup_id, level)? {
            continue;
        }
        match leases::probe_free(port, Protocols(protocols)) {
            Ok(true) => {
                maps.record_allocation(true);
                return Ok(port);
            }
            Ok(false) => leases::release(maps, port)?,
            Err(e) => {
                leases::release(maps, port)?;
                return Err(e.into());
            }
        }
    }
    bail!("no free port")
}
