//! Real libvirt for the integration tests: two libvirtd + virtlogd pairs on this machine that
//! live-migrate a diskless domain between each other. No mock anywhere: Debian's libvirt 9.0
//! and qemu, started by hand (no systemd).
//!
//! - [`ensure_installed`] installs libvirt from Debian when it is missing (and the `libvirt-qemu`
//!   user and groups its qemu driver needs); `Err(reason)` where it cannot (no apt-get, e.g. the
//!   busybox guests of `cargo xtask vm-test`): the test then [`crate::skip`]s.
//! - [`Pair`] is two [`LibvirtHost`]s, each libvirtd + virtlogd in its own cgroup and its own mount
//!   and UTS namespace (own hostname, own /etc/libvirt, /run/libvirt, /var/lib/libvirt,
//!   /var/log/libvirt, /var/cache/libvirt and /etc/hosts, bind-mounted from a temp dir), with
//!   qemu.conf's migration_port_min/max set to the test's range, and one diskless domain that
//!   [`Pair::migrate`] moves back and forth.
//! - [`Allocator`] runs `pg-allocator` (probe the lowest free port, bind it a moment later, hold it)
//!   running in a cgroup of the test's.
//!
//! Everything is RAII and panic-safe. Dropping a [`Pair`] prints libvirtd's log and the qemu logs
//! when the thread is panicking, destroys the domains, kills both libvirtd and virtlogd (their
//! namespaces go with them), kills and removes what libvirt left below `/machine` (libvirt puts
//! VMs there, at the cgroup2 root and in every v1 hierarchy, when there is no systemd), removes
//! `/machine` itself when the test created it, and the mount-point directories it created.
//!
//! Two details that matter (found the hard way):
//! - The VM's cgroup is `/machine/qemu-ID-NAME.libvirt-qemu`, and both daemons number their
//!   domains from 1: a migration that keeps the name puts the destination's qemu into the
//!   source's cgroup, and the source then spends seconds failing to remove it (EBUSY). The
//!   domain is renamed on every migration (`--dname`): `<token>a` on A, `<token>b` on B.
//! - libvirt resolves its hostname (`getaddrinfo`, canonical name) in every migration phase. An
//!   unknown name goes to the DNS server, i.e. leaves the machine (and costs seconds): each
//!   namespace gets an /etc/hosts that names its host.
//! - Each libvirtd probes qemu's capabilities at start (seconds); the first one's cache is reused
//!   by the others of the test process.
//!
//! `PG_LIBVIRT_LOGS=DIR` keeps every host's libvirtd, virtlogd and qemu logs in DIR.

use std::{
    ffi::CString,
    fs,
    io::{BufRead, BufReader},
    os::unix::{ffi::OsStrExt, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex, OnceLock,
    },
    thread,
    time::{Duration, Instant},
};

use crate::{run_cmd_timeout, Cgroup, Daemon, TempDir, PREFIX};

