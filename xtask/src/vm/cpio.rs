//! The initramfs's archive format: a newc cpio writer, just what the initramfs needs.

use std::{
    collections::BTreeSet,
    fs,
    io::{self, Write},
    path::Path,
};

use anyhow::{Context as _, Result};

/// Writes a newc ("070701") cpio archive: entries are added with their parent directories.
pub(super) struct Cpio<W: Write> {
    out: W,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl<W: Write> Cpio<W> {
    fn new(out: W) -> Self {
        Cpio {
            out,
            ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    fn entry(&mut self, path: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let path = path.trim_start_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.raw(path, mode, rdev, data)
    }

    fn raw(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let ino = if name == "TRAILER!!!" { 0 } else { self.ino };
        self.ino += 1;
        let header = format!(
            "070701{ino:08X}{mode:08X}{:08X}{:08X}{nlink:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            0, // uid
            0, // gid
            0, // mtime
            data.len(),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() + 1,
            0, // check
        );
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(header.len() + name.len() + 1)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    fn pad(&mut self, len: usize) -> io::Result<()> {
        self.out.write_all(&[0; 3][..(4 - len % 4) % 4])
    }

    pub(super) fn dir(&mut self, path: &str) -> io::Result<()> {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.dirs.insert(path.to_owned());
        self.raw(path, 0o040755, (0, 0), &[])
    }

    pub(super) fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, 0o100000 | perm, (0, 0), data)
    }

    pub(super) fn host_file(&mut self, path: &str, src: &Path) -> Result<()> {
        let data = fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        self.file(path, 0o755, &data)?;
        Ok(())
    }

    pub(super) fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, 0o120777, (0, 0), target.as_bytes())
    }

    pub(super) fn char_dev(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<()> {
        self.entry(path, 0o020000 | perm, (major, minor), &[])
    }

    fn finish(mut self) -> io::Result<W> {
        self.raw("TRAILER!!!", 0, (0, 0), &[])?;
        Ok(self.out)
    }
}

/// Runs `fill` on a cpio archive written at the end of `file`.
pub(super) fn write_cpio(
    file: fs::File,
    fill: impl FnOnce(&mut Cpio<io::BufWriter<fs::File>>) -> Result<()>,
) -> Result<()> {
    let mut cpio = Cpio::new(io::BufWriter::with_capacity(1 << 20, file));
    fill(&mut cpio)?;
    cpio.finish()?.flush()?;
    Ok(())
}
