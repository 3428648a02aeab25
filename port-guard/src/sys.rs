//! The few bpf(2) commands aya 0.14 does not expose: a raw program load for probes, opening a pin
//! as a plain fd, and forcing a link off its hook.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

pub const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// Runs bpf(2).
///
/// # Safety
/// `attr` must point at `size` initialised bytes laid out as the `union bpf_attr` member of
/// `cmd`, with every pointer in it valid for the call.
unsafe fn bpf(cmd: libc::c_long, attr: *const u8, size: usize) -> io::Result<libc::c_long> {
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Runs a bpf(2) command that returns a new fd.
///
/// # Safety
/// As for [`bpf`].
pub unsafe fn bpf_fd(cmd: libc::c_long, attr: *const u8, size: usize) -> io::Result<OwnedFd> {
    let fd = unsafe { bpf(cmd, attr, size) }?;
    // SAFETY: the command returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `union bpf_attr` for BPF_OBJ_PIN and BPF_OBJ_GET.
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    _rest: [u8; 48],
}

/// Runs BPF_OBJ_PIN or BPF_OBJ_GET on `path` (with `fd` for a pin).
fn obj(cmd: libc::c_long, path: &Path, fd: u32) -> io::Result<libc::c_long> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd,
        file_flags: 0,
        _rest: [0; 48],
    };
    // SAFETY: attr is a BPF_OBJ_PIN/BPF_OBJ_GET attr; `c` outlives the call.
    unsafe { bpf(cmd, (&attr as *const ObjAttr).cast(), size_of::<ObjAttr>()) }
}

/// Opens a pinned object (map, program or link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let fd = obj(BPF_OBJ_GET, path, 0)?;
    // SAFETY: BPF_OBJ_GET returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Forces a bpf_link off its hook even while other holders keep it open (5.9+).
pub fn link_detach(link: &OwnedFd) -> io::Result<()> {
    #[repr(C)]
    struct LinkDetachAttr {
        link_fd: u32,
        _rest: [u8; 60],
    }
    let attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
        _rest: [0; 60],
    };
    // SAFETY: attr is a BPF_LINK_DETACH attr.
    unsafe {
        bpf(
            BPF_LINK_DETACH,
            (&attr as *const LinkDetachAttr).cast(),
            size_of::<LinkDetachAttr>(),
        )
    }
    .map(drop)
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Reads every entry of a map with BPF_MAP_LOOKUP_BATCH (5.6+), `chunk` entries per syscall:
/// (keys, values), each the entries' bytes back to back. A hash map of N entries costs
/// N / chunk syscalls instead of the 2 N of a get_next_key walk.
pub fn lookup_batch(
    map: std::os::fd::BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    chunk: u32,
) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let chunk = chunk.max(1) as usize;
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    let mut kbuf = vec![0u8; chunk * key_size];
    let mut vbuf = vec![0u8; chunk * value_size];
    // Opaque position tokens (a u32 bucket or index for hash and array maps).
    let mut token_in = [0u64; 1];
    let mut token_out = [0u64; 1];
    let mut first = true;
    loop {
        let mut attr = [0u64; 8];
        attr[0] = if first {
            0
        } else {
            token_in.as_mut_ptr() as u64
        };
        attr[1] = token_out.as_mut_ptr() as u64;
        attr[2] = kbuf.as_mut_ptr() as u64;
        attr[3] = vbuf.as_mut_ptr() as u64;
        attr[4] = chunk as u64 | (u64::from(map.as_raw_fd() as u32) << 32);
        // SAFETY: a BPF_MAP_LOOKUP_BATCH attr whose buffers hold `chunk` keys and values and
        // whose tokens are 8 bytes, more than the kernel writes.
        let r = unsafe {
            bpf(
                BPF_MAP_LOOKUP_BATCH,
                attr.as_ptr().cast(),
                size_of_val(&attr),
            )
        };
        let count = (attr[4] & 0xffff_ffff) as usize;
        let done = match r {
            Ok(_) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        let count = count.min(chunk);
        keys.extend_from_slice(&kbuf[..count * key_size]);
        values.extend_from_slice(&vbuf[..count * value_size]);
        if done {
            return Ok((keys, values));
        }
        token_in = token_out;
        first = false;
    }
}