/// Upper bound of one `virsh` call that is not a migration.
pub const VIRSH_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound of one `virsh migrate`.
pub const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long libvirtd may take to come up (it probes qemu's capabilities first: a few seconds).
pub const LIBVIRTD_START_TIMEOUT: Duration = Duration::from_secs(120);

/// The qemu binary libvirt starts.
pub const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// What `apt-get install` gets when libvirt is missing (`--no-install-recommends`: no
/// libvirt-daemon-system, which wants systemd and would start a system libvirtd).
pub const LIBVIRT_PACKAGES: &[&str] = &[
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
];

// ---------------------------------------------------------------------------------------------
// Installing
// ---------------------------------------------------------------------------------------------

/// `name` on PATH or in the sbin directories (cargo's PATH may lack /usr/sbin).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .filter(|d| !d.is_empty())
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

fn program(name: &str) -> PathBuf {
    find_program(name).unwrap_or_else(|| panic!("{name} is not installed"))
}

fn run_logged(mut cmd: Command, timeout: Duration) -> Result<String, String> {
    eprintln!("[libvirt] running {cmd:?}");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    match run_cmd_timeout(cmd, timeout) {
        Ok((0, out, _)) => Ok(out),
        Ok((code, out, err)) => Err(format!(
            "exit {code}\n{}\n{}",
            tail(&out, 30),
            tail(&err, 30)
        )),
        Err(e) => Err(e),
    }
}

fn getent(db: &str, key: &str) -> bool {
    Command::new("getent")
        .args([db, key])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn do_install() -> Result<(), String> {
    let mut missing: Vec<&str> = ["libvirtd", "virtlogd", "virsh"]
        .into_iter()
        .filter(|p| find_program(p).is_none())
        .collect();
    let mut packages: Vec<&str> = if missing.is_empty() {
        vec![]
    } else {
        LIBVIRT_PACKAGES.to_vec()
    };
    if !Path::new(QEMU).is_file() {
        missing.push(QEMU);
        packages.push("qemu-system-x86");
    }
    if !packages.is_empty() {
        let Some(apt) = find_program("apt-get") else {
            return Err(format!(
                "{} not installed, and no apt-get here to install them",
                missing.join(", ")
            ));
        };
        eprintln!(
            "[libvirt] {} missing: installing {}",
            missing.join(", "),
            packages.join(" ")
        );
        let install = || {
            let mut c = Command::new(&apt);
            c.args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&packages);
            run_logged(c, Duration::from_secs(900))
        };
        if let Err(first) = install() {
            // A fresh machine may have no package lists yet.
            eprintln!("[libvirt] apt-get install failed ({first}); apt-get update and retry");
            let mut c = Command::new(&apt);
            c.args(["update", "-q"]);
            run_logged(c, Duration::from_secs(600)).map_err(|e| format!("apt-get update: {e}"))?;
            // Installing was possible but failed: that is a broken CI machine, not a skip.
            install().unwrap_or_else(|e| panic!("apt-get install {}: {e}", packages.join(" ")));
        }
        for p in ["libvirtd", "virtlogd", "virsh"] {
            assert!(
                find_program(p).is_some(),
                "{p} still missing after installing {packages:?}"
            );
        }
    }
    // libvirt's qemu driver resolves its built-in user and group (libvirt-qemu:libvirt-qemu on
    // Debian) at start-up even when qemu.conf says root, and fails without them; Debian creates
    // them in libvirt-daemon-system, which is not installed (it wants systemd).
    for group in ["kvm", "libvirt-qemu"] {
        if !getent("group", group) {
            let mut c = Command::new("groupadd");
            c.args(["--system", group]);
            run_logged(c, crate::CMD_TIMEOUT).map_err(|e| format!("groupadd {group}: {e}"))?;
        }
    }
    if !getent("passwd", "libvirt-qemu") {
        let mut c = Command::new("useradd");
        c.args([
            "--system",
            "--gid",
            "libvirt-qemu",
            "--groups",
            "kvm",
            "--home-dir",
            "/var/lib/libvirt",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "libvirt-qemu",
        ]);
        run_logged(c, crate::CMD_TIMEOUT).map_err(|e| format!("useradd libvirt-qemu: {e}"))?;
    }
    Ok(())
}

/// Makes sure libvirtd, virtlogd, virsh and qemu are installed (apt-get when missing) and the
/// user and groups libvirt's qemu driver needs exist. `Err(reason)` when they cannot be had
/// here (no apt-get): the caller skips. Panics when apt-get exists but fails (CI must see it).
pub fn ensure_installed() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    DONE.get_or_init(do_install).clone()
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `net.ipv4.ip_local_reserved_ports` of this network namespace.
pub fn reserved_ports() -> String {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports")
        .expect("read net.ipv4.ip_local_reserved_ports")
        .trim_end()
        .to_owned()
}

/// The cgroup2 path of `pid` ("0::" line of /proc/PID/cgroup).
pub fn cgroup_of(pid: i32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
}

/// Every cgroup (v1 and v2) mount point, from /proc/self/mountinfo.
fn cgroup_mounts() -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let fstype = post.split_whitespace().next()?;
            let mount = pre.split_whitespace().nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2")
                .then(|| crate::cgroup::unescape_mountinfo(mount))
        })
        .collect()
}

fn child_dirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn cstring(p: impl AsRef<Path>) -> CString {
    CString::new(p.as_ref().as_os_str().as_bytes()).expect("path without NUL")
}

// ---------------------------------------------------------------------------------------------
// RAII pieces
// ---------------------------------------------------------------------------------------------

/// The pid at the end of `<PREFIX>-<test>-<pid>` if `name` is one of a run of tests whose names
/// start with `tests`, and that run's process is gone.
fn dead_run(name: &str, tests: &str) -> bool {
    let Some(rest) = name.strip_prefix(&format!("{PREFIX}-{tests}")) else {
        return false;
    };
    let Some(pid) = rest.rsplit('-').next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
}

/// What a run of these tests that was killed outright (SIGKILL, a CI timeout: no unwinding, no
/// Drop) left behind: its guards (pin dirs `/sys/fs/bpf/<PREFIX>-<tests>*-<pid>`, unloaded), its
/// cgroups (`<PREFIX>-<tests>*-<pid>` at the cgroup2 root: libvirtd, virtlogd, the allocator,
/// all killed) and its VMs' cgroups below `/machine` (qemu killed). Only runs whose process no
/// longer exists are touched.
pub fn sweep_dead_runs(tests: &str) {
    for e in fs::read_dir("/sys/fs/bpf").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if dead_run(&name, tests) {
            eprintln!(
                "[libvirt] unloading the guard of a dead run: {}",
                e.path().display()
            );
            let mut c = Command::new(crate::bin());
            c.arg("--pin-dir").arg(e.path()).arg("unload");
            let _ = run_cmd_timeout(c, crate::CMD_TIMEOUT);
            let _ = fs::remove_dir_all(e.path());
        }
    }
    for d in child_dirs(&crate::cgroup2_mount()) {
        let name = d.file_name().unwrap().to_string_lossy().into_owned();
        if dead_run(&name, tests) {
            eprintln!(
                "[libvirt] removing the cgroups of a dead run: {}",
                d.display()
            );
            crate::cgroup::cleanup_cgroup_tree(&d);
        }
    }
    // Pair's temp dirs: <tmp>/<PREFIX>-libvirt-<test>-<pid>-<n>
    for d in child_dirs(&std::env::temp_dir()) {
        let name = d.file_name().unwrap().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix(&format!("{PREFIX}-libvirt-")) {
            let without_n = rest.rsplit_once('-').map(|(r, _)| r).unwrap_or("");
            if dead_run(&format!("{PREFIX}-{without_n}"), tests) {
                eprintln!(
                    "[libvirt] removing the temp dir of a dead run: {}",
                    d.display()
                );
                let _ = fs::remove_dir_all(&d);
            }
        }
    }
    for m in cgroup_mounts() {
        for vm in child_dirs(&m.join("machine")) {
            // qemu-N-pgt<pid>n<seq><a|b>.libvirt-qemu
            let name = vm.file_name().unwrap().to_string_lossy().into_owned();
            let pid = name
                .split("-pgt")
                .nth(1)
                .and_then(|r| r.split('n').next())
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                    eprintln!(
                        "[libvirt] removing a VM cgroup of a dead run: {}",
                        vm.display()
                    );
                    crate::cgroup::cleanup_cgroup_tree(&vm);
                }
            }
        }
    }
}

