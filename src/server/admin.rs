//! The admin socket (`--admin`, DESIGN §13): a Unix stream socket, mode 0600, that
//! `greyhound admin` talks to with the frames of [`crate::proto::admin`].
//!
//! Administration is a few requests a second at most, so a connection is a task of its own
//! with plain async reads and writes (the request path's connection loop in `conn.rs` is
//! built for millions of tiny requests and Postfix's behaviour, neither of which applies).
//! Bounds: [`MAX_CONNECTIONS`] at once, an idle connection closes after [`IDLE`], and a
//! frame is refused by its length before its body is read. A bad frame is answered with an
//! error and the connection closed (its framing cannot be trusted any more); the server goes on.

use std::io;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::listen::{BindError, SocketFile};
use super::snapshots::SnapshotTrigger;
use super::Shared;
use crate::engine::clock::to_unix;
use crate::engine::{Decision, ImportRecord, Query, TripletRecord};
use crate::proto::admin::{
    self as proto, Body, IdentityReport, ImportItem, ImportReport, LookupReport, Outcome, Request,
    Response, SnapshotReport, StatusReport, WhitelistReport,
};

/// Most admin connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 16;
/// An admin connection that sends nothing for this long is closed.
pub const IDLE: Duration = Duration::from_secs(60);

/// The bound admin socket.
#[derive(Debug)]
pub struct AdminListener {
    listener: std::os::unix::net::UnixListener,
    /// Removed at exit if the path still names this socket.
    pub file: SocketFile,
}

