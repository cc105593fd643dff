//! `greyhound-loadtest`: load generation (`run`), the transport ceiling (`ceiling`) and
//! capacity planning (`plan`) for Greyhound. See `docs/LOADTEST.md`.

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use greyhound::engine::Policy;
use greyhound_loadtest::client::{self, Proto, RunConfig};
use greyhound_loadtest::cpu;
use greyhound_loadtest::naive::NaiveServer;
use greyhound_loadtest::null::{NullOptions, NullResponder};
use greyhound_loadtest::plan::{self, PlanConfig, PoolIdentity, SenderMix};
use greyhound_loadtest::report::{CeilingReport, RunReport};
use greyhound_loadtest::workload::{Mix, WorkloadConfig};

#[derive(Parser, Debug)]
#[command(
    name = "greyhound-loadtest",
    version,
    about = "Load generation and capacity planning for Greyhound"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Drive a running server with realistic traffic and report throughput and latency.
    Run(RunArgs),
    /// Measure, in one run with the same client settings, the minimal client and this client
    /// against a null responder, a naive server (each in a process of its own), then the target if
    /// given; report each side's CPU, the ratios, and warn when the client saturated.
    Ceiling(RunArgs),
    /// Simulate days or weeks of mail through the engine on a simulated clock.
    Plan(PlanArgs),
    /// Serve the null responder (or the naive server) until killed, for A/B runs of
    /// `run` and `run --minimal` against the same server, or for profiling.
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Server address (default: 127.0.0.1:10030 for native, 127.0.0.1:10023 for policy).
    /// Only loopback addresses unless --allow-remote. `run` takes it several times for the
    /// nodes of a cluster: every connection is opened to each, and each triplet's retries go
    /// to another node than its first attempt (use a --server-delay of at least 1 s).
    #[arg(long)]
    target: Vec<String>,
    /// Allow a target that is not a loopback address.
    #[arg(long)]
    allow_remote: bool,
    /// Transport.
    #[arg(long, value_enum, default_value_t = Proto::NativeTcp)]
    proto: Proto,
    /// Connections (TCP) or sockets (UDP), spread over the client's threads.
    #[arg(long, short = 'c', default_value_t = 8)]
    connections: usize,
    /// Client threads, each driving its share of the connections through one epoll set
    /// (0: half the cores, so the server on the same machine keeps the other half).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Run the minimal reference client: one fixed request, replies counted but not read,
    /// no latency (what the full client is measured against; `ceiling` runs both).
    #[arg(long)]
    minimal: bool,
    /// `ceiling`: the target's process, for its CPU (default: the process bound to the
    /// target's port, found through /proc).
    #[arg(long)]
    target_pid: Option<u32>,
    /// Requests in flight per TCP connection, datagrams in flight per UDP socket
    /// (policy: always 1, as Postfix).
    #[arg(long, short = 'p', default_value_t = 16)]
    pipeline: usize,
    /// Requests per UDP datagram.
    #[arg(long, default_value_t = 1)]
    per_datagram: usize,
    /// How long to send: 10, 10s, 500ms, 2m (default 10s unless --requests is given).
    #[arg(long, short = 'd', value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Stop after this many requests in all.
    #[arg(long, short = 'n')]
    requests: Option<u64>,
    /// Open loop: send at this many requests per second in all, latency from the intended
    /// send time. Without it, closed loop (as fast as answers come).
    #[arg(long, short = 'r')]
    rate: Option<f64>,
    /// An unanswered request counts as a timeout after this long.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    timeout: Duration,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress line.
    #[arg(long, short = 'q')]
    quiet: bool,
    /// Before measuring, whitelist the known pool: send it, wait --server-delay, send it
    /// again (not measured).
    #[arg(long)]
    warmup: bool,
    #[command(flatten)]
    workload: WorkloadArgs,
}