/// The host directories the namespaces bind-mount over. The package creates only /etc/libvirt;
/// the others are made here when missing and removed (if still empty) on drop, after every
/// namespace that used them is gone.
struct MountPoints {
    created: Vec<PathBuf>,
}

const MOUNT_POINTS: &[&str] = &[
    "/etc/libvirt",
    "/run/libvirt",
    "/var/lib/libvirt",
    "/var/log/libvirt",
    "/var/cache/libvirt",
];

impl MountPoints {
    fn new() -> MountPoints {
        let mut created = Vec::new();
        for d in MOUNT_POINTS {
            let p = PathBuf::from(d);
            if !p.exists() {
                fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {d}: {e}"));
                created.push(p);
            }
        }
        MountPoints { created }
    }
}

impl Drop for MountPoints {
    fn drop(&mut self) {
        for p in self.created.iter().rev() {
            let _ = fs::remove_dir(p);
        }
    }
}

/// What libvirt creates below `/machine` (every cgroup hierarchy): on drop, the VM cgroups of
/// this test's domains (names containing `-<token>`) are emptied (SIGKILL) and removed, and
/// `/machine` too where it did not exist before and is empty now.
pub struct MachineCleanup {
    token: String,
    existed: Vec<(PathBuf, bool)>,
}

impl MachineCleanup {
    pub fn new(token: &str) -> MachineCleanup {
        let existed = cgroup_mounts()
            .into_iter()
            .map(|m| {
                let d = m.join("machine");
                let e = d.exists();
                (d, e)
            })
            .collect();
        MachineCleanup {
            token: token.to_owned(),
            existed,
        }
    }

    /// VM cgroups of this test's domains that still exist (any hierarchy).
    pub fn leftovers(&self) -> Vec<PathBuf> {
        let mark = format!("-{}", self.token);
        self.existed
            .iter()
            .flat_map(|(d, _)| child_dirs(d))
            .filter(|c| {
                c.file_name()
                    .is_some_and(|n| n.to_string_lossy().contains(&mark))
            })
            .collect()
    }
}

