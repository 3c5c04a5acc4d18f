use berth::config::{Config, LogFormat};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// berth: a pull-through registry mirror and hosted OCI registry.
#[derive(Parser)]
#[command(name = "berth", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry (the embedded default config when no file is given).
    Serve {
        #[arg(long, env = "BERTH_CONFIG")]
        config: Option<PathBuf>,
        /// Log as JSON lines.
        #[arg(long)]
        log_json: bool,
    },
    /// Validate a config file and exit non-zero with a message naming the bad key or file.
    Check {
        #[arg(long, env = "BERTH_CONFIG")]
        config: PathBuf,
    },
    /// Apply retention and collect unreferenced hosted blobs (inside the running server if
    /// there is one).
    Gc {
        #[arg(long, env = "BERTH_CONFIG")]
        config: PathBuf,
        /// Report what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Copy every tag the [[replication]] rules match to their targets (the initial sync);
    /// exit non-zero if any tag failed.
    Replicate {
        #[arg(long, env = "BERTH_CONFIG")]
        config: PathBuf,
        /// Only this rule (counting the [[replication]] tables from 0).
        #[arg(long)]
        rule: Option<usize>,
    },
    /// Verify every blob, link, manifest and tag; exit non-zero on any inconsistency.
    Fsck {
        #[arg(long, env = "BERTH_CONFIG")]
        config: PathBuf,
        /// Remove what cannot be trusted (berth must be stopped).
        #[arg(long)]
        repair: bool,
        /// Continue an interrupted run: blobs it verified are not hashed again.
        #[arg(long)]
        resume: bool,
    },
    /// Write images from the store to an OCI image layout tar (every platform, with their
    /// referrers), for a berth that cannot reach the upstream. Berth must be stopped.
    Export {
        #[arg(long, env = "BERTH_CONFIG")]
        config: PathBuf,
        /// `<repository>:<tag>` or `<repository>@<digest>`, repositories as berth stores them
        /// (mirrored ones under the upstream's name: docker.io/library/alpine:3.20).
        #[arg(required = true)]
        images: Vec<String>,
        /// The bundle to write.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Load an OCI image layout tar (as `berth export` writes) into the store: into an
    /// upstream's mirror cache or a hosted namespace, by each entry's repository name. Every
    /// digest is verified; a damaged bundle stores nothing. Berth must be stopped.
    Import {
        #[arg(long, env = "BERTH_CONFIG")]
        config: PathBuf,
        bundle: PathBuf,
        /// Put this repository prefix in front of every name in the bundle (a hosted namespace).
        #[arg(long)]
        to: Option<String>,
    },
}

fn load(path: Option<&PathBuf>) -> Result<Config, String> {
    match path {
        Some(p) => Config::load(p).map_err(|e| e.to_string()),
        None => Ok(Config::embedded_default()),
    }
}

fn report(r: Result<String, String>) -> ExitCode {
    match r {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("berth: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Gc { config, dry_run } => match load(Some(&config)).and_then(|c| berth::ops::gc(c, dry_run)) {
            Ok(report) => {
                println!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("berth: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Replicate { config, rule } => match load(Some(&config)).and_then(|c| berth::ops::replicate(c, rule)) {
            Ok((ok, report)) => {
                println!("{report}");
                if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("berth: {e}");
                ExitCode::from(2)
            }
        },
        Command::Fsck { config, repair, resume } => match load(Some(&config)).and_then(|c| berth::ops::fsck(c, repair, resume)) {
            Ok((clean, report)) => {
                print!("{report}");
                if clean {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("berth: {e}");
                ExitCode::from(2)
            }
        },
        Command::Export { config, images, output } => report(load(Some(&config)).and_then(|c| berth::ops::export(c, &images, &output))),
        Command::Import { config, bundle, to } => report(load(Some(&config)).and_then(|c| berth::ops::import(c, &bundle, to.as_deref()))),
        Command::Check { config } => match load(Some(&config)).and_then(|c| c.check_environment().map_err(|e| e.to_string())) {
            Ok(()) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("berth: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve { config, log_json } => {
            let cfg = match load(config.as_ref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("berth: {e}");
                    return ExitCode::from(2);
                }
            };
            let format = if log_json { LogFormat::Json } else { cfg.log_format };
            berth::telemetry::init(format, &cfg.log_level);
            if let Err(e) = cfg.check_environment() {
                eprintln!("berth: {e}");
                return ExitCode::from(2);
            }
            tracing::info!(config = %config.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "(embedded default)".into()), "starting berth {}", env!("CARGO_PKG_VERSION"));
            if cfg.open_beyond_loopback() {
                tracing::warn!(
                    "no [auth] section: anyone who can reach this address may pull, push and delete; see Authentication in the README"
                );
            }
            match berth::server::run(cfg, None) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("berth: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