/// Binds the admin socket at `path`, mode 0600 from its creation (the umask is narrowed
/// around `bind`, so there is no moment when others could connect). A socket file left by a
/// crashed run is replaced only if nothing answers on it.
pub fn bind(path: &Path) -> Result<AdminListener, BindError> {
    use nix::sys::stat::{umask, Mode};
    let err = |source| BindError {
        what: "the admin socket",
        addr: path.display().to_string(),
        source,
    };
    if std::os::unix::net::UnixStream::connect(path).is_err() {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    umask(old);
    let listener = bound.map_err(err)?;
    // Belt and braces: the mode does not depend on the umask having been honoured.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    let file = SocketFile::bound(path).map_err(err)?;
    Ok(AdminListener { listener, file })
}

/// What the admin requests act on.
#[derive(Debug, Clone)]
pub struct Admin {
    /// The server's state.
    pub shared: Arc<Shared>,
    /// The snapshot thread (`None` while there is none, e.g. in tests).
    pub snapshots: Option<SnapshotTrigger>,
}

/// Serves the admin socket until `shutdown`.
pub async fn serve(l: AdminListener, admin: Admin, shutdown: CancellationToken) -> io::Result<()> {
    let listener = UnixListener::from_std(l.listener)?;
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    debug!("admin socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::AcqRel);
            warn!("admin socket: {MAX_CONNECTIONS} connections already open; one more closed");
            continue;
        }
        let (admin, open, shutdown) = (admin.clone(), open.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                r = connection(stream, &admin) => if let Err(e) = r {
                    debug!("admin connection closed: {e}");
                },
                _ = shutdown.cancelled() => {}
            }
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

async fn connection(mut s: UnixStream, admin: &Admin) -> io::Result<()> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    loop {
        let parsed = loop {
            match proto::parse_request(&buf) {
                Ok(Some(x)) => break Ok(x),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            // Read at most what the announced frame still needs (or its length prefix).
            let want = match proto::frame_len(&buf) {
                Ok(Some(len)) => proto::LENGTH_LEN + len - buf.len(),
                _ => proto::LENGTH_LEN - buf.len(),
            };
            let start = buf.len();
            buf.resize(start + want.min(64 << 10), 0);
            let n = match tokio::time::timeout(IDLE, s.read(&mut buf[start..])).await {
                Ok(r) => r?,
                Err(_) => return Ok(()),
            };
            buf.truncate(start + n);
            if n == 0 {
                return Ok(());
            }
        };
        out.clear();
        let (response, close) = match parsed {
            Ok((req, used)) => {
                buf.drain(..used);
                (handle(admin, req).await, false)
            }
            Err(e) => {
                warn!("admin socket: refused a request: {e}");
                (Response::error(e.to_string()), true)
            }
        };
        if proto::encode_response(&response, &mut out).is_err() {
            out.clear();
            proto::encode_response(&Response::error("response too large"), &mut out)
                .expect("a short error fits");
        }
        s.write_all(&out).await?;
        if close {
            return Ok(());
        }
    }
}

fn ok(message: impl Into<String>, body: Option<Body>) -> Response {
    Response {
        outcome: Outcome::Ok,
        message: message.into(),
        body,
    }
}

fn not_found(message: impl Into<String>) -> Response {
    Response {
        outcome: Outcome::NotFound,
        message: message.into(),
        body: None,
    }
}

/// Answers one request.
pub async fn handle(admin: &Admin, req: Request) -> Response {
    let engine = &admin.shared.engine;
    match req {
        Request::Status => ok("status", Some(Body::Status(status(&admin.shared)))),
        Request::Lookup {
            client,
            sender,
            recipient,
            name,
        } => lookup(&admin.shared, client, &sender, &recipient, name.as_deref()),
        Request::Whitelist {
            client,
            sender,
            recipient,
            ttl,
        } => {
            let q = Query::new(client, &sender, &recipient);
            let identity = engine
                .explain(&q)
                .identities
                .first()
                .map(|i| i.identity.clone())
                .unwrap_or_default();
            let r = engine.whitelist(&q, ttl);
            let until = to_unix(r.alive_until(engine.policy()).min(u64::from(u32::MAX)) as u32);
            info!(%client, sender, recipient, %identity, until, "admin: whitelisted");
            ok(
                format!("whitelisted under {identity}"),
                Some(Body::Whitelist(WhitelistReport {
                    identity,
                    whitelisted_until: until,
                })),
            )
        }
        Request::Delete {
            client,
            sender,
            recipient,
            name,
        } => {
            let sender = if sender == "<>" { "" } else { &sender };
            let mut q = Query::new(client, sender, &recipient);
            q.client_name = name.as_deref();
            q.spf = spf_cached(&admin.shared, client, sender, name.as_deref());
            let found = engine.delete(&q);
            info!(%client, sender, recipient, found, "admin: triplet deleted");
            if found {
                ok("deleted", None)
            } else {
                not_found("no live record for this triplet (a tombstone was left all the same)")
            }
        }
        Request::DeleteClient { client } => {
            let found = engine.delete_client(client);
            info!(%client, found, "admin: client's auto-whitelist entry deleted");
            if found {
                ok("deleted", None)
            } else {
                not_found("no auto-whitelist entry for this client")
            }
        }
        Request::Snapshot => {
            let Some(t) = admin.snapshots.clone() else {
                return Response::error("no snapshot writer in this server");
            };
            match tokio::task::spawn_blocking(move || t.write_now()).await {
                Ok(Ok(w)) => ok(
                    format!("snapshot {} written", w.name),
                    Some(Body::Snapshot(SnapshotReport {
                        file: w.name,
                        triplets: w.triplets,
                        clients: w.clients,
                        bytes: w.bytes,
                        ms: w.duration.as_millis() as u64,
                    })),
                ),
                Ok(Err(e)) => Response::error(format!("snapshot failed: {e}")),
                Err(e) => Response::error(format!("snapshot failed: {e}")),
            }
        }
        Request::Import { items } => {
            let records: Vec<ImportRecord<'_>> = items.iter().map(import_record).collect();
            let s = engine.import(&records);
            debug!(items = items.len(), ?s, "admin: import batch");
            ok(
                "imported",
                Some(Body::Import(ImportReport {
                    triplets: s.triplets as u64,
                    clients: s.clients as u64,
                    expired: s.expired as u64,
                    deleted: s.deleted as u64,
                })),
            )
        }
    }
}

fn import_record(i: &ImportItem) -> ImportRecord<'_> {
    match i {
        ImportItem::Triplet {
            client,
            sender,
            recipient,
            first_seen,
            last_seen,
            passed,
        } => ImportRecord::Triplet {
            client: *client,
            sender,
            recipient,
            first_seen: *first_seen,
            last_seen: *last_seen,
            passed: *passed,
        },
        ImportItem::Client {
            client,
            count,
            last_seen,
        } => ImportRecord::Client {
            client: *client,
            count: *count,
            last_seen: *last_seen,
        },
    }
}

fn status(shared: &Shared) -> StatusReport {
    let s = shared.engine.stats();
    let last = shared.metrics.snapshots.last_time.get();
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let snapshot_unix = (last > 0).then_some(last as u64);
    StatusReport {
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_seconds: shared.started.elapsed().as_secs(),
        triplets: s.triplets as u64,
        greylisted: (s.triplets - s.whitelisted) as u64,
        whitelisted: s.whitelisted as u64,
        awl_clients: s.awl_clients as u64,
        awl_active: s.awl_active as u64,
        trapped_clients: s.trapped_clients as u64,
        tombstones: shared.engine.tombstone_count() as u64,
        table_bytes: s.table_bytes as u64,
        snapshot_unix,
        snapshot_age_seconds: snapshot_unix.map(|t| now_unix.saturating_sub(t)),
        cluster: shared
            .cluster
            .as_ref()
            .and_then(|c| serde_json::to_value(c.status()).ok()),
    }
}

/// The `spf` identity only as a request would have it now: from the cache, no DNS (the host
/// name stands for the HELO name of a null sender).
fn spf_cached<'a>(
    shared: &Shared,
    client: IpAddr,
    sender: &'a str,
    name: Option<&'a str>,
) -> Option<&'a str> {
    shared
        .spf
        .as_ref()
        .and_then(|s| super::spf::passed(&s.spf, client, sender, name.unwrap_or("")))
}

