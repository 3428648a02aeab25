//! bind(2) from a real process: [`bind_in`] forks a child that moves itself into a cgroup, sets
//! its comm and binds, reporting the errno back; [`hold_in`] parks one there ([`Holder`]).

use std::{
    ffi::CString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::ffi::OsStrExt,
    path::Path,
};

use socket2::SockAddr;

use crate::util::errno_name;

/// Address family of a bind, derived from the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// `0.0.0.0`
pub const ANY4: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
/// `[::]` (IPV6_V6ONLY left at the system default)
pub const ANY6: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
/// `127.0.0.1`
pub const LO4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// `::1`
pub const LO6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
/// `::ffff:127.0.0.1` (v4-mapped, on an AF_INET6 socket)
pub const MAPPED_LO4: IpAddr = IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x7f00, 0x0001));

/// What the child process binds.
#[derive(Clone, Debug)]
pub struct BindSpec {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Proto,
    /// The child's comm (prctl PR_SET_NAME); at most 15 bytes are kept.
    pub comm: String,
    pub reuseaddr: bool,
}

impl BindSpec {
    pub fn new(addr: IpAddr, port: u16, proto: Proto) -> BindSpec {
        BindSpec {
            addr,
            port,
            proto,
            comm: "pg-outsider".into(),
            reuseaddr: false,
        }
    }
    pub fn tcp(addr: IpAddr, port: u16) -> BindSpec {
        BindSpec::new(addr, port, Proto::Tcp)
    }
    pub fn udp(addr: IpAddr, port: u16) -> BindSpec {
        BindSpec::new(addr, port, Proto::Udp)
    }
    pub fn comm(mut self, comm: &str) -> BindSpec {
        self.comm = comm.into();
        self
    }
    pub fn reuseaddr(mut self) -> BindSpec {
        self.reuseaddr = true;
        self
    }
    pub fn family(&self) -> Family {
        match self.addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

// Stages reported by the child: which step failed.
const STAGE_OK: i32 = 0;
const STAGE_CGROUP_OPEN: i32 = 1;
const STAGE_CGROUP_WRITE: i32 = 2;
const STAGE_PRCTL: i32 = 3;
const STAGE_SOCKET: i32 = 4;
const STAGE_SETSOCKOPT: i32 = 5;
const STAGE_BIND: i32 = 6;
const STAGE_PAUSE: i32 = 7;

fn stage_name(s: i32) -> &'static str {
    match s {
        STAGE_OK => "ok",
        STAGE_CGROUP_OPEN => "open cgroup.procs",
        STAGE_CGROUP_WRITE => "write cgroup.procs",
        STAGE_PRCTL => "prctl(PR_SET_NAME)",
        STAGE_SOCKET => "socket",
        STAGE_SETSOCKOPT => "setsockopt(SO_REUSEADDR)",
        STAGE_BIND => "bind",
        STAGE_PAUSE => "parked",
        _ => "unknown stage",
    }
}

/// Everything the child needs, allocated before fork.
struct Prepared {
    procs: CString,
    comm: CString,
    domain: libc::c_int,
    ty: libc::c_int,
    /// Read in the child through `as_ptr()`/`len()` only: no allocation after fork.
    addr: SockAddr,
    reuseaddr: bool,
}

fn prepare(cgroup: &Path, spec: &BindSpec) -> Prepared {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())
        .expect("cgroup path has no NUL");
    let mut comm_bytes: Vec<u8> = spec
        .comm
        .as_bytes()
        .iter()
        .copied()
        .filter(|&b| b != 0)
        .collect();
    comm_bytes.truncate(15);
    let comm = CString::new(comm_bytes).unwrap();
    let addr = SockAddr::from(SocketAddr::new(spec.addr, spec.port));
    let domain = addr.domain().into();
    let ty = match spec.proto {
        Proto::Tcp => libc::SOCK_STREAM,
        Proto::Udp => libc::SOCK_DGRAM,
    } | libc::SOCK_CLOEXEC;
    Prepared {
        procs,
        comm,
        domain,
        ty,
        addr,
        reuseaddr: spec.reuseaddr,
    }
}

fn errno() -> i32 {
    unsafe { *libc::__errno_location() }
}

