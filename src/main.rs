//! The `greyhound` command: `serve`, `check`, `snapshot inspect`.
//!
//! Process-level errors end here: one clear line on stderr and a non-zero exit code.

use std::io::{IsTerminal, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use greyhound::cli::{CheckArgs, Cli, CliCommand, ServeArgs, SnapshotCommand};
use greyhound::cluster::{Cluster, ClusterConfig, Joined};
use greyhound::config::{parse_duration, Config};
use greyhound::engine::exempt::DEFAULT_CLIENTS;
use greyhound::engine::{
    Engine, EngineConfig, ExemptList, Exemptions, IdentityKind, Normalizer, SystemClock,
};
use greyhound::proto::native;
use greyhound::server::snapshots::Snapshots;
use greyhound::server::{self, AllowList, Listeners, Settings, Shared};
use greyhound::snapshot::{self, DirStore, Store, Writer};
use greyhound::spf::{Spf, SpfConfig};

fn main() -> ExitCode {
    let cli = match Cli::try_parse_args(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // clap's exit code for a refused command line (2), with one line instead of its
            // usage: a start-up failure in a service log is read line by line.
            eprintln!("greyhound: {}", greyhound::cli::error_line(&e));
            return ExitCode::from(2);
        }
    };
    match cli.command {
        CliCommand::Serve(args) => match serve(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("greyhound: {}", one_line(&e));
                ExitCode::from(1)
            }
        },
        CliCommand::Check(args) => check(&args),
        CliCommand::Snapshot {
            command: SnapshotCommand::Inspect { file },
        } => inspect(&file),
        CliCommand::Admin(args) => ExitCode::from(greyhound::cli::admin::run(&args)),
    }
}

