//! Kernel feature probes: tiny programs loaded with the raw bpf(2) syscall and thrown away. The
//! verifier is the judge, so a probe answers for this kernel whatever its version says.

use std::io;

use crate::sys::{bpf_fd, BPF_PROG_LOAD};

const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_BIND: u32 = 8;
const BPF_FUNC_GET_CURRENT_ANCESTOR_CGROUP_ID: i32 = 123;
const BPF_FUNC_SET_RETVAL: i32 = 187;
const BPF_FUNC_GET_NETNS_COOKIE: i32 = 122;

/// A probe could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// bpf(2) refused for lack of privilege.
    #[error("no permission to load BPF programs (run as root, or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)")]
    Permission {
        #[source]
        source: io::Error,
    },
    /// The kernel has no bpf(2) or no cgroup sock_addr programs.
    #[error("this kernel cannot load cgroup bind programs (it needs CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF, 5.8 or newer)")]
    Unsupported {
        #[source]
        source: io::Error,
    },
}

/// The config asks for something this kernel cannot do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unenforceable(pub String);

/// What this kernel offers the guard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// `bpf_set_retval` in cgroup sock_addr programs (6.1+): refused binds get the configured errno.
    pub set_retval: bool,
    /// `bpf_get_netns_cookie` in cgroup sock_addr programs (5.7+): the guard can enforce in some
    /// network namespaces only.
    pub netns_cookie: bool,
    /// Refusals with EADDRINUSE go through the sentinel port: the kernel has no `bpf_set_retval`
    /// for them, or [`FORCE_SENTINEL_ENV`] asks for it (to exercise it where it has).
    pub sentinel: bool,
}

/// `PORT_GUARD_SENTINEL=force`: refuse through the sentinel port even where `bpf_set_retval`
/// exists (the test suite runs the sentinel on every kernel this way).
pub const FORCE_SENTINEL_ENV: &str = "PORT_GUARD_SENTINEL";

impl Features {
    /// Refuses a policy this kernel cannot enforce as written, unless it allows the fallback.
    pub fn check(&self, policy: &crate::policy::Policy) -> Result<(), Unenforceable> {
        use crate::policy::Errno;
        if self.sentinel && policy.errno == Errno::Eaddrinuse && policy.sentinel_port != 0 {
            return Ok(());
        }
        if !self.set_retval && policy.errno != Errno::Eperm && !policy.allow_fallback {
            return Err(Unenforceable(format!(
                "errno {} needs bpf_set_retval in cgroup bind programs (kernel 6.1+){}; this kernel can only refuse with EPERM: set errno = \"eperm\", or allow_fallback = true (--allow-fallback) to accept EPERM",
                policy.errno.name(),
                if policy.errno == Errno::Eaddrinuse {
                    " or the sentinel port, which sentinel_port = 0 turns off"
                } else {
                    " (only eaddrinuse can be given through the sentinel port)"
                }
            )));
        }
        Ok(())
    }

    /// One line per feature for logs and `check`.
    pub fn describe(&self) -> Vec<String> {
        vec![
            if self.set_retval {
                "bpf_set_retval available: refused binds get the configured errno".to_owned()
            } else {
                "bpf_set_retval missing (kernel < 6.1): the kernel cannot set a refused bind's errno; EADDRINUSE comes through the sentinel port, any other errno is EPERM".to_owned()
            },
            if self.netns_cookie {
                "bpf_get_netns_cookie available: the guard enforces in the configured network namespaces".to_owned()
            } else {
                "bpf_get_netns_cookie missing: the guard enforces in every network namespace (netns = \"all\")".to_owned()
            },
        ]
    }

    /// The fallbacks this kernel takes, one line each (for `check`).
    pub fn fallbacks(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .describe()
            .into_iter()
            .zip([self.set_retval, self.netns_cookie])
            .filter(|(_, available)| !available)
            .map(|(line, _)| line)
            .collect();
        if self.sentinel {
            out.push("errno eaddrinuse is given through the sentinel port: a refused bind is rewritten to it, and the daemon's sentinel sockets there make the kernel answer EADDRINUSE (EPERM in a netns without a sentinel)".into());
        }
        out
    }