#[derive(Args, Debug)]
struct WorkloadArgs {
    /// Share of never-seen triplets.
    #[arg(long = "new", default_value_t = Mix::default().new)]
    new: f64,
    /// Share of retries before the server's delay is over (answered DEFER).
    #[arg(long = "early-retry", default_value_t = Mix::default().early_retry)]
    early_retry: f64,
    /// Share of retries after the server's delay (answered PASS retried).
    #[arg(long = "retry", default_value_t = Mix::default().retry)]
    retry: f64,
    /// Share of triplets from the known pool (PASS known once whitelisted).
    #[arg(long = "known", default_value_t = Mix::default().known)]
    known: f64,
    /// The server's greylisting delay in seconds: retries are sent after it.
    #[arg(long, default_value_t = 300.0)]
    server_delay: f64,
    /// IPv4 client networks (/24s in 10.0.0.0/8).
    #[arg(long, default_value_t = WorkloadConfig::default().nets_v4)]
    nets_v4: u32,
    /// IPv6 client networks (/64s in 2001:db8::/32).
    #[arg(long, default_value_t = WorkloadConfig::default().nets_v6)]
    nets_v6: u32,
    /// Share of senders with an IPv6 client.
    #[arg(long, default_value_t = WorkloadConfig::default().ipv6_share)]
    ipv6_share: f64,
    /// Distinct senders (plain, +extension, VERP, SRS, BATV and null sender forms).
    #[arg(long, default_value_t = WorkloadConfig::default().senders)]
    senders: u32,
    /// Distinct recipients.
    #[arg(long, default_value_t = WorkloadConfig::default().recipients)]
    recipients: u32,
    /// Triplets in the known pool.
    #[arg(long, default_value_t = WorkloadConfig::default().known_pool)]
    known_pool: u32,
    /// Seed of the workload.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Loopback address to listen on (ports are picked free and printed).
    #[arg(long, default_value = "127.0.0.1")]
    ip: IpAddr,
    /// Serve the naive server instead of the null responder.
    #[arg(long)]
    naive: bool,
    /// The naive server's greylisting delay in seconds.
    #[arg(long, default_value_t = 300.0)]
    delay: f64,
}