/// `greyhound snapshot inspect FILE`: prints the report; exit 0 if the file is a usable
/// snapshot, 1 if it is damaged or unreadable.
fn inspect(file: &std::path::Path) -> ExitCode {
    // Mapping a directory fails with ENODEV ("No such device"), which says nothing useful.
    if file.is_dir() {
        eprintln!(
            "greyhound: snapshot inspect {}: is a directory; give one of its snapshot-*.snap files",
            file.display()
        );
        return ExitCode::from(1);
    }
    let bytes = match greyhound::snapshot::mmap::map(file) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("greyhound: snapshot inspect {}: {e}", file.display());
            return ExitCode::from(1);
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let report = greyhound::snapshot::inspect::inspect(&bytes, now);
    println!("file:         {}", file.display());
    print!("{report}");
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The error and its causes on one line, skipping a cause whose text the message above it
/// already quotes (several error types print their source themselves).
fn one_line(e: &anyhow::Error) -> String {
    let mut s = String::new();
    for cause in e.chain() {
        let m = cause.to_string();
        if !s.contains(&m) {
            if !s.is_empty() {
                s.push_str(": ");
            }
            s.push_str(&m);
        }
    }
    s.replace('\n', " ")
}

/// Loads every configured exemption list (the embedded client list when none is configured)
/// and the trusted TLS clients, greytraps and per-domain policy, which are reloaded with them.
fn load_exemptions(cfg: &Config) -> Result<Exemptions> {
    let mut b = Exemptions::builder();
    if cfg.whitelist_clients.is_empty() {
        b.add_clients("embedded default client list", DEFAULT_CLIENTS)?;
    }
    for p in &cfg.whitelist_clients {
        b.load_file(ExemptList::Client, p)?;
    }
    for p in &cfg.whitelist_senders {
        b.load_file(ExemptList::Sender, p)?;
    }
    for p in &cfg.whitelist_recipients {
        b.load_file(ExemptList::Recipient, p)?;
    }
    for p in &cfg.trusted_certs {
        b.load_trusted_certs(p)?;
    }
    for p in &cfg.greytrap_recipients {
        b.load_greytraps(p)?;
    }
    for p in &cfg.domain_policy {
        b.load_domain_policy(p, &cfg.policy)?;
    }
    Ok(b.build())
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("greyhound={level},warn")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Keys of changed records each engine shard keeps for replication before it falls back to a
/// rescan (16 bytes each, 320 shards: 20 MB at most; at 100 k changes/s a 20 ms collection
/// finds ~8 per shard).
const OUTBOX_PER_SHARD: usize = 4096;

fn serve(args: &ServeArgs) -> Result<()> {
    let cfg = Config::load(args.config.as_deref(), &args.settings)?;
    // Destructured in full so that a new setting cannot be left unused here.
    let Config {
        native,
        policy_addr,
        metrics,
        admin,
        data_dir,
        snapshot_interval_secs,
        policy,
        ipv4_prefix,
        ipv6_prefix,
        allow,
        greylist_text,
        defer_action,
        x_greylist_header,
        hostname,
        // Read by `load_exemptions`, at start and on SIGHUP.
        whitelist_clients: _,
        whitelist_senders: _,
        whitelist_recipients: _,
        trusted_certs: _,
        greytrap_recipients: _,
        domain_policy: _,
        greytrap_ttl_secs,
        client_identity,
        dns_server,
        spf_timeout_ms,
        log_level,
        workers,
        cluster_redis,
        node_id,
        cluster_name,
        cluster_retention_secs,
        limits,
    } = &cfg;
    init_logging(log_level);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    // Half the cores by default: the clients of the policy port (Postfix's smtpd processes) and
    // the UDP threads share the machine, and ping-pong traffic on more runtime workers than
    // that spends its time waking and stealing between them. Measured on 2 cores with the
    // load generator beside it, 1 worker against 2, alternating runs: policy 71–93 k/s against
    // 68–78 k/s (8 connections) and 73–74 against 52–57 (64); native TCP ×16 the same, ×128
    // 1.38–1.51 M/s against 1.11–1.75 (docs/BENCHMARKS.md).
    let workers = if *workers == 0 {
        (cores / 2).max(1)
    } else {
        *workers
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // The handlers are installed before anything slow (loading a large snapshot takes seconds):
    // a SIGHUP then (`systemctl reload` during a start) would otherwise kill the process with
    // its default action, and a SIGTERM would end it without a word. A signal that arrives
    // while loading waits in its stream: SIGHUP reloads the lists once serving starts, SIGTERM
    // and SIGINT stop the start once the snapshot is loaded.
    let mut signals = {
        let _runtime = rt.enter();
        Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        }
    };
    let normalizer = Normalizer::new(*ipv4_prefix, *ipv6_prefix)?;
    let dir_lock = greyhound::datadir::lock(data_dir)?;
    let secret = greyhound::datadir::open(data_dir)?;
    let exemptions = load_exemptions(&cfg)?;
    let counts = exemptions.counts();
    let trusted_certs = exemptions.trusted().len();
    let cluster_url = cluster_redis.as_deref().filter(|u| !u.is_empty());
    let engine = Engine::new(
        EngineConfig {
            policy: *policy,
            normalizer,
            secret,
        },
        Arc::new(SystemClock),
    )
    .with_greytrap_ttl(*greytrap_ttl_secs)
    .with_identities(*client_identity)
    // Validated: at most a million, so it fits.
    .with_limits(
        limits.max_triplets,
        u32::try_from(limits.max_new_per_client).unwrap_or(u32::MAX),
    );
    // Only a cluster node records its changes; a single node pays one compare per change.
    let engine = Arc::new(match cluster_url {
        Some(_) => engine.with_outbox(OUTBOX_PER_SHARD),
        None => engine,
    });
    engine.set_exemptions(exemptions);

    // Bound before loading: an unusable address fails at once, and clients that connect
    // while the snapshot loads wait in the listen backlog instead of being refused.
    let listeners = Listeners::bind(*native, policy_addr, *metrics, cores)?;
    let admin_listener = admin
        .path(data_dir)
        .map(|p| server::admin::bind(&p))
        .transpose()?;
    check_open_files(limits.max_connections, cores);
    let store = DirStore::new(data_dir);
    // Before loading: such a name would be loaded as the newest snapshot.
    greyhound::snapshot::store::check_names(&store)?;
    let loading = Instant::now();
    info!(data_dir = %data_dir.display(), "loading the newest snapshot");
    let loaded = snapshot::load(&store, &engine, cores)?;
    match &loaded.name {
        Some(name) => info!(
            file = %store.display(name),
            triplets = loaded.triplets,
            clients = loaded.clients,
            expired_dropped = loaded.triplets_expired + loaded.clients_expired,
            ms = loading.elapsed().as_millis() as u64,
            "snapshot loaded"
        ),
        None if loaded.skipped.is_empty() => {
            info!(data_dir = %data_dir.display(), "no snapshot yet; starting with an empty table")
        }
        None => error!(
            data_dir = %data_dir.display(),
            unusable = loaded.skipped.len(),
            "no usable snapshot (each is named above); starting with an empty table"
        ),
    }
    if let Some(name) = rt.block_on(signals.stop_requested()) {
        // Nothing has changed since the snapshot on disk: no snapshot to write, no state to
        // lose. The listen backlog is dropped with the sockets.
        info!("{name} while starting: stopping before serving; no snapshot written (nothing was learnt)");
        if let server::PolicyListener::Unix(_, file) = &listeners.policy {
            file.remove_if_ours();
        }
        if let Some(a) = &admin_listener {
            a.file.remove_if_ours();
        }
        drop(dir_lock);
        return Ok(());
    }
    let writer =
        Writer::new(store).map_err(|e| anyhow!("data directory {}: {e}", data_dir.display()))?;
    let hostname = if hostname.is_empty() {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into())
    } else {
        hostname.clone()
    };
    let settings = Settings::new(
        greylist_text.clone(),
        *x_greylist_header,
        hostname,
        limits.clone(),
    )
    .with_defer_action(*defer_action);
    let cluster = match cluster_url {
        None => None,
        Some(url) => {
            let node_id = if node_id.is_empty() {
                let host = nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok())
                    .unwrap_or_default();
                if !snapshot::valid_node_id(host.as_bytes()) {
                    bail!("the host name {host:?} cannot be a node id ([A-Za-z0-9_.-]{{1,64}}); set --node-id");
                }
                host
            } else {
                node_id.clone()
            };
            let holder = format!(
                "host {}, data directory {}",
                nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok())
                    .unwrap_or_default(),
                std::fs::canonicalize(data_dir)
                    .unwrap_or_else(|_| data_dir.clone())
                    .display()
            );
            let masking = format!(
                "key id {:016x}, ipv4-prefix {ipv4_prefix}, ipv6-prefix {ipv6_prefix}, normalisation {}",
                engine.key_id(),
                greyhound::snapshot::format::NORMALIZATION
            );
            let cfg = ClusterConfig {
                url: url.to_string(),
                node_id,
                name: cluster_name.clone(),
                retention: Duration::from_secs(u64::from(*cluster_retention_secs)),
                holder,
                masking,
            };
            info!(cluster = ?cfg, "joining the cluster");
            let (c, joined) = Cluster::start(cfg, engine.clone(), &loaded.cluster)?;
            if let Joined::Unreachable(why) = joined {
                info!("redis is not reachable ({why}): starting alone; the node id and hash key are checked once it is");
            }
            Some(c)
        }
    };
    let mut shared = Shared::new(engine, AllowList::new(allow.clone()), settings);
    if let Some(c) = &cluster {
        shared = shared.with_cluster(c.clone());
    }
    if client_identity.uses(IdentityKind::Spf) {
        let spf = Spf::new(SpfConfig {
            dns_server: *dns_server,
            timeout: Duration::from_millis(u64::from(*spf_timeout_ms)),
            cache_entries: greyhound::spf::DEFAULT_CACHE_ENTRIES,
        })
        .context("client-identity spf")?;
        shared = shared.with_spf(Arc::new(spf));
    }
    let shared = Arc::new(shared);
    shared
        .metrics
        .snapshots
        .loaded_triplets
        .set(loaded.triplets as i64);
    info!(
        delay = policy.delay,
        retry_window = policy.retry_window,
        whitelist_ttl = policy.whitelist_ttl,
        awl_clients = policy.awl_clients,
        dry_run = policy.dry_run,
        ipv4_prefix,
        ipv6_prefix,
        client_networks = counts.client_networks,
        client_names = counts.client_names,
        senders = counts.senders,
        recipients = counts.recipients,
        trusted_certs,
        greytraps = counts.greytraps,
        domains = counts.domains,
        client_identity = %client_identity,
        dns_server = ?dns_server,
        spf_timeout_ms,
        allow = ?allow,
        data_dir = %data_dir.display(),
        workers,
        udp_threads = cores,
        "greyhound {} starting",
        env!("CARGO_PKG_VERSION")
    );

    let snapshots = Snapshots::start(
        writer,
        shared.clone(),
        Duration::from_secs(u64::from(*snapshot_interval_secs)),
    )
    .context("cannot start the snapshot thread")?;
    let served = rt.block_on(async {
        let token = CancellationToken::new();
        let Signals { term, int, hup } = &mut signals;
        server::announce(&listeners);
        let admin_file = admin_listener.as_ref().map(|a| a.file.clone());
        if let Some(l) = admin_listener {
            let admin = server::admin::Admin { shared: shared.clone(), snapshots: Some(snapshots.trigger()) };
            tokio::spawn(server::admin::serve(l, admin, token.clone()));
        }
        let server = tokio::spawn(server::run(listeners, shared.clone(), token.clone(), Duration::from_secs(3)));
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM: finishing requests in flight and stopping"); break }
                _ = int.recv() => { info!("SIGINT: finishing requests in flight and stopping"); break }
                _ = hup.recv() => match load_exemptions(&cfg) {
                    Ok(ex) => {
                        let c = ex.counts();
                        let trusted_certs = ex.trusted().len();
                        shared.engine.set_exemptions(ex);
                        info!(client_networks = c.client_networks, client_names = c.client_names, senders = c.senders, recipients = c.recipients, greytraps = c.greytraps, domains = c.domains, trusted_certs, "SIGHUP: exemption lists reloaded");
                    }
                    Err(e) => error!("SIGHUP: exemption lists not reloaded, keeping the previous ones: {}", one_line(&e)),
                },
            }
        }
        token.cancel();
        if let Some(f) = admin_file {
            f.remove_if_ours();
        }
        match server.await {
            Ok(r) => r.map_err(|e| anyhow!("server: {e}")),
            Err(e) => Err(anyhow!("server task failed: {e}")),
        }
    });
    // Every request in flight has been answered: the final snapshot holds all of them. It
    // is written even if the server failed, so what it had learnt is not lost.
    drop(rt);
    // What is still pending leaves first, so the final snapshot's replication state says so.
    if let Some(c) = &cluster {
        c.stop();
    }
    let last = snapshots.finish(&shared);
    served?;
    last.context("final snapshot failed; the previous snapshots are kept")?;
    drop(dir_lock);
    info!("stopped");
    Ok(())
}

