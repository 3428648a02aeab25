//! One libvirtd + virtlogd in its own cgroup, mount and UTS namespace, and the diskless domain
//! it runs.

use std::{
    ffi::CString,
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use super::{cstring, install::program, tail, QEMU, VIRSH_TIMEOUT};
use crate::{run_cmd_timeout, Cgroup, Daemon};

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
    pub(super) fn dir(&self, sub: &str) -> PathBuf {
        self.root.join(sub)
    }

    /// Writes the configuration and starts virtlogd and libvirtd; [`LibvirtHost::wait_ready`]
    /// waits until libvirtd answers.
    pub(super) fn launch(
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
    pub(super) fn wait_ready(&mut self, since: Instant, timeout: Duration) {
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