/// Every entry of a map whose keys are `K` and values `V`, read with [`lookup_batch`], `chunk`
/// entries per syscall.
pub fn read_all<K: aya::Pod, V: aya::Pod>(
    map: std::os::fd::BorrowedFd<'_>,
    chunk: u32,
) -> io::Result<Vec<(K, V)>> {
    let (ks, vs) = lookup_batch(map, size_of::<K>(), size_of::<V>(), chunk)?;
    Ok(ks
        .chunks_exact(size_of::<K>())
        .zip(vs.chunks_exact(size_of::<V>()))
        // SAFETY: K and V are Pod: any bytes of their size are a value.
        .map(|(k, v)| unsafe {
            (
                std::ptr::read_unaligned(k.as_ptr().cast::<K>()),
                std::ptr::read_unaligned(v.as_ptr().cast::<V>()),
            )
        })
        .collect())
}

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;

/// Pins the object behind `fd` (map, program or link) at `path`.
pub fn obj_pin(fd: std::os::fd::BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    obj(BPF_OBJ_PIN, path, fd.as_raw_fd() as u32).map(drop)
}

/// `struct bpf_link_info` up to the cgroup member of its union (kernel 5.8+).
#[repr(C)]
#[derive(Default)]
struct LinkInfoRaw {
    type_: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    /// `cgroup.cgroup_id`: 0 once the link was detached (BPF_LINK_DETACH, or its cgroup removed).
    cgroup_id: u64,
    attach_type: u32,
    _rest: [u32; 13],
}

/// What a cgroup link is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub link_id: u32,
    pub prog_id: u32,
    /// 0 when detached.
    pub cgroup_id: u64,
}

