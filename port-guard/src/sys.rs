//! The few bpf(2) commands aya 0.14 does not expose: a raw program load for probes, opening a pin
//! as a plain fd, and forcing a link off its hook.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
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

/// Opens a pinned object (map, program or link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        _rest: [u8; 48],
    }
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        _rest: [0; 48],
    };
    // SAFETY: attr is a BPF_OBJ_GET attr; `c` outlives the call.
    unsafe {
        bpf_fd(
            BPF_OBJ_GET,
            (&attr as *const ObjGetAttr).cast(),
            size_of::<ObjGetAttr>(),
        )
    }
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
