//! Loading, adopting, keeping and unloading the guard. The kernel is the state store: the maps
//! and the two cgroup links are pinned under the pin dir ([`crate::pin`]), and everything here
//! works from them.
//!
//! Load and adopt are one path. The object is loaded with its maps pinned by name, so a pinned
//! map (leases included) is reused rather than created. The policy is written into the maps, then
//! new bind4/bind6 links are attached next to any old ones (multi-attach), pinned under a
//! temporary name and renamed over the old pins: the old link goes away only once the new one
//! enforces, so a restart never leaves an unguarded instant, and a new binary replaces the old
//! programs in place.
//!
//! The daemon keeps an fd of every pin it made or adopted ([`Guard::check_pins`]): a pin that
//! vanishes while the links are still attached is put back from it; links that were detached
//! (`port-guard unload`) end the daemon.

use std::{
    fs::{self, File},
    io,
    os::fd::{AsFd as _, OwnedFd},
};

use aya::{
    maps::{Array, MapData, MapError},
    programs::{
        links::{CgroupAttachMode, FdLink, LinkError},
        CgroupSock, CgroupSockAddr, ProgramError,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use log::{info, warn};
pub use port_guard_common::PINNED_MAPS;
use port_guard_common::{
    ABI_VERSION, EVENTS_BYTES, GLOBAL_SENTINEL_PORT, GLOBAL_USE_NETNS, GLOBAL_USE_RETVAL,
    MAP_EVENTS, MAP_NETNS_LEARN, MAP_OFFENDERS_OLD, PROG_NETNS_LEARN,
};

use crate::{
    cgroup::{Cgroup2, CgroupError, CgroupPath},
    ephemeral::EphemeralError,
    error::{IoContext as _, IoError},
    leases::migrate::Migration,
    maps::{Maps, MapsError, Resolved},
    netns::Netns,
    pin::{PinDir, PinError, LINKS, POST_LINKS, RELEASE_LINKS},
    probe::Features,
    sys,
};

/// The size of the pinned event ring buffer where it differs from this build's
/// ([`EVENTS_BYTES`]): a guard loaded by another version keeps the one it made.
fn pinned_events_size(pin: &PinDir) -> Option<u32> {
    let data = MapData::from_pin(pin.file(MAP_EVENTS)).ok()?;
    let bytes = data.info().ok()?.max_entries();
    (bytes != EVENTS_BYTES).then_some(bytes)
}

/// What `what` (find, load, attach) failing on the program `name` is.
fn program_error(what: &'static str, name: &'static str) -> impl Fn(ProgramError) -> GuardError {
    move |e| GuardError::Program {
        what,
        program: name,
        source: Box::new(e),
    }
}

/// The program `name` of the object as a `T` (CgroupSockAddr, CgroupSock): one that is missing
/// or of another type is a "find" error.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, GuardError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| ProgramError::InvalidName {
            name: name.to_owned(),
        })
        .and_then(TryInto::try_into)
        .map_err(program_error("find", name))
}

/// The eBPF object, built from port-guard-ebpf by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/port-guard"));

