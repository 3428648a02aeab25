//! `GET /metrics` over TCP (`127.0.0.1:9469`) or a unix socket (`unix:/run/port-guard/metrics.sock`,
//! mode 0600: only root connects).
//!
//! Anyone who can reach a TCP address can connect, so what connections can cost is bounded: at
//! most [`MAX_CONNECTIONS`] are served at once, each gets [`REQUEST_TIMEOUT`] to send its
//! request and as long to take the answer, accept errors back off instead of spinning, and when
//! every slot is held a new connection takes the slot of the oldest idle one: one whose request
//! head is not complete and that has nothing waiting unread in its socket (bytes already read
//! but no whole head count as idle). A scrape whose request is waiting to be read is not idle,
//! however many connections arrive behind it: idle connections cannot keep a scrape out.

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    os::{
        fd::{AsRawFd, RawFd},
        unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, UnixListener},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

/// Connections served at once (each an fd, a task and, once its request arrives, a buffer).
pub const MAX_CONNECTIONS: usize = 64;
/// Time a connection has to send its request head, and again to take the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Where metrics are served: `ADDR:PORT` or `unix:/ABSOLUTE/PATH`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Endpoint, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            let p = PathBuf::from(path);
            if !p.is_absolute() || p.file_name().is_none() {
                return Err(format!(
                    "invalid metrics address {s:?}: a unix socket needs an absolute path, e.g. unix:/run/port-guard/metrics.sock"
                ));
            }
            return Ok(Endpoint::Unix(p));
        }
        s.parse().map(Endpoint::Tcp).map_err(|_| {
            format!("invalid metrics address {s:?}: expected IP:PORT (127.0.0.1:9469, [::1]:9469) or unix:/PATH")
        })
    }
}

impl TryFrom<String> for Endpoint {
    type Error = String;
    fn try_from(s: String) -> Result<Endpoint, String> {
        s.parse()
    }
}

impl From<Endpoint> for String {
    fn from(e: Endpoint) -> String {
        e.to_string()
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A bound metrics socket.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// What it listens on, for the log.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => format!(
                "http://{}/metrics",
                l.local_addr().map(|a| a.to_string()).unwrap_or_default()
            ),
            Listener::Unix(_, p) => format!("unix:{} (GET /metrics, root only)", p.display()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Binds `ep` (before anything is loaded: a busy address fails the start cleanly). A unix
/// socket goes only into a directory root owns that nobody else may write to, replaces only a
/// stale socket of root's, and is made mode 0600.
pub async fn bind(ep: &Endpoint) -> io::Result<Listener> {
    match ep {
        Endpoint::Tcp(a) => TcpListener::bind(a).await.map(Listener::Tcp),
        Endpoint::Unix(p) => bind_unix(p),
    }
}

fn bind_unix(path: &Path) -> io::Result<Listener> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let m = std::fs::symlink_metadata(dir)?;
    if !m.is_dir() || m.uid() != 0 || m.mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "{} must be a directory owned by root that no one else may write to (it is uid {} mode {:o}{})",
            dir.display(),
            m.uid(),
            m.mode() & 0o7777,
            if m.is_symlink() { ", a symbolic link" } else { "" }
        )));
    }
    match std::fs::symlink_metadata(path) {
        Ok(old) if old.file_type().is_socket() && old.uid() == 0 => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::other(format!(
                "{} exists and is not a socket of root's: not replacing it",
                path.display()
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // SAFETY: umask has no preconditions; the old mask is put back right after the bind.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(Listener::Unix(l, path.to_owned()))
}

/// A scrape asks the daemon loop, which owns the maps, for the text.
pub type Scrape = oneshot::Sender<String>;

/// One connection being served: whether its request head is in, its socket (to see whether
/// bytes wait in it), its task.
struct Slot {
    answered: Arc<AtomicBool>,
    fd: RawFd,
    task: JoinHandle<()>,
}

impl Slot {
    /// No complete request head, and nothing waiting unread in the socket. The fd
    /// is the task's own and still open: a task leaves the slots before it drops its connection,
    /// and both happen on this runtime's one thread.
    fn idle(&self) -> bool {
        if self.answered.load(Ordering::Relaxed) {
            return false;
        }
        let mut waiting: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int; a failure (not a socket any more) counts as idle.
        let r = unsafe { libc::ioctl(self.fd, libc::FIONREAD, &mut waiting) };
        r != 0 || waiting == 0
    }
}

/// The connections being served, by arrival.
#[derive(Default)]
struct Slots {
    conns: Mutex<BTreeMap<u64, Slot>>,
    next: AtomicU64,
}

impl Slots {
    /// Room for one more: Ok(None) when there was; Ok(the task) of the oldest idle connection,
    /// aborted to make room (await it: its fd is closed once it returns); Err when every slot
    /// is answering a request.
    fn make_room(&self, evicted: &AtomicU64) -> Result<Option<JoinHandle<()>>, ()> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if conns.len() < MAX_CONNECTIONS {
            return Ok(None);
        }
        let oldest_idle = conns.iter().find(|(_, s)| s.idle()).map(|(k, _)| *k);
        match oldest_idle.and_then(|k| conns.remove(&k)) {
            Some(slot) => {
                slot.task.abort();
                evicted.fetch_add(1, Ordering::Relaxed);
                Ok(Some(slot.task))
            }
            None => Err(()),
        }
    }

    fn add(&self, slot: Slot) -> u64 {
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(k, slot);
        k
    }

    fn remove(&self, k: u64) {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&k);
    }
}

