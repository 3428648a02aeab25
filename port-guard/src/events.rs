//! Denial events from the ring buffer, turned into the log line of SPEC.md.

use port_guard_common::{DenialEvent, ACTION_AUDITED, PROTO_UDP};

use crate::policy::Errno;

/// Decodes one ring buffer record.
pub fn decode(bytes: &[u8]) -> Option<DenialEvent> {
    if bytes.len() < size_of::<DenialEvent>() {
        return None;
    }
    // SAFETY: DenialEvent is plain old data and the length was checked; read_unaligned copes
    // with any alignment of the ring buffer record.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DenialEvent>()) })
}

/// The command name, up to its NUL.
pub fn comm(ev: &DenialEvent) -> String {
    let end = ev
        .comm
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(ev.comm.len());
    String::from_utf8_lossy(&ev.comm[..end])
        .chars()
        .map(|c| {
            if c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// `denied bind port=49152/tcp family=ipv6 pid=4242 comm=glusterfsd cgroup=/x errno=EADDRINUSE`,
/// or in audit mode `audit: would deny bind ...` with the errno enforce mode would give.
pub fn log_line(ev: &DenialEvent, cgroup: &str, audit_errno: Errno, retval: bool) -> String {
    let audit = ev.action == ACTION_AUDITED;
    let errno = if audit {
        if retval {
            audit_errno
        } else {
            Errno::Eperm
        }
    } else {
        Errno::from_raw(ev.errno).unwrap_or(Errno::Eperm)
    };
    format!(
        "{} bind port={}/{} family=ipv{} pid={} comm={} cgroup={} errno={}{}",
        if audit { "audit: would deny" } else { "denied" },
        ev.port,
        if u16::from(ev.protocol) == PROTO_UDP {
            "udp"
        } else {
            "tcp"
        },
        ev.family,
        ev.tgid,
        comm(ev),
        cgroup,
        errno.c_name(),
        if ev.leased != 0 {
            " leased=other-cgroup"
        } else {
            ""
        },
    )
}

#[cfg(test)]
mod tests {
    use port_guard_common::{ACTION_DENIED, PROTO_TCP};

    use super::*;

    fn event(action: u8, errno: u32) -> DenialEvent {
        let mut comm = [0u8; 16];
        comm[..10].copy_from_slice(b"glusterfsd");
        DenialEvent {
            cgroup_id: 7,
            pid: 4243,
            tgid: 4242,
            port: 49152,
            protocol: PROTO_TCP as u8,
            family: 6,
            action,
            leased: 0,
            _pad: [0; 2],
            errno,
            comm,
        }
    }

    #[test]
    fn formats_the_spec_line() {
        let ev = event(ACTION_DENIED, libc::EADDRINUSE as u32);
        assert_eq!(
            log_line(&ev, "/system.slice/glusterd.service", Errno::Eaddrinuse, true),
            "denied bind port=49152/tcp family=ipv6 pid=4242 comm=glusterfsd cgroup=/system.slice/glusterd.service errno=EADDRINUSE"
        );
        let ev = event(ACTION_AUDITED, 0);
        assert!(log_line(&ev, "/a", Errno::Eacces, true)
            .starts_with("audit: would deny bind port=49152/tcp"));
        assert!(log_line(&ev, "/a", Errno::Eacces, true).ends_with("errno=EACCES"));
        assert!(log_line(&ev, "/a", Errno::Eacces, false).ends_with("errno=EPERM"));
    }

    #[test]
    fn decodes_records() {
        let ev = event(ACTION_DENIED, 1);
        // SAFETY: reading the bytes of a POD value.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&ev as *const DenialEvent).cast::<u8>(),
                size_of::<DenialEvent>(),
            )
        };
        let back = decode(bytes).unwrap();
        assert_eq!(
            (back.tgid, back.port, comm(&back)),
            (4242, 49152, "glusterfsd".into())
        );
        assert!(decode(&bytes[..10]).is_none());
    }
}
