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
    /// verdict per conversation. Offline: `review` means Tier 2 would be asked.
    Replay { file: PathBuf },
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
        Command::Replay { file } => {
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