/// Serves `GET /metrics` on `listener`, forwarding each scrape to the daemon loop through `tx`;
/// counts in `evicted` the idle connections it closed to make room.
pub async fn serve(listener: Listener, tx: mpsc::Sender<Scrape>, evicted: Arc<AtomicU64>) {
    let slots = Arc::new(Slots::default());
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted: io::Result<Box<dyn Conn>> = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(c, _)| Box::new(c) as Box<dyn Conn>),
            Listener::Unix(l, _) => l.accept().await.map(|(c, _)| Box::new(c) as Box<dyn Conn>),
        };
        let conn = match accepted {
            Ok(c) => {
                backoff = Duration::from_millis(10);
                c
            }
            Err(e) => {
                // EMFILE and friends: waiting is the only cure; spinning would eat a CPU.
                log::warn!("metrics: accepting a connection: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        match slots.make_room(&evicted) {
            Ok(None) => {}
            // The evicted connection's fd is closed before the next one is served: under a
            // stream of connections the fds in use stay at the slots.
            Ok(Some(task)) => {
                let _ = task.await;
            }
            // Every slot is answering (which takes milliseconds): this one is closed unread.
            Err(()) => continue,
        }
        let answered = Arc::new(AtomicBool::new(false));
        let (tx, flag, slots2) = (tx.clone(), Arc::clone(&answered), Arc::clone(&slots));
        let fd = conn.as_raw_fd();
        // The task registers itself before it reads: a slot is taken from the first instant.
        let (key_tx, key_rx) = oneshot::channel::<u64>();
        let task = tokio::spawn(async move {
            let key = key_rx.await.ok();
            let mut conn = conn;
            answer(&mut conn, tx, &flag).await;
            // Out of the slots before the fd is closed (see Slot::idle).
            if let Some(k) = key {
                slots2.remove(k);
            }
            drop(conn);
        });
        let key = slots.add(Slot { answered, fd, task });
        let _ = key_tx.send(key);
        // The new connection's task runs before the next accept: a request already in its
        // socket is read now, not after a burst of connections behind it.
        tokio::task::yield_now().await;
    }
}

/// A connection of either kind.
trait Conn: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send> Conn for T {}

/// Reads one request head and answers it; every step is bounded in size and time. `answered`
/// is set once the head is in: from then on the connection is not evicted.
async fn answer(conn: &mut Box<dyn Conn>, tx: mpsc::Sender<Scrape>, answered: &AtomicBool) {
    let mut buf = vec![0u8; 8192];
    let mut used = 0;
    let head = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while used < buf.len() {
            let n = conn.read(&mut buf[used..]).await.ok()?;
            if n == 0 {
                return None;
            }
            used += n;
            if buf[..used].windows(4).any(|w| w == b"\r\n\r\n") {
                return Some(());
            }
        }
        None
    })
    .await;
    if !matches!(head, Ok(Some(()))) {
        return;
    }
    answered.store(true, Ordering::Relaxed);
    let line = String::from_utf8_lossy(&buf[..used])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) =
        if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
            let (reply, rx) = oneshot::channel();
            let body = match tx.send(reply).await {
                Ok(()) => rx.await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body,
            )
        } else {
            ("404 Not Found", "text/plain", "try /metrics\n".to_owned())
        };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let _ = conn.write_all(resp.as_bytes()).await;
        let _ = conn.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print_back() {
        for s in [
            "127.0.0.1:9469",
            "[::1]:9469",
            "unix:/run/port-guard/metrics.sock",
        ] {
            assert_eq!(s.parse::<Endpoint>().unwrap().to_string(), s);
        }
        for bad in ["9469", "localhost:9469", "unix:relative.sock", "unix:/"] {
            let e = bad.parse::<Endpoint>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }
}
