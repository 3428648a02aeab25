//! The load step and the attach step: the object loaded with its load-time constants and its
//! maps pinned by name, then its programs loaded (the verifier) and attached to the attach
//! cgroup, each link held by its fd alone until [`super::pins`] pins it.

use std::{fs::File, path::Path, time::Instant};

use aya::{
    maps::MapData,
    programs::{
        links::{CgroupAttachMode, FdLink},
        CgroupSock, CgroupSockAddr, Program, ProgramError,
    },
    Ebpf, EbpfLoader,
};
use log::info;
use port_guard_common::{
    EVENTS_BYTES, GLOBAL_SENTINEL_PORT, GLOBAL_USE_NETNS, GLOBAL_USE_RETVAL, MAP_EVENTS,
};

use super::error::GuardError;
use crate::{
    error::IoContext as _,
    pin::{PinDir, LINKS, POST_LINKS, RELEASE_LINKS},
    probe::Features,
};

/// The eBPF object, built from port-guard-ebpf by build.rs.
pub(super) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/port-guard"));

/// Loads the object with its maps pinned under `pin` (a pinned map is reused rather than
/// created) and its load-time constants set: what this kernel has, and the sentinel port
/// (`None`: refusals do not go through it).
pub(super) fn object(
    pin: &PinDir,
    features: Features,
    sentinel_port: Option<u16>,
) -> Result<Ebpf, GuardError> {
    let use_retval: u32 = features.set_retval.into();
    let use_netns: u32 = features.netns_cookie.into();
    let sentinel_port: u32 = sentinel_port.map_or(0, u32::from);
    // The programs' aya-log records are debug only: written when the agent logs debug.
    let log_level: u8 = if log::log_enabled!(log::Level::Debug) {
        4
    } else {
        3
    };
    let mut loader = EbpfLoader::new();
    loader
        .default_map_pin_directory(pin.path())
        .override_global(GLOBAL_USE_RETVAL, &use_retval, true)
        .override_global(GLOBAL_USE_NETNS, &use_netns, true)
        .override_global(GLOBAL_SENTINEL_PORT, &sentinel_port, true)
        .override_global(aya_log::LEVEL, &log_level, false);
    if let Some(bytes) = pinned_events_size(pin) {
        // A pinned map is reused whatever this build declares: read the ring buffer with
        // the size it has.
        info!(
            "the guard's event ring buffer keeps its {} KiB until the guard is unloaded (this build makes {} KiB)",
            bytes / 1024,
            EVENTS_BYTES / 1024
        );
        loader.map_max_entries(MAP_EVENTS, bytes);
    }
    loader
        .load(OBJECT)
        .map_err(|e| GuardError::Load(Box::new(e)))
}

/// The size of the pinned event ring buffer where it differs from this build's
/// ([`EVENTS_BYTES`]): a guard loaded by another version keeps the one it made.
fn pinned_events_size(pin: &PinDir) -> Option<u32> {
    let data = MapData::from_pin(pin.file(MAP_EVENTS)).ok()?;
    let bytes = data.info().ok()?.max_entries();
    (bytes != EVENTS_BYTES).then_some(bytes)
}

/// A link this start made: attached, held by its fd only, not pinned yet.
pub(super) struct NewLink {
    pub program: &'static str,
    /// Its pin name under the pin dir.
    pub pin_name: &'static str,
    pub link: FdLink,
}