#[derive(Args, Debug)]
struct PlanArgs {
    /// Simulated days.
    #[arg(long, default_value_t = PlanConfig::default().days)]
    days: f64,
    /// Mean messages (recipients) per second over the day.
    #[arg(long, default_value_t = PlanConfig::default().rate)]
    rate: f64,
    /// Busiest over quietest hour of the day.
    #[arg(long, default_value_t = PlanConfig::default().peak_ratio)]
    peak_ratio: f64,
    /// Share of messages that are spam.
    #[arg(long, default_value_t = PlanConfig::default().spam_share)]
    spam_share: f64,
    /// Legitimate sending organisations.
    #[arg(long, default_value_t = PlanConfig::default().senders)]
    senders: u32,
    /// Local recipients.
    #[arg(long, default_value_t = PlanConfig::default().recipients)]
    recipients: u32,
    /// Distinct correspondents per sender.
    #[arg(long, default_value_t = PlanConfig::default().fanout)]
    fanout: u32,
    /// Share of legitimate senders running Postfix (300 s doubling to 4000 s).
    #[arg(long, default_value_t = SenderMix::default().postfix)]
    postfix: f64,
    /// Share running Exim (every 15 min, then 1 h ×1.5, then 6 h).
    #[arg(long, default_value_t = SenderMix::default().exim)]
    exim: f64,
    /// Share running Exchange (1 min ×4, then 5 min).
    #[arg(long, default_value_t = SenderMix::default().exchange)]
    exchange: f64,
    /// Share running Sendmail (every 15 min, its queue-run interval).
    #[arg(long, default_value_t = SenderMix::default().sendmail)]
    sendmail: f64,
    /// Share running qmail (attempts at 400·n² s: 0, 6:40, 26:40, 1 h …).
    #[arg(long, default_value_t = SenderMix::default().qmail)]
    qmail: f64,
    /// Share running Courier (5, 10, 15, 30, 35, 40, 70 … min).
    #[arg(long, default_value_t = SenderMix::default().courier)]
    courier: f64,
    /// Share running Momentum (20, 60, 100, 180 … min).
    #[arg(long, default_value_t = SenderMix::default().momentum)]
    momentum: f64,
    /// Share running MailEnable (15, 30, 60 min, then every 4 h).
    #[arg(long, default_value_t = SenderMix::default().mailenable)]
    mailenable: f64,
    /// Share of provider pools retrying from another address every 5–15 min.
    #[arg(long, default_value_t = SenderMix::default().pool)]
    pool: f64,
    /// Client networks (one sending address each) of a provider pool.
    #[arg(long, default_value_t = PlanConfig::default().pool_nets)]
    pool_nets: u32,
    /// Pool identity (spf:/name:, simulated): off, on, or both (two runs, compared).
    #[arg(long, default_value = "both")]
    pool_identity: PoolIdentity,
    /// Share of spam that retries once within seconds (the rest of the botnet never does).
    #[arg(long, default_value_t = PlanConfig::default().spam_retry_once)]
    spam_retry_once: f64,
    /// Share of spam sent through real MTAs retrying like Postfix.
    #[arg(long, default_value_t = PlanConfig::default().spam_mta)]
    spam_mta: f64,
    /// Client networks of those spam MTAs.
    #[arg(long, default_value_t = PlanConfig::default().spam_mta_nets)]
    spam_mta_nets: u32,
    /// Client networks of the botnet.
    #[arg(long, default_value_t = PlanConfig::default().spam_nets)]
    spam_nets: u64,
    /// Greylisting delay under test: 300, 5m.
    #[arg(long, value_parser = parse_secs, default_value = "300")]
    delay: u32,
    /// Retry window under test: 2d.
    #[arg(long, value_parser = parse_secs, default_value = "2d")]
    retry_window: u32,
    /// Whitelist lifetime under test: 35d.
    #[arg(long, value_parser = parse_secs, default_value = "35d")]
    whitelist_ttl: u32,
    /// Passed triplets that auto-whitelist a client network (0 = off).
    #[arg(long, default_value_t = PlanConfig::default().policy.awl_clients)]
    awl_clients: u32,
    /// At most one pass per this interval counts towards the auto-whitelist.
    #[arg(long, value_parser = parse_secs, default_value = "1h")]
    awl_interval: u32,
    /// How long an auto-whitelisted client network stays so after its last pass.
    #[arg(long, value_parser = parse_secs, default_value = "35d")]
    awl_ttl: u32,
    /// How long senders keep retrying.
    #[arg(long, value_parser = parse_secs, default_value = "5d")]
    give_up: u32,
    /// Simulate 1 sender in N and scale up (default: automatic, ~30 M decisions).
    #[arg(long)]
    sample: Option<u32>,
    /// Interval between timeline points (default: about 200 points).
    #[arg(long, value_parser = parse_secs)]
    report_every: Option<u32>,
    /// Length of the headroom benchmark.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    headroom_time: Duration,
    /// Most triplets loaded for the headroom benchmark.
    #[arg(long, default_value_t = PlanConfig::default().headroom_max_triplets)]
    headroom_max_triplets: u64,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Write an SVG chart (table size, memory, delay by sender type) to this file.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// No progress line.
    #[arg(long, short = 'q')]
    quiet: bool,
}

/// `300`, `300s`, `500ms`, `5m`, `2h`, `2d`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (300, 300s, 500ms, 5m, 2h, 2d)"))?;
    let mult = match unit {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h, d)")),
    };
    if !(v * mult).is_finite() || v * mult > 1e9 {
        return Err(format!("{s:?} is too long"));
    }
    Ok(Duration::from_secs_f64(v * mult))
}

fn parse_secs(s: &str) -> Result<u32, String> {
    let d = parse_duration(s)?;
    u32::try_from(d.as_secs()).map_err(|_| format!("{s:?} is too long"))
}

