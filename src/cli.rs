//! The command line of the `greyhound` binary: `serve`, `check` and `snapshot inspect`.
//!
//! Flags of `serve` that need parsing beyond a plain number (durations, addresses, networks) are
//! kept as text here and parsed by [`crate::config::Config::load`], so that their errors have the
//! same one-line form, naming the flag, as the errors of the configuration file.

use std::path::PathBuf;

use clap::builder::PossibleValuesParser;
use clap::{Args, Parser, Subcommand};

use crate::config::LOG_LEVELS;

/// Greyhound's command line.
#[derive(Debug, Parser)]
#[command(
    name = "greyhound",
    version,
    about = "Greyhound: a fast greylisting server with a native protocol and a Postfix policy service",
    propagate_version = true
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
// `Serve` is much larger than the others, but a `Command` is made once per run, and boxing
// `ServeArgs` would only make matching on it clumsier.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the server: embedded defaults, then the --config file, then these flags.
    Serve(ServeArgs),
    /// Send one query to a running server and print the answer (exit 0 on PASS, 1 on DEFER, 2 on
    /// error).
    Check(CheckArgs),
    /// Work with snapshot files.
    Snapshot {
        /// What to do with a snapshot.
        #[command(subcommand)]
        command: SnapshotCommand,
    },
}