/// The answer as the native protocol words it: `DEFER 240`, `PASS known`.
pub fn answer(d: Decision) -> String {
    match d {
        Decision::Defer { seconds_left } => format!("DEFER {seconds_left}"),
        Decision::Pass(p) => format!("PASS {}", p.reason()),
    }
}

fn lookup(
    shared: &Shared,
    client: IpAddr,
    sender: &str,
    recipient: &str,
    name: Option<&str>,
) -> Response {
    let engine = &shared.engine;
    let sender = if sender == "<>" { "" } else { sender };
    let spf = spf_cached(shared, client, sender, name);
    let mut q = Query::new(client, sender, recipient);
    q.client_name = name;
    q.spf = spf;
    let x = engine.explain(&q);
    let p = &x.policy;
    let now = x.now;
    let report = |r: Option<TripletRecord>| {
        let unix = |s: u32| Some(to_unix(s));
        let unix64 = |s: u64| Some(to_unix(s.min(u64::from(u32::MAX)) as u32));
        match r {
            None => ("none", None, None, None, None, None),
            Some(r) if r.alive_until(p) < u64::from(now) => (
                "expired",
                unix(r.first_seen()),
                unix(r.last_seen()),
                None,
                None,
                unix64(r.alive_until(p)),
            ),
            Some(r) if r.is_whitelisted() => (
                "whitelisted",
                unix(r.first_seen()),
                unix(r.last_seen()),
                None,
                unix64(r.alive_until(p)),
                unix64(r.alive_until(p)),
            ),
            Some(r) => (
                "greylisted",
                unix(r.first_seen()),
                unix(r.last_seen()),
                unix64(u64::from(r.first_seen()) + u64::from(p.delay)),
                None,
                unix64(r.alive_until(p)),
            ),
        }
    };
    let identities: Vec<IdentityReport> = x
        .identities
        .iter()
        .map(|i| {
            let (state, first_seen, last_seen, passes_from, whitelisted_until, expires) =
                report(i.record);
            IdentityReport {
                kind: i.kind.as_str().to_string(),
                identity: i.identity.clone(),
                key: format!("{:032x}", i.key.as_u128()),
                state: state.to_string(),
                first_seen,
                last_seen,
                passes_from,
                whitelisted_until,
                expires,
            }
        })
        .collect();
    let found = identities
        .iter()
        .any(|i| i.state == "greylisted" || i.state == "whitelisted");
    let awl_count = x.awl.map_or(0, |a| a.count);
    let l = LookupReport {
        client_net: x.client_net,
        sender: x.sender,
        recipient: x.recipient,
        identities,
        exemption: x.exemption.map(|e| e.as_str().to_string()),
        domain_rule: x.domain_rule,
        greytrap: x.greytrap,
        trapped: x.trapped,
        awl_identity: x.awl_identity,
        awl_count,
        awl_threshold: p.awl_clients,
        awl_active: x.awl.is_some_and(|a| a.is_active(now, p)),
        answer: answer(x.decision),
        now: to_unix(now),
    };
    Response {
        outcome: if found {
            Outcome::Ok
        } else {
            Outcome::NotFound
        },
        message: if found {
            "found".into()
        } else {
            "no live record for this triplet".into()
        },
        body: Some(Body::Lookup(l)),
    }
}
