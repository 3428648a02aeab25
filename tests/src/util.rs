//! Small helpers: time, polling, errno names, exit codes.

use std::{
    process::ExitStatus,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Name of an errno value ("EADDRINUSE"), for readable assertion messages.
pub fn errno_name(e: i32) -> String {
    match e {
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        libc::EADDRINUSE => "EADDRINUSE".into(),
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL".into(),
        libc::EINVAL => "EINVAL".into(),
        _ => format!("errno {e} ({})", std::io::Error::from_raw_os_error(e)),
    }
}

/// Maps an exit status to a single code: the exit code, or 128 + signal when killed.
pub fn exit_code(st: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}