/// A guard problem at run time (exit status 1 unless it wraps a usage error).
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// Loading the object failed.
    #[error("loading the eBPF object")]
    Load(#[source] Box<EbpfError>),
    /// A program could not be loaded or attached.
    #[error("{what} {program}")]
    Program {
        what: &'static str,
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    /// A link could not be made.
    #[error("{what} link of {program}")]
    Link {
        what: &'static str,
        program: &'static str,
        #[source]
        source: Box<LinkError>,
    },
    /// A link could not be pinned.
    #[error("pin link of {program}")]
    PinLink {
        program: &'static str,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    /// The pin dir cannot be used.
    #[error(transparent)]
    PinDir(#[from] PinError),
    /// A map problem.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// A cgroup problem.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// Restoring the ephemeral port sysctl failed.
    #[error(transparent)]
    Ephemeral(#[from] EphemeralError),
    /// A filesystem or syscall failure.
    #[error(transparent)]
    Io(#[from] IoError),
}

impl GuardError {
    pub fn is_usage(&self) -> bool {
        match self {
            GuardError::Maps(e) => e.is_usage(),
            GuardError::Cgroup(e) => e.is_usage(),
            GuardError::PinDir(e) => e.is_usage(),
            _ => false,
        }
    }
}

/// A pin and what it names: a link's fd, or a map's id (the daemon's own fds keep its maps
/// alive; one fd per map is enough, and under a low fd limit every fd counts).
struct Held {
    name: String,
    what: Pinned,
}

enum Pinned {
    Link(OwnedFd),
    Map(u32),
}

/// What [`Guard::check_pins`] found.
#[derive(Debug)]
pub enum PinCheck {
    /// Every pin is in place and both links are attached.
    Intact,
    /// Pins had vanished while the links were attached; they were pinned again.
    Repinned(Vec<String>),
    /// The links were detached and their pins removed: `port-guard unload`.
    Unloaded,
    /// A link was detached while its pin remains: only a restart attaches again.
    Detached(Vec<String>),
}

/// A loaded guard: the object (its programs and the event ring buffer) and the maps.
pub struct Guard {
    pub ebpf: Ebpf,
    pub maps: Maps,
    /// Whether pins of an earlier guard were found and taken over.
    pub adopted: bool,
    /// The ranges whose counters started with this load (see [`Maps::write_policy`]).
    pub fresh_counters: Vec<(u16, u16)>,
    held: Vec<Held>,
}

impl Guard {
    /// Loads the object with its maps pinned (reused when already pinned), writes the policy,
    /// runs `before_attach` (which writes the guarded network namespaces: it needs the loaded
    /// object to learn their cookies) and attaches. On a first load, any failure removes
    /// everything this call created.
    pub fn start(
        pin: &PinDir,
        r: &Resolved,
        features: Features,
        cg: &Cgroup2,
        before_attach: impl FnOnce(&mut Guard) -> Result<(), GuardError>,
    ) -> Result<Guard, GuardError> {
        let adopted = pin.exists();
        let mut migration = None;
        if adopted {
            // Refuse a foreign layout before aya reuses its maps; layout 2 is migrated.
            match Maps::open(pin) {
                Ok(_) => crate::leases::migrate::remove_leftover(pin),
                Err(MapsError::Abi { found: 2, .. }) => {
                    info!("the guard pinned at {} uses map layout 2: its leases move to layout {ABI_VERSION} in place while it keeps enforcing", pin.path().display());
                    migration = Some(Migration::prepare(pin)?);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let result = Guard::start_inner(
            pin,
            r,
            features,
            cg,
            adopted,
            migration.as_mut(),
            before_attach,
        );
        match (&result, migration) {
            (Ok(_), Some(m)) => {
                // The new links replaced the old ones: the late writes, then the old map goes.
                match Maps::open(pin) {
                    Ok(mut maps) => m.finish(maps.leases_mut()),
                    Err(e) => warn!(
                        "finishing the lease migration: {e}; {} stays pinned until the next start",
                        crate::leases::migrate::ASIDE
                    ),
                }
            }
            (Err(_), Some(m)) => m.abort(),
            _ => {}
        }
        if result.is_err() && !adopted {
            if let Err(e) = unload(pin) {
                warn!("cleaning up after a failed start: {e}");
            }
        }
        result
    }

    fn start_inner(
        pin: &PinDir,
        r: &Resolved,
        features: Features,
        cg: &Cgroup2,
        adopted: bool,
        migration: Option<&mut Migration>,
        before_attach: impl FnOnce(&mut Guard) -> Result<(), GuardError>,
    ) -> Result<Guard, GuardError> {
        let use_retval: u32 = features.set_retval.into();
        let use_netns: u32 = features.netns_cookie.into();
        let sentinel = features.uses_sentinel(&r.policy);
        let sentinel_port: u32 = if sentinel {
            r.policy.sentinel_port.into()
        } else {
            0
        };
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
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| GuardError::Load(Box::new(e)))?;
        let mut maps = Maps::from_ebpf(&mut ebpf)?;
        if let Some(m) = migration {
            // Before the config says the new layout, and before the new programs attach.
            m.copy(maps.leases_mut()).map_err(MapsError::from)?;
        }
        let fresh_counters = maps.write_policy(r, features)?;
        let mut g = Guard {
            ebpf,
            maps,
            adopted,
            fresh_counters,
            held: Vec::new(),
        };
        before_attach(&mut g)?;

        let dir = cg.dir(&r.policy.attach);
        let cgroup = File::open(&dir).at("open cgroup", &dir)?;
        // Load and attach the programs first, holding the links by fd only: a crash up to here
        // detaches them (the kernel drops a link with its last fd), so a first load is either
        // complete or leaves nothing attached. Loading (the verifier) is the slow part. The
        // post_bind programs go first: from the instant a new bind program may rewrite a refusal
        // to the sentinel port, the rewritten bind must be unable to succeed there.
        // The same steps for both program types (aya gives them no common trait).
        macro_rules! load_attach {
            ($ty:ty, $name:expr) => {{
                let name = $name;
                let prog: &mut $ty = program(&mut g.ebpf, name)?;
                let t = std::time::Instant::now();
                prog.load().map_err(program_error("load", name))?;
                log::debug!(
                    "{name} loaded in {} ms ({} instructions verified)",
                    t.elapsed().as_millis(),
                    prog.info()
                        .ok()
                        .and_then(|i| i.verified_instruction_count())
                        .map_or("?".into(), |n| n.to_string())
                );
                let id = prog
                    // bpf_link_create takes no flags for cgroups (kernel/bpf/cgroup.c,
                    // cgroup_bpf_link_attach): a cgroup link always joins the multi-program
                    // list.
                    .attach(&cgroup, CgroupAttachMode::Single)
                    .map_err(program_error("attach", name))?;
                let link: FdLink = prog
                    .take_link(id)
                    .map_err(program_error("attach", name))?
                    .try_into()
                    .map_err(|e| GuardError::Link {
                        what: "take",
                        program: name,
                        source: Box::new(e),
                    })?;
                link
            }};
        }
        let mut links = Vec::new();
        // The release program before the bind programs: every socket a new bind program charges
        // to a share is uncharged when it is released.
        for (name, link_name) in RELEASE_LINKS {
            links.push((name, link_name, load_attach!(CgroupSock, name)));
        }
        for (name, link_name) in POST_LINKS.iter().copied().filter(|_| sentinel) {
            links.push((name, link_name, load_attach!(CgroupSock, name)));
        }
        for (name, link_name) in LINKS {
            links.push((name, link_name, load_attach!(CgroupSockAddr, name)));
        }
        // Then pin both, back to back: the only window in which a crash leaves one hook pinned
        // without the other is between these two syscalls; `PinDir::recover` completes it at the
        // next start. Where old links are pinned, the new ones go under `_new` and are renamed
        // over them: the old link detaches only once the new one is in place.
        let mut staged = Vec::new();
        for (name, link_name, link) in links {
            let dst = pin.file(link_name);
            let staging = pin.file(&format!("{link_name}_new"));
            let at = if fs::symlink_metadata(&dst).is_ok() {
                staging.clone()
            } else {
                dst.clone()
            };
            let _ = fs::remove_file(&staging);
            let pinned = link.pin(&at).map_err(|e| GuardError::PinLink {
                program: name,
                source: Box::new(e),
            })?;
            staged.push((at, dst, pinned));
        }
        for (at, dst, pinned) in staged {
            if at != dst {
                fs::rename(&at, &dst).at("rename pin to", &dst)?;
            }
            drop(pinned);
        }
        // The old guard's post_bind links, when this one refuses without the sentinel: its bind
        // programs, the only ones that rewrote, are gone with their pins.
        if !sentinel {
            remove_links(pin, &POST_LINKS)?;
        }
        // The event budget of older programs (by cgroup alone), whose programs are gone now.
        let old = pin.file(MAP_OFFENDERS_OLD);
        if fs::symlink_metadata(&old).is_ok() {
            fs::remove_file(&old).at("remove pin", &old)?;
        }
        // What every pin names, kept for as long as the daemon runs.
        let mut held = Vec::new();
        for (name, link) in PINNED_MAPS
            .iter()
            .map(|m| (*m, false))
            .chain(LINKS.iter().map(|(_, l)| (*l, true)))
            .chain(RELEASE_LINKS.iter().map(|(_, l)| (*l, true)))
            .chain(
                POST_LINKS
                    .iter()
                    .filter(|_| sentinel)
                    .map(|(_, l)| (*l, true)),
            )
        {
            let path = pin.file(name);
            let fd = sys::obj_get(&path).at("open pin", &path)?;
            let what = if link {
                Pinned::Link(fd)
            } else {
                Pinned::Map(sys::obj_id(fd.as_fd()).at("read the id of", &path)?)
            };
            held.push(Held {
                name: name.to_owned(),
                what,
            });
        }
        g.held = held;
        Ok(g)
    }

    /// The cookie the kernel gives the network namespace `ns` (what the programs compare with
    /// the guarded set). Learnt on every kernel the same way: the helper program is attached to
    /// a scratch cgroup, a child process in it enters `ns` and binds once, and the program
    /// writes the cookie it sees (SO_NETNS_COOKIE would need 5.14).
    pub fn cookie_of(
        &mut self,
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
        let result = self.attach_learner(&dir).and_then(|link| {
            let learnt = self.learn(&dir, ns);
            if let Ok(p) = self.learner() {
                let _ = p.detach(link);
            }
            learnt
        });
        let _ = fs::remove_dir(&dir);
        result
    }

    /// The helper program, loaded.
    fn learner(&mut self) -> Result<&mut CgroupSockAddr, GuardError> {
        let prog: &mut CgroupSockAddr = program(&mut self.ebpf, PROG_NETNS_LEARN)?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(program_error("load", PROG_NETNS_LEARN))?;
        }
        Ok(prog)
    }

    /// Attaches the helper program to the scratch cgroup `dir`.
    fn attach_learner(
        &mut self,
        dir: &std::path::Path,
    ) -> Result<aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId, GuardError> {
        let cgroup = File::open(dir).at("open cgroup", dir)?;
        self.learner()?
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(program_error("attach", PROG_NETNS_LEARN))
    }

    /// A child in the scratch cgroup `dir` enters `ns` and binds; the cookie the helper wrote.
    fn learn(&mut self, dir: &std::path::Path, ns: &Netns) -> Result<u64, GuardError> {
        let map_err = |e| {
            GuardError::Maps(MapsError::Map {
                name: MAP_NETNS_LEARN,
                source: Box::new(e),
            })
        };
        let mut learnt: Array<&mut MapData, u64> = self
            .ebpf
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

    /// Whether this daemon's links are attached, from its own fds (positive evidence both ways:
    /// an error reading one is an error).
    fn detached_links(&self) -> io::Result<Vec<String>> {
        let mut detached = Vec::new();
        for h in &self.held {
            if let Pinned::Link(fd) = &h.what {
                if sys::link_state(fd.as_fd())?.cgroup_id == 0 {
                    detached.push(h.name.clone());
                }
            }
        }
        Ok(detached)
    }

    /// Looks at the pins: puts back any that vanished while the links are attached.
    pub fn check_pins(&self, pin: &PinDir) -> Result<PinCheck, GuardError> {
        let mut missing = Vec::new();
        for h in &self.held {
            let path = pin.file(&h.name);
            match fs::symlink_metadata(&path) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(h),
                Err(e) => return Err(IoError::new("stat", path, e).into()),
            }
        }
        let detached = self.detached_links().at("read link info of", pin.path())?;
        if !detached.is_empty() {
            let links_gone = missing.iter().any(|h| matches!(h.what, Pinned::Link(_)));
            return Ok(if links_gone {
                PinCheck::Unloaded
            } else {
                PinCheck::Detached(detached)
            });
        }
        if missing.is_empty() {
            return Ok(PinCheck::Intact);
        }
        pin.recreate()?;
        let mut done = Vec::new();
        for h in missing {
            let path = pin.file(&h.name);
            match &h.what {
                Pinned::Link(fd) => sys::obj_pin(fd.as_fd(), &path),
                Pinned::Map(id) => sys::map_fd(*id).and_then(|fd| sys::obj_pin(fd.as_fd(), &path)),
            }
            .at("pin again", &path)?;
            done.push(h.name.clone());
        }
        Ok(PinCheck::Repinned(done))
    }
}

/// Detaches the links of `links` (and any staged `_new` of them) and removes their pins.
fn remove_links(pin: &PinDir, links: &[(&str, &str)]) -> Result<(), GuardError> {
    for (_, link_name) in links {
        for name in [(*link_name).to_owned(), format!("{link_name}_new")] {
            let path = pin.file(&name);
            if fs::symlink_metadata(&path).is_err() {
                continue;
            }
            // Detach now, even if a running daemon still holds the link open.
            match sys::obj_get(&path).and_then(|fd| sys::link_detach(&fd)) {
                Ok(()) => {}
                Err(e) => warn!(
                    "detaching {}: {e}; removing its pin instead",
                    path.display()
                ),
            }
            fs::remove_file(&path).at("remove pin", &path)?;
        }
    }
    Ok(())
}

/// Detaches the links and removes every pin and the pin dir.
pub fn unload(pin: &PinDir) -> Result<(), GuardError> {
    unload_with(pin, false)
}

/// [`unload`], forgetting (with `forget_unreachable`) the sysctl changes of network namespaces
/// nothing reaches any more.
pub fn unload_with(pin: &PinDir, forget_unreachable: bool) -> Result<(), GuardError> {
    pin.verify()?;
    // First, so that a failure (another network namespace) leaves the guard whole.
    for line in crate::ephemeral::restore(pin.path(), forget_unreachable)? {
        info!("{line}");
    }
    // The bind programs first: the post_bind ones must outlive every rewrite, and the release
    // one every charge.
    remove_links(pin, &LINKS)?;
    remove_links(pin, &POST_LINKS)?;
    remove_links(pin, &RELEASE_LINKS)?;
    let entries = fs::read_dir(pin.path()).at("read pin dir", pin.path())?;
    for entry in entries {
        let path = entry.at("read pin dir", pin.path())?.path();
        fs::remove_file(&path).at("remove pin", &path)?;
    }
    fs::remove_dir(pin.path()).at("remove pin dir", pin.path())?;
    // What the daemon recorded of the guarded namespaces for spawn and check, when the
    // counters started (they went with the maps), and the daemon's record and counts: nothing
    // of a guard that is gone is left to describe it.
    for what in ["netns", "counters", "daemon", "stats"] {
        let record = crate::state::path(pin.path(), what);
        if let Err(e) = crate::state::remove(&record) {
            warn!("{e}");
        }
    }
    Ok(())
}