    /// Whether refusals of `policy` go through the sentinel port: only EADDRINUSE can.
    pub fn uses_sentinel(&self, policy: &crate::policy::Policy) -> bool {
        self.sentinel
            && policy.sentinel_port != 0
            && policy.errno == crate::policy::Errno::Eaddrinuse
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn mov64_imm(dst: u8, imm: i32) -> Insn {
    Insn {
        code: 0xb7,
        regs: dst,
        off: 0,
        imm,
    }
}
const fn call(helper: i32) -> Insn {
    Insn {
        code: 0x85,
        regs: 0,
        off: 0,
        imm: helper,
    }
}
const EXIT: Insn = Insn {
    code: 0x95,
    regs: 0,
    off: 0,
    imm: 0,
};

/// The part of `union bpf_attr` that BPF_PROG_LOAD reads, padded to the size the kernel accepts
/// from any version (trailing zeroes).
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    _rest: [u8; 56],
}

/// Loads a bind4 program that calls `helper` (arguments zero) and returns 1.
fn load_with_helper(helper: Option<i32>) -> io::Result<std::os::fd::OwnedFd> {
    let mut insns = vec![mov64_imm(1, 0), mov64_imm(2, 0), mov64_imm(3, 0)];
    if let Some(h) = helper {
        insns.push(call(h));
    }
    insns.extend([mov64_imm(0, 1), EXIT]);
    let license = b"GPL\0";
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: *b"pg_probe\0\0\0\0\0\0\0\0",
        prog_ifindex: 0,
        expected_attach_type: BPF_CGROUP_INET4_BIND,
        _rest: [0; 56],
    };
    // SAFETY: attr is a live BPF_PROG_LOAD attr whose pointers outlive the call.
    unsafe {
        bpf_fd(
            BPF_PROG_LOAD,
            (&attr as *const ProgLoadAttr).cast(),
            size_of::<ProgLoadAttr>(),
        )
    }
}

/// Probes the kernel. Fails when BPF cannot be used at all, which is also the permission check
/// done before anything is created.
pub fn probe() -> Result<Features, ProbeError> {
    match load_with_helper(None) {
        Ok(_) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) => {
            return Err(ProbeError::Permission { source: e })
        }
        Err(e) => return Err(ProbeError::Unsupported { source: e }),
    }
    for (helper, what) in [(
        BPF_FUNC_GET_CURRENT_ANCESTOR_CGROUP_ID,
        "bpf_get_current_ancestor_cgroup_id (5.7+)",
    )] {
        if let Err(e) = load_with_helper(Some(helper)) {
            return Err(ProbeError::Unsupported {
                source: io::Error::new(e.kind(), format!("{what} missing: {e}")),
            });
        }
    }
    let set_retval = load_with_helper(Some(BPF_FUNC_SET_RETVAL)).is_ok();
    Ok(Features {
        set_retval,
        netns_cookie: load_with_helper(Some(BPF_FUNC_GET_NETNS_COOKIE)).is_ok(),
        sentinel: !set_retval || std::env::var_os(FORCE_SENTINEL_ENV).is_some_and(|v| v == "force"),
    })
}

/// Before 5.11 BPF maps are charged to RLIMIT_MEMLOCK (64 KiB by default), far below what the
/// port table needs; later kernels charge the memory cgroup and ignore the limit.
pub fn raise_memlock() {
    if crate::sockets::kernel_at_least(5, 11) {
        return;
    }
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit/getrlimit with valid structs.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) == 0 {
            return;
        }
        // Without CAP_SYS_RESOURCE: as far as the hard limit goes.
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim);
        // No warning here: a probe that then fails says so in its one error line.
    }
}
