//! The command line of the `greyhound` binary: `serve`, `check`, `snapshot inspect` and
//! `admin` (whose client, [`admin`], talks to a running server's admin socket).
//!
//! The flags of `serve` that are settings are [`crate::config::Overrides`], the type the TOML file
//! is read into as well; [`crate::config::Config::load`] parses and applies them.

use std::path::PathBuf;

use std::ffi::OsString;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::Overrides;

pub mod admin;

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
    pub command: CliCommand,
}

impl Cli {
    /// The command line as [`Cli::command`] defines it, except that the values of `serve`'s
    /// flags may look like negative numbers: `--delay -5` reaches the value's own check, which
    /// names the flag in one line, instead of clap reading `-5` as an unknown flag and printing
    /// its usage.
    pub fn command_line() -> clap::Command {
        Self::command().mut_subcommand("serve", |c| {
            c.mut_args(|a| {
                // Flags without a value (`--dry-run` is an `Option<bool>` taking none) keep
                // clap's reading.
                let no_value = a.get_num_args().is_some_and(|n| n.max_values() == 0);
                if a.get_action().takes_values() && !no_value {
                    a.allow_negative_numbers(true)
                } else {
                    a
                }
            })
        })
    }

    /// Parses `args` (the program name first) with [`Cli::command_line`].
    pub fn try_parse_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let mut cmd = Self::command_line();
        let matches = cmd.try_get_matches_from_mut(args)?;
        Self::from_arg_matches(&matches).map_err(|e| e.with_cmd(&cmd))
    }
}

/// A clap error as one line, for a refused command line: the message and its tips, without the
/// usage that follows (the administrator asked for none; `--help` gives it).
pub fn error_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut parts = text.lines().map(str::trim).filter(|l| {
        !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
    });
    let first = parts.next().unwrap_or_default();
    let first = first.strip_prefix("error: ").unwrap_or(first).to_string();
    parts.fold(first, |line, tip| format!("{line} ({tip})"))
}

/// The subcommands.
#[derive(Debug, Subcommand)]
// `Serve` is much larger than the others, but a `CliCommand` is made once per run, and boxing
// `ServeArgs` would only make matching on it clumsier.
#[allow(clippy::large_enum_variant)]
pub enum CliCommand {
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
    /// Administer a running server through its admin socket (exit 0 done or found, 1 not
    /// found, 2 error).
    Admin(AdminArgs),
}

/// The arguments of `greyhound admin`.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The server's admin socket (its `--admin`).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "./greyhound-data/admin.sock",
        global = true
    )]
    pub socket: PathBuf,
    /// Print the server's answer as JSON, for scripts.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// The subcommands of `greyhound admin`.
#[derive(Debug, Clone, Subcommand)]
pub enum AdminCommand {
    /// Records by state, memory, snapshot age, uptime, cluster peers and lag.
    Status,
    /// Explain what the server holds for a triplet and would answer now; changes nothing
    /// (exit 1 when it holds no live record).
    Lookup {
        /// Client IP address.
        client: std::net::IpAddr,
        /// Envelope sender; <> is the null sender.
        sender: String,
        /// Envelope recipient.
        recipient: String,
        /// The client's verified host name (Postfix client_name), for the `name` identity.
        #[arg(long, value_name = "HOST")]
        name: Option<String>,
    },
    /// Whitelist a triplet now (replicated to the cluster).
    Whitelist {
        /// Client IP address.
        client: std::net::IpAddr,
        /// Envelope sender; <> is the null sender.
        sender: String,
        /// Envelope recipient.
        recipient: String,
        /// How long it stays whitelisted [default: the server's whitelist-ttl].
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
    },
    /// Delete a triplet's record (replicated; a delete wins over older state). Exit 1 when
    /// there was none.
    Delete {
        /// Client IP address.
        client: std::net::IpAddr,
        /// Envelope sender; <> is the null sender.
        sender: String,
        /// Envelope recipient.
        recipient: String,
        /// The client's verified host name: the record under its `name` identity goes too.
        #[arg(long, value_name = "HOST")]
        name: Option<String>,
    },
    /// Delete a client's auto-whitelist entry (replicated). Exit 1 when there was none.
    DeleteClient {
        /// Client IP address.
        client: std::net::IpAddr,
    },
    /// Write a snapshot now.
    Snapshot,
    /// Import another greylisting program's data into the running server (and its cluster).
    Import {
        /// The program that wrote FILE.
        #[arg(long = "from", value_enum, value_name = "SOURCE")]
        from: ImportSource,
        /// postgrey: `db_dump -p` output; sqlgrey: its SQLite file; greylistd: its `states`
        /// file; postfix-log: a mail log (rotated or not).
        file: PathBuf,
        /// postgrey: a triplet counts as passed when last - first is at least this.
        #[arg(long, value_name = "DURATION", default_value = "300s")]
        peer_delay: String,
    },
}

/// What `greyhound admin import --from` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImportSource {
    /// postgrey's `postgrey.db` or `postgrey_clients.db` as `db_dump -p` prints them.
    Postgrey,
    /// sqlgrey's SQLite database file.
    Sqlgrey,
    /// greylistd's `states` file (its `triplets` file beside it).
    Greylistd,
    /// A Postfix mail log: delivered messages are whitelisted.
    PostfixLog,
    /// One import item per line, as JSON (docs/PROTOCOL.md, section 4): for data converted
    /// from any other system by a script.
    Jsonl,
}

