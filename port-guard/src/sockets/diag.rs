//! Netlink sock_diag (NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY): one dump of a family and
//! protocol, as rows of (local port, state, inode, cookie).

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use super::Row;

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

#[repr(C)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: [u8; 48],
}

/// Dumps one family/protocol through sock_diag.
pub(super) fn dump(family: u8, protocol: u8, states: u32) -> io::Result<Vec<Row>> {
    let fd = open()?;
    request(&fd, family, protocol, states)?;
    receive(&fd)
}

/// A sock_diag socket.
fn open() -> io::Result<OwnedFd> {
    // SAFETY: plain socket calls on an fd owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Asks for a dump of every socket of `family` and `protocol` in `states`.
fn request(fd: &OwnedFd, family: u8, protocol: u8, states: u32) -> io::Result<()> {
    #[repr(C)]
    struct Req {
        hdr: NlMsgHdr,
        body: InetDiagReqV2,
    }
    let req = Req {
        hdr: NlMsgHdr {
            len: size_of::<Req>() as u32,
            kind: SOCK_DIAG_BY_FAMILY,
            flags: NLM_F_REQUEST | NLM_F_DUMP,
            seq: 1,
            pid: 0,
        },
        body: InetDiagReqV2 {
            family,
            protocol,
            ext: 0,
            pad: 0,
            states,
            id: [0; 48],
        },
    };
    // SAFETY: sending a fully initialised request.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            (&req as *const Req).cast(),
            size_of::<Req>(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads the dump's datagrams until the one that says it is done.
fn receive(fd: &OwnedFd) -> io::Result<Vec<Row>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receiving into our buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if read_messages(&buf[..n as usize], &mut out)? {
            return Ok(out);
        }
    }
}

/// The messages of one datagram, their sockets onto `out`; whether the dump is done.
fn read_messages(buf: &[u8], out: &mut Vec<Row>) -> io::Result<bool> {
    let n = buf.len();
    let mut off = 0;
    while off + size_of::<NlMsgHdr>() <= n {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
        if len < size_of::<NlMsgHdr>() || off + len > n {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "truncated sock_diag message",
            ));
        }
        let body = &buf[off + size_of::<NlMsgHdr>()..off + len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = i32::from_ne_bytes(body[..4].try_into().unwrap());
                return Err(io::Error::from_raw_os_error(-errno));
            }
            SOCK_DIAG_BY_FAMILY if body.len() >= 4 + 48 + 20 => out.push(socket_row(body)),
            _ => {}
        }
        off += (len + 3) & !3;
    }
    Ok(false)
}

/// One socket of the dump, from its inet_diag_msg: family, state, timer, retrans, id { sport
/// be16, ... }, expires, rqueue, wqueue, uid, inode.
fn socket_row(body: &[u8]) -> Row {
    let state = body[1];
    let sport = u16::from_be_bytes([body[4], body[5]]);
    let inode = u32::from_ne_bytes(body[4 + 48 + 16..4 + 48 + 20].try_into().unwrap());
    // id: sport, dport, src[16], dst[16], if, cookie[2] (u32 each, native).
    let lo = u32::from_ne_bytes(body[4 + 40..4 + 44].try_into().unwrap());
    let hi = u32::from_ne_bytes(body[4 + 44..4 + 48].try_into().unwrap());
    let cookie = u64::from(lo) | (u64::from(hi) << 32);
    (sport, state, u64::from(inode), cookie)
}
