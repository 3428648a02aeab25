//! The kernel's own per-program run time (`run_time_ns`/`run_cnt` of `bpf_prog_info`), counted
//! only while run-time statistics are on. They are switched on with `BPF_ENABLE_STATS`, which
//! holds them on for as long as its fd is open and leaves `kernel.bpf_stats_enabled` as it was:
//! the bench never writes the sysctl, and a killed bench cannot leave statistics on.
//!
//! # Minimum kernel version
//! 5.8 (`BPF_ENABLE_STATS`).

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result};
use aya::programs::links::{FdLink, PinnedLink};
use aya_obj::generated::bpf_prog_info;

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<libc::c_long> {
    // SAFETY: attr is a zero-padded 128-byte bpf_attr, as large as any command here reads.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Holds run-time statistics on; they go off (unless something else holds them) on drop.
pub struct StatsOn {
    _fd: OwnedFd,
    sysctl_before: String,
}

impl StatsOn {
    pub fn enable() -> Result<StatsOn> {
        let sysctl_before = read_sysctl();
        let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("BPF_ENABLE_STATS (kernel 5.8+)")?;
        Ok(StatsOn {
            _fd: fd,
            sysctl_before,
        })
    }

    /// `kernel.bpf_stats_enabled` as it was before (the bench does not change it).
    pub fn sysctl_before(&self) -> &str {
        &self.sysctl_before
    }
}

pub fn read_sysctl() -> String {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

/// The program behind a pinned link.
pub struct Prog {
    fd: OwnedFd,
    pub id: u32,
}

impl Prog {
    pub fn from_link_pin(path: &Path) -> Result<Prog> {
        let link = PinnedLink::from_pin(path)
            .with_context(|| format!("opening link pin {}", path.display()))?;
        let id = FdLink::from(link).info().context("link info")?.program_id();
        let mut attr = [0u64; 16];
        attr[0] = u64::from(id);
        let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)
            .with_context(|| format!("BPF_PROG_GET_FD_BY_ID {id}"))?;
        // SAFETY: the syscall returned a new fd.
        Ok(Prog {
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
            id,
        })
    }

    /// (run_time_ns, run_cnt) so far.
    pub fn stats(&self) -> Result<(u64, u64)> {
        // SAFETY: bpf_prog_info is plain data; all zeroes is what the kernel expects.
        let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
        let mut attr = [0u64; 16];
        attr[0] =
            self.fd.as_raw_fd() as u64 | ((std::mem::size_of::<bpf_prog_info>() as u64) << 32);
        attr[1] = (&mut info as *mut bpf_prog_info) as u64;
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD")?;
        Ok((info.run_time_ns, info.run_cnt))
    }
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;

/// The floor: a bind4 program that only returns 1 ("proceed"), attached with a link the bench
/// holds by fd (dropping it detaches). What any cgroup bind4 program costs, whatever it does.
pub struct Floor {
    pub link: OwnedFd,
    pub prog: Prog,
}

impl Floor {
    pub fn attach(cgroup_dir: &Path) -> Result<Floor> {
        use aya_obj::generated::{bpf_attach_type, bpf_prog_type};
        // r0 = 1; exit
        let insns: [u64; 2] = [0xb7 | (1u64 << 32), 0x95];
        let license = c"GPL";
        let mut attr = [0u64; 16];
        attr[0] =
            bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR as u64 | ((insns.len() as u64) << 32);
        attr[1] = insns.as_ptr() as u64;
        attr[2] = license.as_ptr() as u64;
        // prog_name at byte 48 (attr[6..8]); expected_attach_type at byte 68 (high half of attr[8]).
        attr[6] = u64::from_le_bytes(*b"pg_floor");
        attr[8] = (bpf_attach_type::BPF_CGROUP_INET4_BIND as u64) << 32;
        let fd = bpf(BPF_PROG_LOAD, &mut attr).context("loading the floor program")?;
        // SAFETY: the syscall returned a new fd.
        let prog_fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let cg = std::fs::File::open(cgroup_dir)
            .with_context(|| format!("opening {}", cgroup_dir.display()))?;
        let mut attr = [0u64; 16];
        attr[0] = prog_fd.as_raw_fd() as u64 | ((cg.as_raw_fd() as u64) << 32);
        attr[1] = bpf_attach_type::BPF_CGROUP_INET4_BIND as u64;
        let link = bpf(BPF_LINK_CREATE, &mut attr).context("attaching the floor program")?;
        // SAFETY: the syscall returned a new fd.
        let link = unsafe { OwnedFd::from_raw_fd(link as i32) };
        let mut attr = [0u64; 16];
        // SAFETY: bpf_prog_info is plain data.
        let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
        attr[0] =
            prog_fd.as_raw_fd() as u64 | ((std::mem::size_of::<bpf_prog_info>() as u64) << 32);
        attr[1] = (&mut info as *mut bpf_prog_info) as u64;
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD")?;
        Ok(Floor {
            link,
            prog: Prog {
                fd: prog_fd,
                id: info.id,
            },
        })
    }
}