/// Loads and attaches the programs to the cgroup `dir`: the release program, the post_bind ones
/// when refusals go through the sentinel, the bind programs.
///
/// The links are held by fd only: a crash up to here detaches them (the kernel drops a link
/// with its last fd), so a first load is either complete or leaves nothing attached. Loading
/// (the verifier) is the slow part. The post_bind programs go first: from the instant a new bind
/// program may rewrite a refusal to the sentinel port, the rewritten bind must be unable to
/// succeed there.
pub(super) fn attach(
    ebpf: &mut Ebpf,
    dir: &Path,
    sentinel: bool,
) -> Result<Vec<NewLink>, GuardError> {
    let cgroup = File::open(dir).at("open cgroup", dir)?;
    let mut links = Vec::new();
    // The release program before the bind programs: every socket a new bind program charges
    // to a share is uncharged when it is released.
    for (program, pin_name) in RELEASE_LINKS {
        let link = load_attach::<CgroupSock>(ebpf, program, &cgroup)?;
        links.push(NewLink {
            program,
            pin_name,
            link,
        });
    }
    for (program, pin_name) in POST_LINKS.iter().copied().filter(|_| sentinel) {
        let link = load_attach::<CgroupSock>(ebpf, program, &cgroup)?;
        links.push(NewLink {
            program,
            pin_name,
            link,
        });
    }
    for (program, pin_name) in LINKS {
        let link = load_attach::<CgroupSockAddr>(ebpf, program, &cgroup)?;
        links.push(NewLink {
            program,
            pin_name,
            link,
        });
    }
    Ok(links)
}

/// Loads the program `name` (a `T`) and attaches it to `cgroup`.
fn load_attach<T>(ebpf: &mut Ebpf, name: &'static str, cgroup: &File) -> Result<FdLink, GuardError>
where
    T: CgroupProgram,
    for<'a> &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let prog: &mut T = program(ebpf, name)?;
    let t = Instant::now();
    prog.load_program().map_err(program_error("load", name))?;
    log::debug!(
        "{name} loaded in {} ms ({} instructions verified)",
        t.elapsed().as_millis(),
        prog.verified_instructions()
            .map_or("?".into(), |n| n.to_string())
    );
    prog.attach_fd_link(cgroup, name)
}

/// The steps of [`load_attach`] on the two program types, which aya gives the same methods but
/// no common trait.
trait CgroupProgram {
    fn load_program(&mut self) -> Result<(), ProgramError>;
    /// What the verifier reports it went through (kernel 5.16+).
    fn verified_instructions(&self) -> Option<u32>;
    /// Attaches to `cgroup` and takes the link out of aya's keeping, as an fd.
    fn attach_fd_link(&mut self, cgroup: &File, name: &'static str) -> Result<FdLink, GuardError>;
}

macro_rules! cgroup_program {
    ($ty:ty) => {
        impl CgroupProgram for $ty {
            fn load_program(&mut self) -> Result<(), ProgramError> {
                self.load()
            }

            fn verified_instructions(&self) -> Option<u32> {
                self.info()
                    .ok()
                    .and_then(|i| i.verified_instruction_count())
            }

            fn attach_fd_link(
                &mut self,
                cgroup: &File,
                name: &'static str,
            ) -> Result<FdLink, GuardError> {
                let id = self
                    // bpf_link_create takes no flags for cgroups (kernel/bpf/cgroup.c,
                    // cgroup_bpf_link_attach): a cgroup link always joins the multi-program
                    // list.
                    .attach(cgroup, CgroupAttachMode::Single)
                    .map_err(program_error("attach", name))?;
                self.take_link(id)
                    .map_err(program_error("attach", name))?
                    .try_into()
                    .map_err(|e| GuardError::Link {
                        what: "take",
                        program: name,
                        source: Box::new(e),
                    })
            }
        }
    };
}

cgroup_program!(CgroupSock);
cgroup_program!(CgroupSockAddr);

/// What `what` (find, load, attach) failing on the program `name` is.
pub(super) fn program_error(
    what: &'static str,
    name: &'static str,
) -> impl Fn(ProgramError) -> GuardError {
    move |e| GuardError::Program {
        what,
        program: name,
        source: Box::new(e),
    }
}

/// The program `name` of the object as a `T` (CgroupSockAddr, CgroupSock): one that is missing
/// or of another type is a "find" error.
pub(super) fn program<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut T, GuardError>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| ProgramError::InvalidName {
            name: name.to_owned(),
        })
        .and_then(TryInto::try_into)
        .map_err(program_error("find", name))
}