/// Descriptors the server holds besides its connections and UDP sockets: listeners and their
/// spare descriptors, the data directory's lock and snapshot files, Redis, the log.
const FD_RESERVE: u64 = 64;

/// Makes sure the open-file limit leaves room for `max-connections` on each of the three stream
/// listeners: raises the soft limit towards the hard one if needed (a service manager's default
/// soft limit of 1024 is below the default 3 × 4096), and warns if even the hard limit is too
/// low. Not fatal: the server works below it, but at the limit new clients are closed unanswered
/// (counted in `greyhound_accept_errors_total`), and the operator should know before that.
fn check_open_files(max_connections: usize, udp_sockets: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let need = 3 * max_connections as u64 + udp_sockets as u64 + FD_RESERVE;
    let Ok((mut soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft >= need {
        return;
    }
    let raised = need.min(hard);
    if raised > soft && setrlimit(Resource::RLIMIT_NOFILE, raised, hard).is_ok() {
        info!(
            from = soft,
            to = raised,
            "raised the open-file limit for max-connections on three listeners"
        );
        soft = raised;
    }
    if soft < need {
        warn!(
            limit = soft,
            need,
            max_connections,
            "the open-file limit ({soft}) is below what max-connections on the native, policy and metrics listeners needs ({need}); at the limit new clients are closed unanswered: raise LimitNOFILE or lower max-connections"
        );
    }
}

/// The signals `serve` acts on, caught from before the snapshot loads.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// The name of a stop signal (SIGTERM, SIGINT) received so far, if any, without waiting.
    async fn stop_requested(&mut self) -> Option<&'static str> {
        tokio::select! {
            biased;
            _ = self.term.recv() => Some("SIGTERM"),
            _ = self.int.recv() => Some("SIGINT"),
            () = std::future::ready(()) => None,
        }
    }
}

