//! The config the libvirt tests run: contrib/libvirt-host.toml, the file docs/libvirt.md shows
//! and tells operators to install, with only the test-specific values rewritten.

use std::fs;

use crate::workspace_file;

/// contrib/libvirt-host.toml, the file docs/libvirt.md tells operators to install, with only the
/// values that must differ in a test rewritten (whole lines, found by key; each must be there
/// exactly once):
///
/// - `ports`: the test's range instead of libvirt's 49152-49215. The guard is attached at the
///   cgroup2 root of a shared machine: reserving the real range would refuse those ports to
///   every process on it (and, with protect_ephemeral, keep the kernel from picking them). The
///   test range is outside the ephemeral range, and each libvirtd's qemu.conf has it as
///   migration_port_min/max (the docs: keep both equal).
/// - `allow`: libvirtd runs without systemd (the harness starts it by hand and hides the system
///   bus from it), so it is not in /system.slice/libvirtd.service but in the test's own cgroups,
///   and libvirt puts its VMs in /machine (its partition without systemd, the docs' "Without
///   systemd" case), not /machine.slice.
/// - `spawn_parent`: `port-guard lease` makes its scratch cgroup there; a cgroup of the test's
///   keeps the test from creating (and leaving) /port-guard at the host's cgroup root.
/// - `extra`: string settings a test is about (`mode = "audit"`; `errno = "eperm"` to show
///   what the docs warn against).
///
/// Kept from the file: `attach = "/"` (the VMs live under /machine at the root: the guard must
/// see them; allowed here only because the range is test-only), `errno = "eaddrinuse"` (what
/// libvirt's allocator needs), `protect_ephemeral = true` (the tests check that unload restores
/// the sysctl exactly), and whatever else the file says.
pub fn host_config(
    ports: (u16, u16),
    allow: &[&str],
    spawn_parent: &str,
    extra: &[(&str, &str)],
) -> String {
    let path = workspace_file("contrib/libvirt-host.toml");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(
        text.matches("[[reserve]]").count(),
        1,
        "{} should have one [[reserve]] table",
        path.display()
    );
    let quoted: Vec<String> = allow.iter().map(|a| format!("\"{a}\"")).collect();
    let mut replace = vec![
        ("ports", format!("ports = \"{}-{}\"", ports.0, ports.1)),
        ("allow", format!("allow = [{}]", quoted.join(", "))),
        ("spawn_parent", format!("spawn_parent = \"{spawn_parent}\"")),
    ];
    for (k, v) in extra {
        // A number is written as one; an empty value takes the key out (the file's default).
        let line = if v.is_empty() {
            format!("# {k}: left out by the test")
        } else if v.parse::<u64>().is_ok() {
            format!("{k} = {v}")
        } else {
            format!("{k} = \"{v}\"")
        };
        replace.push((k, line));
    }
    let mut seen = vec![0; replace.len()];
    let out: Vec<String> = text
        .lines()
        .map(|line| {
            let t = line.trim_start();
            if t.starts_with('#') {
                return line.to_owned();
            }
            let key = t.split('=').next().unwrap_or("").trim();
            match replace.iter().position(|(k, _)| *k == key) {
                Some(i) => {
                    seen[i] += 1;
                    replace[i].1.clone()
                }
                None => line.to_owned(),
            }
        })
        .collect();
    for ((k, _), n) in replace.iter().zip(&seen) {
        assert_eq!(*n, 1, "{} should set `{k}` exactly once", path.display());
    }
    out.join("\n") + "\n"
}