/// The flags of `greyhound serve`. Each one is also a key of the TOML file (the `[limits]` flags
/// are keys of that table) and overrides it; an absent flag is `None` or empty, so that it leaves
/// the file's value, or the default, in force.
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// TOML configuration file (an unknown key is an error).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Native protocol address, TCP and UDP [default: 127.0.0.1:10030].
    #[arg(long, value_name = "ADDR", help_heading = "Listeners")]
    pub native: Option<String>,
    /// Postfix policy address: IP:port, or a Unix socket as /path or unix:/path
    /// [default: 127.0.0.1:10023].
    #[arg(long, value_name = "ADDR", help_heading = "Listeners")]
    pub policy: Option<String>,
    /// HTTP metrics address [default: 127.0.0.1:9470].
    #[arg(long, value_name = "ADDR", help_heading = "Listeners")]
    pub metrics: Option<String>,
    /// Network allowed to query, as CIDR or IP; repeatable, and replaces the default
    /// [default: 127.0.0.0/8 and ::1/128].
    #[arg(long, value_name = "CIDR", help_heading = "Listeners")]
    pub allow: Vec<String>,

    /// Data directory: the hash key and the snapshots [default: ./greyhound-data].
    #[arg(long, value_name = "DIR", help_heading = "Storage")]
    pub data_dir: Option<PathBuf>,
    /// Time between two snapshots of the table [default: 60s].
    #[arg(long, value_name = "DURATION", help_heading = "Storage")]
    pub snapshot_interval: Option<String>,

    /// Time a new triplet is deferred [default: 300s].
    #[arg(long, value_name = "DURATION", help_heading = "Greylisting")]
    pub delay: Option<String>,
    /// Time after first sight during which a retry passes [default: 2d].
    #[arg(long, value_name = "DURATION", help_heading = "Greylisting")]
    pub retry_window: Option<String>,
    /// Time a passed triplet stays whitelisted after its last pass [default: 35d].
    #[arg(long, value_name = "DURATION", help_heading = "Greylisting")]
    pub whitelist_ttl: Option<String>,
    /// Counted passes after which a client is auto-whitelisted; 0 turns this off [default: 5].
    #[arg(long, value_name = "N", help_heading = "Greylisting")]
    pub awl_clients: Option<u32>,
    /// At most one pass per this time counts towards auto-whitelisting [default: 1h].
    #[arg(long, value_name = "DURATION", help_heading = "Greylisting")]
    pub awl_interval: Option<String>,
    /// Time an auto-whitelisted client stays so after its last pass [default: 35d].
    #[arg(long, value_name = "DURATION", help_heading = "Greylisting")]
    pub awl_ttl: Option<String>,
    /// Prefix length grouping IPv4 clients into one network [default: 24].
    #[arg(long, value_name = "BITS", help_heading = "Greylisting")]
    pub ipv4_prefix: Option<u8>,
    /// Prefix length grouping IPv6 clients into one network [default: 64].
    #[arg(long, value_name = "BITS", help_heading = "Greylisting")]
    pub ipv6_prefix: Option<u8>,
    /// Answer PASS where the answer would be DEFER, recording as usual.
    #[arg(long, help_heading = "Greylisting", overrides_with = "no_dry_run")]
    pub dry_run: bool,
    /// Enforce greylisting even if the config file says dry-run = true.
    #[arg(long, help_heading = "Greylisting", overrides_with = "dry_run")]
    pub no_dry_run: bool,
    /// Text of a DEFER; %s is the sender, %r the recipient
    /// [default: "Greylisted, see https://greylisting.org/; from=%s to=%r"].
    // The URL is part of the default text, shown as written in --help, not a link to make.
    #[allow(rustdoc::bare_urls)]
    #[arg(long, value_name = "TEXT", help_heading = "Greylisting")]
    pub greylist_text: Option<String>,
    /// Do not add an X-Greylist: header on the first pass of a triplet.
    #[arg(
        long,
        help_heading = "Greylisting",
        overrides_with = "x_greylist_header"
    )]
    pub no_x_greylist_header: bool,
    /// Add the X-Greylist: header even if the config file turns it off.
    #[arg(
        long,
        help_heading = "Greylisting",
        overrides_with = "no_x_greylist_header"
    )]
    pub x_greylist_header: bool,
    /// Host name written in the X-Greylist: header [default: the OS's host name].
    #[arg(long, value_name = "NAME", help_heading = "Greylisting")]
    pub hostname: Option<String>,

    /// File of exempt clients; repeatable, and replaces the embedded default list.
    #[arg(long, value_name = "FILE", help_heading = "Whitelists")]
    pub whitelist_clients: Vec<PathBuf>,
    /// File of exempt senders; repeatable.
    #[arg(long, value_name = "FILE", help_heading = "Whitelists")]
    pub whitelist_senders: Vec<PathBuf>,
    /// File of exempt recipients; repeatable.
    #[arg(long, value_name = "FILE", help_heading = "Whitelists")]
    pub whitelist_recipients: Vec<PathBuf>,

    /// Least severe log messages shown [default: info].
    #[arg(long, value_name = "LEVEL", value_parser = PossibleValuesParser::new(LOG_LEVELS))]
    pub log_level: Option<String>,

    /// Longest native protocol line in bytes, 64..=1024 [default: 1024].
    #[arg(long, value_name = "BYTES", help_heading = "Limits")]
    pub max_line: Option<usize>,
    /// Most simultaneous TCP connections [default: 4096].
    #[arg(long, value_name = "N", help_heading = "Limits")]
    pub max_connections: Option<usize>,
    /// Time an idle connection is kept [default: 600s].
    #[arg(long, value_name = "DURATION", help_heading = "Limits")]
    pub idle_timeout: Option<String>,
    /// Most requests answered from one read before serving other connections [default: 1024].
    #[arg(long, value_name = "N", help_heading = "Limits")]
    pub requests_per_read: Option<usize>,
    /// Largest UDP datagram accepted, 512..=65507 bytes [default: 65507].
    #[arg(long, value_name = "BYTES", help_heading = "Limits")]
    pub udp_max_datagram: Option<usize>,
    /// Largest Postfix policy request, 1024..=1048576 bytes [default: 16384].
    #[arg(long, value_name = "BYTES", help_heading = "Limits")]
    pub policy_max_block: Option<usize>,
    /// Most attributes in one Postfix policy request [default: 128].
    #[arg(long, value_name = "N", help_heading = "Limits")]
    pub policy_max_attributes: Option<usize>,
}

/// The arguments of `greyhound check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Client IP address of the SMTP connection, e.g. 192.0.2.1.
    pub client: String,
    /// Envelope sender; <> is the null sender of bounces.
    pub sender: String,
    /// Envelope recipient.
    pub recipient: String,
    /// Greyhound's native protocol address.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:10030")]
    pub server: String,
    /// Ask over UDP instead of TCP.
    #[arg(long)]
    pub udp: bool,
    /// How long to wait for the answer.
    #[arg(long, value_name = "DURATION", default_value = "3s")]
    pub timeout: String,
}