impl Drop for MachineCleanup {
    fn drop(&mut self) {
        for vm in self.leftovers() {
            eprintln!("[libvirt] removing VM cgroup left behind: {}", vm.display());
            crate::cgroup::cleanup_cgroup_tree(&vm);
        }
        for (dir, existed) in &self.existed {
            if !existed && dir.exists() && child_dirs(dir).is_empty() {
                for _ in 0..50 {
                    if fs::remove_dir(dir).is_ok() || !dir.exists() {
                        break;
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One libvirtd + virtlogd
// ---------------------------------------------------------------------------------------------

/// A diskless x86 guest for TCG (KVM is unreliable on these machines): SeaBIOS finds nothing to
/// boot and idles, which is all a migration needs.
pub fn domain_xml(name: &str, memory_mib: u32, disk: Option<&str>) -> String {
    let disk = disk.map_or(String::new(), |path| {
        format!(
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
             <source file='{path}'/><target dev='vda' bus='virtio'/></disk>\n    "
        )
    });
    format!(
        "<domain type='qemu'>\n  <name>{name}</name>\n  <memory unit='MiB'>{memory_mib}</memory>\n  \
         <vcpu>1</vcpu>\n  <os><type arch='x86_64' machine='q35'>hvm</type></os>\n  <devices>\n    \
         <emulator>{QEMU}</emulator>\n    {disk}<memballoon model='none'/>\n  </devices>\n</domain>\n"
    )
}

/// Where a domain's disk lives inside a libvirt host's namespace (/var/lib/libvirt is the
/// host's own there, so A and B each see their own file at this path).
pub fn disk_path(token: &str) -> String {
    format!("/var/lib/libvirt/images/{token}.img")
}

/// The pattern a test disk starts with (the first MiB), to recognise a copy.
pub fn disk_pattern() -> Vec<u8> {
    (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect()
}

/// One libvirtd with its virtlogd, in `cgroup` and in its own mount and UTS namespace.
pub struct LibvirtHost {
    pub name: String,
    pub hostname: String,
    /// Where its /etc/libvirt, /run/libvirt, ... live on the host.
    pub root: PathBuf,
    /// The cgroup libvirtd and virtlogd run in.
    pub cgroup: Cgroup,
    /// `qemu+unix:///system?socket=<root>/run/libvirt-sock`
    pub uri: String,
    daemon: Option<Daemon>,
}

impl LibvirtHost {
    fn dir(&self, sub: &str) -> PathBuf {
        self.root.join(sub)
    }

    /// Writes the configuration and starts virtlogd and libvirtd; [`LibvirtHost::wait_ready`]
    /// waits until libvirtd answers.
    fn launch(
        name: &str,
        hostname: &str,
        root: PathBuf,
        cgroup: Cgroup,
        ports: (u16, u16),
    ) -> LibvirtHost {
        for sub in ["etc", "run", "lib/qemu", "log/qemu", "cache/qemu"] {
            fs::create_dir_all(root.join(sub))
                .unwrap_or_else(|e| panic!("mkdir {}/{sub}: {e}", root.display()));
        }
        for f in ["libvirt.conf", "libvirt-admin.conf"] {
            let _ = fs::copy(Path::new("/etc/libvirt").join(f), root.join("etc").join(f));
        }
        // Two daemons on one machine must not look like the same host to each other: libvirt
        // refuses a migration whose destination has the source's host UUID or hostname.
        let n = std::process::id() as u64 * 1000 + u64::from(name.as_bytes()[0]);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let uuid = format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            nanos,
            n & 0xffff,
            (n >> 16) & 0xfff,
            name.as_bytes()[0],
            n
        );
        let w = |f: &str, text: String| {
            let p = root.join(f);
            fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        };
        w(
            "etc/libvirtd.conf",
            format!(
                "host_uuid = \"{uuid}\"\n\
                 # Migration and the port allocator in detail in the log file (printed when a test\n\
                 # fails); warnings and errors on stderr.\n\
                 log_filters = \"1:qemu.qemu_migration 1:util.virportallocator 1:qemu.qemu_process 3:*\"\n\
                 log_outputs = \"3:stderr 1:file:/var/log/libvirt/libvirtd.log\"\n"
            ),
        );
        w(
            "etc/qemu.conf",
            format!(
                "user = \"root\"\ngroup = \"root\"\n\
                 # The test's range: port-guard reserves exactly this.\n\
                 migration_port_min = {}\nmigration_port_max = {}\n",
                ports.0, ports.1
            ),
        );
        w(
            "etc/virtlogd.conf",
            "log_outputs = \"3:file:/var/log/libvirt/virtlogd.log\"\n".into(),
        );
        w(
            "hosts",
            format!("127.0.0.1 localhost\n127.0.1.1 {hostname}\n::1 localhost ip6-localhost\n"),
        );

        let mut binds: Vec<(CString, CString)> = [
            ("etc", "/etc/libvirt"),
            ("run", "/run/libvirt"),
            ("lib", "/var/lib/libvirt"),
            ("log", "/var/log/libvirt"),
            ("cache", "/var/cache/libvirt"),
            ("hosts", "/etc/hosts"),
        ]
        .iter()
        .map(|(src, dst)| (cstring(root.join(src)), cstring(dst)))
        .collect();
        // No system bus: with systemd's machined reachable, libvirt would register the VM with
        // it and put it below /machine.slice; without, it uses /machine, the same on every
        // machine the tests run on. (Also keeps libvirt's network driver away from firewalld.)
        if Path::new("/run/dbus").is_dir() {
            let empty = root.join("no-dbus");
            fs::create_dir_all(&empty).unwrap_or_else(|e| panic!("mkdir {}: {e}", empty.display()));
            binds.push((cstring(&empty), cstring("/run/dbus")));
        }
        let procs = cstring(cgroup.abs().join("cgroup.procs"));
        let host = hostname.as_bytes().to_vec();
        let script = format!(
            "{} -d -p /run/libvirt/virtlogd.pid && exec {} -p /run/libvirt/libvirtd.pid",
            program("virtlogd").display(),
            program("libvirtd").display()
        );
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", &script]).env("LC_ALL", "C");
        // SAFETY: only async-signal-safe calls (open, write, close, unshare, mount, sethostname)
        // between fork and exec, on memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fail = || Err(std::io::Error::last_os_error());
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return fail();
                }
                libc::close(fd);
                if libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS) != 0 {
                    return fail();
                }
                if libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                {
                    return fail();
                }
                for (src, dst) in &binds {
                    if libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) != 0
                    {
                        return fail();
                    }
                }
                if libc::sethostname(host.as_ptr().cast(), host.len()) != 0 {
                    return fail();
                }
                Ok(())
            });
        }
        let uri = format!(
            "qemu+unix:///system?socket={}",
            root.join("run/libvirt-sock").display()
        );
        LibvirtHost {
            name: name.to_owned(),
            hostname: hostname.to_owned(),
            root,
            cgroup,
            uri,
            daemon: Some(Daemon::spawn(cmd)),
        }
    }