impl WorkloadArgs {
    fn config(&self) -> WorkloadConfig {
        WorkloadConfig {
            mix: Mix {
                new: self.new,
                early_retry: self.early_retry,
                retry: self.retry,
                known: self.known,
            },
            nets_v4: self.nets_v4,
            nets_v6: self.nets_v6,
            ipv6_share: self.ipv6_share,
            senders: self.senders,
            recipients: self.recipients,
            known_pool: self.known_pool,
            server_delay: self.server_delay,
            seed: self.seed,
        }
    }
}

impl RunArgs {
    fn config(&self, target: SocketAddr, label: &str) -> RunConfig {
        RunConfig {
            target,
            proto: self.proto,
            connections: self.connections,
            pipeline: self.pipeline,
            per_datagram: self.per_datagram,
            duration: self.duration.or(if self.requests.is_none() {
                Some(Duration::from_secs(10))
            } else {
                None
            }),
            requests: self.requests,
            rate: self.rate,
            timeout: self.timeout,
            workload: self.workload.config(),
            progress: !self.quiet && !self.json,
            label: label.to_string(),
            warmup: self.warmup,
            threads: self.threads,
            minimal: self.minimal,
            cluster: Vec::new(),
            known_whitelisted: false,
        }
    }

    /// Every `--target`, resolved.
    fn targets(&self) -> anyhow::Result<Vec<SocketAddr>> {
        self.target
            .iter()
            .map(|t| client::resolve_target(t, self.allow_remote))
            .collect()
    }

    /// The one `--target` of `ceiling`, if any.
    fn target(&self) -> anyhow::Result<Option<SocketAddr>> {
        match &self.targets()?[..] {
            [] => Ok(None),
            [t] => Ok(Some(*t)),
            _ => anyhow::bail!("ceiling measures one --target"),
        }
    }
}

fn run(a: &RunArgs) -> anyhow::Result<()> {
    let targets = a.targets()?;
    let (target, cluster) = match targets.split_first() {
        Some((t, rest)) => (*t, rest.to_vec()),
        None => match a.proto {
            Proto::Policy => (SocketAddr::from(([127, 0, 0, 1], 10023)), Vec::new()),
            _ => (SocketAddr::from(([127, 0, 0, 1], 10030)), Vec::new()),
        },
    };
    let cfg = RunConfig {
        cluster,
        ..a.config(target, a.proto.name())
    };
    let report = client::run(&cfg)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(())
}

/// One run of `ceiling`, with the CPU the server used during it (`server_cpu` reads the
/// server's CPU time so far). The warm-up, if any, comes first and is not counted.
fn measured(
    cfg: &RunConfig,
    server_cpu: &dyn Fn() -> Option<Duration>,
) -> anyhow::Result<RunReport> {
    if cfg.warmup {
        client::warmup(cfg)?;
    }
    let cfg = RunConfig {
        known_whitelisted: cfg.warmup,
        warmup: false,
        ..cfg.clone()
    };
    let before = server_cpu();
    let mut r = client::run(&cfg)?;
    if let (Some(b), Some(a)) = (before, server_cpu()) {
        r.cpu.server_cores = Some(a.saturating_sub(b).as_secs_f64() / r.elapsed_secs.max(1e-9));
    }
    Ok(r)
}