/// `greyhound check`: one query; exit 0 on PASS, 1 on DEFER, 2 on anything else.
fn check(args: &CheckArgs) -> ExitCode {
    match check_inner(args) {
        Ok(reply) => {
            println!("{reply}");
            match native::parse_reply_line(reply.as_bytes()).map(|r| r.reply) {
                Ok(native::Reply::Pass { .. }) => ExitCode::SUCCESS,
                Ok(native::Reply::Defer { .. }) => ExitCode::from(1),
                _ => ExitCode::from(2),
            }
        }
        Err(e) => {
            eprintln!("greyhound check: {}", one_line(&e));
            ExitCode::from(2)
        }
    }
}

/// `<a@b>` → `a@b`, `<>` → `""`; anything else as given (the codec adds the brackets, and the
/// server refuses what is still malformed).
fn unbracket(addr: &str) -> &str {
    addr.strip_prefix('<')
        .and_then(|a| a.strip_suffix('>'))
        .unwrap_or(addr)
}

fn check_inner(args: &CheckArgs) -> Result<String> {
    let timeout = Duration::from_secs(u64::from(
        parse_duration(&args.timeout)
            .map_err(|e| anyhow!("--timeout: {e}"))?
            .max(1),
    ));
    let server: SocketAddr = args
        .server
        .to_socket_addrs()
        .with_context(|| format!("--server {}", args.server))?
        .next()
        .ok_or_else(|| anyhow!("--server {}: no address", args.server))?;
    // The server accepts IPv6 in brackets too, as SMTP address literals write it.
    let client: IpAddr = args
        .client
        .strip_prefix('[')
        .and_then(|c| c.strip_suffix(']'))
        .unwrap_or(&args.client)
        .parse()
        .map_err(|_| anyhow!("{:?} is not a client IP address", args.client))?;
    let mut line = Vec::with_capacity(128);
    native::encode_request(
        &native::Request {
            id: None,
            command: native::Command::Check(native::Triplet {
                client,
                sender: unbracket(&args.sender),
                recipient: unbracket(&args.recipient),
                helo: None,
                name: None,
                auth: None,
                cert: None,
                cert_subject: None,
                body: None,
            }),
        },
        &mut line,
    );
    let reply = if args.udp {
        let local: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse()?
        } else {
            "[::]:0".parse()?
        };
        let sock = UdpSocket::bind(local)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.send_to(&line, server)
            .with_context(|| format!("sending to {server}"))?;
        let mut buf = [0u8; 2048];
        let (n, _) = sock
            .recv_from(&mut buf)
            .map_err(|e| anyhow!("no answer from {server} over UDP within {timeout:?}: {e}"))?;
        String::from_utf8_lossy(&buf[..n]).into_owned()
    } else {
        let mut s = TcpStream::connect_timeout(&server, timeout)
            .with_context(|| format!("connecting to {server}"))?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.write_all(&line)?;
        // Like Exim's readsocket: half-close, then read the answer to the end.
        s.shutdown(std::net::Shutdown::Write)?;
        let mut out = String::new();
        s.take(64 * 1024)
            .read_to_string(&mut out)
            .with_context(|| format!("reading the answer from {server}"))?;
        out
    };
    let reply = reply.lines().next().unwrap_or("").trim().to_string();
    if reply.is_empty() {
        return Err(anyhow!("{server} closed the connection without an answer (is this client in the server's --allow list?)"));
    }
    Ok(reply)
}
