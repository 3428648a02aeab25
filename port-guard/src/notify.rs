//! systemd's readiness protocol (sd_notify), for `Type=notify`: one datagram to $NOTIFY_SOCKET.
//! Without the variable (not under systemd) every call is a no-op.

use std::os::{
    linux::net::SocketAddrExt as _,
    unix::net::{SocketAddr, UnixDatagram},
};

/// Sends `state` (e.g. "READY=1\nSTATUS=...") to systemd, if it is listening.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| {
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(state.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        log::warn!("telling systemd {state:?} through {path}: {e}");
    }
}

/// Sends `state` with `fds` attached (SCM_RIGHTS): `FDSTORE=1\nFDNAME=...` puts them in the
/// service manager's fd store, from which a restarted daemon gets them back (`LISTEN_FDS`).
/// Returns whether the service manager took the message (false without one).
pub fn notify_with_fds(state: &str, fds: &[std::os::fd::BorrowedFd<'_>]) -> bool {
    use std::os::fd::AsRawFd as _;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| {
        let sock = UnixDatagram::unbound()?;
        sock.connect_addr(&addr)?;
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let payload = std::mem::size_of_val(raw.as_slice());
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
        let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
        let mut control = vec![0u8; space];
        let mut iov = libc::iovec {
            iov_base: state.as_ptr() as *mut libc::c_void,
            iov_len: state.len(),
        };
        // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the sendmsg.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer has room for one header and `payload` bytes.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(cmsg).cast(), raw.len());
        }
        // SAFETY: a valid connected socket and a msghdr built above.
        if unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    });
    if let Err(e) = &sent {
        log::warn!(
            "handing {} fds to systemd's fd store through {path}: {e}",
            fds.len()
        );
    }
    sent.is_ok()
}

/// CLOCK_MONOTONIC in microseconds, for RELOADING=1's MONOTONIC_USEC.
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}
