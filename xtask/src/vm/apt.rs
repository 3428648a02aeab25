//! A private apt config under `target/vm-cache/apt`: its own sources.list (bullseye, bookworm,
//! trixie), lists and cache, to find the kernel package each series' newest `linux-image-amd64`
//! depends on and to download it. The machine's apt sources and state are not read or changed.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};
use xtask::{output, run};

use super::Series;

/// apt with its own sources.list, lists and cache under `dir`; the machine's apt sources,
/// preferences and lists are not used.
pub(super) struct Apt {
    dir: PathBuf,
    updated: bool,
}

impl Apt {
    pub(super) fn new(dir: &Path) -> Result<Apt> {
        for sub in ["lists/partial", "cache/archives/partial", "debs"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let key = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let mut sources = String::from(
            "# Written by `cargo xtask vm-test`: where Debian's kernels come from. Only the private\n\
             # apt config of target/vm-cache/apt reads it.\n",
        );
        for (uri, suite) in [
            ("http://deb.debian.org/debian", "bullseye"),
            ("http://deb.debian.org/debian-security", "bullseye-security"),
            ("http://deb.debian.org/debian", "bookworm"),
            ("http://deb.debian.org/debian", "trixie"),
        ] {
            // target=Packages: no translations, DEP-11 or Contents indexes.
            sources += &format!("deb [signed-by={key} target=Packages] {uri} {suite} main\n");
        }
        fs::write(dir.join("sources.list"), sources)?;
        Ok(Apt {
            dir: dir.to_owned(),
            updated: false,
        })
    }

    fn cmd(&self, tool: &str) -> Command {
        let d = self.dir.display();
        let mut c = Command::new(tool);
        for opt in [
            format!("Dir::Etc::SourceList={d}/sources.list"),
            "Dir::Etc::SourceParts=/dev/null".into(),
            format!("Dir::State::Lists={d}/lists"),
            format!("Dir::Cache={d}/cache"),
            "Dir::Etc::Preferences=/dev/null".into(),
            "Dir::Etc::PreferencesParts=/dev/null".into(),
            "Acquire::Languages=none".into(),
            // Downloads land in a root-owned dir that apt's `_apt` user cannot write.
            "APT::Sandbox::User=root".into(),
        ] {
            c.arg("-o").arg(opt);
        }
        c
    }

    fn update(&mut self) -> Result<()> {
        if !self.updated {
            run(self.cmd("apt-get").args(["update", "-qq"]))?;
            self.updated = true;
        }
        Ok(())
    }

    fn query(&self, tool: &str, args: &[&str]) -> Result<String> {
        let mut c = self.cmd(tool);
        c.args(args);
        output(&mut c).with_context(|| format!("{c:?} failed"))
    }

    /// The ABI package (`linux-image-6.1.0-50-amd64`) and its version that the newest
    /// `linux-image-amd64` of the series depends on.
    pub(super) fn resolve(&mut self, series: Series) -> Result<(String, String)> {
        self.update()?;
        let prefix = format!("{}.", series.name);
        let mut best: Option<String> = None;
        for line in self
            .query("apt-cache", &["madison", "linux-image-amd64"])?
            .lines()
        {
            let Some(v) = line.split('|').nth(1).map(str::trim) else {
                continue;
            };
            if !v.starts_with(&prefix) {
                continue;
            }
            let newer = match &best {
                None => true,
                Some(b) => Command::new("dpkg")
                    .args(["--compare-versions", v, "gt", b])
                    .status()
                    .is_ok_and(|s| s.success()),
            };
            if newer {
                best = Some(v.to_owned());
            }
        }
        let meta = best.with_context(|| {
            format!(
                "no linux-image-amd64 {prefix}* in {} (after apt-get update)",
                series.suite
            )
        })?;
        let deps = self.query(
            "apt-cache",
            &["depends", &format!("linux-image-amd64={meta}")],
        )?;
        let package = deps
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
            .with_context(|| {
                format!("linux-image-amd64={meta} depends on no linux-image-*: {deps}")
            })?
            .to_owned();
        let version = self
            .query("apt-cache", &["madison", &package])?
            .lines()
            .find_map(|l| l.split('|').nth(1).map(|v| v.trim().to_owned()))
            .with_context(|| format!("no version of {package}"))?;
        Ok((package, version))
    }

    /// Downloads `package` into `<dir>/debs` (unless it is there) and returns the .deb.
    pub(super) fn download(&mut self, package: &str) -> Result<PathBuf> {
        let debs = self.dir.join("debs");
        let find = || -> Result<Option<PathBuf>> {
            for e in fs::read_dir(&debs)? {
                let p = e?.path();
                let name = p
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                if name.starts_with(&format!("{package}_")) && name.ends_with(".deb") {
                    return Ok(Some(p));
                }
            }
            Ok(None)
        };
        if let Some(p) = find()? {
            return Ok(p);
        }
        self.update()?;
        run(self
            .cmd("apt-get")
            .current_dir(&debs)
            .args(["download", "-q", package]))?;
        find()?.with_context(|| {
            format!(
                "apt-get download {package} left no .deb in {}",
                debs.display()
            )
        })
    }
}