/// Child side: async-signal-safe calls only (no allocation, no locks: `p` was built before
/// the fork). Reports (stage, errno) and either exits or, with `park`, pauses forever after a
/// successful move.
///
/// # Safety
///
/// Call only in the child, right after fork() (the parent may be multi-threaded), with `wfd`
/// the write end of the report pipe.
unsafe fn child_main(p: &Prepared, wfd: i32, do_bind: bool, park: bool) -> ! {
    // SAFETY: the caller is the forked child (see above); every call below is a plain syscall
    // on memory `p` owns, which fork copied.
    unsafe {
        let report = |stage: i32, err: i32| {
            let msg: [i32; 2] = [stage, err];
            libc::write(
                wfd,
                msg.as_ptr() as *const libc::c_void,
                std::mem::size_of_val(&msg),
            );
        };
        let fd = libc::open(p.procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            report(STAGE_CGROUP_OPEN, errno());
            libc::_exit(101);
        }
        if libc::write(fd, b"0".as_ptr() as *const libc::c_void, 1) != 1 {
            report(STAGE_CGROUP_WRITE, errno());
            libc::_exit(102);
        }
        libc::close(fd);
        if libc::prctl(libc::PR_SET_NAME, p.comm.as_ptr() as libc::c_ulong, 0, 0, 0) != 0 {
            report(STAGE_PRCTL, errno());
            libc::_exit(103);
        }
        if park {
            report(STAGE_PAUSE, 0);
            libc::close(wfd);
            loop {
                libc::pause();
            }
        }
        if !do_bind {
            report(STAGE_OK, 0);
            libc::_exit(0);
        }
        let s = libc::socket(p.domain, p.ty, 0);
        if s < 0 {
            report(STAGE_SOCKET, errno());
            libc::_exit(104);
        }
        if p.reuseaddr {
            let one: libc::c_int = 1;
            if libc::setsockopt(
                s,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) != 0
            {
                report(STAGE_SETSOCKOPT, errno());
                libc::_exit(105);
            }
        }
        let r = libc::bind(s, p.addr.as_ptr().cast(), p.addr.len());
        if r != 0 {
            report(STAGE_BIND, errno());
            libc::_exit(1);
        }
        report(STAGE_OK, 0);
        libc::_exit(0);
    }
}

/// Forks; the child runs [`child_main`]. Returns (child pid, stage, errno) as reported through
/// a pipe. With `park` the child is left running (caller owns the pid); otherwise it is reaped.
fn fork_child(cgroup: &Path, spec: &BindSpec, do_bind: bool, park: bool) -> (i32, i32, i32) {
    let p = prepare(cgroup, spec);
    let mut fds = [0i32; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        panic!("pipe2: {}", std::io::Error::last_os_error());
    }
    let (rfd, wfd) = (fds[0], fds[1]);
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let e = std::io::Error::last_os_error();
        unsafe {
            libc::close(rfd);
            libc::close(wfd);
        }
        panic!("fork: {e}");
    }
    if pid == 0 {
        unsafe {
            libc::close(rfd);
            child_main(&p, wfd, do_bind, park)
        }
    }
    unsafe { libc::close(wfd) };
    let mut msg = [0i32; 2];
    let want = std::mem::size_of_val(&msg);
    let mut got = 0usize;
    while got < want {
        let n = unsafe {
            libc::read(
                rfd,
                (msg.as_mut_ptr() as *mut u8).add(got) as *mut libc::c_void,
                want - got,
            )
        };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            break;
        }
        got += n as usize;
    }
    unsafe { libc::close(rfd) };
    if !park || got < want {
        let mut wst = 0;
        unsafe { libc::waitpid(pid, &mut wst, 0) };
    }
    if got < want {
        panic!(
            "child {pid} for {spec:?} in {} died without reporting",
            cgroup.display()
        );
    }
    (pid, msg[0], msg[1])
}

