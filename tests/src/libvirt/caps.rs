//! qemu's capabilities, probed by the first libvirtd of the test process and reused by the
//! others.

use std::{fs, path::Path, sync::Mutex};

/// libvirtd probes every qemu binary at start (four qemu runs, seconds each here, mostly waiting
/// for the probe processes to die) and caches the result in /var/cache/libvirt/qemu/capabilities.
/// The first host's cache is kept in memory and put into every later host's cache dir: same
/// machine, same binaries, and libvirt checks the cache's validity itself (binary and libvirtd
/// ctimes, versions, kernel, microcode) and probes again when it does not hold.
static CAPS: Mutex<Vec<(String, Vec<u8>)>> = Mutex::new(Vec::new());

const CAPS_DIR: &str = "cache/qemu/capabilities";

pub(super) fn caps_known() -> bool {
    !CAPS.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
}

pub(super) fn seed_caps(root: &Path) {
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

pub(super) fn keep_caps(root: &Path) {
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
