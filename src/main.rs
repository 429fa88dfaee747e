//! The `crisisd` command line.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crisisd::corpus::{self, Conversation, LineError};
use crisisd::eval::{self, Scored, Thresholds};
use crisisd::replay::{ReplayLine, replay};
use crisisd::tier1::Matcher;
use crisisd::tier1::rules::{Loaded, RuleSet};

mod commands;

/// Exit code when input lines were skipped.
const EXIT_SKIPPED: u8 = 3;

#[derive(Parser)]
#[command(
    name = "crisisd",
    version,
    about = "Real-time crisis detection for therapy practices"
)]
struct Cli {
    /// Load phrase rules (en.toml, es.toml, …) from this folder instead of the
    /// shipped ones.
    #[arg(long, global = true, value_name = "DIR")]
    rules: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run Tier 1 over a corpus (JSON lines; `-` for stdin) and print one
    /// verdict per conversation. Offline by default: `review` means Tier 2
    /// would be asked. With `--tier2 bedrock`, reviews go to the model the
    /// config names ([tier2]), for evaluation; a failure escalates.
    Replay {
        file: PathBuf,
        #[arg(long, value_enum, default_value = "none")]
        tier2: Tier2Mode,
        /// Config file for `--tier2 bedrock` (else $CRISISD_CONFIG, defaults).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Score Tier 1 against a labeled corpus; exit 1 if a figure misses its
    /// threshold.
    Eval {
        file: PathBuf,
        #[arg(long, default_value_t = 0.97)]
        min_tier1_recall: f64,
        #[arg(long, default_value_t = 1.0)]
        min_safety_recall: f64,
        #[arg(long, default_value_t = 0.02)]
        max_false_escalation: f64,
        #[arg(long, default_value_t = 0.10)]
        max_review_load: f64,
    },
    /// Validate rule files (the shipped ones, or those in DIR) and print counts.
    CheckRules { dir: Option<PathBuf> },
    /// Print the normalized form of each line of TEXT or stdin: how Tier 1
    /// sees it (for rule authors).
    Normalize { text: Option<String> },
    /// Run the gRPC service. With no config: plaintext on 127.0.0.1:50051,
    /// SQLite in ./crisisd-data, console pager.
    Serve {
        /// TOML config file (else $CRISISD_CONFIG, else defaults).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Listen address, over the config's.
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Prometheus metrics address, over the config's.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<String>,
    },
    /// Play a corpus (JSON lines) or a text file (one patient utterance per
    /// line) into a running server and print the directives it sends back.
    Stream {
        file: PathBuf,
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        /// Bearer token (else $CRISISD_TOKEN).
        #[arg(long)]
        token: Option<String>,
        /// Practice id to send with each call or text.
        #[arg(long, default_value = "demo-practice")]
        practice: String,
    },
    /// Load a running server: concurrent calls (and texts) at a rate, with
    /// progress each second, then throughput, directive latency
    /// percentiles, errors and the server's memory.
    Loadgen {
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        /// Bearer token of the voice (and messaging) role (else
        /// $CRISISD_TOKEN).
        #[arg(long)]
        token: Option<String>,
        /// Concurrent transcript streams.
        #[arg(long, default_value_t = 100)]
        streams: usize,
        /// HTTP/2 connections they share (default: one per 100 streams).
        #[arg(long)]
        connections: Option<usize>,
        /// Utterances per second over all streams; 0: as fast as possible.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Texts per second (SubmitMessage).
        #[arg(long, default_value_t = 0.0)]
        messages: f64,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Utterances per call; the last of each call is crisis language
        /// (a share of 1/N), unless --no-crisis.
        #[arg(long, default_value_t = 20)]
        call_len: usize,
        #[arg(long)]
        no_crisis: bool,
        /// Only open the streams and hold them (memory per idle stream).
        #[arg(long)]
        idle: bool,
        /// The server's process id, to report its resident memory.
        #[arg(long)]
        server_pid: Option<u32>,
        #[arg(long, default_value = "loadgen")]
        practice: String,
    },
    /// Ask a server's health endpoint whether crisis detection is serving;
    /// exit 0 if so, 1 if not (for a container's health check).
    Health {
        /// The server's `health_listen` address (plaintext, loopback).
        #[arg(long, default_value = "127.0.0.1:50052")]
        addr: String,
    },
    /// The transport ceiling for `loadgen`: the same gRPC API served by a
    /// service that only reads. Not crisis detection.
    #[command(hide = true)]
    EchoServer {
        #[arg(long, default_value = "127.0.0.1:50061")]
        listen: String,
    },
    /// Print who an escalation for a practice would page at TIME: the
    /// clinician on call, if any, and the backup.
    Oncall {
        /// The on-call roster (TOML; roster.example.toml shows the format).
        #[arg(long, value_name = "FILE")]
        roster: PathBuf,
        #[arg(long, value_name = "ID")]
        practice: String,
        /// RFC 3339 with an offset: 2026-11-23T15:00:00-05:00 or
        /// 2026-11-23T20:00:00Z. Default: now.
        #[arg(long, value_name = "TIME")]
        at: Option<String>,
    },
    /// Check or export the audit log.
    Audit {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: AuditAction,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Token helpers.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Tier2Mode {
    /// Offline: reviews stay reviews.
    None,
    /// Ask the configured Bedrock model.
    Bedrock,
}

#[derive(Subcommand)]
enum AuditAction {
    /// Check the hash chain; exit 1 naming every altered, removed or
    /// reordered row.
    Verify,
    /// Write the audit log as JSON lines.
    Export {
        /// Only rows from this time on: RFC 3339 (2026-11-23T10:00:00Z) or
        /// milliseconds since the epoch.
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Print a commented config with every key at its default.
    Example,
}

#[derive(Subcommand)]
enum TokenAction {
    /// Make a new random token and print it with its config entry.
    New {
        /// voice, messaging, scheduling, responder or admin.
        role: String,
        name: String,
        /// For a responder: the practice it reads.
        #[arg(long, default_value = "")]
        practice: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("crisisd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::CheckRules { dir } => check_rules(dir.or(cli.rules).as_deref()),
        Command::Replay {
            file,
            tier2: Tier2Mode::Bedrock,
            config,
        } => {
            let matcher = matcher(cli.rules.as_deref())?;
            let (convs, errors) = read_corpus(&file)?;
            commands::replay_tier2(&matcher, &convs, config)?;
            Ok(skipped(&errors))
        }
        Command::Replay { file, .. } => {
            let matcher = matcher(cli.rules.as_deref())?;
            let (convs, errors) = read_corpus(&file)?;
            let stdout = io::stdout();
            let mut out = stdout.lock();
            for c in &convs {
                let v = replay(&matcher, c);
                serde_json::to_writer(&mut out, &ReplayLine::new(&c.id, &v))?;
                writeln!(out)?;
            }
            Ok(skipped(&errors))
        }
        Command::Eval {
            file,
            min_tier1_recall,
            min_safety_recall,
            max_false_escalation,
            max_review_load,
        } => {
            let t = Thresholds {
                min_tier1_recall,
                min_safety_recall,
                max_false_escalation,
                max_review_load,
            };
            let matcher = matcher(cli.rules.as_deref())?;
            let (convs, mut errors) = read_corpus(&file)?;
            let mut scored = Vec::with_capacity(convs.len());
            for c in convs {
                let Some(label) = c.label else {
                    errors.push(LineError {
                        line: c.line,
                        problem: "no label, not scored".into(),
                    });
                    continue;
                };
                let verdict = replay(&matcher, &c);
                scored.push(Scored {
                    id: c.id,
                    label,
                    tags: c.tags,
                    verdict,
                });
            }
            print!("{}", eval::report(&scored, &t));
            if !eval::figures(&scored).failures(&t).is_empty() {
                return Ok(ExitCode::FAILURE);
            }
            Ok(skipped(&errors))
        }
        Command::Serve {
            config,
            listen,
            metrics_listen,
        } => commands::serve(config, listen, metrics_listen),
        Command::Stream {
            file,
            server,
            token,
            practice,
        } => commands::stream(&file, &server, token, &practice),
        Command::Oncall {
            roster,
            practice,
            at,
        } => commands::oncall(&roster, &practice, at.as_deref()),
        Command::Loadgen {
            server,
            token,
            streams,
            connections,
            rate,
            messages,
            duration,
            call_len,
            no_crisis,
            idle,
            server_pid,
            practice,
        } => commands::loadgen(crisisd::loadgen::LoadOptions {
            target: server,
            token: token.or_else(|| std::env::var("CRISISD_TOKEN").ok()),
            connections: connections.unwrap_or(streams.div_ceil(100)),
            streams,
            rate,
            duration,
            call_len: call_len.max(1),
            crisis: !no_crisis,
            messages_per_sec: messages,
            idle,
            practice,
            server_pid,
            progress: true,
            ..Default::default()
        }),
        Command::EchoServer { listen } => commands::echo_server(&listen),
        Command::Health { addr } => commands::health(&addr),
        Command::Audit { config, action } => match action {
            AuditAction::Verify => commands::audit_verify(config),
            AuditAction::Export { since } => commands::audit_export(config, since.as_deref()),
        },
        Command::Config {
            action: ConfigAction::Example,
        } => {
            print!("{}", crisisd::config::EXAMPLE);
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            action:
                TokenAction::New {
                    role,
                    name,
                    practice,
                },
        } => commands::token_new(&role, &name, &practice),
        Command::Normalize { text } => {
            let matcher = matcher(cli.rules.as_deref())?;
            let n = matcher.normalizer();
            match text {
                Some(t) => println!("{}", n.normalize(&t)),
                None => {
                    for line in io::stdin().lock().lines() {
                        println!("{}", n.normalize(&line?));
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load_rules(dir: Option<&Path>) -> Loaded {
    match dir {
        Some(d) => RuleSet::load_dir(d),
        None => RuleSet::load_builtin(),
    }
}

fn matcher(dir: Option<&Path>) -> Result<Matcher> {
    let loaded = load_rules(dir);
    let rules = loaded.rules.map_err(|es| {
        anyhow::anyhow!(
            "the rules do not load:\n{}",
            es.iter()
                .map(|e| format!("  {e}"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;
    Ok(Matcher::new(rules)?)
}

fn check_rules(dir: Option<&Path>) -> Result<ExitCode> {
    let loaded = load_rules(dir);
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let rules = match loaded.rules {
        Ok(r) => r,
        Err(es) => {
            for e in &es {
                eprintln!("error: {e}");
            }
            eprintln!("{} error(s)", es.len());
            return Ok(ExitCode::FAILURE);
        }
    };
    let matcher = Matcher::new(rules.clone())?;
    println!("files: {}", rules.files.join(", "));
    println!(
        "{:<4} {:<16} {:<9} {:>5} {:>9}",
        "lang", "category", "action", "rules", "patterns"
    );
    let mut total = (0, 0);
    for ((lang, cat, action), (n, p)) in rules.counts() {
        println!(
            "{:<4} {:<16} {:<9} {:>5} {:>9}",
            lang,
            cat.as_str(),
            action.as_str(),
            n,
            p
        );
        total.0 += n;
        total.1 += p;
    }
    let excl: usize = rules.exclusions.iter().map(|x| x.patterns.len()).sum();
    println!(
        "total: {} rules, {} patterns, {} exclusions ({} patterns), {} literals in the automaton",
        total.0,
        total.1,
        rules.exclusions.len(),
        excl,
        matcher.pattern_count()
    );
    let behavior = match dir.map(|d| d.join("behavior.toml")) {
        None => Some(crisisd::tier3::BehaviorRules::builtin()),
        Some(f) if f.exists() => Some(crisisd::tier3::BehaviorRules::load(&f)),
        Some(_) => None,
    };
    match behavior {
        None => println!("behavior: no behavior.toml in that folder"),
        Some(Err(es)) => {
            for e in &es {
                eprintln!("error: {e}");
            }
            eprintln!("{} error(s)", es.len());
            return Ok(ExitCode::FAILURE);
        }
        Some(Ok(b)) => {
            println!("behavior: {}", b.file);
            for r in b.rules() {
                println!(
                    "  {:<40} {:<9} cooldown {}",
                    r.id,
                    r.severity.as_str(),
                    humantime::format_duration(std::time::Duration::from_millis(
                        r.cooldown_ms as u64
                    ))
                );
            }
        }
    }
    println!("ok");
    Ok(ExitCode::SUCCESS)
}

fn read_corpus(file: &Path) -> Result<(Vec<Conversation>, Vec<LineError>)> {
    if file == Path::new("-") {
        return Ok(corpus::read(io::stdin().lock()));
    }
    let f = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    Ok(corpus::read(BufReader::new(f)))
}

fn skipped(errors: &[LineError]) -> ExitCode {
    if errors.is_empty() {
        return ExitCode::SUCCESS;
    }
    for e in errors {
        eprintln!("skipped {e}");
    }
    eprintln!("{} line(s) skipped", errors.len());
    ExitCode::from(EXIT_SKIPPED)
}