    /// Waits until libvirtd answers on its socket (it probes qemu's capabilities first); panics
    /// with its logs if it exits or takes longer than `timeout` from `since`.
    fn wait_ready(&mut self, since: Instant, timeout: Duration) {
        let sock = self.dir("run/libvirt-sock");
        loop {
            if !self.daemon.as_mut().unwrap().running() {
                panic!("libvirtd {} exited while starting", self.name);
            }
            if sock.exists() && self.virsh(&["version"], Duration::from_secs(10)).is_ok() {
                break;
            }
            if since.elapsed() > timeout {
                panic!(
                    "libvirtd {} did not answer on {} within {timeout:?}",
                    self.name,
                    sock.display()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "[libvirt] libvirtd {} ({}) up in {} ms: {}",
            self.name,
            self.hostname,
            since.elapsed().as_millis(),
            self.uri
        );
    }

    /// Runs `virsh -q -c URI ARGS...`: stdout, or "exit N: stderr".
    pub fn virsh(&self, args: &[&str], timeout: Duration) -> Result<String, String> {
        let mut c = Command::new(program("virsh"));
        c.arg("-q")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .env("LC_ALL", "C");
        match run_cmd_timeout(c, timeout) {
            Ok((0, out, _)) => Ok(out),
            Ok((code, out, err)) => Err(format!(
                "virsh {} on {}: exit {code}: {}{}",
                args.join(" "),
                self.name,
                err.trim(),
                out.trim()
            )),
            Err(e) => Err(format!("virsh {} on {}: {e}", args.join(" "), self.name)),
        }
    }

    /// Names of the domains this libvirtd has.
    pub fn domains(&self) -> Vec<String> {
        self.virsh(&["list", "--all", "--name"], VIRSH_TIMEOUT)
            .map(|s| {
                s.lines()
                    .map(|l| l.trim().to_owned())
                    .filter(|l| !l.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `virsh domstate NAME` ("running", ...), or the error.
    pub fn domstate(&self, dom: &str) -> Result<String, String> {
        self.virsh(&["domstate", dom], VIRSH_TIMEOUT)
            .map(|s| s.trim().to_owned())
    }

    /// Starts a transient domain `dom` from [`domain_xml`].
    pub fn create_domain(
        &self,
        dom: &str,
        memory_mib: u32,
        disk: Option<&str>,
    ) -> Result<(), String> {
        let xml = self.dir(&format!("{dom}.xml"));
        fs::write(&xml, domain_xml(dom, memory_mib, disk)).map_err(|e| e.to_string())?;
        self.virsh(&["create", xml.to_str().unwrap()], VIRSH_TIMEOUT)?;
        Ok(())
    }

    /// The pid of `dom`'s qemu (libvirt's pid file).
    pub fn qemu_pid(&self, dom: &str) -> Option<i32> {
        fs::read_to_string(self.dir(&format!("run/qemu/{dom}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// libvirtd's log file (debug for migration, the port allocator and qemu processes).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir("log/libvirtd.log")).unwrap_or_default()
    }

    /// The ports of every incoming migration this libvirtd set up, in order (qemu listens on
    /// them: "Setting up incoming migration with URI tcp:[::]:PORT").
    pub fn incoming_ports(&self) -> Vec<u16> {
        self.log()
            .lines()
            .filter_map(|l| l.split("Setting up incoming migration with URI ").nth(1))
            .filter_map(|uri| uri.trim().rsplit(':').next()?.parse().ok())
            .collect()
    }

    /// The qemu log of `dom` (written by virtlogd).
    pub fn qemu_log(&self, dom: &str) -> String {
        fs::read_to_string(self.dir(&format!("log/qemu/{dom}.log"))).unwrap_or_default()
    }

    /// Prints libvirtd's stderr and log file (tails) and every qemu log.
    pub fn dump_logs(&self) {
        eprintln!(
            "===== libvirtd {} ({}) stderr =====",
            self.name, self.hostname
        );
        if let Some(d) = &self.daemon {
            eprintln!("{}", tail(&d.lines().join("\n"), 60));
        }
        eprintln!(
            "===== libvirtd {} {}/log/libvirtd.log (tail) =====",
            self.name,
            self.root.display()
        );
        eprintln!("{}", tail(&self.log(), 150));
        for f in fs::read_dir(self.dir("log/qemu"))
            .into_iter()
            .flatten()
            .flatten()
        {
            eprintln!("===== {} (tail) =====", f.path().display());
            eprintln!(
                "{}",
                tail(&fs::read_to_string(f.path()).unwrap_or_default(), 40)
            );
        }
    }

    /// Destroys every domain, then kills libvirtd, virtlogd and anything else in its cgroup.
    fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            if d.running() {
                for dom in self.domains() {
                    if let Err(e) = self.virsh(&["destroy", &dom], Duration::from_secs(30)) {
                        eprintln!("[libvirt] {e}");
                    }
                }
            }
            d.kill9();
        }
        let kill = self.cgroup.abs().join("cgroup.kill");
        let _ = fs::write(&kill, "1");
        let emptied = crate::wait_until(Duration::from_secs(10), || {
            (!self.cgroup.populated()).then_some(())
        });
        if emptied.is_none() {
            eprintln!(
                "[libvirt] {} still populated: {:?}",
                self.cgroup.path(),
                self.cgroup.procs()
            );
        }
    }
}

impl Drop for LibvirtHost {
    fn drop(&mut self) {
        if thread::panicking() {
            self.dump_logs();
        }
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// qemu capabilities, probed once per test process
// ---------------------------------------------------------------------------------------------

/// libvirtd probes every qemu binary at start (four qemu runs, seconds each here, mostly waiting
/// for the probe processes to die) and caches the result in /var/cache/libvirt/qemu/capabilities.
/// The first host's cache is kept in memory and put into every later host's cache dir: same
/// machine, same binaries, and libvirt checks the cache's validity itself (binary and libvirtd
/// ctimes, versions, kernel, microcode) and probes again when it does not hold.
static CAPS: Mutex<Vec<(String, Vec<u8>)>> = Mutex::new(Vec::new());

const CAPS_DIR: &str = "cache/qemu/capabilities";

fn caps_known() -> bool {
    !CAPS.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
}

fn seed_caps(root: &Path) {
    let caps = CAPS.lock().unwrap_or_else(|e| e.into_inner());
    if caps.is_empty() {
        return;
    }
    let dir = root.join(CAPS_DIR);
    let _ = fs::create_dir_all(&dir);
    for (name, data) in caps.iter() {
        let _ = fs::write(dir.join(name), data);
    }
}

fn keep_caps(root: &Path) {
    let mut caps = CAPS.lock().unwrap_or_else(|e| e.into_inner());
    if !caps.is_empty() {
        return;
    }
    for f in fs::read_dir(root.join(CAPS_DIR))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(data) = fs::read(f.path()) {
            caps.push((f.file_name().to_string_lossy().into_owned(), data));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Two hosts and a domain that moves between them
// ---------------------------------------------------------------------------------------------

static PAIR_SEQ: AtomicUsize = AtomicUsize::new(0);

/// One migration as [`Pair::migrate`] saw it.
#[derive(Clone, Debug)]
pub struct Migration {
    /// "a->b" or "b->a".
    pub direction: &'static str,
    /// `virsh migrate`'s wall time.
    pub took: Duration,
    /// `Ok(port qemu listened on)`, or why it failed (virsh's error).
    pub result: Result<u16, String>,
    /// The destination qemu's cgroup2 path (after a success).
    pub qemu_cgroup: Option<String>,
    /// From the destination libvirtd's log: from its Prepare phase to its Finish phase (qemu
    /// started, port picked, RAM streamed), i.e. the migration without virsh's round trips and
    /// without stopping the source's qemu (which takes 1.5 s and more here).
    pub prepare_to_finish: Option<Duration>,
    /// From the destination libvirtd's log: from libvirt picking the port to qemu being told to
    /// listen on it (`migrate-incoming`): the window another allocator can take the port in.
    pub pick_to_listen: Option<Duration>,
}

/// Seconds since midnight of a libvirt log line ("2026-11-25 23:28:46.082+0000: ...").
fn log_time(line: &str) -> Option<f64> {
    let t = line.get(11..23)?;
    let mut it = t.split(':');
    let (h, m, s): (f64, f64, f64) = (
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    );
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Time from the first line containing `from` to the first later line containing `to`.
fn span(log: &str, from: &str, to: &str) -> Option<Duration> {
    let mut lines = log.lines();
    let start = lines.find(|l| l.contains(from)).and_then(log_time)?;
    let end = lines.find(|l| l.contains(to)).and_then(log_time)?;
    Some(Duration::from_secs_f64((end - start).rem_euclid(86400.0)))
}

/// Two libvirt hosts (A, B) and one diskless domain, started on A. Drop order: the hosts
/// (domains destroyed, daemons killed, namespaces gone), then `/machine` leftovers, then the
/// mount-point dirs, then the temp dir.
pub struct Pair {
    pub a: LibvirtHost,
    pub b: LibvirtHost,
    pub machine: MachineCleanup,
    _mounts: MountPoints,
    pub tmp: TempDir,
    /// Domain names: `<token>a` while on A, `<token>b` while on B.
    pub token: String,
    on_a: bool,
    pub memory_mib: u32,
}

impl Pair {
    /// Starts A in `cg_a` and B in `cg_b` (qemu.conf's migration range = `ports`) and the domain
    /// on A.
    pub fn start(test: &str, cg_a: Cgroup, cg_b: Cgroup, ports: (u16, u16)) -> Pair {
        Pair::start_with(test, cg_a, cg_b, ports, None)
    }

    /// [`Pair::start`], the domain with a raw disk of `disk_mib` MiB when given: on A it starts
    /// with [`disk_pattern`], on B an empty file of the same size waits for a storage migration
    /// (libvirt copies into an existing file; it creates one only in a storage pool).
    pub fn start_with(
        test: &str,
        cg_a: Cgroup,
        cg_b: Cgroup,
        ports: (u16, u16),
        disk_mib: Option<u64>,
    ) -> Pair {
        let seq = PAIR_SEQ.fetch_add(1, Ordering::Relaxed);
        // Letters and digits only: it ends up in cgroup names and hostnames unchanged.
        let token = format!("pgt{}n{seq}", std::process::id());
        let machine = MachineCleanup::new(&token);
        let mounts = MountPoints::new();
        let tmp = TempDir::new(&format!("libvirt-{test}"));
        // The first libvirtd of the process probes qemu's capabilities; the others reuse them.
        let t = Instant::now();
        let probe_first = !caps_known();
        seed_caps(&tmp.path().join("a"));
        let mut a = LibvirtHost::launch(
            "a",
            &format!("{PREFIX}-{token}-a"),
            tmp.path().join("a"),
            cg_a,
            ports,
        );
        if probe_first {
            a.wait_ready(t, LIBVIRTD_START_TIMEOUT);
            keep_caps(&a.root);
        }
        seed_caps(&tmp.path().join("b"));
        let b = LibvirtHost::launch(
            "b",
            &format!("{PREFIX}-{token}-b"),
            tmp.path().join("b"),
            cg_b,
            ports,
        );
        let mut p = Pair {
            a,
            b,
            machine,
            _mounts: mounts,
            tmp,
            token,
            on_a: true,
            memory_mib: 64,
        };
        if !probe_first {
            p.a.wait_ready(t, LIBVIRTD_START_TIMEOUT);
        }
        p.b.wait_ready(t, LIBVIRTD_START_TIMEOUT);
        let dom = p.domain();
        let disk = disk_mib.map(|mib| {
            for (host, pattern) in [(&p.a, true), (&p.b, false)] {
                let dir = host.dir("lib/images");
                fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
                let file = dir.join(format!("{}.img", p.token));
                let f = fs::File::create(&file)
                    .unwrap_or_else(|e| panic!("create {}: {e}", file.display()));
                f.set_len(mib * 1024 * 1024).unwrap();
                if pattern {
                    use std::os::unix::fs::FileExt as _;
                    f.write_all_at(&disk_pattern(), 0).unwrap();
                }
            }
            disk_path(&p.token)
        });
        if let Err(e) = p.a.create_domain(&dom, p.memory_mib, disk.as_deref()) {
            panic!("creating domain {dom} on A: {e}");
        }
        assert_eq!(p.a.domstate(&dom).as_deref(), Ok("running"));
        eprintln!(
            "[libvirt] domain {dom} running on A (qemu pid {:?})",
            p.a.qemu_pid(&dom)
        );
        p
    }

    /// The domain's current name.
    pub fn domain(&self) -> String {
        format!("{}{}", self.token, if self.on_a { "a" } else { "b" })
    }

    /// The host the domain runs on now.
    pub fn source(&self) -> &LibvirtHost {
        if self.on_a {
            &self.a
        } else {
            &self.b
        }
    }

    /// The other host.
    pub fn dest(&self) -> &LibvirtHost {
        if self.on_a {
            &self.b
        } else {
            &self.a
        }
    }

    /// `virsh migrate --live DOM DEST_URI --migrateuri MIGRATEURI --dname NEW` from wherever the
    /// domain is to the other host. On success the domain must be running on the destination
    /// and gone from the source; on failure it must still run on the source (libvirt rolls
    /// back), or this panics.
    pub fn migrate(&mut self, migrateuri: &str) -> Migration {
        self.migrate_with(migrateuri, &[])
    }

    /// The first `len` bytes of the disk file as the host that holds the domain now sees it.
    pub fn disk_head(&self, len: usize) -> Vec<u8> {
        let file = self
            .source()
            .dir("lib/images")
            .join(format!("{}.img", self.token));
        let mut data = fs::read(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        data.truncate(len);
        data
    }

    /// [`Pair::migrate`] with more `virsh migrate` arguments (e.g. `--copy-storage-all
    /// --disks-port P`).
    pub fn migrate_with(&mut self, migrateuri: &str, extra: &[&str]) -> Migration {
        let (src, dst) = (self.source(), self.dest());
        let direction = if self.on_a { "a->b" } else { "b->a" };
        let dom = self.domain();
        let dname = format!("{}{}", self.token, if self.on_a { "b" } else { "a" });
        let before = dst.incoming_ports().len();
        let log_at = dst.log().len();
        let t = Instant::now();
        let r = src.virsh(
            &[
                "migrate",
                "--live",
                &dom,
                &dst.uri,
                "--migrateuri",
                migrateuri,
                "--dname",
                &dname,
            ]
            .into_iter()
            .chain(extra.iter().copied())
            .collect::<Vec<_>>(),
            MIGRATE_TIMEOUT,
        );
        let took = t.elapsed();
        match r {
            Ok(_) => {
                let state = dst.domstate(&dname);
                assert_eq!(
                    state.as_deref(),
                    Ok("running"),
                    "{dname} after migrating {direction}"
                );
                assert!(
                    src.domstate(&dom).is_err(),
                    "{dom} still on the source after migrating {direction}"
                );
                let port = *dst.incoming_ports()[before..].last().unwrap_or_else(|| {
                    panic!("{direction}: no \"Setting up incoming migration\" line in the destination's log")
                });
                let qemu_cgroup = dst.qemu_pid(&dname).and_then(cgroup_of);
                let log = dst.log();
                let log = log.get(log_at..).unwrap_or("");
                let prepare_to_finish = span(
                    log,
                    "qemuMigrationDstPrepareDirect",
                    "qemuMigrationDstFinish",
                );
                let pick_to_listen = span(
                    log,
                    "Generated uri_out=",
                    "Setting up incoming migration with URI",
                );
                self.on_a = !self.on_a;
                Migration {
                    direction,
                    took,
                    result: Ok(port),
                    qemu_cgroup,
                    prepare_to_finish,
                    pick_to_listen,
                }
            }
            Err(e) => {
                let state = src.domstate(&dom);
                if state.as_deref() != Ok("running") {
                    src.dump_logs();
                    dst.dump_logs();
                    panic!("{dom} is {state:?} on the source after a failed migration {direction} ({e})");
                }
                Migration {
                    direction,
                    took,
                    result: Err(e),
                    qemu_cgroup: None,
                    prepare_to_finish: None,
                    pick_to_listen: None,
                }
            }
        }
    }
}

/// With `PG_LIBVIRT_LOGS=DIR` set, both hosts' log directories (libvirtd.log, virtlogd.log, the
/// qemu logs) are copied to `DIR/<token>/{a,b}` when the pair ends, pass or fail.
impl Drop for Pair {
    fn drop(&mut self) {
        let Some(dir) = std::env::var_os("PG_LIBVIRT_LOGS") else {
            return;
        };
        for h in [&self.a, &self.b] {
            let to = Path::new(&dir).join(&self.token).join(&h.name);
            let r = fs::create_dir_all(to.join("qemu")).and_then(|()| {
                for f in fs::read_dir(h.dir("log"))?
                    .chain(fs::read_dir(h.dir("log/qemu"))?)
                    .flatten()
                {
                    if f.path().is_file() {
                        let rel = f.path().strip_prefix(h.dir("log")).unwrap().to_owned();
                        fs::copy(f.path(), to.join(rel))?;
                    }
                }
                Ok(())
            });
            match r {
                Ok(()) => eprintln!("[libvirt] logs of {} kept in {}", h.name, to.display()),
                Err(e) => eprintln!(
                    "[libvirt] keeping the logs of {} in {}: {e}",
                    h.name,
                    to.display()
                ),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Another port allocator on the host
// ---------------------------------------------------------------------------------------------

/// How pg-allocator allocates: probe the lowest free port, bind it `moment_ms` later, hold it
/// `hold_ms` (0: for good, and allocate nothing more), wait `gap_ms` holding nothing, again; when
/// no port is free, probe again after `retry_ms`.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub moment_ms: u64,
    pub hold_ms: u64,
    pub gap_ms: u64,
    pub retry_ms: u64,
}

/// `pg-allocator FIRST LAST MOMENT_MS HOLD_MS GAP_MS RETRY_MS` running in a cgroup.
/// [`Allocator::stop`] returns its JSON summary; drop SIGKILLs it.
pub struct Allocator {
    child: Child,
    stdout: Option<ChildStdout>,
}

impl Allocator {
    /// Starts `bin` (the pg-allocator executable: `env!("CARGO_BIN_EXE_pg-allocator")` in a
    /// test) in `cg` and waits until its first scan is done.
    pub fn start(bin: &str, cg: &Cgroup, ports: (u16, u16), pace: Pace) -> Allocator {
        let procs = cstring(cg.abs().join("cgroup.procs"));
        let mut c = Command::new(bin);
        c.args([
            ports.0.to_string(),
            ports.1.to_string(),
            pace.moment_ms.to_string(),
            pace.hold_ms.to_string(),
            pace.gap_ms.to_string(),
            pace.retry_ms.to_string(),
        ]);
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            c.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
        let mut child = c.spawn().unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        let stdout = child.stdout.take();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let _ = err.read_line(&mut line);
        assert_eq!(line.trim(), "ready", "{bin} did not start");
        thread::spawn(move || for _ in err.lines() {});
        eprintln!(
            "[libvirt] pg-allocator pid {} in {}: ports {}-{}, {pace:?}",
            child.id(),
            cg.path(),
            ports.0,
            ports.1
        );
        Allocator { child, stdout }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGTERM; its summary: binds, refused (errno → count), scans, scans_without_free_port,
    /// grabbed, lost, ports.
    pub fn stop(mut self) -> serde_json::Value {
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let mut line = String::new();
        BufReader::new(self.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("reading pg-allocator's summary");
        let _ = self.child.wait();
        let v = serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("pg-allocator printed {line:?}: {e}"));
        eprintln!("[libvirt] pg-allocator: {v}");
        v
    }
}

impl Drop for Allocator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
