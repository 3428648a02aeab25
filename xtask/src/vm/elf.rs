//! Just enough ELF64 (little endian) reading to tell a static executable and to read a kernel
//! module's `.modinfo`.

fn uint(b: &[u8], off: usize, len: usize) -> Option<u64> {
    let s = b.get(off..off + len)?;
    Some(
        s.iter()
            .rev()
            .fold(0u64, |acc, &x| (acc << 8) | u64::from(x)),
    )
}

fn is_elf64(b: &[u8]) -> bool {
    b.starts_with(b"\x7fELF\x02\x01")
}

/// No PT_INTERP program header: the kernel runs it without a dynamic loader.
pub(super) fn is_static(b: &[u8]) -> bool {
    const PT_INTERP: u64 = 3;
    if !is_elf64(b) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (uint(b, 0x20, 8), uint(b, 0x36, 2), uint(b, 0x38, 2))
    else {
        return false;
    };
    (0..phnum).all(|i| uint(b, (phoff + i * phentsize) as usize, 4) != Some(PT_INTERP))
}

fn section<'a>(b: &'a [u8], want: &str) -> Option<&'a [u8]> {
    if !is_elf64(b) {
        return None;
    }
    let shoff = uint(b, 0x28, 8)? as usize;
    let shentsize = uint(b, 0x3A, 2)? as usize;
    let shnum = uint(b, 0x3C, 2)? as usize;
    let shstrndx = uint(b, 0x3E, 2)? as usize;
    let hdr = |i: usize| shoff + i * shentsize;
    let strtab = uint(b, hdr(shstrndx) + 0x18, 8)? as usize;
    for i in 0..shnum {
        let name_off = strtab + uint(b, hdr(i), 4)? as usize;
        let name = b.get(name_off..)?.split(|&c| c == 0).next()?;
        if name == want.as_bytes() {
            let off = uint(b, hdr(i) + 0x18, 8)? as usize;
            let size = uint(b, hdr(i) + 0x20, 8)? as usize;
            return b.get(off..off + size);
        }
    }
    None
}

/// The value of `key` in a module's `.modinfo` (`""` when the key is absent); `None` when
/// there is no `.modinfo`.
pub(super) fn modinfo(b: &[u8], key: &str) -> Option<String> {
    let info = section(b, ".modinfo")?;
    let prefix = format!("{key}=");
    Some(
        info.split(|&c| c == 0)
            .find_map(|e| e.strip_prefix(prefix.as_bytes()))
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default(),
    )
}
