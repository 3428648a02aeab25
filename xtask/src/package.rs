//! `cargo xtask package`: the .deb and the .rpm, with the ecosystem's own tools (cargo-deb and
//! cargo-generate-rpm, pinned and installed here when missing). Their tables are in
//! port-guard/Cargo.toml; this builds the release binary and generates what they package that
//! is not a file of the repository: the config in audit mode, the man page, the completions and
//! the Debian changelog (target/package/assets).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context as _, Result};
use xtask::{cargo, cargo_install, output, run};

const CARGO_DEB_VERSION: &str = "3.8.0";
const CARGO_GENERATE_RPM_VERSION: &str = "0.21.1";

/// The packages `package` made.
pub struct Packages {
    pub deb: PathBuf,
    pub rpm: PathBuf,
}

/// Installs the packaging tools when missing (or of another version).
fn tools() -> Result<()> {
    for (tool, sub, version) in [
        ("cargo-deb", "deb", CARGO_DEB_VERSION),
        (
            "cargo-generate-rpm",
            "generate-rpm",
            CARGO_GENERATE_RPM_VERSION,
        ),
    ] {
        cargo_install(
            tool,
            version,
            Command::new(env!("CARGO")).args([sub, "--version"]),
        )?;
    }
    Ok(())
}

/// The workspace version (the packages' version).
fn version(root: &Path) -> Result<String> {
    let text = std::fs::read_to_string(root.join("Cargo.toml")).context("reading Cargo.toml")?;
    let table: toml::Table = text.parse().context("parsing Cargo.toml")?;
    table
        .get("workspace")
        .and_then(|w| w.get("package"))
        .and_then(|p| p.get("version"))
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .context("Cargo.toml has no [workspace.package] version")
}

/// The config the packages install: contrib/libvirt-host.toml in audit mode, so that
/// installing the package refuses nothing until the operator says `mode = "enforce"`.
fn audit_config(root: &Path) -> Result<String> {
    let host = std::fs::read_to_string(root.join("contrib/libvirt-host.toml"))
        .context("reading contrib/libvirt-host.toml")?;
    let enforce = "mode = \"enforce\"\n";
    ensure!(
        host.matches(enforce).count() == 1,
        "contrib/libvirt-host.toml must say {enforce:?} once (the package turns it into audit)"
    );
    Ok(host.replacen(
        enforce,
        "# Installed in audit mode: binds that would be refused are logged and counted\n\
         # (port_guard_audited_binds_total), none is refused. Read the journal and\n\
         # `port-guard check`, then set \"enforce\" and `systemctl reload port-guard`.\n\
         mode = \"audit\"\n",
        1,
    ))
}

/// What the binary prints for `args`.
fn generated(bin: &Path, args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {} {args:?}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} {args:?} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// gzip -9n: no name or time in the header, so that a rebuild gives the same bytes.
fn gzip(data: &[u8], to: &Path) -> Result<()> {
    let mut child = Command::new("gzip")
        .args(["-9", "-n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::fs::File::create(to).with_context(|| format!("creating {}", to.display()))?)
        .spawn()
        .context("running gzip")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(data)
        .context("writing to gzip")?;
    ensure!(child.wait()?.success(), "gzip failed");
    Ok(())
}

/// The Debian changelog of this version (one entry: the packages are built from the tree).
fn changelog(root: &Path, version: &str) -> Result<String> {
    // The commit's date keeps the changelog (and so the package) the same for the same tree.
    let when = output(
        Command::new("git")
            .current_dir(root)
            .args(["log", "-1", "--format=%ct"]),
    )
    .map(|s| s.trim().to_owned())
    .filter(|s| !s.is_empty())
    .unwrap_or_else(|| "0".into());
    let date = output(Command::new("date").args(["-R", "-u", "-d", &format!("@{when}")]))
        .context("running date")?;
    Ok(format!(
        "port-guard ({version}-1) unstable; urgency=medium\n\n  \
         * port-guard {version}, built from its source tree (see README.md).\n\n \
         -- port-guard maintainers <maintainers@port-guard.org>  {}\n",
        date.trim()
    ))
}

/// Builds target/package/port-guard_<version>-1_amd64.deb and port-guard-<version>-1.x86_64.rpm.
pub fn package(root: &Path) -> Result<Packages> {
    tools()?;
    cargo(root, &["build", "--release", "--package", "port-guard"])?;
    let bin = root.join("target/release/port-guard");
    let out = root.join("target/package");
    let assets = out.join("assets");
    std::fs::create_dir_all(&assets).with_context(|| format!("mkdir {}", assets.display()))?;
    let version = version(root)?;
    write_assets(root, &bin, &assets, &version)?;

    // Old packages of other versions would confuse whoever picks "the" package up.
    for entry in std::fs::read_dir(&out)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb" || e == "rpm") {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    let out_str = out.to_str().context("target path is UTF-8")?;
    let deb = [
        "deb",
        "--package",
        "port-guard",
        "--no-build",
        "--output",
        out_str,
    ];
    cargo(root, &deb)?;
    cargo(
        root,
        &[
            "generate-rpm",
            "--package",
            "port-guard",
            "--output",
            out_str,
        ],
    )?;
    let packages = Packages {
        deb: find_one(&out, "deb")?,
        rpm: find_one(&out, "rpm")?,
    };
    for p in [&packages.deb, &packages.rpm] {
        let size = std::fs::metadata(p)?.len();
        eprintln!(
            "xtask: {} ({:.1} MiB)",
            p.display(),
            size as f64 / (1024.0 * 1024.0)
        );
    }
    Ok(packages)
}

/// What the packages carry beside the binary, generated into `assets`: the audit-mode config,
/// the man page, the shell completions, a stripped binary for the rpm, the changelog.
fn write_assets(root: &Path, bin: &Path, assets: &Path, version: &str) -> Result<()> {
    let write = |name: &str, data: &[u8]| -> Result<()> {
        std::fs::write(assets.join(name), data).with_context(|| format!("writing {name}"))
    };
    write("config.toml", audit_config(root)?.as_bytes())?;
    gzip(&generated(bin, &["man"])?, &assets.join("port-guard.8.gz"))?;
    for (shell, name) in [
        ("bash", "port-guard.bash"),
        ("zsh", "_port-guard"),
        ("fish", "port-guard.fish"),
    ] {
        write(name, &generated(bin, &["completions", shell])?)?;
    }
    // cargo-generate-rpm packages what it is given: a stripped copy (cargo-deb strips its own).
    let stripped = assets.join("port-guard");
    std::fs::copy(bin, &stripped).context("copying the binary for the rpm")?;
    run(Command::new("strip").arg("--strip-unneeded").arg(&stripped))?;
    write("changelog", changelog(root, version)?.as_bytes())
}

/// The one file in `dir` ending in `.ext`.
fn find_one(dir: &Path, ext: &str) -> Result<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == ext) {
            found.push(path);
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!("expected one .{ext} in {}, found {found:?}", dir.display()),
    }
}