/// The subcommands of `greyhound snapshot`.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Print a snapshot file's header, its counts and whether its checksum holds.
    Inspect {
        /// The snapshot file.
        file: PathBuf,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent() {
        // clap's own check of the derive: duplicate flags, bad defaults and the like.
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_alone_gives_no_flag() {
        let cli = Cli::try_parse_from(["greyhound", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve: {:?}", cli.command);
        };
        assert_eq!(args.config, None);
        assert_eq!(args.delay, None);
        assert!(args.allow.is_empty());
        assert!(!args.dry_run);
        assert!(!args.no_x_greylist_header);
        assert_eq!(args.awl_clients, None);
    }

    #[test]
    fn serve_with_flags() {
        let cli = Cli::try_parse_from([
            "greyhound",
            "serve",
            "--config",
            "x",
            "--delay",
            "5m",
            "--allow",
            "10.0.0.0/8",
            "--allow",
            "::1/128",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve: {:?}", cli.command);
        };
        assert_eq!(args.config, Some(PathBuf::from("x")));
        assert_eq!(args.delay.as_deref(), Some("5m"));
        assert_eq!(args.allow, ["10.0.0.0/8", "::1/128"]);
        assert_eq!(args.retry_window, None);
        let cli = Cli::try_parse_from(["greyhound", "serve", "-c", "/etc/g.toml"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve: {:?}", cli.command);
        };
        assert_eq!(args.config, Some(PathBuf::from("/etc/g.toml")));
    }

    #[test]
    fn serve_refuses_bad_flags() {
        let err = Cli::try_parse_from(["greyhound", "serve", "--dely", "5m"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
        let err =
            Cli::try_parse_from(["greyhound", "serve", "--log-level", "verbose"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue);
        let err = Cli::try_parse_from(["greyhound", "serve", "--ipv4-prefix", "x"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        let err = Cli::try_parse_from(["greyhound", "serve", "--dry-run=yes"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::TooManyValues);
    }

    #[test]
    fn check_accepts_the_null_sender() {
        let cli = Cli::try_parse_from([
            "greyhound",
            "check",
            "192.0.2.1",
            "<>",
            "b@example.net",
            "--udp",
        ])
        .unwrap();
        let Command::Check(args) = cli.command else {
            panic!("not check: {:?}", cli.command);
        };
        assert_eq!(args.client, "192.0.2.1");
        assert_eq!(args.sender, "<>");
        assert_eq!(args.recipient, "b@example.net");
        assert!(args.udp);
        assert_eq!(args.server, "127.0.0.1:10030");
        assert_eq!(args.timeout, "3s");
    }

    #[test]
    fn check_takes_server_and_timeout() {
        let cli = Cli::try_parse_from([
            "greyhound",
            "check",
            "--server",
            "[::1]:10031",
            "--timeout",
            "10s",
            "2001:db8::1",
            "a@example.org",
            "b@example.net",
        ])
        .unwrap();
        let Command::Check(args) = cli.command else {
            panic!("not check: {:?}", cli.command);
        };
        assert_eq!(args.server, "[::1]:10031");
        assert_eq!(args.timeout, "10s");
        assert_eq!(args.client, "2001:db8::1");
        assert!(!args.udp);
        // All three positionals are required.
        let err = Cli::try_parse_from(["greyhound", "check", "192.0.2.1", "<>"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn snapshot_inspect() {
        let cli = Cli::try_parse_from(["greyhound", "snapshot", "inspect", "f"]).unwrap();
        let Command::Snapshot {
            command: SnapshotCommand::Inspect { file },
        } = cli.command
        else {
            panic!("not snapshot inspect: {:?}", cli.command);
        };
        assert_eq!(file, PathBuf::from("f"));
        let err = Cli::try_parse_from(["greyhound", "snapshot"]).unwrap_err();
        assert_eq!(
            err.kind(),
            clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        );
    }
}