/// Forks a real process that moves itself into `cgroup` (absolute dir on the cgroup2 mount),
/// sets its comm, creates the socket and binds; returns the child's pid and `Ok` or the bind
/// errno. Panics when any step other than bind() fails (e.g. the move into the cgroup), so a
/// broken setup never passes for an allowed bind.
pub fn bind_in_pid(cgroup: impl AsRef<Path>, spec: &BindSpec) -> (i32, Result<(), i32>) {
    let cgroup = cgroup.as_ref();
    let (pid, stage, err) = fork_child(cgroup, spec, true, false);
    let r = match stage {
        STAGE_OK => Ok(()),
        STAGE_BIND => Err(err),
        s => panic!(
            "bind child {pid} for {spec:?} in {}: {} failed: {}",
            cgroup.display(),
            stage_name(s),
            std::io::Error::from_raw_os_error(err)
        ),
    };
    eprintln!(
        "[harness] pid {pid} comm={} in {}: bind {}:{} ({}) -> {}",
        spec.comm,
        cgroup.display(),
        spec.addr,
        spec.port,
        spec.proto.name(),
        match r {
            Ok(()) => "ok".to_string(),
            Err(e) => errno_name(e),
        }
    );
    (pid, r)
}

/// [`bind_in_pid`] without the pid.
pub fn bind_in(cgroup: impl AsRef<Path>, spec: &BindSpec) -> Result<(), i32> {
    bind_in_pid(cgroup, spec).1
}

/// A forked process parked (pause()) in a cgroup, e.g. to keep a leased cgroup populated so the
/// daemon does not reap its lease. Drop SIGKILLs and reaps it.
pub struct Holder {
    pid: i32,
}

impl Holder {
    pub fn pid(&self) -> i32 {
        self.pid
    }
}

/// Parks a process in `cgroup` (absolute dir); panics when it cannot move there.
pub fn hold_in(cgroup: impl AsRef<Path>) -> Holder {
    let cgroup = cgroup.as_ref();
    let spec = BindSpec::tcp(ANY4, 0).comm("pg-holder");
    let (pid, stage, err) = fork_child(cgroup, &spec, false, true);
    if stage != STAGE_PAUSE {
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        panic!(
            "holder {pid} in {}: {} failed: {}",
            cgroup.display(),
            stage_name(stage),
            std::io::Error::from_raw_os_error(err)
        );
    }
    Holder { pid }
}

impl Drop for Holder {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, mem::ManuallyDrop};

    use super::*;
    use crate::cgroup::{cgroup2_mount, TestCgroup};

    // Self-tests of the harness (root and cgroup2 needed, no port-guard binary).

    #[test]
    fn cgroup_tree_bind_and_cleanup() {
        let abs;
        {
            let cg = TestCgroup::new("selftest-cg");
            abs = cg.abs().to_path_buf();
            let a = cg.child("a");
            let deep = a.child("b/c");
            assert_eq!(deep.path(), format!("{}/a/b/c", cg.path()));
            assert_eq!(deep.level(), 4);
            assert_eq!(cg.level(), 1);
            assert_ne!(a.id(), cg.id());
            assert!(!cg.populated());

            let h = hold_in(&deep);
            let own = fs::read_to_string(format!("/proc/{}/cgroup", h.pid())).unwrap();
            assert!(
                own.lines().any(|l| l == format!("0::{}", deep.path())),
                "{own}"
            );
            let comm = fs::read_to_string(format!("/proc/{}/comm", h.pid())).unwrap();
            assert_eq!(comm.trim(), "pg-holder");
            assert!(cg.populated());
            assert_eq!(deep.procs(), vec![h.pid()]);
            // Leave a second holder for the TestCgroup's Drop to kill.
            let _h2 = ManuallyDrop::new(hold_in(&a));

            assert_eq!(bind_in(&deep, &BindSpec::tcp(LO4, 0)), Ok(()));
            assert_eq!(bind_in(&a, &BindSpec::udp(ANY6, 0)), Ok(()));
            assert_eq!(bind_in(&a, &BindSpec::tcp(MAPPED_LO4, 0)), Ok(()));

            // A port held by the test process: the child sees the real errno.
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            assert_eq!(
                bind_in(&a, &BindSpec::tcp(LO4, port)),
                Err(libc::EADDRINUSE)
            );
            assert_eq!(
                bind_in(&a, &BindSpec::tcp(ANY6, port)),
                Err(libc::EADDRINUSE)
            );
            assert_eq!(bind_in(&a, &BindSpec::tcp(LO6, port)), Ok(()));
            drop(h);
        }
        assert!(!abs.exists(), "{} not removed", abs.display());
    }

    #[test]
    #[should_panic(expected = "cgroup.procs")]
    fn bind_in_missing_cgroup_panics() {
        let _ = bind_in(
            cgroup2_mount().join("pg-test-no-such-cgroup"),
            &BindSpec::tcp(LO4, 0),
        );
    }
}
