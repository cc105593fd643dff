//! Binding every listener before the runtime starts, so that an unusable address fails at
//! start with one clear line, and clients that connect while a snapshot loads wait in the
//! listen backlog instead of being refused.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::PolicyAddr;
use crate::net::udp_batch;

/// Where the Postfix policy listener is bound.
#[derive(Debug)]
pub enum PolicyListener {
    /// A TCP socket.
    Tcp(std::net::TcpListener),
    /// A Unix socket, removed again at shutdown if the path is still this socket.
    Unix(std::os::unix::net::UnixListener, SocketFile),
}

/// The file a Unix listener was bound to, as it was right after `bind`: its path, device and
/// inode, so that shutdown removes the path only while it still names this socket.
#[derive(Debug, Clone)]
pub struct SocketFile {
    /// The path given.
    pub path: PathBuf,
    /// Device and inode of the socket file made by `bind`.
    id: (u64, u64),
}

impl SocketFile {
    fn identity(path: &PathBuf) -> io::Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path)?;
        Ok((m.dev(), m.ino()))
    }

    /// The socket file just bound at `path` (call right after `bind`).
    pub fn bound(path: &std::path::Path) -> io::Result<Self> {
        let path = path.to_path_buf();
        let id = Self::identity(&path)?;
        Ok(Self { path, id })
    }

    /// Removes the path if it is still the socket this server bound. Another instance that
    /// started on the same path since (after removing ours) keeps its socket: unlinking it
    /// would leave that instance listening on a socket nobody can reach.
    pub fn remove_if_ours(&self) {
        match Self::identity(&self.path) {
            Ok(id) if id == self.id => {
                let _ = std::fs::remove_file(&self.path);
            }
            Ok(_) => tracing::info!(
                path = %self.path.display(),
                "the socket path now names another file; left in place"
            ),
            Err(_) => {}
        }
    }
}

/// Every socket the server serves.
#[derive(Debug)]
pub struct Listeners {
    /// Native protocol, TCP.
    pub native_tcp: std::net::TcpListener,
    /// Native protocol, UDP: one socket per worker thread, same port.
    pub native_udp: Vec<std::net::UdpSocket>,
    /// Postfix policy protocol.
    pub policy: PolicyListener,
    /// Metrics HTTP.
    pub metrics: std::net::TcpListener,
}

/// A listener that could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for {what} on {addr}: {source}")]
pub struct BindError {
    /// Which listener.
    pub what: &'static str,
    /// The address as configured.
    pub addr: String,
    /// Why.
    pub source: io::Error,
}

fn tcp_listener(what: &'static str, addr: SocketAddr) -> Result<std::net::TcpListener, BindError> {
    let err = |source| BindError {
        what,
        addr: addr.to_string(),
        source,
    };
    let l = std::net::TcpListener::bind(addr).map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    Ok(l)
}

fn unix_listener(path: &PathBuf) -> Result<std::os::unix::net::UnixListener, BindError> {
    let err = |source| BindError {
        what: "the Postfix policy protocol",
        addr: path.display().to_string(),
        source,
    };
    // A socket file left by a previous run that crashed would make bind fail; remove it only
    // if it is a socket nobody answers on.
    if std::os::unix::net::UnixStream::connect(path).is_err() {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
    let l = std::os::unix::net::UnixListener::bind(path).map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    Ok(l)
}

impl Listeners {
    /// Binds every listener. `udp_workers` sockets share the native port.
    pub fn bind(
        native: SocketAddr,
        policy: &PolicyAddr,
        metrics: SocketAddr,
        udp_workers: usize,
    ) -> Result<Self, BindError> {
        let native_tcp = tcp_listener("the native protocol (TCP)", native)?;
        // Port 0 means "any": UDP takes the port TCP got, so both share one number.
        let udp_addr = native_tcp.local_addr().map_err(|source| BindError {
            what: "the native protocol (TCP)",
            addr: native.to_string(),
            source,
        })?;
        let native_udp = udp_batch::bind_reuseport(
            udp_addr,
            udp_workers.max(1),
            8 << 20,
            Duration::from_millis(200),
        )
        .map_err(|source| BindError {
            what: "the native protocol (UDP)",
            addr: udp_addr.to_string(),
            source,
        })?;
        let policy = match policy {
            PolicyAddr::Tcp(a) => {
                PolicyListener::Tcp(tcp_listener("the Postfix policy protocol", *a)?)
            }
            PolicyAddr::Unix(path) => {
                let listener = unix_listener(path)?;
                // Right after bind, before anyone else could replace the file.
                let id = SocketFile::identity(path).map_err(|source| BindError {
                    what: "the Postfix policy protocol",
                    addr: path.display().to_string(),
                    source,
                })?;
                PolicyListener::Unix(
                    listener,
                    SocketFile {
                        path: path.clone(),
                        id,
                    },
                )
            }
        };
        let metrics = tcp_listener("metrics (HTTP)", metrics)?;
        Ok(Self {
            native_tcp,
            native_udp,
            policy,
            metrics,
        })
    }

    /// A one-line description of the bound addresses, for the startup log and for tests.
    pub fn describe(&self) -> String {
        let addr =
            |l: &std::net::TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let policy = match &self.policy {
            PolicyListener::Tcp(l) => addr(l),
            PolicyListener::Unix(_, f) => format!("unix:{}", f.path.display()),
        };
        format!(
            "native={} policy={} metrics={}",
            addr(&self.native_tcp),
            policy,
            addr(&self.metrics)
        )
    }
}