fn ceiling(a: &RunArgs) -> anyhow::Result<()> {
    let target = a.target()?;
    // The null and naive servers listen on the same loopback family as the target.
    let ip = match target.map(|t| t.ip()) {
        Some(IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    let pick = |native: SocketAddr, policy: SocketAddr| match a.proto {
        Proto::Policy => policy,
        _ => native,
    };
    // The null responder and the naive server run in processes of their own, like the target:
    // sharing the client's process would make their thread switches cheaper than the
    // target's (no address-space switch), which on a ping-pong transport is a large share.
    let null = ServerProcess::spawn(ip, None)?;
    let null_addr = pick(null.native, null.policy);
    let null_cpu = || cpu::process(null.pid());
    // The null responder needs no warm-up: it knows no triplet.
    let plain = |addr, label: &str, minimal| RunConfig {
        warmup: false,
        minimal,
        ..a.config(addr, label)
    };
    let minimal = measured(&plain(null_addr, "minimal client → null", true), &null_cpu)
        .context("measuring the null responder with the minimal client")?;
    let null_report = measured(&plain(null_addr, "null responder", false), &null_cpu)
        .context("measuring the null responder")?;
    drop(null);
    let naive = ServerProcess::spawn(ip, Some(a.workload.server_delay))?;
    let naive_addr = pick(naive.native, naive.policy);
    let naive_cpu = || cpu::process(naive.pid());
    let naive_report = measured(&a.config(naive_addr, "naive server"), &naive_cpu)
        .context("measuring the naive server")?;
    drop(naive);
    let target_report = match target {
        Some(t) => {
            let pid = a
                .target_pid
                .or_else(|| cpu::pid_bound_to(t, a.proto == Proto::NativeUdp));
            let target_cpu = || pid.and_then(cpu::process);
            Some(measured(&a.config(t, "target"), &target_cpu).context("measuring the target")?)
        }
        None => None,
    };
    let mut report = CeilingReport::new(minimal, null_report, naive_report, target_report);
    if report
        .target
        .as_ref()
        .is_some_and(|t| t.cpu.server_cores.is_none())
    {
        report.warnings.push(
            "the target's process was not found (give --target-pid): its CPU is unknown".into(),
        );
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(())
}

/// A null responder or naive server in a child process (this binary's `serve`), killed when
/// dropped.
struct ServerProcess {
    child: std::process::Child,
    native: SocketAddr,
    policy: SocketAddr,
}

impl ServerProcess {
    /// Starts the null responder, or with a delay the naive server, and reads its ports.
    fn spawn(ip: IpAddr, naive_delay: Option<f64>) -> anyhow::Result<Self> {
        use std::io::BufRead;
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.arg("serve").arg("--ip").arg(ip.to_string());
        if let Some(d) = naive_delay {
            cmd.arg("--naive").arg("--delay").arg(d.to_string());
        }
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("start a server process (greyhound-loadtest serve)")?;
        let mut ports = Vec::new();
        if let Some(out) = child.stdout.take() {
            for line in std::io::BufReader::new(out).lines().take(2) {
                let line = line?;
                let addr = line.split_whitespace().nth(1).unwrap_or_default();
                ports.push(addr.parse::<SocketAddr>().with_context(|| {
                    format!("server process printed {line:?}, not its address")
                })?);
            }
        }
        let [native, policy] = ports[..] else {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("the server process ended without printing its addresses");
        };
        Ok(Self {
            child,
            native,
            policy,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(a: &ServeArgs) -> anyhow::Result<()> {
    let print = |native: SocketAddr, policy: SocketAddr| {
        println!("native {native}\npolicy {policy}");
    };
    // Held until the process is killed.
    let _server: Box<dyn std::fmt::Debug> = if a.naive {
        if !(a.delay >= 0.0 && a.delay.is_finite()) {
            anyhow::bail!("--delay must be >= 0");
        }
        let s = NaiveServer::start(a.ip, Duration::from_secs_f64(a.delay))?;
        print(s.native, s.policy);
        Box::new(s)
    } else {
        let s = NullResponder::start(a.ip, NullOptions::default())?;
        print(s.native, s.policy);
        Box::new(s)
    };
    loop {
        std::thread::park();
    }
}

fn plan_cmd(a: &PlanArgs) -> anyhow::Result<()> {
    let cfg = PlanConfig {
        days: a.days,
        rate: a.rate,
        peak_ratio: a.peak_ratio,
        spam_share: a.spam_share,
        senders: a.senders,
        recipients: a.recipients,
        fanout: a.fanout,
        mix: SenderMix {
            postfix: a.postfix,
            exim: a.exim,
            exchange: a.exchange,
            sendmail: a.sendmail,
            qmail: a.qmail,
            courier: a.courier,
            momentum: a.momentum,
            mailenable: a.mailenable,
            pool: a.pool,
        },
        pool_nets: a.pool_nets,
        pool_identity: a.pool_identity,
        spam_retry_once: a.spam_retry_once,
        spam_mta: a.spam_mta,
        spam_mta_nets: a.spam_mta_nets,
        spam_nets: a.spam_nets,
        policy: Policy {
            delay: a.delay,
            retry_window: a.retry_window,
            whitelist_ttl: a.whitelist_ttl,
            awl_clients: a.awl_clients,
            awl_interval: a.awl_interval,
            awl_ttl: a.awl_ttl,
            // A simulation of dry-run would deliver everything: nothing to plan.
            dry_run: false,
        },
        give_up: a.give_up,
        sample: a.sample,
        report_every: a.report_every,
        headroom_secs: a.headroom_time.as_secs_f64(),
        headroom_max_triplets: a.headroom_max_triplets,
        seed: a.seed,
    };
    let pb = if !a.quiet && !a.json && std::io::stderr().is_terminal() {
        let pb = indicatif::ProgressBar::new(1000);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {percent:>3}% simulated [{elapsed_precise}, ~{eta} left] {msg}",
            )
            .expect("valid progress template"),
        );
        pb
    } else {
        indicatif::ProgressBar::hidden()
    };
    let report = plan::plan(&cfg, |done| {
        pb.set_position((done * 1000.0) as u64);
        if done >= 1.0 {
            pb.set_message("headroom benchmark");
        }
    })?;
    pb.finish_and_clear();
    if let Some(path) = &a.chart {
        greyhound_loadtest::chart::write_svg(&report, path)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
        if let Some(path) = &a.chart {
            println!("chart: {}", path.display());
        }
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Ceiling(a) => ceiling(a),
        Cmd::Plan(a) => plan_cmd(a),
        Cmd::Serve(a) => serve(a),
    };
    if let Err(e) = result {
        eprintln!("greyhound-loadtest: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn durations_take_the_server_s_forms() {
        assert_eq!(parse_duration("300"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("300s"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(parse_secs("35d"), Ok(35 * 86_400));
        assert!(parse_secs("100000d").is_err());
    }

    #[test]
    fn the_command_line_parses() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "greyhound-loadtest",
            "run",
            "--proto",
            "native-udp",
            "--per-datagram",
            "8",
            "-c",
            "4",
            "--rate",
            "1000",
            "--new",
            "0.5",
        ])
        .unwrap();
        let Cmd::Run(a) = cli.cmd else {
            panic!("not run")
        };
        let c = a.config(SocketAddr::from(([127, 0, 0, 1], 1)), "x");
        assert_eq!(c.proto, Proto::NativeUdp);
        assert_eq!(c.per_datagram, 8);
        assert_eq!(c.rate, Some(1000.0));
        assert_eq!(c.workload.mix.new, 0.5);
        // Unbounded by count, so bounded by the default 10 s.
        assert_eq!(c.duration, Some(Duration::from_secs(10)));
        assert!(Cli::try_parse_from(["greyhound-loadtest", "run", "--proto", "smtp"]).is_err());
        // Several targets: a cluster run, in the order given.
        let cli = Cli::try_parse_from([
            "greyhound-loadtest",
            "run",
            "--target",
            "127.0.0.1:1",
            "--target",
            "127.0.0.1:2",
        ])
        .unwrap();
        let Cmd::Run(a) = cli.cmd else {
            panic!("not run")
        };
        let t = a.targets().unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[1], SocketAddr::from(([127, 0, 0, 1], 2)));
        assert!(a.target().is_err(), "ceiling takes one target");
    }
}
