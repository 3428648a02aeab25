//! A `BPF_F_MMAPABLE` array map mapped into this process: its values are read and written with
//! atomic instructions, no syscall. The allocators' shared memory (`PG_ALLOC`) and the ranges
//! (`PG_RANGES`) are read this way.

use std::{
    io,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

/// A `BPF_F_MMAPABLE` array map's values, mapped shared into this process.
pub struct SharedWords {
    words: NonNull<AtomicU64>,
    /// Words the map holds (the mapping is rounded up to pages).
    count: usize,
    len: usize,
}

// SAFETY: the mapping is shared memory accessed only through atomics; it lives until Drop.
unsafe impl Send for SharedWords {}
unsafe impl Sync for SharedWords {}

impl SharedWords {
    /// Maps `count` u64 words of the map behind `fd` (-1: anonymous memory, for tests). The
    /// mapping holds its own reference to the map: `fd` may be closed afterwards.
    pub fn map(fd: i32, count: usize) -> io::Result<SharedWords> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = (count * 8).div_ceil(page) * page;
        let flags = if fd >= 0 {
            libc::MAP_SHARED
        } else {
            libc::MAP_SHARED | libc::MAP_ANONYMOUS
        };
        // SAFETY: a shared read-write mapping of the map's fd (or anonymous memory); the kernel
        // refuses (EINVAL/EPERM) a map that is not mmapable or smaller than `len`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedWords {
            words: NonNull::new(ptr.cast()).expect("mmap returned a non-null address"),
            count,
            len,
        })
    }

    /// Word `i` (panics out of bounds).
    pub fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.count);
        // SAFETY: in bounds of the mapping, 8-byte aligned (page-aligned base), and only ever
        // accessed atomically.
        unsafe { &*self.words.as_ptr().add(i) }
    }

    /// Every word, read twice until two reads agree: a consistent copy even while a writer
    /// (the daemon, updating through the syscall) is halfway through.
    pub fn snapshot(&self) -> Vec<u64> {
        let read = || -> Vec<u64> {
            (0..self.count)
                .map(|i| self.word(i).load(Ordering::Acquire))
                .collect()
        };
        let mut a = read();
        loop {
            let b = read();
            if a == b {
                return a;
            }
            a = b;
        }
    }
}

impl Drop for SharedWords {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.words.as_ptr().cast(), self.len) };
    }
}