/// The flags of `greyhound serve`: `--config`, and one per setting, each also a key of the TOML
/// file (the `[limits]` flags are keys of that table) that it overrides.
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// TOML configuration file (an unknown key is an error).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The settings; absent ones leave the file's value, or the default, in force.
    #[command(flatten)]
    pub settings: Overrides,
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
    fn negative_values_reach_their_own_check_and_errors_are_one_line() {
        let cli = Cli::try_parse_args(["greyhound", "serve", "--delay", "-5"]).unwrap();
        let CliCommand::Serve(args) = cli.command else {
            panic!("not serve");
        };
        assert!(args.settings.delay.is_some());
        let e = Cli::try_parse_args(["greyhound", "serve", "--awl-clients", "-1"]).unwrap_err();
        let line = error_line(&e);
        assert!(
            line.contains("--awl-clients") && line.contains("-1"),
            "{line}"
        );
        assert!(!line.contains('\n') && !line.contains("Usage"), "{line}");
        let e = Cli::try_parse_args(["greyhound", "serve", "--dely", "5"]).unwrap_err();
        let line = error_line(&e);
        assert!(
            line.contains("--dely") && line.contains("--delay"),
            "{line}"
        );
    }

    #[test]
    fn serve_alone_gives_no_flag() {
        let cli = Cli::try_parse_from(["greyhound", "serve"]).unwrap();
        let CliCommand::Serve(args) = cli.command else {
            panic!("not serve: {:?}", cli.command);
        };
        assert_eq!(args.config, None);
        let s = &args.settings;
        assert_eq!(s.delay, None);
        assert_eq!(s.allow, None);
        assert_eq!(s.dry_run, None);
        assert!(!s.no_dry_run);
        assert!(!s.no_x_greylist_header);
        assert_eq!(s.x_greylist_header, None);
        assert_eq!(s.awl_clients, None);
        assert_eq!(s.limits.max_line, None);
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
        let CliCommand::Serve(args) = cli.command else {
            panic!("not serve: {:?}", cli.command);
        };
        assert_eq!(args.config, Some(PathBuf::from("x")));
        let s = &args.settings;
        assert_eq!(s.delay.as_ref().map(|d| d.as_str()), Some("5m"));
        assert_eq!(
            s.allow.as_deref(),
            Some(["10.0.0.0/8".to_owned(), "::1/128".to_owned()].as_slice())
        );
        assert_eq!(s.retry_window, None);
        let cli = Cli::try_parse_from(["greyhound", "serve", "-c", "/etc/g.toml"]).unwrap();
        let CliCommand::Serve(args) = cli.command else {
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
        let err =
            Cli::try_parse_from(["greyhound", "serve", "--dry-run", "--dry-run"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
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
        let CliCommand::Check(args) = cli.command else {
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
        let CliCommand::Check(args) = cli.command else {
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
    fn admin_subcommands() {
        let parse = |args: &[&str]| {
            let argv = ["greyhound", "admin"].iter().chain(args);
            match Cli::try_parse_from(argv).map(|c| c.command) {
                Ok(CliCommand::Admin(a)) => Ok(a),
                Ok(other) => panic!("not admin: {other:?}"),
                Err(e) => Err(e.kind()),
            }
        };
        let a = parse(&["status"]).unwrap();
        assert_eq!(a.socket, PathBuf::from("./greyhound-data/admin.sock"));
        assert!(!a.json);
        // The global flags go before or after the subcommand.
        let a = parse(&["lookup", "192.0.2.1", "<>", "b@example.net", "--json"]).unwrap();
        assert!(a.json);
        let AdminCommand::Lookup { sender, name, .. } = a.command else {
            panic!("not lookup");
        };
        assert_eq!((sender.as_str(), name), ("<>", None));
        let a = parse(&[
            "--socket",
            "/s",
            "whitelist",
            "::1",
            "a@b",
            "c@d",
            "--ttl",
            "2d",
        ])
        .unwrap();
        assert_eq!(a.socket, PathBuf::from("/s"));
        assert!(matches!(a.command, AdminCommand::Whitelist { ttl: Some(t), .. } if t == "2d"));
        let a = parse(&["import", "--from", "postfix-log", "/var/log/mail.log"]).unwrap();
        assert!(matches!(
            a.command,
            AdminCommand::Import { from: ImportSource::PostfixLog, ref peer_delay, .. } if peer_delay == "300s"
        ));
        assert_eq!(
            parse(&["delete-client", "not-an-ip"]).unwrap_err(),
            clap::error::ErrorKind::ValueValidation
        );
        assert_eq!(
            parse(&["import", "--from", "exim", "f"]).unwrap_err(),
            clap::error::ErrorKind::InvalidValue
        );
    }

    #[test]
    fn snapshot_inspect() {
        let cli = Cli::try_parse_from(["greyhound", "snapshot", "inspect", "f"]).unwrap();
        let CliCommand::Snapshot {
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