/// BPF_OBJ_GET_INFO_BY_FD into `info` (the kernel fills what it has of its struct, up to
/// `info.len()` bytes).
fn obj_info(fd: std::os::fd::BorrowedFd<'_>, info: &mut [u8]) -> io::Result<()> {
    let mut attr = [0u64; 2];
    attr[0] = u64::from(fd.as_raw_fd() as u32) | ((info.len() as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: a BPF_OBJ_GET_INFO_BY_FD attr whose buffer holds info_len bytes.
    unsafe {
        bpf(
            BPF_OBJ_GET_INFO_BY_FD,
            attr.as_ptr().cast(),
            size_of_val(&attr),
        )
    }
    .map(drop)
}

/// Reads a cgroup link's state from its fd.
pub fn link_state(link: std::os::fd::BorrowedFd<'_>) -> io::Result<LinkState> {
    let mut info = LinkInfoRaw::default();
    // SAFETY: LinkInfoRaw is plain integers: any bytes the kernel writes are a value.
    obj_info(link, unsafe {
        std::slice::from_raw_parts_mut(
            (&mut info as *mut LinkInfoRaw).cast::<u8>(),
            size_of::<LinkInfoRaw>(),
        )
    })?;
    Ok(LinkState {
        link_id: info.id,
        prog_id: info.prog_id,
        cgroup_id: info.cgroup_id,
    })
}

/// `BPF_CGROUP_INET4_BIND` and `BPF_CGROUP_INET6_BIND`.
pub const ATTACH_INET4_BIND: u32 = 8;
pub const ATTACH_INET6_BIND: u32 = 9;

/// The ids of the programs attached directly to the cgroup `cgroup` for `attach_type`.
pub fn cgroup_prog_ids(
    cgroup: std::os::fd::BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    #[repr(C)]
    struct QueryAttr {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _rest: [u8; 36],
    }
    let mut attr = QueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        _rest: [0; 36],
    };
    // SAFETY: a BPF_PROG_QUERY attr whose id buffer holds prog_cnt entries.
    unsafe {
        bpf(
            BPF_PROG_QUERY,
            (&mut attr as *mut QueryAttr).cast(),
            size_of::<QueryAttr>(),
        )
    }?;
    ids.truncate((attr.prog_cnt as usize).min(ids.len()));
    Ok(ids)
}

/// The name of program `id` (at most 15 bytes, as the kernel keeps it).
pub fn prog_name(id: u32) -> io::Result<String> {
    let attr: [u32; 4] = [id, 0, 0, 0];
    // SAFETY: a BPF_PROG_GET_FD_BY_ID attr.
    let fd = unsafe {
        bpf_fd(
            BPF_PROG_GET_FD_BY_ID,
            attr.as_ptr().cast(),
            size_of_val(&attr),
        )
    }?;
    // struct bpf_prog_info: name is at offset 64, 16 bytes; read the first 80 bytes.
    let mut info = [0u8; 80];
    obj_info(fd.as_fd(), &mut info)?;
    let name = &info[64..80];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// Forks a child that moves itself into the cgroup of `procs` (its `cgroup.procs`), enters the
/// network namespace `netns_fd`, and binds a UDP socket to 0.0.0.0:0 once, then exits. Waits for
/// it; the bind's own result does not matter (a program attached to the cgroup sees it first).
pub fn bind_in_cgroup_and_netns(procs: &Path, netns_fd: i32) -> io::Result<()> {
    let procs = CString::new(procs.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    // SAFETY: fork; the child makes only async-signal-safe syscalls on data prepared before the
    // fork, then _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: as above: the child.
        unsafe {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(10);
            }
            if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                libc::_exit(11);
            }
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if s < 0 {
                libc::_exit(12);
            }
            libc::bind(
                s,
                (&addr as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    if unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
        (true, 0) => Ok(()),
        (true, 10) => Err(io::Error::other("the child could not enter the cgroup")),
        (true, 11) => Err(io::Error::other("the child could not enter the netns")),
        (true, 12) => Err(io::Error::other("the child could not make a socket")),
        _ => Err(io::Error::other(format!(
            "the child ended with status {status}"
        ))),
    }
}

const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
/// `BPF_F_ALLOW_MULTI`: the program joins the cgroup's list for its hook.
pub const BPF_F_ALLOW_MULTI: u32 = 2;
/// `BPF_CGROUP_INET4_POST_BIND` and `BPF_CGROUP_INET6_POST_BIND`.
pub const ATTACH_INET4_POST_BIND: u32 = 12;
pub const ATTACH_INET6_POST_BIND: u32 = 13;

/// `union bpf_attr` for BPF_PROG_ATTACH and BPF_PROG_DETACH.
#[repr(C)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    _rest: [u8; 44],
}

fn attach_cmd(
    cmd: libc::c_long,
    cgroup: std::os::fd::BorrowedFd<'_>,
    prog: std::os::fd::BorrowedFd<'_>,
    attach_type: u32,
    flags: u32,
) -> io::Result<()> {
    let attr = AttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        attach_flags: flags,
        replace_bpf_fd: 0,
        _rest: [0; 44],
    };
    // SAFETY: a BPF_PROG_ATTACH/BPF_PROG_DETACH attr.
    unsafe {
        bpf(
            cmd,
            (&attr as *const AttachAttr).cast(),
            size_of::<AttachAttr>(),
        )
    }
    .map(drop)
}

/// Attaches `prog` to `cgroup` for `attach_type` the legacy way (BPF_PROG_ATTACH): the
/// attachment belongs to the cgroup, not to an fd, and stays until [`prog_detach`].
pub fn prog_attach(
    cgroup: std::os::fd::BorrowedFd<'_>,
    prog: std::os::fd::BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<()> {
    attach_cmd(
        BPF_PROG_ATTACH,
        cgroup,
        prog,
        attach_type,
        BPF_F_ALLOW_MULTI,
    )
}

/// Detaches `prog` from `cgroup`'s list for `attach_type`.
pub fn prog_detach(
    cgroup: std::os::fd::BorrowedFd<'_>,
    prog: std::os::fd::BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<()> {
    attach_cmd(BPF_PROG_DETACH, cgroup, prog, attach_type, 0)
}

/// An fd of program `id`.
pub fn prog_fd(id: u32) -> io::Result<OwnedFd> {
    let attr: [u32; 4] = [id, 0, 0, 0];
    // SAFETY: a BPF_PROG_GET_FD_BY_ID attr.
    unsafe {
        bpf_fd(
            BPF_PROG_GET_FD_BY_ID,
            attr.as_ptr().cast(),
            size_of_val(&attr),
        )
    }
}

const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;

/// The id of the BPF object (map, program, link) behind `fd`: `id` is the second u32 of every
/// `bpf_*_info`.
pub fn obj_id(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<u32> {
    let mut info = [0u8; 8];
    obj_info(fd, &mut info)?;
    Ok(u32::from_ne_bytes(info[4..8].try_into().expect("4 bytes")))
}

/// An fd of map `id` (while something else keeps the map alive).
pub fn map_fd(id: u32) -> io::Result<OwnedFd> {
    let attr: [u32; 4] = [id, 0, 0, 0];
    // SAFETY: a BPF_MAP_GET_FD_BY_ID attr.
    unsafe {
        bpf_fd(
            BPF_MAP_GET_FD_BY_ID,
            attr.as_ptr().cast(),
            size_of_val(&attr),
        )
    }
}

/// The socket's cookie (SO_COOKIE): what `bpf_get_socket_cookie` returns for it.
pub fn socket_cookie(sock: std::os::fd::BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 of the given length.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// `SIOCGSKNS`: an fd of the network namespace a socket lives in (4.9+).
const SIOCGSKNS: libc::c_ulong = 0x894C;

/// The inode of the network namespace `sock` lives in.
pub fn socket_netns_inode(sock: std::os::fd::BorrowedFd<'_>) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: an ioctl without argument that returns a new fd.
    let fd = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGSKNS) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    let ns = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(ns.metadata()?.ino())
}
