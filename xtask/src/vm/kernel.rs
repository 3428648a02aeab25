//! The kernel cache, `target/vm-cache/kernels/<series>/`: vmlinuz and the few modules the suite
//! needs (with their dependencies, uncompressed), unpacked from the Debian package that [`Apt`]
//! downloads, and a manifest that makes a second run download nothing.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{ensure, Context as _, Result};
use xtask::run;

use super::{apt::Apt, elf, Series};

/// Modules that Debian builds as modules, that a Debian host loads on demand (the guest has no
/// modprobe setup, so the init loads them up front), and that the suite uses: sock_diag for TCP
/// and UDP (`check` and the daemon's conflict scan list sockets through it; without it they fall
/// back to /proc/net, which does not show bound-only TCP sockets), and SCTP (a bind test checks
/// that SCTP's own port space passes the guard), whose libcrc32c needs the crc32c algorithm
/// (a soft dependency: listed here, before it). Hard dependencies are added from each module's
/// `.modinfo`; modules built into the kernel are left out.
const MODULES: &[&str] = &[
    "inet_diag",
    "tcp_diag",
    "udp_diag",
    "crc32c_generic",
    "sctp",
];

/// A kernel ready to boot.
pub(super) struct Kernel {
    pub(super) series: Series,
    pub(super) package: String,
    pub(super) version: String,
    /// `uname -r`
    pub(super) release: String,
    pub(super) vmlinuz: PathBuf,
    /// Uncompressed modules in load order (dependencies first).
    pub(super) modules: Vec<PathBuf>,
}

/// What `target/vm-cache/kernels/<series>/manifest` records; written last, so a manifest means a
/// complete entry.
const MANIFEST: &str = "manifest";

impl Kernel {
    fn load(dir: &Path, series: Series) -> Option<Kernel> {
        let text = fs::read_to_string(dir.join(MANIFEST)).ok()?;
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(str::to_owned)
        };
        if field("wanted")? != MODULES.join(" ") {
            return None; // the module list changed: unpack again
        }
        let modules: Vec<PathBuf> = field("modules")?
            .split_whitespace()
            .map(|m| dir.join("modules").join(format!("{m}.ko")))
            .collect();
        let k = Kernel {
            series,
            package: field("package")?,
            version: field("version")?,
            release: field("release")?,
            vmlinuz: dir.join("vmlinuz"),
            modules,
        };
        (k.vmlinuz.is_file() && k.modules.iter().all(|m| m.is_file())).then_some(k)
    }
}

pub(super) fn fetch_kernel(
    cache: &Path,
    apt: &mut Apt,
    series: Series,
    refresh: bool,
) -> Result<Kernel> {
    let dir = cache.join("kernels").join(series.name);
    if !refresh {
        if let Some(k) = Kernel::load(&dir, series) {
            eprintln!(
                "xtask: kernel {}: {} {} (cached)",
                series.name, k.package, k.version
            );
            return Ok(k);
        }
    }
    let (package, version) = apt.resolve(series)?;
    if let Some(k) =
        Kernel::load(&dir, series).filter(|k| k.package == package && k.version == version)
    {
        eprintln!(
            "xtask: kernel {}: {package} {version} (cached, still the newest)",
            series.name
        );
        return Ok(k);
    }
    eprintln!(
        "xtask: kernel {}: fetching {package} {version}",
        series.name
    );
    let deb = apt.download(&package)?;
    unpack_kernel(&deb, &dir, &package, &version)?;
    // The .deb is big and everything needed from it is now in the cache.
    let _ = fs::remove_file(&deb);
    Kernel::load(&dir, series).with_context(|| {
        format!(
            "unpacked {} but {} is incomplete",
            deb.display(),
            dir.display()
        )
    })
}

/// Extracts vmlinuz and [`MODULES`] (with their dependencies, uncompressed) from `deb` into `dir`.
fn unpack_kernel(deb: &Path, dir: &Path, package: &str, version: &str) -> Result<()> {
    // Not with_extension: "6.1" has one.
    let tmp = PathBuf::from(format!("{}.unpack", dir.display()));
    let _ = fs::remove_dir_all(&tmp);
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(&tmp)?;
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp))?;
    let release = fs::read_dir(tmp.join("boot"))
        .with_context(|| format!("{} has no /boot", deb.display()))?
        .filter_map(|e| e.ok())
        .find_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_owned)
        })
        .with_context(|| format!("{} has no /boot/vmlinuz-*", deb.display()))?;
    fs::create_dir_all(dir.join("modules"))?;
    fs::copy(
        tmp.join("boot").join(format!("vmlinuz-{release}")),
        dir.join("vmlinuz"),
    )?;
    // trixie ships modules under /usr/lib, older releases under /lib.
    let mod_root = ["usr/lib/modules", "lib/modules"]
        .iter()
        .map(|d| tmp.join(d).join(&release))
        .find(|p| p.is_dir())
        .with_context(|| format!("{} has no modules dir for {release}", deb.display()))?;
    let mut index = HashMap::new();
    index_modules(&mod_root, &mut index)?;
    let builtin: BTreeSet<String> = fs::read_to_string(mod_root.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.rsplit('/')
                .next()?
                .strip_suffix(".ko")
                .map(|m| m.replace('-', "_"))
        })
        .collect();
    let mut order = Vec::new();
    for m in MODULES {
        add_module(m, &index, &builtin, dir, &mut order, &mut Vec::new())?;
    }
    fs::write(
        dir.join(MANIFEST),
        format!(
            "package={package}\nversion={version}\nrelease={release}\nwanted={}\nmodules={}\n",
            MODULES.join(" "),
            order.join(" ")
        ),
    )?;
    fs::remove_dir_all(&tmp)?;
    Ok(())
}

/// Module name (`-` read as `_`, as the kernel does) → file, for every module below `dir`.
fn index_modules(dir: &Path, index: &mut HashMap<String, PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            index_modules(&p, index)?;
        } else if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
            for ext in [".ko", ".ko.xz", ".ko.zst", ".ko.gz"] {
                if let Some(stem) = name.strip_suffix(ext) {
                    index.insert(stem.replace('-', "_"), p.clone());
                }
            }
        }
    }
    Ok(())
}

/// Writes `name` and, first, its dependencies into `<dir>/modules/<name>.ko`; `order` receives
/// load order.
fn add_module(
    name: &str,
    index: &HashMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    dir: &Path,
    order: &mut Vec<String>,
    stack: &mut Vec<String>,
) -> Result<()> {
    let name = name.replace('-', "_");
    if order.contains(&name) {
        return Ok(());
    }
    ensure!(
        !stack.contains(&name),
        "module dependency cycle: {stack:?} -> {name}"
    );
    let Some(src) = index.get(&name) else {
        ensure!(
            builtin.contains(&name),
            "module {name} is neither in the package nor built in"
        );
        return Ok(());
    };
    let data = decompress(src)?;
    let deps = elf::modinfo(&data, "depends")
        .with_context(|| format!("{} has no .modinfo section", src.display()))?;
    stack.push(name.clone());
    for dep in deps.split(',').filter(|d| !d.is_empty()) {
        add_module(dep, index, builtin, dir, order, stack)?;
    }
    stack.pop();
    fs::write(dir.join("modules").join(format!("{name}.ko")), data)?;
    order.push(name);
    Ok(())
}

fn decompress(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return fs::read(path).with_context(|| format!("reading {name}"));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running {tool} (for {name})"))?;
    ensure!(
        out.status.success(),
        "{tool} -dc {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}
