//! Learning a network namespace's cookie with the object's helper program.

use std::{fs, io, path::Path};

use aya::{
    maps::{Array, MapData, MapError},
    programs::{cgroup_sock_addr::CgroupSockAddrLinkId, links::CgroupAttachMode, CgroupSockAddr},
    Ebpf,
};
use port_guard_common::{MAP_NETNS_LEARN, PROG_NETNS_LEARN};

use super::{
    error::GuardError,
    load::{program, program_error},
};
use crate::{
    cgroup::{Cgroup2, CgroupPath},
    error::{IoContext as _, IoError},
    maps::MapsError,
    netns::Netns,
    sys,
};

/// The cookie the kernel gives the network namespace `ns` (what the programs compare with
/// the guarded set). Learnt on every kernel the same way: the helper program is attached to
/// a scratch cgroup, a child process in it enters `ns` and binds once, and the program
/// writes the cookie it sees (SO_NETNS_COOKIE would need 5.14).
pub(super) fn cookie_of(
    ebpf: &mut Ebpf,
    cg: &Cgroup2,
    scratch: &CgroupPath,
    ns: &Netns,
) -> Result<u64, GuardError> {
    let dir = cg.dir(scratch);
    match fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(IoError::new("create cgroup", dir, e).into()),
    }
    let result = attach_learner(ebpf, &dir).and_then(|link| {
        let learnt = learn(ebpf, &dir, ns);
        if let Ok(p) = learner(ebpf) {
            let _ = p.detach(link);
        }
        learnt
    });
    let _ = fs::remove_dir(&dir);
    result
}

/// The helper program, loaded.
fn learner(ebpf: &mut Ebpf) -> Result<&mut CgroupSockAddr, GuardError> {
    let prog: &mut CgroupSockAddr = program(ebpf, PROG_NETNS_LEARN)?;
    if prog.fd().is_err() {
        prog.load()
            .map_err(program_error("load", PROG_NETNS_LEARN))?;
    }
    Ok(prog)
}

/// Attaches the helper program to the scratch cgroup `dir`.
fn attach_learner(ebpf: &mut Ebpf, dir: &Path) -> Result<CgroupSockAddrLinkId, GuardError> {
    let cgroup = fs::File::open(dir).at("open cgroup", dir)?;
    learner(ebpf)?
        .attach(&cgroup, CgroupAttachMode::Single)
        .map_err(program_error("attach", PROG_NETNS_LEARN))
}

/// A child in the scratch cgroup `dir` enters `ns` and binds; the cookie the helper wrote.
fn learn(ebpf: &mut Ebpf, dir: &Path, ns: &Netns) -> Result<u64, GuardError> {
    let map_err = |e| {
        GuardError::Maps(MapsError::Map {
            name: MAP_NETNS_LEARN,
            source: Box::new(e),
        })
    };
    let mut learnt: Array<&mut MapData, u64> = ebpf
        .map_mut(MAP_NETNS_LEARN)
        .ok_or(MapError::InvalidName {
            name: MAP_NETNS_LEARN.into(),
        })
        .map_err(map_err)?
        .try_into()
        .map_err(map_err)?;
    learnt.set(0, 0, 0).map_err(map_err)?;
    sys::bind_in_cgroup_and_netns(&dir.join("cgroup.procs"), ns.raw_fd())
        .at("bind from a scratch cgroup in netns", dir)?;
    let cookie = learnt.get(&0, 0).map_err(map_err)?;
    if cookie == 0 {
        return Err(IoError::new(
            "learn the netns cookie in",
            dir,
            io::Error::other("the helper program did not see the bind"),
        )
        .into());
    }
    Ok(cookie)
}
